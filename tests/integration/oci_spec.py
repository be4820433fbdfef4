"""OCI runtime specs for tests, starting from crun's own default (`crun spec`)."""

from __future__ import annotations

import json
import subprocess
import tempfile
from typing import Any


def default_spec(args: list[str], *, terminal: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run(["crun", "spec"], cwd=scratch, check=True)
        with open(f"{scratch}/config.json") as handle:
            spec: dict[str, Any] = json.load(handle)
    spec["process"]["args"] = args
    spec["process"]["terminal"] = terminal
    spec["root"] = {"path": "rootfs", "readonly": False}
    return spec


def process_spec(args: list[str], *, terminal: bool = False) -> dict[str, Any]:
    process: dict[str, Any] = default_spec(args, terminal=terminal)["process"]
    return process

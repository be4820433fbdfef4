"""Locates (building if needed, from the cached scripts) the guest kernel and rootfs."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _build(script: str, env_var: str) -> Path:
    given = os.environ.get(env_var)
    if given:
        return Path(given)
    out = subprocess.run(
        ["bash", str(REPO / script)], check=True, stdout=subprocess.PIPE, text=True
    ).stdout
    return Path(out.strip().splitlines()[-1])


@functools.cache
def kernel() -> Path:
    return _build("guest/kernel/build-kernel.sh", "CLOUDHV_KERNEL")


@functools.cache
def rootfs() -> Path:
    return _build("guest/rootfs/build-rootfs.sh", "CLOUDHV_ROOTFS")


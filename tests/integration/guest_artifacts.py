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


@functools.cache
def crun_version() -> tuple[int, ...]:
    """The version of the crun inside the guest rootfs, run from a copy of the image's
    files with the image's own loader and libraries."""
    import re
    import tempfile

    with tempfile.TemporaryDirectory(prefix="chv-crun-") as tmp:
        subprocess.run(["debugfs", "-R", f"rdump / {tmp}", str(rootfs())],
                       check=True, capture_output=True)
        libs = Path(tmp) / "lib" / "x86_64-linux-gnu"
        out = subprocess.run(
            [str(libs / "ld-linux-x86-64.so.2"), "--library-path", str(libs),
             str(Path(tmp) / "usr" / "bin" / "crun"), "--version"],
            check=True, capture_output=True, text=True,
        ).stdout
    match = re.search(r"crun version (\d+(?:\.\d+)*)", out)
    if match is None:
        raise RuntimeError(f"cannot tell the guest's crun version from {out!r}")
    return tuple(int(part) for part in match.group(1).split("."))

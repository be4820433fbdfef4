"""Mounts on the host: mount(2)/umount2(2) through libc, and this namespace's mount table.

Used by the rootfs image builder (a read-only overlay of the snapshot layers), by
teardown and by crash cleanup (detach whatever is left under a pod's directories).
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterable
from pathlib import Path

from shim.libc import LIBC

MS_RDONLY = 1
MNT_DETACH = 2


class MountError(OSError):
    """A mount or unmount failed; the message names the operation and the path."""


def mount(source: str, target: Path, fstype: str, flags: int, data: str) -> None:
    rc = LIBC.mount(source.encode(), str(target).encode(), fstype.encode(), flags, data.encode())
    if rc != 0:
        err = ctypes.get_errno()
        raise MountError(err, f"mount {fstype} {source} on {target}: {os.strerror(err)}")


def unmount(target: Path, *, detach: bool = False) -> None:
    """Unmount `target`; not mounted is fine."""
    rc = LIBC.umount2(str(target).encode(), MNT_DETACH if detach else 0)
    if rc != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):
            return
        raise MountError(err, f"unmount {target}: {os.strerror(err)}")


def mount_points() -> list[str]:
    """Mount points in this mount namespace, innermost last."""
    return [point for point, _ in mount_points_with_types()]


def mount_points_with_types() -> list[tuple[str, str]]:
    """(mount point, filesystem type) in this mount namespace, innermost last."""
    points = []
    with open("/proc/self/mountinfo") as info:
        for line in info:
            before, _, after = line.partition(" - ")
            fields = before.split(" ")
            if len(fields) > 4:
                points.append((unescape(fields[4]), after.split(" ", 1)[0]))
    return points


def unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def unmount_under(prefixes: Iterable[Path]) -> list[str]:
    """Detach every mount at or below any of `prefixes`, deepest first. Returns them."""
    roots = [str(p).rstrip("/") for p in prefixes]
    found = [m for m in mount_points() if any(m == r or m.startswith(r + "/") for r in roots)]
    for point in sorted(set(found), key=len, reverse=True):
        unmount(Path(point), detach=True)
    return found

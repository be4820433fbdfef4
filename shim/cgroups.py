"""The sandbox's host cgroup: the VMM and its helpers are charged to the pod, as with runc.

containerd puts a runc pod's pause process in the sandbox spec's `cgroupsPath`, under
the pod cgroup kubelet sizes; here the VM is the pod, so its processes go there. The
cgroup is a resource (shim/resource.py): recorded, then made (one directory per
mounted hierarchy, cgroup v1 and v2 alike), then each VMM process is moved in as it
is spawned; undone by removing the directories once the processes are gone.

`cgroupsPath` is either a path (cgroupfs driver: relative to each hierarchy's root)
or systemd's `slice:prefix:name`, turned into the path systemd would give it
(`/a.slice/a-b.slice/prefix-name.scope`), without asking systemd for a unit.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from shim.errors import InvalidArgument
from shim.hostmount import mount_points_with_types
from shim.resource import PodServices, Undo, step
from shim.state import ResourceRecord

log = logging.getLogger(__name__)

KIND = "cgroup"
RECORD_ID = "sandbox-cgroup"
RMDIR_WAIT_S = 2.0  # a killed process leaves its cgroup once reaped


def cgroup_relpath(cgroups_path: str) -> str:
    """The cgroup's path below each hierarchy's root; InvalidArgument if it is unusable."""
    if not cgroups_path:
        return ""
    if ":" in cgroups_path:
        parts = cgroups_path.split(":")
        if len(parts) != 3 or not all(parts[1:]):
            raise InvalidArgument(
                f"cgroupsPath {cgroups_path!r}: want a path or systemd's slice:prefix:name"
            )
        slice_, prefix, name = parts
        return _systemd_slice_path(slice_ or "system.slice") + f"/{prefix}-{name}.scope"
    rel = cgroups_path.strip("/")
    if any(part in ("", ".", "..") for part in rel.split("/")):
        raise InvalidArgument(f"cgroupsPath {cgroups_path!r}: not a plain path")
    return rel


def _systemd_slice_path(slice_: str) -> str:
    """`a-b.slice` lives in `a.slice/a-b.slice`, as systemd nests slices by dashes."""
    if not slice_.endswith(".slice") or "/" in slice_:
        raise InvalidArgument(f"cgroupsPath slice {slice_!r}: not a systemd slice name")
    stem = slice_.removesuffix(".slice")
    if stem == "-":
        return ""
    parts, path = stem.split("-"), []
    for index in range(1, len(parts) + 1):
        path.append("-".join(parts[:index]) + ".slice")
    return "/".join(path)


def hierarchy_roots() -> list[Path]:
    """Every mounted cgroup hierarchy (v1 ones and the v2 one)."""
    return [
        Path(point)
        for point, fstype in mount_points_with_types()
        if fstype in ("cgroup", "cgroup2")
    ]


class PodCgroup:
    """The VMM's processes in the sandbox's cgroup, in every hierarchy.

    Directories on the way that did not exist (kubelet makes pod cgroups; crictl or
    ctr users often do not) are made too, and being the shim's, removed with it.
    """

    def __init__(self, rel: str, roots: Sequence[Path]) -> None:
        self.dirs = tuple(root / rel for root in roots) if rel else ()
        self._made = _missing(self.dirs)
        self._undo = Undo("sandbox cgroup")

    @property
    def record(self) -> ResourceRecord:
        # Deepest first: the order they are removed in.
        made = sorted(self._made, key=lambda p: len(p.parts), reverse=True)
        return ResourceRecord(KIND, RECORD_ID, "", {"dirs": "\n".join(map(str, made))})

    async def attach(self, pod: PodServices) -> None:
        """Record, then make the cgroup directories."""
        if not self.dirs:
            return
        await step("cgroup record", pod.record(self.record))
        self._undo.push("forget cgroup", lambda: self._forget(pod), host=True)
        self._undo.push("remove cgroup", self._remove, host=True)
        try:
            await step("cgroup create", asyncio.to_thread(_make, self.dirs))
        except BaseException:
            await self._undo.unwind()
            raise

    async def adopt(self, pid: int) -> None:
        """Move `pid` into the cgroup of every hierarchy."""
        if self.dirs:
            await asyncio.to_thread(_move, self.dirs, pid)

    async def detach(self, pod: PodServices) -> None:
        await self._undo.unwind()

    async def _remove(self) -> None:
        await asyncio.to_thread(undo_host, self.record)

    async def _forget(self, pod: PodServices) -> None:
        if self._undo.clean:
            await pod.forget(RECORD_ID)


def _missing(dirs: Sequence[Path]) -> list[Path]:
    """Each directory of `dirs`, and its ancestors, that does not exist yet."""
    missing: list[Path] = []
    for directory in dirs:
        at = directory
        while not at.exists() and at not in missing:
            missing.append(at)
            at = at.parent
    return missing


def _make(dirs: Sequence[Path]) -> None:
    for directory in dirs:
        directory.mkdir(parents=True, exist_ok=True)
        if (directory / "cpuset.cpus").exists():
            _inherit_cpuset(directory)


def _inherit_cpuset(directory: Path) -> None:
    """A new v1 cpuset has no CPUs or memory nodes, and takes no process until it has:
    give each level that has none its parent's, top down."""
    chain = [directory]
    while chain[-1].parent != chain[-1] and (chain[-1].parent / "cpuset.cpus").exists():
        chain.append(chain[-1].parent)
    for child in reversed(chain[:-1]):
        for name in ("cpuset.cpus", "cpuset.mems"):
            if not (child / name).read_text().strip():
                (child / name).write_text((child.parent / name).read_text())


def _move(dirs: Sequence[Path], pid: int) -> None:
    for directory in dirs:
        try:
            (directory / "cgroup.procs").write_text(str(pid))
        except ProcessLookupError:
            return  # the process is gone already
        except OSError as err:
            log.error(
                "event=cgroup_join_failed pid=%d cgroup=%s error=%r", pid, directory, str(err)
            )


def undo_host(record: ResourceRecord) -> list[str]:
    """Remove the cgroup directories the shim made, deepest first (their processes must
    be gone), from the record."""
    done = []
    for name in filter(None, record.host.get("dirs", "").split("\n")):
        directory = Path(name)
        deadline = time.monotonic() + RMDIR_WAIT_S
        while True:
            try:
                os.rmdir(directory)
                done.append(f"removed cgroup {directory}")
                break
            except FileNotFoundError:
                break
            except OSError as err:
                # EBUSY: a killed process is not reaped yet. Anything else stays an error.
                if err.errno != errno.EBUSY or time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)
    return done


"""Directory volumes shared live with the guest: one virtiofsd per pod, one bind per volume.

hostPath, emptyDir and PVC directories must be the same directory for the host
and the container (docs/volumes.md). The pod gets one virtio-fs device, served by
one virtiofsd whose source is a per-pod share root; each container volume is its
host directory bound under that root, and the container's mount source is
rewritten to the same path under the guest's mount of the tag.

Host layout, under the pod's state dir (`<state_dir>/<pod key>/fs`):

    fs/                       bound on itself and made private: nothing made below
                              propagates out to the host's mount peers
    fs/share/                 bound on itself and made shared (a peer group of its
                              own): virtiofsd's source. virtiofsd enters a mount
                              namespace of its own at start, where its copy of
                              share/ is a slave: binds made here later reach it
    fs/share/<cid>/<n>        container <cid>'s mount number <n>: its host directory
    fs/stage/<cid>/<n>        where that bind is made and given its propagation
                              before it is moved under share/
    fs/virtiofsd.sock|.log    the vhost-user socket (the VMM's end) and the log

Why the stage: the copy of a mount that virtiofsd's namespace receives takes its
master from the mount's peers when it appears. A bind of a shared host directory
made directly under share/ would join the source's peer group, and making it
private afterwards hands the copy to those peers: mounts the host makes under an
`rprivate` volume would still reach the guest. So the bind is made in the private
stage, given its final propagation (`rslave`: a slave of the source, which
receives the host's later mounts; `rprivate`: nothing), and only then moved under
share/, where it is propagated to virtiofsd as it is. A mount made in the guest
is a guest mount: it never reaches the host, so `rshared` is refused by the
planner (shim/cri_mounts.py).

Resources (shim/resource.py): the pod's `SharedFs` (record with the root and,
once spawned, virtiofsd's pid and start time; root; virtiofsd; guest mount), and
each container's `SharedVolumes` (one record per bind; bind; unbound at the
container's delete). Crash cleanup undoes both from their records (`undo_host`,
`undo_volume_host`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import socket
import stat
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from shim import hostmount
from shim.config import VirtiofsConfig
from shim.cri_mounts import SHARED_ROOT, DirShare
from shim.errors import FailedPrecondition, Unavailable
from shim.resource import PodServices, Undo, UndoStep, step
from shim.state import ResourceRecord
from shim.vmm.base import SharedFsSpec
from shim.vmm.procs import kill_recorded, process_start_time

log = logging.getLogger(__name__)

KIND = "sharedfs"
RECORD_ID = "sharedfs"
VOLUME_KIND = "volume"
TAG = "cloudhv"  # the virtio-fs tag the guest mounts (at most 36 bytes)

MS_BIND = 0x1000
MS_REC = 0x4000
MS_REMOUNT = 0x20
MS_MOVE = 0x2000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20


@dataclass(frozen=True)
class Layout:
    """Where a pod's shared directories live on the host."""

    root: Path  # fs/

    @property
    def share(self) -> Path:
        return self.root / "share"

    @property
    def stage(self) -> Path:
        return self.root / "stage"

    @property
    def socket(self) -> Path:
        return self.root / "virtiofsd.sock"

    @property
    def log(self) -> Path:
        return self.root / "virtiofsd.log"


# -- Host operations: blocking, run off the event loop ------------------------------------


def make_root(layout: Layout) -> None:
    """fs/ private, fs/share/ shared in a peer group of its own, fs/stage/ a plain dir."""
    layout.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    _bind_private(layout.root)
    layout.stage.mkdir(mode=0o700, exist_ok=True)
    layout.share.mkdir(mode=0o755, exist_ok=True)
    if not _is_mount_point(layout.share):
        hostmount.mount(str(layout.share), layout.share, "", MS_BIND, "")
        hostmount.mount("", layout.share, "", MS_PRIVATE, "")  # out of fs/'s group, if any
        hostmount.mount("", layout.share, "", MS_SHARED, "")


def _bind_private(path: Path) -> None:
    if not _is_mount_point(path):
        hostmount.mount(str(path), path, "", MS_BIND, "")
    hostmount.mount("", path, "", MS_PRIVATE, "")


def _is_mount_point(path: Path) -> bool:
    return str(path) in hostmount.mount_points()


def remove_root(root: Path) -> list[str]:
    """Detach everything under the root (deepest first) and remove the layout. Idempotent."""
    done = [f"unmounted {point}" for point in hostmount.unmount_under([root])]
    if root.exists():
        _remove_layout(root)
        done.append(f"removed {root}")
    return done


def _remove_layout(root: Path) -> None:
    """Remove the layout's own entries by name, with rmdir only: a directory still
    mounted on (EBUSY) or holding anything (ENOTEMPTY) stays, so a volume's host
    contents can never be deleted from here."""
    for base in (root / "share", root / "stage"):
        for container in _listdir(base):
            for entry in _listdir(container):
                _rmdir(entry)
            _rmdir(container)
        _rmdir(base)
    for name in ("virtiofsd.sock", "virtiofsd.log"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(root / name)
    _rmdir(root)


def _listdir(path: Path) -> list[Path]:
    try:
        with os.scandir(path) as entries:
            return [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _rmdir(path: Path) -> None:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        raise OSError(err.errno, f"remove {path}: {err.strerror}") from err


def bind_volume(layout: Layout, share: DirShare) -> None:
    """Bind the share's host directory at fs/share/<rel>, with its propagation."""
    stage, target = layout.stage / share.rel, layout.share / share.rel
    stage.mkdir(mode=0o700, parents=True, exist_ok=True)
    target.mkdir(mode=0o755, parents=True, exist_ok=True)
    rec = MS_REC if share.recursive else 0
    hostmount.mount(share.source, stage, "", MS_BIND | rec, "")
    try:
        if share.read_only:
            hostmount.mount("", stage, "", MS_REMOUNT | MS_BIND | hostmount.MS_RDONLY, "")
        kind = MS_SLAVE if share.propagation == "slave" else MS_PRIVATE
        hostmount.mount("", stage, "", kind | MS_REC, "")
        hostmount.mount(str(stage), target, "", MS_MOVE, "")
    except BaseException:
        hostmount.unmount(stage, detach=True)
        raise
    with contextlib.suppress(OSError):
        os.rmdir(stage)


def unbind_volume(root: Path, rel: str) -> list[str]:
    """Undo bind_volume from the root and the share's relative path. Idempotent."""
    done: list[str] = []
    for base in (root / "share", root / "stage"):
        path = base / rel
        done += [f"unmounted {point}" for point in hostmount.unmount_under([path])]
        _rmdir(path)
        try:
            os.rmdir(path.parent)
        except OSError as err:  # ENOTEMPTY: the container's other volumes are still there
            if err.errno not in (errno.ENOENT, errno.ENOTEMPTY):
                raise
    return done


def check_binary(binary: Path) -> None:
    """FailedPrecondition, naming the config field, unless `binary` can be run."""
    try:
        info = os.stat(binary)
    except OSError as err:
        why = err.strerror or str(err)
    else:
        if stat.S_ISREG(info.st_mode) and os.access(binary, os.X_OK):
            return
        why = "not an executable file"
    raise FailedPrecondition(
        f"config virtiofs.binary: {binary}: {why} (install Debian's qemu-system-common, "
        "point virtiofs.binary at a virtiofsd, or set virtiofs.enabled to false)"
    )


def daemon_argv(config: VirtiofsConfig, layout: Layout, fd: int) -> list[str]:
    """The C virtiofsd's command line (QEMU 7.2's; pure)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    nofile = hard if hard != resource.RLIM_INFINITY else 1 << 20
    return [
        str(config.binary),
        f"--fd={fd}",
        "-o", f"source={layout.share}",
        "-o", f"cache={config.cache}",
        # Its own mount, pid and net namespaces, pivoted into the share root: the
        # guest reaches nothing else of the host.
        "-o", "sandbox=namespace",
        # A host mount below a volume gets its own st_dev in the guest, so inode
        # numbers of two filesystems never collide there.
        "-o", "announce_submounts",
        # The default raises the limit past what a root without CAP_SYS_RESOURCE may;
        # the hard limit is the most it can have (each inode the guest holds is an fd).
        f"--rlimit-nofile={nofile}",
    ]


# -- The daemon ------------------------------------------------------------------------------


Spawned = Callable[[int, int], Awaitable[None]]  # (pid, start time), persisted at once


class Daemon:
    """A running virtiofsd: the shim's child, reaped by `stop`."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @property
    def pid(self) -> int:
        return self.process.pid

    async def stop(self, grace_s: float = 1.0) -> None:
        proc = self.process
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                async with asyncio.timeout(grace_s):
                    await proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


class FsHost:
    """The host side of shared directories: mounts and virtiofsd. Unit tests replace it."""

    def __init__(self, config: VirtiofsConfig) -> None:
        self.config = config

    def check(self) -> None:
        check_binary(self.config.binary)

    async def make_root(self, layout: Layout) -> None:
        await asyncio.to_thread(make_root, layout)

    async def remove_root(self, layout: Layout) -> None:
        await asyncio.to_thread(remove_root, layout.root)

    async def start_daemon(self, layout: Layout, spawned: Spawned) -> Daemon:
        """Listen on the socket, then start virtiofsd on it: the VMM may connect at once."""
        listener = await asyncio.to_thread(_listen, layout.socket)
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
            log_fd = os.open(layout.log, flags, 0o600)
            try:
                process = await asyncio.create_subprocess_exec(
                    *daemon_argv(self.config, layout, listener.fileno()),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=log_fd,
                    pass_fds=(listener.fileno(),),
                    start_new_session=True,  # a signal to the shim's group must not reach it
                )
            finally:
                os.close(log_fd)
        finally:
            listener.close()
        daemon = Daemon(process)
        start_time = process_start_time(process.pid)
        if start_time is not None:
            try:
                await spawned(process.pid, start_time)
            except BaseException:
                await daemon.stop()
                raise
        return daemon

    async def bind(self, layout: Layout, share: DirShare) -> None:
        await asyncio.to_thread(bind_volume, layout, share)

    async def unbind(self, layout: Layout, share: DirShare) -> None:
        await asyncio.to_thread(unbind_volume, layout.root, share.rel)


def _listen(path: Path) -> socket.socket:
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind(str(path))
        os.chmod(path, 0o600)
        listener.listen(1)
    except BaseException:
        listener.close()
        raise
    return listener


# -- The pod's shared filesystem --------------------------------------------------------------


class SharedFs:
    """The pod's virtio-fs: share root, virtiofsd, the guest's mount of the tag."""

    def __init__(self, layout: Layout, host: FsHost) -> None:
        self.layout = layout
        self._host = host
        self._daemon: Daemon | None = None
        self._proc: tuple[int, int] | None = None
        self._undo = Undo("shared fs")

    @property
    def record(self) -> ResourceRecord:
        pid, start = self._proc or (0, 0)
        host = {"root": str(self.layout.root)}
        if pid:
            host |= {"pid": str(pid), "start_time": str(start)}
        return ResourceRecord(KIND, RECORD_ID, "", host)

    @property
    def spec(self) -> SharedFsSpec:
        """The device the VM boots with."""
        return SharedFsSpec(socket=self.layout.socket, tag=TAG)

    @property
    def guest_root(self) -> str:
        return SHARED_ROOT

    async def attach_host(self, pod: PodServices) -> None:
        """Before the VM boots: record, share root, virtiofsd listening. On failure
        everything done is undone, and the error names the step."""
        undo = self._undo
        try:
            self._host.check()
            await step("shared fs record", pod.record(self.record))
            undo.push("forget shared fs", lambda: self._forget(pod), host=True)
            undo.push("remove shared root", lambda: self._host.remove_root(self.layout), host=True)
            await step("shared root", self._host.make_root(self.layout))

            async def spawned(pid: int, start_time: int) -> None:
                self._proc = (pid, start_time)
                await pod.record(self.record)
                await pod.adopt(pid)

            undo.push("stop virtiofsd", self._stop_daemon, host=True)
            self._daemon = await step(
                "virtiofsd start", self._host.start_daemon(self.layout, spawned)
            )
            log.info("event=virtiofsd_started pid=%d root=%s", self._daemon.pid, self.layout.root)
        except BaseException:
            await undo.unwind()
            raise

    async def attach_guest(self, pod: PodServices) -> None:
        """Once the agent is up: mount the tag where the containers' sources point."""
        agent = pod.live_agent()
        if agent is None:
            raise Unavailable("shared fs mount: the VM is not running")
        # A failure is undone by the caller stopping the VM, then detach().
        await step("shared fs mount", agent.mount_shared_fs(TAG, SHARED_ROOT))
        self._undo.push("guest unmount", lambda: self._guest_unmount(pod))

    async def detach(self, pod: PodServices) -> None:
        """Undo everything, in reverse. The VMM must be gone first (virtiofsd serves it)."""
        await self._undo.unwind()

    async def _stop_daemon(self) -> None:
        daemon, self._daemon = self._daemon, None
        if daemon is not None:
            await daemon.stop()
            log.info("event=virtiofsd_stopped pid=%d status=%s", daemon.pid,
                     daemon.process.returncode)

    async def _guest_unmount(self, pod: PodServices) -> None:
        agent = pod.live_agent()
        if agent is not None:
            await agent.unmount_disk(SHARED_ROOT)

    async def _forget(self, pod: PodServices) -> None:
        if self._undo.clean:
            await pod.forget(RECORD_ID)

    async def bind(self, share: DirShare) -> None:
        await self._host.bind(self.layout, share)

    async def unbind(self, share: DirShare) -> None:
        await self._host.unbind(self.layout, share)


def undo_host(record: ResourceRecord) -> list[str]:
    """Crash cleanup of the pod's shared fs: kill virtiofsd (if it is still the process
    recorded), then unmount and remove the share root."""
    done: list[str] = []
    pid, start = record.host.get("pid", ""), record.host.get("start_time", "")
    if pid and start and kill_recorded(int(pid), int(start)):
        done.append(f"killed virtiofsd {pid}")
    root = record.host.get("root", "")
    if root:
        done += remove_root(Path(root))
    return done


# -- One container's shared volumes ---------------------------------------------------------


class SharedVolumes:
    """The directory volumes of one container, bound under the pod's share root."""

    def __init__(self, container_id: str, shares: Sequence[DirShare]) -> None:
        self.container_id = container_id
        self.shares = tuple(shares)
        self._undo = Undo(f"shared volumes of container {container_id}")

    def record(self, fs: SharedFs, share: DirShare) -> ResourceRecord:
        return ResourceRecord(
            VOLUME_KIND,
            f"{self.container_id}/volume{share.index}",
            self.container_id,
            {"root": str(fs.layout.root), "rel": share.rel, "source": share.source},
        )

    async def attach(self, pod: PodServices, fs: SharedFs | None) -> None:
        """Record and bind each share. On failure every bind made is undone."""
        if not self.shares:
            return
        if fs is None:
            raise FailedPrecondition("shared volumes: the pod has no shared fs")
        undo = self._undo
        try:
            for share in self.shares:
                record = self.record(fs, share)
                where = f"volume {share.destination} (source {share.source})"
                await step(f"{where} record", pod.record(record))
                undo.push(f"forget {record.id}", self._forgetter(pod, record), host=True)
                undo.push(f"unbind {share.rel}", _unbinder(fs, share), host=True)
                await step(f"{where} bind", fs.bind(share))
        except BaseException:
            await undo.unwind()
            raise

    async def detach(self, pod: PodServices) -> None:
        await self._undo.unwind()

    def _forgetter(self, pod: PodServices, record: ResourceRecord) -> UndoStep:
        async def forget() -> None:
            if self._undo.clean:
                await pod.forget(record.id)

        return forget


def _unbinder(fs: SharedFs, share: DirShare) -> UndoStep:
    async def unbind() -> None:
        await fs.unbind(share)

    return unbind


def undo_volume_host(record: ResourceRecord) -> list[str]:
    """Crash cleanup of one container volume's bind (the share root goes with the pod)."""
    root, rel = record.host.get("root", ""), record.host.get("rel", "")
    if not root or not rel or ".." in rel.split("/"):
        return []
    return unbind_volume(Path(root), rel)

"""In-process stand-ins for the VMM and the guest agent, for orchestration unit tests.

They keep just enough state to check what the sandbox and containers leave
behind (plugged devices, guest mounts, copied files, containers), and fail on
request at any method, so every step of a create or a boot can be broken once.
The real things are exercised by tests/integration on real QEMU VMs.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shim.agent import ExitStatus, GuestInfo, Output
from shim.config import VirtiofsConfig
from shim.cri_mounts import DirShare
from shim.errors import DeadlineExceeded, Internal, NotFound, ShimError, Unavailable
from shim.sharedfs import Daemon, FsHost, Layout, Spawned
from shim.state import PodState, StateStore
from shim.vmm.base import (
    DiskSpec,
    NetSpec,
    ProcessSpawned,
    Vmm,
    VmmError,
    VmProcesses,
    VmSpec,
    ignore_process,
)


@dataclass
class Failures:
    """Method name -> the error it raises the next time it is called. A key
    `method:prefix` fails only a call about a subject (a device id, a mount
    target) starting with `prefix`."""

    pending: dict[str, BaseException] = field(default_factory=dict)

    def check(self, method: str, subject: str = "") -> None:
        for key in list(self.pending):
            name, _, prefix = key.partition(":")
            if name == method and (not prefix or subject.startswith(prefix)):
                raise self.pending.pop(key)


class FakeVmm(Vmm):
    def __init__(self, spec: VmSpec, failures: Failures) -> None:
        self.spec = spec
        self._failures = failures
        self.started = False
        self.stopped = False
        self.disks: dict[str, DiskSpec] = {}
        self.slots: dict[str, int] = {}
        self._exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.spawned = asyncio.Event()
        self.spawned.set()
        self.shutdown_delay = 0.0

    @property
    def agent_socket(self) -> Path:
        return self.spec.state_dir / "vsock.sock"

    @property
    def pid(self) -> int:
        return 4242

    @property
    def hotplug_slots(self) -> int:
        return 8

    async def start(self, on_process: ProcessSpawned = ignore_process) -> VmProcesses:
        await on_process("vhost-device-vsock", 4241, 1)
        await self.spawned.wait()  # a test may hold the start here
        await on_process("vmm", self.pid, 1)
        self._failures.check("start")
        self.started = True
        return VmProcesses(vmm_pid=self.pid, vmm_start_time=1)

    async def wait_vsock_ready(self, deadline: float) -> None:
        self._failures.check("wait_vsock_ready")

    async def add_disk(self, disk: DiskSpec, slot: int) -> None:
        self._failures.check("add_disk", disk.id)
        assert disk.id not in self.disks
        self.disks[disk.id] = disk
        self.slots[disk.id] = slot

    async def remove_disk(self, disk_id: str) -> None:
        self._failures.check("remove_disk")
        if disk_id not in self.disks:
            raise VmmError(f"device {disk_id} is not attached")
        del self.disks[disk_id]
        del self.slots[disk_id]

    async def add_net(self, net: NetSpec, slot: int) -> None:
        raise VmmError("no NICs in the fake")

    async def remove_net(self, net_id: str) -> None:
        raise VmmError("no NICs in the fake")

    async def shutdown(self, timeout: float = 5.0) -> None:
        await asyncio.sleep(self.shutdown_delay)
        self.stopped = True
        if not self._exit.done():
            self._exit.set_result(0)

    async def wait(self) -> int:
        return await asyncio.shield(self._exit)

    def crash(self, status: int = 137) -> None:
        if not self._exit.done():
            self._exit.set_result(status)


class FakeAgent:
    """The agent calls the shim makes, against an in-memory guest."""

    def __init__(self, failures: Failures) -> None:
        self._failures = failures
        self._closed = asyncio.Event()
        self.hung = False
        self.mounts: dict[str, str] = {}  # target -> serial
        self.files: dict[str, bytes] = {}  # guest path -> data
        self.containers: set[str] = set()
        self.roots: dict[str, tuple[str, str, str, int]] = {}  # what create_container got
        self.started: set[str] = set()
        self.exits: dict[tuple[str, str], asyncio.Future[ExitStatus]] = {}
        self.stdout: dict[tuple[str, str], list[bytes]] = {}  # what the process printed
        # How many reads of a stream go unanswered (a stalled guest) before the rest.
        self.stalls: dict[tuple[str, str], int] = {}
        # Streams a surviving child still holds open: no EOF after the exit.
        self.held_open: set[tuple[str, str]] = set()
        self.hostname = ""

    def reconnect(self) -> FakeAgent:
        """A new connection to the same guest (its containers, files and exits)."""
        other = FakeAgent(self._failures)
        other.mounts, other.files, other.containers = self.mounts, self.files, self.containers
        other.roots = self.roots
        other.started, other.exits, other.stdout = self.started, self.exits, self.stdout
        other.held_open = self.held_open
        return other

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def _call(self, method: str, subject: str = "") -> None:
        if self.closed:
            raise Unavailable("agent connection closed")
        self._failures.check(method, subject)

    async def close(self) -> None:
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def health(self, *, timeout: float | None = None) -> bool:
        self._call("health")
        if self.hung:
            await asyncio.sleep(timeout or 0)
            raise DeadlineExceeded("Health: deadline exceeded")
        return True

    async def guest_info(self, *, timeout: float | None = None) -> GuestInfo:
        self._call("guest_info")
        return GuestInfo("fake", "6.1.0-fake", "boot-id", 1, 262144, 10)

    async def set_time(self, unix_ns: int | None = None, *, timeout: float | None = None) -> None:
        self._call("set_time")

    async def setup_pod(self, hostname: str, **_: Any) -> None:
        self._call("setup_pod")
        self.hostname = hostname

    async def mount_disk(self, serial: str, target: str, **_: Any) -> str:
        self._call("mount_disk", serial)
        self.mounts[target] = serial
        return "/dev/vdb"

    async def unmount_disk(self, target: str, **_: Any) -> None:
        self._call("unmount_disk")
        self.mounts.pop(target, None)

    async def mount_shared_fs(self, tag: str, target: str, **_: Any) -> None:
        self._call("mount_shared_fs")
        self.mounts[target] = f"virtiofs:{tag}"

    async def copy_file(self, path: str, data: bytes = b"", **_: Any) -> None:
        self._call("copy_file")
        self.files[path] = data

    def _drop_copies(self, container_id: str) -> None:
        prefix = f"/run/cloudhv/mounts/{container_id}/"
        for path in [p for p in self.files if p.startswith(prefix)]:
            del self.files[path]

    async def create_container(
        self, container_id: str, spec: bytes, rootfs: str, *, upper_dir: str = "",
        work_dir: str = "", upper_tmpfs_mib: int = 0, **_: Any,
    ) -> int:
        try:
            self._call("create_container")
        except ShimError:
            self._drop_copies(container_id)  # as the agent does when crun create fails
            raise
        if rootfs not in self.mounts:
            raise Internal(f"rootfs {rootfs} is not mounted")
        if upper_dir and upper_dir.rsplit("/", 1)[0] not in self.mounts:
            raise Internal(f"upper {upper_dir} is not on a mounted disk")
        self.containers.add(container_id)
        self.roots[container_id] = (rootfs, upper_dir, work_dir, upper_tmpfs_mib)
        return 7

    async def remove_container(self, container_id: str, **_: Any) -> None:
        self._call("remove_container")
        self._drop_copies(container_id)
        if container_id not in self.containers:
            raise NotFound(f"container {container_id} not found")
        self.containers.discard(container_id)

    async def start_container(self, container_id: str, **_: Any) -> int:
        self._call("start_container")
        self.started.add(container_id)
        return 7

    def _exit(self, container_id: str, exec_id: str) -> asyncio.Future[ExitStatus]:
        key = (container_id, exec_id)
        if key not in self.exits:
            self.exits[key] = asyncio.get_running_loop().create_future()
        return self.exits[key]

    async def wait_process(
        self, container_id: str, exec_id: str, *, timeout: float
    ) -> ExitStatus | None:
        self._call("wait_process")
        closed = asyncio.ensure_future(self._closed.wait())
        exited = asyncio.ensure_future(asyncio.shield(self._exit(container_id, exec_id)))
        done, _ = await asyncio.wait(
            {closed, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        closed.cancel()
        exited.cancel()
        if exited in done:
            return exited.result()
        if closed in done:
            raise Unavailable("agent connection closed")
        return None

    def finish(self, container_id: str, status: int, exec_id: str = "") -> None:
        self._exit(container_id, exec_id).set_result(ExitStatus(status, 1))

    async def signal_process(self, container_id: str, exec_id: str, signal: int, **_: Any) -> None:
        self._call("signal_process")
        future = self._exit(container_id, exec_id)
        if not future.done():
            future.set_result(ExitStatus(128 + signal, 1))

    async def read_stdout(
        self, container_id: str, exec_id: str, *, timeout: float = 30, **_: Any
    ) -> Output:
        if self.stalls.get((container_id, exec_id), 0) > 0:
            self.stalls[(container_id, exec_id)] -= 1
            await asyncio.sleep(0.05)  # the local deadline passes: no answer came
            return Output(b"", eof=False, answered=False)
        chunks = self.stdout.get((container_id, exec_id))
        if chunks:
            return Output(chunks.pop(0), eof=False)
        if (container_id, exec_id) in self.held_open:
            await asyncio.sleep(timeout)  # a long poll with nothing to say
            return Output(b"", eof=False)
        return Output(b"", eof=True)

    async def read_stderr(self, container_id: str, exec_id: str, **_: Any) -> Output:
        return Output(b"", eof=True)

    async def get_oom_event(self, *, timeout: float) -> str | None:
        await asyncio.sleep(timeout)
        return None


class _FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None


class FakeDaemon(Daemon):
    def __init__(self, pid: int) -> None:
        super().__init__(_FakeProcess(pid))  # type: ignore[arg-type]

    async def stop(self, grace_s: float = 1.0) -> None:
        self.process.returncode = 0


class FakeFsHost(FsHost):
    """The host side of shared directories, in memory: the share root, virtiofsd, binds."""

    def __init__(self, failures: Failures) -> None:
        super().__init__(VirtiofsConfig())
        self._failures = failures
        self.roots: set[Path] = set()
        self.daemons: dict[int, FakeDaemon] = {}
        self.binds: dict[str, DirShare] = {}  # rel -> share
        self._next_pid = 5000

    def check(self) -> None:
        self._failures.check("virtiofs_check")

    async def make_root(self, layout: Layout) -> None:
        self._failures.check("make_root")
        self.roots.add(layout.root)

    async def remove_root(self, layout: Layout) -> None:
        self.roots.discard(layout.root)
        self.binds.clear()

    async def start_daemon(self, layout: Layout, spawned: Spawned) -> Daemon:
        self._failures.check("start_daemon")
        self._next_pid += 1
        daemon = FakeDaemon(self._next_pid)
        self.daemons[daemon.pid] = daemon
        try:
            await spawned(daemon.pid, 1)
        except BaseException:
            await daemon.stop()  # as FsHost does when the pid cannot be persisted
            raise
        return daemon

    def running(self) -> list[int]:
        return [pid for pid, d in self.daemons.items() if d.process.returncode is None]

    async def bind(self, layout: Layout, share: DirShare) -> None:
        self._failures.check("bind")
        assert layout.root in self.roots
        self.binds[share.rel] = share

    async def unbind(self, layout: Layout, share: DirShare) -> None:
        self.binds.pop(share.rel, None)


class FlakyStore(StateStore):
    """A state store whose save fails once, when the state first matches `when`."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.fail_when: Any = None

    def save(self, state: PodState) -> None:
        if self.fail_when is not None and self.fail_when(state):
            self.fail_when = None
            raise OSError(28, "No space left on device")
        super().save(state)

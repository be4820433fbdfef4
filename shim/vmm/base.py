"""The interface every VMM backend implements, and the values it exchanges.

The sandbox owns one `Vmm`. Calls are made in this order: `start` (process up, VM
booted, agent socket path known), any number of `add_disk`/`remove_disk` and
`add_net`/`remove_net` (always through shim/devices.py, which picks the slot),
then `shutdown`. `wait` returns when the VMM process has exited for any reason.
Everything a backend creates on the host lives under `VmSpec.state_dir` or is a
child process, so cleanup from persisted state is "kill the recorded pids,
remove the directory".
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from shim.errors import Unavailable


class VmmError(Unavailable):
    """The VMM refused or failed an operation; the message names both."""


@dataclass(frozen=True)
class DiskSpec:
    """A disk to attach. `id` is unique per VM; `serial` is what the guest sees."""

    id: str
    path: Path
    serial: str
    read_only: bool = False


@dataclass(frozen=True)
class NetSpec:
    """A NIC backed by a TAP the caller opened (in the pod's netns) and passes as a file
    descriptor: the VMM need not live in that netns, nor know the TAP's name. The
    caller keeps its fd and closes it; the backend hands the VMM its own copy."""

    id: str
    tap_fd: int
    mac: str  # the guest NIC's MAC: the CNI veth's, so the pod network knows it
    mtu: int = 1500


@dataclass(frozen=True)
class HostDir:
    """A directory whose files may be plugged into the VM later (container disks, cached
    images): a VMM confined to the pod's own paths must be allowed into it from boot."""

    path: Path
    writable: bool


@dataclass(frozen=True)
class VmSpec:
    """Everything needed to boot one pod VM."""

    state_dir: Path  # owned by the VM: sockets, logs, shared memory files
    kernel: Path
    rootfs: Path  # the guest's read-only root disk, attached at boot
    kernel_args: str
    vcpus: int
    max_vcpus: int
    memory_mib: int
    host_dirs: tuple[HostDir, ...] = ()


@dataclass(frozen=True)
class VmProcesses:
    """Host processes a VM consists of, persisted for crash cleanup."""

    vmm_pid: int
    vmm_start_time: int  # /proc/<pid>/stat field 22: guards against pid reuse
    helper_pids: tuple[tuple[int, int], ...] = ()  # (pid, start_time), e.g. vhost-device-vsock


# (role: "vmm" or a helper's name, pid, start time): called as each process is spawned,
# so the caller can persist it before anything else can go wrong.
ProcessSpawned = Callable[[str, int, int], Awaitable[None]]


async def ignore_process(role: str, pid: int, start_time: int) -> None:
    del role, pid, start_time


class Vmm(abc.ABC):
    """One VM and the host processes behind it."""

    @abc.abstractmethod
    async def start(self, on_process: ProcessSpawned = ignore_process) -> VmProcesses:
        """Launch the VMM and boot the guest. Raises VmmError; leaves nothing behind on
        failure. `on_process` hears of every host process the moment it exists."""

    @property
    @abc.abstractmethod
    def agent_socket(self) -> Path:
        """The hybrid-vsock Unix socket (`CONNECT <port>\\n` → `OK <n>\\n`)."""

    @property
    @abc.abstractmethod
    def pid(self) -> int:
        """The VMM process id (the sandbox task's pid)."""

    async def wait_vsock_ready(self, deadline: float) -> None:
        """Return once `agent_socket` may be dialled (`deadline` in loop time).

        Backends whose socket is safe to dial while the guest boots return at once.
        """
        del deadline

    @property
    @abc.abstractmethod
    def hotplug_slots(self) -> int:
        """How many devices can be hot-plugged at once (slot numbers are 0..n-1)."""

    @abc.abstractmethod
    async def add_disk(self, disk: DiskSpec, slot: int) -> None:
        """Hot-plug a virtio-blk disk into `slot`; returns once the VMM has accepted it."""

    @abc.abstractmethod
    async def remove_disk(self, disk_id: str) -> None:
        """Hot-unplug a disk added with `add_disk`; returns once the guest let go of it."""

    @abc.abstractmethod
    async def add_net(self, net: NetSpec, slot: int) -> None:
        """Hot-plug a virtio-net device backed by a TAP into `slot`."""

    @abc.abstractmethod
    async def remove_net(self, net_id: str) -> None:
        """Hot-unplug a NIC added with `add_net`."""

    @abc.abstractmethod
    async def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the VM and every helper process; kill after `timeout` seconds."""

    @abc.abstractmethod
    async def wait(self) -> int:
        """Wait for the VM to be gone; returns the VMM's exit status. A helper the VM
        cannot run without (its vsock backend) dying counts: the backend then stops the
        VMM itself."""

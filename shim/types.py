"""Plain values that cross module boundaries: what the task service hands the pod, and
what comes back. Frozen dataclasses and enums only; no protocol types, no I/O.

This module sits at the bottom of the import graph: everything may import it, it
imports nothing of the shim.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass


class State(enum.Enum):
    """A process' lifecycle state (the transitions are checked in shim/process.py)."""

    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    DELETED = "deleted"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Exit:
    status: int  # runc's convention: the exit code, or 128+signal when killed
    at_ns: int  # unix time in nanoseconds


def signal_status(signal: int) -> int:
    return 128 + signal


@dataclass(frozen=True)
class Mount:
    """containerd.types.Mount as plain data."""

    type: str
    source: str
    target: str = ""
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class StdioSpec:
    """A task's stdio as containerd names it: FIFO paths or file:// / binary:// URIs."""

    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False

    @property
    def null(self) -> bool:
        return not (self.stdin or self.stdout or self.stderr or self.terminal)


@dataclass(frozen=True)
class CreateTask:
    id: str
    bundle: str
    rootfs: tuple[Mount, ...]
    stdio: StdioSpec


@dataclass(frozen=True)
class ExecTask:
    container_id: str
    exec_id: str
    stdio: StdioSpec
    process_json: bytes


@dataclass(frozen=True)
class ProcessStatus:
    id: str
    exec_id: str
    bundle: str
    pid: int
    state: State
    stdio: StdioSpec
    exit: Exit | None


@dataclass(frozen=True)
class ContainerStats:
    """cgroup v2 figures from the guest, in the units of the cgroup files (0 = max)."""

    cpu_usage_usec: int
    cpu_user_usec: int
    cpu_system_usec: int
    cpu_nr_periods: int
    cpu_nr_throttled: int
    cpu_throttled_usec: int
    memory_usage: int
    memory_limit: int
    memory_anon: int
    memory_file: int
    memory_kernel_stack: int
    memory_slab: int
    memory_inactive_file: int
    memory_active_file: int
    memory_pgfault: int
    memory_pgmajfault: int
    memory_oom_events: int
    memory_oom_kill: int
    pids_current: int
    pids_limit: int
    memory_swap_usage: int


IpInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface  # an address with its prefix


@dataclass(frozen=True)
class Route:
    """A route for the guest (the agent's UpdateRoutes)."""

    destination: str  # CIDR; "" or "default" for the default route
    gateway: str = ""
    device: str = ""
    metric: int = 0
    scope: int = 0  # rtnetlink scope: 0 universe, 253 link, 254 host
    source: str = ""  # preferred source address

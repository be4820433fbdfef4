"""Typed client for the in-guest agent (`cloudhv.agent.v1.Agent`, proto/agent.proto).

Plain Python values in, frozen dataclasses out; protobuf stays in this module.
Errors are the shim's typed errors (NotFound, FailedPrecondition, ...) as the
agent's status codes map them; Unavailable means the connection is gone.

Long polls (`wait_process`, `read_stdout`/`read_stderr`, `get_oom_event`) take a
timeout; when it passes with nothing to report they return an empty value
(None, or Output(b"", eof=False)) and the caller asks again.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from shim._pb import agent_pb2 as _agent_pb2
from shim.errors import DeadlineExceeded, Internal, Unavailable
from shim.ttrpc.client import Client
from shim.ttrpc.status import TtrpcError
from shim.types import ContainerStats, IpInterface, Route
from shim.vsock import connect_hybrid_vsock

# Generated modules have no type stubs; every value read from them is converted.
_pb: Any = _agent_pb2

SERVICE = "cloudhv.agent.v1.Agent"
AGENT_PORT = 1024
DEFAULT_TIMEOUT = 30.0  # seconds, for calls that do not park in the agent
MAX_CHUNK = 65536  # agent.options: a WriteStdin carries at most 64 KiB
# agent.options: a ReadStdout/ReadStderr reply carries at most 1 MiB (an older
# agent caps it at 64 KiB itself). Fewer, bigger replies: each costs a round trip.
MAX_READ = 1 << 20
# Extra local wait on long polls, so a reply sent at the agent's deadline is
# still received instead of being dropped (it may carry output bytes).
_LONG_POLL_GRACE = 1.0


@dataclass(frozen=True)
class GuestInfo:
    agent_version: str
    kernel_release: str
    boot_id: str
    online_cpus: int
    memory_total_kib: int
    uptime_ms: int


@dataclass(frozen=True)
class ExitStatus:
    exit_status: int  # 128+signal when killed by a signal
    exited_at: int  # unix time in nanoseconds


@dataclass(frozen=True)
class Output:
    data: bytes
    eof: bool  # no more data will ever come from this stream
    # False: no answer came at all (not even the agent's "nothing before the
    # deadline"): a stalled guest or transport, so output may still be on its way.
    answered: bool = True


_STATS_FIELDS = tuple(ContainerStats.__dataclass_fields__)


class _Connection:
    """One ttrpc connection to the agent and the call plumbing every RPC group uses."""

    def __init__(self, client: Client) -> None:
        self._client = client

    @property
    def closed(self) -> bool:
        return self._client.closed

    async def wait_closed(self) -> None:
        """Return when the connection to the agent is gone (e.g. the VM stopped)."""
        await self._client.wait_closed()

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # Plumbing.

    async def _read(
        self, method: str, container_id: str, exec_id: str, timeout: float, max_bytes: int
    ) -> Output:
        req = _pb.ReadOutputRequest(
            container_id=container_id, exec_id=exec_id, max_bytes=min(max_bytes, MAX_READ)
        )
        try:
            resp = await self._call(method, req, _pb.ReadOutputResponse, timeout,
                                    grace=_LONG_POLL_GRACE)
        except DeadlineExceeded as err:
            return Output(b"", eof=False, answered=isinstance(err.__cause__, TtrpcError))
        return Output(bytes(resp.data), bool(resp.eof))

    async def _poll(self, method: str, req: Any, resp_type: Any, timeout: float) -> Any:
        """A long poll: the reply, or None if the agent had nothing before `timeout`."""
        try:
            return await self._call(method, req, resp_type, timeout, grace=_LONG_POLL_GRACE)
        except DeadlineExceeded:
            return None

    async def _call(
        self,
        method: str,
        req: Any,
        resp_type: Any,
        timeout: float | None,
        *,
        grace: float = 0.0,
    ) -> Any:
        payload = await self._client.call(
            SERVICE, method, req.SerializeToString(), timeout=timeout, grace=grace
        )
        if resp_type is None:
            return None
        resp = resp_type()
        try:
            resp.ParseFromString(payload)
        except Exception as err:  # DecodeError, or ValueError on bad UTF-8
            raise Internal(f"agent {method}: undecodable reply: {err}") from err
        return resp


class _GuestCalls(_Connection):
    """Liveness, identity and pod-wide guest setup."""

    # Liveness and identity.

    async def health(self, *, timeout: float | None = DEFAULT_TIMEOUT) -> bool:
        """True when the agent reports SERVING."""
        resp = await self._call("Health", _pb.HealthRequest(), _pb.HealthResponse, timeout)
        return bool(resp.status == _pb.HealthResponse.SERVING)

    async def guest_info(self, *, timeout: float | None = DEFAULT_TIMEOUT) -> GuestInfo:
        r = await self._call("GuestInfo", _pb.GuestInfoRequest(), _pb.GuestInfoResponse, timeout)
        return GuestInfo(
            agent_version=str(r.agent_version),
            kernel_release=str(r.kernel_release),
            boot_id=str(r.boot_id),
            online_cpus=int(r.online_cpus),
            memory_total_kib=int(r.memory_total_kib),
            uptime_ms=int(r.uptime_ms),
        )

    # Pod-wide guest setup.

    async def update_interface(
        self,
        mac: str,
        *,
        name: str = "",
        mtu: int = 0,
        addresses: Sequence[IpInterface] = (),
        wait: float = 0.0,
        timeout: float | None = None,
    ) -> None:
        """Configure the guest NIC with `mac`: rename, MTU, exactly these addresses
        (e.g. 10.88.0.5/16), link up. `wait` is how long the agent waits for a
        hot-plugged NIC to show up; the call's timeout defaults to that plus
        DEFAULT_TIMEOUT."""
        req = _pb.UpdateInterfaceRequest(
            mac=mac,
            name=name,
            mtu=mtu,
            addresses=[
                _pb.IPAddress(address=str(a.ip), prefix_len=a.network.prefixlen) for a in addresses
            ],
            timeout_ms=int(wait * 1000),
        )
        if timeout is None:
            timeout = wait + DEFAULT_TIMEOUT
        await self._call("UpdateInterface", req, None, timeout)

    async def update_routes(
        self, routes: Sequence[Route], *, timeout: float | None = DEFAULT_TIMEOUT
    ) -> None:
        req = _pb.UpdateRoutesRequest(
            routes=[
                _pb.Route(
                    destination=r.destination,
                    gateway=r.gateway,
                    device=r.device,
                    metric=r.metric,
                    scope=r.scope,
                    source=r.source,
                )
                for r in routes
            ]
        )
        await self._call("UpdateRoutes", req, None, timeout)

    async def setup_pod(
        self,
        hostname: str,
        *,
        dns_servers: Sequence[str] = (),
        dns_searches: Sequence[str] = (),
        dns_options: Sequence[str] = (),
        sysctls: Mapping[str, str] | None = None,
        node_pid: bool = False,
        node_ipc: bool = False,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        """Pod-wide guest setup, before any container: the hostname, DNS, the pod's
        shared namespaces (the VM's own PID / IPC one with node_pid / node_ipc, CRI's
        NODE), and the sandbox's sysctls, set in those namespaces (a sysctl that is
        not namespaced is InvalidArgument naming it)."""
        req = _pb.SetupPodRequest(
            hostname=hostname,
            dns_servers=list(dns_servers),
            dns_searches=list(dns_searches),
            dns_options=list(dns_options),
            sysctls=[_pb.Sysctl(key=k, value=v) for k, v in (sysctls or {}).items()],
            node_pid=node_pid,
            node_ipc=node_ipc,
        )
        await self._call("SetupPod", req, None, timeout)

    async def copy_file(
        self,
        path: str,
        data: bytes = b"",
        *,
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        is_dir: bool = False,
        is_symlink: bool = False,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        """Write a small file in the guest; with is_dir make a directory, with
        is_symlink make a symlink to the target in `data`."""
        req = _pb.CopyFileRequest(
            path=path,
            data=data,
            mode=mode,
            uid=uid,
            gid=gid,
            is_dir=is_dir,
            is_symlink=is_symlink,
        )
        await self._call("CopyFile", req, None, timeout)

    async def set_time(
        self, unix_ns: int | None = None, *, timeout: float | None = DEFAULT_TIMEOUT
    ) -> None:
        """Set the guest clock to `unix_ns` (default: the host's clock now)."""
        if unix_ns is None:
            unix_ns = time.time_ns()
        sec, nsec = divmod(unix_ns, 1_000_000_000)
        await self._call("SetTime", _pb.SetTimeRequest(unix_sec=sec, nsec=nsec), None, timeout)

    async def shutdown(self, *, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """Ask the guest to power off. The connection dropping before the reply
        counts as success: the agent may power off before its answer leaves."""
        with contextlib.suppress(Unavailable):
            await self._call("Shutdown", _pb.ShutdownRequest(), None, timeout)


class _ContainerCalls(_Connection):
    """Disks, containers and their processes (crun in the guest)."""

    # Disks.

    async def mount_disk(
        self,
        serial: str,
        target: str,
        *,
        fstype: str = "ext4",
        read_only: bool = False,
        options: Sequence[str] = (),
        wait: float = 10.0,
        timeout: float | None = None,
    ) -> str:
        """Mount the disk with virtio `serial` on `target`; returns its /dev node.

        `wait` is how long the agent waits for a hot-plugged disk to appear; the
        call's timeout defaults to that plus DEFAULT_TIMEOUT.
        """
        req = _pb.MountDiskRequest(
            serial=serial,
            fstype=fstype,
            target=target,
            read_only=read_only,
            options=list(options),
            timeout_ms=int(wait * 1000),
        )
        if timeout is None:
            timeout = wait + DEFAULT_TIMEOUT
        resp = await self._call("MountDisk", req, _pb.MountDiskResponse, timeout)
        return str(resp.device)

    async def unmount_disk(self, target: str, *, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """Unmount `target` (a disk, or the shared fs)."""
        await self._call("UnmountDisk", _pb.UnmountDiskRequest(target=target), None, timeout)

    async def mount_shared_fs(
        self, tag: str, target: str, *, timeout: float | None = DEFAULT_TIMEOUT
    ) -> None:
        """Mount the VM's virtio-fs device `tag` on `target` (made if missing)."""
        req = _pb.MountSharedFsRequest(tag=tag, target=target)
        await self._call("MountSharedFs", req, None, timeout)

    # Containers and processes.

    async def create_container(
        self,
        container_id: str,
        oci_spec_json: bytes,
        rootfs_path: str,
        *,
        upper_dir: str = "",
        work_dir: str = "",
        upper_tmpfs_mib: int = 0,
        terminal: bool = False,
        stdin: bool = False,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> int:
        """Create the container (not started); returns its init process's guest pid."""
        req = _pb.CreateContainerRequest(
            container_id=container_id,
            oci_spec_json=oci_spec_json,
            rootfs=_pb.Rootfs(
                path=rootfs_path,
                upper_dir=upper_dir,
                work_dir=work_dir,
                upper_tmpfs_mib=upper_tmpfs_mib,
            ),
            terminal=terminal,
            stdin=stdin,
        )
        resp = await self._call("CreateContainer", req, _pb.ProcessResponse, timeout)
        return int(resp.pid)

    async def start_container(
        self, container_id: str, *, timeout: float | None = DEFAULT_TIMEOUT
    ) -> int:
        req = _pb.ContainerRequest(container_id=container_id)
        resp = await self._call("StartContainer", req, _pb.ProcessResponse, timeout)
        return int(resp.pid)

    async def exec_process(
        self,
        container_id: str,
        exec_id: str,
        process_json: bytes,
        *,
        terminal: bool = False,
        stdin: bool = False,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> int:
        """Start an extra process in the container; returns its guest pid."""
        req = _pb.ExecProcessRequest(
            container_id=container_id,
            exec_id=exec_id,
            process_json=process_json,
            terminal=terminal,
            stdin=stdin,
        )
        resp = await self._call("ExecProcess", req, _pb.ProcessResponse, timeout)
        return int(resp.pid)

    async def signal_process(
        self,
        container_id: str,
        exec_id: str,
        signal: int,
        *,
        all_processes: bool = False,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        req = _pb.SignalProcessRequest(
            container_id=container_id, exec_id=exec_id, signal=signal, all=all_processes
        )
        await self._call("SignalProcess", req, None, timeout)

    async def wait_process(
        self, container_id: str, exec_id: str, *, timeout: float
    ) -> ExitStatus | None:
        """Long poll: the exit status, or None if the process is still running at `timeout`."""
        req = _pb.ProcessRequest(container_id=container_id, exec_id=exec_id)
        resp = await self._poll("WaitProcess", req, _pb.WaitProcessResponse, timeout)
        if resp is None:
            return None
        return ExitStatus(int(resp.exit_status), int(resp.exited_at_unix_ns))

    async def remove_process(
        self, container_id: str, exec_id: str, *, timeout: float | None = DEFAULT_TIMEOUT
    ) -> None:
        """Forget an exited exec: its exit status and unread output go.

        FailedPrecondition while it runs; NotFound if the agent does not know it.
        """
        req = _pb.ProcessRequest(container_id=container_id, exec_id=exec_id)
        await self._call("RemoveProcess", req, None, timeout)

    async def remove_container(
        self, container_id: str, *, force: bool = False, timeout: float | None = DEFAULT_TIMEOUT
    ) -> None:
        """Delete the container (crun delete) and everything the agent keeps for it,
        including /run/cloudhv/mounts/<container_id>/ (the CopyFile'd CRI mounts)."""
        req = _pb.RemoveContainerRequest(container_id=container_id, force=force)
        await self._call("RemoveContainer", req, None, timeout)

    async def list_processes(
        self, container_id: str, *, timeout: float | None = DEFAULT_TIMEOUT
    ) -> tuple[int, ...]:
        req = _pb.ContainerRequest(container_id=container_id)
        resp = await self._call("ListProcesses", req, _pb.ListProcessesResponse, timeout)
        return tuple(int(pid) for pid in resp.pids)

    async def pause_container(
        self, container_id: str, *, timeout: float | None = DEFAULT_TIMEOUT
    ) -> None:
        await self._call(
            "PauseContainer", _pb.ContainerRequest(container_id=container_id), None, timeout
        )

    async def resume_container(
        self, container_id: str, *, timeout: float | None = DEFAULT_TIMEOUT
    ) -> None:
        await self._call(
            "ResumeContainer", _pb.ContainerRequest(container_id=container_id), None, timeout
        )

    async def update_container(
        self,
        container_id: str,
        resources_json: bytes,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        """Apply OCI LinuxResources (JSON) to the container's cgroup."""
        req = _pb.UpdateContainerRequest(container_id=container_id, resources_json=resources_json)
        await self._call("UpdateContainer", req, None, timeout)

    async def stats_container(
        self, container_id: str, *, timeout: float | None = DEFAULT_TIMEOUT
    ) -> ContainerStats:
        req = _pb.ContainerRequest(container_id=container_id)
        resp = await self._call("StatsContainer", req, _pb.StatsContainerResponse, timeout)
        return ContainerStats(**{name: int(getattr(resp, name)) for name in _STATS_FIELDS})

    async def get_oom_event(self, *, timeout: float) -> str | None:
        """Long poll: the id of a container that hit OOM, or None at `timeout`."""
        resp = await self._poll("GetOOMEvent", _pb.GetOOMEventRequest(), _pb.OOMEvent, timeout)
        return None if resp is None else str(resp.container_id)


class _StdioCalls(_Connection):
    """Process stdio: writes of at most MAX_CHUNK bytes, long-polled reads of MAX_READ."""

    # Stdio.

    async def write_stdin(
        self,
        container_id: str,
        exec_id: str,
        data: bytes,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> int:
        """Send at most MAX_CHUNK bytes; returns how many the agent took (resend the rest)."""
        req = _pb.WriteStdinRequest(
            container_id=container_id, exec_id=exec_id, data=data[:MAX_CHUNK]
        )
        resp = await self._call("WriteStdin", req, _pb.WriteStdinResponse, timeout)
        return int(resp.written)

    async def close_stdin(
        self, container_id: str, exec_id: str, *, timeout: float | None = DEFAULT_TIMEOUT
    ) -> None:
        req = _pb.ProcessRequest(container_id=container_id, exec_id=exec_id)
        await self._call("CloseStdin", req, None, timeout)

    async def read_stdout(
        self, container_id: str, exec_id: str, *, timeout: float, max_bytes: int = MAX_READ
    ) -> Output:
        """Long poll: the next bytes of stdout (or the TTY), Output(b"", False) at `timeout`."""
        return await self._read("ReadStdout", container_id, exec_id, timeout, max_bytes)

    async def read_stderr(
        self, container_id: str, exec_id: str, *, timeout: float, max_bytes: int = MAX_READ
    ) -> Output:
        """Long poll: the next bytes of stderr, Output(b"", False) at `timeout`."""
        return await self._read("ReadStderr", container_id, exec_id, timeout, max_bytes)

    async def resize_tty(
        self,
        container_id: str,
        exec_id: str,
        rows: int,
        cols: int,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        req = _pb.ResizeTtyRequest(container_id=container_id, exec_id=exec_id, rows=rows, cols=cols)
        await self._call("ResizeTty", req, None, timeout)


class AgentClient(_GuestCalls, _ContainerCalls, _StdioCalls):
    """The agent's RPCs over one ttrpc connection (owned: `close()` closes it)."""

    @classmethod
    async def connect(
        cls, socket_path: Path, *, port: int = AGENT_PORT, deadline: float
    ) -> AgentClient:
        """Connect through the VMM's hybrid-vsock socket, retrying until `deadline` (loop time)."""
        reader, writer = await connect_hybrid_vsock(socket_path, port, deadline=deadline)
        return cls(Client(reader, writer))

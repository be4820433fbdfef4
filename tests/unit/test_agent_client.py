"""AgentClient against a stand-in agent: our ttrpc Server with agent.proto handlers,
behind a Unix socket that speaks the hybrid-vsock CONNECT protocol.

The real agent is C in the guest and is covered by the integration tests; this
checks the typed client's conversions, long polls and error mapping.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import message_factory

from shim._pb import agent_pb2 as _agent_pb2
from shim.agent import (
    SERVICE,
    AgentClient,
    ContainerStats,
    ExitStatus,
    GuestInfo,
    Output,
    Route,
)
from shim.errors import FailedPrecondition, NotFound, Unavailable
from shim.ttrpc import CallContext, Server

pb: Any = _agent_pb2
_SERVICE_DESC = pb.DESCRIPTOR.services_by_name["Agent"]

AgentHandler = Callable[[Any, CallContext], Awaitable[Any]]


def snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower().replace("o_o_m", "oom")


class FakeVm:
    """A hybrid-vsock socket whose port 1024 is served by agent.proto handlers."""

    def __init__(self) -> None:
        self.server = Server()
        self.requests: list[tuple[str, Any]] = []
        self.writers: list[asyncio.StreamWriter] = []

    def agent(self, handlers: dict[str, AgentHandler]) -> None:
        methods = {}
        for name, fn in handlers.items():
            desc = _SERVICE_DESC.methods_by_name[name]
            methods[name] = self._wrap(
                name,
                fn,
                message_factory.GetMessageClass(desc.input_type),
                message_factory.GetMessageClass(desc.output_type),
            )
        self.server.register(SERVICE, methods)

    def _wrap(
        self, name: str, fn: AgentHandler, req_cls: Any, resp_cls: Any
    ) -> Callable[[bytes, CallContext], Awaitable[bytes]]:
        async def handler(payload: bytes, ctx: CallContext) -> bytes:
            req = req_cls.FromString(payload)
            self.requests.append((name, req))
            resp = await fn(req, ctx)
            assert isinstance(resp, resp_cls)
            return bytes(resp.SerializeToString())

        return handler

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await reader.readline() != b"CONNECT 1024\n":
            writer.close()
            return
        writer.write(b"OK 1\n")
        self.writers.append(writer)
        await self.serve(reader, writer)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.server.serve_connection(reader, writer)

    def hang_up(self) -> None:
        for writer in self.writers:
            writer.transport.abort()

    @contextlib.asynccontextmanager
    async def running(self, path: Path) -> AsyncIterator[AgentClient]:
        async with await asyncio.start_unix_server(self.handle, path=str(path)):
            loop = asyncio.get_running_loop()
            client = await AgentClient.connect(path, deadline=loop.time() + 5)
            try:
                yield client
            finally:
                await client.close()
                await self.server.close()


async def empty(req: Any, ctx: CallContext) -> Any:
    return pb.Empty()


async def park(ctx: CallContext) -> None:
    """What the agent does on a long poll with nothing to report."""
    await asyncio.sleep(3600)


class SilentVm(FakeVm):
    """A guest whose agent takes requests and never answers (a stalled transport)."""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass


async def test_a_read_nobody_answered_is_not_taken_for_nothing_pending(sock_dir: Path) -> None:
    """After an exit, an empty answer means all output was read; no answer at all
    must not (the pumps would end with output still in the guest)."""
    async with SilentVm().running(sock_dir / "vm.sock") as agent:
        out = await agent.read_stdout("abc", "", timeout=0.05)
    assert out == Output(b"", eof=False, answered=False)
    vm = FakeVm()
    vm.agent({"ReadStdout": lambda req, ctx: park(ctx)})
    async with vm.running(sock_dir / "vm2.sock") as agent:
        out = await agent.read_stdout("abc", "", timeout=0.05)
    assert out == Output(b"", eof=False, answered=True)  # the agent's own deadline


def test_every_rpc_has_a_method() -> None:
    missing = [m.name for m in _SERVICE_DESC.methods if not hasattr(AgentClient, snake(m.name))]
    assert missing == []


async def test_identity_and_disks(sock_dir: Path) -> None:
    async def health(req: Any, ctx: CallContext) -> Any:
        return pb.HealthResponse(status=pb.HealthResponse.SERVING)

    async def info(req: Any, ctx: CallContext) -> Any:
        return pb.GuestInfoResponse(
            agent_version="0.1.0",
            kernel_release="6.1.0-cloudhv",
            boot_id="b00t",
            online_cpus=2,
            memory_total_kib=2**40,
            uptime_ms=1234,
        )

    async def mount(req: Any, ctx: CallContext) -> Any:
        return pb.MountDiskResponse(device="/dev/vdb")

    vm = FakeVm()
    vm.agent({"Health": health, "GuestInfo": info, "MountDisk": mount, "UnmountDisk": empty})
    async with vm.running(sock_dir / "vm.sock") as agent:
        assert await agent.health() is True
        assert await agent.guest_info() == GuestInfo(
            "0.1.0", "6.1.0-cloudhv", "b00t", 2, 2**40, 1234
        )
        dev = await agent.mount_disk("rootfs-abc", "/run/c/abc", read_only=True, wait=2.5)
        assert dev == "/dev/vdb"
        await agent.unmount_disk("/run/c/abc")
    name, req = vm.requests[2]
    assert name == "MountDisk"
    assert (req.serial, req.fstype, req.target, req.read_only, req.timeout_ms) == (
        "rootfs-abc",
        "ext4",
        "/run/c/abc",
        True,
        2500,
    )


async def test_container_lifecycle_and_long_polls(sock_dir: Path) -> None:
    exited = asyncio.Event()
    output = [b"out\n"]

    async def create(req: Any, ctx: CallContext) -> Any:
        return pb.ProcessResponse(pid=42)

    async def wait(req: Any, ctx: CallContext) -> Any:
        assert ctx.deadline is not None  # the agent gets the poll's deadline
        await exited.wait()
        return pb.WaitProcessResponse(exit_status=3, exited_at_unix_ns=1_700_000_000_123_456_789)

    async def read(req: Any, ctx: CallContext) -> Any:
        if output:
            return pb.ReadOutputResponse(data=output.pop(0)[: req.max_bytes])
        if exited.is_set():
            return pb.ReadOutputResponse(eof=True)
        await park(ctx)
        raise AssertionError("unreachable")

    async def processes(req: Any, ctx: CallContext) -> Any:
        return pb.ListProcessesResponse(pids=[42, 43])

    async def signal(req: Any, ctx: CallContext) -> Any:
        exited.set()
        return pb.Empty()

    vm = FakeVm()
    vm.agent(
        {
            "CreateContainer": create,
            "StartContainer": create,
            "WaitProcess": wait,
            "ReadStdout": read,
            "ListProcesses": processes,
            "SignalProcess": signal,
            "RemoveContainer": empty,
        }
    )
    async with vm.running(sock_dir / "vm.sock") as agent:
        pid = await agent.create_container(
            "abc", b'{"ociVersion":"1.0.2"}', "/run/c/abc/rootfs", terminal=True
        )
        assert pid == 42
        assert await agent.start_container("abc") == 42
        assert await agent.read_stdout("abc", "", timeout=1) == Output(b"out\n", eof=False)
        # Nothing more yet: both polls come back empty at their deadline.
        assert await agent.read_stdout("abc", "", timeout=0.2) == Output(b"", eof=False)
        assert await agent.wait_process("abc", "", timeout=0.2) is None
        assert await agent.list_processes("abc") == (42, 43)
        waiting = asyncio.ensure_future(agent.wait_process("abc", "", timeout=5))
        await agent.signal_process("abc", "", 9, all_processes=True)
        assert await waiting == ExitStatus(3, 1_700_000_000_123_456_789)
        assert await agent.read_stdout("abc", "", timeout=1) == Output(b"", eof=True)
        await agent.remove_container("abc", force=True)
    by_name = dict(vm.requests)
    create_req = by_name["CreateContainer"]
    assert create_req.rootfs.path == "/run/c/abc/rootfs" and create_req.terminal
    assert create_req.oci_spec_json == b'{"ociVersion":"1.0.2"}'
    assert (by_name["SignalProcess"].signal, by_name["SignalProcess"].all) == (9, True)
    assert by_name["RemoveContainer"].force


async def test_stats_stdin_and_oom(sock_dir: Path) -> None:
    stat_names = [f.name for f in fields(ContainerStats)]
    oom = asyncio.Queue[str]()

    async def stats(req: Any, ctx: CallContext) -> Any:
        return pb.StatsContainerResponse(**{n: i + 1 for i, n in enumerate(stat_names)})

    async def write(req: Any, ctx: CallContext) -> Any:
        return pb.WriteStdinResponse(written=min(len(req.data), 1000))

    async def get_oom(req: Any, ctx: CallContext) -> Any:
        return pb.OOMEvent(container_id=await oom.get())

    vm = FakeVm()
    vm.agent(
        {
            "StatsContainer": stats,
            "WriteStdin": write,
            "CloseStdin": empty,
            "GetOOMEvent": get_oom,
            "ResizeTty": empty,
        }
    )
    async with vm.running(sock_dir / "vm.sock") as agent:
        got = await agent.stats_container("abc")
        assert [getattr(got, n) for n in stat_names] == list(range(1, len(stat_names) + 1))
        assert await agent.write_stdin("abc", "e1", bytes(100_000)) == 1000
        await agent.close_stdin("abc", "e1")
        await agent.resize_tty("abc", "e1", rows=40, cols=120)
        assert await agent.get_oom_event(timeout=0.2) is None
        oom.put_nowait("abc")
        assert await agent.get_oom_event(timeout=2) == "abc"
    by_name = dict(vm.requests)
    assert len(by_name["WriteStdin"].data) == 65536  # one chunk at most
    assert (by_name["ResizeTty"].rows, by_name["ResizeTty"].cols) == (40, 120)


async def test_pod_setup_requests(sock_dir: Path) -> None:
    vm = FakeVm()
    vm.agent(
        {
            name: empty
            for name in ("UpdateInterface", "UpdateRoutes", "SetupPod", "CopyFile", "SetTime")
        }
    )
    async with vm.running(sock_dir / "vm.sock") as agent:
        await agent.update_interface(
            "02:00:00:00:00:01",
            name="eth0",
            mtu=1450,
            addresses=[
                ipaddress.ip_interface("10.88.0.5/16"),
                ipaddress.ip_interface("fd00::5/64"),
            ],
        )
        await agent.update_routes(
            [Route("default", gateway="10.88.0.1"), Route("fd00::/64", device="eth0")]
        )
        await agent.setup_pod("web-0", dns_servers=["10.96.0.10"], dns_searches=["svc.local"])
        await agent.copy_file("/etc/hosts", b"127.0.0.1 localhost\n", mode=0o644)
        await agent.set_time(1_700_000_000_987_654_321)
    by_name = dict(vm.requests)
    iface = by_name["UpdateInterface"]
    assert [(a.address, a.prefix_len) for a in iface.addresses] == [
        ("10.88.0.5", 16),
        ("fd00::5", 64),
    ]
    assert (iface.mac, iface.name, iface.mtu) == ("02:00:00:00:00:01", "eth0", 1450)
    assert [(r.destination, r.gateway, r.device) for r in by_name["UpdateRoutes"].routes] == [
        ("default", "10.88.0.1", ""),
        ("fd00::/64", "", "eth0"),
    ]
    assert list(by_name["SetupPod"].dns_servers) == ["10.96.0.10"]
    assert (by_name["CopyFile"].path, by_name["CopyFile"].mode) == ("/etc/hosts", 0o644)
    assert (by_name["SetTime"].unix_sec, by_name["SetTime"].nsec) == (1_700_000_000, 987_654_321)


async def test_agent_errors_are_typed(sock_dir: Path) -> None:
    async def missing(req: Any, ctx: CallContext) -> Any:
        raise NotFound(f"container {req.container_id}: not found")

    async def paused(req: Any, ctx: CallContext) -> Any:
        raise FailedPrecondition("container abc is not running")

    vm = FakeVm()
    vm.agent({"StartContainer": missing, "PauseContainer": paused})
    async with vm.running(sock_dir / "vm.sock") as agent:
        with pytest.raises(NotFound, match="container nope: not found"):
            await agent.start_container("nope")
        with pytest.raises(FailedPrecondition):
            await agent.pause_container("abc")


async def test_remove_process(sock_dir: Path) -> None:
    exited = {"e1"}

    async def remove(req: Any, ctx: CallContext) -> Any:
        if req.exec_id == "e2":
            raise FailedPrecondition(f"exec {req.exec_id} is running")
        if req.exec_id not in exited:
            raise NotFound(f"exec {req.exec_id} in container {req.container_id} not found")
        exited.remove(req.exec_id)
        return pb.Empty()

    vm = FakeVm()
    vm.agent({"RemoveProcess": remove})
    async with vm.running(sock_dir / "vm.sock") as agent:
        await agent.remove_process("abc", "e1")
        with pytest.raises(NotFound, match="exec e1"):
            await agent.remove_process("abc", "e1")
        with pytest.raises(FailedPrecondition, match="running"):
            await agent.remove_process("abc", "e2")
    assert [(r.container_id, r.exec_id) for _, r in vm.requests] == [
        ("abc", "e1"),
        ("abc", "e1"),
        ("abc", "e2"),
    ]


async def test_shutdown_tolerates_the_connection_dropping(sock_dir: Path) -> None:
    vm = FakeVm()

    async def shutdown(req: Any, ctx: CallContext) -> Any:
        vm.hang_up()  # the guest powers off before the reply leaves
        await park(ctx)
        raise AssertionError("unreachable")

    vm.agent({"Shutdown": shutdown})
    async with vm.running(sock_dir / "vm.sock") as agent:
        await agent.shutdown()
        await asyncio.wait_for(agent.wait_closed(), 2)
        assert agent.closed
        with pytest.raises(Unavailable):
            await agent.health()


async def test_connect_gives_up_at_the_deadline(sock_dir: Path) -> None:
    loop = asyncio.get_running_loop()
    with pytest.raises(Unavailable, match="port 1024"):
        await AgentClient.connect(sock_dir / "none.sock", deadline=loop.time() + 0.1)

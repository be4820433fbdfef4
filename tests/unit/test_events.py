"""Event publishing against a real ttrpc server: order, envelope fields, retries."""

from __future__ import annotations

import asyncio
from pathlib import Path

from shim._pb.containerd.events import task_pb2
from shim._pb.containerd.services.ttrpc.events.v1 import events_pb2
from shim.errors import Unavailable
from shim.events import SERVICE, Publisher, TaskCreate, TaskExit, TaskStart
from shim.ttrpc import CallContext, Server


async def test_events_arrive_in_order_after_a_failure(tmp_path: Path) -> None:
    received: list[tuple[str, str, str, tuple[str, ...]]] = []
    calls = 0

    async def forward(payload: bytes, ctx: CallContext) -> bytes:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise Unavailable("containerd is busy")
        req = events_pb2.ForwardRequest()
        req.ParseFromString(payload)
        env = req.envelope
        assert env.timestamp.seconds > 0
        ns = ctx.metadata.get("containerd-namespace-ttrpc", ())
        received.append((env.topic, env.event.type_url, env.namespace, ns))
        if env.topic == "/tasks/exit":
            exit_ = task_pb2.TaskExit()
            exit_.ParseFromString(env.event.value)
            assert (exit_.container_id, exit_.id, exit_.exit_status) == ("c1", "c1", 3)
            assert exit_.exited_at.seconds == 1_700_000_000
        return b""

    sock = tmp_path / "ttrpc.sock"
    server = Server()
    server.register(SERVICE, {"Forward": forward})
    serving = asyncio.create_task(server.serve_unix(sock))
    while not sock.exists():
        await asyncio.sleep(0.01)
    publisher = Publisher(f"unix://{sock}", "k8s.io")
    runner = asyncio.create_task(publisher.run())
    publisher.publish(TaskCreate("c1", "/b", (), "", "/o", "/e", False, 42))
    publisher.publish(TaskStart("c1", 42))
    publisher.publish(TaskExit("c1", "c1", 42, 3, 1_700_000_000 * 10**9))
    assert await publisher.flush(10)
    runner.cancel()
    await server.close()
    await asyncio.gather(runner, serving, return_exceptions=True)
    assert [r[0] for r in received] == ["/tasks/create", "/tasks/start", "/tasks/exit"]
    assert [r[1] for r in received] == [
        "containerd.events.TaskCreate",
        "containerd.events.TaskStart",
        "containerd.events.TaskExit",
    ]
    assert all(r[2] == "k8s.io" and r[3] == ("k8s.io",) for r in received)
    assert publisher.sent == 3 and publisher.dropped == 0


async def test_no_address_drops_quietly() -> None:
    publisher = Publisher("", "default")
    runner = asyncio.create_task(publisher.run())
    publisher.publish(TaskStart("c1", 1))
    assert await publisher.flush(5)
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    assert publisher.dropped == 1


async def test_events_wait_out_a_containerd_restart(tmp_path: Path) -> None:
    """containerd gone for 3 s (more than the old 1.55 s of retries): nothing is lost."""
    received: list[str] = []

    async def forward(payload: bytes, ctx: CallContext) -> bytes:
        req = events_pb2.ForwardRequest()
        req.ParseFromString(payload)
        received.append(req.envelope.topic)
        return b""

    sock = tmp_path / "ttrpc.sock"
    publisher = Publisher(f"unix://{sock}", "k8s.io")
    runner = asyncio.create_task(publisher.run())
    publisher.publish(TaskStart("c1", 42))
    publisher.publish(TaskExit("c1", "c1", 42, 0, 1_700_000_000 * 10**9))
    await asyncio.sleep(3.0)
    assert received == []
    server = Server()
    server.register(SERVICE, {"Forward": forward})
    serving = asyncio.create_task(server.serve_unix(sock))
    assert await publisher.flush(10)
    runner.cancel()
    await server.close()
    await asyncio.gather(runner, serving, return_exceptions=True)
    assert received == ["/tasks/start", "/tasks/exit"]
    assert publisher.dropped == 0


async def test_a_full_queue_drops_the_oldest_not_the_daemon() -> None:
    publisher = Publisher("unix:///nonexistent/sock", "k8s.io", queue_max=3)
    for n in range(5):
        publisher.publish(TaskStart(f"c{n}", n))
    assert publisher.dropped == 2

"""The shim's ttrpc server, with the Task service on a pod, takes 100k random and
mutated frames without dying, and answers a well-formed call afterwards.

The pod behind it has in-process fakes for the VMM and the agent (tests/unit/fakes.py):
what a fuzzed Create or Kill reaches is real shim code, what it could start is not.
"""

from __future__ import annotations

import asyncio
import random
import struct
from pathlib import Path

from shim import config as config_mod
from shim._pb.containerd.task.v2 import shim_pb2
from shim.events import Publisher
from shim.pod import Pod
from shim.state import StateStore
from shim.task import SERVICE, TaskService
from shim.ttrpc import Client, Server
from shim.ttrpc.frames import MessageType, encode_frame
from shim.ttrpc.messages import Request, encode_request
from tests.unit.fakes import Failures, FakeAgent, FakeVmm

FRAMES = 100_000
METHODS = [
    "State", "Create", "Start", "Delete", "Pids", "Pause", "Resume", "Checkpoint", "Kill",
    "Exec", "ResizePty", "CloseIO", "Update", "Wait", "Stats", "Connect", "Shutdown", "Nope",
]
# Well-formed requests to mutate: the fuzzer starts from what containerd sends.
SEEDS = [
    shim_pb2.CreateTaskRequest(id="c1", bundle="/nonexistent", stdout="/nonexistent/out"),
    shim_pb2.KillRequest(id="c1", signal=9, all=True),
    shim_pb2.ExecProcessRequest(id="c1", exec_id="e1"),
    shim_pb2.StateRequest(id="c1", exec_id="e1"),
    shim_pb2.UpdateTaskRequest(id="c1"),
    shim_pb2.ResizePtyRequest(id="c1", width=80, height=24),
]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        choice = rng.random()
        if choice < 0.4 and buf:
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        elif choice < 0.7:
            buf[rng.randint(0, len(buf)) : rng.randint(0, len(buf))] = rng.randbytes(
                rng.randint(0, 12)
            )
        elif buf:
            del buf[rng.randrange(len(buf)) :]
    return bytes(buf)


def _frame(rng: random.Random, stream_id: int) -> bytes:
    roll = rng.random()
    if roll < 0.25:  # noise: breaks framing, the server hangs up
        return rng.randbytes(rng.randint(1, 64))
    if roll < 0.35:  # a header whose length lies
        length = rng.choice([0, 1, 1 << 20, (1 << 32) - 1, rng.randrange(1 << 16)])
        return struct.pack(">IIBB", length, stream_id, rng.randrange(256), rng.randrange(256))
    payload = rng.choice(SEEDS).SerializeToString()
    if roll < 0.8:
        payload = _mutate(rng, payload)
    request = encode_request(
        Request(
            service=SERVICE if rng.random() < 0.9 else "x" * rng.randint(0, 40),
            method=rng.choice(METHODS),
            payload=payload,
            timeout_nano=rng.choice([0, 1, 10**9, -1 & (2**63 - 1)]),
            metadata=(("k", "v"),) if rng.random() < 0.1 else (),
        )
    )
    if rng.random() < 0.3:
        request = _mutate(rng, request)
    kind = MessageType.REQUEST if rng.random() < 0.95 else rng.choice(list(MessageType))
    return encode_frame(stream_id, kind, request, rng.randrange(4) if rng.random() < 0.1 else 0)


async def test_server_survives_100k_fuzzed_frames(tmp_path: Path, sock_dir: Path) -> None:
    config = config_mod.parse(
        {
            "vmm": "qemu",
            "kernel_path": "/k",
            "rootfs_path": "/r",
            "kernel_args": "quiet",
            "state_dir": str(tmp_path / "state"),
            "disk_dir": str(tmp_path / "disks"),
        }
    )
    failures = Failures()
    pod = Pod(
        config,
        "fuzz",
        "default",
        StateStore(tmp_path / "state"),
        Publisher("", "default"),
        vmm_factory=lambda _, spec: FakeVmm(spec, failures),
        agent_connect=lambda *_: _agent(failures),
    )
    await pod.open()
    shutdown = asyncio.Event()
    service = TaskService(pod, shutdown.set)
    server = Server()
    server.register(SERVICE, service.handlers())
    sock = sock_dir / "shim.sock"
    serving = asyncio.create_task(server.serve_unix(sock))
    while not sock.exists():
        await asyncio.sleep(0.01)

    rng = random.Random(20261201)
    sent = connections = 0
    while sent < FRAMES:
        reader, writer = await asyncio.open_unix_connection(str(sock))
        connections += 1
        drain = asyncio.create_task(_discard(reader))
        try:
            for _ in range(rng.randint(1, 400)):
                writer.write(_frame(rng, 2 * sent + 1))
                sent += 1
                if sent % 64 == 0:
                    await writer.drain()
            await writer.drain()
        except (ConnectionError, OSError):
            pass  # the server hung up on garbage: a new connection carries on
        writer.close()
        drain.cancel()
        await asyncio.gather(drain, return_exceptions=True)
    assert not serving.done(), "the server stopped"

    client = await Client.connect_unix(str(sock))
    try:
        payload = await client.call(
            SERVICE, "Connect", shim_pb2.ConnectRequest(id="fuzz").SerializeToString(), timeout=10
        )
    finally:
        await client.close()
    reply = shim_pb2.ConnectResponse()
    reply.ParseFromString(payload)
    assert reply.shim_pid > 0
    assert connections > 100  # the garbage really did cut connections
    await server.close()
    await pod.close()
    await asyncio.gather(serving, return_exceptions=True)


async def _agent(failures: Failures) -> FakeAgent:
    return FakeAgent(failures)


async def _discard(reader: asyncio.StreamReader) -> None:
    while await reader.read(1 << 16):
        pass

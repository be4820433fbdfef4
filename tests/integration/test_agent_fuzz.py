"""The agent, fuzzed at its ttrpc boundary inside a real VM over vsock: thousands of
random and mutated requests, and it neither dies nor stops answering Health.

Requests are well-formed ttrpc envelopes around mutated agent messages (the
agent's nanopb decoder and every handler see them), plus frames whose header or
envelope is garbage (the framing and envelope decoders see those). Shutdown is
left out: powering off is what it is for.
"""

from __future__ import annotations

import asyncio
import random
import struct
from pathlib import Path
from typing import Any

from shim._pb import agent_pb2
from shim.agent import AgentClient
from shim.ttrpc.frames import MessageType, encode_frame
from shim.ttrpc.messages import Request, encode_request
from shim.vsock import connect_hybrid_vsock
from tests.integration.vm_fixtures import booted_vm

REQUESTS = 5000
SERVICE = "cloudhv.agent.v1.Agent"
pb: Any = agent_pb2
SEEDS: dict[str, Any] = {
    "Health": pb.HealthRequest(),
    "GuestInfo": pb.GuestInfoRequest(),
    "MountDisk": pb.MountDiskRequest(serial="x", fstype="ext4", target="/run/x", timeout_ms=5),
    "UnmountDisk": pb.UnmountDiskRequest(target="/run/x"),
    "CreateContainer": pb.CreateContainerRequest(
        container_id="c1", oci_spec_json=b'{"ociVersion":"1.2.1","process":{"args":["sh"]}}',
        rootfs=pb.Rootfs(path="/run/x"),
    ),
    "StartContainer": pb.ContainerRequest(container_id="c1"),
    "ExecProcess": pb.ExecProcessRequest(
        container_id="c1", exec_id="e1", process_json=b'{"args":["true"],"cwd":"/"}'
    ),
    "SignalProcess": pb.SignalProcessRequest(container_id="c1", signal=9),
    "WaitProcess": pb.ProcessRequest(container_id="c1"),
    "RemoveProcess": pb.ProcessRequest(container_id="c1", exec_id="e1"),
    "RemoveContainer": pb.RemoveContainerRequest(container_id="c1", force=True),
    "ListProcesses": pb.ContainerRequest(container_id="c1"),
    "PauseContainer": pb.ContainerRequest(container_id="c1"),
    "ResumeContainer": pb.ContainerRequest(container_id="c1"),
    "UpdateContainer": pb.UpdateContainerRequest(container_id="c1", resources_json=b"{}"),
    "StatsContainer": pb.ContainerRequest(container_id="c1"),
    "GetOOMEvent": pb.GetOOMEventRequest(),
    "WriteStdin": pb.WriteStdinRequest(container_id="c1", data=b"hello"),
    "CloseStdin": pb.ProcessRequest(container_id="c1"),
    "ReadStdout": pb.ReadOutputRequest(container_id="c1", max_bytes=100),
    "ReadStderr": pb.ReadOutputRequest(container_id="c1", max_bytes=100),
    "ResizeTty": pb.ResizeTtyRequest(container_id="c1", rows=24, cols=80),
    "UpdateInterface": pb.UpdateInterfaceRequest(mac="02:00:00:00:00:01", mtu=1500),
    "UpdateRoutes": pb.UpdateRoutesRequest(),
    "SetupPod": pb.SetupPodRequest(hostname="fuzz"),
    "CopyFile": pb.CopyFileRequest(path="/run/fuzz/file", data=b"x", mode=0o644),
    "SetTime": pb.SetTimeRequest(unix_sec=1_800_000_000),
}


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        roll = rng.random()
        if roll < 0.4 and buf:
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        elif roll < 0.75:
            at = rng.randint(0, len(buf))
            buf[at:at] = rng.randbytes(rng.randint(1, 16))
        elif buf:
            del buf[rng.randrange(len(buf)) :]
    return bytes(buf)


def _frame(rng: random.Random, stream_id: int) -> bytes:
    roll = rng.random()
    if roll < 0.05:
        return rng.randbytes(rng.randint(1, 40))
    if roll < 0.1:
        length = rng.choice([0, 1, 1 << 20, (1 << 32) - 1, rng.randrange(1 << 16)])
        return struct.pack(">IIBB", length, stream_id, rng.randrange(256), rng.randrange(256))
    method = rng.choice(list(SEEDS))
    payload = SEEDS[method].SerializeToString()
    if roll < 0.9:
        payload = _mutate(rng, payload)
    request = encode_request(
        Request(
            service=SERVICE if rng.random() < 0.95 else "cloudhv.agent.v1.Nope",
            method=method,
            payload=payload,
            timeout_nano=rng.choice([1, 10**6, 10**8, 2 * 10**9]),
        )
    )
    if rng.random() < 0.15:
        request = _mutate(rng, request)
    return encode_frame(stream_id, MessageType.REQUEST, request)


async def _discard(reader: asyncio.StreamReader) -> None:
    while await reader.read(1 << 16):
        pass


async def test_agent_survives_thousands_of_fuzzed_requests(tmp_path: Path) -> None:
    async with booted_vm(tmp_path / "vm") as (vm, agent):
        rng = random.Random(20261202)
        loop = asyncio.get_running_loop()
        sent = connections = 0
        while sent < REQUESTS:
            reader, writer = await connect_hybrid_vsock(
                vm.agent_socket, 1024, deadline=loop.time() + 30
            )
            connections += 1
            drain = asyncio.create_task(_discard(reader))
            try:
                for _ in range(rng.randint(1, 200)):
                    writer.write(_frame(rng, 2 * sent + 1))
                    sent += 1
                    if sent % 16 == 0:
                        await writer.drain()
                        await asyncio.sleep(0)  # let the agent answer, as a client would
                await writer.drain()
            except (ConnectionError, OSError):
                pass
            writer.close()
            drain.cancel()
            await asyncio.gather(drain, return_exceptions=True)
        # The shim's own connection lived through it, and a new one works too.
        assert await agent.health(timeout=30)
        async with await AgentClient.connect(
            vm.agent_socket, deadline=loop.time() + 30
        ) as fresh:
            assert await fresh.health(timeout=30)
            assert (await fresh.guest_info(timeout=30)).kernel_release.startswith("6.1.")
        assert connections > 5
        assert vm.processes().vmm_pid > 0 and vm.pid > 0

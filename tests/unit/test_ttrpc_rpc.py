"""ttrpc client and server talking over real Unix sockets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shim.errors import (
    Aborted,
    AlreadyExists,
    Code,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ShimError,
    Unavailable,
    Unimplemented,
)
from shim.ttrpc import CallContext, Client, Server, TtrpcError, bind_unix, error_for_status
from shim.ttrpc.frames import MAX_DATA, Flags, Frame, FrameDecoder, MessageType, encode_frame
from shim.ttrpc.messages import Request, Response, decode_response, encode_request
from shim.ttrpc.server import peer_allowed

SVC = "test.v1.Echo"


async def echo(payload: bytes, ctx: CallContext) -> bytes:
    return payload


@contextlib.asynccontextmanager
async def serving(server: Server, path: Path) -> AsyncIterator[Path]:
    sock = bind_unix(path)  # listening before the task runs: no race with the first connect
    async with asyncio.TaskGroup() as tg:
        tg.create_task(server.serve_unix(path, sock=sock))
        try:
            yield path
        finally:
            await server.close()


@contextlib.asynccontextmanager
async def echo_server(sock_dir: Path, **methods: object) -> AsyncIterator[Path]:
    server = Server()
    server.register(SVC, {"Echo": echo, **methods})  # type: ignore[dict-item]
    async with serving(server, sock_dir / "s.sock") as path:
        yield path


class RawConn:
    """Speaks frames directly, for what the Client never sends."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.decoder = reader, writer, FrameDecoder()
        self.frames: list[Frame] = []

    @classmethod
    async def open(cls, path: Path) -> RawConn:
        return cls(*await asyncio.open_unix_connection(str(path)))

    def send(self, sid: int, body: bytes, flags: int = 0) -> None:
        self.writer.write(encode_frame(sid, MessageType.REQUEST, body, flags))

    async def recv(self) -> tuple[int, Response]:
        while not self.frames:
            chunk = await asyncio.wait_for(self.reader.read(65536), 5)
            assert chunk, "server closed the connection"
            self.frames += [f for f in self.decoder.feed(chunk) if isinstance(f, Frame)]
        frame = self.frames.pop(0)
        assert frame.type is MessageType.RESPONSE and frame.flags == 0
        return frame.stream_id, decode_response(frame.data)

    def close(self) -> None:
        self.writer.close()


def echo_request(payload: bytes = b"hi", method: str = "Echo") -> bytes:
    return encode_request(Request(SVC, method, payload))


async def test_round_trip_and_metadata(sock_dir: Path) -> None:
    seen: list[CallContext] = []

    async def record(payload: bytes, ctx: CallContext) -> bytes:
        seen.append(ctx)
        return payload[::-1]

    async with echo_server(sock_dir, Record=record) as path, await Client.connect_unix(path) as c:
        assert await c.call(SVC, "Echo", b"") == b""
        reply = await c.call(
            SVC, "Record", b"abc", metadata={"Containerd-Namespace-TTRPC": "k8s.io"}, timeout=9
        )
        assert reply == b"cba"
    ctx = seen[0]
    assert (ctx.service, ctx.method) == (SVC, "Record")
    assert dict(ctx.metadata) == {"containerd-namespace-ttrpc": ("k8s.io",)}
    assert ctx.deadline is not None
    assert 8 < ctx.deadline - asyncio.get_running_loop().time() <= 9


async def test_concurrent_calls_complete_in_completion_order(sock_dir: Path) -> None:
    gates = {name: asyncio.Event() for name in (b"a", b"b", b"c", b"d")}
    started: set[bytes] = set()
    all_started = asyncio.Event()
    replies: list[bytes] = []

    async def gate(payload: bytes, ctx: CallContext) -> bytes:
        started.add(payload)
        if len(started) == len(gates):
            all_started.set()
        await gates[payload].wait()
        return payload

    async with echo_server(sock_dir, Gate=gate) as path, await Client.connect_unix(path) as c:

        async def call(name: bytes) -> None:
            replies.append(await c.call(SVC, "Gate", name))

        async with asyncio.TaskGroup() as tg:
            for name in gates:
                tg.create_task(call(name))
            # Every request is in flight at once on the one connection...
            await asyncio.wait_for(all_started.wait(), 5)
            # ...and each reply goes out as soon as its handler is done.
            for name in (b"c", b"a", b"d", b"b"):
                gates[name].set()
                while name not in replies:
                    await asyncio.sleep(0.001)
    assert replies == [b"c", b"a", b"d", b"b"]


async def test_server_enforces_the_request_deadline(sock_dir: Path) -> None:
    cancelled = asyncio.Event()

    async def hang(payload: bytes, ctx: CallContext) -> bytes:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return b""

    async with echo_server(sock_dir, Hang=hang) as path, await Client.connect_unix(path) as c:
        # The grace keeps the client waiting so that the server's answer is what we see.
        with pytest.raises(DeadlineExceeded) as info:
            await c.call(SVC, "Hang", b"", timeout=0.2, grace=5)
        assert isinstance(info.value.__cause__, TtrpcError)
        assert info.value.__cause__.code is Code.DEADLINE_EXCEEDED
        assert cancelled.is_set()
        assert await c.call(SVC, "Echo", b"still usable") == b"still usable"


async def test_client_times_out_locally_when_the_server_is_silent(sock_dir: Path) -> None:
    finished = asyncio.Event()

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never answers; returns at EOF
        writer.close()
        await writer.wait_closed()
        finished.set()

    path = sock_dir / "silent.sock"
    async with await asyncio.start_unix_server(swallow, path=str(path)):
        async with await Client.connect_unix(path) as c:
            start = asyncio.get_running_loop().time()
            with pytest.raises(DeadlineExceeded, match="no reply within 0.2s"):
                await c.call(SVC, "Echo", b"", timeout=0.2)
            assert asyncio.get_running_loop().time() - start < 1
            with pytest.raises(DeadlineExceeded):
                await c.call(SVC, "Echo", b"", timeout=0)
        await asyncio.wait_for(finished.wait(), 5)


async def test_unknown_service_and_method_are_unimplemented(sock_dir: Path) -> None:
    async with echo_server(sock_dir) as path, await Client.connect_unix(path) as c:
        with pytest.raises(Unimplemented, match=r"^service nope\.v1\.X$"):
            await c.call("nope.v1.X", "Echo", b"")
        with pytest.raises(Unimplemented, match="^method Nope$"):
            await c.call(SVC, "Nope", b"")


@pytest.mark.parametrize(
    ("raised", "expected", "message"),
    [
        (NotFound("container abc: not found"), NotFound, "container abc: not found"),
        (AlreadyExists("id taken"), AlreadyExists, "id taken"),
        (FailedPrecondition("container abc is running"), FailedPrecondition, "is running"),
        (InvalidArgument("bad"), InvalidArgument, "bad"),
        (TtrpcError(Code.ABORTED, "raced"), Aborted, "raced"),
        (RuntimeError("boom in handler"), Internal, "boom in handler"),
        (KeyError("k"), Internal, "'k'"),
        (NotFound("/run/\udcff: gone"), NotFound, r"/run/\\udcff: gone"),
    ],
)
async def test_errors_map_to_codes_and_back(
    sock_dir: Path, raised: Exception, expected: type[ShimError], message: str
) -> None:
    async def fail(payload: bytes, ctx: CallContext) -> bytes:
        raise raised

    async with echo_server(sock_dir, Fail=fail) as path, await Client.connect_unix(path) as c:
        with pytest.raises(expected, match=message) as info:
            await c.call(SVC, "Fail", b"")
        cause = info.value.__cause__
        assert isinstance(cause, TtrpcError) and cause.code is expected.code
        # One failing call does not disturb the connection.
        assert await c.call(SVC, "Echo", b"x") == b"x"


def test_error_for_status_covers_every_code() -> None:
    for code in Code:
        if code is Code.OK:
            with pytest.raises(ValueError):
                error_for_status(code, "")
            continue
        err = error_for_status(code, "msg")
        assert err.code is code and str(err) == "msg"
    odd = error_for_status(99, "from the future")
    assert odd.code is Code.UNKNOWN and "99" in str(odd)


async def test_oversized_frames(sock_dir: Path) -> None:
    async def huge(payload: bytes, ctx: CallContext) -> bytes:
        return bytes(MAX_DATA + 1)

    async with echo_server(sock_dir, Huge=huge) as path:
        async with await Client.connect_unix(path) as c:
            with pytest.raises(ResourceExhausted):  # refused before sending
                await c.call(SVC, "Echo", bytes(MAX_DATA))
            with pytest.raises(ResourceExhausted):  # the server refuses to send it
                await c.call(SVC, "Huge", b"")
            assert await c.call(SVC, "Echo", b"ok") == b"ok"

        # A peer that ignores the limit: the frame is discarded, the stream answered.
        body = encode_request(Request(SVC, "Echo", bytes(MAX_DATA)))
        raw = await RawConn.open(path)
        header = len(body).to_bytes(4, "big") + (1).to_bytes(4, "big") + bytes([1, 0])
        raw.writer.write(header + body)
        raw.send(3, echo_request(b"after"))
        sid, resp = await raw.recv()
        assert (sid, resp.code) == (1, Code.RESOURCE_EXHAUSTED)
        sid, resp = await raw.recv()
        assert (sid, resp.code, resp.payload) == (3, Code.OK, b"after")
        raw.close()


async def test_stream_id_rules_and_streaming_refused(sock_dir: Path) -> None:
    async with echo_server(sock_dir) as path:
        raw = await RawConn.open(path)
        raw.send(2, echo_request())  # even
        assert (await raw.recv())[1].code == Code.INVALID_ARGUMENT
        raw.send(5, echo_request(b"five"))
        assert (await raw.recv()) == (5, Response(payload=b"five"))
        raw.send(3, echo_request())  # not increasing
        sid, resp = await raw.recv()
        assert (sid, resp.code) == (3, Code.INVALID_ARGUMENT)
        assert "must increment" in resp.message
        raw.send(7, echo_request(), Flags.REMOTE_OPEN)
        assert (await raw.recv())[1].code == Code.UNIMPLEMENTED
        raw.send(9, b"\x0a\x01\xff")  # not a Request
        assert (await raw.recv())[1].code == Code.INVALID_ARGUMENT
        raw.send(11, echo_request(b"still here"))
        assert (await raw.recv()) == (11, Response(payload=b"still here"))
        raw.close()


async def test_garbage_closes_the_connection(sock_dir: Path) -> None:
    async with echo_server(sock_dir) as path:
        raw = await RawConn.open(path)
        raw.writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert await asyncio.wait_for(raw.reader.read(), 5) == b""
        raw.close()


async def test_connection_loss_fails_pending_calls(sock_dir: Path) -> None:
    got_request = asyncio.Event()

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        got_request.set()
        await asyncio.sleep(0.1)
        writer.close()
        await writer.wait_closed()

    path = sock_dir / "flaky.sock"
    flaky = await asyncio.start_unix_server(hang_up, path=str(path))
    async with flaky, await Client.connect_unix(path) as c:
        calls = [asyncio.ensure_future(c.call(SVC, "Echo", b"", timeout=10)) for _ in range(3)]
        await got_request.wait()
        for call in calls:
            with pytest.raises(Unavailable, match="closed by peer"):
                await call
        assert c.closed
        with pytest.raises(Unavailable):
            await c.call(SVC, "Echo", b"")
        await asyncio.wait_for(c.wait_closed(), 1)


async def test_connect_to_missing_socket_is_unavailable(sock_dir: Path) -> None:
    with pytest.raises(Unavailable, match="nothing.sock"):
        await Client.connect_unix(sock_dir / "nothing.sock")


async def test_server_close_cancels_handlers_and_connections(sock_dir: Path) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def hang(payload: bytes, ctx: CallContext) -> bytes:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return b""

    server = Server()
    server.register(SVC, {"Hang": hang})
    path = sock_dir / "s.sock"
    async with asyncio.TaskGroup() as tg:
        serve = tg.create_task(server.serve_unix(path))
        while not path.exists():
            await asyncio.sleep(0.01)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        c = await Client.connect_unix(path)
        idle = await Client.connect_unix(path)
        call = asyncio.ensure_future(c.call(SVC, "Hang", b""))
        await started.wait()
        await asyncio.wait_for(server.close(), 5)
        assert cancelled.is_set()
        await asyncio.wait_for(idle.wait_closed(), 5)
        await idle.close()
        assert serve.done()
        with pytest.raises(Unavailable):
            await call
        await c.close()
    assert not path.exists()
    with pytest.raises(RuntimeError):
        await server.serve_unix(path)


async def test_serve_connection_on_a_given_stream(sock_dir: Path) -> None:
    server = Server()
    server.register(SVC, {"Echo": echo})
    a, b = socket.socketpair()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(server.serve_connection(*await asyncio.open_unix_connection(sock=a)))
        async with Client(*await asyncio.open_unix_connection(sock=b)) as c:
            assert await c.call(SVC, "Echo", b"pair") == b"pair"
        await server.close()


def test_register_twice_is_an_error() -> None:
    server = Server()
    server.register(SVC, {"Echo": echo})
    with pytest.raises(ValueError, match="twice"):
        server.register(SVC, {"Other": echo})


def test_peer_check_requires_same_uid_and_gid() -> None:
    assert peer_allowed(0, 0, own_uid=0, own_gid=0)
    assert not peer_allowed(1000, 0, own_uid=0, own_gid=0)
    assert not peer_allowed(0, 1000, own_uid=0, own_gid=0)


# The venv's interpreter may live where nobody cannot read it; the probe needs only the stdlib.
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK),
    reason="needs root and a system python3 to connect as another user",
)
async def test_other_users_are_refused(sock_dir: Path) -> None:
    async with echo_server(sock_dir) as path:
        os.chmod(sock_dir, 0o755)
        os.chmod(path, 0o666)
        frame = encode_frame(1, MessageType.REQUEST, echo_request())
        probe = (
            "import socket,sys\n"
            "s=socket.socket(socket.AF_UNIX)\n"
            "s.connect(sys.argv[1])\n"
            "try:\n"
            f"    s.sendall(bytes.fromhex({frame.hex()!r}))\n"
            "    sys.stdout.write(repr(s.recv(100)))\n"
            "except (BrokenPipeError, ConnectionResetError):\n"
            "    sys.stdout.write('reset')\n"
        )
        proc = await asyncio.create_subprocess_exec(
            SYSTEM_PYTHON,
            "-c",
            probe,
            str(path),
            user=65534,
            group=65534,
            stdout=subprocess.PIPE,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 10)
        assert proc.returncode == 0
        assert out in (b"b''", b"reset")  # closed without an answer

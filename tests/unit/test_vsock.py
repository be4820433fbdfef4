"""The hybrid-vsock connector against a Unix server speaking the CONNECT protocol."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shim.errors import Unavailable
from shim.vsock import connect_hybrid_vsock


class FakeBackend:
    """Plays the VMM's vsock socket: hangs up on the first `refuse` attempts (the
    guest is not listening yet), then answers OK and echoes the guest stream."""

    def __init__(self, refuse: int, reply: bytes = b"OK 1073741824\n") -> None:
        self.refuse = refuse
        self.reply = reply
        self.lines: list[bytes] = []
        self._handlers: set[asyncio.Task[None]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            self.lines.append(await reader.readline())
            if len(self.lines) <= self.refuse:
                return
            # The reply and the first guest bytes in one segment: the connector
            # must leave the latter in the reader.
            writer.write(self.reply + b"guest says hi")
            while data := await reader.read(1024):
                writer.write(data)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            self._handlers.discard(task)

    async def drain(self) -> None:
        if self._handlers:
            await asyncio.wait(self._handlers)

    @contextlib.asynccontextmanager
    async def serving(self, path: Path) -> AsyncIterator[None]:
        async with await asyncio.start_unix_server(self.handle, path=str(path)):
            yield
            await self.drain()


def deadline_in(seconds: float) -> float:
    return asyncio.get_running_loop().time() + seconds


async def test_retries_until_the_guest_listens(sock_dir: Path) -> None:
    path = sock_dir / "vm.vsock"
    backend = FakeBackend(refuse=3)
    async with backend.serving(path):
        reader, writer = await connect_hybrid_vsock(path, 1024, deadline=deadline_in(5))
        try:
            assert await reader.readexactly(13) == b"guest says hi"
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
        finally:
            writer.close()
            await writer.wait_closed()
    assert backend.lines == [b"CONNECT 1024\n"] * 4


async def test_waits_for_the_socket_to_appear(sock_dir: Path) -> None:
    path = sock_dir / "late.vsock"
    backend = FakeBackend(refuse=0)

    async def connect() -> None:
        _, writer = await connect_hybrid_vsock(path, 7, deadline=deadline_in(5))
        writer.close()
        await writer.wait_closed()

    attempt = asyncio.ensure_future(connect())
    await asyncio.sleep(0.2)
    assert not attempt.done()
    async with backend.serving(path):
        await asyncio.wait_for(attempt, 5)
    assert backend.lines == [b"CONNECT 7\n"]


async def test_deadline_gives_unavailable_naming_socket_and_port(sock_dir: Path) -> None:
    path = sock_dir / "never.vsock"
    backend = FakeBackend(refuse=10**6)
    loop = asyncio.get_running_loop()
    async with backend.serving(path):
        start = loop.time()
        with pytest.raises(Unavailable, match=rf"{path} port 1024: .*closed before replying"):
            await connect_hybrid_vsock(path, 1024, deadline=deadline_in(0.3), retry_interval=0.05)
        assert 0.25 < loop.time() - start < 3
    assert len(backend.lines) >= 2


async def test_missing_socket_until_deadline(sock_dir: Path) -> None:
    with pytest.raises(Unavailable, match="No such file"):
        await connect_hybrid_vsock(sock_dir / "absent", 1024, deadline=deadline_in(0.1))


async def test_unexpected_reply_is_retried_then_reported(sock_dir: Path) -> None:
    path = sock_dir / "odd.vsock"
    backend = FakeBackend(refuse=0, reply=b"ERR no such port\n")
    async with backend.serving(path):
        with pytest.raises(Unavailable, match="unexpected reply b'ERR no such port"):
            await connect_hybrid_vsock(path, 1024, deadline=deadline_in(0.2))


async def test_a_backend_that_never_replies_is_bounded_by_the_deadline(sock_dir: Path) -> None:
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()
        await writer.wait_closed()

    path = sock_dir / "mute.vsock"
    async with await asyncio.start_unix_server(mute, path=str(path)):
        with pytest.raises(Unavailable, match="no reply within"):
            await connect_hybrid_vsock(path, 1024, deadline=deadline_in(0.2))
        await asyncio.sleep(0.05)  # let the server side see EOF and close


async def test_an_attempt_left_unanswered_is_retried(sock_dir: Path) -> None:
    """vhost-device-vsock can swallow a CONNECT sent while the guest driver starts:
    that attempt must not use up the whole deadline."""
    attempts = 0

    async def swallow_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal attempts
        attempts += 1
        await reader.readline()
        if attempts == 1:
            await reader.read()  # never answers; the client gives up on this attempt
        else:
            writer.write(b"OK 1\n")
            await writer.drain()
            await reader.read()
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()

    path = sock_dir / "swallow.vsock"
    async with await asyncio.start_unix_server(swallow_first, path=str(path)):
        _, writer = await connect_hybrid_vsock(
            path, 1024, deadline=deadline_in(5), attempt_timeout=0.1
        )
        assert attempts == 2
        writer.close()
        await writer.wait_closed()
        await asyncio.sleep(0.05)

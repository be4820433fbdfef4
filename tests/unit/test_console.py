"""The guest console reader: bounded file, newest bytes kept, marks found across reads."""

from __future__ import annotations

import asyncio
from pathlib import Path

from shim.vmm.console import ConsoleLog


async def test_console_file_stays_bounded_and_keeps_the_newest(sock_dir: Path) -> None:
    sock = sock_dir / "console.sock"
    sent, stop = asyncio.Event(), asyncio.Event()

    async def guest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for n in range(3000):  # 3 MB of console lines, then the ready mark split in two
            writer.write(f"line {n:06d} ".encode() + b"x" * 1000 + b"\n")
            await writer.drain()
        writer.write(b"agent: re")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"ady\nlast line\n")
        await writer.drain()
        sent.set()
        await stop.wait()
        writer.close()

    server = await asyncio.start_unix_server(guest, str(sock))
    console = ConsoleLog(sock_dir / "console.log", limit=256 * 1024)
    loop = asyncio.get_running_loop()
    await console.attach(sock, loop.time() + 5)
    assert await console.wait_for(b"agent: ready", loop.time() + 30)
    await asyncio.wait_for(sent.wait(), 5)
    await asyncio.sleep(0.2)
    data = (sock_dir / "console.log").read_bytes()
    assert len(data) <= 256 * 1024
    assert data.endswith(b"agent: ready\nlast line\n")
    assert b"line 002999" in data and b"line 000000" not in data
    assert console.tail(10) == b"last line\n"
    await console.close()
    stop.set()
    server.close()
    await server.wait_closed()


async def test_wait_for_returns_false_when_the_console_ends(sock_dir: Path) -> None:
    sock = sock_dir / "console.sock"

    async def guest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"kernel panic\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(guest, str(sock))
    console = ConsoleLog(sock_dir / "console.log")
    loop = asyncio.get_running_loop()
    await console.attach(sock, loop.time() + 5)
    assert not await console.wait_for(b"agent: ready", loop.time() + 5)
    assert console.tail() == b"kernel panic\n"
    await console.close()
    server.close()

"""The guest's console, read from the VMM's console socket and kept in a bounded file.

A VMM writing its serial port straight to a file lets a chatty or looping guest
fill the host's tmpfs. Instead the VMM serves the console on a Unix socket, and
this reader appends what arrives to `console.log`, cutting the file back to its
newest half whenever it passes `limit` bytes. With no reader (the shim gone) the
VMM drops the output; the guest never blocks on its console.

The reader also watches the stream for a mark (the agent's "ready" line), so boot
readiness does not depend on the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

LIMIT_BYTES = 1 << 20
CHUNK = 1 << 16
# Printed by agent/src/main.c once it listens: dialling after it never races the boot.
AGENT_READY_MARK = b"agent: ready: ttrpc on vsock"


class ConsoleLog:
    """One VM's console: a reader task, a bounded file, and mark detection."""

    def __init__(self, path: Path, *, limit: int = LIMIT_BYTES) -> None:
        self.path = path
        self._limit = limit
        self._fd = -1
        self._size = 0
        self._window = b""  # the stream's latest bytes, for marks split across reads
        self._marks: dict[bytes, asyncio.Event] = {}
        self._task: asyncio.Task[None] | None = None
        self._ended = asyncio.Event()

    async def attach(self, socket_path: Path, deadline: float) -> None:
        """Connect to the VMM's console socket (retrying until `deadline`), start reading."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(socket_path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if loop.time() >= deadline:
                    raise
                await asyncio.sleep(0.005)
        self._fd = os.open(
            self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600
        )
        self._task = loop.create_task(self._read(reader, writer), name=f"console:{self.path}")

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    return
                self._note(data)
                await self._append(data)
        except (OSError, ConnectionError) as err:
            log.debug("event=console_read_ended path=%s error=%r", self.path, str(err))
        finally:
            self._ended.set()
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()

    def _note(self, data: bytes) -> None:
        longest = max((len(m) for m in self._marks), default=0)
        self._window = (self._window + data)[-(longest + len(data)) :]
        for mark, seen in self._marks.items():
            if mark in self._window:
                seen.set()

    async def _append(self, data: bytes) -> None:
        os.write(self._fd, data)  # a small append to a local file: it does not stall
        self._size += len(data)
        if self._size > self._limit:
            self._size = await asyncio.to_thread(_keep_tail, self.path, self._limit // 2)

    async def wait_for(self, mark: bytes, deadline: float) -> bool:
        """True once `mark` was seen; False if the console ended or the deadline passed."""
        seen = self._marks.setdefault(mark, asyncio.Event())
        if mark in self._window:
            seen.set()
        ended = asyncio.ensure_future(self._ended.wait())
        found = asyncio.ensure_future(seen.wait())
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait(
                {ended, found},
                timeout=max(0.0, deadline - loop.time()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            ended.cancel()
            found.cancel()
        return seen.is_set()

    def tail(self, size: int = 300) -> bytes:
        with contextlib.suppress(OSError), open(self.path, "rb") as console:
            console.seek(max(0, os.fstat(console.fileno()).st_size - size))
            return console.read()
        return b""

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _keep_tail(path: Path, keep: int) -> int:
    """Cut the file back to its last `keep` bytes, in place (the writer appends with
    O_APPEND, so it carries on at the new end). Returns the new size."""
    with open(path, "r+b") as console:
        size = os.fstat(console.fileno()).st_size
        if size <= keep:
            return size
        console.seek(size - keep)
        tail = console.read()
        console.seek(0)
        console.write(tail)
        console.truncate(len(tail))
        return len(tail)

"""A minimal asyncio QMP client: capabilities negotiation, commands, and events."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shim.vmm.base import VmmError


class QmpClient:
    """One QMP connection. Commands are serialised; events are kept for `wait_event`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._lock = asyncio.Lock()
        self._events: list[dict[str, Any]] = []
        self._event_added = asyncio.Condition()

    @classmethod
    async def connect(cls, path: Path, *, deadline: float) -> QmpClient:
        """Connect (retrying while QEMU creates the socket) and negotiate capabilities."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 20)
                break
            except (FileNotFoundError, ConnectionRefusedError) as error:
                if loop.time() >= deadline:
                    raise VmmError(f"connect QMP socket {path}: {error}") from error
                await asyncio.sleep(0.01)
        client = cls(reader, writer)
        try:
            async with asyncio.timeout_at(deadline):
                greeting = await client._read_message()
                if "QMP" not in greeting:
                    raise VmmError(f"QMP socket {path}: unexpected greeting {greeting!r}")
                await client.execute("qmp_capabilities")
        except BaseException:
            await client.close()
            raise
        return client

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Run one command; a QMP error becomes VmmError naming the command."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = dict(arguments)
        async with self._lock:
            self._writer.write(json.dumps(request).encode() + b"\n")
            await self._writer.drain()
            while True:
                message = await self._read_message()
                if "event" in message:
                    async with self._event_added:
                        self._events.append(message)
                        self._event_added.notify_all()
                    continue
                if "error" in message:
                    error = message["error"]
                    raise VmmError(f"QMP {command}: {error.get('class')}: {error.get('desc')}")
                return message.get("return")

    async def wait_event(self, name: str, match: Mapping[str, Any], timeout: float) -> None:
        """Wait for an event whose data contains `match`, polling QMP while waiting."""
        async with asyncio.timeout(timeout):
            while True:
                for index, event in enumerate(self._events):
                    data = event.get("data", {})
                    if event["event"] == name and all(data.get(k) == v for k, v in match.items()):
                        del self._events[index]
                        return
                # Events arrive only while we read: a cheap command pumps the socket.
                await self.execute("query-status")
                await asyncio.sleep(0.02)

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self._writer.wait_closed()

    async def _read_message(self) -> dict[str, Any]:
        line = await self._reader.readline()
        if not line:
            raise VmmError("QMP connection closed by QEMU")
        message: dict[str, Any] = json.loads(line)
        return message

"""The stand-in's HTTP/1.1 server on a Unix socket, receiving SCM_RIGHTS file descriptors.

As Cloud Hypervisor's micro_http does, the descriptors that arrive with a request's
bytes belong to that request (vm.add-net takes its TAP so). Requests on one
connection are answered in order; connections are served concurrently, and the
handler serialises what must be (CH runs every API request on its VMM thread).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

log = logging.getLogger("chsim.http")

MAX_FDS = 16
MAX_REQUEST = 1 << 20
REASONS = {
    200: "OK", 204: "No Content", 400: "Bad Request", 404: "Not Found",
    405: "Method Not Allowed", 429: "Too Many Requests", 500: "Internal Server Error",
}


@dataclass
class Request:
    method: str
    path: str
    body: bytes | None
    fds: list[int] = field(default_factory=list)  # the handler owns them


@dataclass(frozen=True)
class Reply:
    status: int
    body: object | None = None  # serialised as JSON

    def encode(self) -> bytes:
        payload = b"" if self.body is None else json.dumps(self.body).encode()
        head = [
            f"HTTP/1.1 {self.status} {REASONS.get(self.status, 'Unknown')}",
            "Server: Cloud Hypervisor API",
            "Connection: keep-alive",
            "Content-Type: application/json",
            f"Content-Length: {len(payload)}",
        ]
        return ("\r\n".join(head) + "\r\n\r\n").encode() + payload


Handler = Callable[[Request], Awaitable[Reply]]


class Server:
    def __init__(self, listener: socket.socket, handler: Handler) -> None:
        self._listener = listener
        self._handler = handler
        self._connections: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._listener.setblocking(False)
        try:
            while True:
                conn, _ = await loop.sock_accept(self._listener)
                task = loop.create_task(self._serve(conn))
                self._connections.add(task)
                task.add_done_callback(self._connections.discard)
        finally:
            for task in list(self._connections):
                task.cancel()
            self._listener.close()

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        buffer = b""
        fds: list[int] = []
        try:
            while True:
                request, buffer = _parse(buffer, fds)
                if request is None:
                    data, received = await _recv(loop, conn)
                    if not data:
                        return
                    buffer += data
                    fds += received
                    if len(buffer) > MAX_REQUEST:
                        await loop.sock_sendall(conn, Reply(400, ["Bad Request"]).encode())
                        return
                    continue
                fds = []
                reply = await self._handler(request)
                await loop.sock_sendall(conn, reply.encode())
        except (ConnectionError, OSError) as err:
            log.debug("connection ended: %s", err)
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            conn.close()


async def _recv(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> tuple[bytes, list[int]]:
    while True:
        try:
            data, ancillary, _flags, _addr = conn.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS * 4))
        except BlockingIOError:
            readable = loop.create_future()
            loop.add_reader(conn.fileno(), readable.set_result, None)
            try:
                await readable
            finally:
                loop.remove_reader(conn.fileno())
            continue
        fds: list[int] = []
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
                fds += list(got)
        return data, fds


def _parse(buffer: bytes, fds: list[int]) -> tuple[Request | None, bytes]:
    """One whole request off the front of `buffer` (with the fds received so far)."""
    head, sep, rest = buffer.partition(b"\r\n\r\n")
    if not sep:
        return None, buffer
    lines = head.decode("latin-1").split("\r\n")
    method, _, target = lines[0].partition(" ")
    target = target.rsplit(" ", 1)[0]
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip() or 0)
    if len(rest) < length:
        return None, buffer
    body = rest[:length] if length else None
    return Request(method, target, body, list(fds)), rest[length:]

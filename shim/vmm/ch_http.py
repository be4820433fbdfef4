"""HTTP/1.1 over Cloud Hypervisor's API socket, on the event loop, file descriptors included.

Small on purpose. requests-unixsocket would run each call in a thread, and it costs
every pod's daemon its import (requests, urllib3, http.client, email, idna,
charset_normalizer: measured in docs/cloud-hypervisor.md); it also cannot attach
a file descriptor to a request. `vm.add-net` needs exactly that: CH takes the
TAP as SCM_RIGHTS ancillary data arriving with the request's bytes, so the
request goes out in one `sendmsg` carrying the fd.

One connection per request: CH answers each request in order and a VM sees a
handful of calls in its life, so keeping a connection open saves nothing worth
its state.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shim.vmm.base import VmmError
from shim.vmm.ch_api import error_detail

API_ROOT = "/api/v1/"
MAX_RESPONSE = 4 << 20  # vm.info of a VM with many devices is tens of KiB
MAX_HEADER = 16 << 10


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class ApiError(VmmError):
    """CH answered with an error status; the message carries its error chain."""

    def __init__(self, message: str, status: int, body: bytes) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class ChHttp:
    """Requests to one Cloud Hypervisor API socket."""

    def __init__(self, socket_path: Path) -> None:
        self._path = socket_path

    async def call(
        self,
        method: str,
        endpoint: str,
        body: object | None = None,
        *,
        fds: Sequence[int] = (),
        timeout: float = 10.0,
    ) -> Response:
        """One request; ApiError for a status of 300 and above, VmmError if the socket
        fails. `fds` travel with the request as SCM_RIGHTS."""
        payload = b"" if body is None else json.dumps(body).encode()
        try:
            async with asyncio.timeout(timeout):
                response = await self._exchange(method, endpoint, payload, fds)
        except TimeoutError:
            raise VmmError(f"{method} {endpoint}: no answer within {timeout:.0f}s") from None
        except (OSError, ValueError) as err:
            raise VmmError(f"{method} {endpoint}: {err}") from err
        if response.status >= 300:
            detail = error_detail(response.body) or "(no body)"
            status = response.status
            raise ApiError(f"{method} {endpoint}: HTTP {status}: {detail}", status, response.body)
        return response

    async def _exchange(
        self, method: str, endpoint: str, payload: bytes, fds: Sequence[int]
    ) -> Response:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        with contextlib.closing(sock):
            await loop.sock_connect(sock, str(self._path))
            head = [f"{method} {API_ROOT}{endpoint} HTTP/1.1", "Host: localhost",
                    "Accept: application/json"]
            if payload:
                head += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
            request = ("\r\n".join(head) + "\r\n\r\n").encode() + payload
            if fds:
                await _send_with_fds(loop, sock, request, fds)
            else:
                await loop.sock_sendall(sock, request)
            return await _read_response(loop, sock)


async def _send_with_fds(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, data: bytes, fds: Sequence[int]
) -> None:
    """The first bytes of the request carry the fds; the rest follows as plain data."""
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
    while True:
        try:
            sent = sock.sendmsg([data], ancillary)
            break
        except BlockingIOError:
            writable = loop.create_future()
            loop.add_writer(sock.fileno(), writable.set_result, None)
            try:
                await writable
            finally:
                loop.remove_writer(sock.fileno())
    if sent < len(data):
        await loop.sock_sendall(sock, data[sent:])


async def _read_response(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> Response:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await loop.sock_recv(sock, 65536)
        if not chunk:
            raise ValueError(f"connection closed before a whole response ({len(data)} bytes)")
        data += chunk
        if len(data) > MAX_HEADER and b"\r\n\r\n" not in data[:MAX_HEADER]:
            raise ValueError("response header too long")
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP response: {lines[0][:80]!r}")
    status = int(parts[1])
    length: int | None = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    if length is None:
        # CH sends a length with every body; an answer without one has none.
        length = 0 if status in (204, 304) or status < 200 else len(body)
    if length > MAX_RESPONSE:
        raise ValueError(f"response of {length} bytes is larger than {MAX_RESPONSE}")
    while len(body) < length:
        chunk = await loop.sock_recv(sock, min(65536, length - len(body)))
        if not chunk:
            raise ValueError(f"connection closed after {len(body)} of {length} body bytes")
        body += chunk
    return Response(status, body[:length])

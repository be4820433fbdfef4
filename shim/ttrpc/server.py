"""ttrpc server: unary services on Unix sockets, concurrent requests per connection.

Ownership: `serve_unix` owns its accepted connections (a TaskGroup); each
connection owns its in-flight requests (a TaskGroup). `close()` stops the
listeners and cancels connections, which cancels their handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import struct
import types
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path

from shim.errors import Code
from shim.ttrpc.frames import (
    MAX_DATA,
    Flags,
    Frame,
    FrameDecoder,
    MessageType,
    OversizedFrame,
    ProtocolError,
    encode_frame,
)
from shim.ttrpc.messages import Request, Response, decode_request, encode_response
from shim.ttrpc.status import status_for_exception

log = logging.getLogger(__name__)

_READ_CHUNK = 256 * 1024
_UCRED = struct.Struct("3i")
_CLOSE_FLUSH_TIMEOUT = 1.0


@dataclass(frozen=True)
class CallContext:
    service: str
    method: str
    metadata: Mapping[str, tuple[str, ...]]  # keys as sent (ttrpc clients lowercase them)
    deadline: float | None  # event loop time, from Request.timeout_nano


Handler = Callable[[bytes, CallContext], Awaitable[bytes]]


def bind_unix(path: str | Path, mode: int = 0o600) -> socket.socket:
    """A listening Unix socket at `path` with `mode`, set before anyone can connect."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, mode)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def peer_allowed(uid: int, gid: int, *, own_uid: int, own_gid: int) -> bool:
    """containerd's UnixSocketRequireSameUser: the peer's uid and gid must both match."""
    return uid == own_uid and gid == own_gid


class Server:
    def __init__(self, *, require_same_user: bool = True) -> None:
        self._services: dict[str, dict[str, Handler]] = {}
        self._require_same_user = require_same_user
        self._stop = asyncio.Event()
        self._closing = False
        self._serving: set[asyncio.Task[None]] = set()
        self._connections: set[asyncio.Task[None]] = set()

    def register(self, service: str, methods: Mapping[str, Handler]) -> None:
        if service in self._services:
            raise ValueError(f"ttrpc service {service} registered twice")
        self._services[service] = dict(methods)

    async def serve_unix(self, path: str | Path, *, sock: socket.socket | None = None) -> None:
        """Accept connections on `path` (or on the already-listening `sock`) until close().

        The socket file is removed on return if it is still the one we listened on.
        """
        if self._closing:
            raise RuntimeError("ttrpc server is closed")
        listener = sock if sock is not None else bind_unix(path)
        listener.setblocking(False)
        inode = _socket_inode(path)
        me = asyncio.current_task()
        assert me is not None
        self._serving.add(me)
        try:
            async with asyncio.TaskGroup() as tg:
                server = await asyncio.start_unix_server(
                    lambda r, w: self._accept(tg, r, w), sock=listener
                )
                log.info("ttrpc serving socket=%s", path)
                try:
                    await self._stop.wait()
                finally:
                    server.close()
                    if inode is not None and _socket_inode(path) == inode:
                        with contextlib.suppress(OSError):
                            os.unlink(path)
        finally:
            self._serving.discard(me)

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Serve one already-established connection until it ends or the server closes."""
        if self._closing:
            writer.close()
            return
        async with asyncio.TaskGroup() as tg:
            self._start_connection(tg, reader, writer)

    async def close(self) -> None:
        """Stop accepting, cancel in-flight handlers, close connections; waits for all that.

        Do not call this from a handler (it would cancel itself): signal the owner instead.
        """
        self._closing = True
        self._stop.set()
        for task in self._connections:
            task.cancel()
        waiting = self._connections | self._serving
        if waiting:
            await asyncio.wait(waiting)

    def _accept(
        self, tg: asyncio.TaskGroup, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self._closing:
            writer.close()
            return
        if self._require_same_user and not self._check_peer(writer):
            writer.close()
            return
        try:
            self._start_connection(tg, reader, writer)
        except RuntimeError:  # the listener is shutting down
            writer.close()

    def _check_peer(self, writer: asyncio.StreamWriter) -> bool:
        sock = writer.get_extra_info("socket")
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        except OSError as err:
            log.warning("ttrpc refusing connection: SO_PEERCRED failed: %s", err)
            return False
        pid, uid, gid = _UCRED.unpack(raw)
        if peer_allowed(uid, gid, own_uid=os.getuid(), own_gid=os.getgid()):
            return True
        log.warning("ttrpc refusing connection peer_pid=%d peer_uid=%d peer_gid=%d", pid, uid, gid)
        return False

    def _start_connection(
        self, tg: asyncio.TaskGroup, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # Registered at creation, not when it first runs, so that close() also
        # cancels a connection accepted a moment ago.
        task = tg.create_task(self._run_connection(reader, writer))
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)
        # A task cancelled before it ran never reaches its own cleanup.
        task.add_done_callback(lambda _: writer.close())

    async def _run_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            await _Connection(self._services, reader, writer).run()
        except Exception:
            log.exception("ttrpc connection failed")


class _Connection:
    def __init__(
        self,
        services: Mapping[str, Mapping[str, Handler]],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self._services = services
        self._reader = reader
        self._writer = writer
        self._write_lock = asyncio.Lock()
        self._last_stream_id = 0
        self._requests: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                await self._read_loop(tg)
                # The peer is gone or sent garbage: nobody will read the answers.
                for task in self._requests:
                    task.cancel()
        finally:
            await _close_writer(self._writer)

    async def _read_loop(self, tg: asyncio.TaskGroup) -> None:
        decoder = FrameDecoder()
        while True:
            try:
                chunk = await self._reader.read(_READ_CHUNK)
            except OSError as err:
                log.debug("ttrpc connection read failed: %s", err)
                return
            if not chunk:
                return
            try:
                frames = decoder.feed(chunk)
            except ProtocolError as err:
                log.warning("ttrpc closing connection: %s", err)
                return
            for frame in frames:
                self._on_frame(tg, frame)

    def _on_frame(self, tg: asyncio.TaskGroup, frame: Frame | OversizedFrame) -> None:
        sid = frame.stream_id
        if isinstance(frame, OversizedFrame):
            self._answer_error(
                tg,
                sid,
                Code.RESOURCE_EXHAUSTED,
                f"message length {frame.length} exceeds maximum message size of {MAX_DATA}",
            )
            return
        if frame.type is not MessageType.REQUEST:
            # No stream is ever left open (streaming is refused), so Data frames
            # have nowhere to go; Responses are not for a server.
            log.debug("ttrpc server ignores type=%s stream=%d", frame.type.name, sid)
            return
        if sid % 2 != 1:
            self._answer_error(
                tg, sid, Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams"
            )
            return
        if sid <= self._last_stream_id:
            self._answer_error(
                tg, sid, Code.INVALID_ARGUMENT, "StreamID cannot be re-used and must increment"
            )
            return
        self._last_stream_id = sid
        if frame.flags & Flags.REMOTE_OPEN:
            self._answer_error(tg, sid, Code.UNIMPLEMENTED, "streaming requests are not supported")
            return
        try:
            req = decode_request(frame.data)
        except ProtocolError as err:
            self._answer_error(tg, sid, Code.INVALID_ARGUMENT, f"unmarshal request error: {err}")
            return
        methods = self._services.get(req.service)
        if methods is None:
            self._answer_error(tg, sid, Code.UNIMPLEMENTED, f"service {req.service}")
            return
        handler = methods.get(req.method)
        if handler is None:
            self._answer_error(tg, sid, Code.UNIMPLEMENTED, f"method {req.method}")
            return
        self._spawn(tg, self._handle(sid, req, handler))

    def _answer_error(self, tg: asyncio.TaskGroup, sid: int, code: Code, message: str) -> None:
        log.debug("ttrpc error answer stream=%d code=%s message=%r", sid, code.name, message)
        self._spawn(tg, self._respond(sid, Response(code=code, message=message)))

    def _spawn(self, tg: asyncio.TaskGroup, work: Coroutine[None, None, None]) -> None:
        task = tg.create_task(work)
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)

    async def _handle(self, sid: int, req: Request, handler: Handler) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + req.timeout_nano / 1e9 if req.timeout_nano > 0 else None
        md: dict[str, list[str]] = {}
        for key, value in req.metadata:
            md.setdefault(key, []).append(value)
        ctx = CallContext(
            service=req.service,
            method=req.method,
            metadata=types.MappingProxyType({k: tuple(v) for k, v in md.items()}),
            deadline=deadline,
        )
        resp: Response
        try:
            async with asyncio.timeout_at(deadline) as scope:
                payload = await handler(req.payload, ctx)
            if not isinstance(payload, bytes | bytearray):
                raise TypeError(f"handler returned {type(payload).__name__}, not bytes")
            resp = Response(payload=bytes(payload))
        except TimeoutError as err:
            if scope.expired():
                resp = Response(Code.DEADLINE_EXCEEDED, "context deadline exceeded")
            else:
                resp = self._error_response(req, err)
        except Exception as err:
            resp = self._error_response(req, err)
        await self._respond(sid, resp)

    @staticmethod
    def _error_response(req: Request, err: Exception) -> Response:
        code, message = status_for_exception(err)
        if code is Code.INTERNAL:
            log.error(
                "ttrpc handler failed service=%s method=%s",
                req.service,
                req.method,
                exc_info=err,
            )
        # Messages built from OS errors may carry surrogate escapes, which
        # protobuf refuses to encode.
        return Response(code=code, message=message.encode("utf-8", "backslashreplace").decode())

    async def _respond(self, sid: int, resp: Response) -> None:
        body = encode_response(resp)
        if len(body) > MAX_DATA:
            body = encode_response(
                Response(
                    Code.RESOURCE_EXHAUSTED,
                    f"response is {len(body)} bytes, more than {MAX_DATA}",
                )
            )
        frame = encode_frame(sid, MessageType.RESPONSE, body)
        async with self._write_lock:
            if self._writer.is_closing():
                return
            try:
                self._writer.write(frame)
                await self._writer.drain()
            except OSError as err:
                log.debug("ttrpc send failed stream=%d: %s", sid, err)


async def _close_writer(writer: asyncio.StreamWriter) -> None:
    """Close and wait for it, so the transport is gone before our owner returns;
    abort if a peer that reads nothing keeps the write buffer from flushing."""
    writer.close()
    try:
        async with asyncio.timeout(_CLOSE_FLUSH_TIMEOUT):
            await writer.wait_closed()
    except TimeoutError:
        writer.transport.abort()
    except OSError:
        pass


def _socket_inode(path: str | Path) -> int | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino if stat.S_ISSOCK(st.st_mode) else None

"""ttrpc client: unary calls multiplexed over one stream connection."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from shim.errors import DeadlineExceeded, ResourceExhausted, ShimError, Unavailable
from shim.ttrpc.frames import (
    MAX_DATA,
    MAX_STREAM_ID,
    Frame,
    FrameDecoder,
    MessageType,
    OversizedFrame,
    ProtocolError,
    encode_frame,
)
from shim.ttrpc.messages import Request, decode_response, encode_request
from shim.ttrpc.status import TtrpcError, error_for_status

log = logging.getLogger(__name__)

_READ_CHUNK = 256 * 1024
_CLOSE_FLUSH_TIMEOUT = 1.0


class Client:
    """One ttrpc connection. Calls may run concurrently; replies are matched by stream id.

    The client owns a reader task started here (so construct it inside a running
    loop) and stopped by `close()`. Once the connection is lost every pending and
    later call raises Unavailable.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._next_id = 1
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._write_lock = asyncio.Lock()
        self._lost: str | None = None
        self._gone = asyncio.Event()
        self._read_task = asyncio.get_running_loop().create_task(
            self._read_loop(), name="ttrpc-client-reader"
        )

    @classmethod
    async def connect_unix(cls, path: str | Path) -> Client:
        try:
            reader, writer = await asyncio.open_unix_connection(str(path))
        except OSError as err:
            raise Unavailable(f"connect ttrpc socket {path}: {err.strerror or err}") from err
        return cls(reader, writer)

    @property
    def closed(self) -> bool:
        """True once the connection is gone (lost or closed)."""
        return self._lost is not None

    async def wait_closed(self) -> None:
        """Return when the connection is gone, e.g. because the peer went away."""
        await self._gone.wait()

    async def call(
        self,
        service: str,
        method: str,
        payload: bytes,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
        grace: float = 0.0,
    ) -> bytes:
        """Send one request and return the reply payload.

        `timeout` goes to the server as the request's deadline and bounds the
        local wait, extended by `grace` so that a reply the server sends right at
        its deadline is still received (long polls must not lose data that way).
        Raises a ShimError subclass for a non-OK status (its cause a TtrpcError),
        Unavailable when the connection is gone, DeadlineExceeded on timeout.
        """
        what = f"{service}/{method}"
        if self._lost is not None:
            raise Unavailable(f"ttrpc {what}: {self._lost}")
        timeout_nano = 0
        if timeout is not None:
            if timeout <= 0:
                raise DeadlineExceeded(f"ttrpc {what}: deadline already passed")
            timeout_nano = max(1, int(timeout * 1e9))
        md = tuple((k.lower(), v) for k, v in (metadata or {}).items())
        body = encode_request(Request(service, method, payload, timeout_nano, md))
        if len(body) > MAX_DATA:
            raise ResourceExhausted(
                f"ttrpc {what}: request is {len(body)} bytes, more than {MAX_DATA}"
            )
        stream_id = self._next_id
        if stream_id > MAX_STREAM_ID:
            raise Unavailable(f"ttrpc {what}: stream ids exhausted on this connection")
        self._next_id += 2
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[stream_id] = fut
        local = None if timeout is None else timeout + grace
        try:
            async with asyncio.timeout(local) as scope:
                await self._send(encode_frame(stream_id, MessageType.REQUEST, body), what)
                return await fut
        except TimeoutError:
            if scope.expired():
                raise DeadlineExceeded(f"ttrpc {what}: no reply within {timeout}s") from None
            raise
        finally:
            self._pending.pop(stream_id, None)
            if fut.done() and not fut.cancelled():
                fut.exception()  # a reply that lost the race with the timeout: mark it seen

    async def close(self) -> None:
        if self._lost is None:
            self._lost = "client closed"
        self._gone.set()
        self._read_task.cancel()
        await asyncio.wait([self._read_task])  # unlike awaiting it, keeps our own cancellation
        self._fail_pending()
        self._writer.close()
        try:
            async with asyncio.timeout(_CLOSE_FLUSH_TIMEOUT):
                await self._writer.wait_closed()
        except TimeoutError:  # a peer that reads nothing keeps the buffer from flushing
            self._writer.transport.abort()
        except OSError:
            pass

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _send(self, frame: bytes, what: str) -> None:
        async with self._write_lock:
            if self._lost is not None:
                raise Unavailable(f"ttrpc {what}: {self._lost}")
            try:
                self._writer.write(frame)
                await self._writer.drain()
            except OSError as err:
                raise Unavailable(f"ttrpc {what}: send failed: {err}") from err

    async def _read_loop(self) -> None:
        decoder = FrameDecoder()
        reason = "connection closed by peer"
        try:
            while True:
                chunk = await self._reader.read(_READ_CHUNK)
                if not chunk:
                    break
                for frame in decoder.feed(chunk):
                    self._dispatch(frame)
        except ProtocolError as err:
            reason = f"protocol error from peer: {err}"
        except OSError as err:
            reason = f"connection lost: {err}"
        finally:
            if self._lost is None:
                self._lost = reason
            self._gone.set()
            self._fail_pending()
        log.debug("ttrpc client connection ended reason=%r", self._lost)
        self._writer.close()

    def _dispatch(self, frame: Frame | OversizedFrame) -> None:
        if frame.type is not MessageType.RESPONSE:
            # Server-initiated streams and Data frames belong to streaming calls,
            # which this client never opens.
            log.debug("ttrpc client ignores type=%s stream=%d", frame.type.name, frame.stream_id)
            return
        fut = self._pending.get(frame.stream_id)
        if fut is None or fut.done():
            log.debug("ttrpc reply for no pending call stream=%d", frame.stream_id)
            return
        if isinstance(frame, OversizedFrame):
            fut.set_exception(
                ResourceExhausted(f"ttrpc reply is {frame.length} bytes, more than {MAX_DATA}")
            )
            return
        try:
            resp = decode_response(frame.data)
        except ProtocolError as err:
            fut.set_exception(Unavailable(f"ttrpc reply undecodable: {err}"))
            return
        if resp.code == 0:
            fut.set_result(resp.payload)
            return
        error: ShimError = error_for_status(resp.code, resp.message)
        error.__cause__ = TtrpcError(resp.code, resp.message)
        fut.set_exception(error)

    def _fail_pending(self) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(Unavailable(f"ttrpc call failed: {self._lost}"))

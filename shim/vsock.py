"""Host side of hybrid vsock: a Unix socket that forwards to a guest vsock port.

Cloud Hypervisor and vhost-device-vsock speak the same line protocol: the host
connects, sends `CONNECT <port>\\n` and gets `OK <host port>\\n`, after which the
connection is a raw byte stream to the guest. While nothing listens on the
guest port yet (the guest is booting) the backend just closes the connection,
so the only sensible reaction is to retry until a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from pathlib import Path

from shim.errors import Unavailable

_OK = re.compile(rb"OK \d+\n\Z")


async def connect_hybrid_vsock(
    socket_path: Path,
    port: int,
    *,
    deadline: float,
    retry_interval: float = 0.02,
    attempt_timeout: float = 1.0,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a stream to guest `port`; `deadline` is in event-loop time (loop.time()).

    Retries on a missing socket, a refused connection, EOF before the reply, an
    unexpected reply, or no reply within `attempt_timeout`; raises Unavailable
    naming the socket and the port once the deadline has passed.

    A listening guest answers in milliseconds. The per-attempt limit matters while
    the guest boots: vhost-device-vsock can take a CONNECT made before the guest's
    vsock driver is up and then never answer it (seen once in ~50 TCG boots), so
    waiting on that one attempt until the deadline would fail the whole boot.
    """
    loop = asyncio.get_running_loop()
    last = "no attempt made"
    attempts = 0
    while True:
        if loop.time() >= deadline:
            raise Unavailable(
                f"hybrid vsock {socket_path} port {port}: not connected after "
                f"{attempts} attempts: {last}"
            )
        attempts += 1
        try:
            async with asyncio.timeout_at(min(deadline, loop.time() + attempt_timeout)):
                reply, streams = await _attempt(socket_path, port)
        except TimeoutError:
            last = f"no reply within {attempt_timeout:g} s"
            continue
        except OSError as err:
            last = err.strerror or str(err)
        else:
            if streams is not None:
                return streams
            last = f"unexpected reply {reply!r}" if reply else "closed before replying"
        delay = min(retry_interval, deadline - loop.time())
        if delay > 0:
            await asyncio.sleep(delay)


async def _attempt(
    socket_path: Path, port: int
) -> tuple[bytes, tuple[asyncio.StreamReader, asyncio.StreamWriter] | None]:
    """One CONNECT exchange: the reply line, and the streams if it was OK."""
    reader, writer = await asyncio.open_unix_connection(str(socket_path))
    ok = False
    try:
        writer.write(b"CONNECT %d\n" % port)
        await writer.drain()
        try:
            # Anything after the newline already belongs to the guest stream and
            # stays buffered in `reader` for the caller.
            line = await reader.readline()
        except ValueError:  # no newline within the reader's limit
            line = b"<overlong reply>"
        ok = _OK.match(line) is not None
        return line, ((reader, writer) if ok else None)
    finally:
        if not ok:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

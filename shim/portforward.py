"""Port-forward: loopback TCP in the pod's netns, relayed to the guest's loopback.

containerd serves CRI PortForward itself: it enters the pod's network namespace
and dials `localhost:PORT` there. With every frame of the pod's interfaces
redirected into the VM nothing listens on that namespace's loopback, so the
shim makes the loopback lead into the guest:

- a listener of the shim's in the pod's namespace, on 127.0.0.1:P and [::1]:P
  (P chosen by the kernel);
- an nftables table `cloudhv` there (pyroute2, no `nft` binary): a nat chain on
  the output hook redirects every TCP connection to 127.0.0.0/8 or ::1, any
  port, to P;
- per accepted connection, the original port (`SO_ORIGINAL_DST`, which the
  redirect's conntrack entry keeps) goes to the agent over a vsock stream of
  its own (port 1025, protocol in proto/agent.proto), and the agent dials
  localhost:PORT in the guest.

Why this way: it works for any port without knowing them in advance, on both
loopbacks, and captures nothing else. The rule lives in the pod's namespace,
where only containerd's port-forward dials loopback: the VMM and the shim are
in the host's namespace (the shim's listener is in the pod's, but it never
dials), and the pod's own processes are in the guest. A connection to P itself
is redirected to P unchanged, and relayed like any other. One vsock stream per
connection keeps connections independent: no head-of-line blocking, and each
back-pressures on its own. No buffer grows: a side is read only while the other
takes the bytes (StreamReader limits, drain()). A connection the guest refuses
is reset at once, which containerd reports on the forward's error stream.

A resource (shim/resource.py), recorded before the table exists; undone by
closing the listener and deleting the table; `undo_host` deletes the table
from the record alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from shim.background import Background
from shim.errors import Unavailable
from shim.netns import NetnsGone, in_netns, run_in_netns
from shim.resource import PodServices, Undo, step
from shim.state import ResourceRecord

log = logging.getLogger(__name__)

KIND = "portfwd"
RECORD_ID = "port-forward"
RELAY_PORT = 1025  # agent/src/relay.h
TABLE = "cloudhv"
CHAIN = "portfwd"
NFPROTO_INET = 1
NAT_DSTNAT_PRIORITY = -100
SO_ORIGINAL_DST = 80  # also IP6T_SO_ORIGINAL_DST
FRAME_DATA = 1
FRAME_EOF = 2
FRAME_MAX = 16384
OPEN_TIMEOUT_S = 10.0
MAX_OPEN_REPLY = 1024

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
DialRelay = Callable[[], Awaitable[Streams]]  # a new vsock stream to the agent's relay port


class RelayRefused(Unavailable):
    """The agent could not connect to the port in the guest; the message says why."""


class PortForward:
    """The pod netns' loopback redirect and the relays behind it."""

    def __init__(self, netns: str, dial: DialRelay) -> None:
        self.netns = netns
        self._dial = dial
        self._undo = Undo("port forward")
        self._servers: list[asyncio.Server] = []
        self._relays = Background("port-forward")
        self.port = 0

    @property
    def record(self) -> ResourceRecord:
        return ResourceRecord(KIND, RECORD_ID, "", {"netns": self.netns, "table": TABLE})

    async def attach(self, pod: PodServices) -> None:
        undo = self._undo
        try:
            await step("port-forward record", pod.record(self.record))
            undo.push("forget port-forward record", lambda: self._forget(pod), host=True)
            undo.push("remove the redirect", self._remove_host, host=True)
            listeners = await step("port-forward redirect", in_netns(self.netns, _setup))
            undo.push("close the listeners", self._close)
            self.port = listeners[0].getsockname()[1]
            for listener in listeners:
                self._servers.append(await asyncio.start_server(self._serve, sock=listener))
        except BaseException:
            await undo.unwind()
            raise
        log.info("event=port_forward_ready netns=%s listener_port=%d", self.netns, self.port)

    async def detach(self, pod: PodServices) -> None:
        await self._undo.unwind()

    async def _close(self) -> None:
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        await self._relays.aclose()
        for server in servers:
            await server.wait_closed()

    async def _remove_host(self) -> None:
        await asyncio.to_thread(undo_host, self.record)

    async def _forget(self, pod: PodServices) -> None:
        if self._undo.clean:
            await pod.forget(RECORD_ID)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The relay belongs to the Background, not to asyncio's server: detach then
        # cancels and awaits every live connection.
        self._relays.spawn(self._relay(reader, writer), "relay")

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        try:
            ipv6 = sock.family == socket.AF_INET6
            port = original_port(sock)
            what = f"{'[::1]' if ipv6 else '127.0.0.1'}:{port}"
            try:
                async with asyncio.timeout(OPEN_TIMEOUT_S):
                    guest = await open_relay(self._dial, port, ipv6)
            except (RelayRefused, Unavailable, TimeoutError, OSError) as err:
                log.info("event=port_forward_refused to=%s error=%r", what, str(err))
                _reset(writer)
                return
            await pump(reader, writer, *guest, what=what)
        except BaseException:
            _reset(writer)
            raise


async def open_relay(dial: DialRelay, port: int, ipv6: bool) -> Streams:
    """A relay stream to localhost:`port` in the guest; RelayRefused if it cannot connect."""
    from shim._pb import agent_pb2

    _pb: Any = agent_pb2
    reader, writer = await dial()
    try:
        request = _pb.RelayOpenRequest(port=port, ipv6=ipv6).SerializeToString()
        writer.write(struct.pack(">I", len(request)) + request)
        await writer.drain()
        (length,) = struct.unpack(">I", await reader.readexactly(4))
        if length > MAX_OPEN_REPLY:
            raise Unavailable(f"relay to port {port}: a {length}-byte open reply")
        reply = _pb.RelayOpenResponse()
        reply.ParseFromString(await reader.readexactly(length))
        if reply.code:
            raise RelayRefused(str(reply.message) or f"relay to port {port}: code {reply.code}")
    except BaseException as err:
        writer.close()
        if isinstance(err, asyncio.IncompleteReadError):
            raise Unavailable(f"relay to port {port}: the agent closed the stream") from err
        raise
    return reader, writer


async def pump(
    client_r: asyncio.StreamReader,
    client_w: asyncio.StreamWriter,
    guest_r: asyncio.StreamReader,
    guest_w: asyncio.StreamWriter,
    *,
    what: str = "",
) -> None:
    """Both directions until both have ended (half-close passes through as an EOF
    frame); any failure resets the client and drops the stream, which the agent
    turns into a reset of the guest's connection."""
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(_to_guest(client_r, guest_w))
            group.create_task(_to_client(guest_r, client_w))
    except* (OSError, asyncio.IncompleteReadError, ValueError) as failed:
        log.debug("event=port_forward_aborted to=%s error=%r", what, str(failed.exceptions[0]))
        _reset(client_w)
    else:
        client_w.close()
    finally:
        guest_w.close()
        with contextlib.suppress(OSError):
            await guest_w.wait_closed()


async def _to_guest(client: asyncio.StreamReader, guest: asyncio.StreamWriter) -> None:
    while True:
        data = await client.read(FRAME_MAX)
        if not data:
            guest.write(struct.pack(">BBH", FRAME_EOF, 0, 0))
            await guest.drain()
            return
        guest.write(struct.pack(">BBH", FRAME_DATA, 0, len(data)) + data)
        await guest.drain()


async def _to_client(guest: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
    while True:
        kind, _, length = struct.unpack(">BBH", await guest.readexactly(4))
        if kind == FRAME_EOF and length == 0:
            if client.can_write_eof():
                client.write_eof()
            await client.drain()
            return
        if kind != FRAME_DATA or not 0 < length <= FRAME_MAX:
            raise ValueError(f"bad relay frame: type {kind}, {length} bytes")
        client.write(await guest.readexactly(length))
        await client.drain()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a reset: the dialler sees the connection broken, not ended."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def original_port(sock: socket.socket) -> int:
    """The port a redirected connection was dialled to (its conntrack entry's)."""
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
    else:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port: int = struct.unpack_from(">H", raw, 2)[0]
    return port


# -- Inside the pod's namespace (blocking; run through shim/netns.py) ----------------------


def _setup() -> list[socket.socket]:
    listeners = _listen()
    try:
        _add_table(listeners[0].getsockname()[1])
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    return listeners


def _listen() -> list[socket.socket]:
    """Listeners on 127.0.0.1:P and, where the namespace has IPv6, [::1]:P."""
    for _ in range(16):
        v4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        v4.bind(("127.0.0.1", 0))
        v4.listen(128)
        port = v4.getsockname()[1]
        v6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            v6.bind(("::1", port))
        except OSError as err:
            v6.close()
            if err.errno == errno.EADDRINUSE:
                v4.close()
                continue
            if err.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                return [v4]  # no IPv6 loopback in this namespace
            v4.close()
            raise
        v6.listen(128)
        return [v4, v6]
    raise OSError(errno.EADDRINUSE, "no port free on both loopbacks for the port-forward listener")


def _expressions(port: int) -> list[list[Any]]:
    from pyroute2.nftables.expressions import genex

    def data(value: bytes) -> dict[str, Any]:
        return {"attrs": [("NFTA_DATA_VALUE", value)]}

    def meta(key: int) -> Any:  # NFT_META_NFPROTO 15, NFT_META_L4PROTO 16
        return genex("meta", {"dreg": 1, "key": key})

    def equal(value: bytes) -> Any:
        return genex("cmp", {"sreg": 1, "op": 0, "data": data(value)})

    def network(offset: int, length: int) -> Any:
        return genex("payload", {"dreg": 1, "base": 1, "offset": offset, "len": length})

    redirect = [
        genex("immediate", {"dreg": 1, "data": data(struct.pack(">H", port))}),
        genex("redir", {"reg_proto_min": 1, "flags": {"NF_NAT_RANGE_PROTO_SPECIFIED"}}),
    ]
    tcp = [meta(16), equal(bytes([socket.IPPROTO_TCP]))]
    ipv4 = [
        meta(15), equal(bytes([socket.AF_INET])), *tcp,
        network(16, 4),  # daddr, masked to 127.0.0.0/8
        genex("bitwise", {"sreg": 1, "dreg": 1, "len": 4,
                          "mask": data(b"\xff\0\0\0"), "xor": data(b"\0\0\0\0")}),
        equal(b"\x7f\0\0\0"),
        *redirect,
    ]
    ipv6 = [
        meta(15), equal(bytes([10])), *tcp,  # NFPROTO_IPV6
        network(24, 16), equal(socket.inet_pton(socket.AF_INET6, "::1")),
        *redirect,
    ]
    return [ipv4, ipv6]


def _add_table(port: int) -> None:
    from pyroute2.nftables.main import NFTables

    nft = NFTables(nfgen_family=NFPROTO_INET)
    try:
        nft.table("add", name=TABLE)
        nft.chain("add", table=TABLE, name=CHAIN, hook="output", type="nat",
                  priority=NAT_DSTNAT_PRIORITY)
        for rule in _expressions(port):
            nft.rule("add", table=TABLE, chain=CHAIN, expressions=[rule])
    finally:
        nft.close()


def _delete_table() -> list[str]:
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.nftables.main import NFTables

    nft = NFTables(nfgen_family=NFPROTO_INET)
    try:
        nft.table("del", name=TABLE)
    except NetlinkError as err:
        if err.code == errno.ENOENT:
            return []
        raise OSError(err.code, f"delete nftables table inet {TABLE}: {err}") from err
    finally:
        nft.close()
    return [f"removed nftables table inet {TABLE}"]


def undo_host(record: ResourceRecord) -> list[str]:
    """Delete the redirect table from the pod's netns, from the record alone."""
    netns = record.host.get("netns", "")
    if not netns:
        return []
    try:
        return run_in_netns(netns, _delete_table)
    except NetnsGone:
        return []


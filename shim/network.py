"""The pod network: CNI's interfaces carried into the VM through TAPs and tc redirects.

containerd runs CNI before the sandbox task exists: the pod's network namespace
(named in the sandbox spec) then holds one link per CNI interface (a veth,
usually), with the pod's addresses and routes. The VMM does not live in that
namespace. For each interface the shim, inside the namespace (shim/netns.py,
pyroute2 only):

- makes a TAP (`tap<n>_chv`) with the link's MTU, and hands its file descriptor
  to the VMM, which hot-adds a virtio-net NIC with the link's MAC;
- adds an ingress qdisc to both, and a u32 match-all filter with a `mirred
  egress redirect` action from each to the other (Kata's tcfilter mode), so
  every frame CNI's side sends to the link comes out of the TAP into the guest,
  and every frame the guest sends leaves through the link, untouched.

The agent then gives the guest NIC the link's name, MTU and addresses, adds the
routes (both families, the kernel's own prefix routes aside), and the pod's
/etc/hosts and /etc/resolv.conf go to `/run/cloudhv/` in the guest, where every
container's mount of containerd's copy is pointed (shim/cri_mounts.py).

DNS reaches the shim as containerd writes it: the sandbox spec bind-mounts the
pod's resolv.conf (rendered from CRI's DNSConfig, else the node's), and its
directory also holds containerd's hosts file (the node's). The guest gets the
resolv.conf as it is, and that hosts file with one line per pod address naming
the pod's hostname, as kubelet's own hosts file has.

A resource (shim/resource.py): recorded (namespace, links, TAPs, whether the
ingress qdisc was the shim's) before anything is made; undone in reverse; and
`undo_host(record)` removes TAPs, filters and qdiscs from the record alone.
A TAP closes with the last descriptor (QEMU's), so a killed VM takes its TAPs
along; the filters on CNI's links are what crash cleanup is for.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import json
import logging
import os
import socket
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shim.devices import device_id
from shim.errors import Internal, InvalidArgument, Unavailable
from shim.netns import NetnsGone, in_netns, run_in_netns
from shim.resource import PodServices, Undo, step
from shim.state import ResourceRecord
from shim.types import IpInterface, Route
from shim.vmm.base import NetSpec

if TYPE_CHECKING:
    from shim.agent import AgentClient

log = logging.getLogger(__name__)

KIND = "net"
RECORD_ID = "pod-network"
TAP_NAME = "tap{}_chv"
FILTER_PRIO = 0x4348  # our filters' preference on a link's ingress; nobody else's
NIC_WAIT_S = 10.0  # how long the agent waits for a hot-plugged NIC to show up
GUEST_HOSTS = "/run/cloudhv/hosts"
GUEST_RESOLV = "/run/cloudhv/resolv.conf"
MAX_POD_FILE = 64 * 1024

ETH_P_ALL = 0x0003
ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772
RT_TABLE_MAIN = 254
RTN_UNICAST = 1
RTPROT_KERNEL = 2
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000


# -- What the namespace holds (plain data, read by `inspect`) ------------------------------


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    kind: str  # IFLA_INFO_KIND: "veth", "tun", ...; "" when the kernel gives none
    mac: str
    mtu: int
    arp_type: int
    has_ingress: bool  # an ingress qdisc is there already


@dataclass(frozen=True)
class Address:
    index: int
    interface: IpInterface
    scope: int


@dataclass(frozen=True)
class RouteEntry:
    family: int
    destination: str  # CIDR
    gateway: str
    oif: int
    metric: int
    scope: int
    proto: int
    table: int
    type: int
    source: str
    multipath: bool = False


@dataclass(frozen=True)
class NetnsView:
    links: tuple[Link, ...]
    addresses: tuple[Address, ...]
    routes: tuple[RouteEntry, ...]


# -- What the pod's VM gets (decided from a view, no I/O) ----------------------------------


@dataclass(frozen=True)
class Interface:
    """One CNI interface, as the guest gets it: same name, MAC, MTU and addresses."""

    name: str
    mac: str
    mtu: int
    addresses: tuple[IpInterface, ...]
    tap: str  # the TAP that carries it
    new_qdisc: bool  # the link's ingress qdisc is the shim's to remove

    @property
    def device_id(self) -> str:
        return device_id("net", self.name)


@dataclass(frozen=True)
class NetworkPlan:
    interfaces: tuple[Interface, ...]
    routes: tuple[Route, ...]
    skipped: tuple[str, ...] = ()  # for the log: what the guest does not get, and why


def plan(view: NetnsView) -> NetworkPlan:
    """Which links become guest NICs, with which addresses and routes.

    Every Ethernet link but the shim's own TAPs is a CNI interface. An address
    of global scope goes along (link-local ones the guest makes itself from the
    same MAC). A route of the main table goes along unless the kernel made it
    from an address (it will make it again in the guest), it leaves through a
    link that is not a guest NIC, or it has several next hops; routes without a
    gateway come first, so that every gateway is reachable when its route is added.
    """
    interfaces: list[Interface] = []
    by_index: dict[int, str] = {}
    skipped: list[str] = []
    for link in sorted(view.links, key=lambda item: item.index):
        if link.arp_type != ARPHRD_ETHER or link.kind == "tun" or not link.mac:
            continue
        addresses = tuple(
            a.interface
            for a in view.addresses
            if a.index == link.index and a.scope == RT_SCOPE_UNIVERSE
        )
        interfaces.append(
            Interface(
                name=link.name,
                mac=link.mac,
                mtu=link.mtu,
                addresses=addresses,
                tap=TAP_NAME.format(len(interfaces)),
                new_qdisc=not link.has_ingress,
            )
        )
        by_index[link.index] = link.name
    routes: list[Route] = []
    for entry in view.routes:
        if entry.table != RT_TABLE_MAIN or entry.type != RTN_UNICAST:
            continue
        if entry.proto == RTPROT_KERNEL:
            continue
        if entry.multipath:
            skipped.append(f"route {entry.destination}: several next hops")
            continue
        device = by_index.get(entry.oif)
        if device is None:
            skipped.append(f"route {entry.destination}: leaves through link {entry.oif}, no NIC")
            continue
        routes.append(
            Route(
                destination=entry.destination,
                gateway=entry.gateway,
                device=device,
                metric=entry.metric,
                scope=entry.scope,
                source=entry.source,
            )
        )
    routes.sort(key=lambda r: bool(r.gateway))  # stable: CNI's order otherwise
    return NetworkPlan(tuple(interfaces), tuple(routes), tuple(skipped))


def hosts_file(base: bytes, hostname: str, addresses: Sequence[IpInterface]) -> bytes:
    """containerd's hosts file (the node's, or localhost only) plus the pod's addresses."""
    if not base.strip():
        base = b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    if not base.endswith(b"\n"):
        base += b"\n"
    if not hostname:
        return base
    lines = [f"{a.ip}\t{hostname}\n" for a in addresses]
    return base + "".join(lines).encode()


def host_record(netns: str, interfaces: Sequence[Interface]) -> ResourceRecord:
    links = [
        {"link": i.name, "tap": i.tap, "new_qdisc": i.new_qdisc} for i in interfaces
    ]
    return ResourceRecord(KIND, RECORD_ID, "", {"netns": netns, "links": json.dumps(links)})


# -- The resource ---------------------------------------------------------------------------


class PodNetwork:
    """The pod's CNI interfaces, from the pod's netns to configured guest NICs, and back."""

    def __init__(
        self,
        netns: str,
        hostname: str,
        *,
        resolv_conf: str = "",
    ) -> None:
        self.netns = netns
        self._hostname = hostname
        self._resolv_conf = resolv_conf
        self._undo = Undo("pod network")
        self.plan: NetworkPlan | None = None
        self.pod_files: dict[str, str] = {}  # containerd's file -> the guest's

    @property
    def addresses(self) -> tuple[IpInterface, ...]:
        if self.plan is None:
            return ()
        return tuple(a for i in self.plan.interfaces for a in i.addresses)

    async def attach(self, pod: PodServices) -> None:
        """Inspect, record, make TAPs and filters, plug the NICs, configure the guest."""
        undo = self._undo
        try:
            view = await step("inspect netns", in_netns(self.netns, inspect))
            netplan = self.plan = plan(view)
            for why in netplan.skipped:
                log.info("event=network_skipped netns=%s what=%r", self.netns, why)
            record = host_record(self.netns, netplan.interfaces)
            await step("network record", pod.record(record))
            undo.push("forget network record", lambda: self._forget(pod), host=True)
            undo.push("remove TAPs and filters", lambda: self._remove_host(record), host=True)
            taps = await step(
                "TAPs and filters",
                in_netns(self.netns, lambda: create_taps(netplan.interfaces)),
            )
            try:
                # One NIC at a time, configured before the next is plugged: the guest
                # names a new NIC after the lowest free ethN, which a rename to CNI's
                # name has freed or not taken, so renames never collide.
                for interface, fd in zip(netplan.interfaces, taps, strict=True):
                    await self._plug(pod, interface, fd)
                    await step(
                        f"guest NIC {interface.name}",
                        _agent(pod, "guest NIC").update_interface(
                            interface.mac,
                            name=interface.name,
                            mtu=interface.mtu,
                            addresses=interface.addresses,
                            wait=NIC_WAIT_S,
                        ),
                    )
            finally:
                for fd in taps:
                    os.close(fd)  # QEMU holds its own: the TAP lives as long as the NIC
            if netplan.routes:
                agent = _agent(pod, "guest routes")
                await step("guest routes", agent.update_routes(netplan.routes))
            await step("pod files", self._pod_files(pod))
        except BaseException:
            await undo.unwind()
            raise
        log.info(
            "event=network_ready netns=%s nics=%s routes=%d",
            self.netns,
            ",".join(f"{i.name}:{i.mac}:{'+'.join(map(str, i.addresses))}"
                     for i in netplan.interfaces) or "-",
            len(netplan.routes),
        )

    async def detach(self, pod: PodServices) -> None:
        """Undo everything attach did, in reverse. Idempotent."""
        await self._undo.unwind()

    async def _plug(self, pod: PodServices, interface: Interface, fd: int) -> None:
        devices = pod.live_devices()
        if devices is None:
            raise Unavailable(f"plug {interface.name}: the VM is not running")
        net = NetSpec(id=interface.device_id, tap_fd=fd, mac=interface.mac, mtu=interface.mtu)
        await step(f"plug {interface.name}", devices.add_net(net))
        self._undo.push(f"unplug {interface.name}", lambda: self._unplug(pod, net.id))

    async def _unplug(self, pod: PodServices, net_id: str) -> None:
        devices = pod.live_devices()
        if devices is not None:
            await devices.remove(net_id)

    async def _pod_files(self, pod: PodServices) -> None:
        """The pod's resolv.conf and hosts in the guest, from containerd's files."""
        if not self._resolv_conf:
            return
        resolv = await _read_small(self._resolv_conf)
        base_hosts = b""
        hosts_path = str(Path(self._resolv_conf).with_name("hosts"))
        with contextlib.suppress(FileNotFoundError):
            base_hosts = await _read_small(hosts_path)
        agent = _agent(pod, "pod files")
        await agent.copy_file(GUEST_RESOLV, resolv, mode=0o644)
        await agent.copy_file(
            GUEST_HOSTS, hosts_file(base_hosts, self._hostname, self.addresses), mode=0o644
        )
        self.pod_files = {self._resolv_conf: GUEST_RESOLV, hosts_path: GUEST_HOSTS}

    async def _remove_host(self, record: ResourceRecord) -> None:
        done = await asyncio.to_thread(undo_host, record)
        for line in done:
            log.debug("event=network_undone what=%r", line)

    async def _forget(self, pod: PodServices) -> None:
        if self._undo.clean:
            await pod.forget(RECORD_ID)


def _agent(pod: PodServices, what: str) -> AgentClient:
    agent = pod.live_agent()
    if agent is None:
        raise Unavailable(f"{what}: the VM is not running")
    return agent


async def _read_small(path: str) -> bytes:
    return await asyncio.to_thread(_read_bounded, path)


def _read_bounded(path: str) -> bytes:
    with open(path, "rb") as file:
        data = file.read(MAX_POD_FILE + 1)
    if len(data) > MAX_POD_FILE:
        raise InvalidArgument(f"{path}: larger than {MAX_POD_FILE} bytes")
    return data


# -- Inside the pod's namespace (blocking; run through shim/netns.py) ----------------------


def inspect() -> NetnsView:
    """Links, addresses and routes of the calling thread's network namespace."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        ingress = {
            int(q["index"]) for q in ipr.get_qdiscs() if q.get_attr("TCA_KIND") == "ingress"
        }
        links = tuple(
            Link(
                index=int(msg["index"]),
                name=str(msg.get_attr("IFLA_IFNAME")),
                kind=_link_kind(msg),
                mac=str(msg.get_attr("IFLA_ADDRESS") or ""),
                mtu=int(msg.get_attr("IFLA_MTU") or 1500),
                arp_type=int(msg["ifi_type"]),
                has_ingress=int(msg["index"]) in ingress,
            )
            for msg in ipr.get_links()
        )
        addresses = tuple(
            Address(
                index=int(msg["index"]),
                interface=ipaddress.ip_interface(
                    f"{msg.get_attr('IFA_LOCAL') or msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}"
                ),
                scope=int(msg["scope"]),
            )
            for msg in ipr.get_addr()
            if msg["family"] in (socket.AF_INET, socket.AF_INET6)
        )
        routes = tuple(
            _route(msg)
            for family in (socket.AF_INET, socket.AF_INET6)
            for msg in ipr.get_routes(family=family, table=RT_TABLE_MAIN)
        )
    return NetnsView(links, addresses, routes)


def _link_kind(msg: Any) -> str:
    info = msg.get_attr("IFLA_LINKINFO")
    if not info:
        return ""
    return str(info.get_attr("IFLA_INFO_KIND") or "")


def _route(msg: Any) -> RouteEntry:
    family = int(msg["family"])
    dst = msg.get_attr("RTA_DST") or ("0.0.0.0" if family == socket.AF_INET else "::")
    return RouteEntry(
        family=family,
        destination=f"{dst}/{msg['dst_len']}",
        gateway=str(msg.get_attr("RTA_GATEWAY") or ""),
        oif=int(msg.get_attr("RTA_OIF") or 0),
        metric=int(msg.get_attr("RTA_PRIORITY") or 0),
        scope=int(msg["scope"]),
        proto=int(msg["proto"]),
        table=int(msg.get_attr("RTA_TABLE") or msg["table"]),
        type=int(msg["type"]),
        source=str(msg.get_attr("RTA_PREFSRC") or ""),
        multipath=msg.get_attr("RTA_MULTIPATH") is not None,
    )


def open_tap(name: str) -> int:
    """A new TAP in the calling thread's namespace; it lives while a descriptor is open."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        # IFF_VNET_HDR: QEMU then passes checksum and segmentation offloads through.
        ifreq = struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        fcntl.ioctl(fd, TUNSETIFF, ifreq)
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_taps(interfaces: Sequence[Interface]) -> list[int]:
    """Each interface's TAP, up with the link's MTU, and the redirects both ways.

    Returns the TAP descriptors, in order. On failure what was made is removed
    (the caller's undo would do it too, from the record)."""
    from pyroute2 import IPRoute

    fds: list[int] = []
    try:
        with IPRoute() as ipr:
            for interface in interfaces:
                fds.append(open_tap(interface.tap))
                link = _index(ipr, interface.name)
                tap = _index(ipr, interface.tap)
                ipr.link("set", index=tap, mtu=interface.mtu, state="up")
                if interface.new_qdisc:
                    ipr.tc("add", "ingress", link, "ffff:")
                ipr.tc("add", "ingress", tap, "ffff:")
                for source, target in ((link, tap), (tap, link)):
                    ipr.tc(
                        "add-filter", "u32", source,
                        parent="ffff:", prio=FILTER_PRIO, protocol=ETH_P_ALL,
                        keys=["0x0/0x0+0"], target=0,
                        action={"kind": "mirred", "direction": "egress",
                                "action": "redirect", "ifindex": target},
                    )
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def _index(ipr: Any, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise Internal(f"link {name} is not in the pod's network namespace")
    return int(found[0])


def undo_host(record: ResourceRecord) -> list[str]:
    """Remove the TAPs, filters and qdiscs a pod network made, from its record alone."""
    netns = record.host.get("netns", "")
    try:
        links = json.loads(record.host.get("links", "[]"))
    except ValueError as err:
        raise OSError(errno.EINVAL, f"network record: bad links: {err}") from err
    if not netns or not links:
        return []
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        return run_in_netns(netns, lambda: _remove(links))
    except NetnsGone:
        return []  # CRI removed the namespace, and everything in it went along
    except NetlinkError as err:  # crash cleanup goes on with the other resources
        raise OSError(err.code, f"network namespace {netns}: {err}") from err
    except (KeyError, ValueError, TypeError) as err:  # pyroute2 refusing a message
        raise OSError(errno.EINVAL, f"network namespace {netns}: {err!r}") from err


def _remove(links: Sequence[Mapping[str, Any]]) -> list[str]:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    gone = (errno.ENOENT, errno.ENODEV, errno.EINVAL)
    done: list[str] = []
    with IPRoute() as ipr:
        for entry in links:
            name, tap = str(entry.get("link", "")), str(entry.get("tap", ""))
            found = ipr.link_lookup(ifname=name) if name else []
            if found:
                try:
                    # By preference: the filter and its hash table go; pyroute2's
                    # u32 encoder wants a selector and class even for a delete.
                    ipr.tc("del-filter", "u32", found[0], parent="ffff:",
                           prio=FILTER_PRIO, protocol=ETH_P_ALL, keys=["0x0/0x0+0"], target=0)
                    done.append(f"removed the redirect on {name}")
                except NetlinkError as err:
                    if err.code not in gone:
                        raise
                if entry.get("new_qdisc"):
                    try:
                        ipr.tc("del", "ingress", found[0], "ffff:")
                        done.append(f"removed the ingress qdisc of {name}")
                    except NetlinkError as err:
                        if err.code not in gone:
                            raise
            found_tap = ipr.link_lookup(ifname=tap) if tap else []
            if found_tap:
                try:
                    ipr.link("del", index=found_tap[0])
                    done.append(f"removed {tap}")
                except NetlinkError as err:
                    if err.code not in gone:
                        raise
    return done

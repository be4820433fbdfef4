"""The pod network's decisions, from a netns view to what the guest gets (no I/O)."""

from __future__ import annotations

import ipaddress
import json
import socket

from shim import network
from shim.network import Address, Link, NetnsView, RouteEntry
from shim.types import Route

ETHER, LOOP = network.ARPHRD_ETHER, network.ARPHRD_LOOPBACK


def _route(dst: str, oif: int, gateway: str = "", **kw: int) -> RouteEntry:
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    fields = {"metric": 0, "scope": 0, "proto": 3, "table": 254, "type": 1} | kw
    return RouteEntry(family, dst, gateway, oif, source="", **fields)


VIEW = NetnsView(
    links=(
        Link(1, "lo", "", "00:00:00:00:00:00", 65536, LOOP, False),
        Link(3, "net1", "veth", "02:00:00:00:00:03", 9000, ETHER, True),
        Link(2, "eth0", "veth", "02:00:00:00:00:02", 1450, ETHER, False),
        Link(4, "tap0_chv", "tun", "06:00:00:00:00:04", 1450, ETHER, True),
    ),
    addresses=(
        Address(1, ipaddress.ip_interface("127.0.0.1/8"), 254),
        Address(2, ipaddress.ip_interface("10.88.0.5/16"), 0),
        Address(2, ipaddress.ip_interface("fd00::5/64"), 0),
        Address(2, ipaddress.ip_interface("fe80::1/64"), 253),
        Address(3, ipaddress.ip_interface("10.90.0.7/24"), 0),
    ),
    routes=(
        _route("0.0.0.0/0", 2, "10.88.0.1"),
        _route("10.88.0.0/16", 2, proto=2, scope=253),  # the kernel's, from the address
        _route("169.254.1.1/32", 3, scope=253),  # Calico-style link route, no gateway
        _route("::/0", 2, "fd00::1", metric=1024),
        _route("10.91.0.0/16", 9, "10.90.0.1"),  # through a link that is not a NIC
        _route("10.92.0.0/16", 3, "10.90.0.1", table=100),  # another table
    ),
)


def test_every_ethernet_link_but_our_taps_is_a_nic_in_index_order() -> None:
    plan = network.plan(VIEW)
    assert [(i.name, i.mac, i.mtu, i.tap) for i in plan.interfaces] == [
        ("eth0", "02:00:00:00:00:02", 1450, "tap0_chv"),
        ("net1", "02:00:00:00:00:03", 9000, "tap1_chv"),
    ]
    eth0, net1 = plan.interfaces
    assert eth0.addresses == (
        ipaddress.ip_interface("10.88.0.5/16"), ipaddress.ip_interface("fd00::5/64")
    )  # link-local and loopback ones stay behind
    assert net1.addresses == (ipaddress.ip_interface("10.90.0.7/24"),)
    assert (eth0.new_qdisc, net1.new_qdisc) == (True, False)
    assert eth0.device_id != net1.device_id and len(eth0.device_id) <= 20


def test_routes_keep_cni_order_with_gatewayless_ones_first() -> None:
    plan = network.plan(VIEW)
    assert plan.routes == (
        Route("169.254.1.1/32", device="net1", scope=253),
        Route("0.0.0.0/0", gateway="10.88.0.1", device="eth0"),
        Route("::/0", gateway="fd00::1", device="eth0", metric=1024),
    )
    assert any("10.91.0.0/16" in why for why in plan.skipped)


def test_hosts_file_adds_the_pod_addresses_to_containerds() -> None:
    addrs = [ipaddress.ip_interface("10.88.0.5/16"), ipaddress.ip_interface("fd00::5/64")]
    node = b"127.0.0.1 localhost\n192.0.2.9 registry"
    assert network.hosts_file(node, "web-0", addrs) == (
        b"127.0.0.1 localhost\n192.0.2.9 registry\n10.88.0.5\tweb-0\nfd00::5\tweb-0\n"
    )
    default = network.hosts_file(b"", "web-0", addrs[:1])
    assert default.startswith(b"127.0.0.1\tlocalhost\n") and default.endswith(b"10.88.0.5\tweb-0\n")


def test_record_holds_what_undo_needs() -> None:
    plan = network.plan(VIEW)
    record = network.host_record("/run/netns/cni-1", plan.interfaces)
    assert (record.kind, record.id) == ("net", "pod-network")
    assert record.host["netns"] == "/run/netns/cni-1"
    assert json.loads(record.host["links"]) == [
        {"link": "eth0", "tap": "tap0_chv", "new_qdisc": True},
        {"link": "net1", "tap": "tap1_chv", "new_qdisc": False},
    ]

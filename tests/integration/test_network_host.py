"""The host side of the pod network and port-forward, in a namespace the test makes
(no VM): what the shim reads there, what it adds, and that undo_host takes exactly
that away again, from the record alone."""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
from collections.abc import Iterator

import pytest

from shim import network, portforward
from shim.netns import NetnsGone, run_in_netns
from tests.integration.pod_net import netns_state


@pytest.fixture
def netns() -> Iterator[str]:
    """A namespace like CNI leaves it: eth0 with v4 and v6 addresses, a default route
    each, one more route; eth1 with an ingress qdisc of someone else's. The veths'
    peers are in a second namespace, as CNI's are on the bridge's side."""
    name = f"chv-nethost-{os.getpid()}"
    path = f"/run/netns/{name}"
    os.system(f"ip netns add {name}")
    os.system(f"ip netns add {name}-out")

    def build() -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for index in (0, 1):
                ipr.link("add", ifname=f"eth{index}", kind="veth",
                         peer={"ifname": f"peer{index}", "net_ns_fd": f"{name}-out"})
            lo = ipr.link_lookup(ifname="lo")[0]
            eth0 = ipr.link_lookup(ifname="eth0")[0]
            eth1 = ipr.link_lookup(ifname="eth1")[0]
            for index in (lo, eth0, eth1):
                ipr.link("set", index=index, state="up")
            ipr.link("set", index=eth0, mtu=1450)
            ipr.addr("add", index=eth0, address="10.77.0.5", prefixlen=16)
            ipr.addr("add", index=eth0, address="fd77::5", prefixlen=64, flags=0x02)  # NODAD
            ipr.addr("add", index=eth1, address="10.78.0.5", prefixlen=24)
            ipr.route("add", dst="0.0.0.0/0", gateway="10.77.0.1", oif=eth0)
            ipr.route("add", dst="::/0", gateway="fd77::1", oif=eth0, family=socket.AF_INET6)
            ipr.route("add", dst="10.79.0.0/16", gateway="10.78.0.1", oif=eth1)
            ipr.tc("add", "ingress", eth1, "ffff:")

    try:
        run_in_netns(path, build)
        yield path
    finally:
        os.system(f"ip netns delete {name}")
        os.system(f"ip netns delete {name}-out")


def test_plan_reads_every_cni_interface_and_route(netns: str) -> None:
    view = run_in_netns(netns, network.inspect)
    plan = network.plan(view)
    eth0, eth1 = plan.interfaces
    assert (eth0.name, eth0.mtu, eth0.tap, eth0.new_qdisc) == ("eth0", 1450, "tap0_chv", True)
    assert (eth1.name, eth1.tap, eth1.new_qdisc) == ("eth1", "tap1_chv", False)
    assert set(eth0.addresses) == {
        ipaddress.ip_interface("10.77.0.5/16"), ipaddress.ip_interface("fd77::5/64")
    }
    routes = {(r.destination, r.gateway, r.device) for r in plan.routes}
    assert ("0.0.0.0/0", "10.77.0.1", "eth0") in routes
    assert ("::/0", "fd77::1", "eth0") in routes
    assert ("10.79.0.0/16", "10.78.0.1", "eth1") in routes
    # The kernel's prefix routes are left for the guest's kernel to make.
    assert not any(r.destination in ("10.77.0.0/16", "fd77::/64") for r in plan.routes)


def test_taps_and_redirects_are_made_and_undone_from_the_record(netns: str) -> None:
    plan = network.plan(run_in_netns(netns, network.inspect))
    record = network.host_record(netns, plan.interfaces)
    fds = run_in_netns(netns, lambda: network.create_taps(plan.interfaces))
    try:
        made = netns_state(netns)
        assert made.links["tap0_chv"][0] == "tun" and made.links["tap1_chv"][0] == "tun"
        assert made.ingress_filters == {"eth0": 1, "eth1": 1, "tap0_chv": 1, "tap1_chv": 1}
        mtu = run_in_netns(netns, lambda: _mtu("tap0_chv"))
        assert mtu == 1450
    finally:
        for fd in fds:
            os.close(fd)  # as when QEMU dies: the TAPs go, the redirects on eth* stay
    assert set(netns_state(netns).ingress_filters) == {"eth0", "eth1"}
    done = network.undo_host(record)
    assert "removed the redirect on eth0" in done
    left = netns_state(netns)
    assert left.ingress_filters == {}
    assert set(left.links) == {"lo", "eth0", "eth1"}
    # eth1's qdisc was there before: it stays; eth0's was the shim's.
    assert run_in_netns(netns, _ingress_qdiscs) == {"eth1"}
    assert network.undo_host(record) == []  # again: nothing to do, no error


def test_undo_host_of_a_removed_namespace_is_nothing(netns: str) -> None:
    record = network.host_record("/run/netns/chv-never-was", [])
    assert network.undo_host(record) == []
    with pytest.raises(NetnsGone):
        run_in_netns("/run/netns/chv-never-was", lambda: None)


def test_the_shims_threads_never_stay_in_a_pod_namespace(netns: str) -> None:
    own = os.readlink("/proc/thread-self/ns/net")
    inside = run_in_netns(netns, lambda: os.readlink("/proc/thread-self/ns/net"))
    assert inside != own
    assert os.readlink("/proc/thread-self/ns/net") == own
    names = {t.name for t in threading.enumerate()}
    assert not any(n.startswith("netns:") for n in names)


def test_port_forward_redirect_is_made_and_undone(netns: str) -> None:
    listeners = run_in_netns(netns, portforward._setup)
    port = listeners[0].getsockname()[1]
    try:
        assert [s.family for s in listeners] == [socket.AF_INET, socket.AF_INET6]
        assert "cloudhv" in netns_state(netns).nft_tables

        def dial(host: str) -> None:
            with socket.create_connection((host, 8080), timeout=5):
                pass

        for listener, host in zip(listeners, ("127.0.0.1", "::1"), strict=True):
            run_in_netns(netns, lambda h=host: dial(h))  # type: ignore[misc]
            conn, _ = listener.accept()
            with conn:
                assert portforward.original_port(conn) == 8080
                assert conn.getsockname()[1] == port
    finally:
        for listener in listeners:
            listener.close()
    record = portforward.PortForward(netns, _no_dial).record
    assert portforward.undo_host(record) == ["removed nftables table inet cloudhv"]
    assert netns_state(netns).nft_tables == ()
    assert portforward.undo_host(record) == []


async def _no_dial() -> portforward.Streams:
    raise AssertionError("not dialled")


def _mtu(name: str) -> int:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return int(ipr.get_links(ipr.link_lookup(ifname=name)[0])[0].get_attr("IFLA_MTU"))


def _ingress_qdiscs() -> set[str]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        return {
            names[q["index"]] for q in ipr.get_qdiscs() if q.get_attr("TCA_KIND") == "ingress"
        }

"""Issue 16: pod networking through CNI, TAPs and tc redirects, the guest set up by the agent.

Every pod is on a CNI bridge with a private subnet, in a namespace the test's
containerd lives in (tests/integration/containerd_env.py): no traffic leaves it.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import time
from collections.abc import Iterator

import grpc
import pytest

from tests.integration.containerd_env import CNI_CONFLIST, CNI_DUAL_STACK, CNI_SECOND, VMMS
from tests.integration.cri import CriClient
from tests.integration.ctr_fixtures import Env, containerd_env, shim_processes
from tests.integration.pod_net import (
    bridge_netns_links,
    in_bridge_netns,
    keep_netns,
    netns_state,
    pod_netns,
    release_netns,
    tcp_probe,
)
from tests.integration.test_cri import Pod

TOKEN_PORT = 7000


@pytest.fixture(scope="module", params=VMMS)
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    with containerd_env(request.param) as env:
        yield env


@pytest.fixture(scope="module")
def cri(env: Env) -> Iterator[CriClient]:
    client = CriClient(env.containerd.address)
    yield client
    client.close()


def pod_ips(cri: CriClient, pod: Pod) -> list[str]:
    status = cri.runtime.PodSandboxStatus(
        cri.pb.PodSandboxStatusRequest(pod_sandbox_id=pod.id)
    ).status.network
    return [status.ip, *(extra.ip for extra in status.additional_ips)]


def serve_token(pod: Pod, token: str, port: int = TOKEN_PORT) -> str:
    """A container answering every connection to `port` with `token`."""
    return pod.container("token", ["nc", "-ll", "-p", str(port), "-e", "echo", token])


def fetch(pod: Pod, cid: str, host: str, port: int = TOKEN_PORT) -> bytes:
    """What `host`:`port` answers, read with busybox nc inside the pod."""
    out, err, code = pod.exec_sync(cid, ["nc", "-w", "10", host, str(port)])
    assert code == 0, err
    return out


def wait_listening(pod: Pod, cid: str, port: int) -> None:
    deadline = time.monotonic() + 30
    while pod.exec_sync(cid, ["sh", "-c", f"netstat -ltn | grep -q ':{port} '"])[2] != 0:
        assert time.monotonic() < deadline, f"nothing listens on {port} in {cid}"
        time.sleep(0.2)


def test_pod_to_pod_and_host_to_pod(cri: CriClient, env: Env) -> None:
    """Two pods on the bridge reach each other both ways; the bridge's namespace (where
    kubelet's tcp and http probes come from) reaches a pod's TCP and HTTP servers; an
    exec probe (ExecSync) works inside the pod."""
    a = Pod(cri, env, "net-a")
    b = Pod(cri, env, "net-b")
    try:
        ca = serve_token(a, "token-from-a")
        cb = serve_token(b, "token-from-b")
        wait_listening(a, ca, TOKEN_PORT)
        wait_listening(b, cb, TOKEN_PORT)
        ip_a, ip_b = pod_ips(cri, a)[0], pod_ips(cri, b)[0]
        assert ip_a != ip_b
        assert ipaddress.ip_address(ip_a) in ipaddress.ip_network("10.88.0.0/16")
        assert fetch(b, cb, ip_a) == b"token-from-a\n"
        assert fetch(a, ca, ip_b) == b"token-from-b\n"

        a.container(
            "web",
            ["sh", "-c", "mkdir /www && echo '<h1>page-of-a</h1>' > /www/index.html && "
                         "httpd -f -p 80 -h /www"],
        )
        deadline = time.monotonic() + 30
        while (probe := tcp_probe(env, ip_a, 80)).returncode:
            assert time.monotonic() < deadline, probe.stderr
            time.sleep(0.2)
        page = in_bridge_netns(env, "busybox", "wget", "-q", "-O-", f"http://{ip_a}/")
        assert (page.returncode, page.stdout) == (0, "<h1>page-of-a</h1>\n"), page.stderr
        token = in_bridge_netns(env, "busybox", "nc", "-w", "5", ip_a, str(TOKEN_PORT))
        assert token.stdout == "token-from-a\n"
        out, _, code = a.exec_sync(ca, ["wget", "-q", "-O-", "http://127.0.0.1/"])
        assert (code, out) == (0, b"<h1>page-of-a</h1>\n")
    finally:
        a.remove()
        b.remove()
    assert env.wait_clean() == []


def test_host_port_mapping_through_cni_portmap(cri: CriClient, env: Env) -> None:
    """critest's "port mapping with host port and container port": CNI's portmap DNATs
    the node's port to the pod IP, and the data path takes it into the VM."""
    pb = cri.pb
    mapping = pb.PortMapping(protocol=pb.TCP, container_port=80, host_port=30080)
    pod = Pod(cri, env, "hostport", port_mappings=[mapping])
    try:
        pod.container(
            "web",
            ["sh", "-c", "mkdir /www && echo mapped > /www/index.html && httpd -f -p 80 -h /www"],
        )
        deadline = time.monotonic() + 30
        while (page := in_bridge_netns(env, "busybox", "wget", "-q", "-O-",
                                       "http://10.88.0.1:30080/")).returncode:
            assert time.monotonic() < deadline, page.stderr
            time.sleep(0.3)
        assert page.stdout == "mapped\n"
    finally:
        pod.remove()
    assert env.wait_clean() == []


def test_guest_view_of_the_pod_network(cri: CriClient, env: Env) -> None:
    pb = cri.pb
    dns = pb.DNSConfig(
        servers=["10.96.0.10", "10.96.0.11"], searches=["ns1.svc.test", "svc.test"],
        options=["ndots:5", "timeout:2"],
    )
    pod = Pod(cri, env, "view", hostname="view-host", dns_config=dns)
    try:
        cid = pod.container("c", ["sleep", "600"])
        ip = pod_ips(cri, pod)[0]
        veth_mac = netns_state(pod_netns(env, pod.id)).links["eth0"][1]
        addr = pod.exec_sync(cid, ["ip", "addr", "show", "eth0"])[0].decode()
        assert f"inet {ip}/16" in addr and f"link/ether {veth_mac}" in addr
        routes = pod.exec_sync(cid, ["ip", "route"])[0].decode()
        assert "default via 10.88.0.1 dev eth0" in routes
        assert "10.88.0.0/16 dev eth0" in routes
        resolv = pod.exec_sync(cid, ["cat", "/etc/resolv.conf"])[0].decode().split("\n")
        assert "nameserver 10.96.0.10" in resolv and "nameserver 10.96.0.11" in resolv
        assert "search ns1.svc.test svc.test" in resolv
        assert "options ndots:5 timeout:2" in resolv
        hosts = pod.exec_sync(cid, ["cat", "/etc/hosts"])[0].decode()
        assert f"{ip}\tview-host" in hosts.splitlines()
        assert "localhost" in hosts
    finally:
        pod.remove()
    assert env.wait_clean() == []


def test_cleanup_after_remove_and_after_a_killed_shim(cri: CriClient, env: Env) -> None:
    # CNI makes its bridge with the first pod and keeps it; nothing else may stay.
    links_before = bridge_netns_links(env) | {"cloudhv-br0"}
    keeper = env.scratch / "kept-netns"
    pod = Pod(cri, env, "clean")
    try:
        pod.container("c", ["sleep", "600"])
        netns = pod_netns(env, pod.id)
        during = netns_state(netns)
        assert during.links["tap0_chv"][0] == "tun"
        assert during.ingress_filters == {"eth0": 1, "tap0_chv": 1}
        assert "cloudhv" in during.nft_tables
        keep_netns(netns, keeper)
    finally:
        pod.remove()
    try:
        after = netns_state(str(keeper))
        assert after.ingress_filters == {} and after.nft_tables == ()
        assert set(after.links) <= {"lo", "eth0"}
    finally:
        release_netns(keeper)
    assert env.wait_clean() == []
    assert bridge_netns_links(env) <= links_before

    # A killed shim: containerd runs `delete`, which undoes the network from the state file.
    pod = Pod(cri, env, "crash-net")
    try:
        pod.container("c", ["sleep", "600"])
        netns = pod_netns(env, pod.id)
        assert "tap0_chv" in netns_state(netns).links
        shims = shim_processes(env.containerd)
        assert len(shims) == 1
        os.kill(shims[0][0], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:
            state = netns_state(netns)
            if not state.ingress_filters and not state.nft_tables and "tap0_chv" not in state.links:
                break
            assert time.monotonic() < deadline, state
            time.sleep(0.3)
        assert set(state.links) == {"lo", "eth0"}  # CNI's veth stays until CNI removes it
    finally:
        pod.remove()
    assert env.wait_clean() == []
    assert bridge_netns_links(env) <= links_before


def test_host_network_pod_is_refused_and_leaves_nothing(cri: CriClient, env: Env) -> None:
    pb = cri.pb
    host_net = pb.LinuxPodSandboxConfig(
        security_context=pb.LinuxSandboxSecurityContext(
            namespace_options=pb.NamespaceOption(network=pb.NODE)
        )
    )
    links_before = bridge_netns_links(env) | {"cloudhv-br0"}
    with pytest.raises(grpc.RpcError) as refused:
        Pod(cri, env, "hostnet", linux=host_net)
    assert "hostNetwork" in refused.value.details()
    assert "VM cannot share" in refused.value.details()
    assert env.wait_clean() == []
    assert bridge_netns_links(env) <= links_before


# -- Dual stack ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dual() -> Iterator[tuple[Env, CriClient]]:
    with containerd_env(cni=(CNI_DUAL_STACK,)) as env:
        client = CriClient(env.containerd.address)
        yield env, client
        client.close()


def test_dual_stack_pods_talk_over_ipv4_and_ipv6(dual: tuple[Env, CriClient]) -> None:
    env, cri = dual
    a, b = Pod(cri, env, "dual-a"), Pod(cri, env, "dual-b")
    try:
        ca, cb = serve_token(a, "six-from-a"), serve_token(b, "six-from-b")
        wait_listening(a, ca, TOKEN_PORT)
        wait_listening(b, cb, TOKEN_PORT)
        ips_a, ips_b = pod_ips(cri, a), pod_ips(cri, b)
        v6_a = next(ip for ip in ips_a if ":" in ip)
        v6_b = next(ip for ip in ips_b if ":" in ip)
        v4_a = next(ip for ip in ips_a if ":" not in ip)
        assert ipaddress.ip_address(v6_a) in ipaddress.ip_network("fd89::/64")
        addr = a.exec_sync(ca, ["ip", "addr", "show", "eth0"])[0].decode()
        assert f"inet {v4_a}/16" in addr and f"inet6 {v6_a}/64" in addr
        routes6 = a.exec_sync(ca, ["ip", "-6", "route"])[0].decode()
        assert "default via fd89::1 dev eth0" in routes6
        assert fetch(b, cb, v6_a) == b"six-from-a\n"
        assert fetch(a, ca, v6_b) == b"six-from-b\n"
        assert fetch(b, cb, v4_a) == b"six-from-a\n"
        hosts = a.exec_sync(ca, ["cat", "/etc/hosts"])[0].decode().splitlines()
        assert f"{v4_a}\tdual-a" in hosts and f"{v6_a}\tdual-a" in hosts
    finally:
        a.remove()
        b.remove()
    assert env.wait_clean() == []


# -- Two interfaces ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_nets() -> Iterator[tuple[Env, CriClient]]:
    with containerd_env(cni=(CNI_CONFLIST, CNI_SECOND)) as env:
        client = CriClient(env.containerd.address)
        yield env, client
        client.close()


def test_two_cni_interfaces_give_two_nics(two_nets: tuple[Env, CriClient]) -> None:
    env, cri = two_nets
    pod = Pod(cri, env, "two")
    try:
        cid = pod.container("c", ["sleep", "600"])
        links = netns_state(pod_netns(env, pod.id)).links
        assert {"eth0", "eth1", "tap0_chv", "tap1_chv"} <= set(links)
        for name, subnet in (("eth0", "10.88."), ("eth1", "10.90.")):
            shown = pod.exec_sync(cid, ["ip", "addr", "show", name])[0].decode()
            assert f"link/ether {links[name][1]}" in shown, shown
            assert f"inet {subnet}" in shown, shown
        routes = pod.exec_sync(cid, ["ip", "route"])[0].decode()
        assert "default via 10.88.0.1 dev eth0" in routes
        assert "10.91.0.0/16 via 10.90.0.1 dev eth1" in routes
        # Both bridges reach the pod.
        out = in_bridge_netns(env, "busybox", "ping", "-c", "1", "-W", "5",
                              _guest_ip(pod, cid, "eth1"))
        assert out.returncode == 0, out.stdout + out.stderr
    finally:
        pod.remove()
    assert env.wait_clean() == []


def _guest_ip(pod: Pod, cid: str, link: str) -> str:
    shown = pod.exec_sync(cid, ["ip", "-4", "addr", "show", link])[0].decode()
    return shown.split("inet ")[1].split("/")[0]

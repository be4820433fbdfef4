"""Issue 19: CRI PortForward reaches inside the VM, spoken over containerd's streaming
server (websocket), and the relay's semantics tested from the pod's netns directly."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim import portforward
from shim.netns import run_in_netns
from shim.state import pod_key
from shim.vsock import connect_hybrid_vsock
from tests.integration.cri import CriClient
from tests.integration.ctr_fixtures import Env, containerd_env
from tests.integration.pod_net import keep_netns, netns_state, pod_netns, release_netns
from tests.integration.portforward_client import forward
from tests.integration.test_cri import Pod

MIB = 1 << 20


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with containerd_env() as env:
        yield env


@pytest.fixture(scope="module")
def cri(env: Env) -> Iterator[CriClient]:
    client = CriClient(env.containerd.address)
    yield client
    client.close()


def port_forward(cri: CriClient, pod: Pod, ports: list[int]) -> str:
    url: str = cri.runtime.PortForward(
        cri.pb.PortForwardRequest(pod_sandbox_id=pod.id, port=ports)
    ).url
    return url


def wait_listening(pod: Pod, cid: str, *ports: int) -> None:
    deadline = time.monotonic() + 30
    for port in ports:
        while pod.exec_sync(cid, ["sh", "-c", f"netstat -ltn | grep -q ':{port} '"])[2] != 0:
            assert time.monotonic() < deadline, f"nothing listens on {port}"
            time.sleep(0.2)


# First: it checks for leaks, before the module's served pod exists.
def test_nothing_stays_in_the_netns_after_the_pod_is_removed(
    cri: CriClient, env: Env
) -> None:
    pod = Pod(cri, env, "fwd-clean")
    keeper = env.scratch / "kept-fwd-netns"
    try:
        pod.container("c", ["sh", "-c", "nc -ll -p 8080 -e echo hi"])
        netns = pod_netns(env, pod.id)
        assert "cloudhv" in netns_state(netns).nft_tables
        keep_netns(netns, keeper)
    finally:
        pod.remove()
    try:
        left = netns_state(str(keeper))
        assert left.nft_tables == () and left.ingress_filters == {}
        assert set(left.links) <= {"lo", "eth0"}

        def listening() -> list[str]:
            # thread-self: /proc/net is the namespace of the process's first thread.
            net = Path("/proc/thread-self/net")
            text = (net / "tcp").read_text() + (net / "tcp6").read_text()
            return [line for line in text.splitlines()[1:] if line.split()[3] == "0A"]

        assert run_in_netns(str(keeper), listening) == []
    finally:
        release_netns(keeper)
    assert env.wait_clean() == []


SERVERS = " & ".join(
    [
        # A token on 8080.
        "nc -ll -p 8080 -e echo token-8080",
        # A web page on 80.
        "(mkdir -p /www && echo '<h1>forwarded page</h1>' > /www/index.html"
        " && httpd -f -p 80 -h /www)",
        # 1 MiB each way on 9000: what came in is digested into /got; /blob goes out.
        "(head -c 1048576 /dev/urandom > /blob && md5sum /blob > /blob.md5"
        " && nc -ll -p 9000 -e sh -c 'cat /blob & head -c 1048576 | md5sum > /got; wait')",
        # One line in, one line out, per connection, on 8081.
        "nc -ll -p 8081 -e sh -c 'read line; echo got-$line'",
        # Everything until EOF in, its digest out (half-close) on 8082.
        "nc -ll -p 8082 -e md5sum",
    ]
) + " & wait"


@pytest.fixture(scope="module")
def served(cri: CriClient, env: Env) -> Iterator[tuple[Pod, str]]:
    pod = Pod(cri, env, "fwd")
    pb = cri.pb
    # A PID namespace of its own: the servers run in the background of `sh`, and die
    # with it at stop (in the pod's shared one they would outlive it, as under runc
    # without its shim's kill-all).
    own_pid = pb.LinuxContainerConfig(
        security_context=pb.LinuxContainerSecurityContext(
            namespace_options=pb.NamespaceOption(pid=pb.CONTAINER)
        )
    )
    try:
        cid = pod.container("servers", ["sh", "-c", SERVERS], linux=own_pid)
        wait_listening(pod, cid, 8080, 80, 9000, 8081, 8082)
        yield pod, cid
    finally:
        pod.remove()


def test_forward_reaches_a_token_and_a_web_page(
    cri: CriClient, env: Env, served: tuple[Pod, str]
) -> None:
    pod, _ = served
    got = forward(env.containerd.netns, port_forward(cri, pod, [8080]), [b""])
    assert got.data == (b"token-8080\n",) and got.errors == ("",)
    request = b"GET /index.html HTTP/1.0\r\nHost: localhost\r\n\r\n"
    got = forward(env.containerd.netns, port_forward(cri, pod, [80]), [request])
    head, _, body = got.data[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK"), head
    assert body == b"<h1>forwarded page</h1>\n"


def test_a_megabyte_each_way_arrives_intact(
    cri: CriClient, env: Env, served: tuple[Pod, str]
) -> None:
    pod, cid = served
    sent = hashlib.md5(usedforsecurity=False)
    payload = bytes(range(256)) * (MIB // 256)
    sent.update(payload)
    got = forward(env.containerd.netns, port_forward(cri, pod, [9000]), [payload])
    assert got.errors == ("",)
    blob_md5 = pod.exec_sync(cid, ["cat", "/blob.md5"])[0].split()[0].decode()
    assert len(got.data[0]) == MIB
    assert hashlib.md5(got.data[0], usedforsecurity=False).hexdigest() == blob_md5
    deadline = time.monotonic() + 10
    while not (out := pod.exec_sync(cid, ["cat", "/got"])[0]):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert out.split()[0].decode() == sent.hexdigest()


def test_a_port_nobody_listens_on_fails_promptly_and_the_pod_goes_on(
    cri: CriClient, env: Env, served: tuple[Pod, str]
) -> None:
    pod, _ = served
    got = forward(env.containerd.netns, port_forward(cri, pod, [9999]), [b"hello"])
    assert got.data == (b"",)
    assert "9999" in got.errors[0] and "connection reset" in got.errors[0], got.errors
    assert got.seconds < 5
    again = forward(env.containerd.netns, port_forward(cri, pod, [8080]), [b""])
    assert again.data == (b"token-8080\n",)


def test_ten_parallel_connections_each_get_their_own_data(
    cri: CriClient, env: Env, served: tuple[Pod, str]
) -> None:
    pod, _ = served
    lines = [f"conn-{index}-{'x' * index}\n".encode() for index in range(10)]
    got = forward(env.containerd.netns, port_forward(cri, pod, [8081] * 10), lines)
    assert got.data == tuple(b"got-" + line for line in lines)
    assert got.errors == ("",) * 10


def test_relay_from_the_pod_netns_half_close_and_ipv6(
    env: Env, served: tuple[Pod, str]
) -> None:
    """What containerd does, done by hand: dial the pod netns' loopback. Half-close
    passes through (the server answers after our EOF), on 127.0.0.1 and on ::1."""
    pod, _ = served
    netns = pod_netns(env, pod.id)
    data = b"half-close " * 20000

    def exchange(host: str) -> bytes:
        with socket.create_connection((host, 8082), timeout=30) as conn:
            conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := conn.recv(65536):
                reply += chunk
            return reply

    digest = hashlib.md5(data, usedforsecurity=False).hexdigest()
    for host in ("127.0.0.1", "::1"):
        reply = run_in_netns(netns, lambda h=host: exchange(h))  # type: ignore[misc]
        assert reply.split()[0].decode() == digest, host

    def refused() -> float:
        started = time.monotonic()
        conn = socket.create_connection(("127.0.0.1", 9999), timeout=10)
        with conn, pytest.raises(ConnectionResetError):
            conn.recv(1)
        return time.monotonic() - started

    assert run_in_netns(netns, refused) < 5


def test_bad_relay_requests_are_refused_and_the_agent_keeps_serving(
    cri: CriClient, env: Env, served: tuple[Pod, str]
) -> None:
    """The relay port is reachable by the host only, and what the host sends there is
    checked: a port out of range is refused by name, garbage closes the stream."""
    pod, cid = served
    socket_path = env.state_dir / pod_key("k8s.io", pod.id) / "vm" / "vsock.sock"

    async def dial() -> portforward.Streams:
        until = asyncio.get_running_loop().time() + 10
        return await connect_hybrid_vsock(socket_path, portforward.RELAY_PORT, deadline=until)

    async def probe() -> tuple[str, bytes]:
        with pytest.raises(portforward.RelayRefused) as refused:
            await portforward.open_relay(dial, 70000, False)
        reader, writer = await dial()
        writer.write(b"\xff\xff\xff\xff" + b"x" * 64)  # a 4 GiB open request
        await writer.drain()
        rest = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return str(refused.value), rest

    why, rest = asyncio.run(probe())
    assert "port out of range" in why
    assert rest == b""
    assert pod.exec_sync(cid, ["true"])[2] == 0
    got = forward(env.containerd.netns, port_forward(cri, pod, [8080]), [b""])
    assert got.data == (b"token-8080\n",)

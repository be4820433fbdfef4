"""Pod behaviour inside the VM through real containerd CRI: the agent is out of the
containers' reach (issue 15), and pod namespaces, sysctls, hostname and a prompt stop
behave as runc would (issue 17)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.integration.busybox_tree import make_busybox_tree
from tests.integration.containerd_env import import_image
from tests.integration.cri import CriClient
from tests.integration.ctr_fixtures import Env, containerd_env
from tests.integration.oci_image import build_image
from tests.integration.test_cri import Pod

HERE = Path(__file__).resolve().parent
PROBE_IMAGE = "localhost/test/probes:1"
AGENT_PORT = 1024
ALLOW_VSOCK = "io.cloudhv.container.allow-vsock"


def build_probe(source: str, out: Path) -> Path:
    """A static musl build of a test helper (vsock_probe.c, shm_probe.c), with the
    kernel headers musl lacks."""
    include = out.parent.parent / "include"
    include.mkdir(parents=True, exist_ok=True)
    for name, target in (
        ("linux", "/usr/include/linux"),
        ("asm", "/usr/include/x86_64-linux-gnu/asm"),
        ("asm-generic", "/usr/include/asm-generic"),
    ):
        if not (include / name).exists():
            (include / name).symlink_to(target)
    subprocess.run(
        [
            "musl-gcc",
            "-static",
            "-Os",
            "-Wall",
            "-Werror",
            "-isystem",
            str(include),
            "-o",
            str(out),
            str(HERE / source),
        ],
        check=True,
    )
    return out


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with containerd_env(max_containers_per_vm=5) as env:
        tree = make_busybox_tree(env.scratch / "probe-tree")
        build_probe("vsock_probe.c", tree / "bin" / "vsock-probe")
        build_probe("shm_probe.c", tree / "bin" / "shm-probe")
        image = build_image([tree], PROBE_IMAGE, ["sh"], env.scratch / "probe.tar")
        import_image(env.containerd, image, "k8s.io")
        yield env


@pytest.fixture(scope="module")
def cri(env: Env) -> Iterator[CriClient]:
    client = CriClient(env.containerd.address)
    yield client
    client.close()


def test_containers_cannot_reach_the_agent(cri: CriClient, env: Env) -> None:
    """Issue 15, defect 1: no container drives the agent, by vsock to the host's CID (2),
    loopback (1) or the guest's own (3). A confined container's seccomp denies AF_VSOCK;
    an unconfined one (no profile: no filter at all, as with runc) or one with the
    allow-vsock annotation opens the socket, and gets no agent: the guest has no vsock
    loopback and the agent refuses every guest peer."""
    pod = Pod(cri, env, "vsock")
    try:
        probe = ["vsock-probe", str(AGENT_PORT), "1", "2", "3"]
        plain = pod.container("plain", ["sleep", "600"], image=PROBE_IMAGE)
        out, _, code = pod.exec_sync(plain, probe)
        lines = out.decode().splitlines()
        assert code == 0 and len(lines) == 3, out
        for line in lines:
            assert "socket:" not in line and "reply" not in line, out
        # Unconfined means no filter.
        status, _, _ = pod.exec_sync(plain, ["grep", "^Seccomp:", "/proc/self/status"])
        assert status.split() == [b"Seccomp:", b"0"]
        # containerd's default profile (RuntimeDefault) allows socket() outright;
        # the agent's rule still holds there.
        pb = cri.pb
        runtime_default = pb.LinuxContainerConfig(
            security_context=pb.LinuxContainerSecurityContext(
                seccomp=pb.SecurityProfile(profile_type=pb.SecurityProfile.RuntimeDefault)
            )
        )
        confined = pod.container(
            "confined", ["sleep", "600"], image=PROBE_IMAGE, linux=runtime_default
        )
        out, _, code = pod.exec_sync(confined, probe)
        assert code == 0, out
        assert out.decode().splitlines() == [
            f"cid {cid}: socket: Operation not permitted" for cid in (1, 2, 3)
        ]
        assert pod.exec_sync(confined, ["echo", "confined"]) == (b"confined\n", b"", 0)
        # A shell started by exec runs under the same filter.
        out, _, _ = pod.exec_sync(confined, ["sh", "-c", f"vsock-probe {AGENT_PORT} 1"])
        assert out == b"cid 1: socket: Operation not permitted\n"

        allowed = pod.container(
            "allowed",
            ["sleep", "600"],
            image=PROBE_IMAGE,
            annotations={ALLOW_VSOCK: "true"},
        )
        out, _, code = pod.exec_sync(allowed, probe)
        lines = out.decode().splitlines()
        assert code == 0 and len(lines) == 3, out
        for line in lines:
            assert "socket:" not in line and "reply" not in line, out

        # The pod keeps working: exec, in every container.
        assert pod.exec_sync(plain, ["echo", "still here"]) == (b"still here\n", b"", 0)
        assert pod.exec_sync(allowed, ["echo", "me too"]) == (b"me too\n", b"", 0)
    finally:
        pod.remove()
    assert env.wait_clean() == []


def namespaces(cri: CriClient, *, pid: str = "CONTAINER", ipc: str = "POD") -> Any:
    pb = cri.pb
    return pb.NamespaceOption(
        pid=pb.NamespaceMode.Value(pid), ipc=pb.NamespaceMode.Value(ipc), network=pb.POD
    )


def in_namespaces(cri: CriClient, **modes: str) -> Any:
    pb = cri.pb
    context = pb.LinuxContainerSecurityContext(namespace_options=namespaces(cri, **modes))
    return pb.LinuxContainerConfig(security_context=context)


# The kernel's initial namespaces (include/linux/proc_ns.h): the VM's own.
VM_PID_NS = "pid:[4026531836]"
VM_IPC_NS = "ipc:[4026531839]"


def pod_with(cri: CriClient, env: Env, name: str, **modes: str) -> Pod:
    pb = cri.pb
    context = pb.LinuxSandboxSecurityContext(namespace_options=namespaces(cri, **modes))
    return Pod(cri, env, name, linux=pb.LinuxPodSandboxConfig(security_context=context))


def test_pod_namespaces_follow_the_cri_options(cri: CriClient, env: Env) -> None:
    """Issue 17, cause 1, as critest's PodPID, ContainerPID, HostPID and HostIpc cases
    with runc: POD shares the pod's namespace, CONTAINER gives one of the container's
    own, NODE (set on the pod) is the VM's. In the pod's PID namespace /proc/1 is the
    pod's holder, "pause", as under Kubernetes; in the VM's it is the agent."""
    pod = pod_with(cri, env, "podns", pid="POD")
    try:
        a = pod.container(
            "a",
            ["sh", "-c", "shm-probe make 42 && exec sleep 601"],
            image=PROBE_IMAGE,
            linux=in_namespaces(cri, pid="POD"),
        )
        b = pod.container(
            "b", ["sleep", "602"], image=PROBE_IMAGE, linux=in_namespaces(cri, pid="POD")
        )
        own = pod.container(
            "own", ["sleep", "604"], image=PROBE_IMAGE, linux=in_namespaces(cri, pid="CONTAINER")
        )

        def ns(cid: str, kind: str) -> str:
            return pod.exec_sync(cid, ["readlink", f"/proc/self/ns/{kind}"])[0].decode().strip()

        # PID POD: both containers' processes in one namespace, the holder as PID 1.
        assert pod.exec_sync(b, ["cat", "/proc/1/cmdline"]) == (b"pause\x00", b"", 0)
        ps_b = pod.exec_sync(b, ["ps", "-o", "args"])[0].decode()
        assert "sleep 601" in ps_b and "sleep 602" in ps_b and "sleep 604" not in ps_b, ps_b
        assert ns(a, "pid") == ns(b, "pid") not in (ns(own, "pid"), VM_PID_NS)
        # PID CONTAINER: init is PID 1 of its own.
        assert pod.exec_sync(own, ["cat", "/proc/1/cmdline"])[0] == b"sleep\x00604\x00"
        assert "sleep 601" not in pod.exec_sync(own, ["ps", "-o", "args"])[0].decode()

        # IPC POD (CRI's default): one namespace for the pod, not the VM's.
        assert pod.exec_sync(b, ["shm-probe", "find", "42"]) == (b"found\n", b"", 0)
        assert pod.exec_sync(own, ["shm-probe", "find", "42"]) == (b"found\n", b"", 0)
        assert ns(a, "ipc") == ns(b, "ipc") == ns(own, "ipc") != VM_IPC_NS

        # UTS: the pod's, with its hostname, in every container.
        for cid in (a, b, own):
            assert pod.exec_sync(cid, ["hostname"])[0] == b"podns\n"
    finally:
        pod.remove()
    assert env.wait_clean() == []

    host = pod_with(cri, env, "nodens", pid="NODE", ipc="NODE")
    try:
        node_ns = in_namespaces(cri, pid="NODE", ipc="NODE")
        x = host.container("x", ["sleep", "603"], image=PROBE_IMAGE, linux=node_ns)
        y = host.container("y", ["sleep", "605"], image=PROBE_IMAGE, linux=node_ns)
        # PID NODE: the VM's namespace, where the agent is PID 1 and the other
        # container's processes show; IPC NODE: the VM's.
        assert host.exec_sync(y, ["cat", "/proc/1/cmdline"])[0] == b"/init\x00"
        assert "sleep 603" in host.exec_sync(y, ["ps", "-o", "args"])[0].decode()
        for cid in (x, y):
            assert host.exec_sync(cid, ["readlink", "/proc/self/ns/pid"])[0].strip() == (
                VM_PID_NS.encode()
            )
            assert host.exec_sync(cid, ["readlink", "/proc/self/ns/ipc"])[0].strip() == (
                VM_IPC_NS.encode()
            )
    finally:
        host.remove()
    assert env.wait_clean() == []


def test_pod_sysctls_reach_the_pods_namespaces(cri: CriClient, env: Env) -> None:
    """Issue 17, cause 2, as critest's safe and unsafe sysctl cases: the sandbox's
    sysctls are set in the pod's shared IPC and UTS namespaces and in the VM's
    network namespace, read back in a container; a non-namespaced one is refused."""
    pb = cri.pb
    sysctls = {
        "kernel.shm_rmid_forced": "1",
        "fs.mqueue.msg_max": "100",
        "kernel.domainname": "pod.example",
        "net.ipv4.ip_unprivileged_port_start": "1000",
    }
    pod = Pod(cri, env, "sysctl", linux=pb.LinuxPodSandboxConfig(sysctls=sysctls))
    try:
        cid = pod.container("c", ["sleep", "600"], linux=in_namespaces(cri))
        for key, value in sysctls.items():
            path = "/proc/sys/" + key.replace(".", "/")
            assert pod.exec_sync(cid, ["cat", path]) == (f"{value}\n".encode(), b"", 0), key
    finally:
        pod.remove()
    assert env.wait_clean() == []

    with pytest.raises(grpc.RpcError) as refused:
        Pod(cri, env, "badsysctl", linux=pb.LinuxPodSandboxConfig(sysctls={"kernel.panic": "1"}))
    assert "kernel.panic" in refused.value.details()
    assert "not namespaced" in refused.value.details()
    assert env.wait_clean() == []


def test_stop_right_after_start_is_prompt(cri: CriClient, env: Env) -> None:
    """Issue 17, cause 5: a TERM that reaches the container's init (PID 1 of its own
    PID namespace) before its handler is installed is dropped by the kernel; the agent
    sends it again once the handler is there, so the stop takes well under the grace
    period and the container exits by its handler (143), not by SIGKILL (137)."""
    pb = cri.pb
    pod = Pod(cri, env, "stopfast")
    try:
        # The trap comes 0.3 s after start: the stop below arrives before it.
        script = "sleep 0.3; trap 'exit 143' TERM; while true; do sleep 0.1; done"
        cid = pod.container("trap", ["sh", "-c", script], linux=in_namespaces(cri))
        stop_ns = time.time_ns()
        started = time.monotonic()
        cri.runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=10), timeout=60)
        elapsed = time.monotonic() - started
        status = cri.runtime.ContainerStatus(
            pb.ContainerStatusRequest(container_id=cid), timeout=30
        ).status
        # From the stop to the exit: the 0.3 s until the trap, and the signal path.
        # (StopContainer itself also waits for the container's teardown.)
        to_exit = (status.finished_at - stop_ns) / 1e9
        print(
            f"stop right after start: exit {status.exit_code} {to_exit:.3f} s after the stop;"
            f" StopContainer took {elapsed:.3f} s"
        )
        assert status.exit_code == 143
        assert to_exit < 1.0
        assert elapsed < 5.0
    finally:
        pod.remove()
    assert env.wait_clean() == []


def test_empty_pod_hostname_is_the_nodes(cri: CriClient, env: Env) -> None:
    """Issue 17: with no pod hostname, runc leaves the UTS namespace as the node's, so
    `hostname` prints the node's name; so does ours (the shim gives the VM the host's).
    The case with a pod hostname is asserted in test_pod_namespaces_follow_the_cri_options."""
    pod = Pod(cri, env, "nohostname", hostname="")
    try:
        cid = pod.container("h", ["sleep", "600"])
        out, _, code = pod.exec_sync(cid, ["hostname"])
        assert (out.decode().strip(), code) == (socket.gethostname(), 0)
    finally:
        pod.remove()
    assert env.wait_clean() == []

"""Pod behaviour inside the VM through real containerd CRI: the agent is out of the
containers' reach (issue 15), and pod namespaces, sysctls, hostname and a prompt stop
behave as runc would (issue 17)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.busybox_tree import make_busybox_tree
from tests.integration.containerd_env import import_image
from tests.integration.cri import CriClient
from tests.integration.ctr_fixtures import Env, containerd_env
from tests.integration.oci_image import build_image
from tests.integration.test_cri import Pod

HERE = Path(__file__).resolve().parent
PROBE_IMAGE = "localhost/test/vsock-probe:1"
AGENT_PORT = 1024
ALLOW_VSOCK = "io.cloudhv.container.allow-vsock"


def build_vsock_probe(out: Path) -> Path:
    """The static musl vsock client (vsock_probe.c), with the kernel headers musl lacks."""
    include = out.parent / "include"
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
            str(HERE / "vsock_probe.c"),
        ],
        check=True,
    )
    return out


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with containerd_env(max_containers_per_vm=5) as env:
        tree = make_busybox_tree(env.scratch / "probe-tree")
        build_vsock_probe(tree / "bin" / "vsock-probe")
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
    loopback (1) or the guest's own (3). seccomp denies AF_VSOCK by default; with the
    allow-vsock annotation the socket opens, and the agent refuses every guest peer."""
    pod = Pod(cri, env, "vsock")
    try:
        probe = ["vsock-probe", str(AGENT_PORT), "1", "2", "3"]
        plain = pod.container("plain", ["sleep", "600"], image=PROBE_IMAGE)
        out, _, code = pod.exec_sync(plain, probe)
        assert code == 0, out
        assert out.decode().splitlines() == [
            f"cid {cid}: socket: Operation not permitted" for cid in (1, 2, 3)
        ]
        # A shell started by exec runs under the same filter.
        out, _, _ = pod.exec_sync(plain, ["sh", "-c", f"vsock-probe {AGENT_PORT} 1"])
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

        # The pod keeps working: exec, in both containers.
        assert pod.exec_sync(plain, ["echo", "still here"]) == (b"still here\n", b"", 0)
        assert pod.exec_sync(allowed, ["echo", "me too"]) == (b"me too\n", b"", 0)
    finally:
        pod.remove()
    assert env.wait_clean() == []

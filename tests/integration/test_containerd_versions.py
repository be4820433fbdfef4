"""Smoke suites against containerd 1.7 (trixie) and 2.1 (sid), extracted by setup.sh:
`ctr run`, and a two-container CRI pod with exec, logs, stop and remove.

containerd 2.1 reads `start`'s stdout and stderr as one stream, and uses config
version 3 (runtimes under io.containerd.cri.v1.runtime, the sandbox image under
io.containerd.cri.v1.images.pinned_images). Both honour runtime_path.

The last test plays containerd 2.0.0-2.0.5, which reuse the sandbox's shim address
for app containers and never run `start` for them: a wrapper answers `start` for
an app container with the sandbox's address, as those versions do, so the pod's
daemon meets a Create for a task it never saw, and `delete` a bundle `start` never
wrote to.
"""

from __future__ import annotations

import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.containerd_env import REPO, V1_7, V2_1, ContainerdVersion
from tests.integration.cri import CriClient
from tests.integration.ctr_fixtures import BUSYBOX, Env, containerd_env, shim_processes
from tests.integration.test_cri import Pod

RUNTIME = "io.containerd.cloudhv.v1"


@pytest.fixture(scope="module", params=[V1_7, V2_1], ids=lambda v: f"containerd-{v.name}")
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    version: ContainerdVersion = request.param
    with containerd_env(version=version) as env:
        yield env


@pytest.fixture(scope="module")
def cri(env: Env) -> Iterator[CriClient]:
    client = CriClient(env.containerd.address)
    yield client
    client.close()


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def _wait_for(path: Path, needle: bytes, timeout: float = 60) -> bytes:
    deadline = time.monotonic() + timeout
    while needle not in (text := _read(path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return text


def test_ctr_run(env: Env) -> None:
    out = env.containerd.ctr("--version").stdout
    assert f" {env.containerd.version.name}." in out or f" v{env.containerd.version.name}." in out
    result = env.containerd.ctr(
        "run", "--rm", "--runtime", RUNTIME, BUSYBOX, "smoke1",
        "sh", "-c", "echo smoke; cat /proc/sys/kernel/osrelease; exit 5",
        check=False,
    )
    assert result.returncode == 5, result.stderr + env.containerd.log_tail()
    lines = result.stdout.split()
    assert lines[0] == "smoke"
    assert lines[1].startswith("6.1.") and lines[1] != platform.release()
    assert env.wait_clean() == []


def test_cri_pod_with_two_containers(cri: CriClient, env: Env) -> None:
    pb = cri.pb
    pod = Pod(cri, env, "smoke")
    try:
        a = pod.container("a", ["sh", "-c", "echo started a; exec sleep 600"])
        b = pod.container("b", ["sh", "-c", "echo started b >&2; exec sleep 600"])
        boot_a, _, code_a = pod.exec_sync(a, ["cat", "/proc/sys/kernel/random/boot_id"])
        boot_b, _, code_b = pod.exec_sync(b, ["cat", "/proc/sys/kernel/random/boot_id"])
        assert (code_a, code_b) == (0, 0)
        assert boot_a == boot_b and boot_a.strip()  # one VM for the pod
        out, err, code = pod.exec_sync(a, ["sh", "-c", "echo out; echo err >&2; exit 7"])
        assert (out, err, code) == (b"out\n", b"err\n", 7)
        assert len(shim_processes(env.containerd)) == 1  # one daemon for the pod

        log_a = _wait_for(pod.log_dir / "a.log", b"started a")
        log_b = _wait_for(pod.log_dir / "b.log", b"started b")
        assert b" stdout F started a" in log_a  # CRI log format: time stream tag line
        assert b" stderr F started b" in log_b

        cri.runtime.StopContainer(pb.StopContainerRequest(container_id=b, timeout=5), timeout=120)
        status = cri.runtime.ContainerStatus(
            pb.ContainerStatusRequest(container_id=b), timeout=30
        ).status
        assert status.state == pb.CONTAINER_EXITED
        assert status.exit_code in (128 + 15, 128 + 9)  # SIGTERM, or SIGKILL after 5 s
        cri.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=b), timeout=120)
        listed = cri.runtime.ListContainers(pb.ListContainersRequest(), timeout=30).containers
        assert [c.id for c in listed if c.pod_sandbox_id == pod.id] == [a]
        # The pod goes on without b.
        assert pod.exec_sync(a, ["echo", "still"])[0] == b"still\n"
    finally:
        pod.remove()
    assert env.wait_clean() == []


def _reuse_address_wrapper(directory: Path) -> Path:
    """A shim binary that behaves like containerd 2.0.0-2.0.5 for app containers: it
    answers `start` with the sandbox's address, never running ours."""
    wrapper = directory / "containerd-shim-cloudhv-v1"
    real = REPO / "build" / "bin" / "containerd-shim-cloudhv-v1"
    wrapper.write_text(f"""#!/bin/sh
last=""
for arg in "$@"; do last=$arg; done
if [ "$last" = start ] && grep -q '"io.kubernetes.cri.container-type": *"container"' config.json
then
  sandbox=$(sed -n 's/.*"io.kubernetes.cri.sandbox-id": *"\\([0-9a-f]*\\)".*/\\1/p' config.json)
  cat "../$sandbox/address"
  echo "$PWD" >> {directory}/reused-starts.log
  exit 0
fi
exec {real} "$@"
""")
    wrapper.chmod(0o755)
    return wrapper


def test_a_container_whose_start_never_ran() -> None:
    bin_dir = Path(tempfile.mkdtemp(prefix="chv-bin-", dir="/run"))
    try:
        shim = _reuse_address_wrapper(bin_dir)
        with containerd_env(version=V2_1, shim=shim) as reuse:
            client = CriClient(reuse.containerd.address)
            try:
                pod = Pod(client, reuse, "reuse")
                try:
                    cid = pod.container("app", ["sh", "-c", "echo from app; exec sleep 600"])
                    started = (bin_dir / "reused-starts.log").read_text().split()
                    assert len(started) == 1 and started[0].endswith(cid)  # start never ran
                    bundle = Path(started[0])
                    assert pod.exec_sync(cid, ["echo", "hi"]) == (b"hi\n", b"", 0)
                    assert b"from app" in _wait_for(pod.log_dir / "app.log", b"from app")
                    assert len(shim_processes(reuse.containerd)) == 1
                    # The daemon recorded where the pod's state is: delete needs no config.
                    assert "state_dir" in (bundle / "cloudhv-shim.json").read_text()
                finally:
                    pod.remove()
                assert reuse.wait_clean() == []
            finally:
                client.close()
    finally:
        shutil.rmtree(bin_dir, ignore_errors=True)

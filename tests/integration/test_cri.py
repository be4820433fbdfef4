"""Issue 4: CRI pods, one VM per pod, several containers, exec/logs/stats/update/sizing."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.integration.containerd_env import VMMS
from tests.integration.cri import CriClient
from tests.integration.ctr_fixtures import BUSYBOX, Env, containerd_env, shim_processes
from tests.integration.stream_client import stream

HANDLER = "cloudhv"


@pytest.fixture(scope="module", params=VMMS)
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    """The suite runs once with QEMU and once with Cloud Hypervisor (the stand-in)."""
    with containerd_env(request.param, max_containers_per_vm=5) as env:
        yield env


@pytest.fixture(scope="module")
def cri(env: Env) -> Iterator[CriClient]:
    client = CriClient(env.containerd.address)
    yield client
    client.close()


class Pod:
    """A pod started through CRI, removed (and checked gone) by the test."""

    def __init__(
        self,
        cri: CriClient,
        env: Env,
        name: str,
        annotations: dict[str, str] | None = None,
        memory_limit: int = 0,
        cpu_quota: int = 0,
        hostname: str | None = None,
        linux: Any = None,
        dns_config: Any = None,
        handler: str = HANDLER,
        port_mappings: Any = (),
    ) -> None:
        pb = cri.pb
        self.cri, self.pb = cri, pb
        self.log_dir = env.scratch / "logs" / name
        self.log_dir.mkdir(parents=True, exist_ok=True)
        linux = linux if linux is not None else pb.LinuxPodSandboxConfig()
        if memory_limit or cpu_quota:
            linux.resources.CopyFrom(
                pb.LinuxContainerResources(
                    memory_limit_in_bytes=memory_limit,
                    cpu_quota=cpu_quota,
                    cpu_period=100000 if cpu_quota else 0,
                )
            )
        self.config = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, uid=f"uid-{name}", namespace="default"),
            hostname=name if hostname is None else hostname,
            log_directory=str(self.log_dir),
            annotations=annotations or {},
            linux=linux,
            dns_config=dns_config,
            port_mappings=list(port_mappings),
        )
        started = time.monotonic()
        self.id = cri.runtime.RunPodSandbox(
            pb.RunPodSandboxRequest(config=self.config, runtime_handler=handler), timeout=180
        ).pod_sandbox_id
        self.run_seconds = time.monotonic() - started

    def container(
        self, name: str, command: list[str], *, image: str = BUSYBOX, **config: Any
    ) -> str:
        pb = self.pb
        ccfg = pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name=name),
            image=pb.ImageSpec(image=image),
            command=command,
            log_path=f"{name}.log",
            **config,
        )
        cid: str = self.cri.runtime.CreateContainer(
            pb.CreateContainerRequest(
                pod_sandbox_id=self.id, config=ccfg, sandbox_config=self.config
            ),
            timeout=180,
        ).container_id
        self.cri.runtime.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=180)
        return cid

    def exec_sync(self, cid: str, cmd: list[str]) -> tuple[bytes, bytes, int]:
        r = self.cri.runtime.ExecSync(
            self.pb.ExecSyncRequest(container_id=cid, cmd=cmd, timeout=60), timeout=120
        )
        return r.stdout, r.stderr, r.exit_code

    def wait_all_exited(self, timeout: float = 60) -> None:
        """Until CRI reports every container of the pod exited."""
        deadline = time.monotonic() + timeout
        while True:
            states = {
                c.metadata.name: c.state
                for c in self.cri.runtime.ListContainers(
                    self.pb.ListContainersRequest(
                        filter=self.pb.ContainerFilter(pod_sandbox_id=self.id)
                    )
                ).containers
            }
            if all(s == self.pb.CONTAINER_EXITED for s in states.values()):
                return
            assert time.monotonic() < deadline, states
            time.sleep(0.2)

    def remove(self) -> None:
        pb = self.pb
        self.cri.runtime.StopPodSandbox(
            pb.StopPodSandboxRequest(pod_sandbox_id=self.id), timeout=120
        )
        self.cri.runtime.RemovePodSandbox(
            pb.RemovePodSandboxRequest(pod_sandbox_id=self.id), timeout=120
        )


def test_two_containers_share_the_vm_not_their_namespaces(cri: CriClient, env: Env) -> None:
    pod = Pod(cri, env, "shared")
    # What kubelet sends without shareProcessNamespace (CRI's zero value is POD).
    pb = cri.pb
    own_pid = pb.LinuxContainerConfig(
        security_context=pb.LinuxContainerSecurityContext(
            namespace_options=pb.NamespaceOption(pid=pb.CONTAINER)
        )
    )
    try:
        a = pod.container(
            "a", ["sh", "-c", "echo hello-from-a; touch /only-in-a; sleep 600"], linux=own_pid
        )
        b = pod.container("b", ["sh", "-c", "echo hello-from-b >&2; sleep 700"], linux=own_pid)
        host_boot_id = Path("/proc/sys/kernel/random/boot_id").read_text()
        boot_a = pod.exec_sync(a, ["cat", "/proc/sys/kernel/random/boot_id"])[0].decode()
        boot_b = pod.exec_sync(b, ["cat", "/proc/sys/kernel/random/boot_id"])[0].decode()
        assert boot_a == boot_b != host_boot_id

        # Each container has its own pid namespace: it sees only its own sleep.
        ps_a = pod.exec_sync(a, ["ps", "-o", "args"])[0].decode()
        ps_b = pod.exec_sync(b, ["ps", "-o", "args"])[0].decode()
        assert "sleep 600" in ps_a and "sleep 700" not in ps_a
        assert "sleep 700" in ps_b and "sleep 600" not in ps_b

        # Their root filesystems are separate disks.
        assert pod.exec_sync(a, ["ls", "/only-in-a"])[2] == 0
        assert pod.exec_sync(b, ["ls", "/only-in-a"])[2] != 0

        # CRI's per-pod files reach the guest.
        assert pod.exec_sync(a, ["cat", "/etc/hostname"])[0].strip() == b"shared"
        assert pod.exec_sync(b, ["hostname"])[0].strip() == b"shared"
        assert pod.exec_sync(a, ["test", "-f", "/etc/resolv.conf"])[2] == 0

        # ExecSync returns output and exit codes.
        assert pod.exec_sync(a, ["sh", "-c", "echo ok"]) == (b"ok\n", b"", 0)
        assert pod.exec_sync(a, ["sh", "-c", "echo bad >&2; exit 7"]) == (b"", b"bad\n", 7)

        # Streaming exec with a TTY through the CRI streaming server.
        url = cri.runtime.Exec(
            cri.pb.ExecRequest(
                container_id=a,
                cmd=["sh", "-c", "read x; stty size; echo got $x"],
                tty=True,
                stdin=True,
                stdout=True,
            )
        ).url
        result = stream(env.containerd.netns, url, stdin=b"hi\n", resize=(120, 33))
        assert b"33 120" in result.stdout and b"got hi" in result.stdout
        assert result.exit_code == 0

        # Logs reach CRI's log files, in CRI format (`<time> <stream> <tag> <text>`).
        deadline = time.monotonic() + 10
        log_a, log_b = pod.log_dir / "a.log", pod.log_dir / "b.log"
        while time.monotonic() < deadline and not (
            b"hello-from-a" in _read(log_a) and b"hello-from-b" in _read(log_b)
        ):
            time.sleep(0.1)
        assert b" stdout F hello-from-a" in _read(log_a)
        assert b" stderr F hello-from-b" in _read(log_b)

        # Stats come from the guest cgroups.
        stats = cri.runtime.ContainerStats(cri.pb.ContainerStatsRequest(container_id=a)).stats
        assert stats.memory.working_set_bytes.value > 0 or stats.memory.usage_bytes.value > 0
        listed = cri.runtime.ListContainerStats(cri.pb.ListContainerStatsRequest()).stats
        assert {s.attributes.id for s in listed} >= {a, b}
    finally:
        pod.remove()
    assert env.wait_clean() == []


def test_update_lowers_memory_limit_and_oom_kills(cri: CriClient, env: Env) -> None:
    pod = Pod(
        cri, env, "oom", annotations={"io.katacontainers.config.hypervisor.default_memory": "512"}
    )
    try:
        cid = pod.container("eater", ["sleep", "600"])
        limit = 32 << 20
        cri.runtime.UpdateContainerResources(
            cri.pb.UpdateContainerResourcesRequest(
                container_id=cid,
                linux=cri.pb.LinuxContainerResources(memory_limit_in_bytes=limit),
            )
        )
        out, _, code = pod.exec_sync(cid, ["cat", "/sys/fs/cgroup/memory.max"])
        assert (out.strip(), code) == (str(limit).encode(), 0)
        # dd's 64 MiB block buffer is anonymous memory, twice the new limit. (A shell
        # string grown by $(...) stalls in reclaim of busybox's own pages on 1 vCPU
        # instead of reaching the OOM killer.)
        _, _, code = pod.exec_sync(cid, ["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"])
        assert code == 137
    finally:
        pod.remove()
    assert env.wait_clean() == []


def test_container_limit_is_enforced_with_its_name(cri: CriClient, env: Env) -> None:
    pod = Pod(cri, env, "limit")
    try:
        for index in range(5):
            pod.container(f"c{index}", ["sleep", "600"])
        with pytest.raises(grpc.RpcError) as refused:
            pod.container("c5", ["sleep", "600"])
        assert "max_containers_per_vm" in refused.value.details()
        assert "5" in refused.value.details()
    finally:
        pod.remove()
    assert env.wait_clean() == []


def test_annotations_size_the_vm(cri: CriClient, env: Env) -> None:
    pod = Pod(
        cri,
        env,
        "sized",
        annotations={
            "io.katacontainers.config.hypervisor.default_vcpus": "1.5",
            "io.katacontainers.config.hypervisor.default_memory": "300",
            "io.cloudhv.config.hypervisor.default_memory": "384",
        },
    )
    try:
        cid = pod.container("probe", ["sleep", "600"])
        assert pod.exec_sync(cid, ["nproc"])[0].strip() == b"2"
        meminfo = pod.exec_sync(cid, ["cat", "/proc/meminfo"])[0].decode()
        total_kib = int(meminfo.split("MemTotal:")[1].split()[0])
        assert 300 * 1024 < total_kib <= 384 * 1024
    finally:
        pod.remove()
    assert env.wait_clean() == []


def test_bad_annotation_is_refused_naming_the_key(cri: CriClient, env: Env) -> None:
    key = "io.katacontainers.config.hypervisor.default_memory"
    with pytest.raises(grpc.RpcError) as refused:
        Pod(cri, env, "bad", annotations={key: "lots"})
    assert key in refused.value.details()
    assert env.wait_clean() == []


@pytest.mark.only_vmm("cloud-hypervisor")
def test_a_bad_cloud_hypervisor_config_is_named_before_any_vm_starts(
    cri: CriClient, env: Env
) -> None:
    """The config is read when a pod's shim starts: a missing binary fails RunPodSandbox
    naming the field, and nothing was started."""
    good = env.config_path.read_text()
    config = json.loads(good)
    config["cloud_hypervisor"]["binary"] = "/nonexistent/cloud-hypervisor"
    env.config_path.write_text(json.dumps(config))
    try:
        with pytest.raises(grpc.RpcError) as refused:
            Pod(cri, env, "badconfig")
    finally:
        env.config_path.write_text(good)
    assert "cloud_hypervisor.binary: /nonexistent/cloud-hypervisor does not exist" in (
        refused.value.details()
    )
    assert env.wait_clean() == []


def test_attach_reaches_a_running_containers_stdio(cri: CriClient, env: Env) -> None:
    pod = Pod(cri, env, "attach")
    try:
        cid = pod.container(
            "reader",
            ["sh", "-c", "read line; echo got $line; echo bye >&2"],
            stdin=True,
            stdin_once=True,
        )
        url = cri.runtime.Attach(
            cri.pb.AttachRequest(container_id=cid, stdin=True, stdout=True, stderr=True)
        ).url
        result = stream(env.containerd.netns, url, stdin=b"hello\n")
        assert b"got hello" in result.stdout
        assert b"bye" in result.stderr
        deadline = time.monotonic() + 30
        while b"got hello" not in _read(pod.log_dir / "reader.log"):
            assert time.monotonic() < deadline, "attach output never reached the log"
            time.sleep(0.1)
    finally:
        pod.remove()
    assert env.wait_clean() == []


def test_mount_that_cannot_be_copied_is_refused(cri: CriClient, env: Env) -> None:
    fifo = env.scratch / "not-a-file"
    os.mkfifo(fifo)
    pod = Pod(cri, env, "badmount")
    try:
        with pytest.raises(grpc.RpcError) as refused:
            pod.container(
                "m",
                ["true"],
                mounts=[cri.pb.Mount(container_path="/data", host_path=str(fifo))],
            )
        assert "/data" in refused.value.details()
        assert str(fifo) in refused.value.details()
    finally:
        pod.remove()
    assert env.wait_clean() == []


def _read(path: Path) -> bytes:
    return path.read_bytes() if path.exists() else b""


def test_pod_is_cleaned_up_after_its_shim_is_killed(cri: CriClient, env: Env) -> None:
    pod = Pod(cri, env, "crash")
    try:
        pod.container("a", ["sleep", "600"])
        pod.container("b", ["sleep", "600"])
        shims = shim_processes(env.containerd)
        assert len(shims) == 1, shims  # one shim for the whole pod
        os.kill(shims[0][0], signal.SIGKILL)
        # containerd sees the shim gone, runs `delete` for each task, and CRI reports
        # the containers exited; the pod can then be stopped and removed as usual.
        pod.wait_all_exited()
    finally:
        pod.remove()
    assert env.wait_clean() == []

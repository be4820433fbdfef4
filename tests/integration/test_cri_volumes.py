"""Directory volumes through real containerd CRI (issue 17, cause 3): hostPath dirs are
the host's live directory in both directions, host mounts reach an rslave volume and not
an rprivate one (as critest's "Container Mount Propagation" asserts), kubelet's ConfigMap
volumes stay refreshed copies, and nothing of virtio-fs outlives the pod, even after a
SIGKILLed shim."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from shim.bundle import socket_path
from tests.integration.containerd_env import VMMS
from tests.integration.cri import CriClient
from tests.integration.ctr_fixtures import Env, containerd_env, shim_processes
from tests.integration.test_cri import Pod

COPY_LIMIT = 4 << 20  # the most a copied directory holds (shim/cri_mounts.py)


@pytest.fixture(scope="module", params=VMMS)
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    """Once with QEMU, once with Cloud Hypervisor (the stand-in): the same virtio-fs."""
    with containerd_env(request.param, max_containers_per_vm=5) as env:
        yield env


@pytest.fixture(scope="module")
def cri(env: Env) -> Iterator[CriClient]:
    client = CriClient(env.containerd.address)
    yield client
    client.close()


def privileged_pod(cri: CriClient, env: Env, name: str) -> Pod:
    pb = cri.pb
    linux = pb.LinuxPodSandboxConfig(
        security_context=pb.LinuxSandboxSecurityContext(privileged=True)
    )
    return Pod(cri, env, name, linux=linux)


def volume_container(
    pod: Pod, name: str, host: Path, propagation: int, *, container_path: str | None = None
) -> str:
    """A privileged container (it may mount, as critest's) with `host` as a volume."""
    pb = pod.pb
    return pod.container(
        name,
        ["sleep", "600"],
        mounts=[
            pb.Mount(
                container_path=container_path or str(host),
                host_path=str(host),
                propagation=propagation,
            )
        ],
        linux=pb.LinuxContainerConfig(
            security_context=pb.LinuxContainerSecurityContext(privileged=True)
        ),
    )


def ok(pod: Pod, cid: str, script: str) -> bytes:
    out, err, code = pod.exec_sync(cid, ["sh", "-c", script])
    assert code == 0, (script, out, err)
    return out


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


@contextlib.contextmanager
def propagation_dirs(scratch: Path, name: str, shared: bool) -> Iterator[tuple[Path, Path]]:
    """critest's createHostPathForMountPropagation: `mnt` bound on itself, rshared (for
    rslave, which CRI requires to be shared or slave) or rprivate, holding `propagationMnt`;
    and `propagationSrcDir` holding `flagFile`, to be mounted there after the start."""
    base = scratch / name
    source = base / "mnt"
    (source / "propagationMnt").mkdir(parents=True)
    flags = base / "propagationSrcDir"
    flags.mkdir()
    (flags / "flagFile").touch()
    mount("--rbind", str(source), str(source))
    mount("--make-rshared" if shared else "--make-rprivate", str(source))
    try:
        yield source, flags
    finally:
        subprocess.run(["umount", "-l", str(source / "propagationMnt")], check=False)
        subprocess.run(["umount", "-l", str(source)], check=False)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_host_path_is_the_same_directory_both_ways(cri: CriClient, env: Env) -> None:
    host = env.scratch / "hostpath"
    host.mkdir()
    (host / "from-host").write_text("written on the host\n")
    pod = Pod(cri, env, "hostpath")
    try:
        cid = pod.container(
            "app",
            ["sleep", "600"],
            mounts=[cri.pb.Mount(container_path="/data", host_path=str(host))],
        )
        # Host writes, container reads: also what was written after the start.
        assert ok(pod, cid, "cat /data/from-host") == b"written on the host\n"
        (host / "later").write_text("after start\n")
        assert ok(pod, cid, "cat /data/later") == b"after start\n"
        # Container writes, host reads: files, directories, a rename, a delete.
        ok(pod, cid, "echo from the container > /data/c && mkdir -p /data/d/e && "
                     "mv /data/later /data/d/e/moved && rm /data/from-host")
        assert (host / "c").read_text() == "from the container\n"
        assert (host / "d" / "e" / "moved").read_text() == "after start\n"
        assert not (host / "from-host").exists()
        # Sizes are not bounded by the copy limit, in either direction.
        size = 3 * COPY_LIMIT
        blob = os.urandom(size)
        (host / "big-from-host").write_bytes(blob)
        out = ok(pod, cid, "sha256sum /data/big-from-host")
        assert out.split()[0].decode() == sha256(blob)
        ok(pod, cid, f"dd if=/dev/urandom of=/data/big-from-ctr bs=1M count={size >> 20} "
                     "2>/dev/null && sync")
        written = (host / "big-from-ctr").read_bytes()
        assert len(written) == size
        out = ok(pod, cid, "sha256sum /data/big-from-ctr")
        assert out.split()[0].decode() == sha256(written)
    finally:
        pod.remove()
    assert env.wait_clean() == []
    # The volume's contents are the host's: removing the pod leaves them.
    assert (host / "c").read_text() == "from the container\n"


def test_rslave_volume_sees_a_host_mount_made_after_start(cri: CriClient, env: Env) -> None:
    with propagation_dirs(env.scratch, "rslave", shared=True) as (source, flags):
        pod = privileged_pod(cri, env, "rslave")
        try:
            cid = volume_container(pod, "slave", source, cri.pb.PROPAGATION_HOST_TO_CONTAINER)
            mount("--rbind", str(flags), str(source / "propagationMnt"))
            assert ok(pod, cid, f"ls -A {source}/propagationMnt") == b"flagFile\n"
            # A mount made in the container stays in the VM; the directory reaches the host.
            ok(pod, cid, f"mkdir -p {source}/containerMntPoint && "
                         f"mount --bind /etc {source}/containerMntPoint")
            assert os.listdir(source / "containerMntPoint") == []
        finally:
            pod.remove()
    assert env.wait_clean() == []


def test_rprivate_volume_does_not_see_a_host_mount(cri: CriClient, env: Env) -> None:
    # Private on the host, as critest makes it; and shared, where only the volume's
    # own rprivate can keep the host's later mount out.
    with (
        propagation_dirs(env.scratch, "rprivate", shared=False) as (private, pflags),
        propagation_dirs(env.scratch, "rprivate-shared", shared=True) as (shared, sflags),
    ):
        pod = privileged_pod(cri, env, "rprivate")
        try:
            a = volume_container(pod, "a", private, cri.pb.PROPAGATION_PRIVATE)
            b = volume_container(pod, "b", shared, cri.pb.PROPAGATION_PRIVATE)
            mount("--rbind", str(pflags), str(private / "propagationMnt"))
            mount("--rbind", str(sflags), str(shared / "propagationMnt"))
            assert ok(pod, a, f"ls -A {private}/propagationMnt") == b""
            assert ok(pod, b, f"ls -A {shared}/propagationMnt") == b""
            ok(pod, a, f"mkdir -p {private}/containerMntPoint && "
                       f"mount --bind /etc {private}/containerMntPoint")
            assert os.listdir(private / "containerMntPoint") == []
        finally:
            pod.remove()
    assert env.wait_clean() == []


def test_rshared_volume_is_refused_naming_the_mount(cri: CriClient, env: Env) -> None:
    with propagation_dirs(env.scratch, "rshared", shared=True) as (source, _):
        pod = privileged_pod(cri, env, "rshared")
        try:
            with pytest.raises(grpc.RpcError) as refused:
                volume_container(pod, "bidi", source, cri.pb.PROPAGATION_BIDIRECTIONAL)
            assert "rshared cannot be honoured" in refused.value.details()
            assert str(source) in refused.value.details()
        finally:
            pod.remove()
    assert env.wait_clean() == []


def atomic_write(volume: Path, data: dict[str, str], stamp: str) -> None:
    """kubelet's atomic writer: a timestamped dir, the `..data` symlink swapped to it."""
    (volume / stamp).mkdir()
    for key, value in data.items():
        (volume / stamp / key).write_text(value)
    (volume / "..data_tmp").symlink_to(stamp)
    (volume / "..data_tmp").replace(volume / "..data")
    for key in data:
        if not (volume / key).is_symlink():
            (volume / key).symlink_to(f"..data/{key}")


def test_configmap_volume_is_a_copy_refreshed_on_update(cri: CriClient, env: Env) -> None:
    volume = env.scratch / "kubelet/pods/uid-cm/volumes/kubernetes.io~configmap/settings"
    volume.mkdir(parents=True)
    atomic_write(volume, {"mode": "blue\n"}, "..2026_01_01_00_00_00.1")
    pod = Pod(cri, env, "configmap")
    try:
        cid = pod.container(
            "app",
            ["sleep", "600"],
            mounts=[cri.pb.Mount(container_path="/etc/settings", host_path=str(volume),
                                 readonly=True)],
        )
        assert ok(pod, cid, "cat /etc/settings/mode") == b"blue\n"
        # Not on virtio-fs: the guest's copy, which a host change reaches only on update.
        assert b"fuse" not in ok(pod, cid, "grep ' /etc/settings ' /proc/mounts")
        atomic_write(volume, {"mode": "green\n"}, "..2026_01_01_00_01_00.2")
        assert ok(pod, cid, "cat /etc/settings/mode") == b"blue\n"
        cri.runtime.UpdateContainerResources(
            cri.pb.UpdateContainerResourcesRequest(
                container_id=cid, linux=cri.pb.LinuxContainerResources(cpu_shares=512)
            )
        )
        assert ok(pod, cid, "cat /etc/settings/mode") == b"green\n"
    finally:
        pod.remove()
    assert env.wait_clean() == []


def virtiofsd_pids(env: Env) -> list[int]:
    """The virtiofsd daemons of our pods: the processes their namespace sandbox forks
    (children of a virtiofsd) not counted."""
    found: dict[int, int] = {}
    for pid_dir in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError):
            argv = (pid_dir / "cmdline").read_bytes().decode().split("\0")
            if argv[0].endswith("virtiofsd") and str(env.state_dir) in " ".join(argv):
                status = (pid_dir / "status").read_text()
                ppid = int(status.split("PPid:")[1].split()[0])
                found[int(pid_dir.name)] = ppid
    return [pid for pid, ppid in found.items() if ppid not in found]


def host_mounts_under(path: Path) -> list[str]:
    return [
        line.split()[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4].startswith(str(path))
    ]


def test_virtiofs_is_cleaned_up_after_a_killed_shim(cri: CriClient, env: Env) -> None:
    host = env.scratch / "crash-volume"
    host.mkdir()
    (host / "keep").write_text("kept\n")
    pod = Pod(cri, env, "fscrash")
    try:
        cid = pod.container(
            "app", ["sleep", "600"],
            mounts=[cri.pb.Mount(container_path="/data", host_path=str(host))],
        )
        assert ok(pod, cid, "cat /data/keep") == b"kept\n"
        assert len(virtiofsd_pids(env)) == 1
        assert host_mounts_under(env.state_dir), "no share root or volume bind on the host"
        shims = shim_processes(env.containerd)
        assert len(shims) == 1, shims
        os.kill(shims[0][0], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:  # containerd runs `delete` for the pod's tasks
            states = {
                c.state
                for c in cri.runtime.ListContainers(
                    cri.pb.ListContainersRequest(
                        filter=cri.pb.ContainerFilter(pod_sandbox_id=pod.id)
                    )
                ).containers
            }
            if states == {cri.pb.CONTAINER_EXITED}:
                break
            assert time.monotonic() < deadline, states
            time.sleep(0.2)
    finally:
        pod.remove()
    assert env.wait_clean() == []
    # containerd runs `delete` once per task, concurrently: the one that found the state
    # may still be at it when the pod is gone from CRI; wait_clean waited for it.
    assert not socket_path(str(env.containerd.address), "k8s.io", pod.id).exists()
    assert virtiofsd_pids(env) == [] and host_mounts_under(env.state_dir) == []
    assert (host / "keep").read_text() == "kept\n"

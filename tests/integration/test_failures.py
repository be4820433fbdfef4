"""Failure behaviour through real containerd: a dying VMM or helper, a powered-off guest,
a shim killed at each point of a pod's life, a containerd restart, a slow reader.

Every test ends with the leak check: no process, mount, state file, disk image,
shim socket or cgroup of ours is left.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from shim.agent import AgentClient
from shim.vmm.ch_http import ChHttp
from tests.integration.containerd_env import SHIM_BIN_DIR, VMMS
from tests.integration.cri import CriClient
from tests.integration.ctr_fixtures import BUSYBOX, Env, containerd_env, shim_processes
from tests.integration.test_cri import Pod

RUNTIME = "io.containerd.cloudhv.v1"
CGROUP_PARENT = f"/cloudhv-test-{os.getpid()}"
CH_PROCESS = "chsim/main.py"  # the Cloud Hypervisor stand-in's command line
only_ch = pytest.mark.only_vmm("cloud-hypervisor")
# Containerd and stdio behaviour, the same whatever the VMM: run with QEMU only.
only_qemu = pytest.mark.only_vmm("qemu")


@pytest.fixture(scope="module", params=VMMS)
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    """Once with QEMU, once with Cloud Hypervisor (the stand-in), but for the tests marked
    for one backend."""
    with containerd_env(
        request.param, agent_health_interval_s=2, agent_reconnect_timeout_s=2
    ) as env:
        yield env


@pytest.fixture(scope="module")
def cri(env: Env) -> Iterator[CriClient]:
    client = CriClient(env.containerd.address)
    yield client
    client.close()


def pod_in_cgroup(cri: CriClient, env: Env, name: str) -> Pod:
    linux = cri.pb.LinuxPodSandboxConfig(cgroup_parent=f"{CGROUP_PARENT}/{name}")
    return Pod(cri, env, name, linux=linux)


def processes(pattern: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if pattern.encode() in cmdline:
            found.append(int(pid))
    return found


def vm_processes(env: Env, program: str) -> list[int]:
    return [p for p in processes(str(env.state_dir)) if p in processes(program)]


def container_states(cri: CriClient, pod: Pod) -> dict[str, int]:
    listed = cri.runtime.ListContainers(
        cri.pb.ListContainersRequest(filter=cri.pb.ContainerFilter(pod_sandbox_id=pod.id))
    ).containers
    return {c.metadata.name: c.state for c in listed}


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until `check()` held; fails the test after `timeout`."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout}s"
        time.sleep(0.02)
    return time.monotonic() - started


def our_cgroups() -> list[str]:
    found = []
    for root in Path("/sys/fs/cgroup").iterdir():
        candidate = root / CGROUP_PARENT.lstrip("/")
        if candidate.exists():
            found += [str(p) for p in candidate.rglob("*") if p.is_dir()]
    return found


def leftovers(env: Env) -> list[str]:
    return env.wait_clean() + [f"cgroup {c}" for c in our_cgroups()]


@pytest.fixture(autouse=True)
def no_leaks(env: Env) -> Iterator[None]:
    yield
    assert leftovers(env) == []


def test_the_vm_is_charged_to_the_sandbox_cgroup(cri: CriClient, env: Env) -> None:
    pod = pod_in_cgroup(cri, env, "charged")
    try:
        pod.container("a", ["sleep", "600"])
        qemu = vm_processes(env, "qemu-system")
        vsock = vm_processes(env, "vhost-device-vsock")
        assert len(qemu) == 1 and len(vsock) == 1
        # The stand-in runs the VM on QEMU; CH itself is then the process charged.
        ch = vm_processes(env, CH_PROCESS)
        assert len(ch) == (1 if env.vmm == "cloud-hypervisor" else 0)
        for pid in (*qemu, *vsock, *ch):
            cgroups = Path(f"/proc/{pid}/cgroup").read_text()
            assert f"memory:{CGROUP_PARENT}/charged/{pod.id}" in cgroups, cgroups
            assert f"pids:{CGROUP_PARENT}/charged/{pod.id}" in cgroups, cgroups
    finally:
        pod.remove()


@pytest.mark.parametrize(
    "victim",
    [
        "qemu-system",
        "vhost-device-vsock",
        pytest.param(CH_PROCESS, marks=only_ch, id="cloud-hypervisor"),
    ],
)
def test_vmm_or_helper_death_reports_every_task_exited_at_once(
    cri: CriClient, env: Env, victim: str
) -> None:
    pod = pod_in_cgroup(cri, env, f"dies-{victim.split('/')[0][:4]}")
    try:
        pod.container("a", ["sleep", "600"])
        pod.container("b", ["sleep", "600"])
        (pid,) = vm_processes(env, victim)
        os.kill(pid, signal.SIGKILL)
        exited = cri.pb.CONTAINER_EXITED
        took = wait_until(
            lambda: set(container_states(cri, pod).values()) == {exited}, 10, "tasks exited"
        )
        assert took < 1.0, f"containers were reported exited {took:.2f}s after the {victim} died"

        def sandbox_state() -> int:
            request = cri.pb.PodSandboxStatusRequest(pod_sandbox_id=pod.id)
            return int(cri.runtime.PodSandboxStatus(request).status.state)

        wait_until(lambda: sandbox_state() == cri.pb.SANDBOX_NOTREADY, 5, "sandbox not ready")
    finally:
        pod.remove()


def test_guest_poweroff_reports_every_task_exited(cri: CriClient, env: Env) -> None:
    """The guest powering off (or panicking: with panic=-1 and -no-reboot it is the same
    QEMU exit) ends the pod."""
    pod = pod_in_cgroup(cri, env, "poweroff")
    try:
        pod.container("a", ["sleep", "600"])
        (socket,) = env.state_dir.rglob("vsock.sock")

        async def power_off() -> None:
            loop = asyncio.get_running_loop()
            async with await AgentClient.connect(socket, deadline=loop.time() + 10) as agent:
                await agent.shutdown()

        asyncio.run(power_off())
        exited = cri.pb.CONTAINER_EXITED
        wait_until(lambda: container_states(cri, pod) == {"a": exited}, 10, "a exited")
    finally:
        pod.remove()


@only_ch
def test_a_guest_reboot_ends_the_pod_at_once(cri: CriClient, env: Env) -> None:
    """CH restarts a rebooting guest (a panic with panic=-1 reboots) in place, without
    the agent's state: its `rebooting` event ends the VM. Here CH is asked to reboot
    the VM, which is the same reset to CH."""
    pod = pod_in_cgroup(cri, env, "reboot")
    try:
        pod.container("a", ["sleep", "600"])
        (api_socket,) = env.state_dir.rglob("api.sock")
        asyncio.run(ChHttp(api_socket).call("PUT", "vm.reboot"))
        exited = cri.pb.CONTAINER_EXITED
        took = wait_until(lambda: container_states(cri, pod) == {"a": exited}, 10, "a exited")
        assert took < 2.0, f"the reboot was noticed only after {took:.2f}s"
        assert vm_processes(env, CH_PROCESS) == []
    finally:
        pod.remove()


def _kill_shim_when(env: Env, ready: Callable[[], bool], timeout: float = 120) -> None:
    wait_until(ready, timeout, "the moment to kill the shim")
    for pid, _ in shim_processes(env.containerd):
        os.kill(pid, signal.SIGKILL)


def _in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as err:  # the call is expected to fail: keep what it said
            errors.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


def _remove_all_pods(cri: CriClient) -> None:
    for sandbox in cri.runtime.ListPodSandbox(cri.pb.ListPodSandboxRequest()).items:
        cri.runtime.StopPodSandbox(cri.pb.StopPodSandboxRequest(pod_sandbox_id=sandbox.id))
        cri.runtime.RemovePodSandbox(cri.pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox.id))


def test_shim_killed_during_boot(cri: CriClient, env: Env) -> None:
    thread, errors = _in_thread(lambda: pod_in_cgroup(cri, env, "boot-kill"))
    _kill_shim_when(env, lambda: bool(vm_processes(env, "qemu-system")))
    thread.join(180)
    assert errors and isinstance(errors[0], grpc.RpcError)
    _remove_all_pods(cri)


def test_shim_killed_during_hot_plug(cri: CriClient, env: Env) -> None:
    pod = pod_in_cgroup(cri, env, "plug-kill")
    disks = env.state_dir.parent / "disks"
    thread, _ = _in_thread(lambda: pod.container("a", ["sleep", "600"]))
    _kill_shim_when(env, lambda: any(disks.rglob("*.ext4")))
    thread.join(180)
    pod.remove()


def test_shim_killed_during_teardown(cri: CriClient, env: Env) -> None:
    pod = pod_in_cgroup(cri, env, "stop-kill")
    pod.container("a", ["sleep", "600"])
    thread, _ = _in_thread(pod.remove)
    time.sleep(0.05)
    for pid, _ in shim_processes(env.containerd):
        os.kill(pid, signal.SIGKILL)
    thread.join(180)
    _remove_all_pods(cri)


def test_second_delete_after_a_crash_is_harmless(cri: CriClient, env: Env) -> None:
    """containerd's delete ran already; running it again finds nothing and succeeds."""
    pod = pod_in_cgroup(cri, env, "twice")
    try:
        cid = pod.container("a", ["sleep", "600"])
        bundle = env.containerd.root / "state" / "io.containerd.runtime.v2.task" / "k8s.io" / cid
        ((shim, _),) = shim_processes(env.containerd)
        os.kill(shim, signal.SIGKILL)
        exited = cri.pb.CONTAINER_EXITED
        wait_until(lambda: container_states(cri, pod) == {"a": exited}, 60, "a exited")
        again = subprocess.run(
            [
                str(SHIM_BIN_DIR / "containerd-shim-cloudhv-v1"),
                "-namespace", "k8s.io", "-address", str(env.containerd.address),
                "-id", cid, "-bundle", str(bundle), "delete",
            ],
            capture_output=True,
            env={**os.environ, "CLOUDHV_CONFIG": str(env.scratch / "shim.json")},
            timeout=60,
        )
        assert again.returncode == 0, again.stderr
        assert b"Traceback" not in again.stderr
    finally:
        pod.remove()


@only_qemu
def test_containerd_restart_keeps_pods_and_loses_no_event(cri: CriClient, env: Env) -> None:
    pod = pod_in_cgroup(cri, env, "restart")
    try:
        long = pod.container("long", ["sh", "-c", "while true; do echo tick; sleep 0.2; done"])
        short = pod.container("short", ["sh", "-c", "sleep 3; exit 7"])
        env.restart_containerd()  # takes longer than the short container lives
        client = CriClient(env.containerd.address)
        wait_until(lambda: _cri_ready(client), 60, "CRI up again")
        try:
            states = container_states(client, pod)
            assert states["long"] == client.pb.CONTAINER_RUNNING
            exited = client.pb.CONTAINER_EXITED
            wait_until(lambda: container_states(client, pod)["short"] == exited, 30, "short")
            status = client.runtime.ContainerStatus(
                client.pb.ContainerStatusRequest(container_id=short)
            ).status
            assert status.exit_code == 7  # its TaskExit, sent during the restart, arrived
            out, _, code = pod.exec_sync(long, ["echo", "still here"])  # exec works
            assert (out, code) == (b"still here\n", 0)
            log = pod.log_dir / "long.log"
            size = log.stat().st_size
            wait_until(lambda: log.stat().st_size > size, 10, "logs continue")
        finally:
            client.close()
    finally:
        pod.remove()


def _cri_ready(client: CriClient) -> bool:
    try:
        client.runtime.Version(client.pb.VersionRequest(), timeout=5)
        client.runtime.ListContainers(client.pb.ListContainersRequest(), timeout=5)
    except grpc.RpcError:
        return False
    return True


@only_qemu
def test_slow_reader_gets_every_byte_and_others_keep_flowing(env: Env) -> None:
    """A ctr task's stdout reader stops for 10 s while the container writes 20 MB; it
    then gets all 20 MB, and another container's output flows meanwhile."""
    size = 20 * 1000 * 1000
    pattern = "yes 0123456789abcdefghijklmnopqrstuvwxyz | head -c %d" % size
    expected = hashlib.sha256()
    line = b"0123456789abcdefghijklmnopqrstuvwxyz\n"
    whole, rest = divmod(size, len(line))
    expected.update(line * whole + line[:rest])
    ctr = ["ctr", "--address", str(env.containerd.address), "-n", "default"]
    writer = subprocess.Popen(
        [*ctr, "run", "--rm", "--runtime", RUNTIME, BUSYBOX, "slow-reader", "sh", "-c", pattern],
        stdout=subprocess.PIPE,
    )
    ticker = subprocess.Popen(
        [
            *ctr, "run", "--rm", "--runtime", RUNTIME, BUSYBOX, "ticker",
            "sh", "-c", "for i in $(seq 60); do echo tick $i; sleep 0.25; done",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert writer.stdout is not None and ticker.stdout is not None
        first = writer.stdout.read(65536)
        ticks: list[float] = []
        ticker_out = ticker.stdout

        def count_ticks() -> None:
            for _ in iter(ticker_out.readline, b""):
                ticks.append(time.monotonic())

        reader = threading.Thread(target=count_ticks)
        reader.start()
        paused_at = time.monotonic()
        time.sleep(10.0)  # the writer's reader stops reading
        resumed_at = time.monotonic()
        digest = hashlib.sha256(first)
        while chunk := writer.stdout.read(1 << 20):
            digest.update(chunk)
        assert writer.wait(120) == 0
        assert digest.hexdigest() == expected.hexdigest()
        reader.join(120)
        during = [t for t in ticks if paused_at < t < resumed_at]
        assert len(during) >= 10, f"the other container's output stalled: {len(during)} ticks"
    finally:
        for proc in (writer, ticker):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _forkers() -> list[int]:
    return processes("shim.forker")


def test_crash_isolation_one_pods_shim_and_the_shared_parent(cri: CriClient, env: Env) -> None:
    """Three pods, their daemons forked by one shared parent. SIGKILL of one pod's daemon
    affects that pod only; SIGKILL of the parent affects none; a pod started after that
    boots (start spawns its daemon itself, then a new parent)."""
    pods = [pod_in_cgroup(cri, env, f"iso{n}") for n in range(3)]
    try:
        cids = [pod.container("a", ["sleep", "600"]) for pod in pods]
        daemons = {pid: cmd for pid, cmd in shim_processes(env.containerd)}
        assert len(daemons) == 3
        forked = [pid for pid, cmd in daemons.items() if cmd.startswith("containerd-shim")]
        assert forked, "no daemon was forked by the shared parent"
        victim = forked[0]
        victim_pod = next(p for p in pods if p.id in daemons[victim])
        os.kill(victim, signal.SIGKILL)
        exited = cri.pb.CONTAINER_EXITED
        wait_until(lambda: container_states(cri, victim_pod) == {"a": exited}, 60, "victim")
        for pod, cid in zip(pods, cids, strict=True):
            if pod is not victim_pod:
                assert pod.exec_sync(cid, ["echo", "alive"]) == (b"alive\n", b"", 0)
        for parent in _forkers():
            os.kill(parent, signal.SIGKILL)
        for pod, cid in zip(pods, cids, strict=True):
            if pod is not victim_pod:
                assert pod.exec_sync(cid, ["echo", "still"]) == (b"still\n", b"", 0)
        late = pod_in_cgroup(cri, env, "iso-late")
        pods.append(late)
        late_cid = late.container("a", ["sleep", "600"])
        assert late.exec_sync(late_cid, ["echo", "new"]) == (b"new\n", b"", 0)
    finally:
        for pod in pods:
            pod.remove()

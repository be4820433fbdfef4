"""Measurements of the pod path, side by side in one run, through a private containerd.

Each function takes the running environment and returns plain numbers; `bench/__main__.py`
runs them, writes bench/results.json and draws the charts. All times are wall clock on
this machine (QEMU TCG here), medians of N with min and max.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import re
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import ksm
from bench.procfs import cpu_ticks
from shim import forker_client
from shim.agent import AgentClient
from shim.config import TCG_TB_SIZE_MIB
from shim.vmm.qemu import QemuVmm
from tests.integration.containerd_env import ensure_shim_wrapper
from tests.integration.cri import CriClient
from tests.integration.ctr_fixtures import BUSYBOX, Env, containerd_env, shim_processes
from tests.integration.vm_fixtures import qemu_options, vm_spec

HANDLER = "cloudhv"


def summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


# -- host memory --------------------------------------------------------------------------


def rollup(pid: int) -> dict[str, int]:
    """smaps_rollup in KiB (empty for a process that is gone)."""
    values: dict[str, int] = {}
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
    except OSError:
        return values
    for line in lines:
        key, value = line.split(":", 1)
        values[key] = int(value.split()[0])
    return values


def processes_matching(*needles: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if all(n.encode() in cmdline for n in needles):
            found.append(int(entry.name))
    return found


def shim_pss_kib(env: Env) -> tuple[int, int]:
    """(PSS of every shim process: the pods' daemons and the shared parent, daemon count)."""
    daemons = [pid for pid, _ in shim_processes(env.containerd)]
    # This checkout's shared parent only: other checkouts on the machine run their own.
    parents = processes_matching("shim.forker", str(forker_client.socket_path()))
    return sum(rollup(p).get("Pss", 0) for p in daemons + parents), len(daemons)


def vmm_pss_kib(env: Env) -> list[int]:
    """PSS of each pod's VMM plus its vsock helper, per pod."""
    qemus = processes_matching("qemu-system", str(env.state_dir))
    helpers = processes_matching("vhost-device-vsock", str(env.state_dir))
    per_pod = []
    for qemu in qemus:
        vm_dir = _vm_dir(qemu)
        helper = [h for h in helpers if vm_dir and vm_dir in _cmdline(h)]
        per_pod.append(rollup(qemu).get("Pss", 0) + sum(rollup(h).get("Pss", 0) for h in helper))
    return per_pod


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _vm_dir(qemu: int) -> str:
    match = re.search(r"unix:(\S+)/qmp\.sock", _cmdline(qemu))
    return match.group(1) if match else ""


# -- pods through CRI -------------------------------------------------------------------


_POD_NUMBERS = itertools.count(1)


class Pods:
    """CRI pods made for a measurement, all removed by `close()`."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.cri = CriClient(env.containerd.address)
        self.pb = self.cri.pb
        self.ids: list[str] = []
        self.last_log = Path()

    def run(self, command: list[str], *, name: str = "") -> tuple[str, str, float, float]:
        """(pod id, container id, RunPodSandbox s, RunPodSandbox → first log line s)."""
        # Unique across every Pods of a run: a log file reused would already hold
        # lines, and "first output" would be seen at once.
        name = name or f"m{next(_POD_NUMBERS)}"
        log_dir = self.env.scratch / "logs" / name
        log_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        pod, cid, ran = self.cri.start_pod(name, log_dir, BUSYBOX, command)
        self.ids.append(pod)
        log = self.last_log = log_dir / "app.log"
        while not (log.exists() and log.stat().st_size > 0):
            time.sleep(0.002)
        return pod, cid, ran, time.monotonic() - started

    def exec_sync(self, cid: str, cmd: list[str]) -> Any:
        return self.cri.runtime.ExecSync(
            self.pb.ExecSyncRequest(container_id=cid, cmd=cmd, timeout=60), timeout=120
        )

    def remove(self, pod: str) -> None:
        self.cri.remove_pod(pod)
        self.ids.remove(pod)

    def close(self) -> None:
        for pod in list(self.ids):
            self.remove(pod)
        self.cri.close()


# -- the bare VM, the limit a pod start is held to ------------------------------------------


async def _bare_boot(state_dir: Path) -> float:
    # The translation cache the shim's default config gives its VMs.
    options = dataclasses.replace(qemu_options(), tcg_tb_size_mib=TCG_TB_SIZE_MIB)
    vmm = QemuVmm(vm_spec(state_dir), options)
    started = time.monotonic()
    await vmm.start()
    try:
        loop = asyncio.get_running_loop()
        await vmm.wait_vsock_ready(loop.time() + 120)
        agent = await AgentClient.connect(vmm.agent_socket, deadline=loop.time() + 120)
        try:
            assert await agent.health()
            return time.monotonic() - started
        finally:
            await agent.close()
    finally:
        await vmm.shutdown(timeout=5)


def bare_boots(count: int, *, at_once: bool = False) -> list[float]:
    """Seconds from VMM launch to agent Health, for `count` VMs one by one or all at once."""

    async def run() -> list[float]:
        with tempfile.TemporaryDirectory(prefix="cloudhv-bench-") as scratch:
            dirs = [Path(scratch) / f"vm{i}" for i in range(count)]
            if at_once:
                return list(await asyncio.gather(*(_bare_boot(d) for d in dirs)))
            return [await _bare_boot(d) for d in dirs]

    return asyncio.run(run())


# -- measurements -----------------------------------------------------------------------


def pod_start_vs_bare_boot(env: Env, n: int) -> dict[str, Any]:
    """RunPodSandbox → the first container's output in its log, against a bare boot of
    the same kernel and rootfs on the same VMM to agent-ready; interleaved, N each."""
    pods = Pods(env)
    starts, bares, runs = [], [], []
    phases: dict[str, list[float]] = {}
    guest: dict[str, list[float]] = {}
    try:
        for _ in range(n):
            bares += bare_boots(1)
            began = time.time()
            pod, cid, ran, to_log = pods.run(["sh", "-c", "echo first; sleep 600"])
            starts.append(to_log)
            runs.append(ran)
            for name, seconds in pod_phases(env, pod, cid, began, ran, to_log).items():
                phases.setdefault(name, []).append(seconds)
            for name, seconds in guest_calls(env).items():
                guest.setdefault(name, []).append(seconds)
            pods.remove(pod)
    finally:
        pods.close()
    return {
        "pod_start_s": summary(starts),
        "run_pod_sandbox_s": summary(runs),
        "bare_boot_s": summary(bares),
        "ratio": statistics.median(starts) / statistics.median(bares),
        "phases_ms": {name: statistics.median(v) * 1000 for name, v in phases.items()},
        "guest_calls_ms": {name: statistics.median(v) * 1000 for name, v in guest.items()},
    }


_AGENT_CALL = re.compile(r"^agent: (\w+) .*-> OK \((\d+\.\d+) ms\)")


def guest_calls(env: Env) -> dict[str, float]:
    """The agent's own time for each call (seconds, summed per call name) in the one
    running pod's console: what of a phase is the guest's work, under TCG."""
    (console,) = env.state_dir.rglob("console.log")
    totals: dict[str, float] = {}
    for line in console.read_text(errors="replace").splitlines():
        match = _AGENT_CALL.match(line)
        if match:
            name = match.group(1)
            totals[name] = totals.get(name, 0.0) + float(match.group(2)) / 1000
    return totals


# The daemon's own log lines, as containerd copies them into its log.
_EVENT = re.compile(r'^time="([^"]+)" \S+ shim=cloudhv pid=(\d+) event=(\w+)(.*)$')


def pod_phases(
    env: Env, pod_id: str, container_id: str, began: float, run_s: float, output_s: float
) -> dict[str, float]:
    """Where a pod start's time went (seconds), from the events the shim logs: its
    daemon's start, the VMM launch, the VM ready, the pod joined, the container created;
    `began` is the wall time RunPodSandbox was called at."""
    import datetime

    at: dict[str, float] = {}
    daemon = ""
    text = (env.containerd.root / "containerd.log").read_text(errors="replace")
    for line in text.splitlines():
        match = _EVENT.match(line)
        if not match:
            continue
        stamp, pid, event, rest = match.groups()
        if event == "daemon_start" and f"pod={pod_id}" in rest:
            daemon = pid
        if pid != daemon or event in at:
            continue
        if event == "container_created" and f"container={container_id}" not in rest:
            continue
        at[event] = datetime.datetime.fromisoformat(stamp).timestamp()
    marks = [
        ("containerd, then `start` until the daemon runs", began, at.get("daemon_start")),
        ("daemon: cgroup, virtiofsd, vsock backend", at.get("daemon_start"), at.get("vmm_launch")),
        ("VMM launch to agent ready (the boot)", at.get("vmm_launch"), at.get("vm_ready")),
        ("guest setup: NIC, addresses, DNS, SetupPod", at.get("vm_ready"), at.get("vm_joined")),
        ("containerd finishing RunPodSandbox", at.get("vm_joined"), began + run_s),
        ("container create: disks, copies, crun create", began + run_s,
         at.get("container_created")),
        ("crun start to the first line in the CRI log", at.get("container_created"),
         began + output_s),
    ]
    return {name: end - start for name, start, end in marks if start and end}


def burst(env: Env, count: int) -> dict[str, Any]:
    """`count` pods started at once against `count` bare VMs booted at once (wall time
    until all are ready)."""
    started = time.monotonic()
    bare = bare_boots(count, at_once=True)
    bare_wall = time.monotonic() - started
    pods = Pods(env)
    errors: list[BaseException] = []

    def one() -> None:
        try:
            pods.run(["sh", "-c", "echo up; sleep 600"])
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=one) for _ in range(count)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    pods_wall = time.monotonic() - started
    pods.close()
    if errors:
        raise errors[0]
    return {
        "count": count,
        "pods_wall_s": pods_wall,
        "bare_wall_s": bare_wall,
        "bare_each_s": summary(bare),
        "ratio": pods_wall / bare_wall,
    }


def memory_with_pods(env: Env, count: int, *, with_ksm: bool = True) -> dict[str, Any]:
    """With `count` idle busybox pods running: shim PSS per pod (every shim process,
    the shared parent included) and VMM + helpers PSS per pod; with `with_ksm`, the
    same again once the node's same-page merging has run (bench/ksm.py)."""
    pods = Pods(env)

    def sample() -> dict[str, Any]:
        shim_total, daemons = shim_pss_kib(env)
        vmm = vmm_pss_kib(env)
        return {
            "daemons": daemons,
            "shim_pss_per_pod_mib": shim_total / count / 1024,
            "vmm_pss_per_pod_mib": summary([v / 1024 for v in vmm]),
        }

    try:
        for _ in range(count):
            pods.run(["sh", "-c", "echo idle; sleep 100000"])
        time.sleep(3)
        result: dict[str, Any] = {"pods": count, **sample()}
        if with_ksm and ksm.available():
            result["with_ksm"] = ksm.measure_merged(sample)
        return result
    finally:
        pods.close()


# Runs the shim binary as containerd would, then records the CPU time the binary used
# (bash's `times`: its children's user and system time). The wrapper's own is not counted.
_TIMING_WRAPPER = """#!/bin/bash
"{shim}" "$@"
code=$?
times > "{out}/$$.times"
exit $code
"""


def lifecycle_cpu(n: int) -> dict[str, Any]:
    """Shim CPU time for one pod lifecycle (run, one container, stop, remove), in a
    containerd of its own whose shim binary is timed: every `start` and `delete`
    invocation, the shared parent with the workers that ran them (reaped by it), and
    the pod's daemon until it exits (sampled every 5 ms: a double-forked daemon is
    reaped by init, which keeps its total). containerd's other children (the CNI
    plugins) are reported apart."""
    ticks_per_s = _clock_ticks()
    scratch = Path(tempfile.mkdtemp(prefix="chv-bench-cpu-", dir="/run"))
    times_dir = scratch / "times"
    times_dir.mkdir()
    wrapper = scratch / "containerd-shim-cloudhv-v1"
    wrapper.write_text(_TIMING_WRAPPER.format(shim=ensure_shim_wrapper(), out=times_dir))
    wrapper.chmod(0o755)
    results, parts = [], []
    try:
        with containerd_env(default_memory_mib=256, shim=wrapper) as env:
            containerd = env.containerd.process.pid
            pods = Pods(env)
            try:
                for _ in range(n):
                    for old in times_dir.iterdir():
                        old.unlink()
                    _, children_before = cpu_ticks(containerd)
                    parent_before = _parent_ticks()
                    pod, _, _, _ = pods.run(["sh", "-c", "echo x; sleep 600"])
                    ((daemon, _),) = shim_processes(env.containerd)
                    with _LastTicks(daemon) as daemon_ticks:
                        pods.remove(pod)
                        daemon_ticks.wait_gone(10.0)
                    time.sleep(0.6)  # the parent reaps its last worker
                    _, children_after = cpu_ticks(containerd)
                    invocations = [_times_s(f) for f in times_dir.iterdir()]
                    parent = (_parent_ticks() - parent_before) / ticks_per_s
                    daemon_s = daemon_ticks.last / ticks_per_s
                    others = (children_after - children_before) / ticks_per_s - sum(invocations)
                    results.append(sum(invocations) + parent + daemon_s)
                    parts.append((sum(invocations), len(invocations), parent, daemon_s, others))
            finally:
                pods.close()
    finally:
        subprocess.run(["rm", "-rf", str(scratch)], check=False)
    return {
        "shim_cpu_s": summary(results),
        "invocations_s": summary([p[0] for p in parts]),
        "invocations": summary([p[1] for p in parts]),
        "parent_and_workers_s": summary([p[2] for p in parts]),
        "daemon_s": summary([p[3] for p in parts]),
        "containerd_other_children_s": summary([p[4] for p in parts]),
    }


def _times_s(path: Path) -> float:
    """The children's line of bash's `times` (`0m0.012s 0m0.004s`), in seconds."""
    children = path.read_text().splitlines()[1]
    total = 0.0
    for part in children.split():
        minutes, seconds = part.rstrip("s").split("m")
        total += int(minutes) * 60 + float(seconds)
    return total


def _parent_ticks() -> int:
    """This checkout's shared parent: its CPU with that of the children it reaped."""
    pids = processes_matching("shim.forker", str(forker_client.socket_path()))
    return sum(sum(cpu_ticks(pid)) for pid in pids)


class _LastTicks:
    """The CPU ticks of `pid`, sampled until it is gone: the last value seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.last = cpu_ticks(pid)[0]
        self._gone = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            try:
                self.last = cpu_ticks(self.pid)[0]
            except (OSError, ValueError, IndexError):
                self._gone.set()
                return
            time.sleep(0.005)

    def wait_gone(self, timeout: float) -> None:
        if not self._gone.wait(timeout):
            raise TimeoutError(f"the daemon {self.pid} did not exit")

    def __enter__(self) -> _LastTicks:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._thread.join(timeout=1)


def _clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


def timed_execs(pods: Pods, container_id: str, n: int) -> list[float]:
    """Seconds of `n` ExecSync `true` in `container_id`, after three to warm up."""
    for _ in range(3):
        pods.exec_sync(container_id, ["true"])
    times = []
    for _ in range(n):
        started = time.monotonic()
        pods.exec_sync(container_id, ["true"])
        times.append(time.monotonic() - started)
    return times


def exec_round_trip(env: Env, n: int) -> dict[str, Any]:
    """ExecSync(`true`) at the CRI client, and the in-guest crun exec (the agent's own
    timing of ExecProcess on the console), so their difference is the shim's share."""
    pods = Pods(env)
    try:
        pod, cid, _, _ = pods.run(["sh", "-c", "echo x; sleep 600"])
        times = timed_execs(pods, cid, n)
        console = next(env.state_dir.rglob("console.log")).read_text(errors="replace")
        pattern = r"ExecProcess\S* .*?-> OK \((\d+\.\d+) ms\)"
        crun = [float(m) / 1000 for m in re.findall(pattern, console)][-n:]
        pods.remove(pod)
    finally:
        pods.close()
    result: dict[str, Any] = {"exec_sync_s": summary(times)}
    if crun:
        result["crun_exec_s"] = summary(crun)
        result["overhead_s"] = statistics.median(times) - statistics.median(crun)
    return result


def stdout_throughput(env: Env, megabytes: int) -> dict[str, Any]:
    """A container writes `megabytes` MB to stdout: MB/s until its CRI log has it all.

    The producer is `dd if=/dev/zero bs=1M`: the cheapest writer busybox has, so the
    figure is the path's (pipe, agent, vsock, shim, FIFO, containerd), not the guest
    program's (`tr`, as before, ran at ~7 MB/s under TCG on its own). Its bytes are
    NULs without newlines: containerd cuts them into 16 KiB partial lines. The same
    producer writing to /dev/null in the guest (ExecSync, busybox `time`) is
    `producer_mb_per_s`, so the ratio between the two is visible.
    """
    pods = Pods(env)
    count = megabytes * 1_000_000 // (1 << 20)
    produce = f"dd if=/dev/zero bs=1048576 count={count} 2>/dev/null"
    try:
        # It stays up after its output, for the ExecSync runs of the producer alone.
        command = ["sh", "-c", f"echo start; sleep 1; {produce}; echo; echo done; sleep 100000"]
        pod, cid, _, _ = pods.run(command)
        log = pods.last_log
        while b" stdout F start" not in log.read_bytes()[:200]:
            time.sleep(0.01)
        started = time.monotonic()
        while not _tail(log).endswith(b" stdout F done\n"):
            time.sleep(0.01)
        elapsed = time.monotonic() - started - 1.0
        alone = []
        for _ in range(3):
            out = pods.exec_sync(cid, ["sh", "-c", f"time sh -c '{produce}' >/dev/null"])
            alone.append(_busybox_time(out.stderr.decode()))
        pods.remove(pod)
    finally:
        pods.close()
    moved = count * (1 << 20) / 1e6
    return {
        "megabytes": moved,
        "producer": produce,
        "seconds": elapsed,
        "mb_per_s": moved / elapsed,
        "producer_mb_per_s": moved / statistics.median(alone),
    }


def _busybox_time(text: str) -> float:
    """Seconds of `real` in busybox time's report (`real\t0m 1.23s`)."""
    match = re.search(r"real\s+(\d+)m\s*([\d.]+)s", text)
    if not match:
        raise ValueError(f"no busybox time report in {text!r}")
    return int(match.group(1)) * 60 + float(match.group(2))


def _tail(path: Path, size: int = 64) -> bytes:
    with path.open("rb") as handle:
        handle.seek(max(0, path.stat().st_size - size))
        return handle.read()


def scaling(env: Env, counts: Sequence[int]) -> list[dict[str, Any]]:
    """Pod start latency and per-pod host memory with 1, 2, 4, ... pods already running."""
    pods = Pods(env)
    rows = []
    try:
        running = 0
        for count in counts:
            while running < count - 1:
                pods.run(["sh", "-c", "echo idle; sleep 100000"])
                running += 1
            pod, _, _, to_log = pods.run(["sh", "-c", "echo measured; sleep 100000"])
            running += 1
            time.sleep(2)
            shim_total, _ = shim_pss_kib(env)
            vmm = vmm_pss_kib(env)
            rows.append(
                {
                    "pods": running,
                    "start_s": to_log,
                    "shim_pss_per_pod_mib": shim_total / running / 1024,
                    "vmm_pss_per_pod_mib": statistics.median(vmm) / 1024,
                    "host_mib_per_pod": (shim_total + sum(vmm)) / running / 1024,
                }
            )
    finally:
        pods.close()
    return rows


def timed(label: str, fn: Callable[[], Any]) -> Any:
    started = time.monotonic()
    print(f"bench: {label} ...", flush=True)
    result = fn()
    print(f"bench: {label}: {time.monotonic() - started:.0f} s", flush=True)
    return result


def git_head() -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()

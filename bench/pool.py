"""Warm (a pooled VM adopted) against cold (a VM booted for the pod) pod starts, side by
side, and what an idle pooled VM costs the host.

Usage: python -m bench.pool [-n 5] [--size 2]   (root, repository root, PYTHONPATH=.)

Two private containerds run at once, with the same shim config but for `pool.size`:
0 in one (every pod boots cold), `--size` in the other. N rounds, each: a cold pod,
then a warm one (the pool full before each pod, so no pooled VM boots during a
measurement; the idle pooled VMs run through both). Timed at the CRI client:
RunPodSandbox, and RunPodSandbox to the first container's output in its CRI log.
The idle cost of a pooled VM is the PSS of its VMM, helpers and daemon, as
`cloudhvctl ps` reports it, next to a running cold pod's.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path
from typing import Any

from shim.ctl import pods as pods_mod
from tests.integration.cri import CriClient
from tests.integration.ctr_fixtures import BUSYBOX, Env, containerd_env

HANDLER = "cloudhv"
OUT = Path(__file__).resolve().parent / "results-pool.json"


class Runner:
    def __init__(self, env: Env, name: str) -> None:
        self.env = env
        self.name = name
        self.cri = CriClient(env.containerd.address)
        self.count = 0

    def pod(self) -> tuple[float, float, str]:
        """(RunPodSandbox s, RunPodSandbox to first output s, pool origin); pod removed."""
        self.count += 1
        name = f"{self.name}{self.count}"
        log_dir = self.env.scratch / "logs" / name
        log_dir.mkdir(parents=True)
        started = time.monotonic()
        pod, _, run_s = self.cri.start_pod(
            name, log_dir, BUSYBOX, ["sh", "-c", "echo first-output; sleep 600"], timeout=180
        )
        origin = _origin(self.env, pod)
        log = log_dir / "app.log"
        while not (log.exists() and b"first-output" in log.read_bytes()):
            time.sleep(0.005)
        output_s = time.monotonic() - started
        self.cri.remove_pod(pod, timeout=120)
        return run_s, output_s, origin


def _origin(env: Env, pod_id: str) -> str:
    for path in env.state_dir.glob("*/state.json"):
        state = json.loads(path.read_text())
        if state["pod_id"] == pod_id:
            return str(state.get("pool", ""))
    return "?"


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "median_ms": round(statistics.median(values) * 1000, 1),
        "min_ms": round(min(values) * 1000, 1),
        "max_ms": round(max(values) * 1000, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=5)
    parser.add_argument("--size", type=int, default=2, help="pool.size of the warm side")
    args = parser.parse_args()
    runs: dict[str, list[tuple[float, float, str]]] = {"cold": [], "warm": []}
    memory: dict[str, Any] = {}
    with containerd_env() as cold_env, containerd_env(pool={"size": args.size}) as warm_env:
        cold, warm = Runner(cold_env, "cold"), Runner(warm_env, "warm")
        warm.pod()  # names the pool to the shared parent (a cold start: the pool is empty)
        for _ in range(args.n):
            warm_env.wait_pool(args.size)
            runs["cold"].append(cold.pod())
            warm_env.wait_pool(args.size)
            runs["warm"].append(warm.pod())
        warm_env.wait_pool(args.size)
        time.sleep(5.0)  # idle: the guests settled after their boot
        views = pods_mod.list_pods(warm_env.state_dir)
        pooled = [v.host_memory_kib / 1024 for v in views if v.pool == "ready"]
        memory["pooled_vm_pss_mib"] = [round(m, 1) for m in pooled]
        memory["pooled_vm_pss_median_mib"] = round(statistics.median(pooled), 1)
        cold_pod = _running_pod_memory(cold)
        memory["cold_pod_pss_mib"] = round(cold_pod, 1)
        log = (warm_env.containerd.root / "containerd.log").read_text(errors="replace")
        adopted = re.findall(r"event=pool_vm_adopted .*?adopt_ms=(\d+)", log)
        adopt = [float(ms) / 1000 for ms in adopted]
        warm_env.drain_pool()
        for client in (cold, warm):
            client.cri.close()
    origins = {side: [r[2] for r in results] for side, results in runs.items()}
    assert all(o == "" for o in origins["cold"]), origins
    assert all(o == "adopted" for o in origins["warm"]), origins
    report: dict[str, Any] = {
        "n": args.n,
        "pool_size": args.size,
        "run_pod_sandbox": {side: _summary([r[0] for r in rs]) for side, rs in runs.items()},
        "to_first_output": {side: _summary([r[1] for r in rs]) for side, rs in runs.items()},
        "memory": memory,
        # Inside the pooled VM's daemon: the take received to the pod's VM joined.
        "adoption": _summary(adopt),
    }
    for what in ("run_pod_sandbox", "to_first_output"):
        ratio = report[what]["warm"]["median_ms"] / report[what]["cold"]["median_ms"]
        report[what]["warm_over_cold"] = round(ratio, 3)
    OUT.write_text(json.dumps(report, indent=1))
    print(f"{'':22} {'cold median':>12} {'warm median':>12} {'warm/cold':>10}   (ms; n={args.n})")
    for what in ("run_pod_sandbox", "to_first_output"):
        row = report[what]
        print(
            f"{what:22} {row['cold']['median_ms']:12.0f} {row['warm']['median_ms']:12.0f} "
            f"{row['warm_over_cold']:10.2f}   cold {row['cold']['min_ms']:.0f}-"
            f"{row['cold']['max_ms']:.0f}, warm {row['warm']['min_ms']:.0f}-"
            f"{row['warm']['max_ms']:.0f}"
        )
    print(f"adoption in the pooled VM's daemon: median {report['adoption']['median_ms']:.0f} ms")
    print(
        f"idle pooled VM host memory (PSS): {memory['pooled_vm_pss_median_mib']} MiB each "
        f"({memory['pooled_vm_pss_mib']}); a running cold busybox pod: "
        f"{memory['cold_pod_pss_mib']} MiB"
    )


def _running_pod_memory(runner: Runner) -> float:
    """PSS of a running cold pod (VMM, helpers, daemon), with one idle container."""
    pb, rt = runner.cri.pb, runner.cri.runtime
    log_dir = runner.env.scratch / "logs" / "mem"
    log_dir.mkdir(parents=True)
    config = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name="mem", uid="u-mem", namespace="bench"),
        hostname="mem",
        log_directory=str(log_dir),
    )
    pod = rt.RunPodSandbox(
        pb.RunPodSandboxRequest(config=config, runtime_handler=HANDLER), timeout=180
    ).pod_sandbox_id
    try:
        time.sleep(5.0)
        views = pods_mod.list_pods(runner.env.state_dir)
        return next(v.host_memory_kib for v in views if v.pod_id == pod) / 1024
    finally:
        rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=120)
        rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=120)


if __name__ == "__main__":
    main()

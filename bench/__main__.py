"""`python -m bench`: every measurement of the pod path in one run, with a report.

Usage (root, repository root, after scripts/test.sh's setup and build; PYTHONPATH=.):
    python -m bench [-n 5] [--quick]
Starts a private containerd (tests/integration's harness), runs each measurement N
times side by side, and writes bench/results.json and PNG charts in bench/
(scaling.png; phases.png, where a pod start's time goes, from the shim's events). The
targets of docs/performance.md are printed with the measured figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from bench import measure
from tests.integration.ctr_fixtures import containerd_env

OUT = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=5, help="repetitions per measurement")
    parser.add_argument("--quick", action="store_true", help="fewer pods in the scaling run")
    args = parser.parse_args()
    counts = [1, 2, 4] if args.quick else [1, 2, 4, 8, 16]
    results: dict[str, Any] = {
        "machine": {"kernel": platform.release(), "cpus": _cpus(), "accel": "tcg"},
        "commit": measure.git_head(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with containerd_env(default_memory_mib=256) as env:
        results["pod_start"] = measure.timed(
            "pod start vs bare boot", lambda: measure.pod_start_vs_bare_boot(env, args.n)
        )
        results["burst"] = measure.timed("10 pods at once", lambda: measure.burst(env, 10))
        results["memory"] = measure.timed(
            "memory with 10 pods", lambda: measure.memory_with_pods(env, 10)
        )
        results["exec"] = measure.timed("exec round trip", lambda: measure.exec_round_trip(env, 20))
        results["stdout"] = measure.timed(
            "stdout throughput", lambda: measure.stdout_throughput(env, 50)
        )
        results["scaling"] = measure.timed("scaling", lambda: measure.scaling(env, counts))
    results["lifecycle_cpu"] = measure.timed(
        "shim CPU per lifecycle", lambda: measure.lifecycle_cpu(args.n)
    )
    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    _charts(results)
    _print_targets(results)


def _cpus() -> int:
    return os.cpu_count() or 1


def _charts(results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["scaling"]
    pods = [r["pods"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(pods, [r["start_s"] for r in rows], marker="o")
    left.set(xlabel="pods running", ylabel="pod start (s)", title="Pod start as pods grow")
    right.plot(pods, [r["shim_pss_per_pod_mib"] for r in rows], marker="o", label="shim")
    right.plot(pods, [r["vmm_pss_per_pod_mib"] for r in rows], marker="o", label="VMM + helpers")
    right.set(xlabel="pods running", ylabel="PSS per pod (MiB)", title="Host memory per pod")
    right.legend()
    fig.tight_layout()
    fig.savefig(OUT / "scaling.png", dpi=100)
    plt.close(fig)
    phases = results["pod_start"].get("phases_ms") or {}
    if phases:
        fig, axis = plt.subplots(figsize=(10, 3))
        left = 0.0
        for name, ms in phases.items():
            axis.barh([0], [ms], left=left, label=f"{name} ({ms:.0f} ms)")
            left += ms
        axis.set(xlabel="ms from RunPodSandbox", yticks=[], title="Where a pod start goes")
        axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=2)
        fig.tight_layout()
        fig.savefig(OUT / "phases.png", dpi=100)
        plt.close(fig)


def _with_ksm(memory: dict[str, Any]) -> list[tuple[str, str]]:
    merged = memory.get("with_ksm")
    if not merged:
        return []
    return [(
        "  the same with the node's KSM on",
        f"{merged['shim_pss_per_pod_mib']:.1f} MiB (VMM + helpers "
        f"{merged['vmm_pss_per_pod_mib']['median']:.1f}; ksmd "
        f"{merged['ksmd_cpu_percent']:.1f}% of a core, settled in {merged['ksm_settle_s']:.0f} s)",
    )]


def _print_targets(results: dict[str, Any]) -> None:
    start, burst, memory = results["pod_start"], results["burst"], results["memory"]
    exec_, cpu, stdout = results["exec"], results["lifecycle_cpu"], results["stdout"]
    lines = [
        ("shim memory per pod, 10 pods (≤ 5 MiB)", f"{memory['shim_pss_per_pod_mib']:.1f} MiB"),
        *_with_ksm(memory),
        ("pod start ÷ bare boot (≤ 1.15)", f"{start['ratio']:.2f}"),
        ("10 pods at once ÷ 10 bare VMs (≤ 1.2)", f"{burst['ratio']:.2f}"),
        (
            "shim CPU per lifecycle (≤ 100 ms)",
            f"{cpu['shim_cpu_s']['median'] * 1000:.0f} ms (invocations "
            f"{cpu['invocations_s']['median'] * 1000:.0f}, parent and workers "
            f"{cpu['parent_and_workers_s']['median'] * 1000:.0f}, daemon "
            f"{cpu['daemon_s']['median'] * 1000:.0f})",
        ),
        (
            "exec round trip - crun exec (≤ 20 ms)",
            f"{exec_.get('overhead_s', float('nan')) * 1000:.0f} ms",
        ),
        ("stdout throughput (≥ 50 MB/s)",
         f"{stdout['mb_per_s']:.0f} MB/s (the producer alone {stdout['producer_mb_per_s']:.0f})"),
        (
            "VMM + helpers PSS per idle pod (≤ 48 MiB)",
            f"{memory['vmm_pss_per_pod_mib']['median']:.1f} MiB",
        ),
    ]
    for what, value in lines:
        print(f"{what:48} {value}")
    for name, ms in (start.get("phases_ms") or {}).items():
        print(f"  pod start phase: {name:50} {ms:6.0f} ms")
    for name, ms in (start.get("guest_calls_ms") or {}).items():
        print(f"  of which in the guest (agent's timing): {name:33} {ms:6.0f} ms")


if __name__ == "__main__":
    main()

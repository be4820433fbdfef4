"""crun at fixed addresses against randomised crun in a TCG guest, alternating.

Usage: python -m bench.crun_layout [--rounds 3] [--execs 20]   (root, PYTHONPATH=.)

Each round runs both configs (`qemu.tcg_crun_fixed_layout` true, then false), each in
a private containerd 1.6: 3 pods one after another, then `--execs` ExecSync `true` in
the last. Reported per config and round: ExecSync median and 90th percentile at the
CRI client, the agent's own timing of crun exec, start and create (from the pods'
consoles), and RunPodSandbox → first output.
"""

from __future__ import annotations

import argparse
import re
import statistics
from typing import Any

from bench.measure import Pods, timed_execs
from tests.integration.ctr_fixtures import containerd_env

PODS = 3


def _guest_ms(consoles: str, call: str) -> list[float]:
    return [float(m) for m in re.findall(rf"{call}\S* .*?-> OK \((\d+\.\d+) ms\)", consoles)]


def one_config(fixed_layout: bool, execs: int) -> dict[str, Any]:
    qemu = {"accel": "tcg", "hotplug_slots": 8, "tcg_crun_fixed_layout": fixed_layout}
    with containerd_env(default_memory_mib=256, qemu=qemu) as env:
        pods = Pods(env)
        try:
            first_output = []
            for _ in range(PODS):
                _, cid, _, to_log = pods.run(["sh", "-c", "echo x; sleep 600"])
                first_output.append(to_log)
            times = timed_execs(pods, cid, execs)
            consoles = "\n".join(
                p.read_text(errors="replace") for p in env.state_dir.rglob("console.log")
            )
        finally:
            pods.close()
    times.sort()
    return {
        "exec_sync_ms": statistics.median(times) * 1000,
        "exec_sync_p90_ms": times[int(len(times) * 0.9)] * 1000,
        "crun_exec_ms": statistics.median(_guest_ms(consoles, "ExecProcess")[-execs:]),
        "crun_start_ms": statistics.median(_guest_ms(consoles, "StartContainer")),
        "crun_create_ms": statistics.median(_guest_ms(consoles, "CreateContainer")),
        "first_output_ms": statistics.median(first_output) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--execs", type=int, default=20)
    args = parser.parse_args()
    for round_ in range(1, args.rounds + 1):
        for fixed in (True, False):
            row = one_config(fixed, args.execs)
            label = "fixed addresses" if fixed else "randomised"
            print(
                f"round {round_} {label:16} "
                + " ".join(f"{key} {value:.0f}" for key, value in row.items()),
                flush=True,
            )


if __name__ == "__main__":
    main()

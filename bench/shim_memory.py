"""Memory of the shim daemons with N pods running (one `ctr run -d` container each).

Usage: python -m bench.shim_memory [-n 10]   (root, from the repository root, PYTHONPATH=.)
Reports PSS (shared pages divided among the processes that map them, so N shims share
the interpreter and libraries) and RSS per shim daemon, and the VMM's RSS for scale.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from tests.integration.ctr_fixtures import BUSYBOX, containerd_env, shim_processes

RUNTIME = "io.containerd.cloudhv.v1"


def rollup(pid: int) -> dict[str, int]:
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        values[key] = int(value.split()[0])
    return values


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=10)
    args = parser.parse_args()
    with containerd_env(default_memory_mib=128) as env:
        ctr = env.containerd.ctr
        for index in range(args.n):
            ctr("run", "-d", "--runtime", RUNTIME, BUSYBOX, f"mem{index}", "sleep", "3600")
        time.sleep(2)
        shims = [pid for pid, _ in shim_processes(env.containerd)]
        pss = [rollup(pid)["Pss"] for pid in shims]
        rss = [rollup(pid)["Rss"] for pid in shims]
        print(f"pods running: {args.n}, shim daemons: {len(shims)}")
        print(
            f"shim PSS per daemon: median {statistics.median(pss) / 1024:.1f} MiB "
            f"(min {min(pss) / 1024:.1f}, max {max(pss) / 1024:.1f})"
        )
        print(f"shim RSS per daemon: median {statistics.median(rss) / 1024:.1f} MiB")
        for index in range(args.n):
            ctr("task", "kill", "-s", "SIGKILL", f"mem{index}", check=False)
        time.sleep(2)
        for index in range(args.n):
            ctr("task", "rm", f"mem{index}", check=False)
            ctr("container", "rm", f"mem{index}", check=False)


if __name__ == "__main__":
    main()

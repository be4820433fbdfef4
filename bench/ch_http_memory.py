"""Daemon memory of the two ways to speak Cloud Hypervisor's API: our asyncio client
(shim/vmm/ch_http.py) or requests-unixsocket (a thread per call).

Usage: python -m bench.ch_http_memory [-n 5]   (from the repository root, PYTHONPATH=.)

Starts `n` processes per variant at once, each importing what a pod's daemon imports
(shim.daemon) plus the CH backend, and for the second variant requests_unixsocket
with a Session (what a requests-based backend holds); then reads PSS and RSS from
/proc/<pid>/smaps_rollup while all of a variant's processes are alive, as
bench/shim_memory.py does for real daemons. PSS splits pages shared between the
processes (the interpreter, the libraries), so it is the per-pod cost.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.shim_memory import rollup

REPO = Path(__file__).resolve().parents[1]
BASE = (
    f"import sys; sys.path.insert(0, {str(REPO)!r}); import shim.daemon; "
    "import shim.vmm.cloud_hypervisor; "
)
VARIANTS = {
    "asyncio client (ch_http)": BASE,
    "requests-unixsocket": BASE + "import requests_unixsocket; s = requests_unixsocket.Session(); ",
    "shim.daemon alone": f"import sys; sys.path.insert(0, {str(REPO)!r}); import shim.daemon; ",
}
WAIT = "print('ready', flush=True); sys.stdin.read()"


def measure(code: str, n: int) -> tuple[float, float]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-sE", "-c", code + WAIT],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        for _ in range(n)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        pss = [rollup(p.pid)["Pss"] for p in procs]
        rss = [rollup(p.pid)["Rss"] for p in procs]
    finally:
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait()
    return statistics.median(pss) / 1024, statistics.median(rss) / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=5)
    args = parser.parse_args()
    results = {name: measure(code, args.n) for name, code in VARIANTS.items()}
    for name, (pss, rss) in results.items():
        print(f"{name:28s} PSS median {pss:5.1f} MiB   RSS median {rss:5.1f} MiB  (n={args.n})")
    (ours, _), (theirs, _), (daemon, _) = results.values()
    print(f"the CH backend with its client costs {ours - daemon:+.1f} MiB PSS over the daemon")
    print(f"requests-unixsocket would cost {theirs - ours:+.1f} MiB PSS more per daemon")


if __name__ == "__main__":
    main()

"""The node's same-page merging (KSM), turned on for one measurement and put back.

KSM is a node-wide setting, the operator's to choose: the bench measures with it as
the node had it, then with it running at the kernel's own scan rate, and restores
every value it changed, whatever happens in between.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.procfs import cpu_ticks

KSM = Path("/sys/kernel/mm/ksm")


def available() -> bool:
    return (KSM / "run").exists()


def _read(name: str) -> int:
    return int((KSM / name).read_text().split()[0])


def _ksmd_ticks() -> int:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if (entry / "comm").read_text().strip() == "ksmd":
                return cpu_ticks(int(entry.name))[0]
    return 0


@contextlib.contextmanager
def running() -> Iterator[None]:
    """KSM on (`run` 1) for the block; `run` as it was afterwards."""
    before = (KSM / "run").read_text().strip()
    (KSM / "run").write_text("1")
    try:
        yield
    finally:
        (KSM / "run").write_text(before)


def measure_merged(
    sample: Callable[[], dict[str, Any]], *, settle_s: float = 10, limit_s: float = 180
) -> dict[str, Any]:
    """`sample()` once KSM has merged what it will: `pages_sharing` moved less than 2%
    between two samples `settle_s` apart (or `limit_s` passed). Adds how long that
    took and ksmd's CPU share over the time."""
    ticks_per_s = os.sysconf("SC_CLK_TCK")
    with running():
        started, ticks = time.monotonic(), _ksmd_ticks()
        last = -1
        while time.monotonic() - started < limit_s:
            time.sleep(settle_s)
            sharing = _read("pages_sharing")
            if last > 0 and abs(sharing - last) <= 0.02 * last:
                break
            last = sharing
        result = sample()
        elapsed = time.monotonic() - started
        result["ksm_settle_s"] = elapsed
        result["ksmd_cpu_percent"] = 100 * (_ksmd_ticks() - ticks) / ticks_per_s / elapsed
        result["ksm_pages_sharing"] = _read("pages_sharing")
        result["ksm_pages_to_scan"] = _read("pages_to_scan")
        result["ksm_sleep_millisecs"] = _read("sleep_millisecs")
    return result

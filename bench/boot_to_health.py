"""Time from QEMU launch to the agent's first health reply, over N boots.

Usage: python -m bench.boot_to_health [-n 5]   (root; builds the guest if needed)
Prints one line per boot and the median; phases: vmm_start (QEMU + vsock backend up,
QMP ready), agent (hybrid-vsock connect + Health). qemu_cpu is the CPU time QEMU used
until the Health reply: under TCG the boot is CPU-bound, so it compares two kernels
fairly even while other work on the machine stretches the wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

from shim.agent import AgentClient
from shim.vmm.qemu import QemuVmm
from tests.integration.vm_fixtures import qemu_options, vm_spec


def cpu_seconds(pid: int) -> float:
    """User + system time of every thread of `pid` so far."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def one_boot(state_dir: Path) -> tuple[float, float, float]:
    vmm = QemuVmm(vm_spec(state_dir), qemu_options())
    started = time.monotonic()
    await vmm.start()
    vmm_ready = time.monotonic()
    try:
        loop = asyncio.get_running_loop()
        await vmm.wait_vsock_ready(loop.time() + 60)
        agent = await AgentClient.connect(vmm.agent_socket, deadline=loop.time() + 60)
        try:
            assert await agent.health()
            healthy = time.monotonic()
            cpu = cpu_seconds(vmm.pid)
        finally:
            await agent.close()
    finally:
        await vmm.shutdown(timeout=5)
    return vmm_ready - started, healthy - started, cpu


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=5)
    args = parser.parse_args()
    totals = []
    cpus = []
    with tempfile.TemporaryDirectory(prefix="cloudhv-bench-") as scratch:
        for index in range(args.n):
            vmm_s, total_s, cpu_s = await one_boot(Path(scratch) / f"vm{index}")
            totals.append(total_s)
            cpus.append(cpu_s)
            print(
                f"boot {index}: vmm_start={vmm_s * 1000:.0f} ms  "
                f"launch_to_health={total_s * 1000:.0f} ms  qemu_cpu={cpu_s * 1000:.0f} ms"
            )
    for name, values in (("launch_to_health", totals), ("qemu_cpu", cpus)):
        print(
            f"median {name} over {args.n}: {statistics.median(values) * 1000:.0f} ms "
            f"(min {min(values) * 1000:.0f}, max {max(values) * 1000:.0f})"
        )


if __name__ == "__main__":
    asyncio.run(main())

"""Time from QEMU launch to the agent's first health reply, over N boots.

Usage: python -m bench.boot_to_health [-n 5]   (root; builds the guest if needed)
Prints one line per boot and the median; phases: vmm_start (QEMU + vsock backend up,
QMP ready), agent (hybrid-vsock connect + Health).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from shim.agent import AgentClient
from shim.vmm.qemu import QemuVmm
from tests.integration.vm_fixtures import qemu_options, vm_spec


async def one_boot(state_dir: Path) -> tuple[float, float]:
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
        finally:
            await agent.close()
    finally:
        await vmm.shutdown(timeout=5)
    return vmm_ready - started, healthy - started


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=5)
    args = parser.parse_args()
    totals = []
    with tempfile.TemporaryDirectory(prefix="cloudhv-bench-") as scratch:
        for index in range(args.n):
            vmm_s, total_s = await one_boot(Path(scratch) / f"vm{index}")
            totals.append(total_s)
            print(
                f"boot {index}: vmm_start={vmm_s * 1000:.0f} ms  "
                f"launch_to_health={total_s * 1000:.0f} ms"
            )
    print(
        f"median launch_to_health over {args.n}: {statistics.median(totals) * 1000:.0f} ms "
        f"(min {min(totals) * 1000:.0f}, max {max(totals) * 1000:.0f})"
    )


if __name__ == "__main__":
    asyncio.run(main())

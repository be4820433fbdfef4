"""Time from QEMU launch to the agent's first health reply, over N boots.

Usage: python -m bench.boot_to_health [-n 5] [--virtiofs] [--tb-size-mib 0,64,8]
(root; builds the guest if needed)
Prints one line per boot and the median; phases: vmm_start (QEMU + vsock backend up,
QMP ready), agent (hybrid-vsock connect + Health). qemu_cpu is the CPU time QEMU used
until the Health reply: under TCG the boot is CPU-bound, so it compares two kernels
fairly even while other work on the machine stretches the wall time. With --virtiofs
the VM boots with the pod's virtio-fs device, served by a virtiofsd started first (as
the shim does; its start is timed apart, and the guest mounts the tag after Health).
With --tb-size-mib the boots alternate between those TCG translation cache sizes (0:
QEMU's default), so that each size sees the same load.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

from shim.agent import AgentClient
from shim.config import VirtiofsConfig
from shim.cri_mounts import SHARED_ROOT
from shim.sharedfs import TAG, Daemon, FsHost, Layout
from shim.vmm.base import SharedFsSpec
from shim.vmm.qemu import QemuVmm
from tests.integration.vm_fixtures import qemu_options, vm_spec


def cpu_seconds(pid: int) -> float:
    """User + system time of every thread of `pid` so far."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _ignore(pid: int, start_time: int) -> None:
    del pid, start_time


async def one_boot(
    state_dir: Path, virtiofs: bool = False, tb_size_mib: int = 0
) -> tuple[float, ...]:
    """(vmm start, launch to Health, QEMU CPU until Health, virtiofsd start, guest mount
    of the tag) in seconds; the last two are 0 without virtiofs."""
    spec = vm_spec(state_dir)
    host, layout, daemon = FsHost(VirtiofsConfig()), Layout(state_dir.parent / "fs"), None
    fs_s = mount_s = 0.0
    if virtiofs:
        begun = time.monotonic()
        await host.make_root(layout)
        daemon = await host.start_daemon(layout, _ignore)
        fs_s = time.monotonic() - begun
        spec = dataclasses.replace(spec, shared_fs=SharedFsSpec(layout.socket, TAG))
    vmm = QemuVmm(spec, dataclasses.replace(qemu_options(), tcg_tb_size_mib=tb_size_mib))
    started = time.monotonic()
    try:
        await vmm.start()
        vmm_ready = time.monotonic()
        loop = asyncio.get_running_loop()
        await vmm.wait_vsock_ready(loop.time() + 60)
        agent = await AgentClient.connect(vmm.agent_socket, deadline=loop.time() + 60)
        try:
            assert await agent.health()
            healthy = time.monotonic()
            cpu = cpu_seconds(vmm.pid)
            if virtiofs:
                await agent.mount_shared_fs(TAG, SHARED_ROOT)
                mount_s = time.monotonic() - healthy
        finally:
            await agent.close()
    finally:
        await vmm.shutdown(timeout=5)
        if daemon is not None:
            await _stop(daemon, host, layout)
    return vmm_ready - started, healthy - started, cpu, fs_s, mount_s


async def _stop(daemon: Daemon, host: FsHost, layout: Layout) -> None:
    await daemon.stop()
    await host.remove_root(layout)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=5)
    parser.add_argument("--virtiofs", action="store_true", help="boot with the virtio-fs device")
    parser.add_argument("--tb-size-mib", default="0", help="comma-separated, alternated")
    args = parser.parse_args()
    sizes = [int(v) for v in args.tb_size_mib.split(",")]
    totals: dict[int, list[float]] = {size: [] for size in sizes}
    cpus: dict[int, list[float]] = {size: [] for size in sizes}
    with tempfile.TemporaryDirectory(prefix="cloudhv-bench-") as scratch:
        for index in range(args.n * len(sizes)):
            size = sizes[index % len(sizes)]
            vmm_s, total_s, cpu_s, fs_s, mount_s = await one_boot(
                Path(scratch) / f"vm{index}" / "vm", args.virtiofs, size
            )
            totals[size].append(total_s)
            cpus[size].append(cpu_s)
            extra = (
                f"  virtiofsd_start={fs_s * 1000:.0f} ms  guest_mount={mount_s * 1000:.0f} ms"
                if args.virtiofs
                else ""
            )
            print(
                f"boot {index} (tb {size}): vmm_start={vmm_s * 1000:.0f} ms  "
                f"launch_to_health={total_s * 1000:.0f} ms  qemu_cpu={cpu_s * 1000:.0f} ms{extra}"
            )
    for size in sizes:
        for name, values in (("launch_to_health", totals[size]), ("qemu_cpu", cpus[size])):
            print(
                f"tb {size}: median {name} over {args.n}: {statistics.median(values) * 1000:.0f}"
                f" ms (min {min(values) * 1000:.0f}, max {max(values) * 1000:.0f})"
            )


if __name__ == "__main__":
    asyncio.run(main())

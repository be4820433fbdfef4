"""Booting real guest VMs (QEMU, TCG here) for integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

from shim.agent import AgentClient
from shim.vmm.base import VmSpec
from shim.vmm.qemu import QemuOptions, QemuVmm
from tests.integration import guest_artifacts

KERNEL_ARGS = "root=/dev/vda ro rootfstype=ext4 init=/init panic=-1 no_timer_check quiet"
ACCEL = os.environ.get("CLOUDHV_ACCEL", "tcg")


def qemu_options() -> QemuOptions:
    return QemuOptions(
        binary=Path("/usr/bin/qemu-system-x86_64"),
        accel=ACCEL,
        vsock_backend=Path("/usr/bin/vhost-device-vsock"),
        hotplug_slots=4,
    )


def vm_spec(state_dir: Path, *, vcpus: int = 1, memory_mib: int = 256) -> VmSpec:
    return VmSpec(
        state_dir=state_dir,
        kernel=guest_artifacts.kernel(),
        rootfs=guest_artifacts.rootfs(),
        kernel_args=KERNEL_ARGS,
        vcpus=vcpus,
        max_vcpus=vcpus,
        memory_mib=memory_mib,
    )


@contextlib.asynccontextmanager
async def booted_vm(state_dir: Path, **sizing: int) -> AsyncIterator[tuple[QemuVmm, AgentClient]]:
    """A running VM and a connected agent client; torn down (and checked gone) on exit."""
    vmm = QemuVmm(vm_spec(state_dir, **sizing), qemu_options())
    await vmm.start()
    agent: AgentClient | None = None
    try:
        loop = asyncio.get_running_loop()
        await vmm.wait_vsock_ready(loop.time() + 60)
        agent = await AgentClient.connect(vmm.agent_socket, deadline=loop.time() + 60)
        yield vmm, agent
    except BaseException:
        console = vmm.console_log
        if console.exists():
            print("--- guest console ---\n" + console.read_text(errors="replace")[-4000:])
        raise
    finally:
        if agent is not None:
            await agent.close()
        await vmm.shutdown(timeout=5)

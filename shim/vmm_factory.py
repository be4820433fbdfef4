"""Builds the configured VMM backend for a pod."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shim.vmm.base import Vmm, VmmError, VmSpec

if TYPE_CHECKING:
    from shim.config import Config


def create_vmm(config: Config, spec: VmSpec) -> Vmm:
    if config.vmm == "qemu":
        from shim.vmm.qemu import QemuOptions, QemuVmm

        return QemuVmm(
            spec,
            QemuOptions(
                binary=config.qemu.binary,
                accel=config.qemu.accel,
                vsock_backend=config.qemu.vsock_backend,
                hotplug_slots=config.qemu.hotplug_slots,
                tcg_tb_size_mib=config.qemu.tcg_tb_size_mib,
                free_page_reporting=config.qemu.free_page_reporting,
                tcg_crun_fixed_layout=config.qemu.tcg_crun_fixed_layout,
            ),
        )
    if config.vmm == "cloud-hypervisor":
        from shim.vmm.cloud_hypervisor import ChOptions, CloudHypervisorVmm

        return CloudHypervisorVmm(
            spec,
            ChOptions(
                binary=config.cloud_hypervisor.binary,
                landlock=config.cloud_hypervisor.landlock,
                hotplug_slots=config.cloud_hypervisor.hotplug_slots,
                verbose=config.debug,
                free_page_reporting=config.cloud_hypervisor.free_page_reporting,
            ),
        )
    raise VmmError(
        f"vmm {config.vmm!r} is not available; allowed values: 'qemu', 'cloud-hypervisor'"
    )

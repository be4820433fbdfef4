"""What the guest image gives containers: a crun that takes the OCI versions current
containerd writes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from shim.agent import AgentClient
from shim.devices import DeviceManager
from shim.vmm.base import DiskSpec
from shim.vmm.qemu import QemuVmm
from tests.integration.busybox_tree import make_busybox_tree, make_ext4
from tests.integration.oci_spec import default_spec
from tests.integration.test_guest import read_all
from tests.integration.vm_fixtures import booted_vm


async def mount_tree(vm: QemuVmm, agent: AgentClient, tree: Path, image: Path) -> str:
    disk = DiskSpec(id="root", path=make_ext4(tree, image, size_mib=48), serial="root")
    await DeviceManager(vm, vm.hotplug_slots).add_disk(disk)
    await agent.mount_disk("root", "/run/cloudhv/disks/root", fstype="ext4", wait=10)
    return "/run/cloudhv/disks/root"


async def run_container(
    agent: AgentClient, cid: str, spec: dict[str, Any], rootfs: str
) -> tuple[int, bytes, bytes]:
    """Creates, starts and waits for a container; returns (exit status, stdout, stderr)."""
    await agent.create_container(cid, json.dumps(spec).encode(), rootfs_path=rootfs)
    await agent.start_container(cid)
    out, err, status = await asyncio.gather(
        read_all(agent, cid, "", "stdout"),
        read_all(agent, cid, "", "stderr"),
        agent.wait_process(cid, "", timeout=120),
    )
    await agent.remove_container(cid)
    return status.exit_status, out, err


async def test_specs_of_current_containerd_run(tmp_path: Path) -> None:
    """containerd 1.7 writes ociVersion 1.2.0 and 2.1 writes 1.2.1. Bookworm's crun
    1.8.1 refused both ("unknown version specified"); the spec goes to crun as given."""
    async with booted_vm(tmp_path / "vm") as (vm, agent):
        rootfs = await mount_tree(vm, agent, make_busybox_tree(tmp_path / "tree"), tmp_path / "img")
        for n, version in enumerate(["1.0.2", "1.2.0", "1.2.1"]):
            spec = default_spec(["echo", "ran"])
            spec["ociVersion"] = version
            status, out, err = await run_container(agent, f"v{n}", spec, rootfs)
            assert (status, out, err) == (0, b"ran\n", b""), version

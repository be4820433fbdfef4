"""What each guest kernel spends in its initcalls, to say which option a boot pays for.

Usage: python -m bench.kernel_initcalls -n 5 OLD_VMLINUX NEW_VMLINUX   (root; the
rootfs is $CLOUDHV_ROOTFS, or built)
Boots each kernel n times with `initcall_debug`, reads the kernel log from a busybox
container, names each initcall from the vmlinux symbol table (the guest has no
kallsyms), and prints the median time of the initcalls only the second kernel has,
and the largest ones. Wall times under TCG on a shared machine swing by a second;
initcall durations single out what a new option costs.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import re
import statistics
import subprocess
import tempfile
from pathlib import Path

from shim.agent import AgentClient
from shim.devices import DeviceManager
from shim.vmm.base import DiskSpec
from shim.vmm.qemu import QemuVmm
from tests.integration.busybox_tree import make_busybox_tree, make_ext4
from tests.integration.oci_spec import default_spec
from tests.integration.test_guest import read_all
from tests.integration.vm_fixtures import qemu_options, vm_spec

INITCALL = re.compile(r"initcall (0x[0-9a-f]+) returned -?\d+ after (\d+) usecs")


def symbols(vmlinux: Path) -> dict[int, str]:
    listing = subprocess.run(
        ["nm", str(vmlinux)], check=True, stdout=subprocess.PIPE, text=True
    ).stdout
    names = {}
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[1] in "tT":
            names[int(fields[0], 16)] = fields[2]
    return names


async def kernel_log(kernel: Path, scratch: Path, image: Path) -> str:
    spec = vm_spec(scratch)
    args = spec.kernel_args + " initcall_debug"
    spec = dataclasses.replace(spec, kernel=kernel, kernel_args=args)
    vmm = QemuVmm(spec, qemu_options())
    await vmm.start()
    try:
        loop = asyncio.get_running_loop()
        await vmm.wait_vsock_ready(loop.time() + 120)
        agent = await AgentClient.connect(vmm.agent_socket, deadline=loop.time() + 60)
        try:
            await DeviceManager(vmm, vmm.hotplug_slots).add_disk(
                DiskSpec(id="bb", path=image, serial="bb")
            )
            await agent.mount_disk("bb", "/run/cloudhv/disks/bb", fstype="ext4", wait=10)
            spec_json = json.dumps(default_spec(["dmesg"])).encode()
            await agent.create_container("dmesg", spec_json, rootfs_path="/run/cloudhv/disks/bb")
            await agent.start_container("dmesg")
            return (await read_all(agent, "dmesg", "", "stdout")).decode(errors="replace")
        finally:
            await agent.close()
    finally:
        await vmm.shutdown(timeout=5)


async def initcalls(kernel: Path, n: int, scratch: Path, image: Path) -> dict[str, float]:
    """The median microseconds of each initcall over n boots (0 for a boot without it)."""
    names = symbols(kernel)
    boots: list[dict[str, int]] = []
    for index in range(n):
        log = await kernel_log(kernel, scratch / f"{kernel.parent.name}-{index}", image)
        boot = {}
        for match in INITCALL.finditer(log):
            address = int(match.group(1), 16)
            boot[names.get(address, hex(address))] = int(match.group(2))
        boots.append(boot)
    every = set().union(*boots)
    return {name: statistics.median(b.get(name, 0) for b in boots) for name in every}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=5)
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cloudhv-bench-") as tmp:
        scratch = Path(tmp)
        image = make_ext4(make_busybox_tree(scratch / "tree"), scratch / "busybox.img")
        old = await initcalls(args.old, args.n, scratch, image)
        new = await initcalls(args.new, args.n, scratch, image)
    added = {name: us for name, us in new.items() if name not in old}
    print(
        f"all initcalls, sum of medians: old {sum(old.values()) / 1000:.1f} ms, "
        f"new {sum(new.values()) / 1000:.1f} ms (n={args.n} each)"
    )
    print(f"{len(added)} initcalls only in new: {sum(added.values()) / 1000:.1f} ms")
    for name, us in sorted(added.items(), key=lambda item: -item[1])[:15]:
        print(f"  {name}: {us / 1000:.1f} ms")
    print("largest initcalls (old / new):")
    for name in sorted(new, key=lambda name: -new[name])[:8]:
        print(f"  {name}: {old.get(name, 0) / 1000:.1f} / {new[name] / 1000:.1f} ms")


if __name__ == "__main__":
    asyncio.run(main())

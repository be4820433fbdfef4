"""The Cloud Hypervisor backend, driven directly, through the spec-checking stand-in
(tests/chsim) on real QEMU TCG VMs: boot, hot-plug and removal as the guest sees
them, a NIC from a TAP fd carrying traffic, Landlock keeping CH to the pod's
paths, and the VM's end seen at once when the guest reboots."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import json
import os
import struct
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from shim.agent import AgentClient
from shim.devices import DeviceManager
from shim.vmm.base import DiskSpec, HostDir, NetSpec, VmmError, VmSpec
from shim.vmm.ch_http import ApiError, ChHttp
from shim.vmm.cloud_hypervisor import ChOptions, CloudHypervisorVmm
from tests.integration import guest_artifacts
from tests.integration.busybox_tree import make_busybox_tree, make_ext4
from tests.integration.oci_spec import default_spec
from tests.integration.vm_fixtures import KERNEL_ARGS

STANDIN = Path(__file__).resolve().parents[1] / "chsim" / "cloud-hypervisor"


def vm_spec(root: Path) -> VmSpec:
    return VmSpec(
        state_dir=root / "vm",
        kernel=guest_artifacts.kernel(),
        rootfs=guest_artifacts.rootfs(),
        kernel_args=KERNEL_ARGS,
        vcpus=1,
        max_vcpus=2,
        memory_mib=256,
        host_dirs=(HostDir(root / "disks", writable=True),),
    )


def vm_processes(root: Path) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            if str(root) in cmdline:
                found.append(f"{pid}: {cmdline[:100]}")
    return found


@contextlib.asynccontextmanager
async def booted(
    root: Path, *, landlock: bool = True, free_page_reporting: bool = False
) -> AsyncIterator[tuple[CloudHypervisorVmm, AgentClient]]:
    options = ChOptions(
        binary=STANDIN,
        landlock=landlock,
        hotplug_slots=4,
        free_page_reporting=free_page_reporting,
    )
    vmm = CloudHypervisorVmm(vm_spec(root), options)
    await vmm.start()
    agent: AgentClient | None = None
    try:
        loop = asyncio.get_running_loop()
        await vmm.wait_vsock_ready(loop.time() + 90)
        agent = await AgentClient.connect(vmm.agent_socket, deadline=loop.time() + 30)
        yield vmm, agent
    except BaseException:
        with contextlib.suppress(OSError):
            print("--- ch.log ---\n" + (root / "vm" / "ch.log").read_text()[-4000:])
        raise
    finally:
        if agent is not None:
            await agent.close()
        await vmm.shutdown(timeout=5)
    assert not (root / "vm").exists()


async def test_boot_hot_plug_and_removal(tmp_path: Path) -> None:
    disks = tmp_path / "disks"
    async with booted(tmp_path) as (vmm, agent):
        assert await agent.health()
        assert await vmm.state() == "Running"
        devices = DeviceManager(vmm, vmm.hotplug_slots)
        image = make_ext4(make_busybox_tree(tmp_path / "tree"), disks / "bb.img")
        await devices.add_disk(DiskSpec("bb1", image, "bb1", read_only=True))
        await agent.mount_disk("bb1", "/run/cloudhv/disks/bb1", read_only=True, wait=20)
        await agent.unmount_disk("/run/cloudhv/disks/bb1")
        await devices.remove("bb1")  # returns once the guest ejected it
        api = ChHttp(vmm.agent_socket.parent / "api.sock")
        with pytest.raises(ApiError) as twice:
            await api.call("PUT", "vm.remove-device", {"id": "bb1"})
        assert twice.value.status == 500
        assert json.loads(twice.value.body) == [
            "Error from API", "The device could not be removed from the VM",
            "Error from device manager",
            "Failed to find device corresponding to the given identifier: bb1",
        ]
        # The slot is free again: the same id plugs again.
        await devices.add_disk(DiskSpec("bb1", image, "bb1", read_only=True))
        await devices.remove("bb1")
        info = json.loads((await api.call("GET", "vm.info")).body)
        assert [d["id"] for d in info["config"]["disks"]] == ["rootfs"]


async def test_landlock_keeps_the_vmm_to_the_pods_paths(tmp_path: Path) -> None:
    """A disk from outside the pod's directories cannot be opened once CH is confined;
    with the switch off it can."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    image = outside / "x.img"
    subprocess.run(["truncate", "-s", "8M", str(image)], check=True)
    async with booted(tmp_path / "on") as (vmm, _):
        with pytest.raises(VmmError) as refused:
            await vmm.add_disk(DiskSpec("x1", image, "x1"), 0)
        assert "HTTP 500" in str(refused.value) and "Permission denied" in str(refused.value)
    async with booted(tmp_path / "off", landlock=False) as (vmm, _):
        await vmm.add_disk(DiskSpec("x1", image, "x1"), 0)
        await vmm.remove_disk("x1")


async def test_the_reporting_balloon_reaches_the_vm(tmp_path: Path) -> None:
    """free_page_reporting asks CH for a balloon of size 0 that reports free pages; the
    stand-in gives its QEMU the same device, and the guest still boots and serves."""
    async with booted(tmp_path, free_page_reporting=True) as (vmm, agent):
        assert await agent.health()
        api = ChHttp(vmm.agent_socket.parent / "api.sock")
        balloon = json.loads((await api.call("GET", "vm.info")).body)["config"]["balloon"]
        assert balloon["size"] == 0 and balloon["free_page_reporting"] is True
        commands = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            with contextlib.suppress(OSError):
                commands.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" "))
        qemu = [c for c in commands if b"qemu-system" in c and str(tmp_path).encode() in c]
        assert len(qemu) == 1 and b"virtio-balloon-pci" in qemu[0]
        assert b"free-page-reporting=on" in qemu[0]


CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000


def open_tap(netns: str, name: str) -> int:
    """A TAP made in `netns` (setns in a thread of its own), as the shim's network does."""
    result: dict[str, object] = {}

    def work() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        target = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if libc.setns(target, CLONE_NEWNET):
                raise OSError(ctypes.get_errno(), "setns")
            try:
                fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
                flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
                fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
                result["fd"] = fd
            finally:
                libc.setns(own, CLONE_NEWNET)
        except OSError as err:
            result["error"] = err
        finally:
            os.close(own)
            os.close(target)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return int(result["fd"])  # type: ignore[call-overload]


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"chv-ch-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


async def test_a_nic_from_a_tap_fd_carries_traffic(tmp_path: Path, netns: str) -> None:
    """The TAP reaches CH as an SCM_RIGHTS fd on vm.add-net; a container in the VM's
    network namespace configures the NIC (found by its MAC) and pings the TAP's end."""
    tap = open_tap(netns, "tap0")
    try:
        for argv in (["addr", "add", "10.99.0.1/24", "dev", "tap0"], ["link", "set", "tap0", "up"]):
            subprocess.run(["ip", "-n", netns, *argv], check=True)
        async with booted(tmp_path) as (vmm, agent):
            devices = DeviceManager(vmm, vmm.hotplug_slots)
            image = make_ext4(make_busybox_tree(tmp_path / "tree"), tmp_path / "disks" / "bb.img")
            await devices.add_disk(DiskSpec("bb1", image, "bb1"))
            rootfs = "/run/cloudhv/disks/bb1"
            await agent.mount_disk("bb1", rootfs, wait=20)
            mac = "02:00:0a:63:00:02"
            await devices.add_net(NetSpec("net0", tap, mac, 1400))
            script = (
                f"for d in /sys/class/net/*; do [ $(cat $d/address) = {mac} ] && n=${{d##*/}}; "
                "done; ip addr add 10.99.0.2/24 dev $n && ip link set $n up && "
                "cat /sys/class/net/$n/mtu && ping -c 2 -W 5 10.99.0.1"
            )
            spec = default_spec(["sh", "-c", script])
            spec["linux"]["namespaces"] = [
                ns for ns in spec["linux"]["namespaces"] if ns["type"] != "network"
            ]
            for caps in spec["process"]["capabilities"].values():
                caps += ["CAP_NET_ADMIN", "CAP_NET_RAW"]
            await agent.create_container("net", json.dumps(spec).encode(), rootfs_path=rootfs)
            await agent.start_container("net")
            out, status = await asyncio.gather(
                _read_stdout(agent, "net"), agent.wait_process("net", "", timeout=60)
            )
            assert status.exit_status == 0, out
            # CH is given no MTU for an fd-backed TAP (ch_api.net_config): the guest NIC
            # starts at 1500, and the agent sets the pod's.
            assert out.startswith(b"1500\n") and b"2 packets received" in out, out
            await agent.remove_container("net")
            await agent.unmount_disk(rootfs)
            await devices.remove("net0")
            await devices.remove("bb1")
    finally:
        os.close(tap)


async def _read_stdout(agent: AgentClient, cid: str) -> bytes:
    chunks = []
    while True:
        out = await agent.read_stdout(cid, "", max_bytes=65536, timeout=60)
        chunks.append(out.data)
        if out.eof:
            return b"".join(chunks)


async def test_a_guest_reboot_ends_the_vm_at_once(tmp_path: Path) -> None:
    """A guest that reboots (a panic with panic=-1 does) comes back without our agent's
    state: the backend sees CH's `rebooting` event and ends the VM."""
    async with booted(tmp_path) as (vmm, _):
        api = ChHttp(vmm.agent_socket.parent / "api.sock")
        started = time.monotonic()
        await api.call("PUT", "vm.reboot")
        await asyncio.wait_for(vmm.wait(), 10)
        assert time.monotonic() - started < 5, "the reboot was not noticed at once"
        assert await _gone(tmp_path / "vm")


async def test_a_guest_power_off_ends_cloud_hypervisor(tmp_path: Path) -> None:
    async with booted(tmp_path) as (vmm, agent):
        await agent.shutdown()
        assert await asyncio.wait_for(vmm.wait(), 30) == 0  # CH exits 0 after a power-off
        assert await _gone(tmp_path / "vm")


async def _gone(root: Path, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while vm_processes(root):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True

"""Issue 2: our kernel + rootfs boot under QEMU and the agent runs containers over vsock."""

from __future__ import annotations

import asyncio
import json
import platform
from pathlib import Path

import pytest

from shim.agent import AgentClient
from shim.devices import DeviceManager
from shim.errors import FailedPrecondition, NotFound
from shim.vmm.base import DiskSpec
from tests.integration.busybox_tree import make_busybox_tree, make_ext4
from tests.integration.oci_spec import default_spec, process_spec
from tests.integration.vm_fixtures import booted_vm


async def read_all(agent: AgentClient, cid: str, exec_id: str, stream: str) -> bytes:
    read = agent.read_stdout if stream == "stdout" else agent.read_stderr
    chunks = []
    while True:
        out = await read(cid, exec_id, max_bytes=65536, timeout=30)
        chunks.append(out.data)
        if out.eof:
            return b"".join(chunks)


async def mount_busybox(
    devices: DeviceManager, agent: AgentClient, tmp_path: Path, disk_id: str
) -> str:
    image = make_ext4(make_busybox_tree(tmp_path / f"{disk_id}-tree"), tmp_path / f"{disk_id}.img")
    await devices.add_disk(DiskSpec(id=disk_id, path=image, serial=disk_id))
    target = f"/run/cloudhv/disks/{disk_id}"
    await agent.mount_disk(disk_id, target, fstype="ext4", wait=10)
    return target


async def test_guest_boots_and_runs_containers(tmp_path: Path) -> None:
    async with booted_vm(tmp_path / "vm") as (vm, agent):
        devices = DeviceManager(vm, vm.hotplug_slots)
        assert await agent.health()
        info = await agent.guest_info()
        assert info.kernel_release.startswith("6.1.")
        assert info.kernel_release != platform.release()

        rootfs = await mount_busybox(devices, agent, tmp_path, "bb1")

        # A container with separate stdout/stderr and an exit status.
        spec = default_spec(["sh", "-c", "echo out; echo err >&2; exit 3"])
        await agent.create_container("c1", json.dumps(spec).encode(), rootfs_path=rootfs)
        await agent.start_container("c1")
        out, err, status = await asyncio.gather(
            read_all(agent, "c1", "", "stdout"),
            read_all(agent, "c1", "", "stderr"),
            agent.wait_process("c1", "", timeout=60),
        )
        assert (out, err, status.exit_status) == (b"out\n", b"err\n", 3)
        await agent.remove_container("c1")
        with pytest.raises(NotFound):
            await agent.wait_process("c1", "", timeout=5)

        # A long-running container: exec into it, signal an exec, then the container.
        spec = default_spec(["sleep", "600"])
        await agent.create_container("c2", json.dumps(spec).encode(), rootfs_path=rootfs)
        await agent.start_container("c2")
        proc = process_spec(["sh", "-c", "echo exec says hi; cat /proc/1/cmdline"])
        await agent.exec_process("c2", "e1", json.dumps(proc).encode())
        out = await read_all(agent, "c2", "e1", "stdout")
        assert out == b"exec says hi\nsleep\x00600\x00"  # same pid namespace as the container
        assert (await agent.wait_process("c2", "e1", timeout=30)).exit_status == 0

        await agent.exec_process("c2", "e2", json.dumps(process_spec(["sleep", "600"])).encode())
        await agent.signal_process("c2", "e2", signal=15)
        assert (await agent.wait_process("c2", "e2", timeout=30)).exit_status == 128 + 15

        # A TTY exec: the resize is what `stty size` reports.
        tty = process_spec(["sh", "-c", "read line; stty size"], terminal=True)
        await agent.exec_process("c2", "t1", json.dumps(tty).encode(), terminal=True, stdin=True)
        await agent.resize_tty("c2", "t1", rows=41, cols=123)
        assert await agent.write_stdin("c2", "t1", b"go\n") == 3
        tty_out = await read_all(agent, "c2", "t1", "stdout")
        assert b"41 123" in tty_out
        assert (await agent.wait_process("c2", "t1", timeout=30)).exit_status == 0

        await agent.signal_process("c2", "", signal=9)
        assert (await agent.wait_process("c2", "", timeout=30)).exit_status == 128 + 9
        await agent.remove_container("c2")
        await agent.unmount_disk(rootfs)
        await devices.remove("bb1")

        # Shutdown powers the VM off: QEMU exits by itself.
        pid = vm.pid
        await agent.shutdown()
        assert await asyncio.wait_for(vm.wait(), timeout=30) == 0
        assert not Path(f"/proc/{pid}").exists()


async def run_exec(
    agent: AgentClient, cid: str, exec_id: str, args: list[str]
) -> tuple[int, bytes]:
    """Run a process in the container to its end; returns (exit status, stdout) and
    removes the exec, as containerd does after ExecSync."""
    await agent.exec_process(cid, exec_id, json.dumps(process_spec(args)).encode())
    out, status = await asyncio.gather(
        read_all(agent, cid, exec_id, "stdout"), agent.wait_process(cid, exec_id, timeout=60)
    )
    assert status is not None
    await agent.remove_process(cid, exec_id)
    return status.exit_status, out


def bind(source: str, destination: str) -> dict[str, object]:
    return {"destination": destination, "type": "bind", "source": source, "options": ["rbind"]}


async def test_cri_exec_mounts_and_memory(tmp_path: Path) -> None:
    """Issue 4 in the agent: exec removal, CRI mount copies refreshed in place and
    removed with their container, and the memory cgroup as the container sees it."""
    async with booted_vm(tmp_path / "vm") as (vm, agent):
        devices = DeviceManager(vm, vm.hotplug_slots)
        rootfs = await mount_busybox(devices, agent, tmp_path, "bb1")
        mounts = "/run/cloudhv/mounts"

        # An observer container that sees every container's mount copies.
        await agent.copy_file(f"{mounts}/watch/keep/file", b"kept\n")
        spec = default_spec(["sleep", "600"])
        spec["mounts"].append(bind(mounts, "/m"))
        await agent.create_container("watch", json.dumps(spec).encode(), rootfs_path=rootfs)
        await agent.start_container("watch")

        # CRI mounts as the shim copies them: a file and a ConfigMap-style directory.
        own = f"{mounts}/app"
        await agent.copy_file(f"{own}/hosts", b"10.0.0.1\tone\n")
        await agent.copy_file(f"{own}/cm/..v1", is_dir=True, mode=0o755)
        await agent.copy_file(f"{own}/cm/..v1/key", b"v1")
        await agent.copy_file(f"{own}/cm/..data", b"..v1", is_symlink=True)
        await agent.copy_file(f"{own}/cm/key", b"..data/key", is_symlink=True)
        # Removal must not follow a symlink out of the container's directory.
        await agent.copy_file(f"{own}/escape", f"{mounts}/watch/keep".encode(), is_symlink=True)
        spec = default_spec(["sleep", "600"])
        spec["mounts"] += [bind(f"{own}/hosts", "/etc/hosts"), bind(f"{own}/cm", "/config")]
        await agent.create_container("app", json.dumps(spec).encode(), rootfs_path=rootfs)
        await agent.start_container("app")
        show = ["cat", "/etc/hosts", "/config/key"]
        assert await run_exec(agent, "app", "x1", show) == (0, b"10.0.0.1\tone\nv1")

        # Refreshed while the container runs: the file in place (a bind mount
        # holds the inode), the ConfigMap by swapping its ..data symlink.
        await agent.copy_file(f"{own}/hosts", b"10.0.0.2\ttwo\n")
        await agent.copy_file(f"{own}/cm/..v2", is_dir=True, mode=0o755)
        await agent.copy_file(f"{own}/cm/..v2/key", b"v2")
        await agent.copy_file(f"{own}/cm/..data", b"..v2", is_symlink=True)
        assert await run_exec(agent, "app", "x1", show) == (0, b"10.0.0.2\ttwo\nv2")

        # RemoveProcess: an exited exec is forgotten; a running one is refused.
        with pytest.raises(NotFound):
            await agent.wait_process("app", "x1", timeout=5)
        with pytest.raises(NotFound):
            await agent.remove_process("app", "x1")
        await agent.exec_process("app", "long", json.dumps(process_spec(["sleep", "600"])).encode())
        with pytest.raises(FailedPrecondition):
            await agent.remove_process("app", "long")
        await agent.signal_process("app", "long", signal=9)
        assert (await agent.wait_process("app", "long", timeout=30)).exit_status == 128 + 9
        await agent.remove_process("app", "long")

        # The container's own cgroup is its /sys/fs/cgroup (a cgroup namespace),
        # and a lowered limit OOM-kills an exec that goes over it.
        memory_max = ["cat", "/sys/fs/cgroup/memory.max"]
        assert await run_exec(agent, "app", "m1", memory_max) == (0, b"max\n")
        await agent.update_container("app", json.dumps({"memory": {"limit": 32 << 20}}).encode())
        assert await run_exec(agent, "app", "m2", memory_max) == (0, b"33554432\n")
        hog = ["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"]
        assert (await run_exec(agent, "app", "hog", hog))[0] == 128 + 9
        assert await agent.get_oom_event(timeout=10) == "app"
        assert (await agent.stats_container("app")).memory_oom_kill >= 1
        assert await run_exec(agent, "app", "alive", ["true"]) == (0, b"")  # init survived

        # Removing the container removes its mount copies, and only them.
        await agent.signal_process("app", "", signal=9)
        await agent.wait_process("app", "", timeout=30)
        await agent.remove_container("app")
        listing = ["sh", "-c", "ls /m; cat /m/watch/keep/file"]
        assert await run_exec(agent, "watch", "ls", listing) == (0, b"watch\nkept\n")

        await agent.remove_container("watch", force=True)
        await agent.unmount_disk(rootfs)
        await devices.remove("bb1")

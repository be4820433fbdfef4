"""Issue 2: our kernel + rootfs boot under QEMU and the agent runs containers over vsock."""

from __future__ import annotations

import asyncio
import json
import platform
from pathlib import Path

import pytest

from shim.agent import AgentClient
from shim.errors import NotFound
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


async def mount_busybox(vm, agent: AgentClient, tmp_path: Path, disk_id: str) -> str:  # type: ignore[no-untyped-def]
    from shim.vmm.base import DiskSpec

    image = make_ext4(make_busybox_tree(tmp_path / f"{disk_id}-tree"), tmp_path / f"{disk_id}.img")
    await vm.add_disk(DiskSpec(id=disk_id, path=image, serial=disk_id))
    target = f"/run/cloudhv/disks/{disk_id}"
    await agent.mount_disk(disk_id, target, fstype="ext4", wait=10)
    return target


async def test_guest_boots_and_runs_containers(tmp_path: Path) -> None:
    async with booted_vm(tmp_path / "vm") as (vm, agent):
        assert await agent.health()
        info = await agent.guest_info()
        assert info.kernel_release.startswith("6.1.")
        assert info.kernel_release != platform.release()

        rootfs = await mount_busybox(vm, agent, tmp_path, "bb1")

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
        await vm.remove_disk("bb1")

        # Shutdown powers the VM off: QEMU exits by itself.
        pid = vm.pid
        await agent.shutdown()
        assert await asyncio.wait_for(vm.wait(), timeout=30) == 0
        assert not Path(f"/proc/{pid}").exists()

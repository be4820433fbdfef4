"""A container's root disk: an ext4 image of its rootfs, hot-plugged and mounted in the guest.

The resource steps (see shim/resource.py), each undone in reverse on failure or
teardown:

1. state record: kind "disk", with the image and scratch paths for crash cleanup;
2. image build: flatten containerd's rootfs mounts into `<work dir>/<id>.ext4`;
3. plug: hot-add it through the device manager, serial = device id;
4. guest mount: the agent mounts the disk found by that serial on
   `/run/cloudhv/disks/<id>`, the path the container's rootfs is made from.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from shim.devices import device_id
from shim.errors import Unavailable
from shim.hostmount import unmount_under
from shim.resource import PodServices, Undo, step
from shim.rootfs import image as image_mod
from shim.state import ResourceRecord
from shim.types import Mount
from shim.vmm.base import DiskSpec

log = logging.getLogger(__name__)

KIND = "disk"
GUEST_DISK_ROOT = "/run/cloudhv/disks"
MOUNT_WAIT_S = 10.0  # how long the guest waits for a hot-plugged disk to show up

# (mounts, image, scratch, headroom MiB) -> image size in bytes
ImageBuilder = Callable[[Sequence[Mount], Path, Path, int], Awaitable[int]]


async def build_ext4(mounts: Sequence[Mount], image: Path, scratch: Path, headroom_mib: int) -> int:
    return await image_mod.build_image(mounts, image, scratch, headroom_mib=headroom_mib)


class ContainerDisk:
    """The root disk of one container, from record to guest mount and back."""

    def __init__(
        self,
        container_id: str,
        mounts: Sequence[Mount],
        work_dir: Path,
        *,
        headroom_mib: int,
        builder: ImageBuilder = build_ext4,
    ) -> None:
        self.container_id = container_id
        self.id = device_id("c", container_id)
        self._mounts = tuple(mounts)
        self._image = work_dir / f"{self.id}.ext4"
        self._scratch = work_dir / "mnt" / self.id
        self._headroom_mib = headroom_mib
        self._builder = builder
        self._undo = Undo(f"disk {self.id} of container {container_id}")
        self.size = 0
        self.timings_ms: dict[str, int] = {}

    @property
    def record(self) -> ResourceRecord:
        return ResourceRecord(
            kind=KIND,
            id=self.id,
            owner=self.container_id,
            host={"image": str(self._image), "scratch": str(self._scratch)},
        )

    @property
    def guest_path(self) -> str:
        """Where the guest mounts the disk: the container's root is made from it."""
        return f"{GUEST_DISK_ROOT}/{self.id}"

    async def attach(self, pod: PodServices) -> None:
        """Record, build, plug, mount. On failure everything done is undone, and the
        error names the step."""
        undo = self._undo
        try:
            await step("state record", pod.record(self.record))
            undo.push("forget record", lambda: self._forget(pod), host=True)
            started = time.monotonic()
            undo.push("remove image", self._remove_host_files, host=True)
            self.size = await step(
                "image build",
                self._builder(self._mounts, self._image, self._scratch, self._headroom_mib),
            )
            built = time.monotonic()
            devices = pod.live_devices()
            if devices is None:
                raise Unavailable("plug: the VM is not running")
            await step(
                "plug", devices.add_disk(DiskSpec(id=self.id, path=self._image, serial=self.id))
            )
            undo.push("unplug", lambda: self._unplug(pod))
            agent = pod.live_agent()
            if agent is None:
                raise Unavailable("guest mount: the VM is not running")
            await step(
                "guest mount",
                agent.mount_disk(self.id, self.guest_path, fstype="ext4", wait=MOUNT_WAIT_S),
            )
            undo.push("guest unmount", lambda: self._guest_unmount(pod))
            self.timings_ms = {
                "rootfs_ms": int((built - started) * 1000),
                "plug_mount_ms": int((time.monotonic() - built) * 1000),
            }
        except BaseException:
            await undo.unwind()
            raise

    async def detach(self, pod: PodServices) -> None:
        """Undo everything attach did, in reverse. Idempotent."""
        await self._undo.unwind()

    async def _forget(self, pod: PodServices) -> None:
        if self._undo.clean:
            await pod.forget(self.id)

    async def _remove_host_files(self) -> None:
        await asyncio.to_thread(undo_host, self.record)

    async def _unplug(self, pod: PodServices) -> None:
        devices = pod.live_devices()
        if devices is not None:
            await devices.remove(self.id)

    async def _guest_unmount(self, pod: PodServices) -> None:
        agent = pod.live_agent()
        if agent is not None:
            await agent.unmount_disk(self.guest_path)


def undo_host(record: ResourceRecord) -> list[str]:
    """Remove what a disk left on the host, from its record alone (crash cleanup too)."""
    done: list[str] = []
    scratch = record.host.get("scratch", "")
    if scratch:
        done += [f"unmounted {p}" for p in unmount_under([Path(scratch)])]
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(scratch)
    image = record.host.get("image", "")
    if image:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(image)
            done.append(f"removed {image}")
    return done

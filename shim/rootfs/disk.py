"""Disks plugged into a pod's VM and mounted in its guest: the steps they share, and the kinds.

Every disk is a resource (shim/resource.py) that goes through the same steps,
each undone in reverse on failure or teardown:

1. state record: its kind, id and what its host undo needs, before anything exists;
2. a host step of its own kind (build an image, take a cache reference, make an
   empty writable disk, let the host's mount of a block device go);
3. plug: hot-add it through the device manager, serial = device id (the guest
   finds disks by serial only);
4. guest mount: the agent mounts the disk with that serial on `guest_path`.

The kinds here belong to one container: `PrivateImage` (its read-only image when
its layers cannot be shared), `UpperDisk` (its writable layer) and `BlockDisk`
(a block device passed through read-write). The shared image disk of a pod is in
shim/rootfs/shared.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import time
from collections.abc import Sequence
from pathlib import Path

from shim.devices import device_id
from shim.errors import FailedPrecondition, Unavailable
from shim.hostmount import MountError, unmount, unmount_under
from shim.resource import PodServices, Undo, step
from shim.rootfs import image as image_mod
from shim.rootfs.image import Format
from shim.state import ResourceRecord
from shim.vmm.base import DiskSpec

MOUNT_WAIT_S = 10.0  # how long the guest waits for a hot-plugged disk to show up

PRIVATE_KIND = "disk"
UPPER_KIND = "upper"
BLOCK_KIND = "block"


class PluggedDisk:
    """One disk from record to guest mount and back; subclasses make its host side."""

    kind = ""
    host_step = ""

    def __init__(
        self,
        disk_id: str,
        owner: str,
        guest_path: str,
        *,
        fstype: str,
        read_only: bool,
        options: Sequence[str] = (),
    ) -> None:
        self.id = disk_id
        self.owner = owner
        self.guest_path = guest_path
        self.fstype = fstype
        self.read_only = read_only
        self.options = tuple(options)
        self._undo = Undo(f"{self.kind} {disk_id} of {owner or 'the pod'}")
        self.timings_ms: dict[str, int] = {}

    @property
    def host(self) -> dict[str, str]:
        """What `undo_host` of this kind needs, recorded before anything exists."""
        return {}

    @property
    def record(self) -> ResourceRecord:
        return ResourceRecord(kind=self.kind, id=self.id, owner=self.owner, host=self.host)

    async def _create(self, pod: PodServices) -> Path:
        """Make the host side; returns the file or device to plug."""
        raise NotImplementedError

    async def _undo_host(self) -> None:
        """Undo the host side (also run when `_create` failed half-way)."""

    async def attach(self, pod: PodServices) -> None:
        """Record, create, plug, mount. On failure everything done is undone, and the
        error names the step."""
        undo = self._undo
        try:
            await step("state record", pod.record(self.record))
            undo.push("forget record", lambda: self._forget(pod), host=True)
            started = time.monotonic()
            undo.push(f"undo {self.host_step}", self._undo_host, host=True)
            path = await step(self.host_step, self._create(pod))
            created = time.monotonic()
            devices = pod.live_devices()
            if devices is None:
                raise Unavailable("plug: the VM is not running")
            spec = DiskSpec(id=self.id, path=path, serial=self.id, read_only=self.read_only)
            await step("plug", devices.add_disk(spec))
            undo.push("unplug", lambda: self._unplug(pod))
            agent = pod.live_agent()
            if agent is None:
                raise Unavailable("guest mount: the VM is not running")
            await step(
                "guest mount",
                agent.mount_disk(
                    self.id,
                    self.guest_path,
                    fstype=self.fstype,
                    read_only=self.read_only,
                    options=self.options,
                    wait=MOUNT_WAIT_S,
                ),
            )
            undo.push("guest unmount", lambda: self._guest_unmount(pod))
            self.timings_ms = {
                "host_ms": int((created - started) * 1000),
                "plug_mount_ms": int((time.monotonic() - created) * 1000),
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

    async def _unplug(self, pod: PodServices) -> None:
        devices = pod.live_devices()
        if devices is not None:
            await devices.remove(self.id)

    async def _guest_unmount(self, pod: PodServices) -> None:
        agent = pod.live_agent()
        if agent is not None:
            await agent.unmount_disk(self.guest_path)


# -- a container's own read-only image ---------------------------------------------------


class PrivateImage(PluggedDisk):
    """The read-only image of layers that cannot be shared (they may still change),
    built for one container in the pod's work dir and removed with it."""

    kind = PRIVATE_KIND
    host_step = "image build"

    def __init__(
        self, container_id: str, dirs: Sequence[str], work_dir: Path, fmt: Format
    ) -> None:
        disk_id = device_id("p", container_id)
        super().__init__(
            disk_id, container_id, f"/run/cloudhv/disks/{disk_id}", fstype=fmt, read_only=True
        )
        self._dirs = tuple(dirs)
        self._fmt: Format = fmt
        self._image = work_dir / f"{disk_id}.{fmt}"
        self._scratch = work_dir / f"mnt-{disk_id}"
        self.size = 0

    @property
    def host(self) -> dict[str, str]:
        return {"image": str(self._image), "scratch": str(self._scratch)}

    async def _create(self, pod: PodServices) -> Path:
        self.size = await image_mod.build_image(self._dirs, self._image, self._scratch, self._fmt)
        return self._image

    async def _undo_host(self) -> None:
        await asyncio.to_thread(undo_host_files, self.record)


# -- a container's writable layer --------------------------------------------------------


class UpperDisk(PluggedDisk):
    """A small sparse ext4 holding one container's overlay upper and work dirs."""

    kind = UPPER_KIND
    host_step = "upper disk"

    def __init__(self, container_id: str, work_dir: Path, size_mib: int) -> None:
        disk_id = device_id("u", container_id)
        # Freshly truncated, the file reads as zeros: the guest need not zero the inode
        # tables (a write of megabytes per container) to trust them.
        super().__init__(
            disk_id, container_id, f"/run/cloudhv/uppers/{disk_id}",
            fstype="ext4", read_only=False, options=("noinit_itable",),
        )
        self._image = work_dir / f"{disk_id}.ext4"
        self._size_mib = size_mib

    @property
    def host(self) -> dict[str, str]:
        return {"image": str(self._image)}

    @property
    def upper_dir(self) -> str:
        return f"{self.guest_path}/upper"

    @property
    def work_dir(self) -> str:
        return f"{self.guest_path}/work"

    async def _create(self, pod: PodServices) -> Path:
        await image_mod.make_empty_ext4(self._image, self._size_mib)
        return self._image

    async def _undo_host(self) -> None:
        await asyncio.to_thread(undo_host_files, self.record)


def undo_host_files(record: ResourceRecord) -> list[str]:
    """Remove a disk's image file and scratch mount, from its record alone."""
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


# -- a block device passed through -----------------------------------------------------


class BlockDisk(PluggedDisk):
    """A block device (devmapper, loop) handed to the VM read-write: no copy, the
    container writes to the device itself. The host must not have it mounted."""

    kind = BLOCK_KIND
    host_step = "block device"

    def __init__(
        self,
        container_id: str,
        device: str,
        fstype: str,
        options: Sequence[str] = (),
        *,
        host_mount: str = "",
    ) -> None:
        disk_id = device_id("b", container_id)
        super().__init__(
            disk_id, container_id, f"/run/cloudhv/disks/{disk_id}",
            fstype=fstype, read_only=False, options=options,
        )
        self._device = device
        self._host_mount = host_mount

    @property
    def host(self) -> dict[str, str]:
        return {"device": self._device, "host_mount": self._host_mount}

    async def _create(self, pod: PodServices) -> Path:
        await asyncio.to_thread(release_host_hold, self._device, self._host_mount)
        return Path(self._device)


def release_host_hold(device: str, host_mount: str) -> None:
    """Make sure the host holds no mount of `device`: two kernels writing one
    filesystem corrupt it. Unmounts `host_mount` (no lazy detach: it must really be
    gone), then checks with an exclusive open, which fails while any mount, in any
    mount namespace, uses the device."""
    if host_mount:
        try:
            unmount(Path(host_mount))
        except MountError as err:
            raise FailedPrecondition(
                f"{device} is mounted on {host_mount} and cannot be let go of: {err}"
            ) from err
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as err:
        if err.errno == errno.EBUSY:
            raise FailedPrecondition(
                f"{device} is in use on the host (mounted elsewhere?): it cannot be passed "
                "to the VM"
            ) from err
        raise FailedPrecondition(f"open {device}: {err.strerror or err}") from err
    os.close(fd)


def undo_host_block(record: ResourceRecord) -> list[str]:
    """Nothing of a passed-through device is ours to remove on the host."""
    del record
    return []

"""A pod's read-only image disks: one per cached image, shared by the pod's containers of it.

`PodImages` hands each container the disk of its image, plugging it on first
use and unplugging it when the last container of that image in the pod is gone
(in-memory counts suffice: a crash takes the whole pod, and its record of the
disk, with it). The disk (`SharedImage`, kind "image") holds one reference on
the host's cache entry (shim/rootfs/cache.py), recorded in the pod's state
before it is taken, so that `delete` after a crash releases it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

from shim.config import Config
from shim.devices import device_id
from shim.hostmount import unmount_under
from shim.resource import PodServices
from shim.rootfs import image as image_mod
from shim.rootfs.cache import Holder, ImageCache, release_ref
from shim.rootfs.disk import PluggedDisk
from shim.state import STATE_FILE, ResourceRecord

log = logging.getLogger(__name__)

KIND = "image"


class SharedImage(PluggedDisk):
    """The disk of one cache entry in one pod, plugged read-only."""

    kind = KIND
    host_step = "image build"

    def __init__(
        self, key: str, layers: tuple[str, ...], cache: ImageCache, pod_name: str,
        state_file: Path, work_dir: Path,
    ) -> None:
        disk_id = device_id("i", key)
        super().__init__(
            disk_id, "", f"/run/cloudhv/images/{disk_id}", fstype=cache.format, read_only=True
        )
        self.key = key
        self._layers = layers
        self._cache = cache
        self._holder = Holder(pod_name, state_file, disk_id)
        self._scratch = work_dir / f"mnt-{disk_id}"
        self.users: set[str] = set()
        self.built = False

    @property
    def host(self) -> dict[str, str]:
        cache = self._cache
        return {
            "ref": str(cache.ref_path(self.key, self._holder.name)),
            "building": str(cache.building_path(self.key, self._holder.name)),
            "scratch": str(self._scratch),
        }

    async def _create(self, pod: PodServices) -> Path:
        async def build(tmp: Path) -> int:
            return await image_mod.build_image(self._layers, tmp, self._scratch, self._cache.format)

        path, self.built = await self._cache.acquire(self.key, self._holder, build)
        return path

    async def _undo_host(self) -> None:
        await asyncio.to_thread(undo_host, self.record)


def undo_host(record: ResourceRecord) -> list[str]:
    """Release what a pod's image disk held on the host, from its record alone."""
    done: list[str] = []
    scratch = record.host.get("scratch", "")
    if scratch:
        done += [f"unmounted {p}" for p in unmount_under([Path(scratch)])]
        with contextlib.suppress(FileNotFoundError, OSError):
            os.rmdir(scratch)
    building = record.host.get("building", "")
    if building:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(building)
            done.append(f"removed unfinished build {building}")
    ref = record.host.get("ref", "")
    if ref and release_ref(Path(ref)):
        done.append(f"released cache reference {ref}")
    return done


class PodImages:
    """The pod's shared image disks, by cache key, each counting its containers."""

    def __init__(self, cache: ImageCache, pod_name: str, state_file: Path) -> None:
        self.cache = cache
        self._pod_name = pod_name
        self._state_file = state_file
        self._disks: dict[str, SharedImage] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    @classmethod
    def from_config(cls, config: Config, pod_dir: Path) -> PodImages:
        """The image disks of the pod whose state lives in `pod_dir`."""
        cache = ImageCache(
            config.cache_dir,
            max_bytes=config.rootfs_cache.max_mib << 20,
            fmt=config.rootfs_cache.format,
        )
        return cls(cache, pod_dir.name, pod_dir / STATE_FILE)

    @property
    def disks(self) -> dict[str, SharedImage]:
        return dict(self._disks)

    async def use(
        self, key: str, layers: tuple[str, ...], container_id: str, pod: PodServices
    ) -> tuple[SharedImage, bool]:
        """The disk of `key` for `container_id`, plugged if it is the pod's first user.
        Returns (disk, whether it was plugged for this call)."""
        async with self._locks.setdefault(key, asyncio.Lock()):
            disk = self._disks.get(key)
            fresh = disk is None
            if disk is None:
                disk = SharedImage(
                    key, layers, self.cache, self._pod_name, self._state_file, pod.work_dir
                )
                await disk.attach(pod)
                self._disks[key] = disk
            disk.users.add(container_id)
            return disk, fresh

    async def release(self, disk: SharedImage, container_id: str, pod: PodServices) -> None:
        """`container_id` no longer uses `disk`; the last user's release unplugs it."""
        async with self._locks.setdefault(disk.key, asyncio.Lock()):
            disk.users.discard(container_id)
            if disk.users or self._disks.get(disk.key) is not disk:
                return
            del self._disks[disk.key]
            await disk.detach(pod)

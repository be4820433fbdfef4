"""A container's root filesystem in the guest, from containerd's rootfs mounts.

- Layers that never change (the overlayfs snapshotter's lowerdirs) become the
  pod's shared read-only image disk of them (shim/rootfs/shared.py, built once
  per host through the cache); layers that may still change become a read-only
  image of the container's own. Either way the container writes to an overlay
  in the guest: that image below, and above it its own upper, a small sparse
  ext4 disk or a guest tmpfs (`container_upper` in the config, or the container
  annotations below). Writes never reach the image; the upper goes with the
  container.
- A block device is passed through read-write and is the root itself.

Annotations (on the container, `io.cloudhv.container.*`):
    io.cloudhv.container.upper            "disk" | "tmpfs"
    io.cloudhv.container.upper_size_mib   MiB of the writable layer (>= 16)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shim import spec as spec_mod
from shim.config import Config, ContainerUpperConfig
from shim.errors import InvalidArgument
from shim.resource import PodServices, step
from shim.rootfs import source as source_mod
from shim.rootfs.cache import cache_key, layer_identity
from shim.rootfs.disk import BlockDisk, PrivateImage, UpperDisk
from shim.rootfs.image import Format
from shim.rootfs.shared import PodImages, SharedImage
from shim.types import CreateTask, Mount

log = logging.getLogger(__name__)

UPPER_ANNOTATION = "io.cloudhv.container.upper"
UPPER_SIZE_ANNOTATION = "io.cloudhv.container.upper_size_mib"
UPPER_KINDS = ("disk", "tmpfs")
MIN_UPPER_MIB = 16


@dataclass(frozen=True)
class UpperSpec:
    kind: str  # "disk" | "tmpfs"
    size_mib: int


def upper_spec(default: ContainerUpperConfig, annotations: Mapping[str, str]) -> UpperSpec:
    """The container's writable layer: the config's, unless its annotations say otherwise.
    A bad value is InvalidArgument naming the key and what is allowed."""
    kind = annotations.get(UPPER_ANNOTATION, default.kind)
    if kind not in UPPER_KINDS:
        raise InvalidArgument(
            f"annotation {UPPER_ANNOTATION}: must be one of {', '.join(UPPER_KINDS)} "
            f"(got {kind!r})"
        )
    size = default.size_mib
    raw = annotations.get(UPPER_SIZE_ANNOTATION)
    if raw is not None:
        if not raw.isdigit() or int(raw) < MIN_UPPER_MIB:
            raise InvalidArgument(
                f"annotation {UPPER_SIZE_ANNOTATION}: must be a whole number of MiB >= "
                f"{MIN_UPPER_MIB} (got {raw!r})"
            )
        size = int(raw)
    return UpperSpec(kind, size)


@dataclass(frozen=True)
class GuestRootfs:
    """What the agent makes the container's root of (CreateContainerRequest.rootfs)."""

    path: str
    upper_dir: str = ""
    work_dir: str = ""
    upper_tmpfs_mib: int = 0


def read_source(mounts: Sequence[Mount], spec_root: str) -> source_mod.Source:
    """Classify the rootfs, reading what that needs from the host (blocking)."""
    mountinfo: list[source_mod.MountInfo] = []
    majors: dict[str, int] = {}
    if not mounts and spec_root:
        mountinfo = source_mod.parse_mountinfo(Path("/proc/self/mountinfo").read_text())
        majors = source_mod.block_majors(Path("/proc/devices").read_text())
    return source_mod.classify(
        mounts,
        spec_root=spec_root,
        mountinfo=mountinfo,
        majors=majors,
        upper_is_empty=source_mod.upper_is_empty(mounts),
    )


class ContainerRootfs:
    """Everything a container's root is made of, attached in order and undone in reverse."""

    @classmethod
    def for_task(
        cls, task: CreateTask, spec: Mapping[str, Any], config: Config, images: PodImages
    ) -> ContainerRootfs:
        """The root of `task`, as its spec and the config say; InvalidArgument naming
        the field for a bad one, before anything exists."""
        try:
            spec_root = spec_mod.root_path_of(spec, Path(task.bundle))
            upper = upper_spec(config.container_upper, spec_mod.annotations_of(spec))
        except (spec_mod.SpecError, InvalidArgument) as err:
            raise InvalidArgument(f"create {task.id}: {err}") from err
        return cls(
            task.id, task.rootfs, spec_root=spec_root, images=images, upper=upper,
            fmt=config.rootfs_cache.format,
        )

    def __init__(
        self,
        container_id: str,
        mounts: Sequence[Mount],
        *,
        spec_root: str,
        images: PodImages,
        upper: UpperSpec,
        fmt: Format,
    ) -> None:
        self.container_id = container_id
        self._mounts = tuple(mounts)
        self._spec_root = spec_root
        self._images = images
        self._upper_spec = upper
        self._fmt: Format = fmt
        self._shared: SharedImage | None = None
        self._private: PrivateImage | None = None
        self._upper: UpperDisk | None = None
        self._block: BlockDisk | None = None
        self.guest: GuestRootfs | None = None
        self.summary: dict[str, object] = {}

    @property
    def disk_ids(self) -> list[str]:
        """The ids of the disks this container plugged or shares."""
        disks = (self._shared, self._private, self._upper, self._block)
        return [d.id for d in disks if d is not None]

    async def attach(self, pod: PodServices) -> GuestRootfs:
        """Plug and mount everything; on failure what was done is undone."""
        started = time.monotonic()
        try:
            source, key = await step("rootfs source", asyncio.to_thread(self._identify))
            if isinstance(source, source_mod.Block):
                self.guest = await self._attach_block(pod, source)
            else:
                self.guest = await self._attach_layers(pod, source, key)
        except BaseException:
            await self.detach(pod)
            raise
        self.summary["rootfs_ms"] = int((time.monotonic() - started) * 1000)
        return self.guest

    def _identify(self) -> tuple[source_mod.Source, str]:
        """What the root is made of and, for shared layers, their cache key (blocking)."""
        source = read_source(self._mounts, self._spec_root)
        if not isinstance(source, source_mod.Layers):
            return source, ""
        return source, cache_key([layer_identity(d) for d in source.dirs], self._fmt)

    async def _attach_block(self, pod: PodServices, source: source_mod.Block) -> GuestRootfs:
        disk = BlockDisk(
            self.container_id, source.device, source.fstype, source.options,
            host_mount=source.host_mount,
        )
        self._block = disk
        await disk.attach(pod)
        self.summary.update(kind="block", device=source.device)
        return GuestRootfs(path=disk.guest_path)

    async def _attach_layers(
        self, pod: PodServices, source: source_mod.Layers | source_mod.Private, key: str
    ) -> GuestRootfs:
        if isinstance(source, source_mod.Layers):
            shared, fresh = await self._images.use(key, source.dirs, self.container_id, pod)
            self._shared = shared
            self.summary.update(
                kind="shared", key=key,
                cache="built" if fresh and shared.built else "hit" if fresh else "pod",
            )
            lower = shared.guest_path
        else:
            log.info(
                "event=rootfs_private container=%s reason=%r", self.container_id, source.why
            )
            private = PrivateImage(self.container_id, source.dirs, pod.work_dir, self._fmt)
            self._private = private
            await private.attach(pod)
            self.summary.update(kind="private")
            lower = private.guest_path
        if self._upper_spec.kind == "tmpfs":
            return GuestRootfs(path=lower, upper_tmpfs_mib=self._upper_spec.size_mib)
        upper = UpperDisk(self.container_id, pod.work_dir, self._upper_spec.size_mib)
        self._upper = upper
        await upper.attach(pod)
        return GuestRootfs(path=lower, upper_dir=upper.upper_dir, work_dir=upper.work_dir)

    async def detach(self, pod: PodServices) -> None:
        """Undo in reverse: the upper, then the image (the pod's last user unplugs a
        shared one), then a passed-through device. Idempotent."""
        upper, self._upper = self._upper, None
        if upper is not None:
            await upper.detach(pod)
        shared, self._shared = self._shared, None
        if shared is not None:
            await self._images.release(shared, self.container_id, pod)
        private, self._private = self._private, None
        if private is not None:
            await private.detach(pod)
        block, self._block = self._block, None
        if block is not None:
            await block.detach(pod)

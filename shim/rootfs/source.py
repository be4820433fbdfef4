"""Where a container's root comes from on the host, read from containerd's rootfs mounts.

Three shapes, decided here without touching anything:

- `Layers`: read-only directories, top first, that are never written again:
  the lowerdirs of the overlayfs snapshotter's mount, or a read-only bind of a
  committed snapshot (a view). Their merged image is shared through the cache.
- `Private`: directories whose content may still change (an overlay whose
  upperdir already holds files, a writable bind of the native snapshotter):
  flattened into an image of this container's own, never shared.
- `Block`: a block device (the devmapper snapshotter's `/dev/mapper/*` or
  `/dev/dm-*`, a loop device): handed to the VM read-write, no copy. It comes as
  the task's rootfs mount, or (with no rootfs mounts) already mounted on the
  spec's root path, which the host then lets go of.

Devices are recognised by path and, for mounts found in mountinfo, by the major
number the kernel registered for device-mapper or loop (`/proc/devices`).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from shim.hostmount import unescape
from shim.rootfs.image import RootfsError
from shim.types import Mount

BLOCK_PREFIXES = ("/dev/mapper/", "/dev/dm-", "/dev/loop")
# Mount options that are flags on the host mount, not filesystem data for the guest.
_FLAG_OPTIONS = frozenset({"rw", "ro", "defaults", "auto", "noauto", "user", "nouser"})


@dataclass(frozen=True)
class Layers:
    dirs: tuple[str, ...]  # top first


@dataclass(frozen=True)
class Private:
    dirs: tuple[str, ...]  # top first
    why: str


@dataclass(frozen=True)
class Block:
    device: str
    fstype: str
    options: tuple[str, ...] = ()
    host_mount: str = ""  # where the host has it mounted now ("" = not mounted by us)


Source = Layers | Private | Block


@dataclass(frozen=True)
class MountInfo:
    """One line of /proc/self/mountinfo, the fields we use."""

    mount_point: str
    major: int
    minor: int
    fstype: str
    source: str
    options: tuple[str, ...]  # per-superblock options (the last field)


def parse_mountinfo(text: str) -> list[MountInfo]:
    """Every mount in `text` (the format of /proc/<pid>/mountinfo), in order."""
    found = []
    for line in text.splitlines():
        before, sep, after = line.partition(" - ")
        fields = before.split(" ")
        rest = after.split(" ")
        if not sep or len(fields) < 6 or len(rest) < 2:
            continue
        major, _, minor = fields[2].partition(":")
        try:
            numbers = int(major), int(minor)
        except ValueError:
            continue
        found.append(
            MountInfo(
                mount_point=unescape(fields[4]),
                major=numbers[0],
                minor=numbers[1],
                fstype=rest[0],
                source=unescape(rest[1]),
                options=tuple(rest[2].split(",")) if len(rest) > 2 and rest[2] else (),
            )
        )
    return found


def block_majors(proc_devices: str) -> dict[str, int]:
    """{driver name: major} of the block devices in `proc_devices` (/proc/devices)."""
    majors: dict[str, int] = {}
    in_block = False
    for line in proc_devices.splitlines():
        if line.startswith("Block devices:"):
            in_block = True
            continue
        if line.startswith("Character devices:"):
            in_block = False
            continue
        parts = line.split()
        if in_block and len(parts) == 2 and parts[0].isdigit():
            majors[parts[1]] = int(parts[0])
    return majors


def is_passthrough_device(path: str, major: int | None, majors: Mapping[str, int]) -> bool:
    """A device-mapper or loop device, by its path or its major number."""
    if path.startswith(BLOCK_PREFIXES):
        return True
    return major is not None and major in (majors.get("device-mapper"), majors.get("loop"))


def block_mount_at(
    target: str, mountinfo: Sequence[MountInfo], majors: Mapping[str, int]
) -> MountInfo | None:
    """The device-backed mount on `target` (the topmost one there), if it is one we pass
    through; None when `target` is no mount point or something else is mounted there."""
    target = target.rstrip("/") or "/"
    top = None
    for entry in mountinfo:
        if entry.mount_point == target:
            top = entry
    if top is None or not is_passthrough_device(top.source, top.major, majors):
        return None
    return top


def classify(
    mounts: Sequence[Mount],
    *,
    spec_root: str = "",
    mountinfo: Sequence[MountInfo] = (),
    majors: Mapping[str, int] | None = None,
    upper_is_empty: bool = True,
) -> Source:
    """Decide what the container's root is made of. Raises RootfsError naming the shape
    it cannot use. `upper_is_empty` says whether an overlay's upperdir holds nothing."""
    majors = majors or {}
    if not mounts:
        found = block_mount_at(spec_root, mountinfo, majors) if spec_root else None
        if found is not None:
            # The host mount's superblock options are the host's business (some,
            # like seclabel, are no mount options at all): the guest mounts plainly.
            return Block(device=found.source, fstype=found.fstype, host_mount=found.mount_point)
        raise RootfsError(
            "no rootfs mounts in the task, and its root path "
            f"{spec_root or '(none)'} is not a block device's mount (a VM needs the image "
            "as mounts, e.g. the overlayfs or devmapper snapshotter)"
        )
    if len(mounts) > 1:
        kinds = ", ".join(m.type for m in mounts)
        raise RootfsError(f"rootfs has {len(mounts)} mounts ({kinds}); exactly one is supported")
    mount = mounts[0]
    if mount.type == "overlay":
        upper, lowers = "", []
        for option in mount.options:
            key, _, value = option.partition("=")
            if key == "upperdir":
                upper = value
            elif key == "lowerdir":
                lowers = [d for d in value.split(":") if d]
        if not lowers:
            raise RootfsError(f"overlay rootfs without lowerdir: options {list(mount.options)}")
        if upper and not upper_is_empty:
            return Private((upper, *lowers), f"its upperdir {upper} is not empty")
        return Layers(tuple(lowers))
    options = set(mount.options)
    if mount.type in ("bind", "rbind") or options & {"bind", "rbind"}:
        if "ro" in options:
            return Layers((mount.source,))
        return Private((mount.source,), "a writable bind mount can still change")
    if is_passthrough_device(mount.source, None, majors) or _is_block_device(mount.source):
        return Block(device=mount.source, fstype=mount.type, options=_data_options(mount.options))
    raise RootfsError(
        f"rootfs mount type {mount.type!r} of {mount.source!r} is not supported "
        "(overlay, bind, or a block device)"
    )


def _data_options(options: Sequence[str]) -> tuple[str, ...]:
    return tuple(o for o in options if o and o not in _FLAG_OPTIONS)


def _is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def upper_is_empty(mounts: Sequence[Mount]) -> bool:
    """Whether the overlay mount's upperdir holds nothing (one getdents, no walk)."""
    for mount in mounts:
        for option in mount.options:
            key, _, value = option.partition("=")
            if key == "upperdir" and value:
                try:
                    with os.scandir(value) as entries:
                        return next(entries, None) is None
                except OSError as err:
                    raise RootfsError(f"read upperdir {value}: {err.strerror or err}") from err
    return True

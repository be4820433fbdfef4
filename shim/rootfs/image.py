"""A container's root filesystem as an ext4 image: from containerd's mounts to a disk file.

CreateTaskRequest.rootfs is (for the overlayfs snapshotter) one overlay mount:
lowerdir=L1:L2:…,upperdir=U,workdir=W. For a fresh container, U holds nothing
the image does not, so the merged tree is a read-only overlay with U as the top
lower layer. The kernel's overlay applies whiteouts and opaque dirs; mkfs.ext4
`-d` copies the merged view into a sparse image with headroom for the
container's writes.

Every host resource made here is removed here on failure: the overlay mount is
always unmounted, a half-written image is deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

from shim.errors import InvalidArgument
from shim.hostmount import MS_RDONLY, MountError, mount, unmount
from shim.types import Mount

_MIB = 1 << 20
_BLOCK = 4096
# Per-inode cost in the image beyond its data: inode table entry and directory entry.
_INODE_OVERHEAD = 512


class RootfsError(InvalidArgument):
    """The rootfs could not be prepared; the message names the operation and the object."""


def source_dirs(mounts: Sequence[Mount]) -> list[str]:
    """Host directories whose union (first wins) is the container's root.

    Raises RootfsError for mount shapes this shim cannot turn into a disk.
    """
    if not mounts:
        raise RootfsError(
            "no rootfs mounts in the task (a VM needs the image as mounts, e.g. the "
            "overlayfs snapshotter; `ctr run --rootfs` is not supported)"
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
        return ([upper] if upper else []) + lowers
    if mount.type in ("bind", "rbind") or "bind" in mount.options or "rbind" in mount.options:
        return [mount.source]
    raise RootfsError(f"rootfs mount type {mount.type!r} is not supported (overlay or bind)")


def image_size(data_bytes: int, inodes: int, headroom_mib: int) -> int:
    """Bytes for an ext4 image holding `data_bytes` in `inodes` files, plus headroom.

    ext4 metadata (bitmaps, inode tables, group descriptors) is a few percent; 10%
    plus a fixed 16 MiB floor covers it for trees from kilobytes to gigabytes.
    """
    used = data_bytes + inodes * _INODE_OVERHEAD
    total = int(used * 1.1) + 16 * _MIB + headroom_mib * _MIB
    return -(-total // _MIB) * _MIB


def tree_usage(root: Path) -> tuple[int, int]:
    """(bytes of data rounded to blocks, number of inodes) of the tree at `root`."""
    data = inodes = 0
    stack = [str(root)]
    while stack:
        path = stack.pop()
        try:
            entries = os.scandir(path)
        except OSError as err:
            raise RootfsError(f"scan {path}: {err.strerror or err}") from err
        with entries:
            for entry in entries:
                inodes += 1
                st = entry.stat(follow_symlinks=False)
                data += -(-st.st_size // _BLOCK) * _BLOCK
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
    return data, inodes + 1


# -- building the image ------------------------------------------------------------------


async def build_image(
    mounts: Sequence[Mount],
    image: Path,
    scratch: Path,
    *,
    headroom_mib: int,
    mkfs: str = "mkfs.ext4",
) -> int:
    """Write an ext4 image of the merged rootfs to `image`; returns its size in bytes.

    `scratch` is an empty directory this call may mount on (it is left unmounted).
    On failure nothing remains: no mount on `scratch`, no file at `image`.
    """
    dirs = source_dirs(mounts)
    mounted = False
    try:
        if len(dirs) == 1:
            tree = Path(dirs[0])
        else:
            scratch.mkdir(parents=True, exist_ok=True)
            # Read-only overlay, no upper: nothing is written to the snapshot dirs.
            try:
                mount("overlay", scratch, "overlay", MS_RDONLY, "lowerdir=" + ":".join(dirs))
            except MountError as err:
                raise RootfsError(str(err)) from err
            mounted = True
            tree = scratch
        data, inodes = await asyncio.to_thread(tree_usage, tree)
        size = image_size(data, inodes, headroom_mib)
        await _mkfs(mkfs, tree, image, size)
        return size
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            image.unlink()
        raise
    finally:
        if mounted:
            unmount(scratch, detach=True)
        with contextlib.suppress(OSError):
            scratch.rmdir()


async def _mkfs(mkfs: str, tree: Path, image: Path, size: int) -> None:
    image.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)  # sparse: only what mkfs and the container write takes space
    finally:
        os.close(fd)
    argv = [
        mkfs, "-q", "-F",
        "-b", str(_BLOCK),
        "-m", "0",  # no root reserve: the whole disk belongs to the container
        "-O", "^has_journal",  # a container's scratch disk needs no crash consistency
        "-E", "nodiscard,lazy_itable_init=1",
        "-d", str(tree),
        str(image),
    ]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        detail = out.decode(errors="replace").strip().splitlines()
        raise RootfsError(
            f"{mkfs} -d {tree} {image}: exit {proc.returncode}: {detail[-1] if detail else ''}"
        )

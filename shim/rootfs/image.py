"""Filesystem images of a container's read-only layers, and empty ones for its writes.

The layers (containerd's snapshot dirs, top first) are merged by the host
kernel's own overlayfs, mounted read-only with no upper: whiteouts and opaque
dirs are applied exactly as the container would see them, and nothing is
written to the snapshots. The merged view is then written into a read-only
image, ext4 (`mkfs.ext4 -d`) or EROFS (`mkfs.erofs`). Both keep hardlinks,
symlinks, modes (setuid included), owners, nanosecond times and every xattr
(file capabilities are the `security.capability` xattr).

Every host resource made here is removed here on failure: the overlay mount is
always unmounted, a half-written image is deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Literal

from shim.errors import InvalidArgument
from shim.hostmount import MS_RDONLY, MountError, mount, unmount

Format = Literal["ext4", "erofs"]
FORMATS: tuple[Format, ...] = ("ext4", "erofs")

_MIB = 1 << 20
_BLOCK = 4096
# Per-inode cost in an ext4 image beyond its data: its inode (256 bytes) and a
# directory entry.
_INODE_OVERHEAD = 512


class RootfsError(InvalidArgument):
    """The rootfs could not be prepared; the message names the operation and the object."""


def ext4_size(data_bytes: int, inodes: int, extra_mib: int = 0) -> int:
    """Bytes for an ext4 image holding `data_bytes` in `inodes` files (plus `extra_mib`).

    ext4 metadata (bitmaps, inode tables, group descriptors) is a few percent; 10%
    plus a fixed 16 MiB floor covers it for trees from kilobytes to gigabytes. The
    file is sparse: what is never written takes no space.
    """
    used = data_bytes + inodes * _INODE_OVERHEAD
    total = int(used * 1.1) + 16 * _MIB + extra_mib * _MIB
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


@contextlib.asynccontextmanager
async def merged(layers: Sequence[str], scratch: Path) -> AsyncIterator[Path]:
    """The merged read-only view of `layers` (top first), mounted on `scratch` while
    the context lasts. One layer needs no mount: it is the view."""
    if not layers:
        raise RootfsError("no layers to merge")
    if len(layers) == 1:
        yield Path(layers[0])
        return
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        # Read-only overlay, no upper: nothing is written to the snapshot dirs.
        try:
            mount("overlay", scratch, "overlay", MS_RDONLY, "lowerdir=" + ":".join(layers))
        except MountError as err:
            raise RootfsError(str(err)) from err
        try:
            yield scratch
        finally:
            unmount(scratch, detach=True)
    finally:
        with contextlib.suppress(OSError):
            scratch.rmdir()


async def build_image(layers: Sequence[str], out: Path, scratch: Path, fmt: Format) -> int:
    """Write a `fmt` image of the merged `layers` to `out`, durably (fsynced); returns
    its allocated bytes. On failure there is nothing at `out` and nothing mounted."""
    try:
        async with merged(layers, scratch) as tree:
            await make_filesystem(fmt, tree, out)
        return await asyncio.to_thread(_fsync_size, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            out.unlink()
        raise


async def make_filesystem(fmt: Format, tree: Path, out: Path) -> None:
    """Write a read-only `fmt` filesystem holding `tree` to the new file `out`."""
    if fmt == "erofs":
        # Uncompressed: the guest reads it at disk speed, and the host page cache
        # holds one copy for every VM using it.
        out.parent.mkdir(parents=True, exist_ok=True)
        await _run(["mkfs.erofs", "--quiet", str(out), str(tree)], f"mkfs.erofs {out} {tree}")
        return
    data, inodes = await asyncio.to_thread(tree_usage, tree)
    _create_sparse(out, ext4_size(data, inodes))
    await _mkfs_ext4(out, inodes=inodes + inodes // 10 + 64, tree=tree)


async def make_empty_ext4(out: Path, size_mib: int) -> None:
    """A new sparse ext4 of `size_mib` at `out` (a container's writable layer)."""
    _create_sparse(out, size_mib * _MIB)
    try:
        await _mkfs_ext4(out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            out.unlink()
        raise


def _create_sparse(out: Path, size: int) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)  # sparse: only what mkfs and the container write takes space
    finally:
        os.close(fd)


async def _mkfs_ext4(out: Path, *, inodes: int = 0, tree: Path | None = None) -> None:
    argv = [
        "mkfs.ext4", "-q", "-F",
        "-b", str(_BLOCK),
        "-I", "256",  # nanosecond times and in-inode xattrs, whatever the image size
        "-m", "0",  # no root reserve: the whole disk belongs to the container
        "-O", "^has_journal",  # read-only, or a container's scratch: no journal needed
        "-E", "nodiscard,lazy_itable_init=1,root_owner=0:0",
    ]
    if inodes:
        argv += ["-N", str(inodes)]  # the size's default ratio is too few for tiny files
    if tree is not None:
        argv += ["-d", str(tree)]
    argv.append(str(out))
    await _run(argv, f"mkfs.ext4 {'-d ' + str(tree) + ' ' if tree else ''}{out}")


async def _run(argv: list[str], what: str) -> None:
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
        lines = out.decode(errors="replace").strip().splitlines()
        # mkfs.erofs puts its error first ("<E> ...") and its usage after it.
        errors = [line for line in lines if line.startswith("<E>")]
        detail = errors[0] if errors else lines[-1] if lines else ""
        raise RootfsError(f"{what}: exit {proc.returncode}: {detail}")


def _fsync_size(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
        return os.fstat(fd).st_blocks * 512
    finally:
        os.close(fd)

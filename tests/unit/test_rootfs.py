"""Rootfs: mount shapes, block device detection on mountinfo samples, image sizing, and
(as root) flattened layers in both image formats, checked on the host kernel's mounts."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from shim import hostmount
from shim.rootfs import image as image_mod
from shim.rootfs import source
from shim.rootfs.image import RootfsError
from shim.rootfs.source import Block, Layers, Private, classify, parse_mountinfo
from shim.types import Mount


def overlay(lower: str, upper: str = "/u", work: str = "/w") -> Mount:
    return Mount(
        "overlay",
        "overlay",
        "",
        (f"workdir={work}", f"upperdir={upper}", f"lowerdir={lower}", "index=off"),
    )


# -- shapes ------------------------------------------------------------------------------


def test_overlay_with_an_empty_upper_is_its_shared_lowers() -> None:
    assert classify([overlay("/l1:/l2")]) == Layers(("/l1", "/l2"))
    ro = Mount("overlay", "overlay", "", ("lowerdir=/l1:/l2",))
    assert classify([ro]) == Layers(("/l1", "/l2"))


def test_overlay_with_files_in_its_upper_is_private() -> None:
    found = classify([overlay("/l1:/l2")], upper_is_empty=False)
    assert isinstance(found, Private) and found.dirs == ("/u", "/l1", "/l2")
    assert "/u" in found.why


def test_binds() -> None:
    view = Mount("bind", "/snap/1/fs", "", ("rbind", "ro"))
    assert classify([view]) == Layers(("/snap/1/fs",))
    active = classify([Mount("bind", "/snap/1/fs", "", ("rbind", "rw"))])
    assert isinstance(active, Private) and active.dirs == ("/snap/1/fs",)


def test_devmapper_mount_is_a_block_device() -> None:
    dm = Mount("ext4", "/dev/mapper/containerd-pool-snap-12", "", ("rw", "discard"))
    assert classify([dm]) == Block("/dev/mapper/containerd-pool-snap-12", "ext4", ("discard",))
    xfs = Mount("xfs", "/dev/dm-3", "", ("nouuid",))
    assert classify([xfs]) == Block("/dev/dm-3", "xfs", ("nouuid",))


def test_shapes_refused_by_name() -> None:
    with pytest.raises(RootfsError, match="no rootfs mounts"):
        classify([])
    with pytest.raises(RootfsError, match="exactly one"):
        classify([overlay("/a"), overlay("/b")])
    with pytest.raises(RootfsError, match="'ext4' of '/srv/disk.img' is not supported"):
        classify([Mount("ext4", "/srv/disk.img")])
    with pytest.raises(RootfsError, match="without lowerdir"):
        classify([Mount("overlay", "overlay", "", ("upperdir=/u",))])


def test_upper_is_empty_reads_the_upperdir(tmp_path: Path) -> None:
    (tmp_path / "u").mkdir()
    assert source.upper_is_empty([overlay("/l", str(tmp_path / "u"))])
    (tmp_path / "u" / "file").write_text("x")
    assert not source.upper_is_empty([overlay("/l", str(tmp_path / "u"))])
    with pytest.raises(RootfsError, match="read upperdir"):
        source.upper_is_empty([overlay("/l", str(tmp_path / "missing"))])


# -- block devices found in mountinfo --------------------------------------------------

PROC_DEVICES = """Character devices:
  1 mem
  4 tty
253 not-a-block-device

Block devices:
  7 loop
  8 sd
 11 sr
252 virtblk
253 device-mapper
254 mdp
"""

TASKS = "/run/containerd/io.containerd.runtime.v2.task/k8s.io"
# Real lines as containerd hosts have them ($T: the runtime's task dir).
MOUNTINFO = r"""22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
98 22 0:46 / $T/aaa/rootfs rw shared:40 - overlay overlay rw,lowerdir=/l1,upperdir=/u,workdir=/w
120 22 253:4 / $T/bbb/rootfs rw shared:52 - ext4 /dev/mapper/containerd-pool-snap-12 rw,stripe=16
121 22 253:5 / $T/ccc/rootfs rw shared:53 - xfs /dev/dm-5 rw,attr2,inode64,noquota
130 22 7:2 / /var/lib/test/loop\040root rw,relatime shared:60 - ext4 /dev/loop2 rw
140 22 253:9 / /var/lib/test/renamed rw,relatime shared:61 - ext4 /dev/disk/by-id/dm-name-thin rw
150 22 8:1 / /mnt/sdb rw,relatime shared:62 - ext4 /dev/sda1 rw
151 150 7:3 / /mnt/sdb rw,relatime shared:63 - ext4 /dev/loop3 rw
""".replace("$T", TASKS)


def test_block_majors_from_proc_devices() -> None:
    majors = source.block_majors(PROC_DEVICES)
    assert majors["device-mapper"] == 253 and majors["loop"] == 7 and "mem" not in majors


def _found(target: str) -> Block:
    found = classify(
        [],
        spec_root=target,
        mountinfo=parse_mountinfo(MOUNTINFO),
        majors=source.block_majors(PROC_DEVICES),
    )
    assert isinstance(found, Block)
    return found


def test_devmapper_rootfs_found_in_mountinfo() -> None:
    root = TASKS + "/{}/rootfs"
    assert _found(root.format("bbb")) == Block(
        "/dev/mapper/containerd-pool-snap-12", "ext4", (), root.format("bbb")
    )
    assert _found(root.format("ccc") + "/") == Block("/dev/dm-5", "xfs", (), root.format("ccc"))


def test_a_device_is_recognised_by_its_major_whatever_its_name() -> None:
    assert _found("/var/lib/test/renamed").device == "/dev/disk/by-id/dm-name-thin"


def test_loop_device_and_escaped_mount_point() -> None:
    found = _found("/var/lib/test/loop root")
    assert (found.device, found.host_mount) == ("/dev/loop2", "/var/lib/test/loop root")


def test_the_topmost_mount_on_a_path_decides() -> None:
    assert _found("/mnt/sdb").device == "/dev/loop3"  # stacked over /dev/sda1


@pytest.mark.parametrize(
    "target",
    [
        TASKS + "/aaa/rootfs",  # overlay
        "/",  # a virtio disk, neither devmapper nor loop
        "/not/mounted",
    ],
)
def test_anything_else_behind_the_root_path_is_refused(target: str) -> None:
    with pytest.raises(RootfsError, match="not a block device's mount"):
        classify(
            [], spec_root=target, mountinfo=parse_mountinfo(MOUNTINFO),
            majors=source.block_majors(PROC_DEVICES),
        )


def test_mountinfo_of_this_host_parses() -> None:
    entries = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    assert any(e.mount_point == "/" for e in entries)


def test_mountinfo_unescape() -> None:
    assert hostmount.unescape(r"/a\040b\134c") == "/a b\\c"


# -- sizes -------------------------------------------------------------------------------


def test_ext4_size() -> None:
    size = image_mod.ext4_size(10 << 20, 1000, 64)
    assert size % (1 << 20) == 0
    assert size >= (10 << 20) + (64 << 20) + (16 << 20)
    assert image_mod.ext4_size(0, 1) == 17 << 20


# -- flattening, as root -------------------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting overlayfs needs root")


def _layers(tmp: Path) -> list[str]:
    """Two layers, top first: the bottom has every kind of file, the top deletes one
    (a whiteout) and replaces a directory (opaque)."""
    bottom, top = tmp / "bottom", tmp / "top"
    (bottom / "etc").mkdir(parents=True)
    (bottom / "etc" / "gone").write_text("deleted above")
    (bottom / "etc" / "kept").write_text("base")
    os.link(bottom / "etc" / "kept", bottom / "etc" / "kept-link")
    (bottom / "abs").symlink_to("/etc/kept")
    (bottom / "etc" / "rel").symlink_to("kept")
    (bottom / "suid").write_bytes(b"#!/bin/sh\n")
    os.chmod(bottom / "suid", 0o4755)
    (bottom / "owned").write_text("x")
    os.chown(bottom / "owned", 1234, 5678)
    (bottom / "xattr").write_text("x")
    os.setxattr(bottom / "xattr", "user.color", b"blue")
    (bottom / "cap").write_bytes(b"\x7fELF")
    # VFS_CAP_REVISION_2, CAP_NET_RAW (13) permitted + effective.
    caps = (0x02000001).to_bytes(4, "little") + (1 << 13).to_bytes(4, "little") + bytes(12)
    os.setxattr(bottom / "cap", "security.capability", caps)
    (bottom / "opaque").mkdir()
    (bottom / "opaque" / "hidden").write_text("x")
    (top / "etc").mkdir(parents=True)
    os.mknod(top / "etc" / "gone", 0o600 | stat.S_IFCHR, os.makedev(0, 0))  # whiteout
    (top / "opaque").mkdir()
    os.setxattr(top / "opaque", "trusted.overlay.opaque", b"y")
    (top / "opaque" / "new").write_text("y")
    return [str(top), str(bottom)]


@needs_root
@pytest.mark.parametrize("fmt", image_mod.FORMATS)
async def test_flattened_image_is_the_merged_view(tmp_path: Path, fmt: image_mod.Format) -> None:
    layers = _layers(tmp_path)
    out, scratch, mnt = tmp_path / f"root.{fmt}", tmp_path / "scratch", tmp_path / "mnt"
    size = await image_mod.build_image(layers, out, scratch, fmt)
    assert size == out.stat().st_blocks * 512 < 32 << 20
    assert not scratch.exists() and str(scratch) not in hostmount.mount_points()
    mnt.mkdir()
    # The host kernel mounts both: ext4 through a loop device, EROFS from the file.
    options = ["-o", "ro,loop"] if fmt == "ext4" else ["-t", "erofs", "-o", "ro"]
    subprocess.run(["mount", *options, str(out), str(mnt)], check=True)
    try:
        assert sorted(os.listdir(mnt / "etc")) == ["kept", "kept-link", "rel"]
        assert (mnt / "etc" / "kept").read_text() == "base"
        assert os.stat(mnt / "etc" / "kept").st_ino == os.stat(mnt / "etc" / "kept-link").st_ino
        assert os.stat(mnt / "etc" / "kept").st_nlink == 2
        assert os.readlink(mnt / "abs") == "/etc/kept"
        assert os.readlink(mnt / "etc" / "rel") == "kept"
        assert stat.S_IMODE(os.stat(mnt / "suid").st_mode) == 0o4755
        assert (os.stat(mnt / "owned").st_uid, os.stat(mnt / "owned").st_gid) == (1234, 5678)
        assert os.getxattr(mnt / "xattr", "user.color") == b"blue"
        assert os.getxattr(mnt / "cap", "security.capability")[4:8] == (1 << 13).to_bytes(
            4, "little"
        )
        assert sorted(os.listdir(mnt / "opaque")) == ["new"]
        # No overlay bookkeeping leaks into the image.
        assert "trusted.overlay.opaque" not in os.listxattr(mnt / "opaque")
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@needs_root
async def test_build_failure_leaves_nothing(tmp_path: Path) -> None:
    out, scratch = tmp_path / "root.ext4", tmp_path / "mnt"
    with pytest.raises(RootfsError, match="mount overlay"):
        await image_mod.build_image(
            [f"{tmp_path}/missing1", f"{tmp_path}/missing2"], out, scratch, "ext4"
        )
    assert not out.exists() and not scratch.exists()
    with pytest.raises(RootfsError, match="mkfs.erofs"):
        await image_mod.build_image([str(tmp_path / "missing")], out, scratch, "erofs")
    assert not out.exists()


async def test_empty_upper_is_sparse_ext4(tmp_path: Path) -> None:
    out = tmp_path / "upper.ext4"
    await image_mod.make_empty_ext4(out, 64)
    assert out.stat().st_size == 64 << 20 and out.stat().st_blocks * 512 < 4 << 20
    with open(out, "rb") as handle:
        handle.seek(1024 + 56)
        assert handle.read(2) == b"\x53\xef"  # the ext4 superblock magic
    with pytest.raises(FileExistsError):
        await image_mod.make_empty_ext4(out, 64)  # never over something there

"""Rootfs: mount shapes, image sizing, and (as root) a flattened overlay with whiteouts."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from shim import hostmount
from shim.rootfs import image as rootfs
from shim.rootfs.image import RootfsError
from shim.types import Mount


def overlay(lower: str, upper: str = "/u", work: str = "/w") -> Mount:
    return Mount(
        "overlay",
        "overlay",
        "",
        (f"workdir={work}", f"upperdir={upper}", f"lowerdir={lower}", "index=off"),
    )


def test_source_dirs_overlay_upper_first() -> None:
    assert rootfs.source_dirs([overlay("/l1:/l2")]) == ["/u", "/l1", "/l2"]


def test_source_dirs_readonly_overlay() -> None:
    m = Mount("overlay", "overlay", "", ("lowerdir=/l1:/l2",))
    assert rootfs.source_dirs([m]) == ["/l1", "/l2"]


def test_source_dirs_bind() -> None:
    assert rootfs.source_dirs([Mount("bind", "/snap/1/fs", "", ("rbind", "rw"))]) == ["/snap/1/fs"]


def test_source_dirs_rejects() -> None:
    with pytest.raises(RootfsError, match="no rootfs mounts"):
        rootfs.source_dirs([])
    with pytest.raises(RootfsError, match="exactly one"):
        rootfs.source_dirs([overlay("/a"), overlay("/b")])
    with pytest.raises(RootfsError, match="not supported"):
        rootfs.source_dirs([Mount("ext4", "/dev/sda1")])
    with pytest.raises(RootfsError, match="without lowerdir"):
        rootfs.source_dirs([Mount("overlay", "overlay", "", ("upperdir=/u",))])


def test_image_size() -> None:
    size = rootfs.image_size(10 << 20, 1000, headroom_mib=64)
    assert size % (1 << 20) == 0
    assert size >= (10 << 20) + (64 << 20) + (16 << 20)
    assert rootfs.image_size(0, 1, 16) == 33 << 20


def test_mountinfo_unescape() -> None:
    assert hostmount._unescape(r"/a\040b\134c") == "/a b\\c"


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting overlayfs needs root")


def _debugfs(image: Path, request: str) -> str:
    return subprocess.run(
        ["debugfs", "-R", request, str(image)], capture_output=True, text=True, check=True
    ).stdout


@needs_root
async def test_build_image_honours_whiteouts(tmp_path: Path) -> None:
    lower1, lower2, upper = tmp_path / "l1", tmp_path / "l2", tmp_path / "u"
    for d in (lower1, lower2, upper):
        d.mkdir()
    (lower2 / "etc").mkdir()
    (lower2 / "etc" / "gone").write_text("deleted in l1")
    (lower2 / "etc" / "kept").write_text("base")
    (lower2 / "opaque").mkdir()
    (lower2 / "opaque" / "hidden").write_text("x")
    (lower1 / "etc").mkdir()
    os.mknod(lower1 / "etc" / "gone", 0o600 | 0o020000, os.makedev(0, 0))  # whiteout
    (lower1 / "opaque").mkdir()
    os.setxattr(lower1 / "opaque", "trusted.overlay.opaque", b"y")
    (lower1 / "opaque" / "new").write_text("y")
    (upper / "etc").mkdir()
    (upper / "etc" / "kept").write_text("changed")
    mount = overlay(f"{lower1}:{lower2}", str(upper), str(tmp_path / "w"))
    image = tmp_path / "disk" / "root.ext4"
    scratch = tmp_path / "mnt"
    size = await rootfs.build_image([mount], image, scratch, headroom_mib=16)
    assert image.stat().st_size == size
    assert image.stat().st_blocks * 512 < size  # sparse
    assert not scratch.exists()
    assert str(scratch) not in hostmount.mount_points()
    etc = _debugfs(image, "ls -l /etc")
    assert "kept" in etc and "gone" not in etc
    assert "changed" in _debugfs(image, "cat /etc/kept")
    opaque = _debugfs(image, "ls /opaque")
    assert "new" in opaque and "hidden" not in opaque


@needs_root
async def test_build_image_failure_leaves_nothing(tmp_path: Path) -> None:
    image = tmp_path / "root.ext4"
    scratch = tmp_path / "mnt"
    mount = overlay(f"{tmp_path}/missing1:{tmp_path}/missing2", str(tmp_path / "missing3"))
    with pytest.raises(RootfsError, match="mount overlay"):
        await rootfs.build_image([mount], image, scratch, headroom_mib=16)
    assert not image.exists() and not scratch.exists()
    (tmp_path / "l").mkdir()
    with pytest.raises(RootfsError, match="exit"):
        await rootfs.build_image(
            [Mount("bind", str(tmp_path / "l"))], image, scratch, headroom_mib=16, mkfs="false"
        )
    assert not image.exists()

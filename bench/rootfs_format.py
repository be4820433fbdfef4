"""ext4 or EROFS for the shared read-only image: the same trees built, sized, mounted and read.

Usage: python -m bench.rootfs_format [--kernel VMLINUX] [-n 3]   (root, PYTHONPATH=.)

For each tree (the test busybox tree and a ~200 MB tree of many small files
copied from the host's /usr) it builds an image with each format, as the shim
does (shim/rootfs/image.py), and reports build time and allocated size. Then it
boots one QEMU TCG guest with both images attached (its root a small ext4 with
busybox as /init: no agent, no shim) and times, inside the guest, the mount and a cold
read of every byte (`tar c | wc -c`) and of every inode (`find | wc -l`). The
guest kernel must have EROFS (`--kernel`); the shim's own guest kernel may not.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from shim.rootfs import image as image_mod
from tests.integration.busybox_tree import make_busybox_tree

BUSYBOX = Path("/bin/busybox")
HOST_DIRS = ("/usr/lib/python3.11", "/usr/include", "/usr/share/perl")

GUEST_SCRIPT = """#!/bin/busybox sh
mount -t proc proc /proc; mount -t sysfs sys /sys
now() { read up _ < /proc/uptime; echo $(( ${up%.*}${up#*.} * 10 )); }  # ms, 10 ms steps
mount -t tmpfs m /m
for d in /sys/block/vd*; do
  dev=/dev/${d##*/}; name=$(cat $d/serial); fs=${name%%-*}
  [ "$name" = boot ] && continue
  mkdir -p /m/$name
  t0=$(now); mount -t $fs -o ro $dev /m/$name || echo "RESULT $name mount failed"
  t1=$(now); bytes=$(tar cf - -C /m/$name . | wc -c)
  t2=$(now); files=$(find /m/$name | wc -l)
  t3=$(now)
  echo "RESULT $name mount_ms=$((t1-t0)) read_ms=$((t2-t1))" \
       "find_ms=$((t3-t2)) bytes=$bytes files=$files"
done
echo o > /proc/sysrq-trigger
"""


def host_tree(root: Path) -> Path:
    for source in HOST_DIRS:
        target = root / source.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-a", source, str(target)], check=True)
    return root


def boot_disk(out: Path, work: Path) -> Path:
    root = make_busybox_tree(work / "boot")
    (root / "m").mkdir()
    (root / "init").write_text(GUEST_SCRIPT)
    (root / "init").chmod(0o755)
    subprocess.run(["truncate", "-s", "16M", str(out)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(root), str(out)], check=True)
    return out


async def build(fmt: str, tree: Path, out: Path) -> float:
    started = time.monotonic()
    await image_mod.make_filesystem(fmt, tree, out)
    return (time.monotonic() - started) * 1000


def guest_read(kernel: Path, boot: Path, disks: dict[str, Path]) -> dict[str, dict[str, int]]:
    cmd = [
        "qemu-system-x86_64", "-machine", "q35,accel=tcg", "-cpu", "max", "-m", "512M",
        "-smp", "1", "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-serial", "stdio", "-kernel", str(kernel),
        "-append", "console=ttyS0 quiet panic=-1 root=/dev/vda ro rootfstype=ext4 init=/init",
        "-drive", f"file={boot},if=none,id=boot,format=raw,readonly=on",
        "-device", "virtio-blk-pci,drive=boot,serial=boot",
    ]
    for serial, path in disks.items():
        cmd += [
            "-drive", f"file={path},if=none,id={serial},format=raw,readonly=on",
            "-device", f"virtio-blk-pci,drive={serial},serial={serial}",
        ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900).stdout
    results: dict[str, dict[str, int]] = {}
    for match in re.finditer(r"RESULT (\S+) (.*)", out):
        results[match.group(1)] = {
            k: int(v) for k, v in (kv.split("=") for kv in match.group(2).split())
        }
    if len(results) != len(disks):
        raise RuntimeError(f"guest reported {sorted(results)} of {sorted(disks)}:\n{out[-3000:]}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kernel", type=Path, required=True, help="a guest vmlinux with EROFS")
    parser.add_argument("-n", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fmt-", dir="/var/tmp"))
    try:
        trees = {
            "busybox": make_busybox_tree(work / "busybox"),
            "usr200": host_tree(work / "usr200"),
        }
        boot = boot_disk(work / "boot.ext4", work)
        print(f"{'tree':8} {'format':6} {'build ms':>9} {'MiB alloc':>10} "
              f"{'mount ms':>9} {'read ms':>8} {'find ms':>8} {'bytes':>11} {'files':>6}")
        for tree_name, tree in trees.items():
            disks: dict[str, Path] = {}
            build_ms: dict[str, list[float]] = {}
            for fmt in ("ext4", "erofs"):
                out = work / f"{tree_name}.{fmt}"
                build_ms[fmt] = []
                for _ in range(args.n):
                    out.unlink(missing_ok=True)
                    subprocess.run(["sync"], check=True)
                    build_ms[fmt].append(asyncio.run(build(fmt, tree, out)))
                disks[f"{fmt}-{tree_name}"] = out
            guest = [guest_read(args.kernel, boot, disks) for _ in range(args.n)]
            for fmt in ("ext4", "erofs"):
                serial = f"{fmt}-{tree_name}"
                alloc = os.stat(disks[serial]).st_blocks * 512 / (1 << 20)

                def med(key: str, serial: str = serial, guest: list[Any] = guest) -> float:
                    return statistics.median(g[serial][key] for g in guest)

                print(f"{tree_name:8} {fmt:6} {statistics.median(build_ms[fmt]):9.0f} "
                      f"{alloc:10.1f} {med('mount_ms'):9.0f} {med('read_ms'):8.0f} "
                      f"{med('find_ms'):8.0f} {guest[0][serial]['bytes']:11} "
                      f"{guest[0][serial]['files']:6}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Busybox trees and disks for test containers, from Debian's busybox-static."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

BUSYBOX = Path("/bin/busybox")


def make_busybox_tree(root: Path) -> Path:
    """A minimal container root: busybox with every applet linked under /bin."""
    for name in ("bin", "proc", "sys", "dev", "tmp", "etc", "root", "var", "run"):
        (root / name).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    applets = subprocess.run(
        [str(BUSYBOX), "--list"], check=True, stdout=subprocess.PIPE, text=True
    ).stdout.split()
    for applet in applets:
        link = root / "bin" / applet
        if applet != "busybox" and not link.exists():
            link.symlink_to("busybox")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    (root / "tmp").chmod(0o1777)
    return root


def make_ext4(tree: Path, image: Path, size_mib: int = 16) -> Path:
    """An ext4 image of `tree`, made with the real mkfs.ext4."""
    with open(image, "wb") as handle:
        handle.truncate(size_mib << 20)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-E", "root_owner=0:0", "-d", str(tree), str(image)],
        check=True,
    )
    return image


def add_host_programs(root: Path, programs: list[Path], plugin_dirs: tuple[Path, ...] = ()) -> Path:
    """Copies host programs into `root` at their own paths, with every library `ldd`
    reports for them and for the plugins they load (`plugin_dirs`, copied whole)."""
    elves: list[Path] = []
    for program in programs:
        real = program.resolve()
        target = root / real.relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(real, target)
        if program != real:
            link = root / program.relative_to("/")
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(real.name if real.parent == program.parent else real)
        elves.append(real)
    for plugins in plugin_dirs:
        shutil.copytree(plugins, root / plugins.relative_to("/"), symlinks=True)
        elves += sorted(plugins.glob("*.so"))
    libraries: set[str] = set()
    for elf in elves:
        listing = subprocess.run(
            ["ldd", str(elf)], check=True, stdout=subprocess.PIPE, text=True
        ).stdout
        for line in listing.splitlines():
            words = line.split()
            if "=>" in words and words[2].startswith("/"):
                libraries.add(words[2])
            elif words and words[0].startswith("/"):
                libraries.add(words[0])  # the loader
    for library in sorted(libraries):
        target = root / library.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(library).resolve(), target)
    return root

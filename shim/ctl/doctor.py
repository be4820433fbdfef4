"""`cloudhvctl doctor`: is this host ready to run pods in VMs? One check per thing a
pod needs, each with what was found and, when it falls short, how to fix it.

Checks read the host and never change it; the optional boot check starts one
short-lived VM through the configured VMM (shim/ctl/probe.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from shim.config import Config, ConfigError

OK, WARN, FAIL = "ok", "warn", "fail"
ELF_MAGIC = b"\x7fELF"
EXT4_MAGIC_OFFSET = 1080
EXT4_MAGIC = b"\x53\xef"
INSTALL_HINT = "run scripts/install.sh from a checkout (it builds and installs the guest)"


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # OK | WARN | FAIL
    detail: str
    fix: str = ""


def check_config(path: Path, load: Callable[[Path], Config]) -> tuple[Check, Config | None]:
    try:
        config = load(path)
    except ConfigError as err:
        return Check("config", FAIL, str(err), f"fix {path}, or reinstall: {INSTALL_HINT}"), None
    return Check("config", OK, f"{path}: vmm {config.vmm}"), config


def check_vmm(config: Config) -> Check:
    binary = config.cloud_hypervisor.binary if config.vmm == "cloud-hypervisor" else (
        config.qemu.binary
    )
    name = f"VMM ({config.vmm})"
    if not os.access(binary, os.X_OK):
        pkg = "qemu-system-x86" if config.vmm == "qemu" else "cloud-hypervisor"
        return Check(name, FAIL, f"{binary}: not found or not executable",
                     f"install {pkg}, or set the binary's path in the config")
    return Check(name, OK, f"{binary}: {_version(binary)}")


def _version(binary: Path) -> str:
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "version unknown"
    return out.strip().splitlines()[0] if out.strip() else "version unknown"


def check_accel(config: Config, *, exists: Callable[[str], bool] = os.path.exists) -> Check:
    kvm, mshv = exists("/dev/kvm"), exists("/dev/mshv")
    present = ", ".join(d for d, ok in (("/dev/kvm", kvm), ("/dev/mshv", mshv)) if ok) or "none"
    if config.vmm == "cloud-hypervisor":
        if kvm or mshv:
            return Check("accelerator", OK, f"Cloud Hypervisor on {present}")
        return Check("accelerator", FAIL, "Cloud Hypervisor needs /dev/kvm or /dev/mshv; none",
                     "enable virtualisation (nested virtualisation on a cloud VM), or use "
                     '"vmm": "qemu" with "accel": "tcg"')
    if config.qemu.accel == "kvm":
        if not kvm:
            return Check("accelerator", FAIL, "qemu.accel is kvm but /dev/kvm is missing",
                         'load kvm_intel/kvm_amd, or set "qemu": {"accel": "tcg"}')
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            return Check("accelerator", FAIL, "/dev/kvm is not readable and writable",
                         "run the shim as root (containerd does)")
        return Check("accelerator", OK, "QEMU with KVM")
    hint = ""
    if kvm:
        hint = ("/dev/kvm exists: `cloudhvctl probe` tells whether an accelerated guest "
                "boots here (the installer chose TCG because one did not)")
    return Check("accelerator", WARN if hint else OK,
                 f"QEMU with TCG (software emulation: slow); devices present: {present}", hint)


def check_vsock(config: Config) -> Check:
    if config.vmm != "qemu":
        return Check("vsock backend", OK, "Cloud Hypervisor has its own hybrid vsock")
    backend = config.qemu.vsock_backend
    if not os.access(backend, os.X_OK):
        return Check("vsock backend", FAIL, f"{backend}: not found or not executable",
                     "install vhost-device-vsock (Debian sid/trixie: apt-get install "
                     "vhost-device-vsock), or set qemu.vsock_backend")
    return Check("vsock backend", OK, f"{backend}: {_version(backend)}")


def check_kernel(config: Config) -> Check:
    path = config.kernel_path
    head = _head(path, 4)
    if head is None:
        return Check("guest kernel", FAIL, f"{path}: missing", INSTALL_HINT)
    if head != ELF_MAGIC:
        return Check("guest kernel", FAIL, f"{path}: not an ELF vmlinux",
                     "kernel_path must name the uncompressed vmlinux (PVH boot)")
    return Check("guest kernel", OK, f"{path} ({_mib(path)} MiB)")


def check_rootfs(config: Config) -> Check:
    path = config.rootfs_path
    head = _head(path, EXT4_MAGIC_OFFSET + 2)
    if head is None:
        return Check("guest rootfs", FAIL, f"{path}: missing", INSTALL_HINT)
    if head[EXT4_MAGIC_OFFSET:] != EXT4_MAGIC:
        return Check("guest rootfs", FAIL, f"{path}: not an ext4 image",
                     "rootfs_path must name the guest's rootfs.ext4")
    return Check("guest rootfs", OK, f"{path} ({_mib(path)} MiB)")


def _head(path: Path, size: int) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError:
        return None


def _mib(path: Path) -> str:
    return f"{path.stat().st_size / (1 << 20):.1f}"


def check_containerd(configs: Sequence[Path], config_path: Path) -> Check:
    from shim.ctl.containerd import RegistrationError, find_registrations

    name = "containerd registration"
    fix = "run scripts/install.sh --configure-containerd, then restart containerd"
    existing = [p for p in configs if p.exists()]
    if not existing:
        listed = ", ".join(map(str, configs))
        return Check(name, WARN, f"no containerd config found ({listed})", fix)
    problems = []
    for main in existing:
        try:
            found = find_registrations(main)
        except RegistrationError as err:
            problems.append(str(err))
            continue
        for reg in found:
            where = f"handler {reg.handler!r} in {reg.file} (config version {reg.version})"
            shim = reg.runtime_path or shutil.which("containerd-shim-cloudhv-v1") or ""
            if not shim or not os.access(shim, os.X_OK):
                return Check(name, FAIL, f"{where}, but no shim binary: "
                             f"{reg.runtime_path or 'containerd-shim-cloudhv-v1 not on PATH'}",
                             "reinstall: scripts/install.sh")
            option = str(reg.options.get("ConfigPath", ""))
            if option and Path(option) != config_path:
                return Check(name, WARN, f"{where}; its ConfigPath is {option}, not {config_path}",
                             f"check with: cloudhvctl --config {option} doctor")
            return Check(name, OK, where)
    detail = "; ".join(problems) or "no runtime of type io.containerd.cloudhv.v1 in " + ", ".join(
        map(str, existing)
    )
    return Check(name, FAIL if problems else WARN, detail, fix)


def check_cgroups(mounts: Sequence[tuple[str, str]]) -> Check:
    """cgroup v2 alone (unified) is what the shim and the guest's crun are made for."""
    v2 = [point for point, fstype in mounts if fstype == "cgroup2"]
    v1 = [point for point, fstype in mounts if fstype == "cgroup"]
    if "/sys/fs/cgroup" in v2 and not v1:
        return Check("cgroup v2", OK, "unified hierarchy at /sys/fs/cgroup")
    if v2:
        return Check("cgroup v2", WARN,
                     f"hybrid: cgroup2 at {', '.join(v2)} beside {len(v1)} v1 hierarchies",
                     "boot the host with systemd.unified_cgroup_hierarchy=1 for cgroup v2 "
                     "alone (pods run either way; the VM is charged in every hierarchy)")
    if v1:
        return Check("cgroup v2", WARN, f"cgroup v1 only ({len(v1)} hierarchies)",
                     "boot with systemd.unified_cgroup_hierarchy=1")
    return Check("cgroup v2", FAIL, "no cgroup filesystem mounted",
                 "mount cgroup2 on /sys/fs/cgroup")


def mounts() -> list[tuple[str, str]]:
    found = []
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                found.append((parts[1], parts[2]))
    return found


def run_checks(config_path: Path, containerd_configs: Sequence[Path]) -> list[Check]:
    from shim import config as config_mod

    first, config = check_config(config_path, config_mod.load)
    checks = [first]
    if config is not None:
        checks += [check_vmm(config), check_accel(config), check_vsock(config),
                   check_kernel(config), check_rootfs(config)]
    checks.append(check_containerd(containerd_configs, config_path))
    checks.append(check_cgroups(mounts()))
    return checks

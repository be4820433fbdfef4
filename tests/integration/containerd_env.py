"""A private, real containerd with the cloudhv runtime registered: 1.6 (bookworm's, the
host's own), or 1.7 (trixie) and 2.1 (sid), extracted by scripts/setup.sh into the cache."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.integration import guest_artifacts

REPO = Path(__file__).resolve().parents[2]
SHIM_BIN_DIR = REPO / "build" / "bin"
RUNTIME = "io.containerd.cloudhv.v1"
CACHE = Path(os.environ.get("CLOUDHV_CACHE", "/var/cache/cloudhv"))


@dataclass(frozen=True)
class ContainerdVersion:
    name: str
    bin_dir: Path  # containerd, ctr and containerd-shim-runc-v2
    config_version: int  # 2: containerd 1.x; 3: containerd 2.x

    @property
    def binary(self) -> Path:
        return self.bin_dir / "containerd"

    @property
    def ctr(self) -> Path:
        return self.bin_dir / "ctr"

    def check(self) -> None:
        if not os.access(self.binary, os.X_OK):
            raise RuntimeError(f"containerd {self.name}: no {self.binary} (run scripts/setup.sh)")


V1_6 = ContainerdVersion("1.6", Path("/usr/bin"), 2)
V1_7 = ContainerdVersion("1.7", CACHE / "containerd-trixie" / "usr" / "bin", 2)
V2_1 = ContainerdVersion("2.1", CACHE / "containerd-sid" / "usr" / "bin", 3)
CH_STANDIN = REPO / "tests" / "chsim" / "cloud-hypervisor"
# The VMM backends the containerd suites run through: QEMU, and Cloud Hypervisor as
# the spec-checking stand-in (tests/chsim) plays it.
VMMS = ("qemu", "cloud-hypervisor")

CONFIG_TOML = """\
version = 2
root = "{root}/root"
state = "{root}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]
[grpc]
  address = "{root}/containerd.sock"
[ttrpc]
  address = "{root}/containerd.sock.ttrpc"
[debug]
  level = "debug"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/test/pause:1"
  disable_apparmor = true
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{root}/cni/net.d"
    max_conf_num = {max_conf_num}
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.cloudhv]
      runtime_type = "{runtime}"
      runtime_path = "{shim}"
      pod_annotations = ["io.cloudhv.*", "io.katacontainers.*"]
      container_annotations = ["io.cloudhv.container.*"]
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.cloudhv.options]
        ConfigPath = "{shim_config}"
"""


# containerd 2.x: config version 3, where CRI is split into an images and a runtime plugin.
CONFIG_TOML_V3 = """\
version = 3
root = "{root}/root"
state = "{root}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.erofs"]
[grpc]
  address = "{root}/containerd.sock"
[ttrpc]
  address = "{root}/containerd.sock.ttrpc"
[debug]
  level = "debug"
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "localhost/test/pause:1"
[plugins.'io.containerd.cri.v1.runtime']
  disable_apparmor = true
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "{root}/cni/net.d"
    max_conf_num = {max_conf_num}
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.cloudhv]
      runtime_type = "{runtime}"
      runtime_path = "{shim}"
      pod_annotations = ["io.cloudhv.*", "io.katacontainers.*"]
      container_annotations = ["io.cloudhv.container.*"]
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.cloudhv.options]
        ConfigPath = "{shim_config}"
"""


CNI_CONFLIST = {
    "cniVersion": "1.0.0",
    "name": "cloudhv-test",
    "plugins": [
        {
            "type": "bridge",
            "bridge": "cloudhv-br0",
            "isGateway": True,
            "ipMasq": False,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": "10.88.0.0/16"}]],
                "routes": [{"dst": "0.0.0.0/0"}],
            },
        },
        # hostPort mappings, as on a node (iptables DNAT in containerd's namespace).
        {"type": "portmap", "capabilities": {"portMappings": True}},
        {"type": "loopback"},
    ],
}

# Dual stack: host-local gives each pod an IPv4 and an IPv6 address on one bridge.
CNI_DUAL_STACK = {
    "cniVersion": "1.0.0",
    "name": "cloudhv-test-dual",
    "plugins": [
        {
            "type": "bridge",
            "bridge": "cloudhv-br0",
            "isGateway": True,
            "ipMasq": False,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": "10.89.0.0/16"}], [{"subnet": "fd89::/64"}]],
                "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
            },
        },
        {"type": "loopback"},
    ],
}

# A second network: with max_conf_num = 2 containerd adds it as the pod's eth1. No
# default route (eth0 has it), one route of its own through its gateway.
CNI_SECOND = {
    "cniVersion": "1.0.0",
    "name": "cloudhv-test-second",
    "plugins": [
        {
            "type": "bridge",
            "bridge": "cloudhv-br1",
            "isGateway": True,
            "ipMasq": False,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": "10.90.0.0/16"}]],
                "routes": [{"dst": "10.91.0.0/16"}],
            },
        },
    ],
}


def shim_config(state_dir: Path, vmm: str = "qemu", **overrides: object) -> dict[str, object]:
    config: dict[str, object] = {
        "vmm": vmm,
        "qemu": {"accel": os.environ.get("CLOUDHV_ACCEL", "tcg"), "hotplug_slots": 8},
        "cloud_hypervisor": {"binary": str(CH_STANDIN), "hotplug_slots": 8},
        "kernel_path": str(guest_artifacts.kernel()),
        "rootfs_path": str(guest_artifacts.rootfs()),
        "kernel_args": "root=/dev/vda ro rootfstype=ext4 init=/init panic=-1 no_timer_check quiet",
        "default_vcpus": 1,
        "default_memory_mib": 256,
        # Test runs share two cores with other suites: a boot may take many times
        # its idle 2 s.
        "agent_startup_timeout_s": 90,
        "state_dir": str(state_dir),
        "disk_dir": str(state_dir.parent / "disks"),
        "cache_dir": str(state_dir.parent / "cache"),
        "debug": True,
    }
    config.update(overrides)
    return config


@dataclass
class Containerd:
    root: Path
    process: subprocess.Popen[bytes]
    netns: str
    namespace: str = "default"
    version: ContainerdVersion = V1_6
    shim_dir: Path = SHIM_BIN_DIR
    config: Path = Path()

    @property
    def address(self) -> Path:
        return self.root / "containerd.sock"

    def ctr(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 180,
        namespace: str | None = None,
        input: bytes | None = None,
    ) -> subprocess.CompletedProcess[str]:
        argv = [str(self.version.ctr), "--address", str(self.address),
                "-n", namespace or self.namespace, *args]
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input.decode() if input is not None else None,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {result.returncode}\nstdout: {result.stdout}\n"
                f"stderr: {result.stderr}\n--- containerd log tail ---\n{self.log_tail()}"
            )
        return result

    def log_tail(self, lines: int = 60) -> str:
        text = (self.root / "containerd.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


def base_config(root: Path) -> str:
    """The version 2 config of running_containerd without the cloudhv runtime, for an
    installer to register it in."""
    text = CONFIG_TOML.format(root=root, runtime=RUNTIME, shim="", shim_config="", max_conf_num=1)
    ours = '    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.cloudhv]'
    return text[: text.index(ours)]


def ensure_shim_wrapper() -> Path:
    subprocess.run(["bash", str(REPO / "scripts" / "build-shim.sh")], check=True)
    return SHIM_BIN_DIR / "containerd-shim-cloudhv-v1"


@contextlib.contextmanager
def running_containerd(
    root: Path,
    shim_config_path: Path,
    cni: Sequence[dict[str, object]] = (CNI_CONFLIST,),
    *,
    version: ContainerdVersion = V1_6,
    shim: Path | None = None,
    config_file: Path | None = None,
) -> Iterator[Containerd]:
    """Start containerd with a private root/state/sockets; stop it and unmount its state.

    `cni` are the conflists of the test-only CNI conf dir, in order: each one is a
    network of every pod (eth0, eth1, ...). `shim` is the shim binary (default: this
    checkout's wrapper); containerd 1.7 and 2.x run it from runtime_path, 1.6 finds it
    on PATH, where its directory goes first. `config_file`: containerd's config as
    written elsewhere (base_config() plus what an installer added), instead of the
    template with the runtime in it.
    """
    version.check()
    shim = shim or ensure_shim_wrapper()
    (root / "cni" / "net.d").mkdir(parents=True, exist_ok=True)
    for index, conflist in enumerate(cni):
        (root / "cni" / "net.d" / f"{10 + index}-cloudhv-test.conflist").write_text(
            json.dumps(conflist)
        )
    # containerd (and so CNI's bridge and every pod) lives in a namespace this test made:
    # nothing touches the host's own network.
    # Named after the scratch dir too: one test process may run several containerds.
    netns = f"cloudhv-test-{os.getpid()}-{root.parent.name[-10:]}-{root.name[-8:]}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
    config = config_file or root / "config.toml"
    if config_file is None:
        template = CONFIG_TOML_V3 if version.config_version == 3 else CONFIG_TOML
        config.write_text(
            template.format(
                root=root,
                runtime=RUNTIME,
                shim=shim,
                shim_config=shim_config_path,
                max_conf_num=len(cni),
            )
        )
    containerd = Containerd(
        root=root,
        process=_start(root, config, netns, shim_config_path, version, shim.parent),
        netns=netns,
        version=version,
        shim_dir=shim.parent,
        config=config,
    )
    try:
        yield containerd
    finally:
        _stop(containerd.process)
        _unmount_under(root)
        subprocess.run(["ip", "netns", "delete", netns], check=False)


def _start(
    root: Path,
    config: Path,
    netns: str,
    shim_config_path: Path,
    version: ContainerdVersion,
    shim_dir: Path,
) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    path = env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    env["PATH"] = f"{shim_dir}:{version.bin_dir}:{path}"
    env["CLOUDHV_CONFIG"] = str(shim_config_path)
    (root / "containerd.sock").unlink(missing_ok=True)
    with open(root / "containerd.log", "ab") as log:
        process = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{netns}", str(version.binary), "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    deadline = time.monotonic() + 30
    while not (root / "containerd.sock").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            log_text = (root / "containerd.log").read_text()
            raise RuntimeError(f"containerd did not start:\n{log_text}")
        time.sleep(0.02)
    return process


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def restart(containerd: Containerd, shim_config_path: Path, down_s: float = 0.0) -> None:
    """Stop containerd and start it again on the same root; its shims keep running."""
    _stop(containerd.process)
    time.sleep(down_s)
    containerd.process = _start(
        containerd.root,
        containerd.config,
        containerd.netns,
        shim_config_path,
        containerd.version,
        containerd.shim_dir,
    )


def _unmount_under(root: Path) -> None:
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for target in sorted((m for m in mounts if m.startswith(str(root))), reverse=True):
        subprocess.run(["umount", "-l", target], check=False)


def write_shim_config(
    path: Path, state_dir: Path, vmm: str = "qemu", **overrides: object
) -> Path:
    path.write_text(json.dumps(shim_config(state_dir, vmm, **overrides), indent=2))
    return path


def import_image(ctr: Containerd, tarball: Path, namespace: str = "default") -> None:
    ctr.ctr("images", "import", str(tarball), namespace=namespace)


def leftovers(state_dir: Path, root: Path) -> list[str]:
    """Host resources our shim might leak: VMM processes, mounts, sockets, state files."""
    found: list[str] = []
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            vm_program = ("qemu", "vhost-device-vsock", "chsim", "cloud-hypervisor", "virtiofsd")
            if str(state_dir) in cmdline and any(name in cmdline for name in vm_program):
                found.append(f"process {pid_dir.name}: {cmdline[:120]}")
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        target = line.split()[4]
        if target.startswith(str(state_dir)):
            found.append(f"mount {target}")
    for owned in (state_dir, state_dir.parent / "disks"):
        try:
            if owned.exists():
                found += [f"file {p}" for p in owned.rglob("*")]
        except FileNotFoundError as err:  # removed while listed: look again
            found.append(f"file {err.filename} (being removed)")
    # Cached images may stay (that is the cache); references and builds may not.
    cache = state_dir.parent / "cache"
    for held in (cache / "refs", cache / "building"):
        if held.exists():
            found += [f"cache {p}" for p in held.rglob("*")]
    # No loop device over anything of the shim's.
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            target = backing.read_text().strip()
            if target.startswith((str(cache), str(state_dir.parent / "disks"))):
                found.append(f"loop device {backing.parts[3]} over {target}")
    return found


def cleanup_dir(path: Path) -> None:
    _unmount_under(path)
    shutil.rmtree(path, ignore_errors=True)

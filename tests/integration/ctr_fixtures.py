"""Shared fixtures for tests that drive the shim through a real containerd."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.integration.busybox_tree import make_busybox_tree
from tests.integration.containerd_env import (
    CNI_CONFLIST,
    V1_6,
    Containerd,
    ContainerdVersion,
    cleanup_dir,
    import_image,
    leftovers,
    restart,
    running_containerd,
    write_shim_config,
)
from tests.integration.oci_image import build_image

BUSYBOX = "localhost/test/busybox:1"
PAUSE = "localhost/test/pause:1"


@dataclass
class Env:
    containerd: Containerd
    state_dir: Path  # the shim's state_dir (config)
    scratch: Path
    sockets_before: frozenset[Path] = frozenset()
    vmm: str = "qemu"  # the config's VMM backend

    @property
    def config_path(self) -> Path:
        return self.scratch / "shim.json"

    def leftovers(self) -> list[str]:
        found = leftovers(self.state_dir, self.containerd.root)
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            target = line.split()[4]
            if target.startswith(str(self.containerd.root)) and "/rootfs" in target:
                found.append(f"mount {target}")
        for pid, cmdline in shim_processes(self.containerd):
            found.append(f"shim {pid}: {cmdline[:100]}")
        ours = _sockets_of(self.containerd)
        found += [
            f"shim socket {p}" for p in shim_sockets() - self.sockets_before if p.name in ours
        ]
        return found

    def restart_containerd(self, down_s: float = 4.0) -> None:
        """containerd goes away for `down_s` seconds and comes back; pods keep running."""
        restart(self.containerd, self.scratch / "shim.json", down_s)

    def drain_pool(self) -> int:
        """Release this env's pooled VMs (shim/pool.py): each forker serving pools keeps
        them per config file, and this config is the env's own."""
        return drain_pools(self.config_path)

    def pool_vms(self, status: str = "ready") -> list[dict[str, Any]]:
        """This env's pooled VMs in `status` ("" for any), from their state files."""
        found = []
        for path in (self.state_dir / "pool").glob("*/state.json"):
            with contextlib.suppress(OSError, ValueError):
                state = json.loads(path.read_text())
                if not status or state.get("pool") == status:
                    found.append(state)
        return found

    def wait_pool(self, count: int, timeout: float = 180) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(ready := self.pool_vms()) < count:
            assert time.monotonic() < deadline, f"pool: {len(ready)} of {count} VMs ready"
            time.sleep(0.2)
        return ready

    def remove_container(self, name: str, timeout: float = 30) -> None:
        """SIGKILL a `ctr run` container's task, remove the task once it has exited
        (retried until `timeout`), then the container."""
        ctr = self.containerd.ctr
        ctr("task", "kill", "-s", "SIGKILL", name, check=False)
        deadline = time.monotonic() + timeout
        while ctr("task", "rm", name, check=False).returncode and time.monotonic() < deadline:
            time.sleep(0.2)
        ctr("container", "rm", name, check=False)

    def wait_clean(self, timeout: float = 30) -> list[str]:
        deadline = time.monotonic() + timeout
        while (found := self.leftovers()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return found


SHIM_SOCKET_DIR = Path("/run/containerd/s")
FORKER_DIR = Path("/run/cloudhv")


def drain_pools(config_path: Path) -> int:
    """Ask every forker (each version of the shim has its own) to release the pooled VMs
    of `config_path`; how many they released."""
    from shim import forker_client

    drained = 0
    for sock in FORKER_DIR.glob("forker-*.sock"):
        with contextlib.suppress(forker_client.ForkerUnavailable, OSError, KeyError, ValueError):
            drained += forker_client.drain_pool(str(config_path), path=sock)
    return drained


def shim_sockets() -> frozenset[Path]:
    """Shim sockets (all runtimes: containerd names them by a hash, not by runtime)."""
    if not SHIM_SOCKET_DIR.exists():
        return frozenset()
    return frozenset(SHIM_SOCKET_DIR.iterdir())


def _sockets_of(containerd: Containerd) -> set[str]:
    """Names of the shim sockets this containerd's shims used, from its debug log (the
    shims log their socket): /run/containerd/s is shared with other test runs."""
    log = (containerd.root / "containerd.log").read_text(errors="replace")
    return set(re.findall(r"/run/containerd/s/([0-9a-f]{64})", log))


def shim_processes(containerd: Containerd) -> list[tuple[int, str]]:
    """Our shim daemons serving this containerd (their argv names its socket)."""
    found = []
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if "containerd-shim-cloudhv-v1" in cmdline and str(containerd.address) in cmdline:
                found.append((int(pid_dir.name), cmdline))
    return found


@contextlib.contextmanager
def containerd_env(
    vmm: str = "qemu",
    cni: Sequence[dict[str, object]] = (CNI_CONFLIST,),
    *,
    version: ContainerdVersion = V1_6,
    shim: Path | None = None,
    **config_overrides: object,
) -> Iterator[Env]:
    """A private containerd of `version` with our runtime (`shim`, default this
    checkout's), the shim configured for `vmm` ("qemu", or "cloud-hypervisor": the
    stand-in in tests/chsim as the binary), and `cni`'s conflists in its CNI conf dir."""
    scratch = Path(tempfile.mkdtemp(prefix="chv-", dir="/run"))
    try:
        state_dir = scratch / "state"
        config = write_shim_config(scratch / "shim.json", state_dir, vmm, **config_overrides)
        tree = make_busybox_tree(scratch / "tree")
        busybox = build_image([tree], BUSYBOX, ["sh"], scratch / "busybox.tar")
        pause = build_image([tree], PAUSE, ["sleep", "2147483647"], scratch / "pause.tar")
        with running_containerd(
            scratch / "ctrd", config, cni, version=version, shim=shim
        ) as containerd:
            for namespace in ("default", "k8s.io"):
                import_image(containerd, busybox, namespace)
                import_image(containerd, pause, namespace)
            env = Env(
                containerd=containerd,
                state_dir=state_dir,
                scratch=scratch,
                sockets_before=shim_sockets(),
                vmm=vmm,
            )
            try:
                yield env
            finally:
                drain_pools(env.config_path)
                # A shim still running here is a failed test: it must not hang the suite.
                for pid, _ in shim_processes(containerd):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
    finally:
        subprocess.run(["pkill", "-9", "-f", str(scratch)], check=False)
        cleanup_dir(scratch)

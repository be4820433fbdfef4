"""Wall time of the shim's `start` action, as containerd runs it once per container.

Usage: python -m bench.shim_start [-n 10]   (root, from the repository root, PYTHONPATH=.)
Two paths: a new pod (`start` validates the config, spawns the daemon and waits until it
serves) and a container joining a live pod (`start` finds the pod's daemon and exits).
No VM is booted: the daemon serves before any Create.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHIM = REPO / "build" / "bin" / "containerd-shim-cloudhv-v1"


def _daemon_pids(socket: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if socket.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def _ms(values: list[float]) -> str:
    return (
        f"median {1e3 * statistics.median(values):.0f} ms "
        f"(min {1e3 * min(values):.0f}, max {1e3 * max(values):.0f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=10)
    args = parser.parse_args()
    subprocess.run(["bash", str(REPO / "scripts" / "build-shim.sh")], check=True)
    scratch = Path(tempfile.mkdtemp(prefix="chv-start-", dir="/run"))
    try:
        config = scratch / "config.json"
        config.write_text(
            json.dumps(
                {
                    "vmm": "qemu",
                    "kernel_path": "/nonexistent/vmlinux",
                    "rootfs_path": "/nonexistent/rootfs.ext4",
                    "kernel_args": "quiet",
                    "state_dir": str(scratch / "state"),
                    "disk_dir": str(scratch / "disks"),
                }
            )
        )
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CLOUDHV_CONFIG": str(config)}
        new_pod, join_pod = [], []
        for index in range(args.n):
            bundle = scratch / f"bundle{index}"
            bundle.mkdir()
            (bundle / "config.json").write_text('{"ociVersion": "1.0.2", "annotations": {}}')
            os.mkfifo(bundle / "log")
            flags = [
                "-namespace", "bench",
                "-address", str(scratch / "containerd.sock"),
                "-publish-binary", "/bin/true",
                "-id", f"t{uuid.uuid4().hex[:12]}",
            ]  # fmt: skip
            started = time.perf_counter()
            first = subprocess.run(
                [str(SHIM), *flags, "start"], cwd=bundle, env=env, capture_output=True, check=True
            )
            new_pod.append(time.perf_counter() - started)
            started = time.perf_counter()
            again = subprocess.run(
                [str(SHIM), *flags, "start"], cwd=bundle, env=env, capture_output=True, check=True
            )
            join_pod.append(time.perf_counter() - started)
            assert again.stdout == first.stdout
            socket = first.stdout.decode().removeprefix("unix://")
            for pid in _daemon_pids(socket):
                os.kill(pid, signal.SIGTERM)  # no containers: the daemon exits and cleans up
            deadline = time.monotonic() + 10
            while Path(socket).exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        print(f"start, new pod (validates config, spawns the daemon): {_ms(new_pod)}")
        print(f"start, container joining a live pod:                 {_ms(join_pod)}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

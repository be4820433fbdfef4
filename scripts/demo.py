"""The quickstart demo: a private containerd (own root, sockets and network namespace),
a locally built busybox image, and `ctr run` through the installed cloudhv runtime
($CLOUDHV_SHIM_BIN, default /usr/local/bin/containerd-shim-cloudhv-v1, with the config
$CLOUDHV_CONFIG).

Usage: python scripts/demo.py [command...]   (default: prints a greeting, the guest kernel
and the host kernel, to show the container ran in a VM)
       python scripts/demo.py --warm          (CRI pods with `pool.size` 0, then 2: the
RunPodSandbox time of a pod that boots its VM, and of one that adopts a pre-booted VM)
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from tests.integration.busybox_tree import make_busybox_tree
from tests.integration.containerd_env import RUNTIME, import_image, running_containerd
from tests.integration.cri import CriClient
from tests.integration.ctr_fixtures import drain_pools
from tests.integration.oci_image import build_image

CONFIG = Path(os.environ.get("CLOUDHV_CONFIG", "/etc/cloudhv/config.json"))
SHIM = Path(os.environ.get("CLOUDHV_SHIM_BIN", "/usr/local/bin/containerd-shim-cloudhv-v1"))
IMAGE = "localhost/cloudhv/busybox:latest"
PAUSE = "localhost/test/pause:1"  # the sandbox image the demo's containerd pins
POOL_SIZE = 2


def main() -> int:
    if sys.argv[1:] == ["--warm"]:
        return warm_start()
    command = sys.argv[1:] or [
        "sh", "-c", "echo hello from a cloudhv microVM; echo guest kernel: $(uname -r)",
    ]
    with tempfile.TemporaryDirectory(prefix="cloudhv-demo-", dir="/run") as scratch:
        root = Path(scratch)
        image = build_image([make_busybox_tree(root / "tree")], IMAGE, ["sh"], root / "busybox.tar")
        with running_containerd(root / "containerd", CONFIG, shim=SHIM) as containerd:
            import_image(containerd, image)
            result = containerd.ctr(
                "run", "--rm", "--runtime", RUNTIME, IMAGE, "cloudhv-demo", *command, check=False
            )
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    print(f"(host kernel: {platform.release()}; ctr exit status {result.returncode})")
    return result.returncode


def warm_start() -> int:
    """One pod cold, then (pool full) one warm, each timed at RunPodSandbox and until its
    container's first output; the pool is drained afterwards."""
    with tempfile.TemporaryDirectory(prefix="cloudhv-demo-", dir="/run") as scratch:
        root = Path(scratch)
        config = json.loads(CONFIG.read_text())
        config["pool"] = {"size": POOL_SIZE}
        config_path = root / "pool-config.json"
        config_path.write_text(json.dumps(config))
        tree = make_busybox_tree(root / "tree")
        image = build_image([tree], IMAGE, ["sh"], root / "busybox.tar")
        pause = build_image([tree], PAUSE, ["sleep", "2147483647"], root / "pause.tar")
        pool_dir = Path(str(config.get("state_dir", "/run/cloudhv"))) / "pool"
        try:
            with running_containerd(root / "containerd", config_path, shim=SHIM) as containerd:
                import_image(containerd, image, "k8s.io")
                import_image(containerd, pause, "k8s.io")
                cri = CriClient(containerd.address)
                try:
                    # The first pod of a config boots cold, and names the pool to the
                    # shared parent, which then boots the pooled VMs.
                    _timed_pod(cri, root, "cold")
                    deadline = time.monotonic() + 300
                    while len(_ready(pool_dir)) < POOL_SIZE:
                        if time.monotonic() > deadline:
                            print("the pool did not fill within 300 s", file=sys.stderr)
                            return 1
                        time.sleep(0.2)
                    _timed_pod(cri, root, "warm")
                finally:
                    cri.close()
        finally:
            drain_pools(config_path)
    return 0


def _ready(pool_dir: Path) -> list[Path]:
    ready = []
    for path in pool_dir.glob("*/state.json"):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if state.get("pool") == "ready":
            ready.append(path)
    return ready


def _timed_pod(cri: CriClient, root: Path, name: str) -> None:
    log_dir = root / "logs" / name
    log_dir.mkdir(parents=True)
    started = time.monotonic()
    pod, _, ran = cri.start_pod(
        name, log_dir, IMAGE, ["sh", "-c", f"echo hello from a {name} pod"], namespace="demo"
    )
    log = log_dir / "app.log"
    while not (log.exists() and b"hello" in log.read_bytes()):
        time.sleep(0.01)
    output = time.monotonic() - started
    line = log.read_text().splitlines()[0].split(" ", 3)[-1]
    print(f"{name} pod: RunPodSandbox {ran * 1000:.0f} ms, first output after "
          f"{output * 1000:.0f} ms: {line}")
    cri.remove_pod(pod, timeout=120)


if __name__ == "__main__":
    raise SystemExit(main())

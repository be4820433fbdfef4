"""The quickstart demo: a private containerd (own root, sockets and network namespace),
a locally built busybox image, and `ctr run` through the installed cloudhv runtime
($CLOUDHV_SHIM_BIN, default /usr/local/bin/containerd-shim-cloudhv-v1, with the config
$CLOUDHV_CONFIG).

Usage: python scripts/demo.py [command...]   (default: prints a greeting, the guest kernel
and the host kernel, to show the container ran in a VM)
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
from pathlib import Path

from tests.integration.busybox_tree import make_busybox_tree
from tests.integration.containerd_env import RUNTIME, import_image, running_containerd
from tests.integration.oci_image import build_image

CONFIG = Path(os.environ.get("CLOUDHV_CONFIG", "/etc/cloudhv/config.json"))
SHIM = Path(os.environ.get("CLOUDHV_SHIM_BIN", "/usr/local/bin/containerd-shim-cloudhv-v1"))
IMAGE = "localhost/cloudhv/busybox:latest"


def main() -> int:
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


if __name__ == "__main__":
    raise SystemExit(main())

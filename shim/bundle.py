"""The files a shim shares with containerd and with its own later invocations.

- The pod's ttrpc socket, named as containerd's own shims name theirs
  (sha256 of `<address>/<namespace>/<id>` under /run/containerd/s), and a probe
  telling a live server from a dead one's socket file.
- In the bundle: the `address` file containerd reads, and `cloudhv-shim.json`,
  which holds what `delete` needs when nothing else is left.

Standard library only: `start` and `delete` both import this.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

SOCKET_ROOT = Path("/run/containerd/s")
SOCKET_PATH_MAX = 106
BUNDLE_FILE = "cloudhv-shim.json"


class SocketPathError(ValueError):
    """The socket path would not fit in a sockaddr_un."""


def socket_path(
    grpc_address: str, namespace: str, group_id: str, *, root: Path | None = None
) -> Path:
    """containerd's shim socket convention: sha256 of filepath.Join(address, ns, id), in
    /run/containerd/s or the socket dir containerd 2.3 names."""
    joined = os.path.normpath("/".join(p for p in (grpc_address, namespace, group_id) if p))
    path = (root or SOCKET_ROOT) / hashlib.sha256(joined.encode()).hexdigest()
    if len(str(path)) > SOCKET_PATH_MAX:
        raise SocketPathError(f"socket path {path} is longer than {SOCKET_PATH_MAX} bytes")
    return path


def can_connect(path: Path) -> bool:
    """Whether a server listens on the Unix socket at `path`."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def write_address(bundle: Path, address: str) -> None:
    """The bundle's `address` file, exactly as printed (no newline), written atomically."""
    tmp = bundle / ".address.tmp"
    tmp.write_text(address)
    os.replace(tmp, bundle / "address")


@dataclass(frozen=True)
class BundleInfo:
    """What `start` records in the bundle for `delete`: enough to clean up even when
    the config file was edited, broken or removed since."""

    pod_id: str
    config_path: str = ""
    state_dir: str = ""


def write_info(bundle: Path, info: BundleInfo) -> None:
    tmp = bundle / f".{BUNDLE_FILE}.tmp"
    tmp.write_text(
        json.dumps(
            {"pod_id": info.pod_id, "config_path": info.config_path, "state_dir": info.state_dir}
        )
    )
    os.replace(tmp, bundle / BUNDLE_FILE)


def record_state_dir(bundle: Path, pod_id: str, state_dir: str) -> None:
    """The daemon's addition at Create: where the pod's state lives, so that `delete`
    finds it without the config."""
    old = read_info(bundle)
    write_info(bundle, BundleInfo(pod_id, old.config_path if old else "", state_dir))


def read_info(bundle: Path) -> BundleInfo | None:
    """The recorded info, or None when the file is missing or not ours."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
        data = json.loads((bundle / BUNDLE_FILE).read_text())
        return BundleInfo(
            str(data["pod_id"]), str(data.get("config_path", "")), str(data.get("state_dir", ""))
        )
    return None

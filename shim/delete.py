"""The `delete` and `-info` actions: slower imports than `start`, so they live here.

containerd runs `delete` after a shim connection closed (a normal Shutdown, or a
crash), and on restart for bundles with no reachable shim. Everything it needs
comes from persisted state: the bundle's cloudhv-shim.json (pod id, config
path) and the pod's state.json. It is idempotent, and it leaves a live pod
daemon alone (a pod's other containers still use it).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from shim import config as config_mod
from shim import rootfs, spec
from shim._pb.containerd.types import introspection_pb2 as _introspection_pb2
from shim.cli import BUNDLE_FILE, RUNTIME, VERSION, Args, _can_connect, socket_path
from shim.state import PodState, StateStore, cleanup
from shim.task import delete_response

_intro: Any = _introspection_pb2


def _warn(message: str) -> None:
    # containerd logs delete's stderr as warnings.
    print(message, file=sys.stderr)


def _bundle_info(bundle: Path, task_id: str) -> tuple[str, str]:
    """(pod id, config path) recorded by `start`, else derived from the bundle."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        data = json.loads((bundle / BUNDLE_FILE).read_text())
        return str(data["pod_id"]), str(data.get("config_path", ""))
    return spec.identify(task_id, spec.bundle_annotations(bundle)).pod_id, ""


def delete(args: Args) -> bytes:
    bundle = Path(args.bundle) if args.bundle else Path.cwd()
    pod_id, config_path = _bundle_info(bundle, args.id)
    pid = 0
    try:
        config = config_mod.load(config_mod.resolve_path(config_path))
    except config_mod.ConfigError as err:
        _warn(f"delete {args.id}: {err}; only the bundle is cleaned")
        config = None
    if config is not None:
        store = StateStore(config.state_dir)
        state = store.load(pod_id) or store.find_task(args.id)
        if state is not None:
            pid = state.vmm.pid if state.vmm else 0
            _cleanup_pod(state, store, args.id)
    if args.address:
        with contextlib.suppress(Exception):
            sock = socket_path(args.address, args.namespace, pod_id)
            if sock.exists() and not _can_connect(sock):
                sock.unlink(missing_ok=True)
    target = bundle / "rootfs"
    if str(target) in rootfs.mount_points():
        try:
            rootfs.unmount(target, detach=True)
        except rootfs.RootfsError as err:
            _warn(f"delete {args.id}: {err}")
    return delete_response(pid, 128 + 9, time.time_ns())


def _cleanup_pod(state: PodState, store: StateStore, task_id: str) -> None:
    daemon = state.daemon
    if daemon is not None and daemon.alive():
        # A live daemon owns its pod: either it is exiting after Shutdown (and
        # cleans up itself) or it still serves the pod's other containers.
        # containerd waits for this command, so do not wait for the daemon here.
        return
    for line in cleanup(state, store):
        _warn(f"delete {task_id}: pod {state.pod_id}: {line}")


def runtime_info(options: bytes) -> bytes:
    """RuntimeInfo for `-info`: our name and version, the options echoed back."""
    info = _intro.RuntimeInfo(name=RUNTIME)
    info.version.version = VERSION
    if options:
        info.options.ParseFromString(options)
    return bytes(info.SerializeToString())

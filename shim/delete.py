"""The `delete` and `-info` actions: slower imports than `start`, so they live here.

containerd runs `delete` after a shim connection closed (a normal Shutdown, or a
crash), and on restart for bundles with no reachable shim. Everything it needs
comes from persisted state: the bundle's cloudhv-shim.json (pod id, config
path) and the pod's state.json. It is idempotent, and it leaves a live pod
daemon alone (a pod's other containers still use it).
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any

from shim import bundle, pbwire, spec
from shim import config as config_mod
from shim.cleanup import cleanup
from shim.hostmount import MountError, mount_points, unmount
from shim.state import PodState, StateError, StateStore


def _warn(message: str) -> None:
    # containerd logs delete's stderr as warnings.
    print(message, file=sys.stderr)


def _bundle_info(bundle_dir: Path, task_id: str) -> bundle.BundleInfo:
    """What `start` and the daemon recorded, else the pod id derived from the bundle."""
    info = bundle.read_info(bundle_dir)
    if info is not None:
        return info
    try:
        pod_id = spec.identify(task_id, spec.bundle_annotations(bundle_dir)).pod_id
    except spec.SpecError as err:
        _warn(f"delete {task_id}: {err}; only the bundle is cleaned")
        pod_id = ""
    return bundle.BundleInfo(pod_id)


def _state_dir(info: bundle.BundleInfo, task_id: str) -> Path | None:
    """The pod's state dir: as the daemon recorded it, else from the config."""
    if info.state_dir:
        return Path(info.state_dir)
    try:
        return config_mod.load(config_mod.resolve_path(info.config_path)).state_dir
    except config_mod.ConfigError as err:
        _warn(f"delete {task_id}: {err}; only the bundle is cleaned")
        return None


def delete(task_id: str, bundle_dir: Path, namespace: str, address: str) -> bytes:
    """Clean up after task `task_id`; returns the DeleteResponse to print."""
    info = _bundle_info(bundle_dir, task_id)
    pod_id = info.pod_id
    pid = 0
    state_dir = _state_dir(info, task_id) if pod_id else None
    if state_dir is not None:
        store = StateStore(state_dir)
        try:
            state = store.load(namespace, pod_id) or store.find_task(namespace, task_id)
        except StateError as err:
            _warn(f"delete {task_id}: {err}; the pod's state is left for its daemon")
            state = None
        if state is not None:
            pid = state.vmm.pid if state.vmm else 0
            _cleanup_pod(state, store, task_id)
    if address:
        with contextlib.suppress(Exception):
            sock = bundle.socket_path(address, namespace, pod_id)
            if sock.exists() and not bundle.can_connect(sock):
                sock.unlink(missing_ok=True)
    target = bundle_dir / "rootfs"
    if str(target) in mount_points():
        try:
            unmount(target, detach=True)
        except MountError as err:
            _warn(f"delete {task_id}: {err}")
    return pbwire.delete_response(pid, 128 + 9, time.time_ns())


def _cleanup_pod(state: PodState, store: StateStore, task_id: str) -> None:
    daemon = state.daemon
    if daemon is not None and daemon.alive():
        # A live daemon owns its pod: either it is exiting after Shutdown (and
        # cleans up itself) or it still serves the pod's other containers.
        # containerd waits for this command, so do not wait for the daemon here.
        return
    for line in cleanup(state, store):
        _warn(f"delete {task_id}: pod {state.pod_id}: {line}")


def runtime_info(options: bytes, runtime: str, version: str) -> bytes:
    """RuntimeInfo for `-info`: our name and version, the options echoed back."""
    from shim._pb.containerd.types import introspection_pb2

    intro: Any = introspection_pb2
    info = intro.RuntimeInfo(name=runtime)
    info.version.version = version
    if options:
        info.options.ParseFromString(options)
    return bytes(info.SerializeToString())

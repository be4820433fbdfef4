"""Persisted per-pod state, enough to clean up after the daemon died (SIGKILL, host crash).

One JSON file per pod at `<state_dir>/<pod id>/state.json`, replaced atomically
(write a temp file, fsync, rename). The rule for writers: record a resource
*before* creating it, forget it only *after* removing it, so that crash cleanup
(shim/cleanup.py) run from this file alone never misses anything.

Pure persistence: this module removes nothing itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shim.vmm.procs import is_same_process, is_zombie

STATE_FILE = "state.json"
# Pre-booted VMs waiting for a pod (shim/pool.py) keep their state in this subdirectory
# of the state dir, one entry per VM, under this namespace: no containerd namespace
# can be named so (they are [a-zA-Z0-9._-]), so no pod's key is ever a pooled VM's.
POOL_DIR = "pool"
POOL_NAMESPACE = "@pool"


class StateError(Exception):
    pass


@dataclass(frozen=True)
class ProcRef:
    """A host process, identified against pid reuse by its start time."""

    pid: int
    start_time: int

    def alive(self) -> bool:
        """Running (not a zombie: a killed daemon's parent may never reap it)."""
        return is_same_process(self.pid, self.start_time) and not is_zombie(self.pid)


@dataclass(frozen=True)
class ResourceRecord:
    """Something plugged into the pod, recorded before any part of it exists.

    `host` holds what undoing it on the host needs when nothing else is left
    (image paths, a TAP's name, a netns path): each kind's own module reads it.
    """

    kind: str  # "disk", "net", ...
    id: str  # unique in the pod; the VMM device id where there is one
    owner: str = ""  # the container it belongs to; "" for the pod's own
    host: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PodState:
    pod_id: str
    namespace: str = ""
    socket: str = ""  # the shim's ttrpc socket path (no unix://)
    daemon: ProcRef | None = None
    vm_dir: str = ""  # VmSpec.state_dir
    vmm: ProcRef | None = None
    helpers: tuple[ProcRef, ...] = ()
    work_dir: str = ""  # host scratch: disk images, temporary mounts
    resources: tuple[ResourceRecord, ...] = ()
    containers: tuple[str, ...] = ()  # task ids, the sandbox's included
    bundles: dict[str, str] = field(default_factory=dict)  # task id -> bundle path
    # The VM's size and when it booted (Unix time, seconds): for `cloudhvctl ps`.
    vcpus: int = 0
    memory_mib: int = 0
    booted_at: float = 0.0
    # A pooled VM: "booting", then "ready"; a pod that adopted one: "adopted", with
    # the pooled VM's directory (its sockets and files stay there) in `pool_dir`.
    pool: str = ""
    pool_dir: str = ""

    def replace(self, **changes: Any) -> PodState:
        return dataclasses.replace(self, **changes)


def to_json(state: PodState) -> str:
    return json.dumps(dataclasses.asdict(state), indent=1, sort_keys=True)


def from_json(text: str) -> PodState:
    try:
        raw = json.loads(text)
        return PodState(
            pod_id=str(raw["pod_id"]),
            namespace=str(raw.get("namespace", "")),
            socket=str(raw.get("socket", "")),
            daemon=_proc(raw.get("daemon")),
            vm_dir=str(raw.get("vm_dir", "")),
            vmm=_proc(raw.get("vmm")),
            helpers=tuple(p for p in map(_proc, raw.get("helpers") or ()) if p is not None),
            work_dir=str(raw.get("work_dir", "")),
            resources=tuple(_resource(r) for r in raw.get("resources") or ()),
            containers=tuple(str(c) for c in raw.get("containers") or ()),
            bundles={str(k): str(v) for k, v in (raw.get("bundles") or {}).items()},
            vcpus=int(raw.get("vcpus", 0)),
            memory_mib=int(raw.get("memory_mib", 0)),
            booted_at=float(raw.get("booted_at", 0.0)),
            pool=str(raw.get("pool", "")),
            pool_dir=str(raw.get("pool_dir", "")),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise StateError(f"invalid pod state: {err!r}") from err


def _resource(raw: Any) -> ResourceRecord:
    host = raw.get("host") or {}
    if not isinstance(host, dict):
        raise TypeError(f"resource {raw.get('id')!r}: host is not an object")
    return ResourceRecord(
        kind=str(raw["kind"]),
        id=str(raw["id"]),
        owner=str(raw.get("owner", "")),
        host={str(k): str(v) for k, v in host.items()},
    )


def _proc(raw: Any) -> ProcRef | None:
    if not raw:
        return None
    return ProcRef(int(raw["pid"]), int(raw["start_time"]))


def check_id(pod_id: str) -> str:
    if not pod_id or pod_id in (".", "..") or "/" in pod_id or "\0" in pod_id:
        raise StateError(f"invalid pod id {pod_id!r}")
    return pod_id


def pod_key(namespace: str, pod_id: str) -> str:
    """The pod's directory name: a readable prefix of the id and a hash of namespace + id.

    The same pod id in two containerd namespaces is two pods: the key tells them
    apart. It is short because Unix socket paths (the VM's vsock and QMP sockets
    live in the pod's dir) are limited to 107 bytes, and CRI pod ids alone are 64.
    """
    check_id(pod_id)
    prefix = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in pod_id)
    digest = hashlib.sha256(f"{namespace}\0{pod_id}".encode()).hexdigest()[:12]
    return f"{prefix[:12]}-{digest}"


class StateStore:
    """The directory holding every pod's state: `<root>/<pod key>/state.json`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def pod_dir(self, namespace: str, pod_id: str) -> Path:
        return self.root / pod_key(namespace, pod_id)

    def save(self, state: PodState) -> None:
        directory = self.pod_dir(state.namespace, state.pod_id)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        target = directory / STATE_FILE
        tmp = directory / f".{STATE_FILE}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, to_json(state).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)

    def load(self, namespace: str, pod_id: str) -> PodState | None:
        """The pod's state; None if it has none. StateError if the file is unreadable."""
        try:
            text = (self.pod_dir(namespace, pod_id) / STATE_FILE).read_text()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as err:
            raise StateError(f"pod {pod_id}: cannot read its state: {err}") from err
        return from_json(text)

    def find_task(self, namespace: str, task_id: str) -> PodState | None:
        """The pod of `namespace` holding task `task_id` (a pod's own id counts)."""
        if _valid(task_id):
            with contextlib.suppress(StateError):
                direct = self.load(namespace, task_id)
                if direct is not None:
                    return direct
        for state in self.states():
            if state.namespace == namespace and task_id in state.containers:
                return state
        return None

    def states(self) -> list[PodState]:
        """Every readable pod state (unreadable ones are skipped)."""
        found = []
        with contextlib.suppress(FileNotFoundError):
            for entry in sorted(self.root.iterdir()):
                with contextlib.suppress(StateError, OSError, ValueError):
                    found.append(from_json((entry / STATE_FILE).read_text()))
        return found

    def set_aside(self, namespace: str, pod_id: str) -> Path | None:
        """Rename an unreadable state file out of the way, so that it never blocks the
        pod id again. Returns the new name."""
        path = self.pod_dir(namespace, pod_id) / STATE_FILE
        aside = path.with_name(f"{STATE_FILE}.corrupt-{os.getpid()}")
        try:
            os.replace(path, aside)
        except FileNotFoundError:
            return None
        return aside

    def remove(self, namespace: str, pod_id: str) -> None:
        shutil.rmtree(self.pod_dir(namespace, pod_id), ignore_errors=True)

    def forget(self, namespace: str, pod_id: str) -> None:
        """Remove the state file alone (its pod's files live on under another state)."""
        with contextlib.suppress(FileNotFoundError):
            (self.pod_dir(namespace, pod_id) / STATE_FILE).unlink()


def remove_pool_dir(path: Path) -> None:
    """Remove a pooled VM's directory, and the pool directory once it is empty."""
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        path.parent.rmdir()


def pool_store(state_dir: Path) -> StateStore:
    """Where the pooled VMs of a state dir keep their state."""
    return StateStore(state_dir / POOL_DIR)


def _valid(pod_id: str) -> bool:
    try:
        check_id(pod_id)
    except StateError:
        return False
    return True

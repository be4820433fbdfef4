"""Crash cleanup: remove everything a pod's persisted state records, from the file alone.

Run by `delete` (containerd calls it after a shim died, and after every normal
exit) and by a new daemon that finds a dead one's state. Nothing here needs the
VM or the agent: the recorded processes are killed (checked against pid reuse),
then each recorded resource is undone on the host by its own module, newest
first, then the pod's directories and socket go. Idempotent.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from shim import cgroups, network, portforward, sharedfs
from shim.config import Config
from shim.hostmount import unmount_under
from shim.rootfs import disk, shared
from shim.rootfs.cache import ImageCache
from shim.state import (
    POOL_NAMESPACE,
    PodState,
    ResourceRecord,
    StateStore,
    pool_store,
    remove_pool_dir,
)
from shim.vmm.procs import kill_recorded

HostUndo = Callable[[ResourceRecord], list[str]]

# Each resource kind's host-side undo, from its record alone.
HOST_UNDO: dict[str, HostUndo] = {
    disk.PRIVATE_KIND: disk.undo_host_files,
    disk.UPPER_KIND: disk.undo_host_files,
    disk.BLOCK_KIND: disk.undo_host_block,
    shared.KIND: shared.undo_host,
    cgroups.KIND: cgroups.undo_host,
    network.KIND: network.undo_host,
    portforward.KIND: portforward.undo_host,
    sharedfs.KIND: sharedfs.undo_host,
    sharedfs.VOLUME_KIND: sharedfs.undo_volume_host,
}


def cleanup(state: PodState, store: StateStore, *, keep_socket: bool = False) -> list[str]:
    """Remove everything `state` records: processes, resources, mounts, sockets, dirs.

    Blocking (it waits for killed processes): call it off the event loop.
    Returns what was done, for the log.
    """
    done: list[str] = []
    for ref in (state.vmm, *state.helpers):
        if ref is not None and kill_recorded(ref.pid, ref.start_time):
            done.append(f"killed pid {ref.pid}")
    for record in reversed(state.resources):
        undo = HOST_UNDO.get(record.kind)
        if undo is None:
            done.append(f"resource {record.id}: unknown kind {record.kind!r}, left alone")
            continue
        try:
            done += undo(record)
        except OSError as err:  # one resource must not keep the others
            done.append(f"resource {record.id}: {err}")
    dirs = [Path(d) for d in (state.work_dir, state.vm_dir, state.pool_dir) if d]
    dirs.append(store.pod_dir(state.namespace, state.pod_id))
    done += [f"unmounted {point}" for point in unmount_under(dirs)]
    if state.socket and not keep_socket:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(state.socket)
            done.append(f"removed {state.socket}")
    for directory in dirs:
        if directory.exists():
            shutil.rmtree(directory, ignore_errors=True)
            done.append(f"removed {directory}")
    if state.pool_dir:
        remove_pool_dir(Path(state.pool_dir))
    if state.namespace == POOL_NAMESPACE:
        remove_pool_dir(store.pod_dir(state.namespace, state.pod_id))
    return done


ORPHAN_MIN_AGE_S = 60.0  # a work dir this young may belong to a pod being created


def collect_orphan_work_dirs(
    store: StateStore, disk_dir: Path, *, min_age_s: float = ORPHAN_MIN_AGE_S
) -> list[str]:
    """Remove pods' work dirs (disk images) that no persisted state names any more.

    State lives in /run and is gone after a host reboot; the images live on disk
    and would stay forever. A dir some state names is left to that state's owner
    (its daemon, or `delete`), whatever that daemon's health. Dirs are listed before
    the states are read, and young ones are spared, so a pod being created now is
    never touched.
    """
    try:
        candidates = [entry for entry in disk_dir.iterdir() if entry.is_dir()]
    except FileNotFoundError:
        return []
    states = [*store.states(), *pool_store(store.root).states()]
    owned = {Path(state.work_dir) for state in states if state.work_dir}
    now = time.time()
    done: list[str] = []
    for entry in candidates:
        if entry in owned:
            continue
        try:
            age = now - entry.stat().st_mtime
        except FileNotFoundError:
            continue
        if age < min_age_s:
            continue
        unmount_under([entry])
        shutil.rmtree(entry, ignore_errors=True)
        done.append(f"removed orphan {entry}")
    return done


def collect_dead_pool(state_dir: Path) -> list[str]:
    """Pooled VMs whose daemon died (SIGKILL, a host crash) before a pod took them.

    A live pooled VM's daemon shuts it down itself when the pool's owner goes; one
    whose daemon is gone has nobody left, so whoever finds it removes it.
    """
    store = pool_store(state_dir)
    done: list[str] = []
    for state in store.states():
        if state.daemon is not None and state.daemon.alive():
            continue
        done += [f"pooled VM {state.pod_id}: {line}" for line in cleanup(state, store)]
    return done


def collect_cache_garbage(config: Config) -> list[str]:
    """Cache references whose pods no longer record them, unfinished builds nobody
    runs, then LRU eviction above the cap (shim/rootfs/cache.py). An entry some live
    pod references is never touched."""
    cache = ImageCache(
        config.cache_dir,
        max_bytes=config.rootfs_cache.max_mib << 20,
        fmt=config.rootfs_cache.format,
    )
    return cache.collect_garbage()

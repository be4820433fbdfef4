"""Persisted pod state: round trip, atomic replace, lookup by task, cleanup from the file alone."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from shim.cleanup import cleanup, collect_orphan_work_dirs
from shim.state import (
    PodState,
    ProcRef,
    ResourceRecord,
    StateError,
    StateStore,
    from_json,
    pod_key,
    to_json,
)
from shim.vmm.procs import process_start_time


def test_round_trip() -> None:
    st = PodState(
        pod_id="p1",
        namespace="default",
        socket="/s",
        daemon=ProcRef(1, 2),
        vm_dir="/v",
        vmm=ProcRef(3, 4),
        helpers=(ProcRef(5, 6),),
        work_dir="/w",
        resources=(ResourceRecord("disk", "c1", "ctr", {"image": "/w/c1.ext4"}),),
        containers=("ctr",),
        bundles={"ctr": "/b"},
        vcpus=2,
        memory_mib=384,
        booted_at=1700000000.5,
    )
    assert from_json(to_json(st)) == st


def test_state_without_vm_size_reads() -> None:
    """A state file written before the size was recorded still loads (a daemon upgrade)."""
    st = from_json('{"pod_id": "p1", "namespace": "ns"}')
    assert (st.vcpus, st.memory_mib, st.booted_at) == (0, 0, 0.0)


def test_bad_json() -> None:
    with pytest.raises(StateError):
        from_json('{"no_pod_id": 1}')


def test_store(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    assert store.load("default", "p1") is None
    store.save(PodState(pod_id="p1", namespace="default", containers=("a", "b")))
    assert store.load("default", "p1") == PodState(
        pod_id="p1", namespace="default", containers=("a", "b")
    )
    assert [p.name for p in store.pod_dir("default", "p1").iterdir()] == ["state.json"]
    assert store.find_task("default", "b") == store.load("default", "p1")
    assert store.find_task("default", "zz") is None
    assert store.find_task("other", "b") is None
    with pytest.raises(StateError):
        store.pod_dir("default", "../x")
    store.remove("default", "p1")
    assert not store.pod_dir("default", "p1").exists()


def test_same_pod_id_in_two_namespaces_is_two_pods(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    a = PodState(pod_id="web", namespace="team-a", containers=("web", "a1"))
    b = PodState(pod_id="web", namespace="team-b", containers=("web", "b1"))
    store.save(a)
    store.save(b)
    assert store.pod_dir("team-a", "web") != store.pod_dir("team-b", "web")
    assert store.load("team-a", "web") == a and store.load("team-b", "web") == b
    assert store.find_task("team-b", "b1") == b and store.find_task("team-a", "b1") is None
    done = cleanup(a, store)
    assert any("removed" in line for line in done)
    assert store.load("team-a", "web") is None and store.load("team-b", "web") == b


def test_corrupt_state_is_named_and_can_be_set_aside(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.pod_dir("ns", "p1").mkdir(parents=True)
    for garbage in (b"[1, 2]", b"\xff\xfe", b'{"pod_id": "p1", "resources": [7]}', b"{"):
        (store.pod_dir("ns", "p1") / "state.json").write_bytes(garbage)
        with pytest.raises(StateError):
            store.load("ns", "p1")
    aside = store.set_aside("ns", "p1")
    assert aside is not None and aside.exists()
    assert store.load("ns", "p1") is None  # the pod id is usable again


def test_cleanup_kills_recorded_processes_and_removes_files(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    work = tmp_path / "work"
    work.mkdir()
    image = work / "c.ext4"
    image.write_bytes(b"x")
    sock_path = tmp_path / "shim.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock_path))
    child = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        start = process_start_time(child.pid)
        assert start is not None
        st = PodState(
            pod_id="p1",
            namespace="default",
            socket=str(sock_path),
            vmm=ProcRef(child.pid, start),
            helpers=(ProcRef(child.pid, start + 1),),  # a recycled pid: must be left alone
            work_dir=str(work),
            vm_dir=str(store.pod_dir("default", "p1") / "vm"),
            resources=(ResourceRecord("disk", "c", "ctr", {"image": str(image)}),),
        )
        store.save(st)
        done = cleanup(st, store)
        assert child.wait(timeout=5) is not None
        assert any("killed" in d for d in done)
        assert not image.exists() and not work.exists() and not sock_path.exists()
        assert not store.pod_dir("default", "p1").exists()
        assert cleanup(st, store) == []  # idempotent
    finally:
        listener.close()
        if child.poll() is None:
            child.kill()
            child.wait()
    assert os.path.exists(tmp_path)


def test_pod_key_keeps_socket_paths_short() -> None:
    key = pod_key("default", "run1")
    assert key.startswith("run1-") and key == pod_key("default", "run1")
    assert pod_key("k8s.io", "run1") != key
    long_id = "b0a9dd841450685fc450ab32358cdbb0764582038deb68a97cedc3dbad8de43f"
    key = pod_key("k8s.io", long_id)
    assert key.startswith("b0a9dd841450-") and len(key) == 25
    assert pod_key("k8s.io", long_id[:-1] + "0") != key
    sock = Path("/run/cloudhv-test-state-dir-0123456789") / key / "vm" / "vhost-vsock.sock_1024"
    assert len(str(sock)) < 107
    assert "/" not in pod_key("ns", "a b\u00e9c")


def test_orphan_work_dirs_are_collected_and_owned_ones_kept(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    disks = tmp_path / "disks"
    live, dead, orphan, young = (disks / name for name in ("live", "dead", "orphan", "young"))
    for directory in (live, dead, orphan, young):
        directory.mkdir(parents=True)
        (directory / "c1.ext4").write_bytes(b"image")
    old = time.time() - 3600
    for directory in (live, dead, orphan):
        os.utime(directory, (old, old))
    me = ProcRef(os.getpid(), process_start_time(os.getpid()) or 0)
    store.save(PodState(pod_id="a", namespace="ns", daemon=me, work_dir=str(live)))
    store.save(PodState(pod_id="b", namespace="ns", daemon=ProcRef(1, 1), work_dir=str(dead)))
    done = collect_orphan_work_dirs(store, disks)
    assert done == [f"removed orphan {orphan}"]
    assert live.exists() and dead.exists() and young.exists() and not orphan.exists()

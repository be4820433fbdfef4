"""The shared image cache: its key, LRU choice, and (real files, real processes) builds
once under concurrency, crash safety, references, eviction and garbage collection."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from shim.rootfs.cache import (
    Entry,
    Holder,
    ImageCache,
    Layer,
    cache_key,
    choose_evictions,
    layer_identity,
    release_ref,
)

REPO = Path(__file__).resolve().parents[2]


# -- key -----------------------------------------------------------------------------------


def _layer(path: str, ino: int = 1, ctime: int = 10, mtime: int = 10, dev: int = 2049) -> Layer:
    return Layer(path, dev, ino, ctime, mtime)


def test_key_is_stable_and_names_every_layer_in_order() -> None:
    a, b = _layer("/s/1/fs"), _layer("/s/2/fs", ino=2)
    assert cache_key([a, b], "ext4") == cache_key([a, b], "ext4")
    assert cache_key([a, b], "ext4") != cache_key([b, a], "ext4")
    assert cache_key([a, b], "ext4") != cache_key([a], "ext4")
    assert cache_key([a, b], "ext4") != cache_key([a, b], "erofs")
    for changed in (
        _layer("/s/3/fs"), _layer("/s/1/fs", ino=9), _layer("/s/1/fs", ctime=11),
        _layer("/s/1/fs", mtime=11), _layer("/s/1/fs", dev=2050),
    ):
        assert cache_key([changed, b], "ext4") != cache_key([a, b], "ext4"), changed


def test_same_bytes_in_other_layers_are_other_keys(tmp_path: Path) -> None:
    """Two snapshots with identical content are still two snapshots: the key never
    looks at content, so equal content is no reason to share (nor is it a collision)."""
    for name in ("1", "2"):
        (tmp_path / name / "fs").mkdir(parents=True)
        (tmp_path / name / "fs" / "f").write_text("same")
    one, two = (layer_identity(str(tmp_path / n / "fs")) for n in ("1", "2"))
    assert cache_key([one], "ext4") != cache_key([two], "ext4")


def test_a_layer_dir_recreated_at_the_same_path_is_a_new_key(tmp_path: Path) -> None:
    """containerd's root wiped and made again: snapshot ids start over, paths repeat."""
    layer = tmp_path / "snapshots" / "1" / "fs"
    layer.mkdir(parents=True)
    (layer / "f").write_text("old bytes")
    before = cache_key([layer_identity(str(layer))], "ext4")
    (layer / "f").unlink()
    layer.rmdir()
    time.sleep(0.01)
    layer.mkdir()
    (layer / "f").write_text("new bytes")
    assert cache_key([layer_identity(str(layer))], "ext4") != before


def test_key_costs_one_stat_per_layer(tmp_path: Path) -> None:
    layers = []
    for index in range(20):
        layer = tmp_path / str(index) / "fs"
        layer.mkdir(parents=True)
        (layer / "big").write_bytes(os.urandom(1 << 20))  # never read
        layers.append(str(layer))
    started = time.perf_counter()
    for _ in range(100):
        cache_key([layer_identity(p) for p in layers], "ext4")
    per_key_ms = (time.perf_counter() - started) * 10
    assert per_key_ms < 5, f"{per_key_ms:.2f} ms for a 20-layer key"


# -- LRU -----------------------------------------------------------------------------------


def _entry(key: str, mib: int, used: int, refs: int = 0) -> Entry:
    return Entry(key, Path(f"/c/images/{key}.ext4"), mib << 20, used, refs)


def test_lru_evicts_the_oldest_unreferenced_until_under_the_cap() -> None:
    entries = [_entry("a", 10, 1, refs=1), _entry("b", 10, 2), _entry("c", 10, 3),
               _entry("d", 10, 4)]
    assert [e.key for e in choose_evictions(entries, 40 << 20)] == []
    assert [e.key for e in choose_evictions(entries, 25 << 20)] == ["b", "c"]
    # In use is never chosen, even if that leaves the cache above its cap.
    assert [e.key for e in choose_evictions(entries, 0)] == ["b", "c", "d"]


# -- the cache on real files -------------------------------------------------------------------


def _holder(tmp: Path, name: str, record: str = "i1") -> Holder:
    return Holder(name, tmp / "state" / name / "state.json", record)


def _record_ref(holder: Holder, ref: Path) -> None:
    """What the pod's state says before it takes the reference."""
    holder.state_file.parent.mkdir(parents=True, exist_ok=True)
    holder.state_file.write_text(json.dumps(
        {"pod_id": holder.name, "resources": [
            {"kind": "image", "id": holder.record_id, "host": {"ref": str(ref)}}]}
    ))


async def _build_writing(tmp: Path, data: bytes) -> None:
    tmp.write_bytes(data)


async def test_miss_builds_hit_reuses_and_release_drops_the_ref(tmp_path: Path) -> None:
    cache = ImageCache(tmp_path / "cache", max_bytes=1 << 30, fmt="ext4")
    a, b = _holder(tmp_path, "pod-a"), _holder(tmp_path, "pod-b")
    builds: list[Path] = []

    async def build(tmp: Path) -> None:
        builds.append(tmp)
        await _build_writing(tmp, b"image")

    path, built = await cache.acquire("k1", a, build)
    assert built and path == cache.image_path("k1") and path.read_bytes() == b"image"
    assert builds[0].parent.name == "building" and not builds[0].exists()
    again, built = await cache.acquire("k1", b, build)
    assert (again, built, len(builds)) == (path, False, 1)
    assert [(e.key, e.refs) for e in cache.entries()] == [("k1", 2)]
    assert release_ref(cache.ref_path("k1", "pod-a"))
    assert not release_ref(cache.ref_path("k1", "pod-a"))  # idempotent
    assert [(e.key, e.refs) for e in cache.entries()] == [("k1", 1)]


async def test_failed_build_leaves_no_entry(tmp_path: Path) -> None:
    cache = ImageCache(tmp_path / "cache", max_bytes=1 << 30, fmt="ext4")

    async def build(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        await cache.acquire("k1", _holder(tmp_path, "pod-a"), build)
    assert cache.entries() == []
    assert list((tmp_path / "cache" / "building").iterdir()) == []
    assert not (tmp_path / "cache" / "refs" / "k1").exists()


BUILDER = textwrap.dedent("""
    import asyncio, os, sys, time
    from pathlib import Path
    from shim.rootfs.cache import Holder, ImageCache

    root, key, name, log, hold = sys.argv[1:6]
    cache = ImageCache(Path(root), max_bytes=1 << 30, fmt="ext4")

    async def build(tmp):
        with open(log, "a") as f:
            f.write(f"{name}\\n")
        with open(tmp, "wb") as f:
            f.write(b"part")
            f.flush()
            print("building", flush=True)
            time.sleep(float(hold))
            f.write(b"-done")
            os.fsync(f.fileno())

    path, built = asyncio.run(cache.acquire(key, Holder(name, Path(root) / name, "i1"), build))
    print(f"{path} {built}", flush=True)
""")


def _builder(tmp: Path, name: str, hold: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", BUILDER, str(tmp / "cache"), "k1", name, str(tmp / "builds.log"),
         str(hold)],
        cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_twenty_concurrent_processes_build_once(tmp_path: Path) -> None:
    procs = [_builder(tmp_path, f"pod-{i}", 0.5) for i in range(20)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 20
    assert len((tmp_path / "builds.log").read_text().splitlines()) == 1
    results = [o.split()[-2:] for o in outputs]
    assert {path for path, _ in results} == {str(tmp_path / "cache" / "images" / "k1.ext4")}
    assert sorted(built for _, built in results) == ["False"] * 19 + ["True"]
    cache = ImageCache(tmp_path / "cache", max_bytes=1 << 30, fmt="ext4")
    assert [(e.key, e.refs) for e in cache.entries()] == [("k1", 20)]
    assert cache.image_path("k1").read_bytes() == b"part-done"
    (listed,) = cache.listing()
    assert (listed["builds"], len(listed["refs"])) == (1, 20)  # type: ignore[arg-type]


def test_a_builder_killed_mid_build_leaves_nothing_complete(tmp_path: Path) -> None:
    victim = _builder(tmp_path, "pod-a", 30)
    assert victim.stdout is not None
    assert victim.stdout.readline().strip() == "building"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    cache = ImageCache(tmp_path / "cache", max_bytes=1 << 30, fmt="ext4")
    assert cache.entries() == []
    leftovers = list((tmp_path / "cache" / "building").iterdir())
    assert len(leftovers) == 1
    # Its build lock died with it: garbage collection may take the half-written file.
    assert cache.collect_garbage() == [f"removed unfinished build {leftovers[0]}"]
    # And the next one builds it whole.
    after = _builder(tmp_path, "pod-b", 0)
    assert after.communicate(timeout=60)[0].split()[-1] == "True"
    assert cache.image_path("k1").read_bytes() == b"part-done"


def test_garbage_collection_spares_a_build_in_progress(tmp_path: Path) -> None:
    builder = _builder(tmp_path, "pod-a", 2)
    assert builder.stdout is not None
    assert builder.stdout.readline().strip() == "building"
    cache = ImageCache(tmp_path / "cache", max_bytes=1 << 30, fmt="ext4")
    assert cache.collect_garbage() == []
    assert builder.communicate(timeout=60)[0].split()[-1] == "True"


async def test_eviction_takes_lru_unreferenced_and_never_one_in_use(tmp_path: Path) -> None:
    cache = ImageCache(tmp_path / "cache", max_bytes=2 << 20, fmt="ext4")
    holders = {}
    for index, key in enumerate(("old-in-use", "unused", "newest")):
        holders[key] = _holder(tmp_path, f"pod-{index}")
        await cache.acquire(key, holders[key], lambda t: _build_writing(t, os.urandom(1 << 20)))
        os.utime(cache.image_path(key), ns=(index * 10**9, index * 10**9))
        if key == "unused":
            release_ref(cache.ref_path(key, holders[key].name))
    # The third build went above 2 MiB: the least recently used unreferenced one went.
    cache.evict()
    assert [e.key for e in cache.entries()] == ["newest", "old-in-use"]
    release_ref(cache.ref_path("old-in-use", holders["old-in-use"].name))
    release_ref(cache.ref_path("newest", holders["newest"].name))
    cache.max_bytes = 1 << 20
    assert len(cache.evict()) == 1
    assert [e.key for e in cache.entries()] == ["newest"]


async def test_garbage_collection_releases_refs_of_pods_gone(tmp_path: Path) -> None:
    cache = ImageCache(tmp_path / "cache", max_bytes=1 << 30, fmt="ext4")
    live, dead, forgot = (_holder(tmp_path, n) for n in ("live", "dead", "forgot"))
    for holder in (live, dead, forgot):
        _record_ref(holder, cache.ref_path("k1", holder.name))
        await cache.acquire("k1", holder, lambda t: _build_writing(t, b"x"))
    dead.state_file.unlink()  # a host reboot emptied /run
    forgot.state_file.write_text(json.dumps({"pod_id": "forgot", "resources": []}))
    done = cache.collect_garbage()
    assert sorted(done) == sorted(
        f"released orphan reference {cache.ref_path('k1', h.name)}" for h in (dead, forgot)
    )
    assert [(e.key, e.refs) for e in cache.entries()] == [("k1", 1)]


async def test_cancelled_acquire_leaves_no_ref_behind_once_released(tmp_path: Path) -> None:
    """A create cancelled while taking its ref: the undo (release) runs after the
    reference was written, never before it, so nothing stays referenced."""
    cache = ImageCache(tmp_path / "cache", max_bytes=1 << 30, fmt="ext4")
    await cache.acquire("k1", _holder(tmp_path, "a"), lambda t: _build_writing(t, b"x"))
    holder = _holder(tmp_path, "b")
    task = asyncio.create_task(cache.acquire("k1", holder, lambda t: _build_writing(t, b"x")))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release_ref(cache.ref_path("k1", holder.name))
    assert [(e.key, e.refs) for e in cache.entries()] == [("k1", 1)]


async def test_crash_cleanup_releases_the_pods_reference(tmp_path: Path) -> None:
    """`delete` after a shim SIGKILL: the pod's record alone releases its reference and
    removes its unfinished build."""
    from shim.cleanup import cleanup
    from shim.state import PodState, ResourceRecord, StateStore

    cache = ImageCache(tmp_path / "cache", max_bytes=1 << 30, fmt="ext4")
    store = StateStore(tmp_path / "state")
    holder = Holder("pod-a", store.pod_dir("ns", "pod-a") / "state.json", "i1")
    await cache.acquire("k1", holder, lambda t: _build_writing(t, b"x"))
    building = cache.building_path("k2", "pod-a")
    building.write_bytes(b"half")
    record = ResourceRecord(
        kind="image", id="i1", host={
            "ref": str(cache.ref_path("k1", "pod-a")), "building": str(building),
            "scratch": str(tmp_path / "work" / "mnt" / "i1"),
        },
    )
    state = PodState(pod_id="pod-a", namespace="ns", resources=(record,))
    store.save(state)
    done = cleanup(state, store)
    assert f"released cache reference {cache.ref_path('k1', 'pod-a')}" in done
    assert f"removed unfinished build {building}" in done
    assert [(e.key, e.refs) for e in cache.entries()] == [("k1", 0)]

"""Issue 18: rootfs delivery through real containerd (overlayfs snapshotter) and QEMU.

A content-keyed shared image cache (one build per image per host, one read-only
disk per image per pod), a writable overlay upper per container, block device
passthrough, eviction, and cleanup after delete and after a shim SIGKILL.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.devices import device_id
from shim.state import pod_key
from tests.integration.busybox_tree import make_busybox_tree, make_ext4
from tests.integration.containerd_env import REPO, VMMS, import_image
from tests.integration.cri import CriClient
from tests.integration.ctr_fixtures import Env, containerd_env, shim_processes
from tests.integration.oci_image import Layer, build_image
from tests.integration.test_cri import Pod
from tests.integration.test_cri_pod import build_probe

LAYERED = "localhost/test/layered:1"
TWIN_A, TWIN_B = "localhost/test/twin:a", "localhost/test/twin:b"
EVICT = [f"localhost/test/evict:{n}" for n in "abc"]
PAYLOAD_MIB = 8  # each eviction image: busybox plus this much random data
CACHE_MAX_MIB = 24  # holds two eviction images, not three
RUNTIME = "io.containerd.cloudhv.v1"
# VFS_CAP_REVISION_2 with CAP_NET_RAW (13) permitted and effective.
CAPS = (0x02000001).to_bytes(4, "little") + (1 << 13).to_bytes(4, "little") + bytes(12)
UPPER_TMPFS = {"io.cloudhv.container.upper": "tmpfs"}


@pytest.fixture(scope="module", params=VMMS)
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    with containerd_env(
        request.param,
        max_containers_per_vm=5,
        rootfs_cache={"max_mib": CACHE_MAX_MIB},
        agent_startup_timeout_s=60,  # pods boot side by side here, on a busy host
    ) as env:
        tree = make_busybox_tree(env.scratch / "rootfs-tree")
        build_probe("xattr_probe.c", tree / "bin" / "xattr-probe")
        special = (
            Layer()
            .dir("data")
            .file("data/file", b"hello\n")
            .hardlink("data/hardlink", "data/file")
            .symlink("data/abs", "/data/file")
            .symlink("data/rel", "file")
            .file("data/suid", b"#!/bin/sh\n", mode=0o4755)
            .file("data/owned", b"x", uid=1234, gid=5678)
            .file("data/xattr", b"x", xattrs={"user.color": b"blue"})
            .file("data/cap", b"x", mode=0o755, xattrs={"security.capability": CAPS})
            .file("data/gone", b"deleted by the next layer")
            .dir("data/olddir")
            .file("data/olddir/hidden", b"x")
        )
        later = Layer().whiteout("data/gone").opaque("data/olddir").file(
            "data/olddir/new", b"y"
        )
        images = {LAYERED: [tree, special, later]}
        # Same path, size and mtime (tar mtime 0): only the bytes differ.
        images[TWIN_A] = [tree, Layer().dir("data").file("data/blob", b"A" * 4096)]
        images[TWIN_B] = [tree, Layer().dir("data").file("data/blob", b"B" * 4096)]
        for ref in EVICT:
            payload = os.urandom(PAYLOAD_MIB << 20)
            images[ref] = [tree, Layer().dir("data").file("data/payload", payload)]
        for ref, layers in images.items():
            name = ref.rsplit("/", 1)[1].replace(":", "-")
            tarball = build_image(layers, ref, ["sh"], env.scratch / f"{name}.tar")
            import_image(env.containerd, tarball, "k8s.io")
        yield env


def busybox(env: Env) -> Path:
    """The busybox tree (with the xattr probe) every image here is built on."""
    return env.scratch / "rootfs-tree"


@pytest.fixture(scope="module")
def cri(env: Env) -> Iterator[CriClient]:
    client = CriClient(env.containerd.address)
    yield client
    client.close()


def cache_listing(env: Env) -> list[dict[str, object]]:
    """What the cache's own listing tool prints."""
    out = subprocess.run(
        [sys.executable, "-m", "shim.rootfs.cache", str(env.state_dir.parent / "cache")],
        cwd=REPO, capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    ).stdout
    return [json.loads(line) for line in out.splitlines()]


def holder(pod: Pod) -> str:
    """A pod's name in the cache's references: its state dir's name."""
    return pod_key("k8s.io", pod.id)


def entries_of(env: Env, pod: Pod) -> list[dict[str, object]]:
    return [e for e in cache_listing(env) if holder(pod) in e["refs"]]  # type: ignore[operator]


def built_by(env: Env, pod: Pod) -> list[dict[str, object]]:
    return [e for e in cache_listing(env) if holder(pod) in e["built_by"]]  # type: ignore[operator]


def serials(pod: Pod, cid: str) -> list[str]:
    """The virtio serials of the disks the guest has now."""
    return sorted(run(pod, cid, "for s in /sys/block/*/serial; do cat $s; echo; done").split())


def run(pod: Pod, cid: str, script: str) -> str:
    out, err, code = pod.exec_sync(cid, ["sh", "-c", script])
    assert code == 0, (script, out, err)
    return out.decode()


def work_files(env: Env, pod: Pod) -> list[str]:
    work = env.state_dir.parent / "disks" / holder(pod)
    return sorted(p.name for p in work.glob("*")) if work.exists() else []


def remove_container(cri: CriClient, cid: str) -> None:
    cri.runtime.StopContainer(cri.pb.StopContainerRequest(container_id=cid, timeout=5))
    cri.runtime.RemoveContainer(cri.pb.RemoveContainerRequest(container_id=cid))


def test_layered_image_is_the_merged_view_and_writes_stay_in_their_container(
    cri: CriClient, env: Env
) -> None:
    pod, other = Pod(cri, env, "layered"), Pod(cri, env, "layered-2")
    try:
        a = pod.container("a", ["sleep", "600"], image=LAYERED)
        view = run(pod, a, "ls -A /data; ls -A /data/olddir; test -e /data/gone || echo gone")
        assert view.split() == [
            "abs", "cap", "file", "hardlink", "olddir", "owned", "rel", "suid", "xattr",
            "new", "gone",
        ]
        stats = run(pod, a, "stat -c '%i %h' /data/file /data/hardlink").split("\n")
        file_stat, link_stat = stats[:2]
        assert file_stat == link_stat and file_stat.endswith(" 2"), "hardlink lost"
        links = run(pod, a, "readlink /data/abs; readlink /data/rel; cat /data/abs /data/rel")
        assert links.split() == ["/data/file", "file", "hello", "hello"]
        assert run(pod, a, "stat -c '%a %u:%g' /data/suid /data/owned").split("\n")[:2] == [
            "4755 0:0", "644 1234:5678"
        ]
        assert run(pod, a, "xattr-probe /data/xattr user.color").strip() == b"blue".hex()
        assert run(pod, a, "xattr-probe /data/cap security.capability").strip() == CAPS.hex()

        # Writes go to a's own upper; the shared image never changes.
        run(pod, a, "echo changed > /data/file; touch /data/written; rm /data/rel")
        assert run(pod, a, "cat /data/file; ls /data/written").split() == [
            "changed", "/data/written"
        ]
        b = pod.container("b", ["sleep", "600"], image=LAYERED)
        d = pod.container("d", ["sleep", "600"], image=LAYERED, annotations=UPPER_TMPFS)
        c = other.container("c", ["sleep", "600"], image=LAYERED)
        for box, cid in ((pod, b), (pod, d), (other, c)):
            pristine = "cat /data/file; ls /data/written 2>&1 || true; readlink /data/rel"
            assert run(box, cid, pristine).split()[0] == "hello"
            assert "No such file" in run(box, cid, pristine)
            assert run(box, cid, "readlink /data/rel").strip() == "file"
        run(pod, d, "echo in-tmpfs > /data/file")
        assert run(pod, d, "cat /data/file").strip() == "in-tmpfs"
        assert run(pod, b, "cat /data/file").strip() == "hello"

        # One cache entry for both pods, built once; one read-only disk per pod for its
        # three containers, plus an upper disk each for a and b (d's is tmpfs).
        (entry,) = entries_of(env, pod)
        assert entry["builds"] == 1
        assert sorted(entry["refs"]) == sorted([holder(pod), holder(other)])  # type: ignore[arg-type]
        image_disk = device_id("i", str(entry["key"]))
        upper_a, upper_b = device_id("u", a), device_id("u", b)
        assert serials(pod, a) == sorted(["cloudhv-rootfs", image_disk, upper_a, upper_b])
        assert serials(other, c) == sorted(["cloudhv-rootfs", image_disk, device_id("u", c)])
        assert work_files(env, pod) == sorted([f"{upper_a}.ext4", f"{upper_b}.ext4"])

        # Deleting b unplugs its upper: the guest no longer lists it, the host file is gone.
        remove_container(cri, b)
        assert serials(pod, a) == sorted(["cloudhv-rootfs", image_disk, upper_a])
        assert work_files(env, pod) == [f"{upper_a}.ext4"]
        # The last of the pod's containers of the image takes the image disk with it.
        remove_container(cri, a)
        remove_container(cri, d)
        assert entries_of(env, pod) == []
        keep = other.container("keep", ["sleep", "600"], image=LAYERED)
        assert serials(other, keep) == sorted(
            ["cloudhv-rootfs", image_disk, device_id("u", c), device_id("u", keep)]
        )
    finally:
        pod.remove()
        other.remove()
    assert env.wait_clean() == []
    (entry,) = (e for e in cache_listing(env) if e["key"] == entry["key"])
    assert entry["refs"] == [] and entry["builds"] == 1


def test_images_differing_only_in_one_files_bytes_get_their_own_entries(
    cri: CriClient, env: Env
) -> None:
    pod = Pod(cri, env, "twins")
    try:
        a = pod.container("a", ["sleep", "600"], image=TWIN_A)
        b = pod.container("b", ["sleep", "600"], image=TWIN_B)
        assert run(pod, a, "stat -c '%s %Y' /data/blob; head -c 3 /data/blob") == "4096 0\nAAA"
        assert run(pod, b, "stat -c '%s %Y' /data/blob; head -c 3 /data/blob") == "4096 0\nBBB"
        entries = entries_of(env, pod)
        assert len(entries) == 2 and [e["builds"] for e in entries] == [1, 1]
        image_disks = [s for s in serials(pod, a) if s.startswith("i")]
        assert len(image_disks) == 2
    finally:
        pod.remove()
    assert env.wait_clean() == []


def test_a_burst_of_twenty_containers_across_pods_builds_the_image_once(
    cri: CriClient, env: Env
) -> None:
    ref = f"localhost/test/burst:{os.getpid()}-{time.monotonic_ns()}"
    marker = os.urandom(16).hex()
    layers = [busybox(env), Layer().dir("data").file("data/burst", marker.encode())]
    import_image(env.containerd, build_image(layers, ref, ["sh"], env.scratch / "burst.tar"),
                 "k8s.io")
    # The pods boot a few at a time (ten TCG boots at once on two cores miss the agent
    # deadline); the containers then all start at once.
    with concurrent.futures.ThreadPoolExecutor(3) as booting:
        pods = list(booting.map(lambda i: Pod(cri, env, f"burst{i}"), range(10)))
    workers = concurrent.futures.ThreadPoolExecutor(20)
    try:
        jobs = [(pod, f"c{i}") for pod in pods for i in range(2)]
        cids = list(workers.map(
            lambda job: job[0].container(job[1], ["sleep", "600"], image=ref), jobs
        ))
        for (pod, _), cid in zip(jobs[::5], cids[::5], strict=True):
            assert run(pod, cid, "cat /data/burst") == marker
        (entry,) = (e for e in cache_listing(env) if holder(pods[0]) in e["refs"])  # type: ignore[operator]
        assert entry["builds"] == 1, entry
        assert sorted(entry["refs"]) == sorted(holder(p) for p in pods)  # type: ignore[arg-type]
    finally:
        list(workers.map(lambda p: p.remove(), pods))
        workers.shutdown()
    assert env.wait_clean() == []


def test_eviction_takes_the_lru_unused_entry_and_spares_a_running_containers(
    cri: CriClient, env: Env
) -> None:
    running, gone, third = (Pod(cri, env, f"evict-{n}") for n in "abc")
    try:
        ra = running.container("a", ["sleep", "600"], image=EVICT[0])
        gone.container("b", ["sleep", "600"], image=EVICT[1])
        (gone_entry,) = built_by(env, gone)
        gone.remove()
        third.container("c", ["sleep", "600"], image=EVICT[2])
        listed = {str(e["key"]): e for e in cache_listing(env)}
        assert str(gone_entry["key"]) not in listed, "the unused LRU entry stayed"
        assert [e["key"] for e in built_by(env, running)] == [
            e["key"] for e in entries_of(env, running)
        ]
        assert entries_of(env, running) and entries_of(env, third)
        total = sum(int(e["bytes"]) for e in listed.values())  # type: ignore[call-overload]
        assert total <= CACHE_MAX_MIB << 20
        assert run(running, ra, "wc -c < /data/payload").strip() == str(PAYLOAD_MIB << 20)
    finally:
        for pod in (running, third):
            pod.remove()
    assert env.wait_clean() == []


def test_references_are_released_after_a_shim_sigkill(cri: CriClient, env: Env) -> None:
    pod = Pod(cri, env, "sigkill")
    try:
        pod.container("a", ["sleep", "600"], image=TWIN_A)
        assert len(entries_of(env, pod)) == 1
        ((shim, _),) = shim_processes(env.containerd)
        os.kill(shim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while entries_of(env, pod):  # containerd's `delete` runs from the pod's state
            assert time.monotonic() < deadline, "the reference was never released"
            time.sleep(0.2)
    finally:
        pod.remove()
    assert env.wait_clean() == []


def test_a_shim_killed_mid_build_leaves_no_entry_and_delete_cleans_up(
    cri: CriClient, env: Env
) -> None:
    ref = f"localhost/test/midbuild:{os.getpid()}"
    layers = [busybox(env), Layer().dir("data").file("data/big", os.urandom(48 << 20))]
    import_image(env.containerd, build_image(layers, ref, ["sh"], env.scratch / "mid.tar"),
                 "k8s.io")
    building = env.state_dir.parent / "cache" / "building"
    pod = Pod(cri, env, "midbuild")
    try:
        errors: list[BaseException] = []

        def create() -> None:
            try:
                pod.container("a", ["sleep", "600"], image=ref)
            except BaseException as err:  # expected: its shim is killed under it
                errors.append(err)

        thread = threading.Thread(target=create)
        thread.start()
        deadline = time.monotonic() + 120
        while not (building.exists() and any(building.iterdir())):
            assert time.monotonic() < deadline, "the build never started"
            time.sleep(0.005)
        for pid, _ in shim_processes(env.containerd):
            os.kill(pid, signal.SIGKILL)
        thread.join(180)
        assert errors, "the create succeeded although its shim was killed mid-build"
        # containerd's `delete` removes the half-written file from the pod's record; no
        # entry ever looked complete.
        deadline = time.monotonic() + 60
        while any(building.iterdir()):
            assert time.monotonic() < deadline, list(building.iterdir())
            time.sleep(0.1)
        assert built_by(env, pod) == [] and entries_of(env, pod) == []
    finally:
        pod.remove()
    assert env.wait_clean() == []


@pytest.fixture
def loop_rootfs(env: Env) -> Iterator[tuple[str, Path]]:
    """An ext4 filesystem with busybox on a loop device, mounted on the host at a
    directory, as a block-device snapshotter would hand it over."""
    image = make_ext4(busybox(env), env.scratch / "passthrough.ext4", 64)
    device = subprocess.run(
        ["losetup", "--find", "--show", str(image)], capture_output=True, text=True, check=True
    ).stdout.strip()
    mount_dir = Path(tempfile.mkdtemp(prefix="passthrough-", dir=env.scratch))
    try:
        subprocess.run(["mount", device, str(mount_dir)], check=True)
        yield device, mount_dir
    finally:
        subprocess.run(["umount", str(mount_dir)], check=False, capture_output=True)
        subprocess.run(["losetup", "-d", device], check=False)


def _mounted(path: Path) -> bool:
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return any(line.split()[4] == str(path) for line in lines)


def test_a_loop_device_rootfs_is_passed_through_and_written(
    env: Env, loop_rootfs: tuple[str, Path]
) -> None:
    device, mount_dir = loop_rootfs
    result = env.containerd.ctr(
        "run", "--rm", "--runtime", RUNTIME, "--rootfs", str(mount_dir), "passthrough",
        "/bin/sh", "-c", "grep ' / ' /proc/mounts; echo written-in-the-vm > /proof; sync",
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # The guest's root is the device itself (no overlay, no copy).
    assert result.stdout.split()[2] == "ext4", result.stdout
    assert not _mounted(mount_dir), "the host kept its mount of the device"
    check = env.scratch / "check"
    check.mkdir()
    subprocess.run(["mount", "-o", "ro", device, str(check)], check=True)
    try:
        assert (check / "proof").read_text() == "written-in-the-vm\n"
    finally:
        subprocess.run(["umount", str(check)], check=True)
    assert env.wait_clean() == []

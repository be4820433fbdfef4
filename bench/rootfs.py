"""Rootfs delivery, side by side in one run: cache hit cost, miss vs plain mkfs, and CRI.

Usage: python -m bench.rootfs [-n 5] [--format ext4|erofs]   (root, PYTHONPATH=.)

1. hit: the host-side work a cached image adds to a container start (stat the
   layers, hash the key, take the cache lock, write the reference, touch the
   entry), median of 200, on the 200 MB image's 4 layers.
2. miss: the cache's whole build of that image (read-only overlay of its 4
   layer dirs, scan, mkfs, fsync, rename) against a plain `mkfs.ext4 -d` of the
   same merged tree, already on disk (no overlay, no fsync), median of n.
3. CRI StartContainer through containerd 1.6: the 200 MB image in a new pod
   with the cache cold, then in another pod with it hot, against a busybox
   container (hot), each median of n (fresh image tags for each cold run).
4. the burst: 20 containers of one uncached image across 10 pods, started at
   once: wall time until all run, and the number of builds.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from shim.rootfs import image as image_mod
from shim.rootfs.cache import Holder, ImageCache, cache_key, layer_identity, release_ref
from shim.rootfs.image import Format
from shim.state import pod_key
from tests.integration.busybox_tree import make_busybox_tree
from tests.integration.containerd_env import import_image
from tests.integration.cri import CriClient
from tests.integration.ctr_fixtures import BUSYBOX, Env, containerd_env
from tests.integration.oci_image import Layer, build_image
from tests.integration.test_cri import Pod

HOST_DIRS = ("/usr/lib/python3.11", "/usr/include", "/usr/share/perl")


def big_layers(root: Path) -> list[Path]:
    """Busybox plus three layers copied from the host's /usr: ~200 MB, ~12k files."""
    layers = [make_busybox_tree(root / "0")]
    for index, source in enumerate(HOST_DIRS, 1):
        target = root / str(index) / source.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-a", source, str(target)], check=True)
        layers.append(root / str(index))
    return layers


def ms(values: list[float]) -> str:
    return f"{statistics.median(values):8.1f} ms (min {min(values):.1f}, max {max(values):.1f})"


def bench_host(work: Path, layers: list[Path], fmt: Format, n: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"hit": [], "miss": [], "plain": []}
    cache = ImageCache(work / "cache", max_bytes=1 << 40, fmt=fmt)
    dirs = [str(p) for p in reversed(layers)]  # top first, as containerd's lowerdir
    merged = work / "merged"
    for layer in layers:
        subprocess.run(["cp", "-a", "--no-target-directory", str(layer), str(merged)], check=True)
    for run in range(n):
        key = cache_key([layer_identity(d) for d in dirs], fmt) + f"-{run}"

        async def build(tmp: Path) -> int:
            return await image_mod.build_image(dirs, tmp, work / "scratch", fmt)

        subprocess.run(["sync"], check=True)
        started = time.perf_counter()
        asyncio.run(cache.acquire(key, Holder(f"miss{run}", work / "none", "i"), build))
        out["miss"].append((time.perf_counter() - started) * 1000)
        release_ref(cache.ref_path(key, f"miss{run}"))
        cache.image_path(key).unlink()

        plain = work / "plain.ext4"
        plain.unlink(missing_ok=True)
        subprocess.run(["sync"], check=True)
        started = time.perf_counter()
        data, inodes = image_mod.tree_usage(merged)
        with open(plain, "wb") as handle:
            handle.truncate(image_mod.ext4_size(data, inodes))
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(merged), str(plain)], check=True)
        out["plain"].append((time.perf_counter() - started) * 1000)

    async def hits() -> None:
        # As in a daemon: one event loop, the blocking parts in a worker thread.
        key = cache_key([layer_identity(d) for d in dirs], fmt)
        await cache.acquire(key, Holder("warm", work / "none", "i"), build)
        for index in range(200):
            holder = Holder(f"hit{index}", work / "none", "i")
            started = time.perf_counter()
            hit_key = await asyncio.to_thread(
                lambda: cache_key([layer_identity(d) for d in dirs], fmt)
            )
            await cache.acquire(hit_key, holder, build)
            out["hit"].append((time.perf_counter() - started) * 1000)
            release_ref(cache.ref_path(hit_key, holder.name))

    asyncio.run(hits())
    return out


def start_ms(pod: Pod, image: str, name: str) -> float:
    pb = pod.pb
    ccfg = pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name=name), image=pb.ImageSpec(image=image),
        command=["sleep", "600"], log_path=f"{name}.log",
    )
    cid = pod.cri.runtime.CreateContainer(
        pb.CreateContainerRequest(pod_sandbox_id=pod.id, config=ccfg, sandbox_config=pod.config),
        timeout=300,
    ).container_id
    started = time.perf_counter()
    pod.cri.runtime.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=300)
    return (time.perf_counter() - started) * 1000


def bench_cri(
    env: Env, cri: CriClient, layers: list[Path], n: int, fmt: Format
) -> dict[str, Any]:
    out: dict[str, Any] = {"cold": [], "hot": [], "busybox": []}
    # Each measured container is a later one in its pod (the first pays the VM's own
    # first crun run) and the first of its image there (so its disk is plugged): a
    # warm-up container of a third image goes first.
    warm = "localhost/bench/warm:1"
    warm_layers = [layers[0], Layer().file("warm", b"w")]
    import_image(env.containerd, build_image(warm_layers, warm, ["sh"], env.scratch / "w.tar"),
                 "k8s.io")
    for run in range(n):
        ref = f"localhost/bench/big:{run}"
        # A fresh tag per run is a fresh image: its top layer differs, so is its key.
        tagged = [*layers, Layer().file(f"run-{run}", str(run).encode())]
        tarball = build_image(tagged, ref, ["sh"], env.scratch / "big.tar")
        import_image(env.containerd, tarball, "k8s.io")
        tarball.unlink()
        first, second = Pod(cri, env, f"cold{run}"), Pod(cri, env, f"hot{run}")
        try:
            start_ms(first, warm, "warm")
            start_ms(first, BUSYBOX, "busybox")  # busybox's entry is hot from here on
            out["cold"].append(start_ms(first, ref, "big"))
            start_ms(second, warm, "warm")
            # Alternate which goes first, so neither gains from the other.
            order = [(ref, "hot"), (BUSYBOX, "busybox")]
            for image, name in order if run % 2 == 0 else reversed(order):
                out[name].append(start_ms(second, image, name))
        finally:
            first.remove()
            second.remove()
    ref = "localhost/bench/burst:1"
    burst_layers = [layers[0], Layer().file("burst", os.urandom(1 << 20))]
    import_image(env.containerd, build_image(burst_layers, ref, ["sh"], env.scratch / "b.tar"),
                 "k8s.io")
    # The pods boot three at a time (ten TCG boots at once on two cores miss the agent
    # deadline); the containers then all start at once.
    with concurrent.futures.ThreadPoolExecutor(3) as booting:
        pods = list(booting.map(lambda i: Pod(cri, env, f"burst{i}"), range(10)))
    workers = concurrent.futures.ThreadPoolExecutor(20)
    try:
        started = time.perf_counter()
        list(workers.map(
            lambda job: job[0].container(job[1], ["sleep", "600"], image=ref),
            [(pod, f"c{i}") for pod in pods for i in range(2)],
        ))
        out["burst_ms"] = (time.perf_counter() - started) * 1000
        cache = ImageCache(env.state_dir.parent / "cache", max_bytes=0, fmt=fmt)
        (entry,) = (e for e in cache.listing() if pod_key("k8s.io", pods[0].id) in e["refs"])  # type: ignore[operator]
        out["burst_builds"] = entry["builds"]
    finally:
        list(workers.map(lambda p: p.remove(), pods))
        workers.shutdown()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=5)
    parser.add_argument("--format", choices=image_mod.FORMATS, default="ext4")
    args = parser.parse_args()
    fmt: Format = args.format
    work = Path(tempfile.mkdtemp(prefix="rootfs-bench-", dir="/var/tmp"))
    try:
        layers = big_layers(work / "layers")
        host = bench_host(work, layers, fmt, args.n)
        print(f"format {fmt}, n={args.n}")
        print(f"cache hit (host side)          {ms(host['hit'])}")
        print(f"miss: cache build of 200 MB    {ms(host['miss'])}")
        print(f"plain mkfs.ext4 -d, same tree  {ms(host['plain'])}", flush=True)
        with containerd_env(
            max_containers_per_vm=5, rootfs_cache={"format": fmt}, agent_startup_timeout_s=60
        ) as env:
            cri = CriClient(env.containerd.address)
            try:
                crio = bench_cri(env, cri, layers, args.n, fmt)
            finally:
                cri.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratio = statistics.median(host["miss"]) / statistics.median(host["plain"])
    print(f"miss / plain                   {ratio:8.2f}x")
    print(f"StartContainer 200 MB, cold    {ms(crio['cold'])}")
    print(f"StartContainer 200 MB, hot     {ms(crio['hot'])}")
    print(f"StartContainer busybox, hot    {ms(crio['busybox'])}")
    hot = statistics.median(crio["hot"]) / statistics.median(crio["busybox"])
    print(f"hot 200 MB / busybox           {hot:8.2f}x")
    print(f"burst: 20 containers, 10 pods  {crio['burst_ms']:8.0f} ms, builds: "
          f"{crio['burst_builds']}")


if __name__ == "__main__":
    main()

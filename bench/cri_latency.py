"""CRI call latencies through containerd 1.6 and the cloudhv runtime handler.

Usage: python -m bench.cri_latency [-n 5] [--volume] [--no-virtiofs]
(root, from the repository root, PYTHONPATH=.)
Runs N pods one after another (one busybox container each, 1 vCPU / 256 MiB) and
prints the median and range of each call, timed at the CRI client. --volume gives the
container a hostPath directory (shared through virtio-fs); --no-virtiofs boots the pods
without the virtio-fs device (config virtiofs.enabled false).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from typing import Any

from tests.integration.cri import CriClient
from tests.integration.ctr_fixtures import BUSYBOX, containerd_env

HANDLER = "cloudhv"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=5)
    parser.add_argument("--volume", action="store_true", help="a hostPath dir per container")
    parser.add_argument("--no-virtiofs", action="store_true", help="virtiofs.enabled false")
    args = parser.parse_args()
    times: dict[str, list[float]] = defaultdict(list)
    overrides: dict[str, object] = {"virtiofs": {"enabled": False}} if args.no_virtiofs else {}

    with containerd_env(**overrides) as env:
        cri = CriClient(env.containerd.address)
        pb, rt = cri.pb, cri.runtime

        def timed(name: str, request: Any, timeout: float = 180) -> Any:
            started = time.monotonic()
            response = getattr(rt, name)(request, timeout=timeout)
            times[name].append((time.monotonic() - started) * 1000)
            return response

        for index in range(args.n):
            config = pb.PodSandboxConfig(
                metadata=pb.PodSandboxMetadata(
                    name=f"bench{index}", uid=f"u{index}", namespace="b"
                ),
                hostname=f"bench{index}",
                log_directory=str(env.scratch / "logs" / str(index)),
            )
            run = pb.RunPodSandboxRequest(config=config, runtime_handler=HANDLER)
            pod = timed("RunPodSandbox", run).pod_sandbox_id
            mounts = []
            if args.volume:
                volume = env.scratch / "volumes" / str(index)
                volume.mkdir(parents=True)
                mounts.append(pb.Mount(container_path="/data", host_path=str(volume)))
            container = pb.ContainerConfig(
                metadata=pb.ContainerMetadata(name="app"),
                image=pb.ImageSpec(image=BUSYBOX),
                command=["sleep", "600"],
                log_path="app.log",
                mounts=mounts,
            )
            create = pb.CreateContainerRequest(
                pod_sandbox_id=pod, config=container, sandbox_config=config
            )
            cid = timed("CreateContainer", create).container_id
            timed("StartContainer", pb.StartContainerRequest(container_id=cid))
            for _ in range(5):
                timed("ExecSync", pb.ExecSyncRequest(container_id=cid, cmd=["true"], timeout=60))
            timed("StopPodSandbox", pb.StopPodSandboxRequest(pod_sandbox_id=pod))
            timed("RemovePodSandbox", pb.RemovePodSandboxRequest(pod_sandbox_id=pod))
        cri.close()
    print(f"{'call':18} {'n':>3} {'median ms':>10} {'min':>7} {'max':>7}")
    for name, values in times.items():
        print(
            f"{name:18} {len(values):3} {statistics.median(values):10.0f} "
            f"{min(values):7.0f} {max(values):7.0f}"
        )


if __name__ == "__main__":
    main()

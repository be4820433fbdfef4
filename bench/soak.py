"""Soak: pod lifecycles through real containerd, then one long-lived pod under many execs.

Usage: python -m bench.soak [-n 200] [--execs 1000]   (root, repository root, PYTHONPATH=.)

1. N cycles of RunPodSandbox → CreateContainer/StartContainer → ExecSync → StopPodSandbox
   → RemovePodSandbox, then the leak check the integration tests use (processes, mounts,
   state files, disk images, shim sockets) plus cgroups made under the pods' parent.
2. One pod that lives through `--execs` ExecSync calls: its shim daemon's RSS is sampled
   every 100 execs. A flat line means no per-exec growth.
Prints a summary and writes bench/soak.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from tests.integration.cri import CriClient
from tests.integration.ctr_fixtures import BUSYBOX, containerd_env, shim_processes

HANDLER = "cloudhv"
CGROUP_PARENT = "/cloudhv-soak"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cgroups_left() -> list[str]:
    found = []
    for root in Path("/sys/fs/cgroup").iterdir():
        candidate = root / CGROUP_PARENT.lstrip("/")
        if candidate.exists():
            found += [str(p) for p in candidate.rglob("*") if p.is_dir()]
    return found


def pod_config(pb: Any, env: Any, name: str) -> Any:
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, uid=f"u-{name}", namespace="soak"),
        hostname=name,
        log_directory=str(env.scratch / "logs" / name),
        linux=pb.LinuxPodSandboxConfig(cgroup_parent=f"{CGROUP_PARENT}/{name}"),
    )


def start_pod(cri: CriClient, env: Any, name: str) -> tuple[str, str]:
    pb, rt = cri.pb, cri.runtime
    config = pod_config(pb, env, name)
    pod = rt.RunPodSandbox(
        pb.RunPodSandboxRequest(config=config, runtime_handler=HANDLER), timeout=180
    ).pod_sandbox_id
    container = pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name="app"),
        image=pb.ImageSpec(image=BUSYBOX),
        command=["sleep", "100000"],
        log_path="app.log",
    )
    cid = rt.CreateContainer(
        pb.CreateContainerRequest(pod_sandbox_id=pod, config=container, sandbox_config=config),
        timeout=180,
    ).container_id
    rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=180)
    return pod, cid


def remove_pod(cri: CriClient, pod: str) -> None:
    cri.runtime.StopPodSandbox(cri.pb.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=180)
    cri.runtime.RemovePodSandbox(cri.pb.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=180)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=200, help="pod lifecycles")
    parser.add_argument("--execs", type=int, default=1000, help="execs in the long-lived pod")
    args = parser.parse_args()
    result: dict[str, Any] = {}
    with containerd_env() as env:
        cri = CriClient(env.containerd.address)
        pb = cri.pb
        cycle_s = []
        failures = 0
        for index in range(args.n):
            started = time.monotonic()
            try:
                pod, cid = start_pod(cri, env, f"soak{index}")
                reply = cri.runtime.ExecSync(
                    pb.ExecSyncRequest(container_id=cid, cmd=["echo", "ok"], timeout=60),
                    timeout=120,
                )
                if (reply.stdout, reply.exit_code) != (b"ok\n", 0):
                    failures += 1
                remove_pod(cri, pod)
            except Exception as err:  # counted, and the leak check still runs
                failures += 1
                print(f"cycle {index}: {err}")
            cycle_s.append(time.monotonic() - started)
            if index % 20 == 19:
                print(f"{index + 1} cycles, median {statistics.median(cycle_s):.2f} s")
        leaks = env.wait_clean() + [f"cgroup {c}" for c in cgroups_left()]
        result["cycles"] = {
            "n": args.n,
            "failures": failures,
            "median_s": statistics.median(cycle_s),
            "max_s": max(cycle_s),
            "leaks": leaks,
        }

        pod, cid = start_pod(cri, env, "longlived")
        ((shim, _),) = shim_processes(env.containerd)
        samples = [(0, rss_kib(shim))]
        for index in range(1, args.execs + 1):
            cri.runtime.ExecSync(
                pb.ExecSyncRequest(container_id=cid, cmd=["true"], timeout=60), timeout=120
            )
            if index % 100 == 0:
                samples.append((index, rss_kib(shim)))
        remove_pod(cri, pod)
        result["execs"] = {"n": args.execs, "rss_kib": samples}
        result["execs"]["leaks"] = env.wait_clean() + [f"cgroup {c}" for c in cgroups_left()]
        cri.close()
    Path("bench/soak.json").write_text(json.dumps(result, indent=1))
    cycles, execs = result["cycles"], result["execs"]
    print(
        f"cycles: {cycles['n']}, failures {cycles['failures']}, median {cycles['median_s']:.2f} s,"
        f" max {cycles['max_s']:.2f} s, leaks {len(cycles['leaks'])}"
    )
    first, last = execs["rss_kib"][1][1], execs["rss_kib"][-1][1]
    rss = [v for _, v in execs["rss_kib"]]
    print(f"daemon RSS over {execs['n']} execs (KiB, every 100): {rss}")
    print(f"growth from exec 100 to {execs['n']}: {last - first} KiB; leaks {len(execs['leaks'])}")


if __name__ == "__main__":
    main()

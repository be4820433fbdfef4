"""What one pod's VM costs the host, for the RuntimeClass's overhead.podFixed.

Usage: python -m bench.pod_overhead [-n 3] [--memory-mib 256] [--tb-size-mib 0,64]
       [--free-page-reporting on,off]
(root, from the repository root, PYTHONPATH=.)

Runs N CRI pods through containerd 1.6 and the cloudhv handler (one busybox container
each, the default VM size), makes each do some work (execs, a file written and read
back), then reports each pod's host memory as `cloudhvctl ps` counts it: the PSS of
the VMM, its helpers (vhost-device-vsock) and the pod's shim daemon. PSS splits pages
shared between processes (the guest's memory, which the VMM and the vsock backend
both map; the daemons' common imports), so pods add up.

It also splits the VMM's PSS into the guest's RAM (the memfd backing it) and the
VMM's own: the RuntimeClass overhead has to cover the guest's whole default memory
(a guest may fill it with page cache) plus the rest, measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from shim.ctl.pods import list_pods, pss_kib
from shim.state import StateStore
from tests.integration.cri import CriClient
from tests.integration.ctr_fixtures import BUSYBOX, containerd_env

REPO = Path(__file__).resolve().parents[1]

HANDLER = "cloudhv"


def guest_ram_kib(pid: int) -> int:
    """PSS of the memfd mappings of a VMM: the guest's RAM it has touched."""
    total = 0
    in_memfd = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            in_memfd = len(fields) >= 6 and fields[5].startswith("/memfd:")
        elif in_memfd and fields[:1] == ["Pss:"]:
            total += int(fields[1])
    return total


def cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=3)
    parser.add_argument("--memory-mib", type=int, default=256)
    parser.add_argument(
        "--free-page-reporting", default="",
        help="on,off: compare QEMU with and without the reporting balloon, one run each",
    )
    parser.add_argument(
        "--tb-size-mib", default="",
        help="QEMU TCG translation cache sizes to compare, one run each (0: QEMU's default)",
    )
    parser.add_argument(
        "--extra-kernel-args", default="",
        help="'|'-separated variants appended to the config's kernel_args, one run each "
        "(an empty variant: the config's own), e.g. '|page_reporting.page_reporting_order=0'",
    )
    args = parser.parse_args()
    extras = args.extra_kernel_args.split("|") if args.extra_kernel_args else [None]
    if len(extras) > 1 or extras[0] is not None:
        for extra in extras:
            print(f"== kernel_args + {extra!r}")
            measure(args, None, None, extra)
        return
    sizes = [int(v) for v in args.tb_size_mib.split(",")] if args.tb_size_mib else [None]
    reporting = [v == "on" for v in args.free_page_reporting.split(",")] if (
        args.free_page_reporting) else [None]
    for tb_size in sizes:
        for report in reporting:
            if tb_size is not None or report is not None:
                print(f"== qemu.tcg_tb_size_mib {tb_size}, free_page_reporting {report}")
            measure(args, tb_size, report)


def measure(
    args: argparse.Namespace, tb_size: int | None, report: bool | None, extra: str | None = None
) -> None:
    overrides: dict[str, object] = {"default_memory_mib": args.memory_mib}
    if extra:
        shipped = json.loads((REPO / "config" / "cloudhv.json").read_text())
        overrides["kernel_args"] = f"{shipped['kernel_args']} {extra}"
    qemu: dict[str, object] = {"accel": os.environ.get("CLOUDHV_ACCEL", "tcg"), "hotplug_slots": 8}
    if tb_size is not None:
        qemu["tcg_tb_size_mib"] = tb_size
    if report is not None:
        qemu["free_page_reporting"] = report
    if len(qemu) > 2:
        overrides["qemu"] = qemu
    with containerd_env(**overrides) as env:
        cri = CriClient(env.containerd.address)
        pb, rt = cri.pb, cri.runtime
        pods = []
        for index in range(args.n):
            config = pb.PodSandboxConfig(
                metadata=pb.PodSandboxMetadata(name=f"o{index}", uid=f"o{index}", namespace="b"),
                hostname=f"o{index}",
                log_directory=str(env.scratch / f"logs-{index}"),
            )
            pod_id = rt.RunPodSandbox(
                pb.RunPodSandboxRequest(config=config, runtime_handler=HANDLER), timeout=180
            ).pod_sandbox_id
            ccfg = pb.ContainerConfig(
                metadata=pb.ContainerMetadata(name="c"), image=pb.ImageSpec(image=BUSYBOX),
                command=["sleep", "3600"], log_path="c.log",
            )
            cid = rt.CreateContainer(pb.CreateContainerRequest(
                pod_sandbox_id=pod_id, config=ccfg, sandbox_config=config), timeout=180
            ).container_id
            rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=180)
            for cmd in (["ls", "-lR", "/"], ["sh", "-c", "head -c 8388608 /dev/zero > /tmp/f; "
                                                 "md5sum /tmp/f; rm /tmp/f"], ["ps"]):
                rt.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=cmd, timeout=60),
                            timeout=120)
            pods.append(pod_id)
        time.sleep(5)
        # Idle CPU: the VMM (guest timers, the agent's health answers), helpers, daemon.
        states = {s.pod_id: s for s in StateStore(env.state_dir).states()}
        pids = {pod: [p.pid for p in (s.vmm, *s.helpers, s.daemon) if p] for pod, s in
                states.items()}
        before = {pod: cpu_ticks(p) for pod, p in pids.items()}
        idle_s = 30.0
        time.sleep(idle_s)
        hz = os.sysconf("SC_CLK_TCK")
        millicores = [(cpu_ticks(p) - before[pod]) / hz / idle_s * 1000 for pod, p in
                      pids.items()]
        views = list_pods(env.state_dir)
        totals, own = [], []
        for view in views:
            state = states[view.pod_id]
            vmm = pss_kib(state.vmm) if state.vmm else 0
            helpers = sum(pss_kib(p) for p in state.helpers)
            daemon = pss_kib(state.daemon) if state.daemon else 0
            guest = guest_ram_kib(state.vmm.pid) if state.vmm else 0
            totals.append(view.host_memory_kib)
            own.append(view.host_memory_kib - guest)
            print(f"pod {view.pod_id[:12]}: {view.memory_mib} MiB VM; host PSS "
                  f"{view.host_memory_kib / 1024:.1f} MiB = VMM {vmm / 1024:.1f} (guest RAM "
                  f"touched {guest / 1024:.1f}) + helpers {helpers / 1024:.1f} + shim daemon "
                  f"{daemon / 1024:.1f}")
        print(f"pods: {len(totals)}; host memory per pod: median "
              f"{statistics.median(totals) / 1024:.1f} MiB, max {max(totals) / 1024:.1f} MiB")
        print(f"beyond the guest's RAM (VMM's own + helpers + daemon): median "
              f"{statistics.median(own) / 1024:.1f} MiB, max {max(own) / 1024:.1f} MiB; "
              f"overhead for a {args.memory_mib} MiB guest: "
              f"{args.memory_mib + max(own) / 1024:.0f} MiB")
        print(f"idle CPU per pod over {idle_s:.0f} s: median {statistics.median(millicores):.0f}"
              f" millicores, max {max(millicores):.0f}")
        for pod_id in pods:
            rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)
            rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)
        cri.close()


if __name__ == "__main__":
    main()

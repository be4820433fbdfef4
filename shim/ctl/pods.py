"""What `cloudhvctl ps` and `console` know about the pods of a host, from the pods'
persisted state and /proc alone: no call into a daemon, so a hung pod still shows."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

from shim.state import POOL_NAMESPACE, PodState, ProcRef, StateStore, pool_store

SANDBOX_ONLY = 1  # a pod's own task id counts in PodState.containers


class PodNotFound(LookupError):
    pass


@dataclass(frozen=True)
class PodView:
    pod_id: str
    namespace: str
    vmm_pid: int  # 0 when no VM runs
    running: bool
    vcpus: int
    memory_mib: int
    containers: int  # app containers, the sandbox not counted
    uptime_s: float  # 0 when no VM runs
    # PSS of the VMM, its helpers (virtiofsd included) and the pod's daemon
    host_memory_kib: int
    state_dir: Path
    vm_dir: Path
    # "adopted": the pod runs in a VM taken from the pool; "ready"/"booting": a pooled
    # VM no pod has taken yet (namespace "(pool)"); "": a VM the pod booted itself.
    pool: str = ""


def list_pods(state_dir: Path, *, now: float | None = None) -> list[PodView]:
    """Every pod of the state dir, then every pooled VM (the node pays for those too)."""
    now = time.time() if now is None else now
    stores = (StateStore(state_dir), pool_store(state_dir))
    return [_view(store, st, now) for store in stores for st in store.states()]


def find_pod(pods: list[PodView], query: str) -> PodView:
    """The pod whose id is `query`, or the only one whose id starts with it."""
    exact = [p for p in pods if p.pod_id == query]
    if len(exact) == 1:
        return exact[0]
    matches = [p for p in pods if p.pod_id.startswith(query)] if query else []
    if len(matches) == 1:
        return matches[0]
    if not matches:
        known = ", ".join(p.pod_id[:12] for p in pods) or "none"
        raise PodNotFound(f"no pod {query!r} (pods: {known})")
    names = ", ".join(f"{p.namespace}/{p.pod_id}" for p in exact or matches)
    raise PodNotFound(f"{query!r} matches several pods: {names}; give more of the id")


def _view(store: StateStore, st: PodState, now: float) -> PodView:
    vmm = st.vmm if st.vmm is not None and st.vmm.alive() else None
    recorded = [
        ProcRef(int(r.host["pid"]), int(r.host.get("start_time", "0") or 0))
        for r in st.resources
        if r.host.get("pid", "").isdigit()
    ]
    procs = [
        p for p in (vmm, *st.helpers, *recorded, st.daemon) if p is not None and p.alive()
    ]
    apps = [c for c in st.containers if c != st.pod_id]
    return PodView(
        pod_id=st.pod_id,
        namespace="(pool)" if st.namespace == POOL_NAMESPACE else st.namespace,
        vmm_pid=vmm.pid if vmm else 0,
        running=vmm is not None,
        vcpus=st.vcpus,
        memory_mib=st.memory_mib,
        containers=len(apps),
        uptime_s=max(0.0, now - st.booted_at) if vmm is not None and st.booted_at else 0.0,
        host_memory_kib=sum(pss_kib(p) for p in procs),
        state_dir=store.pod_dir(st.namespace, st.pod_id),
        vm_dir=Path(st.vm_dir) if st.vm_dir else store.pod_dir(st.namespace, st.pod_id) / "vm",
        pool=st.pool,
    )


def pss_kib(proc: ProcRef) -> int:
    """The process' proportional set size: shared pages (the forked daemons' common
    imports, QEMU's libraries) split between their users, so pods add up."""
    with contextlib.suppress(OSError, ValueError), open(f"/proc/{proc.pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def console_log(pod: PodView) -> Path:
    return pod.vm_dir / "console.log"

"""The pod's VM: its VMM, its agent session, its persisted state, its work dir, its watchers.

The sandbox boots the VM (steps: VMM start, vsock ready, agent connect, guest
setup; a failure at any step stops what was started and names the step), keeps
the pod's state file, and provides what containers and resources need of the pod
(`ContainerContext`, `PodServices`): the agent while the VM runs, the device
manager, and the record book. It watches the VM (whose backend also watches its
helpers), the agent session (shim/session.py) and the guest's OOM kills, and
reports them through the callbacks it was given; it never reaches into the
containers. An agent lost for good fails the pod: the VMM is stopped, and its
exit reports every task exited.

State is written off the event loop (the save fsyncs), one save at a time, in
the order the changes were made.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from shim import sizing
from shim.agent import AgentClient
from shim.background import Background
from shim.cgroups import PodCgroup, cgroup_relpath, hierarchy_roots
from shim.config import Config
from shim.devices import DeviceManager
from shim.errors import ShimError, Unavailable
from shim.hostmount import unmount_under
from shim.network import PodNetwork
from shim.portforward import RELAY_PORT, PortForward
from shim.resource import step
from shim.session import AgentSession
from shim.sharedfs import FsHost, Layout, SharedFs
from shim.spec import PodOptions
from shim.state import PodState, ProcRef, ResourceRecord, StateStore, pod_key
from shim.vmm.base import HostDir, Vmm, VmSpec
from shim.vsock import connect_hybrid_vsock

log = logging.getLogger(__name__)

POLL_S = 30.0  # long-poll length for OOM events
GUEST_CALL_TIMEOUT_S = 10.0

VmmFactory = Callable[[Config, VmSpec], Vmm]
AgentConnect = Callable[[Path, int, float], Awaitable[AgentClient]]


async def connect_agent(socket: Path, port: int, deadline: float) -> AgentClient:
    return await AgentClient.connect(socket, port=port, deadline=deadline)


class Sandbox:
    """One pod's VM and everything the shim keeps about it."""

    def __init__(
        self,
        config: Config,
        state: PodState,
        store: StateStore,
        *,
        vmm_factory: VmmFactory,
        agent_connect: AgentConnect = connect_agent,
        on_vm_exit: Callable[[int], Awaitable[None]],
        on_oom: Callable[[str], None],
        fs_host: FsHost | None = None,
    ) -> None:
        self.config = config
        self.id = state.pod_id
        self._store = store
        self._vmm_factory = vmm_factory
        self._agent_connect = agent_connect
        self._on_vm_exit = on_vm_exit
        self._on_oom = on_oom
        self._state = state.replace(
            work_dir=str(config.disk_dir / pod_key(state.namespace, state.pod_id))
        )
        self._save_lock = asyncio.Lock()
        self._vmm: Vmm | None = None
        self._devices: DeviceManager | None = None
        self._session: AgentSession | None = None
        self._cgroup: PodCgroup | None = None
        # Directory volumes go over virtio-fs unless the config turns it off.
        if fs_host is None and config.virtiofs.enabled:
            fs_host = FsHost(config.virtiofs)
        self._fs_host = fs_host
        self._shared_fs: SharedFs | None = None
        self._network: PodNetwork | None = None
        self._portfwd: PortForward | None = None
        self._vm_exit: int | None = None
        self._stopping = False  # the VM is being stopped on purpose
        self._stop_task: asyncio.Task[None] | None = None
        self._watchers = Background(f"pod-{self.id}")
        self.failure = ""  # why the pod failed, if it did

    def bind(
        self, on_vm_exit: Callable[[int], Awaitable[None]], on_oom: Callable[[str], None]
    ) -> None:
        """Report to another owner (a pooled VM's pod, once it took the VM)."""
        self._on_vm_exit, self._on_oom = on_vm_exit, on_oom

    # -- persisted state -----------------------------------------------------------------

    @property
    def state(self) -> PodState:
        return self._state

    @property
    def namespace(self) -> str:
        return self._state.namespace

    @property
    def store(self) -> StateStore:
        return self._store

    @property
    def work_dir(self) -> Path:
        return Path(self._state.work_dir)

    async def update(self, change: Callable[[PodState], PodState]) -> None:
        """Write `change(state)` (in order, off the loop). The change is computed under
        the lock, from the latest state, and takes effect only once written: what the
        shim holds never runs ahead of what `delete` would find."""
        async with self._save_lock:
            state = change(self._state)
            await asyncio.to_thread(self._store.save, state)
            self._state = state

    async def save(self, **changes: Any) -> None:
        await self.update(lambda state: state.replace(**changes))

    async def record(self, record: ResourceRecord) -> None:
        def change(st: PodState) -> PodState:
            if any(r.id == record.id for r in st.resources):
                return st.replace(
                    resources=tuple(record if r.id == record.id else r for r in st.resources)
                )
            return st.replace(resources=(*st.resources, record))

        await self.update(change)

    async def adopt(self, pid: int) -> None:
        if self._cgroup is not None:
            await self._cgroup.adopt(pid)

    async def forget(self, record_id: str) -> None:
        await self.update(
            lambda st: st.replace(resources=tuple(r for r in st.resources if r.id != record_id))
        )

    # -- the running VM ------------------------------------------------------------------

    @property
    def booted(self) -> bool:
        """A VM was started and not stopped on purpose (it may have died since)."""
        return self._vmm is not None

    @property
    def running(self) -> bool:
        return self._vmm is not None and self._vm_exit is None

    @property
    def vmm_pid(self) -> int:
        return self._vmm.pid if self._vmm is not None else 0

    def live_agent(self) -> AgentClient | None:
        if self._session is None or not self.running:
            return None
        return self._session.live()

    async def wait_agent(self) -> AgentClient | None:
        """The agent, waiting through a reconnect; None once the VM or the agent is gone."""
        session = self._session
        if session is None or not self.running:
            return None
        return await session.wait()

    def live_devices(self) -> DeviceManager | None:
        return self._devices if self.running else None

    @property
    def shared_fs(self) -> SharedFs | None:
        """The pod's virtio-fs while the VM runs; None without one (config off)."""
        return self._shared_fs if self.running else None

    @property
    def pod_files(self) -> Mapping[str, str]:
        """containerd's per-pod files (resolv.conf, hosts) -> the guest's copy of each."""
        return dict(self._network.pod_files) if self._network is not None else {}

    def require_agent(self) -> AgentClient:
        agent = self.live_agent()
        if agent is None:
            why = f": {self.failure}" if self.failure else ""
            raise Unavailable(f"pod {self.id}: the VM is not running{why}")
        return agent

    async def wait_vm(self) -> int:
        """Until the VM is gone; its exit status (-1 if there never was one)."""
        vmm = self._vmm
        return await vmm.wait() if vmm is not None else -1

    # -- boot and stop -------------------------------------------------------------------

    def size(self, annotations: dict[str, str]) -> sizing.VmSize:
        return vm_size(self.config, annotations, self.id)

    async def boot(self, size: sizing.VmSize, hostname: str, pod: PodOptions | None = None) -> None:
        """Start the VM and bring its agent up, its processes in the pod's cgroup, then
        give it the pod's identity. On failure nothing of it is left running."""
        pod = pod or PodOptions()
        await self.start_vm(size, pod.cgroups_path)
        await self.join(hostname, pod)

    async def start_vm(self, size: sizing.VmSize, cgroups_path: str = "") -> None:
        """Start the VM up to its agent answering: no hostname, NIC or disk of a pod yet
        (a pooled VM stops here until a pod takes it). On failure nothing is left."""
        vm_dir = self._store.pod_dir(self.namespace, self.id) / "vm"
        spec = VmSpec(
            state_dir=vm_dir,
            kernel=self.config.kernel_path,
            rootfs=self.config.rootfs_path,
            kernel_args=f"{self.config.kernel_args} {size.kernel_params}".strip(),
            vcpus=size.vcpus,
            max_vcpus=size.max_vcpus,
            memory_mib=size.memory_mib,
            host_dirs=(
                HostDir(self.work_dir, writable=True),
                HostDir(self.config.cache_dir, writable=False),
            ),
        )
        await self.save(
            vm_dir=str(vm_dir), vcpus=size.vcpus, memory_mib=size.memory_mib, booted_at=time.time()
        )
        # No VM means no disk in use: anything in the work dir is a dead pod's garbage.
        await asyncio.to_thread(_clear_dir, self.work_dir)
        self._vm_exit = None
        self._stopping = False
        self.failure = ""
        started = time.monotonic()
        try:
            await self.join_cgroup(cgroups_path)
            if self._fs_host is not None:
                root = self._store.pod_dir(self.namespace, self.id) / "fs"
                self._shared_fs = SharedFs(Layout(root), self._fs_host)
                await self._shared_fs.attach_host(self)
                spec = dataclasses.replace(spec, shared_fs=self._shared_fs.spec)
            kernel = await self._start(spec)
        except BaseException as err:
            await self._failed(err)
        vmm = self._vmm
        assert vmm is not None
        log.info(
            "event=vm_ready pod=%s vmm_pid=%d vcpus=%d memory_mib=%d kernel=%s boot_ms=%d",
            self.id, vmm.pid, size.vcpus, size.memory_mib, kernel,
            (time.monotonic() - started) * 1000,
        )
        self._watchers.spawn(self._watch_vm(vmm), "vm-watch")
        self._watchers.spawn(self._watch_oom(), "oom-watch")

    async def join_cgroup(self, cgroups_path: str) -> None:
        """The sandbox's cgroup, with every VMM process already running moved into it."""
        self._cgroup = PodCgroup(cgroup_relpath(cgroups_path), hierarchy_roots())
        await self._cgroup.attach(self)
        state = self._state
        pids = [ref.pid for ref in (state.vmm, *state.helpers) if ref is not None]
        pids += [int(r.host["pid"]) for r in state.resources if r.host.get("pid", "").isdigit()]
        for pid in pids:
            await self._cgroup.adopt(pid)

    async def join(self, hostname: str, pod: PodOptions) -> None:
        """Give the running VM its pod: clock, hostname, DNS and hosts, sysctls, shared
        fs, network, port forwarding. On failure the VM is stopped."""
        started = time.monotonic()
        try:
            vmm, agent = self._vmm, self.require_agent()
            assert vmm is not None
            await step("guest setup", self._setup_guest(agent, hostname, pod))
            if self._shared_fs is not None:
                await self._shared_fs.attach_guest(self)
            if pod.netns:
                # After SetupPod, which writes the guest's default hosts file.
                self._network = PodNetwork(pod.netns, hostname, resolv_conf=pod.resolv_conf)
                await step("network", self._network.attach(self))

                async def dial_relay() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
                    until = asyncio.get_running_loop().time() + GUEST_CALL_TIMEOUT_S
                    return await connect_hybrid_vsock(vmm.agent_socket, RELAY_PORT, deadline=until)

                self._portfwd = PortForward(pod.netns, dial_relay)
                await step("port forward", self._portfwd.attach(self))
        except BaseException as err:
            await self._failed(err)
        log.info("event=vm_joined pod=%s join_ms=%d", self.id, (time.monotonic() - started) * 1000)

    async def _failed(self, err: BaseException) -> None:
        await self.stop()
        if isinstance(err, ShimError):
            raise type(err)(f"pod {self.id}: {err}") from err
        raise err

    async def rekey(self, store: StateStore, **identity: Any) -> None:
        """Become another pod's sandbox (a pooled VM taken by a pod): the state is written
        under the new identity first, then the old state file goes. The VM's files stay
        where they are, recorded as the pool origin, and go with the pod."""
        old_store, old = self._store, self._state
        origin = old_store.pod_dir(old.namespace, old.pod_id)
        async with self._save_lock:
            state = old.replace(**identity, pool="adopted", pool_dir=str(origin))
            await asyncio.to_thread(store.save, state)
            self._state, self._store, self.id = state, store, state.pod_id
        await asyncio.to_thread(old_store.forget, old.namespace, old.pod_id)

    async def _start(self, spec: VmSpec) -> str:
        vmm = self._vmm_factory(self.config, spec)
        self._vmm = vmm
        await step("VMM start", vmm.start(self._record_process))
        self._devices = DeviceManager(vmm, vmm.hotplug_slots)
        deadline = asyncio.get_running_loop().time() + self.config.agent_startup_timeout_s
        await step("vsock ready", vmm.wait_vsock_ready(deadline))
        port = self.config.agent_port
        session = AgentSession(
            self.id,
            lambda until: self._agent_connect(vmm.agent_socket, port, until),
            self._agent_lost,
            reconnect_s=self.config.agent_reconnect_timeout_s,
            health_interval_s=self.config.agent_health_interval_s,
            health_timeout_s=self.config.agent_health_interval_s,
            health_misses=self.config.agent_health_misses,
        )
        self._session = session
        agent = await step("agent connect", session.open(deadline))
        info = await step("guest info", agent.guest_info(timeout=GUEST_CALL_TIMEOUT_S))
        return info.kernel_release

    async def _record_process(self, role: str, pid: int, start_time: int) -> None:
        """Persist each VMM process as it is spawned: a crash right after leaves no orphan."""
        ref = ProcRef(pid, start_time)
        if role == "vmm":
            await self.save(vmm=ref)
        else:
            await self.update(lambda st: st.replace(helpers=(*st.helpers, ref)))
        if self._cgroup is not None:
            await self._cgroup.adopt(pid)

    async def _setup_guest(self, agent: AgentClient, hostname: str, pod: PodOptions) -> None:
        # The guest's clock starts from the RTC (whole seconds): exit times and
        # what containers print should agree with the host's.
        await agent.set_time(timeout=GUEST_CALL_TIMEOUT_S)
        # The VM's hostname is the pod's: the pod's uts namespace and every
        # container's own start as a copy of the agent's.
        await agent.setup_pod(
            hostname,
            sysctls=pod.sysctls,
            node_pid=pod.node_pid,
            node_ipc=pod.node_ipc,
            timeout=GUEST_CALL_TIMEOUT_S,
        )

    async def stop(self) -> None:
        """Stop the VM and its helpers, then forget them. Idempotent.

        The work runs in a task of its own, shielded: a caller cancelled half-way (a
        ttrpc deadline, containerd going away) cannot leave the VM running with its
        handle forgotten. The handle is dropped only once the VMM is gone.
        """
        task = self._stop_task
        if task is None or task.done():
            task = self._stop_task = asyncio.get_running_loop().create_task(
                self._stop(), name=f"pod-{self.id}:stop"
            )
        await asyncio.shield(task)

    async def _stop(self) -> None:
        self._stopping = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        vmm = self._vmm
        if vmm is not None:
            try:
                await vmm.shutdown(timeout=5.0)
            except Exception as err:
                log.error("event=vm_shutdown_failed pod=%s error=%r", self.id, str(err))
        self._vmm = None
        self._devices = None
        shared_fs, self._shared_fs = self._shared_fs, None
        if shared_fs is not None:  # after the VMM: virtiofsd serves it to the end
            await shared_fs.detach(self)
        await self.save(vmm=None, helpers=(), booted_at=0.0)
        portfwd, self._portfwd = self._portfwd, None
        if portfwd is not None:
            await portfwd.detach(self)
        network, self._network = self._network, None
        if network is not None:
            await network.detach(self)  # the VM is gone: the host side only
        cgroup, self._cgroup = self._cgroup, None
        if cgroup is not None:
            await cgroup.detach(self)

    def _agent_lost(self, reason: str) -> None:
        """The agent is gone for good while the VMM may live on: fail the pod."""
        self.failure = reason
        self._watchers.spawn(self._fail(), "fail")

    async def _fail(self) -> None:
        vmm = self._vmm
        if vmm is None or self._stopping:
            return
        log.error("event=pod_failed pod=%s reason=%r", self.id, self.failure)
        # Killing the VMM makes its watcher report every task exited.
        await vmm.shutdown(timeout=1.0)

    async def close(self) -> None:
        """Daemon exit: stop the watchers and the VM, remove what the pod left on the host."""
        await self._watchers.aclose()
        await self.stop()
        await asyncio.to_thread(_clear_dir, self.work_dir)

    # -- watchers ------------------------------------------------------------------------

    async def _watch_vm(self, vmm: Vmm) -> None:
        status = await vmm.wait()
        if self._vmm is not None and self._vmm is not vmm:
            return  # an older VM of this pod; a new one runs now
        self._vm_exit = status
        if not self._stopping:
            log.error("event=vm_exited_unexpectedly pod=%s status=%d", self.id, status)
        if self._session is not None:
            await self._session.close()
        await self._on_vm_exit(status)

    async def _watch_oom(self) -> None:
        """Forward the guest's OOM kills, for as long as there is an agent."""
        while True:
            agent = await self.wait_agent()
            if agent is None:
                return
            try:
                container_id = await agent.get_oom_event(timeout=POLL_S)
            except Unavailable:
                continue  # the session decides whether the agent comes back
            except ShimError as err:
                log.warning("event=oom_poll_failed pod=%s error=%r", self.id, str(err))
                await asyncio.sleep(1.0)
                continue
            if container_id:
                self._on_oom(container_id)


def vm_size(config: Config, annotations: dict[str, str], pod_id: str = "") -> sizing.VmSize:
    """The VM's size; raises InvalidArgument (naming the key) before anything exists."""
    size = sizing.vm_size(
        config, annotations, os.cpu_count() or 1, host_memory_mib=_host_memory_mib()
    )
    ignored = sizing.ignored_annotations(annotations)
    if ignored:
        log.debug("event=annotations_ignored pod=%s keys=%s", pod_id, ",".join(ignored))
    return size


def _host_memory_mib() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise OSError("MemTotal missing from /proc/meminfo")


def _clear_dir(path: Path) -> None:
    unmount_under([path])
    shutil.rmtree(path, ignore_errors=True)

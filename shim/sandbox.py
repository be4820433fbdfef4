"""The pod's VM: its VMM, its agent session, its persisted state, its work dir, its watchers.

The sandbox boots the VM (steps: VMM start, vsock ready, agent connect, guest
setup; a failure at any step stops what was started and names the step), keeps
the pod's state file, and provides what containers and resources need of the pod
(`ContainerContext`, `PodServices`): the agent while the VM runs, the device
manager, and the record book. It watches the VM and the guest's OOM kills, and
reports them through the callbacks it was given; it never reaches into the
containers.

State is written off the event loop (the save fsyncs), one save at a time, in
the order the changes were made.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from shim import sizing
from shim.agent import AgentClient
from shim.background import Background
from shim.config import Config
from shim.devices import DeviceManager
from shim.errors import ShimError, Unavailable
from shim.hostmount import unmount_under
from shim.resource import step
from shim.spec import PodOptions
from shim.state import PodState, ProcRef, ResourceRecord, StateStore, pod_key
from shim.vmm.base import Vmm, VmSpec

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
        self._agent: AgentClient | None = None
        self._vm_exit: int | None = None
        self._stopping = False  # the VM is being stopped on purpose
        self._watchers = Background(f"pod-{self.id}")

    # -- persisted state -----------------------------------------------------------------

    @property
    def state(self) -> PodState:
        return self._state

    @property
    def namespace(self) -> str:
        return self._state.namespace

    @property
    def work_dir(self) -> Path:
        return Path(self._state.work_dir)

    async def save(self, **changes: Any) -> None:
        """Write the state with `changes` (in order, off the loop); they take effect only
        once written, so what the shim holds never runs ahead of what `delete` would find."""
        async with self._save_lock:
            state = self._state.replace(**changes) if changes else self._state
            await asyncio.to_thread(self._store.save, state)
            self._state = state

    async def record(self, record: ResourceRecord) -> None:
        await self.save(resources=(*self._state.resources, record))

    async def forget(self, record_id: str) -> None:
        await self.save(resources=tuple(r for r in self._state.resources if r.id != record_id))

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
        agent = self._agent
        if agent is None or agent.closed or self._vm_exit is not None:
            return None
        return agent

    def live_devices(self) -> DeviceManager | None:
        return self._devices if self.running else None

    def require_agent(self) -> AgentClient:
        agent = self.live_agent()
        if agent is None:
            raise Unavailable(f"pod {self.id}: the VM is not running")
        return agent

    async def wait_vm(self) -> int:
        """Until the VM is gone; its exit status (-1 if there never was one)."""
        vmm = self._vmm
        return await vmm.wait() if vmm is not None else -1

    # -- boot and stop -------------------------------------------------------------------

    def size(self, annotations: dict[str, str]) -> sizing.VmSize:
        """The VM's size; raises InvalidArgument (naming the key) before anything exists."""
        size = sizing.vm_size(self.config, annotations, os.cpu_count() or 1)
        ignored = sizing.ignored_annotations(annotations)
        if ignored:
            log.debug("event=annotations_ignored pod=%s keys=%s", self.id, ",".join(ignored))
        return size

    async def boot(self, size: sizing.VmSize, hostname: str, pod: PodOptions | None = None) -> None:
        """Start the VM and bring its agent up. On failure nothing of it is left running."""
        vm_dir = self._store.pod_dir(self.namespace, self.id) / "vm"
        spec = VmSpec(
            state_dir=vm_dir,
            kernel=self.config.kernel_path,
            rootfs=self.config.rootfs_path,
            kernel_args=f"{self.config.kernel_args} {size.kernel_params}".strip(),
            vcpus=size.vcpus,
            max_vcpus=size.max_vcpus,
            memory_mib=size.memory_mib,
        )
        await self.save(vm_dir=str(vm_dir))
        # No VM means no disk in use: anything in the work dir is a dead pod's garbage.
        await asyncio.to_thread(_clear_dir, self.work_dir)
        self._vm_exit = None
        self._stopping = False
        started = time.monotonic()
        try:
            agent, info = await self._start(spec, hostname, pod or PodOptions())
        except BaseException as err:
            await self.stop()
            if isinstance(err, ShimError):
                raise type(err)(f"pod {self.id}: {err}") from err
            raise
        vmm = self._vmm
        assert vmm is not None
        log.info(
            "event=vm_ready pod=%s vmm_pid=%d vcpus=%d memory_mib=%d kernel=%s boot_ms=%d",
            self.id, vmm.pid, size.vcpus, size.memory_mib, info,
            (time.monotonic() - started) * 1000,
        )
        self._watchers.spawn(self._watch_vm(vmm), "vm-watch")
        self._watchers.spawn(self._watch_oom(agent), "oom-watch")

    async def _start(self, spec: VmSpec, hostname: str, pod: PodOptions) -> tuple[AgentClient, str]:
        vmm = self._vmm_factory(self.config, spec)
        self._vmm = vmm
        procs = await step("VMM start", vmm.start())
        await self.save(
            vmm=ProcRef(procs.vmm_pid, procs.vmm_start_time),
            helpers=tuple(ProcRef(pid, st) for pid, st in procs.helper_pids),
        )
        self._devices = DeviceManager(vmm, vmm.hotplug_slots)
        deadline = asyncio.get_running_loop().time() + self.config.agent_startup_timeout_s
        await step("vsock ready", vmm.wait_vsock_ready(deadline))
        self._agent = await step(
            "agent connect", self._agent_connect(vmm.agent_socket, self.config.agent_port, deadline)
        )
        setup = self._setup_guest(self._agent, hostname, pod)
        return self._agent, await step("guest setup", setup)

    async def _setup_guest(self, agent: AgentClient, hostname: str, pod: PodOptions) -> str:
        info = await agent.guest_info(timeout=GUEST_CALL_TIMEOUT_S)
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
        return info.kernel_release

    async def stop(self) -> None:
        """Stop the VM and its helpers, then forget them. Idempotent."""
        self._stopping = True
        agent, self._agent = self._agent, None
        if agent is not None:
            with contextlib.suppress(Exception):
                await agent.close()
        vmm = self._vmm
        if vmm is not None:
            try:
                await vmm.shutdown(timeout=5.0)
            except Exception as err:
                log.error("event=vm_shutdown_failed pod=%s error=%r", self.id, str(err))
        self._vmm = None
        self._devices = None
        await self.save(vmm=None, helpers=())

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
        await self._on_vm_exit(status)

    async def _watch_oom(self, agent: AgentClient) -> None:
        """Forward the guest's OOM kills, for as long as the agent is up."""
        while not agent.closed:
            try:
                container_id = await agent.get_oom_event(timeout=POLL_S)
            except Unavailable:
                return
            except ShimError as err:
                log.warning("event=oom_poll_failed pod=%s error=%r", self.id, str(err))
                await asyncio.sleep(1.0)
                continue
            if container_id:
                self._on_oom(container_id)


def _clear_dir(path: Path) -> None:
    unmount_under([path])
    shutil.rmtree(path, ignore_errors=True)

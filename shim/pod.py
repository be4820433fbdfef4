"""One pod: its VM, its agent connection, its containers and their processes.

The pod decides nothing about the wire protocol (task.py does) and keeps the
state machines in process.py honest: every RPC checks the process' state first,
then does the I/O, then transitions. Resources are owned here, recorded in the
persisted state before they are created and forgotten only after removal.

A CRI sandbox task *is* the VM (its pid is the VMM pid, its exit is the VM's
exit). A task without CRI annotations is a pod of one: its VM boots at Create
and stops when the task is deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shim import cri_mounts, sizing
from shim import rootfs as rootfs_mod
from shim import spec as spec_mod
from shim.agent import AgentClient, ContainerStats
from shim.config import Config
from shim.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ShimError,
    Unavailable,
)
from shim.events import (
    Publisher,
    TaskCreate,
    TaskDelete,
    TaskExecAdded,
    TaskExecStarted,
    TaskExit,
    TaskOOM,
    TaskPaused,
    TaskResumed,
    TaskStart,
)
from shim.process import Exit, Process, State, signal_status
from shim.rootfs import Mount
from shim.state import DiskRecord, PodState, ProcRef, StateStore, pod_key
from shim.stdio import Guest, ProcessIO, StdioSpec
from shim.vmm.base import DiskSpec, Vmm, VmmError, VmSpec

log = logging.getLogger(__name__)

GUEST_DISK_ROOT = "/run/cloudhv/disks"
POLL_S = 30.0  # long-poll length for waits and output reads
DRAIN_TIMEOUT_S = 5.0  # after an exit, how long output may keep flowing
VM_GONE_STATUS = 255  # a process whose VM died (as containerd reports dead shims)

VmmFactory = Callable[[Config, VmSpec], Vmm]
AgentConnect = Callable[[Path, int, float], Awaitable[AgentClient]]


async def connect_agent(socket: Path, port: int, deadline: float) -> AgentClient:
    return await AgentClient.connect(socket, port=port, deadline=deadline)


def disk_id_for(container_id: str) -> str:
    """A VMM device id and virtio serial (≤20 bytes, starts with a letter) for a container."""
    return "c" + hashlib.sha256(container_id.encode()).hexdigest()[:15]


# -- plain data in and out ----------------------------------------------------------------


@dataclass(frozen=True)
class CreateTask:
    id: str
    bundle: str
    rootfs: tuple[Mount, ...]
    stdio: StdioSpec


@dataclass(frozen=True)
class ExecTask:
    container_id: str
    exec_id: str
    stdio: StdioSpec
    process_json: bytes


@dataclass(frozen=True)
class ProcessStatus:
    id: str
    exec_id: str
    bundle: str
    pid: int
    state: State
    stdio: StdioSpec
    exit: Exit | None


class _Tasks:
    """Owner of background tasks: `aclose()` cancels and awaits every one."""

    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=f"{self._owner}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("event=task_failed task=%s", task.get_name(), exc_info=task.exception())

    async def aclose(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


class _Proc:
    """A process plus what the pod keeps for it: its IO and its spec."""

    def __init__(self, process: Process, io: ProcessIO | None, process_json: bytes = b"") -> None:
        self.process = process
        self.io = io
        self.process_json = process_json
        self.exit_published = False
        self.pending_size: tuple[int, int] | None = None  # (rows, cols) asked for before start


class Container:
    def __init__(
        self,
        task: CreateTask,
        kind: spec_mod.TaskKind,
        init: _Proc,
        disk: DiskRecord | None,
        *,
        spec_mounts: tuple[Mapping[str, Any], ...] = (),
        mount_plan: cri_mounts.MountPlan | None = None,
    ) -> None:
        self.id = task.id
        self.task = task
        self.kind = kind
        self.init = init
        self.disk = disk
        # The spec's mounts as containerd gave them, and what was copied for them:
        # an Update scans the host again and copies what changed.
        self.spec_mounts = spec_mounts
        self.mount_plan = mount_plan
        self.execs: dict[str, _Proc] = {}
        self.kill_signal = 0
        self.tasks = _Tasks(f"container-{task.id}")

    @property
    def is_sandbox(self) -> bool:
        return self.kind is spec_mod.TaskKind.SANDBOX

    @property
    def guest_root(self) -> str:
        return f"{GUEST_DISK_ROOT}/{self.disk.id}" if self.disk else ""


class Pod:
    def __init__(
        self,
        config: Config,
        pod_id: str,
        namespace: str,
        store: StateStore,
        publisher: Publisher,
        *,
        vmm_factory: VmmFactory,
        agent_connect: AgentConnect = connect_agent,
        state: PodState | None = None,
    ) -> None:
        self.config = config
        self.id = pod_id
        self.namespace = namespace
        self._store = store
        self._events = publisher
        self._vmm_factory = vmm_factory
        self._agent_connect = agent_connect
        self._state = state or PodState(pod_id=pod_id, namespace=namespace)
        self._state = self._state.replace(work_dir=str(config.disk_dir / pod_key(pod_id)))
        self._vmm: Vmm | None = None
        self._agent: AgentClient | None = None
        self._vm_exit: int | None = None
        self._stopping = False  # the VM is being stopped on purpose
        self._closed = False  # the daemon is exiting
        self._lock = asyncio.Lock()  # boot, container set, teardown
        self.containers: dict[str, Container] = {}
        self._tasks = _Tasks(f"pod-{pod_id}")
        self._save()

    # -- state ---------------------------------------------------------------------------

    @property
    def state(self) -> PodState:
        return self._state

    def _save(self, **changes: Any) -> None:
        if changes:
            self._state = self._state.replace(**changes)
        self._store.save(self._state)

    @property
    def vmm_pid(self) -> int:
        return self._vmm.pid if self._vmm is not None else 0

    @property
    def empty(self) -> bool:
        return not self.containers

    def _work_dir(self) -> Path:
        return Path(self._state.work_dir)

    # -- lookup --------------------------------------------------------------------------

    def container(self, container_id: str) -> Container:
        found = self.containers.get(container_id)
        if found is None:
            raise NotFound(f"container {container_id} not found")
        return found

    def _proc(self, container_id: str, exec_id: str) -> tuple[Container, _Proc]:
        ctr = self.container(container_id)
        if not exec_id:
            return ctr, ctr.init
        found = ctr.execs.get(exec_id)
        if found is None:
            raise NotFound(f"exec {exec_id} of container {container_id} not found")
        return ctr, found

    def _require_agent(self) -> AgentClient:
        if self._agent is None or self._agent.closed or self._vm_exit is not None:
            raise Unavailable(f"pod {self.id}: the VM is not running")
        return self._agent

    # -- VM ------------------------------------------------------------------------------

    def _size(self, annotations: Mapping[str, str]) -> sizing.VmSize:
        """The VM's size; raises InvalidArgument (naming the key) before anything exists."""
        size = sizing.vm_size(self.config, annotations, os.cpu_count() or 1)
        ignored = sizing.ignored_annotations(annotations)
        if ignored:
            log.debug("event=annotations_ignored pod=%s keys=%s", self.id, ",".join(ignored))
        return size

    async def _boot(
        self, size: sizing.VmSize, hostname: str, pod: spec_mod.PodOptions | None = None
    ) -> None:
        vm_dir = self._store.pod_dir(self.id) / "vm"
        vcpus, memory = size.vcpus, size.memory_mib
        spec = VmSpec(
            state_dir=vm_dir,
            kernel=self.config.kernel_path,
            rootfs=self.config.rootfs_path,
            kernel_args=f"{self.config.kernel_args} {size.kernel_params}".strip(),
            vcpus=vcpus,
            max_vcpus=size.max_vcpus,
            memory_mib=memory,
        )
        self._save(vm_dir=str(vm_dir))
        # No VM means no disk in use: anything in the work dir is a dead pod's garbage.
        rootfs_mod.unmount_under([self._work_dir()])
        shutil.rmtree(self._work_dir(), ignore_errors=True)
        self._vm_exit = None
        self._stopping = False
        vmm = self._vmm_factory(self.config, spec)
        started = time.monotonic()
        try:
            procs = await vmm.start()
        except VmmError as err:
            raise Unavailable(f"pod {self.id}: boot VM: {err}") from err
        self._vmm = vmm
        self._save(
            vmm=ProcRef(procs.vmm_pid, procs.vmm_start_time),
            helpers=tuple(ProcRef(pid, st) for pid, st in procs.helper_pids),
        )
        launched = time.monotonic()
        try:
            deadline = asyncio.get_running_loop().time() + self.config.agent_startup_timeout_s
            await vmm.wait_vsock_ready(deadline)
            agent = await self._agent_connect(vmm.agent_socket, self.config.agent_port, deadline)
            self._agent = agent
            info = await agent.guest_info(timeout=10)
            # The guest's clock starts from the RTC (whole seconds): exit times and
            # what containers print should agree with the host's.
            await agent.set_time(timeout=10)
            # The VM's hostname is the pod's: every container's own uts namespace
            # starts as a copy of the agent's.
            pod = pod or spec_mod.PodOptions()
            await agent.setup_pod(
                hostname,
                sysctls=pod.sysctls,
                node_pid=pod.node_pid,
                node_ipc=pod.node_ipc,
                timeout=10,
            )
        except BaseException as err:
            await self._stop_vm()
            if isinstance(err, InvalidArgument):
                raise InvalidArgument(f"pod {self.id}: {err}") from err
            if isinstance(err, ShimError):
                raise Unavailable(f"pod {self.id}: agent did not come up: {err}") from err
            raise
        log.info(
            "event=vm_ready pod=%s vmm_pid=%d vcpus=%d memory_mib=%d kernel=%s "
            "launch_ms=%d agent_ms=%d",
            self.id, vmm.pid, vcpus, memory, info.kernel_release,
            (launched - started) * 1000, (time.monotonic() - launched) * 1000,
        )
        self._tasks.spawn(self._watch_vm(vmm), "vm-watch")
        self._tasks.spawn(self._watch_oom(agent), "oom-watch")

    async def _watch_oom(self, agent: AgentClient) -> None:
        """Forward the guest's OOM kills as TaskOOM events, for as long as the agent is up."""
        while not agent.closed:
            try:
                container_id = await agent.get_oom_event(timeout=POLL_S)
            except Unavailable:
                return
            except ShimError as err:
                log.warning("event=oom_poll_failed pod=%s error=%r", self.id, str(err))
                await asyncio.sleep(1.0)
                continue
            if container_id and container_id in self.containers:
                log.info("event=oom pod=%s container=%s", self.id, container_id)
                self._events.publish(TaskOOM(container_id))

    async def _watch_vm(self, vmm: Vmm) -> None:
        status = await vmm.wait()
        if self._vmm is not None and self._vmm is not vmm:
            return  # an older VM of this pod; a new one runs now
        self._vm_exit = status
        if not self._stopping:
            log.error("event=vm_exited_unexpectedly pod=%s status=%d", self.id, status)
        # Everything that ran in the VM is gone with it.
        for ctr in list(self.containers.values()):
            if ctr.is_sandbox:
                continue  # its own waiter reports it, with the kill signal if any
            procs = [ctr.init, *ctr.execs.values()]
            for proc in procs:
                if proc.process.state in (State.RUNNING, State.PAUSED):
                    await self._finish(ctr, proc, VM_GONE_STATUS, time.time_ns())

    async def _stop_vm(self) -> None:
        """Stop the VM and its helpers; forget them. Idempotent."""
        self._stopping = True
        agent, self._agent = self._agent, None
        if agent is not None:
            with contextlib.suppress(Exception):
                await agent.close()
        vmm, self._vmm = self._vmm, None
        if vmm is not None:
            try:
                await vmm.shutdown(timeout=5.0)
            except Exception as err:
                log.error("event=vm_shutdown_failed pod=%s error=%r", self.id, str(err))
        self._save(vmm=None, helpers=())

    # -- create --------------------------------------------------------------------------

    async def create(self, task: CreateTask) -> int:
        try:
            spec = spec_mod.read_spec(Path(task.bundle) / "config.json")
            annotations = spec_mod.annotations_of(spec)
            # No pod hostname: runc leaves the new UTS namespace as it was, the node's.
            hostname = spec_mod.hostname_of(spec) or os.uname().nodename
            pod_options = spec_mod.pod_options(spec)
        except spec_mod.SpecError as err:
            raise InvalidArgument(f"create {task.id}: {err}") from err
        identity = spec_mod.identify(task.id, annotations)
        if identity.kind is not spec_mod.TaskKind.SANDBOX:
            pod_options = spec_mod.PodOptions()  # a container's sysctls are crun's to set
        if identity.pod_id != self.id:
            raise InvalidArgument(
                f"create {task.id}: it belongs to pod {identity.pod_id}, this shim serves {self.id}"
            )
        async with self._lock:
            if task.id in self.containers:
                raise AlreadyExists(f"container {task.id} already exists")
            if self._closed:
                raise FailedPrecondition(f"pod {self.id} is shutting down")
            apps = sum(1 for c in self.containers.values() if not c.is_sandbox)
            limit = self.config.max_containers_per_vm
            if identity.kind is not spec_mod.TaskKind.SANDBOX and apps >= limit:
                raise ResourceExhausted(
                    f"pod {self.id} already runs {apps} containers: "
                    f"max_containers_per_vm is {limit}"
                )
            if identity.kind is spec_mod.TaskKind.CONTAINER and self._vmm is None:
                raise FailedPrecondition(
                    f"create {task.id}: sandbox {self.id} has no running VM (create it first)"
                )
            size = self._size(annotations) if self._vmm is None else None
            self._save(
                containers=(*self._state.containers, task.id),
                bundles={**self._state.bundles, task.id: task.bundle},
            )
            try:
                if size is not None:
                    await self._boot(size, hostname, pod_options)
                if identity.kind is spec_mod.TaskKind.SANDBOX:
                    ctr = Container(task, identity.kind, _Proc(Process(task.id), None), None)
                else:
                    ctr = await self._create_container(task, identity.kind, spec)
            except BaseException:
                self._save(
                    containers=tuple(c for c in self._state.containers if c != task.id),
                    bundles={k: v for k, v in self._state.bundles.items() if k != task.id},
                )
                if not self.containers:
                    await self._stop_vm()
                raise
            ctr.init.process.pid = self.vmm_pid
            self.containers[task.id] = ctr
        self._events.publish(
            TaskCreate(
                container_id=task.id,
                bundle=task.bundle,
                rootfs=task.rootfs,
                stdin=task.stdio.stdin,
                stdout=task.stdio.stdout,
                stderr=task.stdio.stderr,
                terminal=task.stdio.terminal,
                pid=self.vmm_pid,
            )
        )
        return self.vmm_pid

    async def _create_container(
        self, task: CreateTask, kind: spec_mod.TaskKind, spec: dict[str, Any]
    ) -> Container:
        assert self._vmm is not None
        agent = self._require_agent()
        # Mounts first: one that cannot be honoured is refused before any disk exists.
        try:
            spec_mounts = spec_mod.mounts_of(spec)
        except spec_mod.SpecError as err:
            raise InvalidArgument(f"create {task.id}: {err}") from err
        plan = cri_mounts.plan_mounts(task.id, spec_mounts, cri_mounts.scan_mounts(spec_mounts))
        for note in plan.notes:
            log.info("event=mount_note pod=%s container=%s note=%r", self.id, task.id, note)
        disk_id = disk_id_for(task.id)
        image = self._work_dir() / f"{disk_id}.ext4"
        scratch = self._work_dir() / "mnt" / disk_id
        disk = DiskRecord(disk_id, str(image), task.id)
        target = f"{GUEST_DISK_ROOT}/{disk_id}"
        self._save(disks=(*self._state.disks, disk))
        plugged = mounted = created = False
        io = ProcessIO(task.stdio, task.id, self.namespace)
        t0 = time.monotonic()
        try:
            await io.open()
            size = await rootfs_mod.build_image(
                task.rootfs, image, scratch, headroom_mib=self.config.container_disk_headroom_mib
            )
            t1 = time.monotonic()
            await self._vmm.add_disk(DiskSpec(id=disk_id, path=image, serial=disk_id))
            plugged = True
            await agent.mount_disk(disk_id, target, fstype="ext4", wait=10.0)
            mounted = True
            t2 = time.monotonic()
            await self._copy_into_guest(agent, plan.copies)
            spec_json = json.dumps({**spec, "mounts": list(plan.mounts)}).encode()
            t3 = time.monotonic()
            await agent.create_container(
                task.id,
                spec_json,
                target,
                terminal=task.stdio.terminal,
                stdin=bool(task.stdio.stdin),
            )
            created = True
        except BaseException as err:
            await io.close()
            await self._remove_disk(agent, disk, target, plugged=plugged, mounted=mounted)
            if isinstance(err, rootfs_mod.RootfsError):
                raise InvalidArgument(f"create {task.id}: rootfs: {err}") from err
            if isinstance(err, VmmError):
                raise Unavailable(f"create {task.id}: {err}") from err
            raise
        finally:
            if not created:
                log.info("event=container_create_failed pod=%s container=%s", self.id, task.id)
        log.info(
            "event=container_created pod=%s container=%s disk=%s disk_mib=%d rootfs_ms=%d "
            "plug_mount_ms=%d copies=%d copy_ms=%d create_ms=%d",
            self.id, task.id, disk_id, size >> 20, (t1 - t0) * 1000, (t2 - t1) * 1000,
            len(plan.copies), (t3 - t2) * 1000, (time.monotonic() - t3) * 1000,
        )
        return Container(
            task,
            kind,
            _Proc(Process(task.id), io),
            disk,
            spec_mounts=tuple(spec_mounts),
            mount_plan=plan,
        )

    @staticmethod
    async def _copy_into_guest(
        agent: AgentClient, copies: Sequence[cri_mounts.FileCopy]
    ) -> None:
        """Send the plan's copies in order (every directory before what it holds)."""
        for c in copies:
            if c.symlink_target is not None:
                data = c.symlink_target.encode()
            elif c.is_dir:
                data = b""
            else:
                data = cri_mounts.read_copy(c)
            await agent.copy_file(
                c.guest_path,
                data,
                mode=c.mode,
                uid=c.uid,
                gid=c.gid,
                is_dir=c.is_dir,
                is_symlink=c.symlink_target is not None,
            )

    async def _remove_disk(
        self,
        agent: AgentClient | None,
        disk: DiskRecord,
        target: str,
        *,
        plugged: bool,
        mounted: bool,
    ) -> None:
        """Undo a container disk in reverse order; the host image always goes."""
        vm_up = agent is not None and not agent.closed and self._vm_exit is None
        if mounted and vm_up and agent is not None:
            try:
                await agent.unmount_disk(target)
            except ShimError as err:
                log.warning("event=guest_unmount_failed disk=%s error=%r", disk.id, str(err))
        if plugged and self._vmm is not None and self._vm_exit is None:
            try:
                await self._vmm.remove_disk(disk.id)
            except (VmmError, OSError, TimeoutError) as err:
                log.warning("event=unplug_failed disk=%s error=%r", disk.id, str(err))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(disk.path)
        self._save(disks=tuple(d for d in self._state.disks if d.id != disk.id))

    # -- start / exec --------------------------------------------------------------------

    def _guest(self, agent: AgentClient, container_id: str, exec_id: str) -> Guest:
        async def read_stdout() -> tuple[bytes, bool]:
            out = await agent.read_stdout(container_id, exec_id, timeout=POLL_S)
            return out.data, out.eof

        async def read_stderr() -> tuple[bytes, bool]:
            out = await agent.read_stderr(container_id, exec_id, timeout=POLL_S)
            return out.data, out.eof

        async def write_stdin(data: bytes) -> int:
            return await agent.write_stdin(container_id, exec_id, data)

        async def close_stdin() -> None:
            await agent.close_stdin(container_id, exec_id)

        return Guest(read_stdout, read_stderr, write_stdin, close_stdin)

    async def start(self, container_id: str, exec_id: str) -> int:
        ctr, proc = self._proc(container_id, exec_id)
        process = proc.process
        async with process.lock:
            process.check("start")
            if ctr.is_sandbox:
                process.transition(State.RUNNING)
                self._events.publish(TaskStart(container_id, process.pid))
                ctr.tasks.spawn(self._wait_sandbox(ctr), "wait")
                return process.pid
            agent = self._require_agent()
            if exec_id:
                await agent.exec_process(
                    container_id,
                    exec_id,
                    proc.process_json,
                    terminal=proc.io.spec.terminal if proc.io else False,
                    stdin=bool(proc.io and proc.io.has_stdin),
                )
            else:
                await agent.start_container(container_id)
            if proc.pending_size is not None:
                await self._apply_pending_size(agent, proc)
            if proc.io is not None:
                proc.io.start(self._guest(agent, container_id, exec_id))
            process.transition(State.RUNNING)
            if exec_id:
                self._events.publish(TaskExecStarted(container_id, exec_id, process.pid))
            else:
                self._events.publish(TaskStart(container_id, process.pid))
            # Only now may an exit be published: the start event is queued before it.
            ctr.tasks.spawn(self._wait_process(ctr, proc), f"wait-{exec_id or 'init'}")
            return process.pid

    async def _apply_pending_size(self, agent: AgentClient, proc: _Proc) -> None:
        """A resize that came before start: the process runs anyway if it fails."""
        assert proc.pending_size is not None
        rows, cols = proc.pending_size
        process = proc.process
        try:
            await agent.resize_tty(process.container_id, process.exec_id, rows=rows, cols=cols)
        except ShimError as err:
            log.warning("event=resize_failed process=%r error=%r", process.name, str(err))
            return
        if proc.io is not None:
            proc.io.window_sized()

    async def exec(self, task: ExecTask) -> None:
        ctr = self.container(task.container_id)
        if ctr.is_sandbox:
            raise FailedPrecondition(f"cannot exec in sandbox {ctr.id}: it has no processes")
        ctr.init.process.check("exec")
        if task.exec_id in ctr.execs:
            raise AlreadyExists(f"exec {task.exec_id} of container {ctr.id} already exists")
        io = ProcessIO(task.stdio, task.container_id, self.namespace)
        await io.open()
        process = Process(task.container_id, task.exec_id)
        process.pid = self.vmm_pid
        ctr.execs[task.exec_id] = _Proc(process, io, task.process_json)
        self._events.publish(TaskExecAdded(task.container_id, task.exec_id))

    # -- exits ---------------------------------------------------------------------------

    async def _wait_process(self, ctr: Container, proc: _Proc) -> None:
        process = proc.process
        backoff = 0.05
        while True:
            if self._vm_exit is not None or self._agent is None:
                status, at = VM_GONE_STATUS, time.time_ns()
                break
            try:
                result = await self._agent.wait_process(
                    process.container_id, process.exec_id, timeout=POLL_S
                )
            except Unavailable:
                # The agent connection is gone: the VM is going down (the agent is
                # PID 1), and the VM watcher is about to record that.
                await asyncio.sleep(0.1)
                continue
            except ShimError as err:
                log.warning("event=wait_failed process=%r error=%r", process.name, str(err))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            if result is not None:
                status, at = result.exit_status, result.exited_at or time.time_ns()
                break
        await self._finish(ctr, proc, status, at)

    async def _wait_sandbox(self, ctr: Container) -> None:
        if self._vmm is not None:
            await self._vmm.wait()
        status = signal_status(ctr.kill_signal) if ctr.kill_signal else VM_GONE_STATUS
        await self._finish(ctr, ctr.init, status, time.time_ns())

    async def _finish(self, ctr: Container, proc: _Proc, status: int, at_ns: int) -> None:
        """Record an exit once: flush output, then the exit event, then wake waiters."""
        if proc.exit_published:
            return
        proc.exit_published = True
        if proc.io is not None:
            if not await proc.io.drain(DRAIN_TIMEOUT_S):
                log.warning("event=stdio_drain_timeout process=%r", proc.process.name)
            await proc.io.close()
        process = proc.process
        self._events.publish(
            TaskExit(
                container_id=process.container_id,
                id=process.exec_id or process.container_id,
                pid=process.pid,
                exit_status=status,
                exited_at_ns=at_ns,
            )
        )
        process.set_exited(status, at_ns)
        log.info(
            "event=process_exited pod=%s container=%s exec=%s status=%d",
            self.id, process.container_id, process.exec_id, status,
        )

    async def wait(self, container_id: str, exec_id: str) -> Exit:
        _, proc = self._proc(container_id, exec_id)
        return await proc.process.wait()

    # -- signals -------------------------------------------------------------------------

    async def kill(self, container_id: str, exec_id: str, signal: int, all_: bool) -> None:
        ctr, proc = self._proc(container_id, exec_id)
        process = proc.process
        async with process.lock:
            process.check("kill")
            if ctr.is_sandbox:
                # The sandbox is the VM: any signal sent to it stops the VM.
                ctr.kill_signal = signal
                await self._stop_vm()
                await self._finish(ctr, proc, signal_status(signal), time.time_ns())
                return
            agent = self._require_agent()
            await agent.signal_process(container_id, exec_id, signal, all_processes=all_)
            if process.state is State.CREATED:
                # Never started: nothing in the guest will report an exit for us.
                await self._finish(ctr, proc, signal_status(signal), time.time_ns())

    # -- delete --------------------------------------------------------------------------

    async def delete(self, container_id: str, exec_id: str) -> Exit:
        ctr, proc = self._proc(container_id, exec_id)
        process = proc.process
        async with process.lock:
            process.check("delete")
            exit_ = process.exit or Exit(0, time.time_ns())
            if exec_id:
                if proc.io is not None:
                    await proc.io.close()
                if process.state is State.STOPPED and proc.exit_published:
                    await self._forget_exec(container_id, exec_id)
                process.mark_deleted()
                del ctr.execs[exec_id]
                self._events.publish(
                    TaskDelete(container_id, process.pid, exit_.status, exit_.at_ns, id=exec_id)
                )
                return exit_
            if ctr.execs and any(
                e.process.state is State.RUNNING for e in ctr.execs.values()
            ):
                raise FailedPrecondition(
                    f"cannot delete container {container_id}: exec processes are still running"
                )
            if ctr.is_sandbox and any(not c.is_sandbox for c in self.containers.values()):
                raise FailedPrecondition(
                    f"cannot delete sandbox {container_id}: its pod still has containers"
                )
            async with self._lock:
                # The pod's last task takes the VM with it: no need to unplug first.
                last = all(c is ctr for c in self.containers.values())
                await self._teardown_container(ctr, vm_going=last)
                process.mark_deleted()
                self.containers.pop(container_id, None)
                self._save(
                    containers=tuple(c for c in self._state.containers if c != container_id),
                    bundles={k: v for k, v in self._state.bundles.items() if k != container_id},
                )
        self._events.publish(TaskDelete(container_id, process.pid, exit_.status, exit_.at_ns))
        return exit_

    async def _forget_exec(self, container_id: str, exec_id: str) -> None:
        """Have the agent drop an exited exec (its status, its output buffers)."""
        agent = self._agent
        if agent is None or agent.closed or self._vm_exit is not None:
            return  # the VM took it along
        try:
            await agent.remove_process(container_id, exec_id)
        except NotFound:
            pass  # never reached the guest (its start failed), or already gone
        except ShimError as err:
            log.warning(
                "event=guest_remove_process_failed pod=%s container=%s exec=%s error=%r",
                self.id, container_id, exec_id, str(err),
            )

    async def _teardown_container(self, ctr: Container, *, vm_going: bool) -> None:
        await ctr.tasks.aclose()
        for proc in (ctr.init, *ctr.execs.values()):
            if proc.io is not None:
                await proc.io.close()
        ctr.execs.clear()
        if vm_going:
            await self._stop_vm()
        if ctr.disk is None:
            return
        agent = self._agent if self._vm_exit is None else None
        if agent is not None and not agent.closed:
            try:
                await agent.remove_container(ctr.id, force=True)
            except ShimError as err:
                log.warning("event=guest_remove_failed container=%s error=%r", ctr.id, str(err))
        await self._remove_disk(agent, ctr.disk, ctr.guest_root, plugged=True, mounted=True)

    # -- the rest of the task API ----------------------------------------------------------

    def status(self, container_id: str, exec_id: str) -> ProcessStatus:
        ctr, proc = self._proc(container_id, exec_id)
        stdio = proc.io.spec if proc.io is not None else ctr.task.stdio
        return ProcessStatus(
            id=container_id,
            exec_id=exec_id,
            bundle=ctr.task.bundle,
            pid=proc.process.pid,
            state=proc.process.state,
            stdio=stdio,
            exit=proc.process.exit,
        )

    async def pause(self, container_id: str) -> None:
        ctr = self.container(container_id)
        process = ctr.init.process
        async with process.lock:
            process.check("pause")
            if not ctr.is_sandbox:
                await self._require_agent().pause_container(container_id)
            process.transition(State.PAUSED)
        self._events.publish(TaskPaused(container_id))

    async def resume(self, container_id: str) -> None:
        ctr = self.container(container_id)
        process = ctr.init.process
        async with process.lock:
            process.check("resume")
            if not ctr.is_sandbox:
                await self._require_agent().resume_container(container_id)
            process.transition(State.RUNNING)
        self._events.publish(TaskResumed(container_id))

    async def pids(self, container_id: str) -> tuple[int, ...]:
        ctr = self.container(container_id)
        ctr.init.process.check("pids")
        if ctr.is_sandbox or ctr.init.process.state is State.STOPPED:
            return (self.vmm_pid,) if ctr.is_sandbox and self.vmm_pid else ()
        return await self._require_agent().list_processes(container_id)

    async def stats(self, container_id: str) -> ContainerStats | None:
        ctr = self.container(container_id)
        ctr.init.process.check("stats")
        if ctr.is_sandbox or ctr.init.process.state is State.STOPPED:
            return None
        return await self._require_agent().stats_container(container_id)

    async def update(self, container_id: str, resources_json: bytes | None) -> None:
        """Apply new limits in the guest, then refresh the copies of the container's mounts."""
        ctr = self.container(container_id)
        ctr.init.process.check("update")
        if ctr.is_sandbox:
            return  # the VM keeps the size it booted with
        agent = self._require_agent()
        if resources_json is not None:
            await agent.update_container(container_id, resources_json)
        if ctr.mount_plan is None or not ctr.mount_plan.copies:
            return
        # CRI refreshes ConfigMap/Secret-style mounts on update: copy what changed.
        try:
            plan = cri_mounts.plan_mounts(
                ctr.id, ctr.spec_mounts, cri_mounts.scan_mounts(ctr.spec_mounts)
            )
            changed = cri_mounts.changed_copies(ctr.mount_plan, plan)
            await self._copy_into_guest(agent, changed)
        except ShimError as err:
            applied = "the new resources are applied, but " if resources_json else ""
            raise type(err)(
                f"update {container_id}: {applied}refreshing its mounts failed: {err}"
            ) from err
        ctr.mount_plan = plan
        if changed:
            log.info(
                "event=mounts_refreshed pod=%s container=%s copies=%d",
                self.id, container_id, len(changed),
            )

    async def resize_pty(self, container_id: str, exec_id: str, width: int, height: int) -> None:
        ctr, proc = self._proc(container_id, exec_id)
        io = proc.io
        if io is None or not io.spec.terminal:
            raise FailedPrecondition(f"{proc.process.name} has no terminal")
        async with proc.process.lock:  # a start in flight finishes first
            proc.process.check("resize")
            if proc.process.state is State.CREATED:
                proc.pending_size = (height, width)  # no TTY yet: start applies it
                return
            await self._require_agent().resize_tty(container_id, exec_id, rows=height, cols=width)
        io.window_sized()

    async def close_io(self, container_id: str, exec_id: str, stdin: bool) -> None:
        _, proc = self._proc(container_id, exec_id)
        proc.process.check("closeio")
        if stdin and proc.io is not None:
            await proc.io.close_stdin()

    # -- teardown ------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop everything this pod owns (daemon exit). Idempotent."""
        self._closed = True
        async with self._lock:
            for ctr in list(self.containers.values()):
                await ctr.tasks.aclose()
                for proc in (ctr.init, *ctr.execs.values()):
                    if proc.io is not None:
                        await proc.io.close()
            await self._tasks.aclose()
            await self._stop_vm()
            for disk in self._state.disks:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(disk.path)
            self._save(disks=())
            rootfs_mod.unmount_under([self._work_dir()])
            shutil.rmtree(self._work_dir(), ignore_errors=True)

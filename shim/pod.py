"""One pod as the task service sees it: a sandbox (the VM) and the tasks running in it.

A facade: it finds the task an RPC is about, holds the pod-wide rules (which pod
a task belongs to, how many containers a VM takes, when the VM boots and when it
goes), and hands everything else to the task (shim/container.py) or the sandbox
(shim/sandbox.py). A CRI sandbox task *is* the VM; a task without CRI
annotations is a pod of one, whose VM boots at Create and stops when the task
is deleted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

from shim import bundle
from shim import spec as spec_mod
from shim.config import Config
from shim.container import AppContainer, SandboxTask, Task, spec_error
from shim.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from shim.events import Publisher, TaskCreate, TaskDelete, TaskOOM
from shim.rootfs.root import ContainerRootfs
from shim.rootfs.shared import PodImages
from shim.sandbox import AgentConnect, Sandbox, VmmFactory, connect_agent
from shim.sharedfs import FsHost
from shim.state import PodState, StateStore
from shim.types import ContainerStats, CreateTask, ExecTask, Exit, ProcessStatus

log = logging.getLogger(__name__)


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
        fs_host: FsHost | None = None,
        sandbox: Sandbox | None = None,
    ) -> None:
        self.config = config
        self.id = pod_id
        self.namespace = namespace
        self._events = publisher
        if sandbox is not None:  # a pooled VM this pod took, booted and joined already
            sandbox.bind(self._vm_exited, self._oom)
        self.sandbox = sandbox or Sandbox(
            config,
            state or PodState(pod_id=pod_id, namespace=namespace),
            store,
            vmm_factory=vmm_factory,
            agent_connect=agent_connect,
            on_vm_exit=self._vm_exited,
            on_oom=self._oom,
            fs_host=fs_host,
        )
        self.images = PodImages.from_config(config, store.pod_dir(namespace, pod_id))
        self._closed = False  # the daemon is exiting
        self._lock = asyncio.Lock()  # boot, container set, teardown
        self.containers: dict[str, Task] = {}

    async def open(self) -> None:
        """Persist the pod's state once, before any RPC."""
        await self.sandbox.save()

    @property
    def state(self) -> PodState:
        return self.sandbox.state

    @property
    def vmm_pid(self) -> int:
        return self.sandbox.vmm_pid

    @property
    def empty(self) -> bool:
        return not self.containers

    def container(self, container_id: str) -> Task:
        found = self.containers.get(container_id)
        if found is None:
            raise NotFound(f"container {container_id} not found")
        return found

    # -- what the sandbox reports ----------------------------------------------------------

    async def _vm_exited(self, status: int) -> None:
        del status
        for task in list(self.containers.values()):
            await task.vm_gone()

    def _oom(self, container_id: str) -> None:
        if container_id in self.containers:
            log.info("event=oom pod=%s container=%s", self.id, container_id)
            self._events.publish(TaskOOM(container_id))

    # -- create and delete -----------------------------------------------------------------

    async def create(self, task: CreateTask) -> int:
        try:
            spec = spec_mod.read_spec(Path(task.bundle) / "config.json")
            annotations = spec_mod.annotations_of(spec)
            # No pod hostname: runc leaves the new UTS namespace as it was, the node's.
            hostname = spec_mod.hostname_of(spec) or os.uname().nodename
            identity = spec_mod.identify(task.id, annotations)
            # A container's sysctls are crun's to set; its cgroup is the VM's when it
            # is a pod of its own.
            pod_options = spec_mod.PodOptions(cgroups_path=spec_mod.cgroups_path_of(spec))
            if identity.kind is spec_mod.TaskKind.SANDBOX:
                pod_options = spec_mod.pod_options(spec)
            elif identity.kind is spec_mod.TaskKind.STANDALONE:
                # A pod of one gets its VM's network from its own spec, as a sandbox would.
                pod_options = spec_mod.PodOptions(
                    cgroups_path=spec_mod.cgroups_path_of(spec), netns=spec_mod.netns_of(spec)
                )
        except spec_mod.SpecError as err:
            raise spec_error(task.id, err) from err
        if identity.pod_id != self.id:
            raise InvalidArgument(
                f"create {task.id}: it belongs to pod {identity.pod_id}, this shim serves {self.id}"
            )
        async with self._lock:
            self._check_room(task, identity.kind)
            await asyncio.to_thread(
                bundle.record_state_dir, Path(task.bundle), self.id, str(self.config.state_dir)
            )
            sandbox = self.sandbox
            size = sandbox.size(annotations) if not sandbox.booted else None
            await sandbox.save(
                containers=(*sandbox.state.containers, task.id),
                bundles={**sandbox.state.bundles, task.id: task.bundle},
            )
            try:
                if size is not None:
                    await sandbox.boot(size, hostname, pod_options)
                created = await self._new_task(task, identity.kind, spec)
            except BaseException:
                await self._forget_task(task.id)
                if not self.containers:
                    await sandbox.stop()
                raise
            created.init.process.pid = self.vmm_pid
            self.containers[task.id] = created
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

    def _check_room(self, task: CreateTask, kind: spec_mod.TaskKind) -> None:
        if task.id in self.containers:
            raise AlreadyExists(f"container {task.id} already exists")
        if self._closed:
            raise FailedPrecondition(f"pod {self.id} is shutting down")
        apps = sum(1 for c in self.containers.values() if not c.is_sandbox)
        limit = self.config.max_containers_per_vm
        if kind is not spec_mod.TaskKind.SANDBOX and apps >= limit:
            raise ResourceExhausted(
                f"pod {self.id} already runs {apps} containers: max_containers_per_vm is {limit}"
            )
        if kind is spec_mod.TaskKind.CONTAINER and not self.sandbox.booted:
            raise FailedPrecondition(
                f"create {task.id}: sandbox {self.id} has no running VM (create it first)"
            )

    async def _new_task(
        self, task: CreateTask, kind: spec_mod.TaskKind, spec: dict[str, object]
    ) -> Task:
        if kind is spec_mod.TaskKind.SANDBOX:
            return SandboxTask(
                task,
                self.sandbox,
                self._events.publish,
                wait_vm=self.sandbox.wait_vm,
                stop_vm=self.sandbox.stop,
            )
        rootfs = ContainerRootfs.for_task(task, spec, self.config, self.images)
        return await AppContainer.create(
            task, kind, spec, self.sandbox, self._events.publish, rootfs=rootfs
        )

    async def _forget_task(self, task_id: str) -> None:
        state = self.sandbox.state
        await self.sandbox.save(
            containers=tuple(c for c in state.containers if c != task_id),
            bundles={k: v for k, v in state.bundles.items() if k != task_id},
        )

    async def delete(self, container_id: str, exec_id: str) -> Exit:
        ctr = self.container(container_id)
        if exec_id:
            pid = ctr.proc(exec_id).process.pid
            exit_ = await ctr.delete_exec(exec_id)
            self._events.publish(
                TaskDelete(container_id, pid, exit_.status, exit_.at_ns, id=exec_id)
            )
            return exit_
        process = ctr.init.process
        async with process.lock:
            if isinstance(ctr, AppContainer):
                ctr.check_deletable()
            else:
                process.check("delete")
                if any(not c.is_sandbox for c in self.containers.values()):
                    raise FailedPrecondition(
                        f"cannot delete sandbox {container_id}: its pod still has containers"
                    )
            exit_ = process.exit or Exit(0, time.time_ns())
            async with self._lock:
                # The pod's last task takes the VM with it: no need to unplug first.
                if all(c is ctr for c in self.containers.values()):
                    await self.sandbox.stop()
                await ctr.teardown()
                process.mark_deleted()
                self.containers.pop(container_id, None)
                await self._forget_task(container_id)
        self._events.publish(TaskDelete(container_id, process.pid, exit_.status, exit_.at_ns))
        return exit_

    # -- the rest of the task API, per task --------------------------------------------------

    def status(self, container_id: str, exec_id: str) -> ProcessStatus:
        return self.container(container_id).status(exec_id)

    async def start(self, container_id: str, exec_id: str) -> int:
        return await self.container(container_id).start(exec_id)

    async def exec(self, task: ExecTask) -> None:
        await self.container(task.container_id).exec(task)

    async def wait(self, container_id: str, exec_id: str) -> Exit:
        return await self.container(container_id).wait(exec_id)

    async def kill(self, container_id: str, exec_id: str, signal: int, all_: bool) -> None:
        await self.container(container_id).kill(exec_id, signal, all_)

    async def pause(self, container_id: str) -> None:
        await self.container(container_id).pause()

    async def resume(self, container_id: str) -> None:
        await self.container(container_id).resume()

    async def pids(self, container_id: str) -> tuple[int, ...]:
        return await self.container(container_id).pids()

    async def stats(self, container_id: str) -> ContainerStats | None:
        return await self.container(container_id).stats()

    async def update(self, container_id: str, resources_json: bytes | None) -> None:
        await self.container(container_id).update(resources_json)

    async def resize_pty(self, container_id: str, exec_id: str, width: int, height: int) -> None:
        await self.container(container_id).resize_pty(exec_id, width, height)

    async def close_io(self, container_id: str, exec_id: str, stdin: bool) -> None:
        await self.container(container_id).close_io(exec_id, stdin)

    # -- teardown ------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop everything this pod owns (daemon exit). Idempotent."""
        self._closed = True
        async with self._lock:
            await self.sandbox.stop()
            for ctr in list(self.containers.values()):
                await ctr.teardown()  # with the VM gone, only host undos remain
            await self.sandbox.close()

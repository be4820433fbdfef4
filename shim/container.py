"""A container and its processes: state machines, create/start/wait/exit, I/O wiring.

Two kinds of task live in a pod, with the same methods:

- `AppContainer`: a container crun runs in the guest. Its root filesystem, copied
  mounts and shared directory volumes are resources it owns (shim/rootfs/root.py,
  shim/volumes.py, shim/sharedfs.py); its init
  and exec processes each have a `ContainerProcess` (state machine + host stdio).
- `SandboxTask`: CRI's pause container, which *is* the VM: its pid is the VMM's,
  it exits when the VM does, and a signal sent to it stops the VM.

Every RPC checks the process' state first, then does the I/O, then transitions.
An exit is published once, after the process' output has been written out.
What a container needs of its pod comes through `ContainerContext` (the
sandbox implements it): containers never reach into the sandbox's internals.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from shim import spec as spec_mod
from shim.agent import AgentClient
from shim.background import Background
from shim.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ShimError,
    Unavailable,
)
from shim.events import (
    Event,
    TaskExecAdded,
    TaskExecStarted,
    TaskExit,
    TaskPaused,
    TaskResumed,
    TaskStart,
)
from shim.process import Process
from shim.resource import PodServices, step
from shim.rootfs.root import ContainerRootfs
from shim.sharedfs import SharedFs, SharedVolumes
from shim.stdio import Guest, ProcessIO
from shim.types import (
    ContainerStats,
    CreateTask,
    ExecTask,
    Exit,
    ProcessStatus,
    State,
    signal_status,
)
from shim.volumes import MountCopies

log = logging.getLogger(__name__)

POLL_S = 30.0  # long-poll length for process waits
# Output reads poll shorter: after an exit, the pump switches to short reads at its
# next turn (a read in flight is never cut: it may carry bytes).
OUTPUT_POLL_S = 5.0
DRAIN_NOTICE_S = 30  # after an exit, how often to log that output is still flowing
VM_GONE_STATUS = 255  # a process whose VM died (as containerd reports dead shims)


class ContainerContext(PodServices, Protocol):
    """What a container uses of its pod: the resource services plus these."""

    @property
    def namespace(self) -> str:
        """The containerd namespace (loggers and events carry it)."""

    @property
    def vmm_pid(self) -> int:
        """The VMM's pid: every task of the pod reports it as its own."""

    def require_agent(self) -> AgentClient:
        """The agent, or Unavailable when the VM is not running."""

    @property
    def shared_fs(self) -> SharedFs | None:
        """The pod's virtio-fs, where directory volumes are bound; None without one."""

    async def wait_agent(self) -> AgentClient | None:
        """The agent, waiting through a reconnect; None once the VM or agent is gone."""

    @property
    def pod_files(self) -> Mapping[str, str]:
        """containerd's per-pod files (resolv.conf, hosts) -> the guest's shared copy."""


Publish = Callable[[Event], None]  # queues an event for containerd, in order


class ContainerProcess:
    """A process plus what the container keeps for it: its IO and its spec."""

    def __init__(self, process: Process, io: ProcessIO | None, process_json: bytes = b"") -> None:
        self.process = process
        self.io = io
        self.process_json = process_json
        self.exit_published = False
        self.pending_size: tuple[int, int] | None = None  # (rows, cols) asked for before start
        self.opening = False  # an exec whose stdio is still being opened


class _Task:
    """What every task of a pod has: an id, its create request, its init process."""

    def __init__(
        self, task: CreateTask, kind: spec_mod.TaskKind, ctx: ContainerContext, publish: Publish
    ) -> None:
        self.id = task.id
        self.task = task
        self.kind = kind
        self._ctx = ctx
        self._publish = publish
        self.init = ContainerProcess(Process(task.id), None)
        self.execs: dict[str, ContainerProcess] = {}
        self.tasks = Background(f"container-{task.id}")

    @property
    def is_sandbox(self) -> bool:
        return self.kind is spec_mod.TaskKind.SANDBOX

    def proc(self, exec_id: str) -> ContainerProcess:
        if not exec_id:
            return self.init
        found = self.execs.get(exec_id)
        if found is None:
            raise NotFound(f"exec {exec_id} of container {self.id} not found")
        return found

    def status(self, exec_id: str) -> ProcessStatus:
        proc = self.proc(exec_id)
        stdio = proc.io.spec if proc.io is not None else self.task.stdio
        return ProcessStatus(
            id=self.id,
            exec_id=exec_id,
            bundle=self.task.bundle,
            pid=proc.process.pid,
            state=proc.process.state,
            stdio=stdio,
            exit=proc.process.exit,
        )

    async def wait(self, exec_id: str) -> Exit:
        return await self.proc(exec_id).process.wait()

    async def finish(self, proc: ContainerProcess, status: int, at_ns: int) -> None:
        """Record an exit once: flush output, then the exit event, then wake waiters."""
        if proc.exit_published:
            return
        proc.exit_published = True
        if proc.io is not None:
            # However slow the reader, the output goes out before the exit is reported:
            # dropping it would make a log end early while the exit says "done".
            proc.io.process_exited()
            while not await proc.io.drain(DRAIN_NOTICE_S):
                log.warning(
                    "event=stdio_drain_waiting process=%r after_s=%d: the reader is slow",
                    proc.process.name, DRAIN_NOTICE_S,
                )
            await proc.io.close()
        process = proc.process
        self._publish(
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
            "event=process_exited container=%s exec=%s status=%d",
            process.container_id, process.exec_id, status,
        )

    async def close_io_all(self) -> None:
        """Stop every pump and host fd of this task (teardown)."""
        await self.tasks.aclose()
        for proc in (self.init, *self.execs.values()):
            if proc.io is not None:
                await proc.io.close()

    async def _pause_resume(self, op: str, to: State, event: Event) -> None:
        process = self.init.process
        async with process.lock:
            process.check(op)
            if not self.is_sandbox:
                agent = self._ctx.require_agent()
                await (agent.pause_container if op == "pause" else agent.resume_container)(self.id)
            process.transition(to)
        self._publish(event)

    async def pause(self) -> None:
        await self._pause_resume("pause", State.PAUSED, TaskPaused(self.id))

    async def resume(self) -> None:
        await self._pause_resume("resume", State.RUNNING, TaskResumed(self.id))


class SandboxTask(_Task):
    """CRI's pause container: the VM itself. Nothing runs in the guest for it."""

    def __init__(
        self,
        task: CreateTask,
        ctx: ContainerContext,
        publish: Publish,
        *,
        wait_vm: Callable[[], Awaitable[int]],
        stop_vm: Callable[[], Awaitable[None]],
    ) -> None:
        super().__init__(task, spec_mod.TaskKind.SANDBOX, ctx, publish)
        self._wait_vm = wait_vm
        self._stop_vm = stop_vm
        self.kill_signal = 0

    async def start(self, exec_id: str) -> int:
        process = self.proc(exec_id).process
        async with process.lock:
            process.check("start")
            process.transition(State.RUNNING)
            self._publish(TaskStart(self.id, process.pid))
            self.tasks.spawn(self._wait(), "wait")
            return process.pid

    async def _wait(self) -> None:
        await self._wait_vm()
        status = signal_status(self.kill_signal) if self.kill_signal else VM_GONE_STATUS
        await self.finish(self.init, status, time.time_ns())

    async def exec(self, task: ExecTask) -> None:
        raise FailedPrecondition(f"cannot exec in sandbox {self.id}: it has no processes")

    async def kill(self, exec_id: str, signal: int, all_: bool) -> None:
        proc = self.proc(exec_id)
        async with proc.process.lock:
            proc.process.check("kill")
            # The sandbox is the VM: any signal sent to it stops the VM.
            self.kill_signal = signal
            await self._stop_vm()
            await self.finish(proc, signal_status(signal), time.time_ns())

    async def delete_exec(self, exec_id: str) -> Exit:
        raise NotFound(f"exec {exec_id} of container {self.id} not found")

    async def teardown(self) -> None:
        await self.close_io_all()

    async def pids(self) -> tuple[int, ...]:
        self.init.process.check("pids")
        return (self._ctx.vmm_pid,) if self._ctx.vmm_pid else ()

    async def stats(self) -> ContainerStats | None:
        self.init.process.check("stats")
        return None  # the VM has no cgroup of its own in the guest

    async def update(self, resources_json: bytes | None) -> None:
        self.init.process.check("update")  # the VM keeps the size it booted with

    async def resize_pty(self, exec_id: str, width: int, height: int) -> None:
        raise FailedPrecondition(f"{self.proc(exec_id).process.name} has no terminal")

    async def close_io(self, exec_id: str, stdin: bool) -> None:
        self.proc(exec_id).process.check("closeio")

    async def vm_gone(self) -> None:
        """Its own waiter reports the VM's exit, with the kill signal if any."""


class AppContainer(_Task):
    """A container run by crun in the pod's VM."""

    def __init__(
        self,
        task: CreateTask,
        kind: spec_mod.TaskKind,
        ctx: ContainerContext,
        publish: Publish,
        *,
        rootfs: ContainerRootfs,
        copies: MountCopies,
        volumes: SharedVolumes,
    ) -> None:
        super().__init__(task, kind, ctx, publish)
        self.rootfs = rootfs
        self.copies = copies
        self.volumes = volumes
        # In a PID namespace it does not own (the pod's, or the VM's), a container's
        # processes do not die with its init: they are killed when it exits, as
        # containerd's runc shim does.
        self.kill_all_on_exit = False

    @classmethod
    async def create(
        cls,
        task: CreateTask,
        kind: spec_mod.TaskKind,
        spec: Mapping[str, Any],
        ctx: ContainerContext,
        publish: Publish,
        *,
        rootfs: ContainerRootfs,
    ) -> AppContainer:
        """Everything `crun create` needs, then `crun create`. On failure nothing stays."""
        agent = ctx.require_agent()
        try:
            spec_mounts = spec_mod.mounts_of(spec)
        except spec_mod.SpecError as err:
            raise spec_error(task.id, err) from err
        shared_fs = ctx.shared_fs
        copies = MountCopies(
            task.id,
            spec_mounts,
            ctx.pod_files,
            shared_root=shared_fs.guest_root if shared_fs else None,
        )
        # Mounts first: one that cannot be honoured is refused before any disk exists.
        await copies.plan()
        volumes = SharedVolumes(task.id, copies.shares)
        self = cls(task, kind, ctx, publish, rootfs=rootfs, copies=copies, volumes=volumes)
        self.kill_all_on_exit = not spec_mod.owns_pid_namespace(spec)
        io = ProcessIO(task.stdio, task.id, ctx.namespace)
        try:
            await step("stdio", io.open())
            guest_root = await rootfs.attach(ctx)
            t0 = time.monotonic()
            await volumes.attach(ctx, shared_fs)
            t1 = time.monotonic()
            await copies.attach(agent)
            t2 = time.monotonic()
            spec_json = json.dumps({**spec, "mounts": list(copies.mounts)}).encode()
            await step(
                "crun create",
                agent.create_container(
                    task.id,
                    spec_json,
                    guest_root.path,
                    upper_dir=guest_root.upper_dir,
                    work_dir=guest_root.work_dir,
                    upper_tmpfs_mib=guest_root.upper_tmpfs_mib,
                    terminal=task.stdio.terminal,
                    stdin=bool(task.stdio.stdin),
                ),
            )
        except BaseException as err:
            log.info("event=container_create_failed container=%s error=%r", task.id, str(err))
            await io.close()
            await self._remove_from_guest()
            await volumes.detach(ctx)
            await rootfs.detach(ctx)
            if isinstance(err, ShimError):
                raise type(err)(f"create {task.id}: {err}") from err
            raise
        self.init.io = io
        log.info(
            "event=container_created container=%s disks=%s %s shares=%d share_ms=%d "
            "copies=%d copy_ms=%d create_ms=%d",
            task.id, ",".join(rootfs.disk_ids),
            " ".join(f"{k}={v}" for k, v in rootfs.summary.items()),
            len(volumes.shares), (t1 - t0) * 1000,
            copies.count, (t2 - t1) * 1000, (time.monotonic() - t2) * 1000,
        )
        return self

    # -- start / exec --------------------------------------------------------------------

    def _guest(self, exec_id: str) -> Guest:
        """The agent calls for one process' streams. Each call takes the current agent
        connection (it may have been re-established); with the VM gone a read is EOF."""
        container_id, ctx = self.id, self._ctx

        async def agent() -> AgentClient:
            found = await ctx.wait_agent()
            if found is None:
                raise Unavailable(f"container {container_id}: the VM is gone")
            return found

        async def read(stream: str, timeout: float | None) -> tuple[bytes, bool]:
            while True:
                try:
                    client = await agent()
                except Unavailable:
                    return b"", True
                read_call = client.read_stdout if stream == "stdout" else client.read_stderr
                try:
                    out = await read_call(container_id, exec_id, timeout=timeout or OUTPUT_POLL_S)
                except Unavailable:
                    await asyncio.sleep(0.05)  # dropped: let the session notice, then ask
                    continue
                if not out.answered:
                    # Not "nothing pending": the agent may still hold output (a stalled
                    # guest or transport). Ask again; a hung agent fails the pod, and
                    # the reads then end (Unavailable above, then no agent).
                    continue
                return out.data, out.eof

        async def read_stdout(timeout: float | None) -> tuple[bytes, bool]:
            return await read("stdout", timeout)

        async def read_stderr(timeout: float | None) -> tuple[bytes, bool]:
            return await read("stderr", timeout)

        async def write_stdin(data: bytes) -> int:
            return await (await agent()).write_stdin(container_id, exec_id, data)

        async def close_stdin() -> None:
            await (await agent()).close_stdin(container_id, exec_id)

        return Guest(read_stdout, read_stderr, write_stdin, close_stdin)

    async def start(self, exec_id: str) -> int:
        proc = self.proc(exec_id)
        process = proc.process
        async with process.lock:
            process.check("start")
            if proc.opening:
                raise FailedPrecondition(f"{process.name} is being set up: Exec has not returned")
            agent = self._ctx.require_agent()
            if exec_id:
                await agent.exec_process(
                    self.id,
                    exec_id,
                    proc.process_json,
                    terminal=proc.io.spec.terminal if proc.io else False,
                    stdin=bool(proc.io and proc.io.has_stdin),
                )
            else:
                await agent.start_container(self.id)
            if proc.pending_size is not None:
                await self._apply_pending_size(agent, proc)
            if proc.io is not None:
                proc.io.start(self._guest(exec_id))
            process.transition(State.RUNNING)
            if exec_id:
                self._publish(TaskExecStarted(self.id, exec_id, process.pid))
            else:
                self._publish(TaskStart(self.id, process.pid))
            # Only now may an exit be published: the start event is queued before it.
            self.tasks.spawn(self._wait_process(proc), f"wait-{exec_id or 'init'}")
            return process.pid

    async def _apply_pending_size(self, agent: AgentClient, proc: ContainerProcess) -> None:
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
        self.init.process.check("exec")
        if task.exec_id in self.execs:
            raise AlreadyExists(f"exec {task.exec_id} of container {self.id} already exists")
        # The id is taken before the first await: a second Exec of it is refused, and a
        # Delete of the container in between is seen below.
        process = Process(task.container_id, task.exec_id)
        process.pid = self._ctx.vmm_pid
        proc = ContainerProcess(process, None, task.process_json)
        proc.opening = True
        self.execs[task.exec_id] = proc
        io = ProcessIO(task.stdio, task.container_id, self._ctx.namespace)
        try:
            await io.open()
            if self.init.process.state is State.DELETED or self.execs.get(task.exec_id) is not proc:
                raise NotFound(f"container {self.id} was deleted while exec {task.exec_id} opened")
        except BaseException:
            await io.close()
            if self.execs.get(task.exec_id) is proc:
                del self.execs[task.exec_id]
            raise
        proc.io = io
        proc.opening = False
        self._publish(TaskExecAdded(task.container_id, task.exec_id))

    # -- exits ---------------------------------------------------------------------------

    async def _wait_process(self, proc: ContainerProcess) -> None:
        process = proc.process
        backoff = 0.05
        while True:
            agent = await self._ctx.wait_agent()
            if agent is None:
                status, at = VM_GONE_STATUS, time.time_ns()
                break
            try:
                result = await agent.wait_process(
                    process.container_id, process.exec_id, timeout=POLL_S
                )
            except Unavailable:
                # The connection dropped: the session reconnects or gives up. The pause
                # lets it notice before we ask again.
                await asyncio.sleep(0.05)
                continue
            except ShimError as err:
                log.warning("event=wait_failed process=%r error=%r", process.name, str(err))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            if result is not None:
                status, at = result.exit_status, result.exited_at or time.time_ns()
                break
        if proc is self.init and self.kill_all_on_exit:
            await self._kill_leftovers()
        await self.finish(proc, status, at)

    async def _kill_leftovers(self) -> None:
        agent = self._ctx.live_agent()
        if agent is None:
            return
        try:
            await agent.signal_process(self.id, "", 9, all_processes=True)
        except ShimError as err:  # nothing left to kill is the usual answer
            log.debug("event=kill_leftovers container=%s error=%r", self.id, str(err))

    async def vm_gone(self) -> None:
        """Everything that ran in the VM is gone with it."""
        for proc in [self.init, *self.execs.values()]:
            if proc.process.state in (State.RUNNING, State.PAUSED):
                await self.finish(proc, VM_GONE_STATUS, time.time_ns())

    # -- signals and delete --------------------------------------------------------------

    async def kill(self, exec_id: str, signal: int, all_: bool) -> None:
        proc = self.proc(exec_id)
        process = proc.process
        async with process.lock:
            process.check("kill")
            agent = self._ctx.require_agent()
            await agent.signal_process(self.id, exec_id, signal, all_processes=all_)
            if process.state is State.CREATED:
                # Never started: nothing in the guest will report an exit for us.
                await self.finish(proc, signal_status(signal), time.time_ns())

    async def delete_exec(self, exec_id: str) -> Exit:
        proc = self.proc(exec_id)
        process = proc.process
        async with process.lock:
            process.check("delete")
            exit_ = process.exit or Exit(0, time.time_ns())
            if proc.io is not None:
                await proc.io.close()
            if process.state is State.STOPPED and proc.exit_published:
                await self._forget_exec(exec_id)
            process.mark_deleted()
            del self.execs[exec_id]
        return exit_

    async def _forget_exec(self, exec_id: str) -> None:
        """Have the agent drop an exited exec (its status, its output buffers)."""
        agent = self._ctx.live_agent()
        if agent is None:
            return  # the VM took it along
        try:
            await agent.remove_process(self.id, exec_id)
        except NotFound:
            pass  # never reached the guest (its start failed), or already gone
        except ShimError as err:
            log.warning(
                "event=guest_remove_process_failed container=%s exec=%s error=%r",
                self.id, exec_id, str(err),
            )

    def check_deletable(self) -> None:
        self.init.process.check("delete")
        if any(e.process.state is State.RUNNING for e in self.execs.values()):
            raise FailedPrecondition(
                f"cannot delete container {self.id}: exec processes are still running"
            )

    async def teardown(self) -> None:
        """Remove the container from the guest, then its resources, in reverse."""
        await self.close_io_all()
        self.execs.clear()
        await self._remove_from_guest()
        await self.volumes.detach(self._ctx)
        await self.rootfs.detach(self._ctx)

    async def _remove_from_guest(self) -> None:
        agent = self._ctx.live_agent()
        if agent is None:
            return
        try:
            await agent.remove_container(self.id, force=True)
        except NotFound:
            pass  # crun create never got that far
        except ShimError as err:
            log.warning("event=guest_remove_failed container=%s error=%r", self.id, str(err))

    # -- the rest of the task API ----------------------------------------------------------

    async def pids(self) -> tuple[int, ...]:
        self.init.process.check("pids")
        if self.init.process.state is State.STOPPED:
            return ()
        return await self._ctx.require_agent().list_processes(self.id)

    async def stats(self) -> ContainerStats | None:
        self.init.process.check("stats")
        if self.init.process.state is State.STOPPED:
            return None
        return await self._ctx.require_agent().stats_container(self.id)

    async def update(self, resources_json: bytes | None) -> None:
        """Apply new limits in the guest, then refresh the copies of the container's mounts."""
        self.init.process.check("update")
        agent = self._ctx.require_agent()
        if resources_json is not None:
            await agent.update_container(self.id, resources_json)
        # CRI refreshes ConfigMap/Secret-style mounts on update: copy what changed.
        try:
            changed = await self.copies.refresh(agent)
        except ShimError as err:
            applied = "the new resources are applied, but " if resources_json else ""
            raise type(err)(
                f"update {self.id}: {applied}refreshing its mounts failed: {err}"
            ) from err
        if changed:
            log.info("event=mounts_refreshed container=%s copies=%d", self.id, changed)

    async def resize_pty(self, exec_id: str, width: int, height: int) -> None:
        proc = self.proc(exec_id)
        io = proc.io
        if io is None or not io.spec.terminal:
            raise FailedPrecondition(f"{proc.process.name} has no terminal")
        async with proc.process.lock:  # a start in flight finishes first
            proc.process.check("resize")
            if proc.process.state is State.CREATED:
                proc.pending_size = (height, width)  # no TTY yet: start applies it
                return
            await self._ctx.require_agent().resize_tty(self.id, exec_id, rows=height, cols=width)
        io.window_sized()

    async def close_io(self, exec_id: str, stdin: bool) -> None:
        proc = self.proc(exec_id)
        proc.process.check("closeio")
        if stdin and proc.io is not None:
            await proc.io.close_stdin()


def spec_error(task_id: str, err: spec_mod.SpecError) -> ShimError:
    return InvalidArgument(f"create {task_id}: {err}")


Task = SandboxTask | AppContainer

"""The `containerd.task.v2.Task` ttrpc service: the protocol boundary of the shim.

Requests are decoded here into plain values for the pod, and the pod's plain
answers are encoded here; no protobuf message goes further. Errors are raised
as the shim's typed errors (NotFound, FailedPrecondition, ...) and the ttrpc
server turns them into status codes, which containerd maps back to errdefs.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from shim import metrics
from shim import spec as spec_mod
from shim._pb.containerd.task.v2 import shim_pb2 as _shim_pb2
from shim.errors import InvalidArgument, NotFound, Unimplemented
from shim.pod import Pod
from shim.ttrpc import CallContext, Handler
from shim.types import CreateTask, ExecTask, Exit, Mount, State, StdioSpec

log = logging.getLogger(__name__)

_pb: Any = _shim_pb2

SERVICE = "containerd.task.v2.Task"

_STATUS = {  # containerd.v1.types.Status
    State.CREATED: 1,
    State.RUNNING: 2,
    State.STOPPED: 3,
    State.PAUSED: 4,
    State.DELETED: 3,
}


def _parse(cls: Any, payload: bytes) -> Any:
    msg = cls()
    try:
        msg.ParseFromString(payload)
    except Exception as err:  # DecodeError, or ValueError on invalid UTF-8
        raise InvalidArgument(f"undecodable {cls.DESCRIPTOR.name}: {err}") from err
    return msg


def _set_time(field: Any, at_ns: int) -> None:
    field.seconds, field.nanos = divmod(at_ns, 1_000_000_000)


def _empty() -> bytes:
    return b""


class TaskService:
    """Maps the 17 Task RPCs onto one pod. `on_shutdown` asks the daemon to exit."""

    def __init__(self, pod: Pod, on_shutdown: Callable[[], None]) -> None:
        self._pod = pod
        self._on_shutdown = on_shutdown

    def handlers(self) -> dict[str, Handler]:
        methods: dict[str, Callable[[bytes], Awaitable[bytes]]] = {
            "State": self.state,
            "Create": self.create,
            "Start": self.start,
            "Delete": self.delete,
            "Pids": self.pids,
            "Pause": self.pause,
            "Resume": self.resume,
            "Checkpoint": self.checkpoint,
            "Kill": self.kill,
            "Exec": self.exec,
            "ResizePty": self.resize_pty,
            "CloseIO": self.close_io,
            "Update": self.update,
            "Wait": self.wait,
            "Stats": self.stats,
            "Connect": self.connect,
            "Shutdown": self.shutdown,
        }
        return {name: _logged(name, fn) for name, fn in methods.items()}

    async def create(self, payload: bytes) -> bytes:
        req = _parse(_pb.CreateTaskRequest, payload)
        if req.checkpoint or req.parent_checkpoint:
            raise Unimplemented("create from a checkpoint is not supported")
        task = CreateTask(
            id=req.id,
            bundle=req.bundle,
            rootfs=tuple(
                Mount(m.type, m.source, m.target, tuple(m.options)) for m in req.rootfs
            ),
            stdio=StdioSpec(req.stdin, req.stdout, req.stderr, req.terminal),
        )
        if not task.id or not task.bundle:
            raise InvalidArgument("create: id and bundle are required")
        pid = await self._pod.create(task)
        return bytes(_pb.CreateTaskResponse(pid=pid).SerializeToString())

    async def start(self, payload: bytes) -> bytes:
        req = _parse(_pb.StartRequest, payload)
        pid = await self._pod.start(req.id, req.exec_id)
        return bytes(_pb.StartResponse(pid=pid).SerializeToString())

    async def delete(self, payload: bytes) -> bytes:
        req = _parse(_pb.DeleteRequest, payload)
        pid = self._pod.status(req.id, req.exec_id).pid
        exit_ = await self._pod.delete(req.id, req.exec_id)
        return _delete_response(pid, exit_)

    async def state(self, payload: bytes) -> bytes:
        req = _parse(_pb.StateRequest, payload)
        st = self._pod.status(req.id, req.exec_id)
        resp = _pb.StateResponse(
            id=st.id,
            bundle=st.bundle,
            pid=st.pid,
            status=_STATUS[st.state],
            stdin=st.stdio.stdin,
            stdout=st.stdio.stdout,
            stderr=st.stdio.stderr,
            terminal=st.stdio.terminal,
            exec_id=st.exec_id,
        )
        if st.exit is not None:
            resp.exit_status = st.exit.status
            _set_time(resp.exited_at, st.exit.at_ns)
        return bytes(resp.SerializeToString())

    async def pids(self, payload: bytes) -> bytes:
        req = _parse(_pb.PidsRequest, payload)
        resp = _pb.PidsResponse()
        for pid in await self._pod.pids(req.id):
            resp.processes.add(pid=pid)
        return bytes(resp.SerializeToString())

    async def pause(self, payload: bytes) -> bytes:
        await self._pod.pause(_parse(_pb.PauseRequest, payload).id)
        return _empty()

    async def resume(self, payload: bytes) -> bytes:
        await self._pod.resume(_parse(_pb.ResumeRequest, payload).id)
        return _empty()

    async def checkpoint(self, payload: bytes) -> bytes:
        req = _parse(_pb.CheckpointTaskRequest, payload)
        raise Unimplemented(f"checkpoint {req.id}: not supported by the cloudhv runtime")

    async def kill(self, payload: bytes) -> bytes:
        req = _parse(_pb.KillRequest, payload)
        await self._pod.kill(req.id, req.exec_id, req.signal, req.all)
        return _empty()

    async def exec(self, payload: bytes) -> bytes:
        req = _parse(_pb.ExecProcessRequest, payload)
        if not req.exec_id:
            raise InvalidArgument(f"exec in {req.id}: exec_id is required")
        try:
            process_json = spec_mod.exec_process_json(req.spec.type_url, req.spec.value)
        except spec_mod.SpecError as err:
            raise InvalidArgument(f"exec {req.exec_id} in {req.id}: {err}") from err
        await self._pod.exec(
            ExecTask(
                container_id=req.id,
                exec_id=req.exec_id,
                stdio=StdioSpec(req.stdin, req.stdout, req.stderr, req.terminal),
                process_json=process_json,
            )
        )
        return _empty()

    async def resize_pty(self, payload: bytes) -> bytes:
        req = _parse(_pb.ResizePtyRequest, payload)
        await self._pod.resize_pty(req.id, req.exec_id, req.width, req.height)
        return _empty()

    async def close_io(self, payload: bytes) -> bytes:
        req = _parse(_pb.CloseIORequest, payload)
        await self._pod.close_io(req.id, req.exec_id, req.stdin)
        return _empty()

    async def update(self, payload: bytes) -> bytes:
        req = _parse(_pb.UpdateTaskRequest, payload)
        resources: bytes | None = None
        if req.HasField("resources"):
            try:
                resources = spec_mod.resources_json(req.resources.type_url, req.resources.value)
            except spec_mod.SpecError as err:
                raise InvalidArgument(f"update {req.id}: {err}") from err
        await self._pod.update(req.id, resources)
        return _empty()

    async def wait(self, payload: bytes) -> bytes:
        req = _parse(_pb.WaitRequest, payload)
        exit_ = await self._pod.wait(req.id, req.exec_id)
        resp = _pb.WaitResponse(exit_status=exit_.status)
        _set_time(resp.exited_at, exit_.at_ns)
        return bytes(resp.SerializeToString())

    async def stats(self, payload: bytes) -> bytes:
        req = _parse(_pb.StatsRequest, payload)
        stats = await self._pod.stats(req.id)
        # A sandbox (the VM) or a stopped container has no cgroup: empty metrics.
        type_url, value = (
            metrics.cgroup_v2_metrics(stats) if stats is not None else (metrics.TYPE_URL, b"")
        )
        resp = _pb.StatsResponse()
        resp.stats.type_url = type_url
        resp.stats.value = value
        return bytes(resp.SerializeToString())

    async def connect(self, payload: bytes) -> bytes:
        _parse(_pb.ConnectRequest, payload)
        resp = _pb.ConnectResponse(shim_pid=os.getpid(), task_pid=self._pod.vmm_pid)
        return bytes(resp.SerializeToString())

    async def shutdown(self, payload: bytes) -> bytes:
        req = _parse(_pb.ShutdownRequest, payload)
        if not self._pod.empty:
            log.info(
                "event=shutdown_ignored task=%s containers=%d", req.id, len(self._pod.containers)
            )
            return _empty()
        log.info("event=shutdown task=%s", req.id)
        self._on_shutdown()
        return _empty()


def _delete_response(pid: int, exit_: Exit) -> bytes:
    resp = _pb.DeleteResponse(pid=pid, exit_status=exit_.status)
    _set_time(resp.exited_at, exit_.at_ns)
    return bytes(resp.SerializeToString())


def _logged(name: str, fn: Callable[[bytes], Awaitable[bytes]]) -> Handler:
    async def handler(payload: bytes, ctx: CallContext) -> bytes:
        del ctx
        started = time.monotonic()
        try:
            result = await fn(payload)
        except Exception as err:
            # containerd kills every finished exec (CRI's ExecSync does, each time):
            # NotFound is its expected answer, not news.
            log.log(
                logging.DEBUG if isinstance(err, NotFound) else logging.INFO,
                "event=rpc method=%s ok=false ms=%d error=%r",
                name, (time.monotonic() - started) * 1000, str(err),
            )
            raise
        log.debug("event=rpc method=%s ok=true ms=%d", name, (time.monotonic() - started) * 1000)
        return result

    return handler

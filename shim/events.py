"""Task events to containerd: `Events.Forward` on TTRPC_ADDRESS, in order, with retries.

Every event goes through one FIFO queue drained by one task, so containerd sees
them in the order they were published (create → start → exit → delete). The
callers guarantee the causal order (an exit is published only after its start).
A failing call is retried, reconnecting, with a backoff up to 1 s, for as long
as a containerd restart takes (RETRY_WINDOW_S): a TaskExit sent while containerd
restarts reaches the new one. Only then is the event dropped, with an error in
the log. The queue is bounded (QUEUE_MAX events); if it ever fills, the oldest
event is dropped, loudly, so the daemon's memory stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from shim._pb.containerd.events import task_pb2 as _task_events_pb2
from shim._pb.containerd.services.ttrpc.events.v1 import events_pb2 as _events_pb2
from shim.errors import ShimError
from shim.ttrpc import Client
from shim.types import Mount

log = logging.getLogger(__name__)

_ev: Any = _task_events_pb2
_fwd: Any = _events_pb2

SERVICE = "containerd.services.events.ttrpc.v1.Events"
NAMESPACE_KEY = "containerd-namespace-ttrpc"
CALL_TIMEOUT_S = 5.0
RETRY_WINDOW_S = 60.0
QUEUE_MAX = 4096


@dataclass(frozen=True)
class Event:
    topic: ClassVar[str]
    type_name: ClassVar[str]

    def encode(self) -> bytes:
        raise NotImplementedError


def _ts(msg: Any, at_ns: int) -> None:
    msg.seconds, msg.nanos = divmod(at_ns, 1_000_000_000)


@dataclass(frozen=True)
class TaskCreate(Event):
    topic = "/tasks/create"
    type_name = "containerd.events.TaskCreate"
    container_id: str
    bundle: str
    rootfs: Sequence[Mount]
    stdin: str
    stdout: str
    stderr: str
    terminal: bool
    pid: int

    def encode(self) -> bytes:
        msg = _ev.TaskCreate(
            container_id=self.container_id,
            bundle=self.bundle,
            pid=self.pid,
            io=_ev.TaskIO(
                stdin=self.stdin, stdout=self.stdout, stderr=self.stderr, terminal=self.terminal
            ),
        )
        for m in self.rootfs:
            msg.rootfs.add(type=m.type, source=m.source, target=m.target, options=list(m.options))
        return bytes(msg.SerializeToString())


@dataclass(frozen=True)
class TaskStart(Event):
    topic = "/tasks/start"
    type_name = "containerd.events.TaskStart"
    container_id: str
    pid: int

    def encode(self) -> bytes:
        msg = _ev.TaskStart(container_id=self.container_id, pid=self.pid)
        return bytes(msg.SerializeToString())


@dataclass(frozen=True)
class TaskExit(Event):
    topic = "/tasks/exit"
    type_name = "containerd.events.TaskExit"
    container_id: str
    id: str  # the exec id, or the container id for the init process
    pid: int
    exit_status: int
    exited_at_ns: int

    def encode(self) -> bytes:
        msg = _ev.TaskExit(
            container_id=self.container_id, id=self.id, pid=self.pid, exit_status=self.exit_status
        )
        _ts(msg.exited_at, self.exited_at_ns)
        return bytes(msg.SerializeToString())


@dataclass(frozen=True)
class TaskDelete(Event):
    topic = "/tasks/delete"
    type_name = "containerd.events.TaskDelete"
    container_id: str
    pid: int
    exit_status: int
    exited_at_ns: int
    id: str = ""

    def encode(self) -> bytes:
        msg = _ev.TaskDelete(
            container_id=self.container_id, pid=self.pid, exit_status=self.exit_status, id=self.id
        )
        _ts(msg.exited_at, self.exited_at_ns)
        return bytes(msg.SerializeToString())


@dataclass(frozen=True)
class TaskExecAdded(Event):
    topic = "/tasks/exec-added"
    type_name = "containerd.events.TaskExecAdded"
    container_id: str
    exec_id: str

    def encode(self) -> bytes:
        msg = _ev.TaskExecAdded(container_id=self.container_id, exec_id=self.exec_id)
        return bytes(msg.SerializeToString())


@dataclass(frozen=True)
class TaskExecStarted(Event):
    topic = "/tasks/exec-started"
    type_name = "containerd.events.TaskExecStarted"
    container_id: str
    exec_id: str
    pid: int

    def encode(self) -> bytes:
        msg = _ev.TaskExecStarted(
            container_id=self.container_id, exec_id=self.exec_id, pid=self.pid
        )
        return bytes(msg.SerializeToString())


@dataclass(frozen=True)
class TaskPaused(Event):
    topic = "/tasks/paused"
    type_name = "containerd.events.TaskPaused"
    container_id: str

    def encode(self) -> bytes:
        return bytes(_ev.TaskPaused(container_id=self.container_id).SerializeToString())


@dataclass(frozen=True)
class TaskResumed(Event):
    topic = "/tasks/resumed"
    type_name = "containerd.events.TaskResumed"
    container_id: str

    def encode(self) -> bytes:
        return bytes(_ev.TaskResumed(container_id=self.container_id).SerializeToString())


@dataclass(frozen=True)
class TaskOOM(Event):
    topic = "/tasks/oom"
    type_name = "containerd.events.TaskOOM"
    container_id: str

    def encode(self) -> bytes:
        return bytes(_ev.TaskOOM(container_id=self.container_id).SerializeToString())


def forward_request(event: Event, namespace: str, at_ns: int) -> bytes:
    """ForwardRequest{Envelope}; the Any's type_url is the bare message name."""
    req = _fwd.ForwardRequest()
    env = req.envelope
    _ts(env.timestamp, at_ns)
    env.namespace = namespace
    env.topic = event.topic
    env.event.type_url = event.type_name
    env.event.value = event.encode()
    return bytes(req.SerializeToString())


Connect = Callable[[str], Awaitable[Client]]


class Publisher:
    """The ordered event queue. `run()` is the one consumer; its owner cancels it.

    With no address (containerd did not set TTRPC_ADDRESS) events are only logged.
    """

    def __init__(
        self,
        address: str,
        namespace: str,
        connect: Connect = Client.connect_unix,
        *,
        retry_window_s: float = RETRY_WINDOW_S,
        queue_max: int = QUEUE_MAX,
    ) -> None:
        self._address = address.removeprefix("unix://")
        self._namespace = namespace
        self._connect = connect
        self._retry_window_s = retry_window_s
        self._queue: asyncio.Queue[tuple[Event, int]] = asyncio.Queue(queue_max)
        self._client: Client | None = None
        self.sent = 0
        self.dropped = 0

    def publish(self, event: Event) -> None:
        """Enqueue; never blocks. The timestamp is taken now, not at delivery."""
        log.info("event=publish topic=%s %s", event.topic, _fields(event))
        if self._queue.full():
            oldest, _ = self._queue.get_nowait()
            self._queue.task_done()
            self.dropped += 1
            log.error("event=publish_dropped topic=%s reason=queue_full", oldest.topic)
        self._queue.put_nowait((event, time.time_ns()))

    async def run(self) -> None:
        try:
            while True:
                event, at_ns = await self._queue.get()
                try:
                    await self._deliver(event, at_ns)
                except Exception:  # a bug here must not take the shim down with it
                    self.dropped += 1
                    log.exception("event=publish_failed topic=%s", event.topic)
                finally:
                    self._queue.task_done()
        finally:
            await self._disconnect()

    async def flush(self, timeout: float) -> bool:
        """Wait until every queued event was delivered or dropped. False on timeout."""
        try:
            async with asyncio.timeout(timeout):
                await self._queue.join()
        except TimeoutError:
            return False
        return True

    async def _deliver(self, event: Event, at_ns: int) -> None:
        if not self._address:
            self.dropped += 1
            return
        payload = forward_request(event, self._namespace, at_ns)
        last = ""
        deadline = time.monotonic() + self._retry_window_s
        attempt = 0
        while True:
            try:
                if self._client is None or self._client.closed:
                    self._client = await self._connect(self._address)
                await self._client.call(
                    SERVICE,
                    "Forward",
                    payload,
                    timeout=CALL_TIMEOUT_S,
                    metadata={NAMESPACE_KEY: self._namespace},
                )
                self.sent += 1
                return
            except (ShimError, OSError) as err:
                last = str(err)
                await self._disconnect()
                attempt += 1
                if attempt == 1:
                    log.warning("event=publish_retrying topic=%s error=%r", event.topic, last)
                if time.monotonic() >= deadline:
                    break
                await asyncio.sleep(min(0.05 * 2 ** min(attempt, 5), 1.0))
        self.dropped += 1
        log.error(
            "event=publish_dropped topic=%s attempts=%d error=%r", event.topic, attempt, last
        )

    async def _disconnect(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()


def _fields(event: Event) -> str:
    parts = []
    for name in ("container_id", "id", "exec_id", "pid", "exit_status"):
        if hasattr(event, name):
            parts.append(f"{name}={getattr(event, name)}")
    return " ".join(parts)

"""Lifecycle state machines of a container's init process and of its exec processes.

The transition tables are the single place that says which moves are legal,
following runc's shim: an init process goes created → running ⇄ paused →
stopped → deleted (a created one may also be killed or deleted); an exec goes
created → running → stopped → deleted. A wrong call in a wrong state is a
FailedPrecondition naming both states, never a silent no-op.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

from shim.errors import FailedPrecondition, NotFound
from shim.types import Exit, State

Table = Mapping[State, frozenset[State]]

INIT_TRANSITIONS: Table = {
    State.CREATED: frozenset({State.RUNNING, State.STOPPED, State.DELETED}),
    State.RUNNING: frozenset({State.PAUSED, State.STOPPED}),
    State.PAUSED: frozenset({State.RUNNING, State.STOPPED}),
    State.STOPPED: frozenset({State.DELETED}),
    State.DELETED: frozenset(),
}

EXEC_TRANSITIONS: Table = {
    State.CREATED: frozenset({State.RUNNING, State.STOPPED, State.DELETED}),
    State.RUNNING: frozenset({State.STOPPED}),
    State.PAUSED: frozenset(),
    State.STOPPED: frozenset({State.DELETED}),
    State.DELETED: frozenset(),
}

# Which states each operation accepts (checked before any side effect).
INIT_OPS: Mapping[str, frozenset[State]] = {
    "start": frozenset({State.CREATED}),
    "kill": frozenset({State.CREATED, State.RUNNING, State.PAUSED}),
    "delete": frozenset({State.CREATED, State.STOPPED}),
    "pause": frozenset({State.RUNNING}),
    "resume": frozenset({State.PAUSED}),
    "exec": frozenset({State.CREATED, State.RUNNING}),
    "update": frozenset({State.CREATED, State.RUNNING, State.PAUSED}),
    "stats": frozenset({State.CREATED, State.RUNNING, State.PAUSED, State.STOPPED}),
    "pids": frozenset({State.CREATED, State.RUNNING, State.PAUSED, State.STOPPED}),
    "resize": frozenset({State.CREATED, State.RUNNING, State.PAUSED}),
    "closeio": frozenset({State.CREATED, State.RUNNING, State.PAUSED, State.STOPPED}),
}

EXEC_OPS: Mapping[str, frozenset[State]] = {
    "start": frozenset({State.CREATED}),
    "kill": frozenset({State.RUNNING}),
    "delete": frozenset({State.CREATED, State.STOPPED}),
    "resize": frozenset({State.CREATED, State.RUNNING}),
    "closeio": frozenset({State.CREATED, State.RUNNING, State.STOPPED}),
}


class Process:
    """One process' lifecycle: state, pid, exit record and waiters.

    It decides (is this move legal?) and records; the container does the I/O.
    """

    def __init__(self, container_id: str, exec_id: str = "") -> None:
        self.container_id = container_id
        self.exec_id = exec_id
        self.pid = 0
        self._state = State.CREATED
        self._table = EXEC_TRANSITIONS if exec_id else INIT_TRANSITIONS
        self._ops = EXEC_OPS if exec_id else INIT_OPS
        self._exit: Exit | None = None
        self._exited = asyncio.Event()
        self.lock = asyncio.Lock()  # serialises RPCs that change this process

    @property
    def name(self) -> str:
        if self.exec_id:
            return f"exec {self.exec_id} of container {self.container_id}"
        return f"container {self.container_id}"

    @property
    def state(self) -> State:
        return self._state

    @property
    def exit(self) -> Exit | None:
        return self._exit

    def check(self, op: str) -> None:
        """Raise unless `op` is allowed now. kill on a stopped process is NotFound, as in runc."""
        allowed = self._ops.get(op)
        if allowed is None:
            raise FailedPrecondition(f"cannot {op} {self.name}: not supported for this process")
        if self._state in allowed:
            return
        if op == "kill" and self._state is State.STOPPED:
            raise NotFound(f"cannot kill {self.name}: process already finished")
        if self._state is State.DELETED:
            # A call that raced a Delete: to the caller the process no longer exists
            # (runc forgets it), and CRI treats NotFound on kill as "already gone".
            raise NotFound(f"cannot {op} {self.name}: it has been deleted")
        want = " or ".join(sorted(str(s) for s in allowed))
        raise FailedPrecondition(f"cannot {op} {self.name}: it is {self._state} (must be {want})")

    def transition(self, to: State) -> None:
        if to not in self._table[self._state]:
            raise FailedPrecondition(
                f"{self.name}: invalid transition from {self._state} to {to}"
            )
        self._state = to

    def set_exited(self, status: int, at_ns: int | None = None) -> Exit:
        """Record the exit (first one wins) and wake every waiter."""
        if self._exit is None:
            self._exit = Exit(status, at_ns if at_ns is not None else time.time_ns())
            if self._state is not State.STOPPED:
                self.transition(State.STOPPED)
            self._exited.set()
        return self._exit

    async def wait(self) -> Exit:
        await self._exited.wait()
        assert self._exit is not None
        return self._exit

    def mark_deleted(self) -> None:
        self.transition(State.DELETED)
        if not self._exited.is_set():  # a created process deleted before it ran
            self._exit = self._exit or Exit(0, time.time_ns())
            self._exited.set()

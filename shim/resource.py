"""What every thing plugged into a pod has in common: a record, steps, and their undo.

A resource (a container's root disk, a network interface, a shared directory)
goes through the same life:

1. it records itself in the pod's persisted state, before anything exists;
2. it creates what it needs on the host (an image file, a TAP);
3. it plugs into the VMM through the device manager;
4. it sets itself up in the guest through the agent.

Each step that succeeds pushes its undo onto the resource's `Undo` stack. A step
that fails unwinds the stack at once and raises the step's error with the
step's name in front, so the caller's error says where it broke and nothing done
before stays behind. `detach()` unwinds the same stack on normal teardown. When
the VM is gone, the guest and VMM undos have nothing to do and say so; the
host undos always run. Crash cleanup, with no process left that remembers the
steps, undoes a resource on the host from its record alone (`undo_host`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from shim.errors import Internal, ShimError
from shim.state import ResourceRecord

if TYPE_CHECKING:
    from shim.agent import AgentClient
    from shim.devices import DeviceManager

log = logging.getLogger(__name__)

T = TypeVar("T")
UndoStep = Callable[[], Awaitable[None]]


class PodServices(Protocol):
    """What a resource may use of the pod it is plugged into (the sandbox provides it)."""

    @property
    def work_dir(self) -> Path:
        """Host scratch space of this pod (images, temporary mounts)."""

    def live_agent(self) -> AgentClient | None:
        """The agent while the VM runs; None once it is gone (guest undos are moot)."""

    def live_devices(self) -> DeviceManager | None:
        """The device manager while the VM runs; None once it is gone."""

    async def record(self, record: ResourceRecord) -> None:
        """Persist `record` (before the resource creates anything); a record with the
        same id is replaced in place (a resource adding what it learnt, e.g. a pid)."""

    async def adopt(self, pid: int) -> None:
        """Charge a host process the resource spawned to the pod (its cgroup)."""

    async def forget(self, record_id: str) -> None:
        """Drop the record (after everything it stood for is gone)."""


async def step(name: str, action: Awaitable[T]) -> T:
    """Await one step; its failure is re-raised as the same kind of error, named."""
    try:
        return await action
    except ShimError as err:
        raise type(err)(f"{name}: {err}") from err
    except OSError as err:
        raise Internal(f"{name}: {err.strerror or err}") from err


class Undo:
    """A stack of undo steps, run in reverse. Each runs once; failures are logged, not raised.

    A host undo that fails leaves `clean` False: the caller then keeps the record,
    so that `delete` tries again from the persisted state.
    """

    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._steps: list[tuple[str, UndoStep, bool]] = []
        self.clean = True

    def push(self, name: str, undo: UndoStep, *, host: bool = False) -> None:
        self._steps.append((name, undo, host))

    def __len__(self) -> int:
        return len(self._steps)

    async def unwind(self) -> None:
        while self._steps:
            name, undo, host = self._steps.pop()
            try:
                await undo()
            except Exception as err:  # one failed undo must not stop the others
                log.warning(
                    "event=undo_failed resource=%s step=%r error=%r", self._owner, name, str(err)
                )
                if host:
                    self.clean = False

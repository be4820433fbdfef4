"""A container's CRI mounts inside the VM: small host files and directories, copied.

`cri_mounts` decides (which mount is copied where, what changed); this module
does the I/O around it: the host scan and file reads, off the event loop, and the
agent's CopyFile calls. The copies live in the guest under
`/run/cloudhv/mounts/<container id>/`, which the agent removes with the container
(RemoveContainer, or a failed CreateContainer), so there is no host state and no
record to persist.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from shim import cri_mounts
from shim.resource import step

if TYPE_CHECKING:
    from shim.agent import AgentClient

log = logging.getLogger(__name__)


class MountCopies:
    """The copied CRI mounts of one container, and the spec mounts rewritten to them."""

    def __init__(
        self,
        container_id: str,
        spec_mounts: Sequence[Mapping[str, Any]],
        pod_files: Mapping[str, str] | None = None,
    ) -> None:
        self.container_id = container_id
        self._spec_mounts = tuple(spec_mounts)
        self._pod_files = dict(pod_files or {})
        self._plan: cri_mounts.MountPlan | None = None

    async def plan(self) -> None:
        """Scan the host and decide; a mount that cannot be honoured is refused here,
        before anything exists."""
        self._plan = await self._scan()
        for note in self._plan.notes:
            log.info("event=mount_note container=%s note=%r", self.container_id, note)

    @property
    def mounts(self) -> tuple[Mapping[str, Any], ...]:
        """The spec's mounts with copied sources pointing at their guest copies."""
        return self._require_plan().mounts

    @property
    def count(self) -> int:
        return len(self._require_plan().copies)

    async def attach(self, agent: AgentClient) -> None:
        """Copy every planned file into the guest (directories before what they hold)."""
        await step("file copies", _copy(agent, self._require_plan().copies))

    async def refresh(self, agent: AgentClient) -> int:
        """Copy again what changed on the host since the last scan (CRI's Update of
        ConfigMap/Secret-style mounts). Returns how many copies were sent."""
        previous = self._require_plan()
        if not previous.copies:
            return 0
        current = await self._scan()
        changed = cri_mounts.changed_copies(previous, current)
        await _copy(agent, changed)
        self._plan = current
        return len(changed)

    async def _scan(self) -> cri_mounts.MountPlan:
        trees = await asyncio.to_thread(
            cri_mounts.scan_mounts, self._spec_mounts, skip=frozenset(self._pod_files)
        )
        return cri_mounts.plan_mounts(
            self.container_id, self._spec_mounts, trees, pod_files=self._pod_files
        )

    def _require_plan(self) -> cri_mounts.MountPlan:
        if self._plan is None:
            raise RuntimeError(f"mounts of {self.container_id} used before plan()")
        return self._plan


async def _copy(agent: AgentClient, copies: Sequence[cri_mounts.FileCopy]) -> None:
    for c in copies:
        if c.symlink_target is not None:
            data = c.symlink_target.encode()
        elif c.is_dir:
            data = b""
        else:
            data = await asyncio.to_thread(cri_mounts.read_copy, c)
        await agent.copy_file(
            c.guest_path,
            data,
            mode=c.mode,
            uid=c.uid,
            gid=c.gid,
            is_dir=c.is_dir,
            is_symlink=c.symlink_target is not None,
        )

"""The pod's connection to its agent, kept honest: reconnect on EOF, health checks, a verdict.

A connection can drop while the agent lives (the vsock path hiccups): the session
dials again for a bounded time, and calls waiting for the agent (`wait()`) carry on
with the new connection. An agent that stops answering Health, or a connection that
cannot be re-established, is lost for good: the session says so once, through
`on_lost`, and the sandbox fails the pod (stops the VM, every task exits). Nothing
waits forever on an agent that is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Awaitable, Callable

from shim.agent import AgentClient
from shim.background import Background
from shim.errors import DeadlineExceeded, ShimError, Unavailable

log = logging.getLogger(__name__)

RECONNECT_S = 5.0  # how long a dropped connection may take to come back
HEALTH_INTERVAL_S = 10.0
HEALTH_TIMEOUT_S = 10.0
HEALTH_MISSES = 3  # consecutive unanswered Health calls that mean a hung agent

Connect = Callable[[float], Awaitable[AgentClient]]  # (loop-time deadline) -> client


class _State(enum.Enum):
    UP = "up"
    RECONNECTING = "reconnecting"
    DOWN = "down"


class AgentSession:
    """One pod's agent connection and its supervisor."""

    def __init__(
        self,
        pod_id: str,
        connect: Connect,
        on_lost: Callable[[str], None],
        *,
        reconnect_s: float = RECONNECT_S,
        health_interval_s: float = HEALTH_INTERVAL_S,
        health_timeout_s: float = HEALTH_TIMEOUT_S,
        health_misses: int = HEALTH_MISSES,
    ) -> None:
        self._pod_id = pod_id
        self._connect = connect
        self._on_lost = on_lost
        self._reconnect_s = reconnect_s
        self._health_interval_s = health_interval_s
        self._health_timeout_s = health_timeout_s
        self._health_misses = health_misses
        self._agent: AgentClient | None = None
        self._state = _State.DOWN
        self._changed = asyncio.Condition()
        self._tasks = Background(f"session-{pod_id}")
        self.reconnects = 0

    async def open(self, deadline: float) -> AgentClient:
        """The first connection (raises as `connect` does), then supervision starts."""
        agent = await self._connect(deadline)
        await self._set(_State.UP, agent)
        self._tasks.spawn(self._supervise(), "supervise")
        return agent

    def live(self) -> AgentClient | None:
        """The agent if the connection is up right now, else None."""
        agent = self._agent
        if self._state is _State.UP and agent is not None and not agent.closed:
            return agent
        return None

    async def wait(self) -> AgentClient | None:
        """The agent, waiting through a reconnect; None once it is lost or closed."""
        async with self._changed:
            await self._changed.wait_for(
                lambda: self.live() is not None or self._state is _State.DOWN
            )
        return self.live()

    async def close(self) -> None:
        """Stop supervising and close the connection; waiters get None. Idempotent."""
        agent = self._agent
        await self._set(_State.DOWN, None)
        await self._tasks.aclose()
        if agent is not None:
            with contextlib.suppress(Exception):
                await agent.close()

    async def _set(self, state: _State, agent: AgentClient | None) -> None:
        async with self._changed:
            self._state, self._agent = state, agent
            self._changed.notify_all()

    async def _supervise(self) -> None:
        misses = 0
        while self._state is _State.UP:
            agent = self._agent
            assert agent is not None
            try:
                async with asyncio.timeout(self._health_interval_s):
                    await agent.wait_closed()
            except TimeoutError:
                misses = await self._check_health(agent, misses)
                if misses >= self._health_misses:
                    await self._lose(f"the agent did not answer Health {misses} times in a row")
                    return
                continue
            if self._state is not _State.UP:
                return  # closed on purpose
            misses = 0
            if not await self._reconnect():
                await self._lose(
                    "the agent connection dropped and did not come back "
                    f"within {self._reconnect_s:g}s"
                )
                return

    async def _check_health(self, agent: AgentClient, misses: int) -> int:
        try:
            healthy = await agent.health(timeout=self._health_timeout_s)
        except (DeadlineExceeded, Unavailable):
            healthy = False
        except ShimError as err:
            log.warning("event=agent_health_failed pod=%s error=%r", self._pod_id, str(err))
            healthy = False
        if not healthy and not agent.closed:
            log.warning("event=agent_unhealthy pod=%s misses=%d", self._pod_id, misses + 1)
            return misses + 1
        return 0

    async def _reconnect(self) -> bool:
        log.warning("event=agent_connection_lost pod=%s reconnecting=true", self._pod_id)
        await self._set(_State.RECONNECTING, None)
        deadline = asyncio.get_running_loop().time() + self._reconnect_s
        try:
            agent = await self._connect(deadline)
        except (ShimError, OSError) as err:
            log.error("event=agent_reconnect_failed pod=%s error=%r", self._pod_id, str(err))
            return False
        self.reconnects += 1
        log.info("event=agent_reconnected pod=%s", self._pod_id)
        await self._set(_State.UP, agent)
        return True

    async def _lose(self, reason: str) -> None:
        agent = self._agent
        await self._set(_State.DOWN, None)
        if agent is not None:
            with contextlib.suppress(Exception):
                await agent.close()
        log.error("event=agent_lost pod=%s reason=%r", self._pod_id, reason)
        self._on_lost(reason)

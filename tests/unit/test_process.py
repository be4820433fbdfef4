"""The container/exec state machines: every legal move, and errors naming both states."""

from __future__ import annotations

import asyncio

import pytest

from shim.errors import FailedPrecondition, NotFound
from shim.process import INIT_TRANSITIONS, Process
from shim.types import State, signal_status


def test_init_happy_path() -> None:
    p = Process("c1")
    assert p.state is State.CREATED
    p.check("start")
    p.transition(State.RUNNING)
    p.check("pause")
    p.transition(State.PAUSED)
    p.check("resume")
    p.transition(State.RUNNING)
    exit_ = p.set_exited(3, 1_000)
    assert p.state is State.STOPPED and exit_.status == 3 and exit_.at_ns == 1_000
    p.check("delete")
    p.mark_deleted()
    assert p.state is State.DELETED


def test_start_twice_names_both_states() -> None:
    p = Process("c1")
    p.transition(State.RUNNING)
    with pytest.raises(
        FailedPrecondition, match=r"cannot start container c1: it is running \(must be created\)"
    ):
        p.check("start")


def test_delete_running_refused() -> None:
    p = Process("c1")
    p.transition(State.RUNNING)
    with pytest.raises(FailedPrecondition, match="it is running"):
        p.check("delete")


def test_kill_after_exit_is_not_found() -> None:
    p = Process("c1")
    p.transition(State.RUNNING)
    p.set_exited(0)
    with pytest.raises(NotFound, match="already finished"):
        p.check("kill")


def test_invalid_transition_names_both_states() -> None:
    p = Process("c1")
    with pytest.raises(FailedPrecondition, match="from created to paused"):
        p.transition(State.PAUSED)
    p.transition(State.RUNNING)
    p.set_exited(1)
    with pytest.raises(FailedPrecondition, match="from stopped to running"):
        p.transition(State.RUNNING)


def test_exec_machine() -> None:
    e = Process("c1", "e1")
    assert "exec e1 of container c1" in e.name
    with pytest.raises(FailedPrecondition, match="must be running"):
        e.check("kill")
    with pytest.raises(FailedPrecondition, match="not supported"):
        e.check("pause")
    e.transition(State.RUNNING)
    with pytest.raises(FailedPrecondition, match="from running to paused"):
        e.transition(State.PAUSED)
    e.set_exited(signal_status(9))
    assert e.exit is not None and e.exit.status == 137
    e.mark_deleted()


def test_every_table_entry_is_reachable_or_terminal() -> None:
    for state, targets in INIT_TRANSITIONS.items():
        for target in targets:
            assert target is not state


def test_first_exit_wins() -> None:
    p = Process("c1")
    p.transition(State.RUNNING)
    p.set_exited(1, 10)
    assert p.set_exited(2, 20).status == 1


async def test_wait_wakes_on_exit() -> None:
    p = Process("c1")
    p.transition(State.RUNNING)
    waiter = asyncio.create_task(p.wait())
    await asyncio.sleep(0)
    assert not waiter.done()
    p.set_exited(42)
    assert (await waiter).status == 42


async def test_deleting_a_created_process_releases_waiters() -> None:
    p = Process("c1")
    waiter = asyncio.create_task(p.wait())
    await asyncio.sleep(0)
    p.mark_deleted()
    assert (await waiter).status == 0


def test_calls_that_race_a_delete_find_nothing() -> None:
    p = Process("c1")
    p.transition(State.RUNNING)
    p.set_exited(0)
    p.mark_deleted()
    for op in ("kill", "delete", "start", "stats"):
        with pytest.raises(NotFound, match="has been deleted"):
            p.check(op)

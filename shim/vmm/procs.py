"""Host process identity: a pid plus its start time, so a recycled pid is never killed."""

from __future__ import annotations

import contextlib
import os
import signal
import time


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks since boot), or None if the pid is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            stat = stat_file.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[19])


def is_same_process(pid: int, start_time: int) -> bool:
    return pid > 0 and process_start_time(pid) == start_time


def kill_recorded(pid: int, start_time: int, grace_s: float = 2.0) -> bool:
    """SIGTERM, then SIGKILL after `grace_s`, the process recorded as (pid, start_time).

    Returns True if such a process existed. Safe to call for a process that is
    already gone or whose pid now belongs to someone else.
    """
    if not is_same_process(pid, start_time):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not is_same_process(pid, start_time) or is_zombie(pid):
            break
        time.sleep(0.02)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _reap_if_child(pid)
    return True


def is_zombie(pid: int) -> bool:
    """Dead but not reaped (or already gone): a killed process whose parent never waits."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            stat = stat_file.read()
    except OSError:
        return True
    return stat[stat.rindex(b")") + 2 :].startswith((b"Z", b"X"))


def _reap_if_child(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        for _ in range(100):
            done, _status = os.waitpid(pid, os.WNOHANG)
            if done:
                return
            time.sleep(0.02)

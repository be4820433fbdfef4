"""Event-monitor records in Cloud Hypervisor's shape.

CH (event_monitor/src/lib.rs, v53) serialises each event with serde_json's pretty
printer as {"timestamp": {"secs", "nanos"} since the VMM started, "source",
"event", "properties": {..} or null}, writes it and a blank line, and drops an
event rather than block when the reader is slow (the fd is non-blocking).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Mapping

log = logging.getLogger("chsim.events")


class EventMonitor:
    def __init__(self, fd: int | None) -> None:
        self._fd = fd
        self._start = time.monotonic()
        if fd is not None:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)

    def emit(self, source: str, event: str, properties: Mapping[str, str] | None = None) -> None:
        elapsed = time.monotonic() - self._start
        secs = int(elapsed)
        record = {
            "timestamp": {"secs": secs, "nanos": int((elapsed - secs) * 1e9)},
            "source": source,
            "event": event,
            "properties": dict(properties) if properties is not None else None,
        }
        shown = ", ".join(f"{k} = {v}" for k, v in (properties or {}).items())
        log.info("Event: source = %s event = %s %s", source, event, shown)
        if self._fd is None:
            return
        data = json.dumps(record, indent=2).encode() + b"\n\n"
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(self._fd, data)

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

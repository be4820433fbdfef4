"""Offer a daemon's private memory to the kernel's same-page merging (KSM).

A pod's daemon is a fork of the shared parent, and most of what it holds alone are
pages of the parent it copied on write: CPython writes reference counts into every
object it touches. Daemons in the same state copy the same pages with the same
contents, which KSM can fold back into one, when the node runs it
(`/sys/kernel/mm/ksm/run`). Marking costs nothing while KSM is off.

The mark is per mapping (madvise), not per process: a process-wide mark
(PR_SET_MEMORY_MERGE) survives fork and exec, so the daemon would pass it on to the
VMM and its helpers, and an untrusted guest's memory would join the merging, with
the timing side channel that opens between guests.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterable, Iterator

from shim.libc import LIBC

log = logging.getLogger(__name__)

MADV_MERGEABLE = 12
# Mappings the kernel refuses or that only the kernel writes: nothing to merge.
_SKIPPED = ("[stack]", "[vvar]", "[vdso]", "[vsyscall]", "[vvar_vclock]")


def private_writable_ranges(maps_lines: Iterable[str]) -> Iterator[tuple[int, int]]:
    """(start, length) of each private writable mapping in /proc/PID/maps lines."""
    for line in maps_lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 5 or fields[1] != "rw-p":
            continue
        name = fields[5].strip() if len(fields) == 6 else ""
        if name in _SKIPPED:
            continue
        start_text, _, end_text = fields[0].partition("-")
        start, end = int(start_text, 16), int(end_text, 16)
        if end > start:
            yield start, end - start


def offer_own_memory() -> int:
    """Mark this process's private writable mappings mergeable; returns the bytes
    marked. Mappings made later (new allocations) are not marked: they hold this
    daemon's own objects, which no other daemon shares."""
    madvise = LIBC.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    marked = 0
    with open("/proc/self/maps") as maps:
        ranges = list(private_writable_ranges(maps))
    for start, length in ranges:
        if madvise(start, length, MADV_MERGEABLE) == 0:
            marked += length
        else:
            # EINVAL: a kernel built without KSM. Nothing to gain, nothing broken.
            log.debug("event=samepage_refused start=%#x errno=%d", start, ctypes.get_errno())
    return marked

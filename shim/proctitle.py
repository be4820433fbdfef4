"""Rewrite this process' command line, as `ps` and /proc/<pid>/cmdline show it.

A daemon forked from the shared parent (shim/forker.py) would otherwise show the
forker's command line. The kernel reads the command line from the process' own
argv memory (arg_start..arg_end, fields 48 and 49 of /proc/self/stat), so writing
there through /proc/self/mem changes what everyone sees; no capability is needed.
The new title must fit in the original argv's length: the forker is started with
room to spare.
"""

from __future__ import annotations

from collections.abc import Sequence


def argv_area() -> tuple[int, int]:
    """(start, end) addresses of this process' argv strings."""
    with open("/proc/self/stat", "rb") as stat_file:
        stat = stat_file.read()
    fields = stat[stat.rindex(b")") + 2 :].split()
    # Fields are numbered from 1 with pid and comm before the ')': arg_start is 48.
    return int(fields[48 - 3]), int(fields[49 - 3])


def set_title(argv: Sequence[str]) -> bool:
    """Make the command line `argv` (NUL-separated). False if it does not fit."""
    start, end = argv_area()
    room = end - start
    data = b"\0".join(arg.encode() for arg in argv) + b"\0"
    if len(data) > room:
        return False
    with open("/proc/self/mem", "r+b", buffering=0) as mem:
        mem.seek(start)
        mem.write(data + b"\0" * (room - len(data)))
    return True

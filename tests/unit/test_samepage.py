"""Which mappings a daemon offers to same-page merging (shim/samepage.py)."""

from __future__ import annotations

from pathlib import Path

from shim import samepage

MAPS = """\
55d0c8a00000-55d0c8a01000 r--p 00000000 08:01 1234 /usr/bin/python3.11
55d0c9000000-55d0c9400000 rw-p 00000000 00:00 0 [heap]
7f0000000000-7f0000100000 rw-p 00000000 00:00 0
7f0000200000-7f0000300000 rw-s 00000000 00:01 99 /memfd:guest (deleted)
7f0000400000-7f0000410000 rw-p 00012000 08:01 555 /usr/lib/libpython3.11.so.1.0
7f0000500000-7f0000510000 r-xp 00000000 08:01 555 /usr/lib/libpython3.11.so.1.0
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0 [stack]
7ffc00100000-7ffc00102000 r-xp 00000000 00:00 0 [vdso]
"""


def test_private_writable_mappings_are_offered_and_shared_ones_are_not() -> None:
    assert list(samepage.private_writable_ranges(MAPS.splitlines())) == [
        (0x55D0C9000000, 0x400000),  # the heap
        (0x7F0000000000, 0x100000),  # an anonymous arena
        (0x7F0000400000, 0x10000),  # a library's data, copied on write
    ]


def test_this_process_can_mark_its_memory() -> None:
    assert samepage.offer_own_memory() > 0
    smaps = Path("/proc/self/smaps").read_text().splitlines()
    assert [line for line in smaps if line.startswith("VmFlags:") and " mg" in line]

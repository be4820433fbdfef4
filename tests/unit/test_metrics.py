"""cgroup v2 Metrics for CRI: the wire field numbers of containerd/cgroups, and "max" handling.

The expected numbers below were read from containerd/cgroups v1.1.0
`v2/stats/metrics.proto` (what containerd 1.6 vendors); v3's
`cgroup2/stats/metrics.proto` keeps them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from shim import pbwire
from shim._pb.containerd.cgroups.v2 import metrics_pb2
from shim.metrics import TYPE_URL, UNLIMITED, cgroup_v2_metrics
from shim.types import ContainerStats

_pb: Any = metrics_pb2

# Metrics fields.
PIDS, CPU, MEMORY, MEMORY_EVENTS = 1, 2, 4, 8
# field number -> ContainerStats attribute, per sub-message.
PIDS_FIELDS = {1: "pids_current", 2: "pids_limit"}
CPU_FIELDS = {
    1: "cpu_usage_usec",
    2: "cpu_user_usec",
    3: "cpu_system_usec",
    4: "cpu_nr_periods",
    5: "cpu_nr_throttled",
    6: "cpu_throttled_usec",
}
MEMORY_FIELDS = {
    1: "memory_anon",
    2: "memory_file",
    3: "memory_kernel_stack",
    4: "memory_slab",
    13: "memory_inactive_file",
    14: "memory_active_file",
    18: "memory_pgfault",
    19: "memory_pgmajfault",
    32: "memory_usage",
    33: "memory_limit",
    34: "memory_swap_usage",
}
MEMORY_EVENTS_FIELDS = {4: "memory_oom_events", 5: "memory_oom_kill"}


def sample() -> ContainerStats:
    """Every field a distinct value, so a swapped field shows."""
    names = [f.name for f in dataclasses.fields(ContainerStats)]
    return ContainerStats(**{name: 1000 + i for i, name in enumerate(names)})


def submessages(data: bytes) -> dict[int, dict[int, int]]:
    out: dict[int, dict[int, int]] = {}
    for number, wire, value in pbwire.fields(data):
        assert wire == pbwire.LEN and isinstance(value, bytes)
        inner: dict[int, int] = {}
        for sub_number, sub_wire, sub_value in pbwire.fields(value):
            assert sub_wire == pbwire.VARINT and isinstance(sub_value, int)
            inner[sub_number] = sub_value
        out[number] = inner
    return out


def test_type_url_is_the_full_message_name() -> None:
    type_url, _ = cgroup_v2_metrics(sample())
    assert type_url == "io.containerd.cgroups.v2.Metrics"
    assert _pb.Metrics.DESCRIPTOR.full_name == TYPE_URL


def test_wire_field_numbers_match_containerd_cgroups() -> None:
    stats = sample()
    _, data = cgroup_v2_metrics(stats)
    wire = submessages(data)
    assert set(wire) == {PIDS, CPU, MEMORY, MEMORY_EVENTS}
    for number, table in [
        (PIDS, PIDS_FIELDS),
        (CPU, CPU_FIELDS),
        (MEMORY, MEMORY_FIELDS),
        (MEMORY_EVENTS, MEMORY_EVENTS_FIELDS),
    ]:
        assert wire[number] == {field: getattr(stats, name) for field, name in table.items()}


def test_decodes_with_the_generated_class_and_fills_what_cri_reads() -> None:
    stats = dataclasses.replace(
        sample(), memory_usage=50 << 20, memory_inactive_file=10 << 20, memory_limit=64 << 20
    )
    _, data = cgroup_v2_metrics(stats)
    m = _pb.Metrics.FromString(data)
    # What containerd 1.6 CRI reads (container_stats_list_linux.go).
    assert m.cpu.usage_usec == stats.cpu_usage_usec
    assert m.memory.usage == 50 << 20
    working_set = m.memory.usage - m.memory.inactive_file
    assert working_set == 40 << 20
    assert m.memory.usage_limit - working_set == 24 << 20
    assert m.memory.anon == stats.memory_anon
    assert m.memory.pgfault == stats.memory_pgfault
    assert m.memory.pgmajfault == stats.memory_pgmajfault
    assert m.memory_events.oom_kill == stats.memory_oom_kill


def test_max_limits_become_max_uint64_as_containerd_reads_them() -> None:
    stats = dataclasses.replace(sample(), memory_limit=0, pids_limit=0)
    _, data = cgroup_v2_metrics(stats)
    m = _pb.Metrics.FromString(data)
    assert m.memory.usage_limit == UNLIMITED == 2**64 - 1
    assert m.pids.limit == UNLIMITED
    # CRI treats a limit above 2^62 as unlimited (available_bytes 0), not as a wrapped number.
    assert m.memory.usage_limit > 1 << 62

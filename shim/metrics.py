"""Guest cgroup v2 figures as `io.containerd.cgroups.v2.Metrics`, the Any that CRI decodes.

The message is proto/containerd/cgroups/v2/metrics.proto: the field numbers of
containerd/cgroups `cgroup2/stats/metrics.proto` (v3), a superset of the
`v2/stats/metrics.proto` that containerd 1.6 vendors (cgroups v1.1.0; its
decoder skips the newer fields). The type URL is the bare message name, as
typeurl writes it for these types.

containerd 1.6's CRI (pkg/cri/server/container_stats_list_linux.go) reads, for
v2 metrics: cpu.usage_usec (x1000 = usage_core_nano_seconds),
memory.usage (usage_bytes), memory.usage - memory.inactive_file
(working_set_bytes), memory.usage_limit - working set (available_bytes, unless
the limit is above 2^62 = unlimited), memory.anon (rss_bytes), memory.pgfault
and memory.pgmajfault.

"max" is 0 in the agent's reply; containerd's own cgroup reader turns "max"
into 2^64-1, and so does this module for memory.max and pids.max. Sending 0
would make CRI compute available_bytes as 0 - working set, a wrapped uint64.
(A real memory.max of 0 is reported as unlimited: the agent cannot tell them
apart, and such a container cannot run anyway.)
"""

from __future__ import annotations

from typing import Any

from shim._pb.containerd.cgroups.v2 import metrics_pb2 as _metrics_pb2
from shim.types import ContainerStats

_pb: Any = _metrics_pb2

TYPE_URL = "io.containerd.cgroups.v2.Metrics"
UNLIMITED = (1 << 64) - 1


def _limit(value: int) -> int:
    return value if value else UNLIMITED


def cgroup_v2_metrics(stats: ContainerStats) -> tuple[str, bytes]:
    """(type_url, value) of the Any for StatsResponse.stats."""
    m = _pb.Metrics()
    m.pids.current = stats.pids_current
    m.pids.limit = _limit(stats.pids_limit)

    cpu = m.cpu
    cpu.usage_usec = stats.cpu_usage_usec
    cpu.user_usec = stats.cpu_user_usec
    cpu.system_usec = stats.cpu_system_usec
    cpu.nr_periods = stats.cpu_nr_periods
    cpu.nr_throttled = stats.cpu_nr_throttled
    cpu.throttled_usec = stats.cpu_throttled_usec

    mem = m.memory
    mem.usage = stats.memory_usage
    mem.usage_limit = _limit(stats.memory_limit)
    mem.anon = stats.memory_anon
    mem.file = stats.memory_file
    mem.kernel_stack = stats.memory_kernel_stack
    mem.slab = stats.memory_slab
    mem.inactive_file = stats.memory_inactive_file
    mem.active_file = stats.memory_active_file
    mem.pgfault = stats.memory_pgfault
    mem.pgmajfault = stats.memory_pgmajfault
    mem.swap_usage = stats.memory_swap_usage
    # swap_limit stays unset: the agent does not read memory.swap.max.

    m.memory_events.oom = stats.memory_oom_events
    m.memory_events.oom_kill = stats.memory_oom_kill
    return TYPE_URL, bytes(m.SerializeToString())

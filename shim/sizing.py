"""How big a pod's VM is: config defaults, CRI sandbox resources, pod annotations.

Pure: `vm_size()` reads only its arguments; the caller supplies the host's CPU
count and logs `ignored_annotations()`.

The rules, in order:

1. Base: `config.default_vcpus`, `config.default_max_vcpus` (capped at the host's
   CPUs) and `config.default_memory_mib`.
2. Workload (CRI sandbox annotations, set by containerd only when the pod has
   resources): "default + workload", as Kata's static sandbox sizing does.
   The default is the guest's own share (kernel, agent, page cache), so it is
   also the overhead the issue talks about; no separate overhead is added.
   - vCPUs = ceil(default_vcpus + cpu-quota / cpu-period), capped at the host's
     CPUs (a pod that asks for the whole host still runs). Quota or period
     missing or <= 0 (unlimited) adds nothing.
   - memory = default_memory_mib + ceil(sandbox-memory bytes / MiB); <= 0 adds
     nothing.
3. Pod annotations override the result: the value under
   `io.cloudhv.config.hypervisor.` wins over `io.katacontainers.config.hypervisor.`.
   An override is the VM's size, not a base the workload is added to (unlike
   Kata's static sizing): what the user wrote is what the guest sees.
   - default_vcpus: a number > 0 and <= host CPUs, parsed as Kata does (float32)
     and rounded up: "1.5" gives 2.
   - default_max_vcpus: an integer <= host CPUs and >= the VM's vCPUs; 0 means
     all host CPUs (Kata's meaning of 0). Without it, max_vcpus is raised to
     the vCPUs when they are above the default.
   - default_memory: an integer number of MiB in [128, 262144]. Kata's minimum
     is 256 (MinHypervisorMemory) because its guest runs a larger agent; ours
     (a C agent and crun, no init system) boots in 128, the minimum the
     Cloud Hypervisor shim we follow also used. Every value Kata accepts is
     accepted here. 262144 (256 GiB) catches typos (a value in KiB or bytes).
   - kernel_params: appended to the kernel command line. Printable ASCII only
     (a newline, NUL or tab could break the command line or the VMM's argv),
     balanced double quotes, and only parameters in KERNEL_PARAMS (or a
     `sysctl.` one): tuning and debugging knobs. Anything else is refused by
     name: console=, init=, rdinit=, root= and the like would keep the VM from
     booting its agent or from reporting it ready, which shows up only as a
     timeout. None may set a key the configured `kernel_args` already sets.
   Both prefixes are validated even when one is overridden: a bad value is an
   error, never silently dropped. Other keys under the prefixes are ignored
   (Kata has many we do not implement); `ignored_annotations()` lists them.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from shim.config import Config
from shim.errors import InvalidArgument

PREFIXES = ("io.cloudhv.config.hypervisor.", "io.katacontainers.config.hypervisor.")
SUPPORTED = ("default_vcpus", "default_max_vcpus", "default_memory", "kernel_params")

CRI_CPU_QUOTA = "io.kubernetes.cri.sandbox-cpu-quota"
CRI_CPU_PERIOD = "io.kubernetes.cri.sandbox-cpu-period"
CRI_MEMORY = "io.kubernetes.cri.sandbox-memory"

MIN_MEMORY_MIB = 128
MAX_MEMORY_MIB = 262144
MIB = 1 << 20
# x86 COMMAND_LINE_SIZE is 2048 bytes with the NUL; the VMM backends prepend a
# console= parameter, and this leaves them room for it.
CMDLINE_MAX = 2047
CMDLINE_RESERVED = 64

# The kernel parameters a pod may add: tuning and debugging, nothing that changes how
# the guest boots, where its console goes or what runs as init.
KERNEL_PARAMS = frozenset({
    "audit", "cgroup.memory", "cgroup_disable", "clocksource", "debug",
    "default_hugepagesz", "hugepages", "hugepagesz", "ignore_loglevel", "init_on_alloc",
    "init_on_free", "ipv6.disable", "loglevel", "mitigations", "nmi_watchdog", "nokaslr",
    "nohz", "page_alloc.shuffle", "printk.devkmsg", "quiet", "random.trust_cpu",
    "slub_debug", "swapaccount", "transparent_hugepage", "tsc",
})
KERNEL_PARAM_PREFIXES = ("sysctl.",)

_UINT32_MAX = 0xFFFFFFFF
_INT64 = re.compile(r"[+-]?[0-9]+")
_UINT = re.compile(r"0*[0-9]{1,10}")  # a uint32 has at most 10 significant digits
# What Go's strconv.ParseFloat accepts for plain decimals (no hex, inf or NaN).
_FLOAT = re.compile(r"\+?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


@dataclass(frozen=True)
class VmSize:
    vcpus: int
    max_vcpus: int
    memory_mib: int
    kernel_params: str  # extra kernel command line, "" for none


def vm_size(
    config: Config,
    annotations: Mapping[str, str],
    host_cpus: int,
    *,
    host_memory_mib: int | None = None,
) -> VmSize:
    """The VM size for a pod whose sandbox spec carries `annotations`.

    Raises InvalidArgument naming the annotation, its value and what is allowed,
    also when the VM would need more memory than the host has (`host_memory_mib`).
    """
    host_cpus = max(1, host_cpus)
    default_max = min(config.default_max_vcpus, host_cpus)

    vcpus = config.default_vcpus
    workload_cpus = _workload_cpus(annotations)
    if workload_cpus:
        vcpus = min(host_cpus, _ceil_f32(config.default_vcpus + workload_cpus))
    memory = config.default_memory_mib + _workload_mib(annotations)

    vcpu_values = [
        _vcpus(key, value, host_cpus) for key, value in _values(annotations, "default_vcpus")
    ]
    if vcpu_values:
        vcpus = vcpu_values[0]

    max_vcpus = max(default_max, vcpus)
    for index, (key, value) in enumerate(_values(annotations, "default_max_vcpus")):
        parsed = _max_vcpus(key, value, vcpus, host_cpus)
        if index == 0:
            max_vcpus = parsed

    memory_values = [_memory(key, value) for key, value in _values(annotations, "default_memory")]
    memory_key = CRI_MEMORY
    if memory_values:
        memory = memory_values[0]
        memory_key = _values(annotations, "default_memory")[0][0]
    if host_memory_mib is not None and memory > host_memory_mib:
        raise _invalid(
            memory_key,
            annotations.get(memory_key, ""),
            f"the VM would need {memory} MiB of memory, more than the host's "
            f"{host_memory_mib} MiB",
        )

    params = [
        _kernel_params(key, value, config.kernel_args)
        for key, value in _values(annotations, "kernel_params")
    ]
    return VmSize(
        vcpus=vcpus,
        max_vcpus=max_vcpus,
        memory_mib=memory,
        kernel_params=params[0] if params else "",
    )


def ignored_annotations(annotations: Mapping[str, str]) -> list[str]:
    """Keys under the hypervisor prefixes that the shim does not implement (for a debug log)."""
    return sorted(
        key for key in annotations if key.startswith(PREFIXES) and _suffix(key) not in SUPPORTED
    )


def _suffix(key: str) -> str:
    for prefix in PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return ""


def _values(annotations: Mapping[str, str], name: str) -> list[tuple[str, str]]:
    """(key, value) for `name` under each prefix that is set, the winning one first."""
    return [
        (prefix + name, annotations[prefix + name])
        for prefix in PREFIXES
        if prefix + name in annotations
    ]


def _invalid(key: str, value: str, allowed: str) -> InvalidArgument:
    return InvalidArgument(f"annotation {key}={json.dumps(value)}: {allowed}")


def _ceil_f32(value: float) -> int:
    """Round up as Kata does: the value is a float32 there, so 1.00000001 is 1."""
    (as_f32,) = struct.unpack("f", struct.pack("f", value))
    return math.ceil(float(as_f32))


def _vcpus(key: str, value: str, host_cpus: int) -> int:
    allowed = (
        f"must be a number of vCPUs greater than 0 and at most {host_cpus} "
        "(the host's CPUs); a fraction is rounded up"
    )
    if not _FLOAT.fullmatch(value):
        raise _invalid(key, value, allowed)
    number = float(value)
    if not 0 < number <= host_cpus:
        raise _invalid(key, value, allowed)
    return max(1, _ceil_f32(number))


def _max_vcpus(key: str, value: str, vcpus: int, host_cpus: int) -> int:
    allowed = (
        f"must be an integer number of vCPUs between {vcpus} (the VM's vCPUs) and "
        f"{host_cpus} (the host's CPUs), or 0 for all the host's CPUs"
    )
    if not _UINT.fullmatch(value):
        raise _invalid(key, value, allowed)
    number = int(value)
    if number == 0:
        return host_cpus
    if not vcpus <= number <= host_cpus:
        raise _invalid(key, value, allowed)
    return number


def _memory(key: str, value: str) -> int:
    allowed = f"must be an integer number of MiB between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB}"
    if not _UINT.fullmatch(value):
        raise _invalid(key, value, allowed)
    number = int(value)
    if not MIN_MEMORY_MIB <= number <= MAX_MEMORY_MIB:
        raise _invalid(key, value, allowed)
    return number


def _kernel_params(key: str, value: str, kernel_args: str) -> str:
    room = CMDLINE_MAX - CMDLINE_RESERVED - len(kernel_args) - 1
    if any(not " " <= ch <= "~" for ch in value):
        raise _invalid(
            key, value, "must be printable ASCII: no newline, tab, NUL or other control character"
        )
    if value.count('"') % 2:
        raise _invalid(key, value, "has an unbalanced double quote")
    params = value.strip()
    if len(params) > room:
        raise _invalid(
            key,
            value,
            f"is {len(params)} characters; the kernel command line has room for {room} more",
        )
    taken = {arg.split("=", 1)[0] for arg in kernel_args.split() if "=" in arg}
    for arg in _split_params(params):
        name = arg.split("=", 1)[0]
        if name not in KERNEL_PARAMS and not name.startswith(KERNEL_PARAM_PREFIXES):
            raise _invalid(
                key,
                value,
                f"may not set {name!r}: allowed are {', '.join(sorted(KERNEL_PARAMS))} "
                f"and sysctl.*",
            )
        if "=" in arg and name in taken:
            raise _invalid(
                key,
                value,
                f"must not set {name}=: the shim's kernel_args set it and the VM needs it to boot",
            )
    return params


def _split_params(params: str) -> list[str]:
    """Split like the kernel does: on spaces outside double quotes."""
    out: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in params:
        if ch == '"':
            quoted = not quoted
        if ch == " " and not quoted:
            if current:
                out.append("".join(current))
            current = []
        else:
            current.append(ch)
    if current:
        out.append("".join(current))
    return out


def _cri_int(annotations: Mapping[str, str], key: str) -> int:
    value = annotations.get(key, "")
    if not value:
        return 0
    if len(value) > 20 or not _INT64.fullmatch(value) or not -(1 << 63) <= int(value) < 1 << 63:
        raise _invalid(key, value, "must be a decimal 64-bit integer")
    return int(value)


def _workload_cpus(annotations: Mapping[str, str]) -> float:
    quota = _cri_int(annotations, CRI_CPU_QUOTA)
    period = _cri_int(annotations, CRI_CPU_PERIOD)
    if quota <= 0 or period <= 0:
        return 0.0
    return quota / period


def _workload_mib(annotations: Mapping[str, str]) -> int:
    limit = _cri_int(annotations, CRI_MEMORY)
    return -(-limit // MIB) if limit > 0 else 0

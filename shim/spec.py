"""Pure helpers over the OCI runtime spec (bundle config.json) and CRI annotations.

Only the standard library: `start` imports this to find the pod a task belongs to.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
CONTAINER_TYPE = "io.kubernetes.cri.container-type"

# containerd's identifier rule (pkg/identifiers): what it accepts as a task id.
_IDENTIFIER = re.compile(r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*")
IDENTIFIER_MAX = 76

PROCESS_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
RESOURCES_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"


class SpecError(ValueError):
    """The bundle's config.json (or an exec spec) is missing or malformed."""


class TaskKind(enum.Enum):
    SANDBOX = "sandbox"  # a CRI pod's pause container: the VM itself
    CONTAINER = "container"  # a CRI app container, joining its sandbox's VM
    STANDALONE = "standalone"  # no CRI annotations (`ctr run`): a pod of one


@dataclass(frozen=True)
class TaskIdentity:
    pod_id: str
    kind: TaskKind


def check_identifier(what: str, value: str) -> str:
    """`value` if containerd would accept it as an id; SpecError naming it otherwise.

    Ids become file names and socket keys: `../x` must never get that far.
    """
    if len(value) > IDENTIFIER_MAX or not _IDENTIFIER.fullmatch(value):
        raise SpecError(
            f"{what} {value!r} is not a valid id: letters and digits, separated by single "
            f"'.', '_' or '-', at most {IDENTIFIER_MAX} characters"
        )
    return value


def identify(task_id: str, annotations: Mapping[str, str]) -> TaskIdentity:
    """Which pod a task belongs to and what role it plays there; SpecError for a bad id."""
    check_identifier("task id", task_id)
    sandbox_id = annotations.get(SANDBOX_ID, "")
    if sandbox_id:
        check_identifier(f"annotation {SANDBOX_ID}", sandbox_id)
    kind = annotations.get(CONTAINER_TYPE, "")
    if kind == "sandbox":
        return TaskIdentity(sandbox_id or task_id, TaskKind.SANDBOX)
    if kind == "container" and sandbox_id:
        return TaskIdentity(sandbox_id, TaskKind.CONTAINER)
    if sandbox_id and sandbox_id != task_id:
        return TaskIdentity(sandbox_id, TaskKind.CONTAINER)
    return TaskIdentity(task_id, TaskKind.STANDALONE)


def read_spec(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError as err:
        raise SpecError(f"OCI spec {path}: not found") from err
    except OSError as err:
        raise SpecError(f"OCI spec {path}: {err.strerror or err}") from err
    except ValueError as err:
        raise SpecError(f"OCI spec {path}: invalid JSON: {err}") from err
    if not isinstance(data, dict):
        raise SpecError(f"OCI spec {path}: not a JSON object")
    return data


def annotations_of(spec: Mapping[str, Any]) -> dict[str, str]:
    raw = spec.get("annotations") or {}
    if not isinstance(raw, dict):
        raise SpecError("OCI spec: annotations is not an object")
    return {str(k): str(v) for k, v in raw.items()}


def hostname_of(spec: Mapping[str, Any]) -> str:
    """The spec's hostname (CRI sets the pod's on the sandbox spec), "" when unset."""
    hostname = spec.get("hostname") or ""
    if not isinstance(hostname, str):
        raise SpecError("OCI spec: hostname is not a string")
    return hostname


def root_path_of(spec: Mapping[str, Any], bundle: Path) -> str:
    """root.path as an absolute host path (a relative one is the bundle's); "" if unset."""
    root = spec.get("root") or {}
    path = root.get("path", "") if isinstance(root, dict) else ""
    if not isinstance(path, str):
        raise SpecError("OCI spec: root.path is not a string")
    return str(bundle / path) if path else ""


def cgroups_path_of(spec: Mapping[str, Any]) -> str:
    """linux.cgroupsPath, "" when unset."""
    linux = spec.get("linux") or {}
    path = linux.get("cgroupsPath", "") if isinstance(linux, dict) else ""
    if not isinstance(path, str):
        raise SpecError("OCI spec: linux.cgroupsPath is not a string")
    return path


@dataclass(frozen=True)
class PodOptions:
    """What a sandbox spec says about the pod as a whole, for the guest's SetupPod."""

    sysctls: Mapping[str, str] = field(default_factory=dict)  # the pod's linux.sysctl
    node_pid: bool = False  # CRI NamespaceMode NODE: the pod uses the VM's PID namespace
    node_ipc: bool = False  # ... and the VM's IPC namespace
    cgroups_path: str = ""  # linux.cgroupsPath: the VM's processes are charged there
    netns: str = ""  # the pod's network namespace (CNI's interfaces are there); "" for none
    resolv_conf: str = ""  # containerd's resolv.conf for the pod, bind-mounted in the spec


HOST_NETWORK = (
    "the pod asks for the host's network (its spec has no network namespace: "
    "hostNetwork), which a VM cannot share: the guest has its own kernel and network "
    "stack. Run it without hostNetwork, or with a runtime that is not a VM"
)


def netns_of(spec: Mapping[str, Any]) -> str:
    """The network namespace path of a VM's spec: "" for a new, empty one (`ctr run`
    without CNI); SpecError for the host's network, which a VM cannot join."""
    linux = spec.get("linux") or {}
    if not isinstance(linux, dict):
        raise SpecError("OCI spec: linux is not an object")
    namespaces = linux.get("namespaces") or []
    if not isinstance(namespaces, list) or not all(isinstance(n, dict) for n in namespaces):
        raise SpecError("OCI spec: linux.namespaces is not a list of objects")
    for entry in namespaces:
        if entry.get("type") == "network":
            path = entry.get("path") or ""
            if not isinstance(path, str):
                raise SpecError("OCI spec: the network namespace's path is not a string")
            return path
    raise SpecError(HOST_NETWORK)


def resolv_conf_of(spec: Mapping[str, Any]) -> str:
    """The host file containerd bind-mounts on /etc/resolv.conf, "" if none."""
    for mount in mounts_of(spec):
        source = mount.get("source")
        if mount.get("destination") == "/etc/resolv.conf" and isinstance(source, str):
            return source
    return ""


def pod_options(spec: Mapping[str, Any]) -> PodOptions:
    """The pod's sysctls and NODE namespaces from its sandbox spec. containerd writes
    the pod's sysctls into linux.sysctl, and leaves out the pid or ipc namespace
    entry when the pod's NamespaceOption for it is NODE."""
    linux = spec.get("linux") or {}
    if not isinstance(linux, dict):
        raise SpecError("OCI spec: linux is not an object")
    sysctls = linux.get("sysctl") or {}
    if not isinstance(sysctls, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in sysctls.items()
    ):
        raise SpecError("OCI spec: linux.sysctl is not an object of strings")
    namespaces = linux.get("namespaces") or []
    if not isinstance(namespaces, list) or not all(isinstance(n, dict) for n in namespaces):
        raise SpecError("OCI spec: linux.namespaces is not a list of objects")
    types = {n.get("type") for n in namespaces}
    return PodOptions(
        sysctls=dict(sysctls),
        node_pid="pid" not in types,
        node_ipc="ipc" not in types,
        cgroups_path=cgroups_path_of(spec),
        netns=netns_of(spec),
        resolv_conf=resolv_conf_of(spec),
    )


def owns_pid_namespace(spec: Mapping[str, Any]) -> bool:
    """Whether the container gets a PID namespace of its own: a `pid` entry with no
    path (CRI's CONTAINER). One with a path (POD) or none at all (NODE) shares."""
    linux = spec.get("linux") or {}
    namespaces = (linux.get("namespaces") or []) if isinstance(linux, dict) else []
    for entry in namespaces if isinstance(namespaces, list) else []:
        if isinstance(entry, dict) and entry.get("type") == "pid":
            return not entry.get("path")
    return False


def mounts_of(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The spec's mounts, each checked to be a JSON object."""
    raw = spec.get("mounts") or []
    if not isinstance(raw, list) or not all(isinstance(m, dict) for m in raw):
        raise SpecError("OCI spec: mounts is not a list of objects")
    return raw


def bundle_annotations(bundle: Path) -> dict[str, str]:
    """Annotations of `bundle`/config.json; {} when the file is absent."""
    try:
        return annotations_of(read_spec(bundle / "config.json"))
    except SpecError:
        return {}


def exec_process_json(type_url: str, value: bytes) -> bytes:
    """Validate an exec's spec Any and return the Process JSON for the agent."""
    if type_url.rsplit("/", 1)[-1] != "Process" and type_url != PROCESS_TYPE_URL:
        raise SpecError(f"exec spec has type {type_url!r}, want {PROCESS_TYPE_URL!r}")
    try:
        process = json.loads(value)
    except ValueError as err:
        raise SpecError(f"exec spec: invalid JSON: {err}") from err
    if not isinstance(process, dict):
        raise SpecError("exec spec: Process is not a JSON object")
    args = process.get("args")
    if not isinstance(args, list) or not args:
        raise SpecError("exec spec: process.args must be a non-empty list")
    return bytes(value)


def resources_json(type_url: str, value: bytes) -> bytes:
    """Validate an Update's resources Any (OCI LinuxResources JSON)."""
    if not type_url.endswith("LinuxResources"):
        raise SpecError(f"update resources have type {type_url!r}, want {RESOURCES_TYPE_URL!r}")
    try:
        resources = json.loads(value)
    except ValueError as err:
        raise SpecError(f"update resources: invalid JSON: {err}") from err
    if not isinstance(resources, dict):
        raise SpecError("update resources: LinuxResources is not a JSON object")
    return bytes(value)


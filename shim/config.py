"""The shim's configuration file (`config/cloudhv.json`), read through pydantic.

Where it comes from, first match wins: the CRI runtime option `ConfigPath`
(runtimeoptions.v1.Options.config_path on `start`'s stdin, specific to one
runtime handler), the `CLOUDHV_CONFIG` environment variable, then
`/etc/cloudhv/config.json`. Unknown keys are errors, and every error is one line
naming the file, the field and what is allowed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

DEFAULT_PATH = Path("/etc/cloudhv/config.json")
ENV_VAR = "CLOUDHV_CONFIG"


class ConfigError(Exception):
    """The configuration is missing, unreadable or invalid; the message is one line."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QemuConfig(_Model):
    binary: Path = Path("/usr/bin/qemu-system-x86_64")
    accel: Literal["tcg", "kvm"] = "tcg"
    vsock_backend: Path = Path("/usr/bin/vhost-device-vsock")
    hotplug_slots: int = Field(default=8, ge=1, le=32)


class CloudHypervisorConfig(_Model):
    binary: Path = Path("/usr/local/bin/cloud-hypervisor")


class Config(_Model):
    vmm: Literal["qemu", "cloud-hypervisor"]
    qemu: QemuConfig = QemuConfig()
    cloud_hypervisor: CloudHypervisorConfig = CloudHypervisorConfig()
    kernel_path: Path
    rootfs_path: Path
    kernel_args: str
    default_vcpus: int = Field(default=1, ge=1)
    default_max_vcpus: int = Field(default=2, ge=1)
    default_memory_mib: int = Field(default=256, ge=64)
    max_containers_per_vm: int = Field(default=5, ge=1)
    agent_port: int = Field(default=1024, ge=1, le=0xFFFFFFFF)
    agent_startup_timeout_s: float = Field(default=20.0, gt=0)
    state_dir: Path = Path("/run/cloudhv")
    cache_dir: Path = Path("/var/cache/cloudhv/rootfs")
    # Writable per-container root disks. On disk, not under /run: a container that
    # writes a lot must not fill a tmpfs (host RAM).
    disk_dir: Path = Path("/var/lib/cloudhv/disks")
    # Free space given to a container's root disk beyond its image (sparse: costs
    # nothing until written).
    container_disk_headroom_mib: int = Field(default=1024, ge=16)
    debug: bool = False


def resolve_path(option_path: str | None, env: Mapping[str, str] | None = None) -> Path:
    """Which file to load: runtime option, then $CLOUDHV_CONFIG, then the default."""
    if option_path:
        return Path(option_path)
    from_env = (os.environ if env is None else env).get(ENV_VAR, "")
    return Path(from_env) if from_env else DEFAULT_PATH


def load(path: Path) -> Config:
    """Read and validate `path`. Raises ConfigError with one clear line."""
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"config {path}: cannot read: {err.strerror or err}") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"config {path}: invalid JSON at line {err.lineno}: {err.msg}") from err
    return parse(data, f"config {path}")


def parse(data: Any, source: str = "config") -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: must be a JSON object, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: {describe(err)}") from None


def describe(err: ValidationError) -> str:
    """One line per pydantic error, joined with '; ': `field.sub: what is wrong`."""
    parts = []
    for item in err.errors(include_url=False):
        where = ".".join(str(p) for p in item["loc"]) or "(root)"
        kind = item["type"]
        ctx = item.get("ctx") or {}
        if kind == "extra_forbidden":
            what = "unknown key (not allowed)"
        elif kind == "missing":
            what = "required but missing"
        elif kind == "literal_error":
            what = f"must be one of {ctx.get('expected', '?')} (got {item.get('input')!r})"
        else:
            what = f"{item['msg']} (got {item.get('input')!r})"
        parts.append(f"{where}: {what}")
    return "; ".join(parts)

"""The shim's configuration file (`config/cloudhv.json`): one definition, two readers.

Where it comes from, first match wins: the CRI runtime option `ConfigPath`
(runtimeoptions.v1.Options.config_path on `start`'s stdin, specific to one
runtime handler), the `CLOUDHV_CONFIG` environment variable, then
`/etc/cloudhv/config.json`. Unknown keys are errors, and every error is one line
naming the file, the field and what is allowed.

The fields are frozen stdlib dataclasses, so importing this module costs almost
nothing. `load`/`parse` validate with pydantic, imported on first use: `start` (when
it spawns a pod's daemon) and `delete` pay for it, never the long-lived daemon
(pydantic and its schemas cost ~8 MiB PSS per daemon, one daemon per pod). `start`
hands the validated config to the daemon as JSON (`dumps`), and the daemon rebuilds
it with `from_trusted`, which converts types but checks nothing.

No `from __future__ import annotations` here: pydantic and `from_trusted` read the
field types at run time.
"""

import dataclasses
import json
import os
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

DEFAULT_PATH = Path("/etc/cloudhv/config.json")
MAX_BYTES = 1 << 20
ENV_VAR = "CLOUDHV_CONFIG"
_T = TypeVar("_T")


class ConfigError(Exception):
    """The configuration is missing, unreadable or invalid; the message is one line."""


@dataclass(frozen=True)
class Range:
    """Bounds of a numeric field, for `Annotated[int, Range(ge=1)]`.

    It satisfies annotated_types' GroupedMetadata protocol, which pydantic unpacks,
    and creates the annotated_types constraints only when iterated: importing this
    module loads neither annotated_types nor the typing_extensions it pulls in.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None

    __is_annotated_types_grouped_metadata__ = True

    def __iter__(self) -> Iterator[object]:
        import annotated_types

        if self.ge is not None:
            yield annotated_types.Ge(self.ge)
        if self.gt is not None:
            yield annotated_types.Gt(self.gt)
        if self.le is not None:
            yield annotated_types.Le(self.le)


TCG_TB_SIZE_MIB = 32  # docs/performance.md: the VMM's PSS and boot time against it

# Read by pydantic on stdlib dataclasses (ConfigDict is a TypedDict: a plain dict will do).
_FORBID_EXTRA = {"extra": "forbid"}


@dataclass(frozen=True, kw_only=True)
class QemuConfig:
    __pydantic_config__ = _FORBID_EXTRA

    binary: Path = Path("/usr/bin/qemu-system-x86_64")
    accel: Literal["tcg", "kvm"] = "tcg"
    vsock_backend: Path = Path("/usr/bin/vhost-device-vsock")
    hotplug_slots: Annotated[int, Range(ge=1, le=32)] = 8
    # TCG's translated-code cache. QEMU's own default (1 GiB) is a ceiling a small
    # guest keeps filling, and every page of it is the host's; 0 keeps that default.
    tcg_tb_size_mib: Annotated[int, Range(ge=0, le=1024)] = TCG_TB_SIZE_MIB
    # A virtio-balloon that only reports the guest's free pages, which QEMU then gives
    # back to the host: memory a workload used and freed stops costing the node.
    free_page_reporting: bool = True
    # TCG only: crun in the guest runs without address randomisation, so that QEMU
    # reuses the code it translated for the previous run (agent/src/bootopts.h); every
    # container's own processes keep theirs.
    tcg_crun_fixed_layout: bool = True


@dataclass(frozen=True, kw_only=True)
class CloudHypervisorConfig:
    __pydantic_config__ = _FORBID_EXTRA

    binary: Path = Path("/usr/local/bin/cloud-hypervisor")
    # Landlock confines CH to the pod's own paths (docs/cloud-hypervisor.md).
    landlock: bool = True
    # Devices plugged at once. CH places them on PCI segment 0: 32 slots, of which the
    # host bridge, the root disk, vsock and rng take 4.
    hotplug_slots: Annotated[int, Range(ge=1, le=28)] = 16
    # As qemu.free_page_reporting: a balloon of size 0 that reports the guest's free
    # pages, which CH gives back to the host.
    free_page_reporting: bool = True


@dataclass(frozen=True, kw_only=True)
class VirtiofsConfig:
    """Directory volumes shared live with the guest (docs/volumes.md)."""

    __pydantic_config__ = _FORBID_EXTRA

    # Off: no virtiofsd and no virtio-fs device; a directory volume that is not
    # kubelet's small-file kind is then refused at create.
    enabled: bool = True
    # The C virtiofsd of Debian 12's QEMU (package qemu-system-common). Its command
    # line is the one spoken (`--socket-path`, `-o source=`), checked at pod boot.
    binary: Path = Path("/usr/lib/qemu/virtiofsd")
    # How long the guest may trust what it looked up: auto (1 s), always, none.
    cache: Literal["auto", "always", "none"] = "auto"


@dataclass(frozen=True, kw_only=True)
class RootfsCacheConfig:
    """The host's shared cache of read-only image disks (docs/rootfs.md)."""

    __pydantic_config__ = _FORBID_EXTRA

    # EROFS: smaller, faster to build, mount and read than ext4 (docs/rootfs.md).
    format: Literal["ext4", "erofs"] = "erofs"
    # Least recently used entries that no pod uses go above this many MiB on disk.
    max_mib: Annotated[int, Range(ge=1)] = 10240


@dataclass(frozen=True, kw_only=True)
class ContainerUpperConfig:
    """Each container's writable layer, an overlay upper in the guest."""

    __pydantic_config__ = _FORBID_EXTRA

    # "disk": a sparse ext4 file per container (host disk); "tmpfs": guest memory.
    kind: Literal["disk", "tmpfs"] = "disk"
    size_mib: Annotated[int, Range(ge=16)] = 1024


@dataclass(frozen=True, kw_only=True)
class PoolConfig:
    """Pre-booted VMs waiting for pods (docs/pool.md)."""

    __pydantic_config__ = _FORBID_EXTRA

    # VMs of the default size kept booted, with no pod identity, by the shared
    # parent (shim/forker.py); 0: no pool, every pod boots its own VM.
    size: Annotated[int, Range(ge=0, le=64)] = 0


@dataclass(frozen=True, kw_only=True)
class Config:
    __pydantic_config__ = _FORBID_EXTRA

    vmm: Literal["qemu", "cloud-hypervisor"]
    qemu: QemuConfig = field(default_factory=QemuConfig)
    cloud_hypervisor: CloudHypervisorConfig = field(default_factory=CloudHypervisorConfig)
    virtiofs: VirtiofsConfig = field(default_factory=VirtiofsConfig)
    kernel_path: Path
    rootfs_path: Path
    kernel_args: str
    default_vcpus: Annotated[int, Range(ge=1)] = 1
    default_max_vcpus: Annotated[int, Range(ge=1)] = 2
    default_memory_mib: Annotated[int, Range(ge=64)] = 256
    max_containers_per_vm: Annotated[int, Range(ge=1)] = 5
    agent_port: Annotated[int, Range(ge=1, le=0xFFFFFFFF)] = 1024
    agent_startup_timeout_s: Annotated[float, Range(gt=0)] = 30.0
    # A dropped agent connection may come back within this; then the pod is failed.
    agent_reconnect_timeout_s: Annotated[float, Range(gt=0)] = 5.0
    # Health is asked this often; this many unanswered in a row mean a hung agent.
    agent_health_interval_s: Annotated[float, Range(gt=0)] = 10.0
    agent_health_misses: Annotated[int, Range(ge=1)] = 3
    state_dir: Path = Path("/run/cloudhv")
    cache_dir: Path = Path("/var/cache/cloudhv/rootfs")
    rootfs_cache: RootfsCacheConfig = field(default_factory=RootfsCacheConfig)
    # Per-pod work dirs: containers' writable layers, private images. On disk, not
    # under /run: a container that writes a lot must not fill a tmpfs (host RAM).
    disk_dir: Path = Path("/var/lib/cloudhv/disks")
    container_upper: ContainerUpperConfig = field(default_factory=ContainerUpperConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    # Offer each pod daemon's copied-on-write memory to the kernel's same-page merging
    # (shim/samepage.py); it takes effect only where the node runs KSM.
    daemon_ksm: bool = True
    debug: bool = False


def resolve_path(option_path: str | None, env: Mapping[str, str] | None = None) -> Path:
    """Which file to load: runtime option, then $CLOUDHV_CONFIG, then the default."""
    if option_path:
        return Path(option_path)
    from_env = (os.environ if env is None else env).get(ENV_VAR, "")
    return Path(from_env) if from_env else DEFAULT_PATH


def load(path: Path) -> Config:
    """Read and validate `path`. Raises ConfigError with one clear line."""
    return load_with_digest(path)[0]


def load_with_digest(path: Path, validated_dir: Path | None = None) -> tuple[Config, str]:
    """`load`, and the SHA-256 of the bytes it read (pools are keyed by it).

    With `validated_dir`, a config whose bytes this code validated before is taken
    from there instead of validated again: pydantic's import and schema build are
    ~150 ms of CPU, paid by every pod's `start` otherwise. Only what the bytes alone
    decide is kept; what the host must have (`check_host`) is checked every time.
    """
    import hashlib

    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"config {path}: cannot read: {err.strerror or err}") from err
    digest = hashlib.sha256(raw).hexdigest()
    kept = validated_dir / f"{_code_version()}-{digest}.json" if validated_dir else None
    if kept is not None:
        config = _read_validated(kept)
        if config is not None:
            check_host(config, f"config {path}")
            return config, digest
    config = _validate(raw, path)
    if kept is not None:
        _keep_validated(kept, config)
    return config, digest


def _code_version() -> str:
    from shim import parent_wire

    return parent_wire.code_key()


def _read_validated(kept: Path) -> Config | None:
    try:
        return from_trusted(kept.read_text())
    except (OSError, ConfigError):
        return None


def _keep_validated(kept: Path, config: Config) -> None:
    """Written whole or not at all; a directory that cannot be written to costs only
    the next validation."""
    try:
        kept.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        scratch = kept.with_name(f".{kept.name}.{os.getpid()}")
        scratch.write_text(dumps(config))
        scratch.replace(kept)
    except OSError:
        pass


def collect_validated(validated_dir: Path) -> list[Path]:
    """Remove what other versions of the code validated (each upgrade's would stay)."""
    removed: list[Path] = []
    prefix = f"{_code_version()}-"
    try:
        entries = list(validated_dir.iterdir())
    except OSError:
        return removed
    for kept in entries:
        if not kept.name.startswith(prefix):
            try:
                kept.unlink()
                removed.append(kept)
            except OSError:
                pass
    return removed


def _validate(raw: bytes, path: Path) -> Config:
    if len(raw) > MAX_BYTES:
        raise ConfigError(f"config {path}: {len(raw)} bytes, more than a config can be")
    try:
        text = raw.decode()
    except UnicodeDecodeError as err:
        raise ConfigError(f"config {path}: not UTF-8 (byte {err.start}: {err.reason})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"config {path}: invalid JSON at line {err.lineno}: {err.msg}") from err
    except RecursionError:
        raise ConfigError(f"config {path}: JSON nested too deeply") from None
    config = parse(data, f"config {path}")
    check_host(config, f"config {path}")
    return config


HYPERVISOR_DEVICES = (Path("/dev/kvm"), Path("/dev/mshv"))


def check_host(
    config: Config, source: str = "config", *, devices: Sequence[Path] = HYPERVISOR_DEVICES
) -> None:
    """What a valid config needs of this host before a VM can start, checked now rather
    than at a pod's first boot. For Cloud Hypervisor: its binary, the guest kernel and
    rootfs, a hypervisor (KVM or MSHV), and values its API can carry. Raises
    ConfigError naming each field."""
    if config.vmm != "cloud-hypervisor":
        return
    from shim.vmm import ch_api

    problems = [
        problem
        for problem in (
            _file_problem("cloud_hypervisor.binary", config.cloud_hypervisor.binary, os.X_OK),
            _file_problem("kernel_path", config.kernel_path, os.R_OK),
            _file_problem("rootfs_path", config.rootfs_path, os.R_OK),
        )
        if problem
    ]
    if not any(device.exists() for device in devices):
        names = " or ".join(str(d) for d in devices)
        problems.append(f"vmm: 'cloud-hypervisor' needs {names}; none exists on this host")
    cmdline = len(ch_api.kernel_cmdline(config.kernel_args).encode())
    if cmdline >= ch_api.CMDLINE_MAX:
        problems.append(
            f"kernel_args: {cmdline} bytes with the console; Cloud Hypervisor takes "
            f"at most {ch_api.CMDLINE_MAX - 1}"
        )
    if config.default_max_vcpus > ch_api.MAX_VCPUS:
        problems.append(
            f"default_max_vcpus: at most {ch_api.MAX_VCPUS} with Cloud Hypervisor "
            f"(got {config.default_max_vcpus})"
        )
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))


def _file_problem(name: str, path: Path, access: int) -> str:
    what = "executable" if access == os.X_OK else "readable"
    if not path.is_absolute():
        return f"{name}: must be an absolute path (got {str(path)!r})"
    if not path.exists():
        return f"{name}: {path} does not exist"
    if not path.is_file():
        return f"{name}: {path} is not a regular file"
    if not os.access(path, access):
        return f"{name}: {path} is not {what}"
    return ""


def parse(data: Any, source: str = "config") -> Config:
    """Validate `data` (parsed JSON) with pydantic: coercions, bounds, unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: must be a JSON object, got {type(data).__name__}")
    import pydantic

    try:
        config = pydantic.TypeAdapter(Config).validate_python(data)
    except pydantic.ValidationError as err:
        raise ConfigError(f"{source}: {describe(err.errors(include_url=False))}") from None
    if not config.virtiofs.binary.is_absolute():
        raise ConfigError(
            f"{source}: virtiofs.binary: must be an absolute path "
            f"(got {str(config.virtiofs.binary)!r})"
        )
    return config


def describe(errors: Sequence[Mapping[str, Any]]) -> str:
    """One part per pydantic error, joined with '; ': `field.sub: what is wrong`."""
    parts = []
    for item in errors:
        where = ".".join(str(p) for p in item["loc"]) or "(root)"
        kind = item["type"]
        ctx = item.get("ctx") or {}
        # Dataclasses report an unknown key as an unexpected keyword argument.
        if kind in ("extra_forbidden", "unexpected_keyword_argument"):
            what = "unknown key (not allowed)"
        elif kind == "missing":
            what = "required but missing"
        elif kind == "literal_error":
            what = f"must be one of {ctx.get('expected', '?')} (got {item.get('input')!r})"
        elif kind == "dataclass_type":
            what = f"must be a JSON object (got {item.get('input')!r})"
        else:
            what = f"{item['msg']} (got {item.get('input')!r})"
        parts.append(f"{where}: {what}")
    return "; ".join(parts)


def dumps(config: Config) -> str:
    """A validated config as JSON for `from_trusted` (paths as strings)."""
    return json.dumps(dataclasses.asdict(config), default=str)


def from_trusted(text: str) -> Config:
    """Rebuild the config `dumps` wrote from an already validated one: types, no checks.

    Raises ConfigError if `text` is not such a dump (never expected: same code, same
    version on both ends).
    """
    try:
        data = json.loads(text)
        return _build(Config, data)
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise ConfigError(f"config handed over by start: {err}") from None


def _build(cls: type[_T], data: Mapping[str, Any]) -> _T:
    kwargs: dict[str, Any] = {}
    for spec in dataclasses.fields(cls):  # type: ignore[arg-type]
        value = data[spec.name]
        kind = spec.type
        if typing.get_origin(kind) is Annotated:
            kind = typing.get_args(kind)[0]
        if kind is Path:
            value = Path(value)
        elif isinstance(kind, type) and dataclasses.is_dataclass(kind):
            value = _build(kind, value)
        kwargs[spec.name] = value
    return cls(**kwargs)

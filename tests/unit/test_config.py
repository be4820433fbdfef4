"""Config loading: defaults, the path precedence, and one-line errors naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shim import config

REPO = Path(__file__).resolve().parents[2]
MINIMAL = {"vmm": "qemu", "kernel_path": "/k", "rootfs_path": "/r", "kernel_args": "quiet"}


def test_shipped_config_is_valid() -> None:
    cfg = config.load(REPO / "config" / "cloudhv.json")
    assert cfg.vmm == "qemu"
    assert cfg.qemu.accel == "tcg"


def test_defaults() -> None:
    cfg = config.parse(MINIMAL)
    assert cfg.qemu.binary == Path("/usr/bin/qemu-system-x86_64")
    assert cfg.qemu.vsock_backend == Path("/usr/bin/vhost-device-vsock")
    assert cfg.qemu.hotplug_slots == 8
    assert cfg.cloud_hypervisor.binary == Path("/usr/local/bin/cloud-hypervisor")
    assert (cfg.default_vcpus, cfg.default_max_vcpus, cfg.default_memory_mib) == (1, 2, 256)
    assert cfg.max_containers_per_vm == 5
    assert cfg.agent_port == 1024
    assert cfg.agent_startup_timeout_s == 20
    assert cfg.state_dir == Path("/run/cloudhv")
    assert cfg.cache_dir == Path("/var/cache/cloudhv/rootfs")
    assert cfg.debug is False


def test_bad_vmm_names_field_and_allowed_values() -> None:
    with pytest.raises(config.ConfigError) as err:
        config.parse({**MINIMAL, "vmm": "firecracker"}, "config /x.json")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("config /x.json: vmm:")
    assert "'qemu'" in msg and "'cloud-hypervisor'" in msg and "'firecracker'" in msg


def test_nested_bad_accel() -> None:
    with pytest.raises(config.ConfigError, match=r"qemu\.accel: must be one of 'tcg' or 'kvm'"):
        config.parse({**MINIMAL, "qemu": {"accel": "hvf"}})


def test_extra_keys_forbidden() -> None:
    with pytest.raises(config.ConfigError, match=r"default_cpus: unknown key"):
        config.parse({**MINIMAL, "default_cpus": 2})
    with pytest.raises(config.ConfigError, match=r"qemu\.bogus: unknown key"):
        config.parse({**MINIMAL, "qemu": {"bogus": 1}})


def test_missing_required() -> None:
    with pytest.raises(config.ConfigError, match="kernel_path: required but missing"):
        config.parse({"vmm": "qemu", "rootfs_path": "/r", "kernel_args": ""})


def test_range_checked() -> None:
    with pytest.raises(config.ConfigError, match="max_containers_per_vm"):
        config.parse({**MINIMAL, "max_containers_per_vm": 0})


def test_not_an_object() -> None:
    with pytest.raises(config.ConfigError, match="must be a JSON object"):
        config.parse([1, 2])


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(config.ConfigError, match=f"config {missing}: cannot read"):
        config.load(missing)
    bad = tmp_path / "bad.json"
    bad.write_text("{\n  'vmm': 1}")
    with pytest.raises(config.ConfigError, match=f"config {bad}: invalid JSON at line 2"):
        config.load(bad)
    good = tmp_path / "good.json"
    good.write_text(json.dumps(MINIMAL))
    assert config.load(good).kernel_args == "quiet"


def test_path_precedence() -> None:
    env = {"CLOUDHV_CONFIG": "/from/env.json"}
    assert config.resolve_path("/from/option.json", env) == Path("/from/option.json")
    assert config.resolve_path("", env) == Path("/from/env.json")
    assert config.resolve_path(None, {}) == Path("/etc/cloudhv/config.json")

"""Config loading: defaults, the path precedence, one-line errors naming the field, the
handover from `start` to the daemon, and a daemon that never loads pydantic."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
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
    assert cfg.agent_startup_timeout_s == 30
    assert cfg.state_dir == Path("/run/cloudhv")
    assert cfg.cache_dir == Path("/var/cache/cloudhv/rootfs")
    assert cfg.debug is False
    assert cfg.virtiofs.enabled is True
    assert cfg.virtiofs.binary == Path("/usr/lib/qemu/virtiofsd")
    assert cfg.virtiofs.cache == "auto"


def test_virtiofs_fields_are_validated() -> None:
    with pytest.raises(config.ConfigError, match=r"virtiofs\.binary: must be an absolute path"):
        config.parse({**MINIMAL, "virtiofs": {"binary": "virtiofsd"}})
    with pytest.raises(config.ConfigError, match=r"virtiofs\.cache: must be one of"):
        config.parse({**MINIMAL, "virtiofs": {"cache": "sometimes"}})
    with pytest.raises(config.ConfigError, match=r"virtiofs\.threads: unknown key"):
        config.parse({**MINIMAL, "virtiofs": {"threads": 4}})


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


def test_wrong_section_type() -> None:
    with pytest.raises(config.ConfigError) as err:
        config.parse({**MINIMAL, "qemu": 3})
    assert str(err.value) == "config: qemu: must be a JSON object (got 3)"


def test_bounds_and_coercion() -> None:
    with pytest.raises(config.ConfigError, match=r"hotplug_slots: .*less than or equal to 32"):
        config.parse({**MINIMAL, "qemu": {"hotplug_slots": 33}})
    with pytest.raises(config.ConfigError, match=r"agent_startup_timeout_s: .*greater than 0 "):
        config.parse({**MINIMAL, "agent_startup_timeout_s": 0})
    with pytest.raises(config.ConfigError, match=r"agent_port: .*less than or equal to 4294967295"):
        config.parse({**MINIMAL, "agent_port": 2**32})
    cfg = config.parse({**MINIMAL, "qemu": {"hotplug_slots": "4"}, "agent_startup_timeout_s": 5})
    assert cfg.qemu.hotplug_slots == 4
    assert isinstance(cfg.agent_startup_timeout_s, float)


def test_several_errors_in_one_line() -> None:
    bad = {**MINIMAL, "vmm": "x", "zzz": 1, "qemu": {"accel": "x", "yyy": 2}}
    with pytest.raises(config.ConfigError) as err:
        config.parse(bad)
    assert str(err.value) == (
        "config: vmm: must be one of 'qemu' or 'cloud-hypervisor' (got 'x'); "
        "qemu.accel: must be one of 'tcg' or 'kvm' (got 'x'); "
        "qemu.yyy: unknown key (not allowed); zzz: unknown key (not allowed)"
    )


def test_config_is_frozen() -> None:
    cfg = config.parse(MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.vmm = "cloud-hypervisor"  # type: ignore[misc]


def test_handover_round_trip() -> None:
    cfg = config.parse(
        {**MINIMAL, "qemu": {"accel": "kvm", "hotplug_slots": 3}, "agent_startup_timeout_s": 7}
    )
    again = config.from_trusted(config.dumps(cfg))
    assert again == cfg
    assert isinstance(again.kernel_path, Path) and isinstance(again.qemu, config.QemuConfig)
    assert isinstance(again.qemu.binary, Path)
    assert config.from_trusted(config.dumps(config.load(REPO / "config" / "cloudhv.json"))) == (
        config.load(REPO / "config" / "cloudhv.json")
    )


def test_handover_garbage_is_a_config_error() -> None:
    for text in ("", "[]", "{}", json.dumps({"vmm": "qemu"})):
        with pytest.raises(config.ConfigError, match="config handed over by start"):
            config.from_trusted(text)


def test_daemon_import_path_stays_light() -> None:
    """One daemon runs per pod: pydantic and its schemas would cost each ~8 MiB (PSS)."""
    code = (
        f"import sys; sys.path.insert(0, {str(REPO)!r}); import shim.daemon; "
        "print(' '.join(sorted(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-sE", "-c", code], capture_output=True, text=True, check=True
    )
    loaded = set(out.stdout.split())
    assert "shim.config" in loaded
    heavy = {"pydantic", "pydantic_core", "annotated_types", "typing_extensions"}
    # Also kept off on purpose: argparse (+gettext) and ctypes.util (+tempfile) ~0.5 MiB.
    heavy |= {"argparse", "ctypes.util", "tempfile"}
    assert sorted(heavy & loaded) == []


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b'{"vmm": "qemu\xff"}', r"not UTF-8 \(byte 13"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b" " * (2 << 20), "more than a config can be"),
    ],
)
def test_unreadable_config_is_a_named_error(tmp_path: Path, content: bytes, why: str) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(content)
    with pytest.raises(config.ConfigError, match=why) as err:
        config.load(path)
    assert str(path) in str(err.value)


def _ch_config(tmp_path: Path, **changes: object) -> dict[str, object]:
    binary = tmp_path / "cloud-hypervisor"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    kernel, rootfs = tmp_path / "vmlinux", tmp_path / "rootfs.ext4"
    kernel.write_bytes(b"k")
    rootfs.write_bytes(b"r")
    data: dict[str, object] = {
        **MINIMAL,
        "vmm": "cloud-hypervisor",
        "cloud_hypervisor": {"binary": str(binary)},
        "kernel_path": str(kernel),
        "rootfs_path": str(rootfs),
    }
    data.update(changes)
    return data


def test_cloud_hypervisor_defaults() -> None:
    cfg = config.parse({**MINIMAL, "vmm": "cloud-hypervisor"})
    assert cfg.cloud_hypervisor.landlock is True
    assert cfg.cloud_hypervisor.hotplug_slots == 16
    with pytest.raises(config.ConfigError, match=r"cloud_hypervisor\.hotplug_slots: .*28"):
        config.parse({**MINIMAL, "cloud_hypervisor": {"hotplug_slots": 29}})


def test_cloud_hypervisor_host_checks_pass_for_a_usable_host(tmp_path: Path) -> None:
    cfg = config.parse(_ch_config(tmp_path))
    config.check_host(cfg, devices=[tmp_path / "vmlinux"])  # any existing path stands in


def test_a_missing_binary_or_kernel_is_named(tmp_path: Path) -> None:
    data = _ch_config(
        tmp_path,
        cloud_hypervisor={"binary": str(tmp_path / "nope")},
        kernel_path=str(tmp_path),
        rootfs_path="rootfs.ext4",
    )
    with pytest.raises(config.ConfigError) as err:
        config.check_host(config.parse(data), "config /x.json", devices=[tmp_path])
    msg = str(err.value)
    assert msg.startswith("config /x.json: ") and "\n" not in msg
    assert f"cloud_hypervisor.binary: {tmp_path / 'nope'} does not exist" in msg
    assert f"kernel_path: {tmp_path} is not a regular file" in msg
    assert "rootfs_path: must be an absolute path (got 'rootfs.ext4')" in msg


def test_a_binary_that_cannot_run_is_named(tmp_path: Path) -> None:
    data = _ch_config(tmp_path)
    Path(str(data["cloud_hypervisor"]["binary"])).chmod(0o644)  # type: ignore[index]
    with pytest.raises(config.ConfigError, match=r"cloud_hypervisor\.binary: .* is not executable"):
        config.check_host(config.parse(data), devices=[tmp_path])


def test_kvm_or_mshv_is_required_but_either_will_do(tmp_path: Path) -> None:
    cfg = config.parse(_ch_config(tmp_path))
    kvm, mshv = tmp_path / "kvm", tmp_path / "mshv"
    with pytest.raises(config.ConfigError, match=f"needs {kvm} or {mshv}; none exists"):
        config.check_host(cfg, devices=[kvm, mshv])
    mshv.touch()  # an Azure host: MSHV, no KVM
    config.check_host(cfg, devices=[kvm, mshv])


def test_settings_cloud_hypervisor_cannot_take_are_refused(tmp_path: Path) -> None:
    data = _ch_config(tmp_path, kernel_args="x" * 70000, default_max_vcpus=9000)
    with pytest.raises(config.ConfigError) as err:
        config.check_host(config.parse(data), devices=[tmp_path])
    assert "kernel_args: 70014 bytes with the console; Cloud Hypervisor takes at most 65535" in str(
        err.value
    )
    assert "default_max_vcpus: at most 8192 with Cloud Hypervisor (got 9000)" in str(err.value)


def test_load_checks_the_host_for_cloud_hypervisor_only(tmp_path: Path) -> None:
    bad = {**MINIMAL, "vmm": "cloud-hypervisor", "kernel_path": "/nonexistent/vmlinux"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(config.ConfigError, match=f"config {path}: .*kernel_path: /nonexistent"):
        config.load(path)
    path.write_text(json.dumps({**bad, "vmm": "qemu"}))  # QEMU finds out at boot, as before
    assert config.load(path).vmm == "qemu"


def test_validated_configs_are_kept_by_content_and_reused_without_pydantic(
    tmp_path: Path,
) -> None:
    path, kept = tmp_path / "config.json", tmp_path / "validated"
    path.write_text(json.dumps({**MINIMAL, "default_vcpus": "2"}))  # a coercion pydantic made
    first, digest = config.load_with_digest(path, kept)
    (entry,) = kept.iterdir()
    assert entry.name.endswith(f"-{digest}.json") and first.default_vcpus == 2
    code = (
        f"import sys; sys.path.insert(0, {str(REPO)!r}); from pathlib import Path; "
        "from shim import config; "
        f"c, _ = config.load_with_digest(Path({str(path)!r}), Path({str(kept)!r})); "
        "print(c.default_vcpus, 'pydantic' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-sE", "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["2", "False"]
    # Other bytes are validated afresh: an error still names the field.
    path.write_text(json.dumps({**MINIMAL, "default_vcpus": "many"}))
    with pytest.raises(config.ConfigError, match="default_vcpus"):
        config.load_with_digest(path, kept)
    # A kept entry that is not a validated config's is ignored, and replaced.
    path.write_text(json.dumps(MINIMAL))
    _, digest = config.load_with_digest(path, kept)
    broken = next(kept.glob(f"*-{digest}.json"))
    broken.write_text("{}")
    assert config.load_with_digest(path, kept)[0] == config.parse(MINIMAL)
    assert broken.read_text() != "{}"


def test_a_kept_config_still_gets_the_host_checks(tmp_path: Path) -> None:
    """What the bytes decide is kept; what the host must have is checked each time."""
    path, kept = tmp_path / "config.json", tmp_path / "validated"
    path.write_text(json.dumps(_ch_config(tmp_path)))
    if not any(device.exists() for device in config.HYPERVISOR_DEVICES):
        pytest.fail("this host has no /dev/kvm: the Cloud Hypervisor config cannot validate")
    config.load_with_digest(path, kept)
    assert len(list(kept.glob("*.json"))) == 1
    (tmp_path / "vmlinux").unlink()
    with pytest.raises(config.ConfigError, match=r"kernel_path: .*vmlinux does not exist"):
        config.load_with_digest(path, kept)


def test_what_other_versions_validated_is_collected(tmp_path: Path) -> None:
    path, kept = tmp_path / "config.json", tmp_path / "validated"
    path.write_text(json.dumps(MINIMAL))
    config.load_with_digest(path, kept)
    (kept / "0123456789abcdef-old.json").write_text("{}")
    removed = config.collect_validated(kept)
    assert [p.name for p in removed] == ["0123456789abcdef-old.json"]
    assert len(list(kept.iterdir())) == 1

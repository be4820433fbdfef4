"""VM sizing: config defaults, CRI sandbox resources, Kata/cloudhv annotations, and errors."""

from __future__ import annotations

from typing import Any

import pytest

from shim import config
from shim.errors import InvalidArgument
from shim.sizing import VmSize, ignored_annotations, vm_size

KATA = "io.katacontainers.config.hypervisor."
CHV = "io.cloudhv.config.hypervisor."
KERNEL_ARGS = "root=/dev/vda ro rootfstype=ext4 init=/init panic=-1 quiet"


def cfg(**overrides: Any) -> config.Config:
    data: dict[str, Any] = {
        "vmm": "qemu",
        "kernel_path": "/k",
        "rootfs_path": "/r",
        "kernel_args": KERNEL_ARGS,
        "default_vcpus": 1,
        "default_max_vcpus": 2,
        "default_memory_mib": 256,
    }
    data.update(overrides)
    return config.parse(data)


def refused(annotations: dict[str, str], host_cpus: int = 4, **overrides: Any) -> str:
    with pytest.raises(InvalidArgument) as err:
        vm_size(cfg(**overrides), annotations, host_cpus)
    return str(err.value)


def test_defaults_without_annotations() -> None:
    assert vm_size(cfg(), {}, 4) == VmSize(vcpus=1, max_vcpus=2, memory_mib=256, kernel_params="")


def test_default_max_vcpus_is_capped_at_the_host() -> None:
    assert vm_size(cfg(default_max_vcpus=16), {}, 4).max_vcpus == 4


def test_cri_workload_is_added_to_the_defaults() -> None:
    size = vm_size(
        cfg(),
        {
            "io.kubernetes.cri.sandbox-cpu-quota": "150000",
            "io.kubernetes.cri.sandbox-cpu-period": "100000",
            "io.kubernetes.cri.sandbox-memory": str(100 * 2**20 + 1),
        },
        8,
    )
    # ceil(1 + 1.5) vCPUs; 256 + ceil(100 MiB + 1 byte) MiB.
    assert size == VmSize(vcpus=3, max_vcpus=3, memory_mib=357, kernel_params="")


def test_cri_cpu_workload_is_capped_at_the_host() -> None:
    annotations = {
        "io.kubernetes.cri.sandbox-cpu-quota": "400000",
        "io.kubernetes.cri.sandbox-cpu-period": "100000",
    }
    assert vm_size(cfg(), annotations, 2).vcpus == 2


@pytest.mark.parametrize(
    ("quota", "period"), [("-1", "100000"), ("0", "100000"), ("50000", "0"), ("", "")]
)
def test_unlimited_or_missing_cpu_quota_adds_nothing(quota: str, period: str) -> None:
    annotations = {
        "io.kubernetes.cri.sandbox-cpu-quota": quota,
        "io.kubernetes.cri.sandbox-cpu-period": period,
        "io.kubernetes.cri.sandbox-memory": "0",
    }
    assert vm_size(cfg(), annotations, 4) == vm_size(cfg(), {}, 4)


def test_bad_cri_value_names_the_key() -> None:
    msg = refused({"io.kubernetes.cri.sandbox-memory": "1Gi"})
    assert (
        msg == 'annotation io.kubernetes.cri.sandbox-memory="1Gi": must be a decimal 64-bit integer'
    )


def test_the_integration_test_case() -> None:
    # tests/integration/test_cri.py::test_annotations_size_the_vm, on this 2-CPU host.
    size = vm_size(
        cfg(),
        {
            KATA + "default_vcpus": "1.5",
            KATA + "default_memory": "300",
            CHV + "default_memory": "384",
        },
        2,
    )
    assert size == VmSize(vcpus=2, max_vcpus=2, memory_mib=384, kernel_params="")


def test_annotation_overrides_the_cri_workload() -> None:
    size = vm_size(
        cfg(),
        {
            "io.kubernetes.cri.sandbox-cpu-quota": "300000",
            "io.kubernetes.cri.sandbox-cpu-period": "100000",
            "io.kubernetes.cri.sandbox-memory": str(2**30),
            KATA + "default_vcpus": "1",
            KATA + "default_memory": "512",
        },
        8,
    )
    assert (size.vcpus, size.memory_mib) == (1, 512)


def test_cloudhv_prefix_wins_for_every_key() -> None:
    size = vm_size(
        cfg(),
        {
            KATA + "default_vcpus": "1",
            CHV + "default_vcpus": "3",
            KATA + "default_max_vcpus": "3",
            CHV + "default_max_vcpus": "4",
            KATA + "default_memory": "300",
            CHV + "default_memory": "400",
            KATA + "kernel_params": "loglevel=1",
            CHV + "kernel_params": "loglevel=7",
        },
        4,
    )
    assert size == VmSize(vcpus=3, max_vcpus=4, memory_mib=400, kernel_params="loglevel=7")


@pytest.mark.parametrize(
    ("value", "vcpus"),
    [
        ("1.5", 2),
        ("2", 2),
        ("0.1", 1),
        (".5", 1),
        ("3.", 3),
        ("1e0", 1),
        ("+2", 2),
        ("1.00000001", 1),
    ],
)
def test_fractional_vcpus_round_up_as_kata_float32(value: str, vcpus: int) -> None:
    assert vm_size(cfg(), {KATA + "default_vcpus": value}, 4).vcpus == vcpus


def test_vcpus_above_the_default_max_raise_max_vcpus() -> None:
    assert vm_size(cfg(), {KATA + "default_vcpus": "4"}, 4).max_vcpus == 4


@pytest.mark.parametrize("value", ["0", "-1", "4.5", "five", "nan", "inf", "", " 2", "1_0", "0x2"])
def test_bad_vcpus_name_key_value_and_range(value: str) -> None:
    msg = refused({KATA + "default_vcpus": value}, host_cpus=4)
    assert msg.startswith(f'annotation {KATA}default_vcpus="{value}": ')
    assert "greater than 0 and at most 4 (the host's CPUs)" in msg


def test_max_vcpus_zero_means_all_host_cpus() -> None:
    assert vm_size(cfg(), {CHV + "default_max_vcpus": "0"}, 6).max_vcpus == 6


@pytest.mark.parametrize("value", ["1", "9", "2.5", "-3", "x", "99999999999"])
def test_bad_max_vcpus_names_the_range(value: str) -> None:
    msg = refused({KATA + "default_vcpus": "2", KATA + "default_max_vcpus": value}, host_cpus=8)
    assert msg == (
        f'annotation {KATA}default_max_vcpus="{value}": must be an integer number of vCPUs '
        "between 2 (the VM's vCPUs) and 8 (the host's CPUs), or 0 for all the host's CPUs"
    )


def test_memory_message_matches_the_issue() -> None:
    assert refused({KATA + "default_memory": "lots"}) == (
        f'annotation {KATA}default_memory="lots": '
        "must be an integer number of MiB between 128 and 262144"
    )


@pytest.mark.parametrize(("value", "mib"), [("128", 128), ("0384", 384), ("262144", 262144)])
def test_memory_bounds(value: str, mib: int) -> None:
    assert vm_size(cfg(), {CHV + "default_memory": value}, 2).memory_mib == mib


@pytest.mark.parametrize(
    "value", ["127", "262145", "-256", "256.0", "1" + "0" * 5000, "4294967296"]
)
def test_memory_out_of_range(value: str) -> None:
    assert "between 128 and 262144" in refused({CHV + "default_memory": value})


def test_losing_prefix_is_still_validated() -> None:
    msg = refused({CHV + "default_memory": "512", KATA + "default_memory": "lots"})
    assert f"{KATA}default_memory" in msg


def test_kernel_params_are_passed_through_stripped() -> None:
    value = '  loglevel=7  sysctl.kernel.msgmax="8192" nokaslr '
    size = vm_size(cfg(), {KATA + "kernel_params": value}, 2)
    assert size.kernel_params == 'loglevel=7  sysctl.kernel.msgmax="8192" nokaslr'


@pytest.mark.parametrize("bad", ["a\nb", "a\x00b", "a\tb", "a\rb", "caf\u00e9", "x\x7f"])
def test_kernel_params_control_characters_refused(bad: str) -> None:
    msg = refused({KATA + "kernel_params": bad})
    assert msg.startswith(f"annotation {KATA}kernel_params=")
    assert "printable ASCII" in msg


def test_kernel_params_unbalanced_quote_refused() -> None:
    assert "unbalanced double quote" in refused({KATA + "kernel_params": 'foo="bar'})


@pytest.mark.parametrize(
    "param", ["init=/bin/sh", "root=/dev/vdb", "panic=0", "console=hvc0", "rdinit=/x", "ro"]
)
def test_kernel_params_outside_the_allowed_list_are_refused(param: str) -> None:
    name = param.split("=")[0]
    msg = refused({CHV + "kernel_params": f"quiet {param}"})
    assert f"may not set {name!r}" in msg and "loglevel" in msg


def test_kernel_params_may_not_override_what_the_shim_sets() -> None:
    msg = refused({CHV + "kernel_params": "quiet loglevel=7"}, kernel_args="loglevel=3 quiet")
    assert "must not set loglevel=" in msg


def test_kernel_params_quoted_spaces_do_not_hide_a_key() -> None:
    # `sysctl.x="a init=b"` is one parameter named sysctl.x, so it is allowed.
    size = vm_size(cfg(), {CHV + "kernel_params": 'sysctl.x="a init=b"'}, 2)
    assert size.kernel_params == 'sysctl.x="a init=b"'


def test_kernel_params_too_long() -> None:
    assert "has room for" in refused({CHV + "kernel_params": "quiet " * 400})


def test_unknown_keys_are_ignored_but_listed() -> None:
    annotations = {
        KATA + "memory_slots": "10",
        CHV + "enable_virtio_mem": "true",
        KATA + "default_memory": "512",
        "io.katacontainers.config.runtime.sandbox_cgroup_only": "true",
        "unrelated": "x",
    }
    assert vm_size(cfg(), annotations, 2).memory_mib == 512
    assert ignored_annotations(annotations) == [
        CHV + "enable_virtio_mem",
        KATA + "memory_slots",
    ]


@pytest.mark.parametrize(
    ("annotations", "key"),
    [
        ({"io.kubernetes.cri.sandbox-memory": "9223372036854775807"}, "sandbox-memory"),
        ({KATA + "default_memory": "262144"}, KATA + "default_memory"),
    ],
)
def test_a_vm_bigger_than_the_host_is_refused(annotations: dict[str, str], key: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        vm_size(cfg(), annotations, 2, host_memory_mib=23_000)
    assert key in str(err.value) and "more than the host's 23000 MiB" in str(err.value)
    assert vm_size(cfg(), {KATA + "default_memory": "22000"}, 2, host_memory_mib=23_000)

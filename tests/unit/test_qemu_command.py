"""The QEMU command line the backend builds from its options (pure)."""

from __future__ import annotations

from pathlib import Path

from shim import config as config_mod
from shim.vmm.base import VmSpec
from shim.vmm.qemu import QemuOptions, QemuVmm


def _accel(tmp_path: Path, options: QemuOptions) -> str:
    spec = VmSpec(tmp_path, Path("/k"), Path("/r"), "quiet", 1, 1, 256)
    argv = QemuVmm(spec, options).command()
    return argv[argv.index("-accel") + 1]


def test_tcg_gets_the_configured_translation_cache(tmp_path: Path) -> None:
    options = QemuOptions(Path("/q"), "tcg", Path("/v"), tcg_tb_size_mib=64)
    assert _accel(tmp_path, options) == "tcg,tb-size=64"


def test_zero_keeps_qemus_default_and_kvm_has_no_cache(tmp_path: Path) -> None:
    assert _accel(tmp_path, QemuOptions(Path("/q"), "tcg", Path("/v"))) == "tcg"
    kvm = QemuOptions(Path("/q"), "kvm", Path("/v"), tcg_tb_size_mib=64)
    assert _accel(tmp_path, kvm) == "kvm"


def test_the_config_default_reaches_the_backend() -> None:
    assert config_mod.QemuConfig().tcg_tb_size_mib == config_mod.TCG_TB_SIZE_MIB > 0


def test_the_reporting_balloon_only_when_asked(tmp_path: Path) -> None:
    spec = VmSpec(tmp_path, Path("/k"), Path("/r"), "quiet", 1, 1, 256)
    plain = QemuVmm(spec, QemuOptions(Path("/q"), "tcg", Path("/v"))).command()
    assert not any("virtio-balloon" in arg for arg in plain)
    asked = QemuOptions(Path("/q"), "tcg", Path("/v"), free_page_reporting=True)
    argv = QemuVmm(spec, asked).command()
    assert "virtio-balloon-pci,id=balloon0,free-page-reporting=on" in argv
    assert config_mod.QemuConfig().free_page_reporting


def _append(tmp_path: Path, options: QemuOptions) -> str:
    spec = VmSpec(tmp_path, Path("/k"), Path("/r"), "quiet", 1, 1, 256)
    argv = QemuVmm(spec, options).command()
    return argv[argv.index("-append") + 1]


def test_crun_loses_randomisation_only_under_tcg_and_when_asked(tmp_path: Path) -> None:
    asked = QemuOptions(Path("/q"), "tcg", Path("/v"), tcg_crun_fixed_layout=True)
    assert _append(tmp_path, asked).split()[-1] == "cloudhv.crun_aslr=off"
    kvm = QemuOptions(Path("/q"), "kvm", Path("/v"), tcg_crun_fixed_layout=True)
    assert "cloudhv.crun_aslr" not in _append(tmp_path, kvm)
    plain = QemuOptions(Path("/q"), "tcg", Path("/v"))
    assert "cloudhv.crun_aslr" not in _append(tmp_path, plain)
    assert config_mod.QemuConfig().tcg_crun_fixed_layout


def test_qemu_memory_never_joins_same_page_merging(tmp_path: Path) -> None:
    spec = VmSpec(tmp_path, Path("/k"), Path("/r"), "quiet", 1, 1, 256)
    argv = QemuVmm(spec, QemuOptions(Path("/q"), "tcg", Path("/v"))).command()
    assert "mem-merge=off" in argv[argv.index("-machine") + 1].split(",")

"""Shared directories: the virtiofsd command line, the VM device, the binary check, and
crash cleanup that removes the share root by name without ever deleting a volume's files."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from shim import config as config_mod
from shim.cleanup import HOST_UNDO
from shim.errors import FailedPrecondition
from shim.sharedfs import (
    KIND,
    TAG,
    VOLUME_KIND,
    Layout,
    check_binary,
    daemon_argv,
    remove_root,
    undo_host,
    undo_volume_host,
)
from shim.state import ResourceRecord
from shim.vmm.base import SharedFsSpec, VmSpec
from shim.vmm.procs import is_same_process, process_start_time
from shim.vmm.qemu import QemuOptions, QemuVmm


def test_virtiofsd_serves_only_the_share_root_in_its_own_namespaces(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "fs")
    argv = daemon_argv(config_mod.VirtiofsConfig(cache="none"), layout, 7)
    assert argv[:2] == ["/usr/lib/qemu/virtiofsd", "--fd=7"]
    options = [argv[i + 1] for i, a in enumerate(argv) if a == "-o"]
    assert options == [
        f"source={tmp_path}/fs/share",
        "cache=none",
        "sandbox=namespace",
        "announce_submounts",
    ]
    assert any(a.startswith("--rlimit-nofile=") for a in argv)


def test_qemu_boots_with_the_virtio_fs_device_only_when_asked(tmp_path: Path) -> None:
    spec = VmSpec(tmp_path, Path("/k"), Path("/r"), "quiet", 1, 1, 256)
    options = QemuOptions(Path("/q"), "tcg", Path("/v"))
    assert "vhost-user-fs-pci" not in " ".join(QemuVmm(spec, options).command())
    fs = SharedFsSpec(socket=tmp_path / "fs.sock", tag=TAG)
    cmd = QemuVmm(VmSpec(tmp_path, Path("/k"), Path("/r"), "quiet", 1, 1, 256, fs), options)
    argv = cmd.command()
    assert f"socket,id=fs0,path={tmp_path}/fs.sock" in argv
    assert f"vhost-user-fs-pci,chardev=fs0,tag={TAG},queue-size=1024" in argv
    assert "memory-backend-memfd,id=mem0,size=256M,share=on" in argv


def test_missing_binary_is_refused_naming_the_config_field(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match=r"^config virtiofs\.binary: .*No such file"):
        check_binary(tmp_path / "virtiofsd")
    plain = tmp_path / "plain"
    plain.write_text("")
    with pytest.raises(FailedPrecondition, match="not an executable file"):
        check_binary(plain)
    plain.chmod(plain.stat().st_mode | stat.S_IXUSR)
    check_binary(plain)


def _layout_with_a_volume(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "fs"
    for sub in ("share/ctr/0", "share/ctr/1", "stage/ctr"):
        (root / sub).mkdir(parents=True)
    (root / "virtiofsd.log").write_text("log\n")
    return root, root / "share" / "ctr"


def test_crash_cleanup_removes_the_layout(tmp_path: Path) -> None:
    root, _ = _layout_with_a_volume(tmp_path)
    record = ResourceRecord(KIND, "sharedfs", "", {"root": str(root)})
    assert HOST_UNDO[KIND](record) == [f"removed {root}"]
    assert not root.exists()
    assert undo_host(record) == []  # idempotent


def test_a_volume_still_there_is_never_deleted(tmp_path: Path) -> None:
    """What a share dir holds is a volume's host files (a bind left mounted): rmdir only."""
    root, ctr = _layout_with_a_volume(tmp_path)
    precious = ctr / "0" / "precious"
    precious.write_text("user data\n")
    with pytest.raises(OSError) as err:
        remove_root(root)
    assert err.value.errno == 39  # ENOTEMPTY
    assert precious.read_text() == "user data\n"


def test_volume_cleanup_removes_its_dirs_and_keeps_its_neighbours(tmp_path: Path) -> None:
    root, ctr = _layout_with_a_volume(tmp_path)

    def record(rel: str) -> ResourceRecord:
        return ResourceRecord(VOLUME_KIND, f"ctr/{rel}", "ctr", {"root": str(root), "rel": rel})

    assert HOST_UNDO[VOLUME_KIND](record("ctr/0")) == []
    assert sorted(os.listdir(ctr)) == ["1"]
    undo_volume_host(record("ctr/1"))
    assert not ctr.exists()
    # A record that would climb out of the root does nothing.
    (tmp_path / "x").mkdir()
    assert undo_volume_host(record("../x")) == []
    assert (tmp_path / "x").exists()


def test_crash_cleanup_kills_the_recorded_virtiofsd_and_only_it(tmp_path: Path) -> None:
    child = subprocess.Popen(["sleep", "60"])
    try:
        start = process_start_time(child.pid)
        assert start is not None
        root = tmp_path / "fs"
        stale = ResourceRecord(
            KIND, "sharedfs", "", {"root": str(root), "pid": str(child.pid),
                                   "start_time": str(start + 1)}
        )
        assert undo_host(stale) == []  # another process now has that pid: left alone
        assert child.poll() is None
        record = ResourceRecord(
            KIND, "sharedfs", "", {"root": str(root), "pid": str(child.pid),
                                   "start_time": str(start)}
        )
        assert undo_host(record) == [f"killed virtiofsd {child.pid}"]
        assert not is_same_process(child.pid, start)  # killed, and reaped by the cleanup
    finally:
        child.kill()
        child.wait()

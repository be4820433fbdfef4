"""CRI mounts: scanned on a real host tree, planned, refused with reasons, refreshed."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest

from shim.cri_mounts import (
    GUEST_ROOT,
    SHARED_ROOT,
    DirShare,
    FileCopy,
    MountPlan,
    changed_copies,
    is_kubelet_file_volume,
    plan_mounts,
    read_copy,
    scan_mounts,
    stale_guest_paths,
)
from shim.errors import InvalidArgument

CID = "c" * 64
BASE = f"{GUEST_ROOT}/{CID}"


def bind(source: Path | str, destination: str, mode: str = "rw") -> dict[str, Any]:
    # The shape containerd 1.6 CRI writes (pkg/cri/opts WithMounts).
    return {
        "destination": destination,
        "type": "bind",
        "source": str(source),
        "options": ["rbind", "rprivate", mode],
    }


def plan(mounts: list[dict[str, Any]], **limits: Any) -> MountPlan:
    return plan_mounts(CID, mounts, scan_mounts(mounts), **limits)


def refused(mounts: list[dict[str, Any]], **limits: Any) -> str:
    with pytest.raises(InvalidArgument) as err:
        plan(mounts, **limits)
    return str(err.value)


def kubelet(tmp_path: Path, name: str, plugin: str = "configmap") -> Path:
    """Where kubelet puts a pod's small-file volume `name` (copied, not shared)."""
    path = tmp_path / "pods" / "uid-1" / "volumes" / f"kubernetes.io~{plugin}" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def configmap(root: Path, data: dict[str, bytes], stamp: str) -> Path:
    """A kubelet atomic-writer volume.

    ..<stamp>/<key> holds the data, ..data -> ..<stamp>, and <key> -> ..data/<key>.
    """
    root.mkdir(exist_ok=True)
    (root / f"..{stamp}").mkdir()
    for key, value in data.items():
        (root / f"..{stamp}" / key).write_bytes(value)
        (root / f"..{stamp}" / key).chmod(0o644)
    tmp = root / "..data_tmp"
    tmp.symlink_to(f"..{stamp}")
    tmp.replace(root / "..data")
    for key in data:
        if not (root / key).is_symlink():
            (root / key).symlink_to(f"..data/{key}")
    return root


KERNEL_MOUNTS: list[dict[str, Any]] = [
    {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid"]},
    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["mode=755"]},
    {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["newinstance"]},
    {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid"]},
    {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["ro"]},
    {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["ro"]},
]


def test_cri_default_mounts(tmp_path: Path) -> None:
    sandbox = tmp_path / "sandboxes" / "s1"
    (sandbox / "shm").mkdir(parents=True)
    for name, text in [
        ("hosts", "127.0.0.1 localhost\n"),
        ("resolv.conf", "nameserver 10.0.0.10\n"),
    ]:
        (sandbox / name).write_text(text)
    (sandbox / "hostname").write_text("pod\n")
    (sandbox / "hostname").chmod(0o600)
    term = tmp_path / "termination-log"
    term.touch()
    mounts = [
        *KERNEL_MOUNTS,
        bind(sandbox / "hostname", "/etc/hostname"),
        bind(sandbox / "hosts", "/etc/hosts"),
        bind(sandbox / "resolv.conf", "/etc/resolv.conf", "ro"),
        bind(sandbox / "shm", "/dev/shm"),
        bind(term, "/dev/termination-log"),
    ]
    result = plan(mounts)

    n = len(KERNEL_MOUNTS)
    assert list(result.mounts[:n]) == KERNEL_MOUNTS
    assert [m["source"] for m in result.mounts[n:]] == [
        f"{BASE}/{n}",
        f"{BASE}/{n + 1}",
        f"{BASE}/{n + 2}",
        "/dev/shm",
        f"{BASE}/{n + 4}",
    ]
    # Type and options (ro/rw, propagation) are kept.
    assert result.mounts[n + 2] == {**mounts[n + 2], "source": f"{BASE}/{n + 2}"}
    uid, gid = os.getuid(), os.getgid()
    st = (sandbox / "hosts").stat()
    assert result.copies[1] == FileCopy(
        host_path=str(sandbox / "hosts"),
        guest_path=f"{BASE}/{n + 1}",
        mode=0o644 & ~_umask(),
        uid=uid,
        gid=gid,
        size=len("127.0.0.1 localhost\n"),
        mtime_ns=st.st_mtime_ns,
        root=str(sandbox / "hosts"),
        root_dev=st.st_dev,
        root_ino=st.st_ino,
        dev=st.st_dev,
        ino=st.st_ino,
    )
    assert result.copies[0].mode == 0o600
    assert [c.host_path for c in result.copies] == [
        str(sandbox / "hostname"),
        str(sandbox / "hosts"),
        str(sandbox / "resolv.conf"),
        str(term),
    ]
    assert not any(c.is_dir or c.symlink_target for c in result.copies)
    # Only the termination log is worth a note: the others are CRI's pod files.
    assert len(result.notes) == 1 and "/dev/termination-log" in result.notes[0]
    assert read_copy(result.copies[1]) == b"127.0.0.1 localhost\n"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_configmap_directory_is_copied_in_order(tmp_path: Path) -> None:
    volume = configmap(kubelet(tmp_path, "cm"), {"app.conf": b"a=1\n", "b.txt": b"b"}, "2024_01_01")
    result = plan([bind(volume, "/etc/app", "ro")])
    assert result.notes == ()
    assert result.mounts[0]["source"] == f"{BASE}/0"
    got = [
        (c.guest_path.removeprefix(f"{BASE}/0"), c.is_dir, c.symlink_target) for c in result.copies
    ]
    assert got == [
        ("", True, None),
        ("/..2024_01_01", True, None),
        ("/..2024_01_01/app.conf", False, None),
        ("/..2024_01_01/b.txt", False, None),
        ("/..data", False, "..2024_01_01"),
        ("/app.conf", False, "..data/app.conf"),
        ("/b.txt", False, "..data/b.txt"),
    ]
    file_copy = result.copies[2]
    assert file_copy.host_path == str(volume / "..2024_01_01" / "app.conf")
    assert (file_copy.mode, file_copy.size) == (0o644, 4)
    assert read_copy(file_copy) == b"a=1\n"


def test_read_write_copied_directory_is_noted(tmp_path: Path) -> None:
    result = plan([bind(kubelet(tmp_path, "empty", "downward-api"), "/data")])
    assert [c.is_dir for c in result.copies] == [True]
    assert "read-write directory" in result.notes[0]


def test_kubelet_file_volumes_are_copied_and_other_directories_shared() -> None:
    for plugin in ("configmap", "secret", "projected", "downward-api"):
        assert is_kubelet_file_volume(f"/var/lib/kubelet/pods/u/volumes/kubernetes.io~{plugin}/v")
    for shared in (
        "/var/lib/kubelet/pods/u/volumes/kubernetes.io~empty-dir/cache",
        "/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/pvc-1/mount",
        "/var/lib/kubelet/pods/u/volume-subpaths/cm/app/0",
        "/srv/data",
        "/tmp/kubernetes.io~configmap/not-under-volumes",
    ):
        assert not is_kubelet_file_volume(shared), shared


def test_directory_is_shared_with_its_propagation(tmp_path: Path) -> None:
    data, cache, big = tmp_path / "data", tmp_path / "cache", tmp_path / "big"
    for directory in (data, cache, big):
        directory.mkdir()
    for i in range(5000):  # far past every copy limit: a shared tree is never walked
        (big / f"f{i}").touch()
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    mounts = [
        bind(hosts, "/etc/hosts"),
        {**bind(data, "/data"), "options": ["rbind", "rslave", "rw"]},
        {**bind(cache, "/cache", "ro"), "options": ["bind", "ro"]},
        bind(big, "/big"),
    ]
    trees = scan_mounts(mounts)
    assert len(trees[str(big)].entries) == 1
    result = plan_mounts(CID, mounts, trees)
    assert [c.host_path for c in result.copies] == [str(hosts)]
    assert result.shares == (
        DirShare(1, "/data", str(data), f"{CID}/1", f"{SHARED_ROOT}/{CID}/1", True, "slave"),
        DirShare(2, "/cache", str(cache), f"{CID}/2", f"{SHARED_ROOT}/{CID}/2", False,
                 "private", read_only=True),
        DirShare(3, "/big", str(big), f"{CID}/3", f"{SHARED_ROOT}/{CID}/3", True, "private"),
    )
    # The container binds the path under the guest's virtio-fs mount, options kept.
    assert result.mounts[1] == {**mounts[1], "source": f"{SHARED_ROOT}/{CID}/1"}
    assert result.notes == ()


def test_rshared_directory_is_refused(tmp_path: Path) -> None:
    mount = {**bind(tmp_path, "/data"), "options": ["rbind", "rshared", "rw"]}
    assert refused([mount]) == (
        f"mount /data (source {tmp_path}): propagation rshared cannot be honoured: a mount "
        "made inside the VM never reaches the host; use rslave (host to container) or rprivate"
    )


def test_shared_directory_without_virtiofs_is_refused_naming_the_config(tmp_path: Path) -> None:
    mounts = [bind(tmp_path, "/data")]
    with pytest.raises(InvalidArgument, match=r"virtiofs\.enabled"):
        plan_mounts(CID, mounts, scan_mounts(mounts), shared_root=None)
    # kubelet's small-file volumes are still copied without it.
    cm = [bind(kubelet(tmp_path, "cm"), "/cm", "ro")]
    assert len(plan_mounts(CID, cm, scan_mounts(cm), shared_root=None).copies) == 1


def test_big_directory_is_refused_with_the_count(tmp_path: Path) -> None:
    big = kubelet(tmp_path, "big", "secret")
    for i in range(70):
        (big / f"f{i}").touch()
    assert refused([bind(big, "/data")]) == (
        f"mount /data (source {big}): directory has 70 files; "
        "only directories up to 64 files are copied into the VM"
    )


def test_huge_directory_walk_stops_at_the_scan_limit(tmp_path: Path) -> None:
    big = kubelet(tmp_path, "big", "projected")
    (big / "sub").mkdir(parents=True)
    for i in range(30):
        (big / "sub" / f"f{i}").touch()
    mounts = [bind(big, "/data")]
    trees = scan_mounts(mounts, limit=10)
    assert trees[str(big)].truncated and len(trees[str(big)].entries) == 11
    with pytest.raises(InvalidArgument, match="directory has more than 10 entries"):
        plan_mounts(CID, mounts, trees)


def test_too_many_entries_and_too_many_bytes(tmp_path: Path) -> None:
    tree = kubelet(tmp_path, "t")
    for i in range(5):
        (tree / f"d{i}").mkdir(parents=True)
        (tree / f"d{i}" / "f").write_bytes(b"x" * 100)
    assert "directory has 10 entries" in refused([bind(tree, "/t")], max_dir_entries=9)
    assert "directory holds 500 bytes" in refused([bind(tree, "/t")], max_dir_bytes=499)


def test_big_file_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 2049)
    assert refused([bind(big, "/big")], max_file_bytes=2048) == (
        f"mount /big (source {big}): file is 2049 bytes; "
        "only files up to 2048 bytes are copied into the VM"
    )
    d = kubelet(tmp_path, "d")
    (d / "inner").write_bytes(b"x" * 2049)
    assert "inner is 2049 bytes" in refused([bind(d, "/d")], max_file_bytes=2048)


def test_fifo_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert refused([bind(fifo, "/run/fifo")]) == (
        f"mount /run/fifo (source {fifo}): a FIFO cannot be bind-mounted into the VM; "
        "only regular files and directories can"
    )
    d = kubelet(tmp_path, "d")
    os.mkfifo(d / "p")
    assert "p is a FIFO" in refused([bind(d, "/d")])


def test_socket_is_refused(sock_dir: Path) -> None:
    path = sock_dir / "s.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        assert "a socket cannot be bind-mounted" in refused([bind(path, "/var/run/app.sock")])


def test_block_device_is_refused() -> None:
    devices = [p for p in Path("/dev").iterdir() if p.is_block_device()]
    if not devices:
        pytest.skip("no block device on this machine")
    assert "a block device cannot be bind-mounted" in refused([bind(devices[0], "/dev/disk")])


def test_missing_source_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    assert refused([bind(missing, "/x")]) == (
        f"mount /x (source {missing}): No such file or directory on the host"
    )


def test_escaping_symlink_is_refused(tmp_path: Path) -> None:
    d = kubelet(tmp_path, "d")
    (d / "out").symlink_to("../../etc/passwd")
    assert "out is a symlink to ../../etc/passwd, outside the directory" in refused(
        [bind(d, "/d")]
    )
    (d / "out").unlink()
    (d / "abs").symlink_to("/etc/passwd")
    assert "outside the directory" in refused([bind(d, "/d")])


def test_symlinked_source_is_followed_like_a_bind_mount(tmp_path: Path) -> None:
    (tmp_path / "real").write_text("x")
    (tmp_path / "link").symlink_to("real")
    result = plan([bind(tmp_path / "link", "/etc/x")])
    assert [(c.size, c.symlink_target) for c in result.copies] == [(1, None)]


def test_other_filesystem_types_are_refused() -> None:
    mount = {"destination": "/nfs", "type": "nfs", "source": "server:/export", "options": []}
    msg = refused([mount])
    assert msg.startswith("mount /nfs (source server:/export): filesystem type 'nfs' cannot")


def test_relative_bind_source_is_refused() -> None:
    assert "absolute host path" in refused([bind("rel/path", "/x")])


def test_non_utf8_name_is_refused(tmp_path: Path) -> None:
    d = kubelet(tmp_path, "d")
    fd = os.open(os.fsencode(d) + b"/bad\xff", os.O_CREAT | os.O_WRONLY, 0o644)
    os.close(fd)
    assert "bad\\udcff is not a UTF-8 name" in refused([bind(d, "/d")])


def test_guest_path_too_long_is_refused(tmp_path: Path) -> None:
    d = kubelet(tmp_path, "d")
    (d / ("x" * 100) / ("y" * 100)).mkdir(parents=True)
    assert "longer than 255 bytes" in refused([bind(d, "/d")])


def test_changed_copies_after_a_configmap_update(tmp_path: Path) -> None:
    volume = configmap(kubelet(tmp_path, "cm"), {"k": b"1"}, "2024_01_01")
    hosts = tmp_path / "hosts"
    hosts.write_text("a\n")
    mounts = [bind(volume, "/etc/cm", "ro"), bind(hosts, "/etc/hosts")]
    first = plan(mounts)
    assert changed_copies(first, plan(mounts)) == []

    configmap(volume, {"k": b"2", "new": b"3"}, "2024_01_02")
    st = hosts.stat()
    hosts.write_text("b\n")
    os.utime(hosts, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    second = plan(mounts)
    changed = [c.guest_path.removeprefix(BASE) for c in changed_copies(first, second)]
    # The new timestamped directory and its files first, then the ..data swap, then
    # the new key's symlink; the hosts file changed too.
    assert changed == [
        "/0/..2024_01_02",
        "/0/..2024_01_02/k",
        "/0/..2024_01_02/new",
        "/0/..data",
        "/0/new",
        "/1",
    ]
    assert stale_guest_paths(first, second) == []
    assert stale_guest_paths(second, first) == [
        f"{BASE}/0/..2024_01_02/k",
        f"{BASE}/0/..2024_01_02/new",
        f"{BASE}/0/..2024_01_02",
        f"{BASE}/0/new",
    ]


def test_read_copy_refuses_a_grown_or_replaced_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"small")
    copy = plan([bind(path, "/f")]).copies[0]
    path.write_bytes(b"x" * 11)
    with pytest.raises(InvalidArgument, match="grew past 10 bytes"):
        read_copy(copy, max_bytes=10)
    path.unlink()
    os.mkfifo(path)
    # tmpfs may hand the FIFO the freed inode number: either check refuses it.
    with pytest.raises(InvalidArgument, match="replaced since the scan|no longer a regular file"):
        read_copy(copy)


def test_read_copy_never_follows_a_symlink_swapped_in(tmp_path: Path) -> None:
    """Scan, then swap a file for a symlink to a secret: the secret never reaches the VM."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"root-only")
    secret.chmod(0o600)
    volume = kubelet(tmp_path, "vol", "secret")
    (volume / "sub").mkdir(parents=True)
    (volume / "sub" / "a").write_bytes(b"public")
    (volume / "top").write_bytes(b"public")
    copies = {c.host_path: c for c in plan([bind(volume, "/data")]).copies}
    nested, flat = copies[str(volume / "sub" / "a")], copies[str(volume / "top")]
    assert read_copy(nested) == b"public" and read_copy(flat) == b"public"

    (volume / "top").unlink()
    (volume / "top").symlink_to(secret)
    with pytest.raises(InvalidArgument, match="a symlink now stands on its path"):
        read_copy(flat)
    # A directory on the way swapped for a symlink to another tree with the same names.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "a").write_bytes(b"root-only")
    (volume / "sub" / "a").unlink()
    (volume / "sub").rmdir()
    (volume / "sub").symlink_to(elsewhere)
    with pytest.raises(InvalidArgument, match="a symlink now stands on its path"):
        read_copy(nested)
    # A single-file mount whose source is swapped: same path, another inode.
    single = tmp_path / "hosts"
    single.write_bytes(b"127.0.0.1 localhost\n")
    copy = plan([bind(single, "/etc/hosts")]).copies[0]
    single.unlink()
    single.symlink_to(secret)
    with pytest.raises(InvalidArgument, match="replaced since the scan"):
        read_copy(copy)

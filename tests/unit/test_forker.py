"""The shared parent forks daemons that do not depend on it, with their own title."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shim import config, forker, forker_client, proctitle

REPO = Path(__file__).resolve().parents[2]


def test_proctitle_rewrites_the_command_line() -> None:
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); from shim import proctitle; "
        "print(proctitle.set_title(['containerd-shim-cloudhv-v1', '--id', 'x'])); "
        "print(open('/proc/self/cmdline', 'rb').read().rstrip(b'\\0'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(REPO), " " * 200], capture_output=True, text=True
    ).stdout.split("\n")
    assert out[0] == "True"
    assert out[1] == repr(b"containerd-shim-cloudhv-v1\x00--id\x00x")
    assert not proctitle.set_title(["x" * 100_000])  # too long: refused, nothing written


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    return int(stat[stat.rindex(b")") + 2 :].split()[1])


def test_forked_daemon_is_not_the_forkers_child(sock_dir: Path, tmp_path: Path) -> None:
    path = sock_dir / "forker.sock"
    boot = f"import sys; sys.path.insert(0, {str(REPO)!r}); from shim.forker import main; main()"
    parent = subprocess.Popen(
        [sys.executable, "-sE", "-c", boot, "--socket", str(path), " " * forker_client.ARGV_ROOM]
    )
    pid = 0
    try:
        deadline = time.monotonic() + 30
        while not path.exists():
            assert parent.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(sock_dir / "pod.sock"))
        listener.listen()
        ready_r, ready_w = os.pipe()
        config_r, config_w = os.pipe()
        valid = config.parse(
            {
                "vmm": "qemu",
                "kernel_path": "/k",
                "rootfs_path": "/r",
                "kernel_args": "quiet",
                "state_dir": str(tmp_path / "state"),
                "disk_dir": str(tmp_path / "disks"),
            }
        )
        bundle = tmp_path / "bundle"
        bundle.mkdir()
        flags = ["--namespace", "ns", "--id", "t1", "--pod-id", "t1", "--bundle", str(bundle)]
        flags += ["--socket", str(sock_dir / "pod.sock")]
        pid = forker_client.request_daemon(
            flags, {"PATH": "/usr/bin:/bin"}, (listener.fileno(), ready_w, config_r), path=path
        )
        for fd in (ready_w, config_r):
            os.close(fd)
        listener.close()
        os.write(config_w, config.dumps(valid).encode())
        os.close(config_w)
        with os.fdopen(ready_r, "rb") as ready:
            assert ready.readline() == b"ok\n"
        # Its parent is init (or the subreaper), never the forker: killing the forker
        # cannot take it along.
        assert _ppid(pid) != parent.pid
        parent.kill()
        parent.wait()
        time.sleep(0.2)
        assert _ppid(pid) > 0  # still alive
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert cmdline.startswith(b"containerd-shim-cloudhv-v1\0--namespace\0ns")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)


def test_no_forker_means_unavailable(sock_dir: Path) -> None:
    with pytest.raises(forker_client.ForkerUnavailable):
        forker_client.request_daemon([], {}, (0, 1, 2), path=sock_dir / "nobody.sock")


def test_a_killed_forkers_socket_does_not_keep_a_new_one_out(sock_dir: Path) -> None:
    """SIGKILL leaves the socket file behind; the next forker takes over, and a second
    one launched while it serves exits at once."""
    path = sock_dir / "forker.sock"
    boot = f"import sys; sys.path.insert(0, {str(REPO)!r}); from shim.forker import main; main()"
    argv = [sys.executable, "-sE", "-c", boot, "--socket", str(path), " " * forker_client.ARGV_ROOM]

    def serving(proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None and time.monotonic() < deadline
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(path))
                return
            time.sleep(0.05)

    first = subprocess.Popen(argv)
    serving(first)
    first.kill()
    first.wait()
    assert path.exists()  # the killed forker's socket stays
    second = subprocess.Popen(argv)
    try:
        serving(second)
        third = subprocess.Popen(argv)
        assert third.wait(30) == 0  # one serves already
        assert second.poll() is None
    finally:
        second.kill()
        second.wait()


def test_stale_forker_files_go_and_a_live_forkers_stay(tmp_path: Path) -> None:
    own = tmp_path / "forker-own.sock"
    for name in ("gone", "live"):
        (tmp_path / f"forker-{name}.sock").write_text("")
        (tmp_path / f"forker-{name}.sock.lock").write_text("")
    own.write_text("")
    Path(f"{own}.lock").write_text("")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_WRONLY); "
         "fcntl.lockf(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
         str(tmp_path / "forker-live.sock.lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        removed = forker.collect_stale(tmp_path, own)
    finally:
        holder.communicate("")
    assert sorted(p.name for p in removed) == ["forker-gone.sock", "forker-gone.sock.lock"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "forker-live.sock", "forker-live.sock.lock", "forker-own.sock", "forker-own.sock.lock"
    ]

"""The binary's `start` and `delete`, run by the shared parent's workers (shim/entry.py)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim import entry, forker_client, parent_wire
from shim._pb.containerd.task.v2 import shim_pb2

REPO = Path(__file__).resolve().parents[2]
BOOT = f"import sys; sys.path.insert(0, {str(REPO)!r}); from shim.forker import main; main()"
ENTRY = (
    f"import sys; sys.path.insert(0, {str(REPO)!r}); sys.argv[0] = 'containerd-shim-cloudhv-v1'; "
    "from shim.entry import main; sys.exit(main())"
)
IN_PROCESS = (
    f"import sys; sys.path.insert(0, {str(REPO)!r}); "
    "from shim.cli import main; sys.exit(main())"
)


def test_netstrings_round_trip_and_refuse_what_is_cut() -> None:
    fields = [b"", b"a:b,c", bytes(range(256)) * 3]
    assert parent_wire.decode(parent_wire.encode(fields)) == fields
    whole = parent_wire.encode([b"hello"])
    for cut in range(1, len(whole)):
        with pytest.raises(parent_wire.WireError):
            parent_wire.decode(whole[:cut])
    with pytest.raises(parent_wire.WireError, match="bad netstring"):
        parent_wire.decode(b"x5:hello,")


def test_a_run_request_carries_arguments_cwd_environment_and_stdin() -> None:
    argv = ["-namespace", "k8s.io", "-id", "a=b", "start"]
    env = {"PATH": "/bin", "EMPTY": "", "WITH_EQUALS": "x=y"}
    request = parent_wire.run_request(argv, "/run/bundle", env, b"\0stdin\n")
    assert parent_wire.parse_run_request(parent_wire.decode(request)) == (
        argv, "/run/bundle", env, b"\0stdin\n"
    )
    with pytest.raises(parent_wire.WireError, match="carries 1"):
        parent_wire.parse_run_request([b"run", b"/", b"", b"3", b"-v"])
    with pytest.raises(parent_wire.WireError, match="without '='"):
        parent_wire.parse_run_request([b"run", b"/", b"", b"0", b"NOEQUALS"])


@contextlib.contextmanager
def _forker(path: Path) -> Iterator[subprocess.Popen[bytes]]:
    parent = subprocess.Popen(
        [sys.executable, "-sE", "-c", BOOT, "--socket", str(path), " " * forker_client.ARGV_ROOM]
    )
    try:
        _wait_serving(path)
        yield parent
    finally:
        parent.kill()
        parent.wait()


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def test_a_worker_answers_as_the_binary_would_and_is_reaped(
    sock_dir: Path, tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    argv = ["-namespace", "ns", "-id", "gone", "-address", "/run/none.sock", "delete"]
    here = subprocess.run(
        [sys.executable, "-sE", "-c", IN_PROCESS, *argv],
        cwd=bundle, capture_output=True, env={"PATH": "/usr/bin:/bin"},
    )
    with _forker(sock_dir / "forker.sock") as parent:
        request = parent_wire.run_request(argv, str(bundle), {"PATH": "/usr/bin:/bin"}, b"")
        code, out, err = entry.ask_parent(request, str(sock_dir / "forker.sock"))
        assert (code, _deleted(out), err) == (here.returncode, _deleted(here.stdout), here.stderr)
        assert code == 0 and b"only the bundle is cleaned" in err
        request = parent_wire.run_request(["-v"], "/", {}, b"")
        code, out, _ = entry.ask_parent(request, str(sock_dir / "forker.sock"))
        assert code == 0 and b"Runtime: io.containerd.cloudhv.v1" in out
        request = parent_wire.run_request(["-bogus", "start"], "/", {}, b"")
        code, _, err = entry.ask_parent(request, str(sock_dir / "forker.sock"))
        assert code == 2 and b"flag provided but not defined: -bogus" in err
        deadline = time.monotonic() + 5
        while _children(parent.pid):  # no zombie left behind
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_no_answer_means_the_binary_acts_itself(sock_dir: Path) -> None:
    with pytest.raises(entry.Unavailable):
        entry.ask_parent(b"", str(sock_dir / "nobody.sock"))
    path = sock_dir / "mute.sock"
    mute = socket.socket(socket.AF_UNIX)
    mute.bind(str(path))
    mute.listen()

    def hang_up() -> None:  # a worker that dies before it answers
        conn, _ = mute.accept()
        conn.recv(65536)
        conn.close()

    thread = threading.Thread(target=hang_up)
    thread.start()
    try:
        with pytest.raises(entry.Unavailable, match="no answer"):
            entry.ask_parent(parent_wire.run_request(["-v"], "/", {}, b""), str(path))
    finally:
        thread.join()
        mute.close()


def test_served_by_the_parent_the_binary_imports_none_of_the_shim(tmp_path: Path) -> None:
    """The invoking process stays an interpreter start: the action's modules are the
    parent's (imported once), not its own. Without a parent it acts itself, alike."""
    path = Path(parent_wire.socket_path())
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    argv = ["-namespace", "ns", "-id", "gone", "delete"]
    env = {"PATH": "/usr/bin:/bin"}
    # This code's parent: ours, or one a test run of the same checkout started already.
    parent = subprocess.Popen(
        [sys.executable, "-sE", "-c", BOOT, "--socket", str(path), " " * forker_client.ARGV_ROOM]
    )
    try:
        _wait_serving(path)
        served = subprocess.run(
            [sys.executable, "-sE", "-X", "importtime", "-c", ENTRY, *argv],
            cwd=bundle, capture_output=True, env=env,
        )
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.wait()
    imported = [
        line.rsplit("|", 1)[-1].strip()
        for line in served.stderr.decode().splitlines()
        if line.startswith("import time:")
    ]
    assert "shim.entry" in imported
    assert not {"shim.cli", "shim.delete", "json", "re"} & set(imported)
    alone = subprocess.run(
        [sys.executable, "-sE", "-c", IN_PROCESS, *argv], cwd=bundle, capture_output=True, env=env
    )
    assert served.returncode == alone.returncode == 0
    assert _deleted(served.stdout) == _deleted(alone.stdout)


def _deleted(reply: bytes) -> tuple[int, int]:
    """A DeleteResponse's pid and exit status (its exit time differs from run to run)."""
    response = shim_pb2.DeleteResponse()
    response.ParseFromString(reply)
    assert response.exited_at.seconds > 0
    return response.pid, response.exit_status


def _wait_serving(path: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
            probe.connect(str(path))
            return
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_an_invocation_from_another_mount_namespace_is_not_served(sock_dir: Path) -> None:
    """Its bundle and FIFO paths are not the parent's: it must act itself (containerd
    in a mount namespace of its own, beside the node's)."""
    path = sock_dir / "forker.sock"
    ask = (
        f"import sys\nsys.path.insert(0, {str(REPO)!r})\nfrom shim import entry, parent_wire\n"
        "req = parent_wire.run_request(['-v'], '/', {}, b'')\n"
        "try:\n    print(entry.ask_parent(req, sys.argv[1])[0])\n"
        "except entry.Unavailable:\n    print('unavailable')\n"
    )
    with _forker(path):
        here = subprocess.run([sys.executable, "-c", ask, str(path)], capture_output=True)
        apart = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", ask,
             str(path)],
            capture_output=True,
        )
    assert here.stdout == b"0\n", here.stderr
    assert apart.stdout == b"unavailable\n", apart.stderr


def test_a_process_keeps_the_version_it_started_as() -> None:
    """A parent's workers name its version, not the code on disk changed since."""
    code = (
        f"import sys; sys.path.insert(0, {str(REPO)!r}); from shim import parent_wire as w; "
        "first = w.code_key(); w._hash_code = lambda: 'changed on disk'; "
        "print(w.code_key() == first); w.pin_code_key('feedfacefeedface'); "
        "print(w.code_key(), w.socket_path())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == [
        "True", "feedfacefeedface /run/cloudhv/forker-feedfacefeedface.sock"
    ]

"""The client half of the shared parent (shim/forker.py): what `start` asks of it.

`start` asks the parent for a pod's daemon, or a pooled VM's, over a Unix socket,
passing the pod's listening socket and the ready and config pipes as file
descriptors; when none of this code's version answers it launches one. Only the
standard library: `start` imports this.
"""

from __future__ import annotations

import array
import contextlib
import json
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from shim import parent_wire

SOCKET_DIR = Path(parent_wire.SOCKET_DIR)
REQUEST_MAX = 64 * 1024
REQUEST_TIMEOUT_S = 5.0
# Room for a forked daemon's own command line in the forker's argv (see proctitle).
ARGV_ROOM = 2048
ADOPT_TIMEOUT_S = 8.0  # shim/pool.py's, repeated: `start` does not import it


def code_key() -> str:
    """A short hash of the shim's code: the forker's version (shim/parent_wire.py)."""
    return parent_wire.code_key()


def socket_path(key: str | None = None) -> Path:
    return Path(parent_wire.socket_path(key))


class ForkerUnavailable(Exception):
    """No forker of this version answered; the caller spawns the daemon itself."""


def request_daemon(
    argv: Sequence[str],
    env: Mapping[str, str],
    fds: Sequence[int],
    *,
    path: Path | None = None,
    pool: Mapping[str, object] | None = None,
) -> int:
    """Have the forker fork a daemon with `argv` (its own flags, without the fd flags),
    `env`, and `fds` = (listen socket, ready pipe, config pipe), or hand the pod a
    pooled VM of `pool` (shim/pool.py: path, digest, size, config). Returns its pid."""
    request = {"argv": list(argv), "env": dict(env)}
    if pool is not None:
        request["pool"] = dict(pool)
    return int(str(_ask(json.dumps(request).encode(), fds, path)["pid"]))


def drain_pool(config_path: str = "", *, path: Path | None = None) -> int:
    """Have the forker release the pooled VMs of `config_path` ("": of every config);
    returns how many. Their daemons then shut them down."""
    return int(str(_ask(json.dumps({"drain": config_path}).encode(), (), path)["drained"]))


def _ask(body: bytes, fds: Sequence[int], path: Path | None) -> dict[str, object]:
    target = path or socket_path()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # A pooled VM's take is answered once it is decided (shim/pool.py).
        sock.settimeout(REQUEST_TIMEOUT_S + ADOPT_TIMEOUT_S)
        try:
            sock.connect(str(target))
        except OSError as err:
            raise ForkerUnavailable(f"{target}: {err.strerror or err}") from None
        if fds:
            fd_array = array.array("i", fds)
            sock.sendmsg([body], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd_array.tobytes())])
        else:
            sock.sendall(body)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    except (OSError, TimeoutError) as err:
        raise ForkerUnavailable(f"{target}: {err}") from None
    finally:
        sock.close()
    try:
        answer = json.loads(reply)
        if not isinstance(answer, dict) or "error" in answer:
            raise ValueError(answer)
        return answer
    except (ValueError, KeyError, TypeError):
        raise ForkerUnavailable(f"{target}: answered {reply[:200]!r}") from None


def launch(key: str | None = None, pool: Mapping[str, object] | None = None) -> None:
    """Start a forker in the background, detached; it exits at once if one serves.
    `pool` (as for request_daemon) is a pool it starts filling at once."""
    root = str(Path(__file__).resolve().parent.parent)
    boot = (
        f"import sys; sys.path.insert(0, {root!r}); "
        "from shim.forker import main; sys.exit(main())"
    )
    proc = subprocess.Popen(
        [sys.executable, "-sE", "-c", boot, "--socket", str(socket_path(key)), " " * ARGV_ROOM],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        cwd="/",
    )
    assert proc.stdin is not None
    with contextlib.suppress(OSError):  # a few KiB: the pipe holds them
        proc.stdin.write(json.dumps(dict(pool)).encode() if pool else b"")
    with contextlib.suppress(OSError):
        proc.stdin.close()

"""The first module `containerd-shim-cloudhv-v1` runs: it hands `start` and `delete`
to the shared parent, which runs them, everything imported already, in a forked worker.

containerd runs the binary twice per container, `start` then `delete`, so a pod of
one container costs four interpreter starts. Each used to import what its action
needs: ~45 ms of CPU for `start`, ~200 ms for `delete` (its cleanup brings asyncio
and the network code), ~0.9 s for a pod's whole lifecycle. Here only builtin
modules are imported. The invocation (arguments, working directory, environment,
and `start`'s stdin) goes to the shared parent (shim/forker.py), which forks a
worker that runs shim/cli.py's `main`. The worker's exit code, stdout and stderr
come back and are reproduced here.

When no parent of this code's version answers, or its worker ends without an
answer, shim/cli.py runs here instead, as it always did (and its `start` launches
a parent for the invocations to come). Both actions are idempotent, so running one
again after a worker that died half-way is safe.

Builtin modules only (and shim/parent_wire.py), and no `re`, `json` or `hashlib`:
their imports alone would double what this costs.
"""

from __future__ import annotations

import _socket
import os
import sys

from shim.parent_wire import decode, run_request, socket_path

# Long enough for a `start` that waits for its daemon (20 s) or a pooled VM (8 s).
REPLY_TIMEOUT_S = 60.0
STDIN_MAX = 1024 * 1024
_ACTIONS = ("start", "delete")


# -- the client ---------------------------------------------------------------------------


class Unavailable(Exception):
    """No worker answered: the caller runs the action itself."""


def ask_parent(request: bytes, path: str) -> tuple[int, bytes, bytes]:
    """Send `request` to the parent at `path`; returns the worker's (code, stdout, stderr)."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(REPLY_TIMEOUT_S)
        try:
            sock.connect(path)
        except OSError as err:
            raise Unavailable(f"{path}: {err}") from None
        sock.sendall(request)
        sock.shutdown(_socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except TimeoutError:
        # The worker may still be acting: running the action again here would race it.
        raise
    except OSError as err:
        raise Unavailable(f"{path}: {err}") from None
    finally:
        sock.close()
    try:
        code, out, errors = decode(b"".join(chunks))
        return int(code), out, errors
    except ValueError:  # no answer (a worker that died), or not one of ours
        raise Unavailable(f"{path}: no answer") from None


def _read_stdin() -> bytes:
    """containerd 2.x sends `start` its BootstrapParams on stdin; 1.x gives /dev/null."""
    try:
        if os.isatty(0):
            return b""
        chunks = []
        size = 0
        while chunk := os.read(0, 65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > STDIN_MAX:
                break
        return b"".join(chunks)
    except OSError:
        return b""


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def main() -> int:
    argv = sys.argv[1:]
    stdin: bytes | None = None
    # A cheap test: the worker parses the flags properly, and runs whatever it is given.
    if any(action in argv for action in _ACTIONS):
        stdin = _read_stdin() if "start" in argv else b""
        request = run_request(argv, os.getcwd(), dict(os.environ), stdin)
        try:
            code, out, errors = ask_parent(request, socket_path())
        except Unavailable:
            pass
        except TimeoutError:
            _write_all(2, b"containerd-shim-cloudhv-v1: the shared parent did not answer\n")
            return 1
        else:
            _write_all(1, out)
            _write_all(2, errors)
            return code
    from shim.cli import main as run_here

    return run_here(argv, stdin)


if __name__ == "__main__":
    sys.exit(main())

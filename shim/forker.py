"""The shared parent: one pre-imported process per node that forks each pod's daemon.

A pod's daemon spends most of its memory on import-time objects (asyncio, protobuf,
the shim's own modules). Forked from one parent that imported them once, and froze
them out of the garbage collector's reach (`gc.freeze()`), the daemons share those
pages instead of each paying for its own copy.

Crash isolation is kept: the parent double-forks, so a daemon's parent is init (or
the subreaper), never the forker, and killing the forker affects no running pod.
One daemon still serves one pod: a daemon's crash takes only its pod with it.

`start` (shim/cli.py, through shim/forker_client.py) asks the forker for a daemon
over a Unix socket, passing the pod's listening socket and the ready and config
pipes as file descriptors. When no forker answers, or one of another version of the
shim, `start` spawns the daemon itself (and a forker for the next pod). The forker's
socket name carries a hash of the shim's code, so an upgrade never forks old code.

The forker also runs the binary's `start` and `delete` invocations (shim/entry.py):
each in a forked worker that has the shim imported already, so an invocation costs
an interpreter start and a fork instead of its imports.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from shim import parent_wire
from shim.forker_client import REQUEST_MAX, REQUEST_TIMEOUT_S, SOCKET_DIR

if TYPE_CHECKING:
    from shim.pool import Pools

IDLE_EXIT_S = 600.0  # a forker nobody asked for this long exits (no daemon depends on it)
WORKER_REAP_S = 0.5  # how long a finished worker may wait to be reaped


# -- the server half: the forker itself ---------------------------------------------------


def collect_stale(directory: Path, own: Path) -> list[Path]:
    """Remove the sockets and locks of forkers (other versions) that are gone: a lock
    nobody holds. Each version's files would otherwise stay in /run for good."""
    removed = []
    for lock_path in directory.glob("forker-*.sock.lock"):
        if lock_path == Path(f"{own}.lock"):
            continue
        try:
            fd = os.open(lock_path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # its forker serves
        try:
            socket_path = lock_path.with_name(lock_path.name.removesuffix(".lock"))
            for stale in (socket_path, lock_path):
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()
                    removed.append(stale)
        finally:
            os.close(fd)
    return removed


def main() -> int:
    path = Path(sys.argv[sys.argv.index("--socket") + 1])
    SOCKET_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    # The lock is held for the forker's life: whoever holds it serves, and a socket
    # found without its holder is a killed forker's, removed so a new one can serve.
    # A POSIX lock: forked daemons do not inherit it. Taken before the imports, so a
    # forker launched while one serves costs little.
    lock = os.open(f"{path}.lock", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return 0  # another forker of this version serves already
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    collect_stale(path.parent, path)
    named = path.name.removeprefix("forker-").removesuffix(".sock")
    if path.name == f"forker-{named}.sock":  # the version it was launched as, not disk's
        parent_wire.pin_code_key(named)
    else:
        parent_wire.code_key()  # a socket of another name (tests): the code as imported
    import gc
    import selectors

    # What every daemon imports, imported once here (the pool's too). The VMM backends
    # and the netlink library (pyroute2, 11.6 MiB of objects: every CNI pod's daemon
    # loads it to set up TAPs and tc, and port-forward's nftables) are imported lazily
    # by the daemon, so they are named explicitly.
    import pyroute2
    import pyroute2.netlink.exceptions
    import pyroute2.nftables.expressions
    import pyroute2.nftables.main

    import shim.cli
    import shim.daemon
    import shim.delete
    import shim.pool
    import shim.vmm.cloud_hypervisor
    import shim.vmm.qemu
    import shim.warm

    del shim, pyroute2
    from shim.cli import VALIDATED_DIR
    from shim.config import collect_validated
    from shim.pool import Pools

    collect_validated(VALIDATED_DIR)

    initial = _read_stdin()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(str(path))
    except OSError:
        return 0
    finally:
        os.umask(old_umask)
    listener.listen(64)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, None)
    pools: Pools

    def close_in_child() -> list[socket.socket]:
        return [listener, *pools.sockets()]

    pools = Pools(
        selector,
        lambda pool: _fork_warm(pool.config_text, pool.path, close_in_child),
        lambda argv, env, fds: _double_fork(argv, env, fds, close_in_child),
    )
    if initial:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            pools.register(json.loads(initial))
    gc.collect()
    gc.freeze()  # the imported objects are never collected: no GC writes to their pages
    last_request = time.monotonic()
    workers: set[int] = set()
    try:
        while True:
            timeout = pools.tick()
            if workers:  # reaped here, so their CPU time is in ours (bench/measure.py)
                timeout = WORKER_REAP_S if timeout is None else min(timeout, WORKER_REAP_S)
            events = selector.select(timeout)
            for key, _ in events:
                if key.data is not None:
                    pools.readable(key.data)
                    continue
                conn, _ = listener.accept()
                last_request = time.monotonic()
                conn.settimeout(REQUEST_TIMEOUT_S)
                worker = _serve_one(conn, pools, close_in_child)
                if worker:
                    workers.add(worker)
            workers = {pid for pid in workers if not _reaped(pid)}
            if not pools.active and time.monotonic() - last_request > IDLE_EXIT_S:
                return 0  # idle: the next pod's start launches a new one
    finally:
        pools.drain()
        for mine in (path, Path(f"{path}.lock")):  # the lock is held until we exit
            with contextlib.suppress(OSError):
                mine.unlink()


def _read_stdin() -> bytes:
    """The pool `launch` was given, if any (stdin is then a pipe, closed after it). A
    stdin that stays silent (another launcher's) is not waited for long."""
    import select

    data = b""
    with contextlib.suppress(OSError, ValueError):
        while not os.isatty(0) and len(data) < REQUEST_MAX:
            if not select.select([0], [], [], 1.0)[0]:
                break
            chunk = os.read(0, REQUEST_MAX)
            if not chunk:
                break
            data += chunk
    return data


# The sockets a forked child closes (then every other descriptor but stdio and its own).
ToClose = Callable[[], list[socket.socket]]


def _shares_our_mounts(pid: int) -> bool:
    """Whether process `pid` (0: not in our pid namespace) sees our mount namespace."""
    try:
        return pid > 0 and os.readlink(f"/proc/{pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt")
    except OSError:
        return False


def _reaped(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:
        return True


def _serve_one(conn: socket.socket, pools: Pools, close: ToClose) -> int:
    """Answer one request; returns the pid of the worker it forked, if it did (0)."""
    fds: list[int] = []
    handed = False
    try:
        cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        if int.from_bytes(cred[4:8], "little") != os.getuid():
            return 0
        if not _shares_our_mounts(int.from_bytes(cred[0:4], "little")):
            # Its paths (the bundle, the FIFOs) are not ours: a worker or daemon made
            # here would act on other files. No answer: it acts itself.
            return 0
        body, fds = _receive(conn)
        if body.startswith(b"%d:%s," % (len(parent_wire.RUN_VERB), parent_wire.RUN_VERB)):
            if fds:
                raise ValueError("a run request carries no file descriptors")
            return _fork_worker(parent_wire.decode(body), conn, close)
        request = json.loads(body)
        if "drain" in request:
            conn.sendall(json.dumps({"drained": pools.drain(str(request["drain"]))}).encode())
            return 0
        argv = [str(a) for a in request["argv"]]
        env = {str(k): str(v) for k, v in request["env"].items()}
        if len(fds) != 3:
            raise ValueError(f"want 3 file descriptors, got {len(fds)}")
        pool = pools.register(request["pool"]) if request.get("pool") else None
        if pool is not None and pools.offer(pool, argv, env, fds, conn):
            handed = True  # answered once the pooled VM's daemon decided
            return 0
        # The child must not hold `conn`: start reads the answer to its EOF.
        pid = _double_fork(argv, env, fds, lambda: [*close(), conn])
        conn.sendall(json.dumps({"pid": pid}).encode())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps({"error": str(err)}).encode())
    finally:
        if not handed:
            conn.close()
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
    return 0


def _fork_worker(fields: list[bytes], conn: socket.socket, close: ToClose) -> int:
    """Run one `start` or `delete` invocation (shim/entry.py's request) in a child of
    ours, which answers on `conn`; returns its pid. A child, not a grandchild: its
    exit is reaped here, and its CPU time counted with ours."""
    argv, cwd, env, stdin = parent_wire.parse_run_request(fields)
    pid = os.fork()
    if pid == 0:
        try:
            _shed_parent_state(close, keep=[conn.fileno()])
            conn.settimeout(None)
            conn.sendall(_run_invocation(argv, cwd, env, stdin))
        finally:
            os._exit(0)
    return pid


def _run_invocation(argv: list[str], cwd: str, env: dict[str, str], stdin: bytes) -> bytes:
    """shim/cli.py's `main` as the invoking process would have run it: its cwd and
    environment; its stdout and stderr captured. Returns the answer to send."""
    import io
    import traceback

    out, err = io.BytesIO(), io.BytesIO()
    sys.stdout = io.TextIOWrapper(out, encoding="utf-8", write_through=True)
    sys.stderr = io.TextIOWrapper(err, encoding="utf-8", write_through=True)
    code = 1
    try:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        from shim import cli

        code = cli.main(argv, stdin)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:
        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    return parent_wire.encode([b"%d" % code, out.getvalue(), err.getvalue()])


def _receive(conn: socket.socket) -> tuple[bytes, list[int]]:
    fds = array.array("i")
    body = b""
    while True:
        data, ancdata, _, _ = conn.recvmsg(REQUEST_MAX, socket.CMSG_LEN(16 * fds.itemsize))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        if not data:
            return body, list(fds)
        body += data
        if len(body) > REQUEST_MAX:
            raise ValueError("request too large")


def _double_fork(argv: list[str], env: dict[str, str], fds: list[int], close: ToClose) -> int:
    """Fork a daemon whose parent is not us; returns its pid."""
    return _fork_detached(lambda: _become_daemon(argv, env, fds), close, keep=fds)


def _fork_warm(config_text: str, config_path: str, close: ToClose) -> tuple[int, socket.socket]:
    """Fork a pooled VM's daemon (shim/warm.py); returns its pid and our end of its
    socketpair."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def run() -> int:
        ours.detach()  # closed already, with every descriptor not kept
        from shim import warm

        return warm.main(config_text, theirs, config_path)

    try:
        pid = _fork_detached(run, close, keep=[theirs.fileno()])
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return pid, ours


def _fork_detached(run: Callable[[], int], close: ToClose, keep: Sequence[int]) -> int:
    """Run `run` in a grandchild (its parent is init or the subreaper, never us), with
    none of our descriptors but stdio and `keep`; returns its pid."""
    report_r, report_w = os.pipe()
    first = os.fork()
    if first == 0:  # the intermediate child: fork the daemon, tell its pid, exit
        try:
            os.close(report_r)
            os.setsid()
            second = os.fork()
            if second == 0:
                os.close(report_w)
                code = 1
                try:
                    _shed_parent_state(close, keep)
                    code = run()
                finally:
                    os._exit(code)
            os.write(report_w, str(second).encode())
        finally:
            os._exit(0)
    os.close(report_w)
    with os.fdopen(report_r, "rb") as report:
        pid = int(report.read() or b"0")
    os.waitpid(first, 0)
    if pid <= 0:
        raise OSError("the daemon could not be forked")
    return pid


def _shed_parent_state(close: ToClose, keep: Sequence[int]) -> None:
    """In a child just forked: close our sockets and every other descriptor but stdio
    and `keep`, and reseed `random`, so that no two children draw the parent's sequence."""
    for sock in close():
        if sock.fileno() not in keep:
            sock.close()
    _close_all_but(keep)
    import random

    random.seed()


def _close_all_but(keep: Sequence[int]) -> None:
    """Close every descriptor but stdio and `keep`: another pod's socket or pipe, or a
    pooled VM's socketpair, held by a child would keep its EOF from ever coming."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _become_daemon(argv: list[str], env: dict[str, str], fds: list[int]) -> int:
    os.environ.clear()
    os.environ.update(env)
    from shim import proctitle
    from shim.daemon import main as daemon_main

    listen_fd, ready_fd, config_fd = fds
    flags = [
        *argv,
        "--listen-fd", str(listen_fd),
        "--ready-fd", str(ready_fd),
        "--config-fd", str(config_fd),
    ]
    proctitle.set_title(["containerd-shim-cloudhv-v1", *flags])
    return daemon_main(flags)

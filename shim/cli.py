"""`containerd-shim-cloudhv-v1`: the binary containerd runs (`start`, `delete`, `-v`, `-info`).

`start` runs once per container, so its import set is kept to the standard
library (protobuf alone costs ~45 ms here; see shim/pbwire.py). It finds the
pod's socket, and either reuses the pod's live daemon or binds the socket,
spawns the daemon fully detached with the listening socket, waits for it to be
ready and prints the address. `delete` cleans up from persisted state alone.

When it has a daemon made, `start` first validates the config (pydantic, ~0.1 s) and
puts the result in a pipe the daemon reads: the daemon, one per pod for the pod's
lifetime, never loads pydantic (~8 MiB PSS each). A config with a pool (`pool.size`)
is named in the request to the shared parent, which may hand the pod a pre-booted
VM (shim/pool.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shim import bundle as bundle_mod
from shim import forker_client, pbwire, spec
from shim.bundle import SocketPathError, can_connect, socket_path, write_address

if TYPE_CHECKING:
    from shim.config import Config

RUNTIME = "io.containerd.cloudhv.v1"
VERSION = "0.1.0"
READY_TIMEOUT_S = 20.0
# Configs this code validated, by content (shim/config.py load_with_digest).
VALIDATED_DIR = Path(forker_client.SOCKET_DIR, "configs")


class UsageError(Exception):
    pass


@dataclass(frozen=True)
class Args:
    namespace: str = ""
    address: str = ""
    publish_binary: str = ""
    id: str = ""
    bundle: str = ""
    debug: bool = False
    version: bool = False
    info: bool = False
    action: str = ""


_STRING_FLAGS = {
    "namespace": "namespace",
    "address": "address",
    "publish-binary": "publish_binary",
    "id": "id",
    "bundle": "bundle",
    # Accepted for compatibility with the Go shim's flag set, ignored.
    "socket": "",
}
_BOOL_FLAGS = {"debug": "debug", "v": "version", "info": "info"}
_TRUE = {"1", "t", "T", "true", "TRUE", "True"}
_FALSE = {"0", "f", "F", "false", "FALSE", "False"}


def parse_args(argv: Sequence[str]) -> Args:
    """Go `flag` semantics: `-x v`, `--x v`, `-x=v`; bools as `-x` or `-x=false`;
    parsing stops at the first non-flag argument or after `--`."""
    values: dict[str, object] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            rest = list(argv[i:])
            break
        if len(arg) < 2 or not arg.startswith("-"):
            rest = list(argv[i - 1 :])
            break
        name = arg[2:] if arg.startswith("--") else arg[1:]
        if not name or name.startswith("-") or name.startswith("="):
            raise UsageError(f"bad flag syntax: {arg}")
        name, has_value, value = name.partition("=")
        if name in _BOOL_FLAGS:
            if has_value and value not in _TRUE | _FALSE:
                raise UsageError(f"invalid boolean value {value!r} for -{name}")
            values[_BOOL_FLAGS[name]] = (not has_value) or value in _TRUE
        elif name in _STRING_FLAGS:
            if not has_value:
                if i >= len(argv):
                    raise UsageError(f"flag needs an argument: -{name}")
                value = argv[i]
                i += 1
            if _STRING_FLAGS[name]:
                values[_STRING_FLAGS[name]] = value
        elif name in ("h", "help"):
            raise UsageError("help requested")
        else:
            raise UsageError(f"flag provided but not defined: -{name}")
    action = rest[0] if rest else ""
    return Args(action=action, **values)  # type: ignore[arg-type]


def bind_listener(path: Path) -> socket.socket | None:
    """A listening socket at `path`, or None if a live server already listens there."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    for _ in range(2):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket file is created 0600
        try:
            sock.bind(str(path))
            sock.listen(128)
            return sock
        except OSError as err:
            sock.close()
            if err.errno != errno.EADDRINUSE:
                raise
            if can_connect(path):
                return None
            path.unlink(missing_ok=True)  # a dead shim's socket
        finally:
            os.umask(old_umask)
    raise UsageError(f"cannot bind {path}: address in use")


def _daemon_flags(args: Args, pod_id: str, path: Path) -> list[str]:
    """The daemon's command line after the interpreter, without the fd flags."""
    flags = [
        "--namespace", args.namespace,
        "--address", args.address,
        "--publish-binary", args.publish_binary,
        "--id", args.id,
        "--pod-id", pod_id,
        "--bundle", str(Path.cwd()),
        "--socket", str(path),
    ]
    if args.debug:
        flags.append("--debug")
    return flags


def _daemon_argv(args: Args, pod_id: str, path: Path, fds: tuple[int, int, int]) -> list[str]:
    root = str(Path(__file__).resolve().parent.parent)
    # -sE: no user site, no PYTHON* env; the checkout (or site-packages) goes on sys.path.
    # The binary's name stays visible in the command line, for ps and for tests.
    boot = (
        f"import sys; sys.argv[0] = 'containerd-shim-cloudhv-v1'; sys.path.insert(0, {root!r}); "
        "from shim.daemon import main; sys.exit(main())"
    )
    return [
        sys.executable, "-sE", "-c", boot,
        *_daemon_flags(args, pod_id, path),
        "--listen-fd", str(fds[0]),
        "--ready-fd", str(fds[1]),
        "--config-fd", str(fds[2]),
    ]


class _Daemon:
    """The pod daemon `start` launched: forked by the shared parent, or spawned here."""

    def __init__(self, pid: int, proc: subprocess.Popen[bytes] | None = None) -> None:
        self.pid = pid
        self._proc = proc
        self._start_time = _start_time(pid)

    def status(self) -> int | None:
        """Its exit status if it is gone (-1 when unknown: not our child), else None."""
        if self._proc is not None:
            return self._proc.poll()
        if self._start_time is None or _start_time(self.pid) != self._start_time:
            return -1
        return None

    def kill(self) -> None:
        if self.status() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, 9)
        if self._proc is not None:
            self._proc.wait()


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            stat = stat_file.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()
    return None if fields[0] in (b"Z", b"X") else fields[19].decode()


def _launch_daemon(
    args: Args,
    pod_id: str,
    path: Path,
    fds: tuple[int, int, int],
    pool: dict[str, object] | None,
) -> _Daemon:
    """Ask the shared parent for a daemon (or a pooled VM's); spawn one here when none
    of this version serves (and start one for the pods to come)."""
    try:
        flags = _daemon_flags(args, pod_id, path)
        pid = forker_client.request_daemon(flags, os.environ, fds, pool=pool)
        return _Daemon(pid)
    except forker_client.ForkerUnavailable:
        # None answered: none runs, or a killed one left its socket. A new one serves
        # the next pod (it exits at once if another holds the forker's lock).
        forker_client.launch(pool=pool)
    proc = subprocess.Popen(
        _daemon_argv(args, pod_id, path, fds),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        pass_fds=fds,
        start_new_session=True,  # no signal for containerd's process group reaches it
        cwd="/",
    )
    return _Daemon(proc.pid, proc)


def _await_ready(fd: int, daemon: _Daemon, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            daemon.kill()
            raise UsageError(f"shim daemon not ready after {timeout:.0f}s")
        readable, _, _ = select.select([fd], [], [], left)
        if not readable:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            code = daemon.status()
            raise UsageError(f"shim daemon exited before it was ready (status {code})")
        buf += chunk
    line = buf.split(b"\n", 1)[0].decode(errors="replace")
    if line != "ok":
        raise UsageError(line.removeprefix("error: "))


def start(args: Args, stdin: bytes) -> bytes:
    """Find or launch the pod's daemon; returns what to print: the address, or for
    containerd 2.3+ (BootstrapParams on stdin) a BootstrapResult carrying it."""
    bundle = Path.cwd()
    identity = spec.identify(args.id, spec.bundle_annotations(bundle))
    given = pbwire.parse_start_stdin(stdin, args.id, args.namespace)
    root = Path(given.socket_dir) if given.socket_dir else None
    path = socket_path(args.address, args.namespace, identity.pod_id, root=root)
    address = f"unix://{path}"
    answer = pbwire.bootstrap_result(address) if given.bootstrap else address.encode()
    config_path = given.config_path
    bundle_mod.write_info(bundle, bundle_mod.BundleInfo(identity.pod_id, config_path))
    listener = bind_listener(path)
    if listener is None:  # the pod's daemon is alive: this task joins it
        write_address(bundle, address)
        return answer
    # Not inherited by anything `start` spawns: they travel as fds on purpose.
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    config_r, config_w = os.pipe2(os.O_CLOEXEC)
    try:
        validated, text, pool = _load_config(config_path)
        # delete then finds the state without the config, should it change or break.
        info = bundle_mod.BundleInfo(identity.pod_id, config_path, str(validated.state_dir))
        bundle_mod.write_info(bundle, info)
        # The config waits in the pipe (a few KiB: it fits) for whichever daemon serves,
        # a pooled VM's never reading it: a cold one forked after a failed take does.
        rest = _write_ahead(config_w, text.encode())
        fds = (listener.fileno(), ready_w, config_r)
        daemon = _launch_daemon(args, identity.pod_id, path, fds, pool)
        for fd in (ready_w, config_r):
            os.close(fd)
        ready_w = config_r = -1
        with contextlib.suppress(BrokenPipeError):  # a dead daemon: _await_ready says how
            while rest:
                rest = rest[os.write(config_w, rest) :]
        os.close(config_w)
        config_w = -1
        _await_ready(ready_r, daemon, READY_TIMEOUT_S)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        listener.close()
        for fd in (ready_r, ready_w, config_r, config_w):
            if fd >= 0:
                os.close(fd)
    write_address(bundle, address)
    return answer


def _load_config(config_path: str) -> tuple[Config, str, dict[str, object] | None]:
    """The validated config, as the JSON the daemon reads, and the pool it names.

    Validated before any daemon exists: an invalid config leaves nothing behind.
    """
    from shim import config

    resolved = config.resolve_path(config_path)
    try:
        validated, digest = config.load_with_digest(resolved, VALIDATED_DIR)
    except config.ConfigError as err:
        raise UsageError(str(err)) from None
    text = config.dumps(validated)
    pool: dict[str, object] | None = None
    if validated.pool.size > 0:
        pool = {
            "path": os.path.abspath(resolved),
            "digest": digest,
            "size": validated.pool.size,
            "config": text,
        }
    return validated, text, pool


def _write_ahead(fd: int, data: bytes) -> bytes:
    """Write what the pipe takes without blocking; returns the rest."""
    os.set_blocking(fd, False)
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except BlockingIOError:
        pass
    finally:
        os.set_blocking(fd, True)
    return bytes(view)


def main(argv: Sequence[str] | None = None, stdin: bytes | None = None) -> int:
    """Run one invocation. `stdin`: what shim/entry.py read of it already, if anything."""
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as err:
        print(f"containerd-shim-cloudhv-v1: {err}", file=sys.stderr)
        print(
            "usage: containerd-shim-cloudhv-v1 -namespace NS -address ADDR "
            "-publish-binary BIN -id ID [-bundle DIR] [-debug] start|delete",
            file=sys.stderr,
        )
        return 2
    if args.version:
        print(f"containerd-shim-cloudhv-v1:\n  Runtime: {RUNTIME}\n  Version: {VERSION}")
        return 0
    try:
        if args.info:
            from shim.delete import runtime_info

            sys.stdout.buffer.write(runtime_info(sys.stdin.buffer.read(), RUNTIME, VERSION))
            return 0
        if args.action == "start":
            _require(args, "namespace", "address", "id")
            if stdin is None:
                stdin = b"" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()
            sys.stdout.buffer.write(start(args, stdin))
            return 0
        if args.action == "delete":
            _require(args, "namespace", "id")
            from shim.delete import delete

            bundle_dir = Path(args.bundle) if args.bundle else Path.cwd()
            sys.stdout.buffer.write(delete(args.id, bundle_dir, args.namespace, args.address))
            return 0
    except (UsageError, OSError, pbwire.WireError, SocketPathError, spec.SpecError) as err:
        print(f"containerd-shim-cloudhv-v1 {args.action}: {err}", file=sys.stderr)
        return 1
    print(f"containerd-shim-cloudhv-v1: unknown action {args.action!r}", file=sys.stderr)
    return 2


def _require(args: Args, *names: str) -> None:
    missing = [n for n in names if not getattr(args, n)]
    if missing:
        raise UsageError("missing flags: " + ", ".join(f"-{n}" for n in missing))

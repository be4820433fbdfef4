"""A stand-in for the `cloud-hypervisor` binary: its command line, its REST API, real VMs.

No Cloud Hypervisor can be installed on the machines these tests run on, and their
KVM runs only paravirtualised guests. This program takes CH's command line (the
flags the shim passes, and the rest refused as clap would), serves CH's API on
the API socket, validates every request body against the official OpenAPI spec
(tests/chsim/spec.py), answers as CH v53 does (tests/chsim/model.py), writes
CH's event-monitor records, and carries the VM out on QEMU TCG through the shim's
own QEMU backend. It exits when the guest powers off, as CH does.

Environment, for what CH has no flag for: CHSIM_QEMU, CHSIM_VSOCK_BACKEND,
CHSIM_ACCEL (tcg), CHSIM_HOTPLUG_SLOTS (8).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Run as a script, this directory would come first on sys.path and its modules would
# shadow the standard library's (events, spec, ...): the repository root replaces it.
sys.path[0] = str(Path(__file__).resolve().parents[2])

from tests.chsim.events import EventMonitor  # noqa: E402
from tests.chsim.model import Backend, StandIn  # noqa: E402
from tests.chsim.server import Server  # noqa: E402

VERSION = "cloud-hypervisor v53.0.0 (stand-in: tests/chsim)"
# CH's options (cloud-hypervisor/src/main.rs, v53) that take a value, and flags.
VALUE_OPTIONS = {
    "--api-socket", "--balloon", "--cmdline", "--console", "--cpus", "--dbus-object-path",
    "--dbus-service-name", "--debug-console", "--device", "--disk", "--event-monitor",
    "--firmware", "--fs", "--fw-cfg-config", "--gdb", "--generic-vhost-user", "--igvm",
    "--host-data", "--initramfs", "--ivshmem", "--kernel", "--landlock-rules", "--log-file",
    "--log-format", "--memory", "--memory-zone", "--net", "--numa", "--pci-segment",
    "--platform", "--pmem", "--pvmemcontrol", "--rate-limit-group", "--restore", "--rng",
    "--rtc", "--seccomp", "--serial", "--tpm", "--user-device", "--vdpa", "--vsock",
}
FLAGS = {"--landlock", "--no-shutdown", "--dbus-system-bus", "--pvpanic", "--watchdog"}
SECCOMP_VALUES = ("true", "false", "log", "errno")
VM_FROM_COMMAND_LINE = {"--kernel", "--firmware", "--igvm", "--restore"}


class UsageError(Exception):
    pass


@dataclass
class Args:
    options: dict[str, list[str]] = field(default_factory=dict)
    flags: set[str] = field(default_factory=set)
    verbosity: int = 0
    version: bool = False


def parse_args(argv: list[str]) -> Args:
    args = Args()
    index = 0
    while index < len(argv):
        arg = argv[index]
        index += 1
        name, eq, inline = arg.partition("=")
        if arg in ("-V", "--version"):
            args.version = True
        elif arg.startswith("-v") and set(arg[1:]) == {"v"}:
            args.verbosity += len(arg) - 1
        elif arg in FLAGS:
            args.flags.add(arg)
        elif name in VALUE_OPTIONS:
            if eq:
                value = inline
            elif index < len(argv):
                value = argv[index]
                index += 1
            else:
                raise UsageError(
                    f"a value is required for '{name} <{name[2:]}>' but none was supplied"
                )
            args.options.setdefault(name, []).append(value)
        else:
            raise UsageError(f"unexpected argument '{arg}' found")
    seccomp = args.options.get("--seccomp", ["true"])[-1]
    if seccomp not in SECCOMP_VALUES:
        raise UsageError(
            f"invalid value '{seccomp}' for '--seccomp <seccomp>' "
            f"[possible values: {', '.join(SECCOMP_VALUES)}]"
        )
    return args


def _path_or_fd(option: str, value: str, *, bare_path: bool) -> tuple[str, str]:
    """CH's `path=<path>` or `fd=<fd>` option values (a bare path for --api-socket)."""
    key, eq, rest = value.partition("=")
    if eq and key in ("path", "fd"):
        if key == "fd" and not rest.isdigit():
            raise UsageError(f"Error parsing {option}: invalid fd {rest!r}")
        return key, rest
    if bare_path and not eq:
        return "path", value
    raise UsageError(f"Error parsing {option}: expected path=<path> or fd=<fd>, got {value!r}")


def _listener(value: str) -> tuple[socket.socket, Path | None]:
    kind, where = _path_or_fd("--api-socket", value, bare_path=True)
    if kind == "fd":
        return socket.socket(fileno=int(where)), None
    path = Path(where)
    # v53 locks `<socket>.lock`; holding it, whatever is at the path is a crashed
    # run's and is removed before binding.
    lock = os.open(f"{path}.lock", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(lock)
        raise UsageError(f"API socket {path} is in use by another cloud-hypervisor") from None
    _held.append(lock)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.bind(str(path))
    sock.listen(16)
    return sock, path


_held: list[int] = []  # the API socket's lock, held for the process' life


def _event_fd(value: str | None) -> int | None:
    if value is None:
        return None
    kind, where = _path_or_fd("--event-monitor", value, bare_path=False)
    if kind == "fd":
        return int(where)
    return os.open(where, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)


def _setup_logging(args: Args) -> None:
    log_file = args.options.get("--log-file", [None])[-1]
    handler: logging.Handler = (
        logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(
        logging.Formatter("cloud-hypervisor: %(asctime)s %(levelname)s %(message)s")
    )
    logging.basicConfig(level=logging.DEBUG if args.verbosity > 1 else logging.INFO,
                        handlers=[handler])
    logging.getLogger("qemu.qmp").setLevel(logging.WARNING)


async def run(args: Args) -> int:
    api_socket = args.options.get("--api-socket", [None])[-1]
    if api_socket is None:
        raise UsageError("stand-in: --api-socket is required (no VM from the command line)")
    listener, path = _listener(api_socket)
    events = EventMonitor(_event_fd(args.options.get("--event-monitor", [None])[-1]))
    events.emit("vmm", "starting")
    base = path.parent if path is not None else Path.cwd()
    private = base / "chsim"
    private.mkdir(mode=0o700, exist_ok=True)
    standin = StandIn(Backend.from_env(private), events, no_shutdown="--no-shutdown" in args.flags)
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stopping.append(loop.create_task(standin.terminate())))
    server = asyncio.create_task(Server(listener, standin.handle).serve())
    try:
        await standin.done.wait()
    finally:
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server
        if standin.config is not None:
            await standin.terminate()
        events.close()
        shutil.rmtree(private, ignore_errors=True)
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()
    return standin.exit_code


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.version:
        print(VERSION)
        return 0
    given = VM_FROM_COMMAND_LINE & set(args.options)
    if given:
        print(f"Error: stand-in: a VM from the command line ({', '.join(sorted(given))}) "
              "is not modelled", file=sys.stderr)
        return 1
    _setup_logging(args)
    try:
        return asyncio.run(run(args))
    except (UsageError, OSError) as err:
        logging.getLogger("chsim").error("%s", err)
        print(f"Error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

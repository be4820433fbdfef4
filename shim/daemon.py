"""The long-lived shim process of one pod: ttrpc server, task service, event publisher.

Spawned by `start` (shim/cli.py) with the listening socket, a readiness pipe and
a config pipe. `start` validated the config and writes it to the config pipe: this
process never imports pydantic (shim/config.py). It answers "ok" on the readiness
pipe once it serves, or "error: <why>" and exits. Logs are key=value lines on the
bundle's `log` FIFO, which containerd copies into its own log.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shim import config as config_mod
from shim import samepage
from shim.cleanup import (
    cleanup,
    collect_cache_garbage,
    collect_dead_pool,
    collect_orphan_work_dirs,
)
from shim.events import Publisher
from shim.pod import Pod
from shim.state import PodState, ProcRef, StateError, StateStore, remove_pool_dir
from shim.task import SERVICE, TaskService
from shim.ttrpc import Server
from shim.vmm.procs import process_start_time
from shim.vmm_factory import create_vmm

log = logging.getLogger("shim")
# Set to a directory: the daemon runs under cProfile and writes its statistics there.
PROFILE_ENV = "CLOUDHV_PROFILE_DIR"


@dataclass
class DaemonArgs:
    namespace: str = ""
    address: str = ""
    publish_binary: str = ""
    id: str = ""
    pod_id: str = ""
    bundle: str = ""
    socket: str = ""
    listen_fd: int = -1
    ready_fd: int = -1  # -1 once `start` got its answer
    config_fd: int = -1
    debug: bool = False


class UsageError(Exception):
    pass


def parse_args(argv: Sequence[str]) -> DaemonArgs:
    """The command line `start` writes (cli._daemon_argv): `--name value` and `--debug`.

    Not argparse: only our own `start` writes it, and argparse (with gettext) costs
    every daemon ~0.3 MiB.
    """
    args = DaemonArgs()
    names = {f.name for f in dataclasses.fields(DaemonArgs)}
    items = iter(argv)
    for flag in items:
        name = flag.removeprefix("--").replace("-", "_")
        if not flag.startswith("--") or name not in names:
            raise UsageError(f"unknown argument {flag!r}")
        kind = type(getattr(args, name))  # from the default: str, int or bool
        if kind is bool:
            setattr(args, name, True)
            continue
        value = next(items, None)
        if value is None:
            raise UsageError(f"{flag} needs a value")
        if kind is int:
            try:
                setattr(args, name, int(value))
            except ValueError:
                raise UsageError(f"{flag}: not a number: {value!r}") from None
        else:
            setattr(args, name, value)
    missing = [n for n in ("listen_fd", "ready_fd", "config_fd") if getattr(args, n) < 0]
    if missing:
        raise UsageError("missing " + ", ".join("--" + n.replace("_", "-") for n in missing))
    return args


class _KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = (
            f'time="{ts}.{int(record.msecs):03d}Z" level={record.levelname.lower()} '
            f"shim=cloudhv pid={os.getpid()} {record.getMessage()}"
        )
        if record.exc_info:
            trace = self.formatException(record.exc_info).replace("\n", " | ")
            line += f' exc="{trace}"'
        return line + "\n"


class _FifoHandler(logging.Handler):
    """Writes to a non-blocking fd; a full FIFO drops the line rather than stall the shim."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            os.write(self._fd, self.format(record).encode(errors="replace"))
        except BlockingIOError:
            self.dropped += 1
        except OSError:
            self.handleError(record)


def setup_logging(bundle: str, debug: bool) -> None:
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    fifo = Path(bundle) / "log"
    handler: logging.Handler
    try:
        # O_RDWR: never blocks at open, never EPIPE if containerd stops reading.
        fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        handler = _FifoHandler(fd)
        # Tracebacks from the interpreter itself go there too (blocking description).
        err_fd = os.open(fifo, os.O_RDWR | os.O_CLOEXEC)
        os.dup2(err_fd, 2)
        os.close(err_fd)
    except OSError:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_KeyValueFormatter())
    root.addHandler(handler)


def report(args: DaemonArgs, line: str) -> None:
    """Answer `start` once on the readiness pipe, then close it."""
    fd, args.ready_fd = args.ready_fd, -1
    if fd < 0:
        return
    with contextlib.suppress(OSError):
        os.write(fd, (line + "\n").encode())
    os.close(fd)


def _read_config(fd: int) -> config_mod.Config:
    """The config `start` validated, read to EOF from its pipe."""
    try:
        with open(fd, "rb") as pipe:
            text = pipe.read().decode()
    except (OSError, UnicodeDecodeError) as err:
        raise config_mod.ConfigError(f"reading the config from start: {err}") from None
    if not text:
        raise config_mod.ConfigError("start sent no config")
    return config_mod.from_trusted(text)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as err:
        print(f"containerd-shim-cloudhv-v1 daemon: {err}", file=sys.stderr)
        return 2
    setup_logging(args.bundle, args.debug)
    try:
        config = _read_config(args.config_fd)
    except config_mod.ConfigError as err:
        log.error("event=config_invalid error=%r", str(err))
        report(args, f"error: {err}")
        return 1
    if config.debug:
        logging.getLogger().setLevel(logging.DEBUG)
    if config.daemon_ksm:
        samepage.offer_own_memory()
    log.info(
        "event=daemon_start pod=%s task=%s namespace=%s socket=%s vmm=%s",
        args.pod_id, args.id, args.namespace, args.socket, config.vmm,
    )
    try:
        if os.environ.get(PROFILE_ENV):
            _run_profiled(args, config)
        else:
            asyncio.run(serve(args, config))
    except Exception as err:
        log.exception("event=daemon_failed")
        report(args, f"error: {err}")
        return 1
    log.info("event=daemon_exit pod=%s", args.pod_id)
    return 0


def _run_profiled(args: DaemonArgs, config: config_mod.Config) -> None:
    """`serve` under cProfile, its statistics written to $CLOUDHV_PROFILE_DIR at exit
    (bench/profile.py reads them). Opt-in: the profiler slows every call."""
    import cProfile
    import pstats
    import threading

    profilers = [cProfile.Profile()]

    def profile_thread(*_: object) -> None:  # the first event in a new thread
        sys.setprofile(None)
        profiler = cProfile.Profile()
        profilers.append(profiler)
        profiler.enable()

    threading.setprofile(profile_thread)  # the executor's threads: netlink, files
    profilers[0].enable()
    try:
        asyncio.run(serve(args, config))
    finally:
        profilers[0].disable()
        threading.setprofile(None)
        stats = pstats.Stats(profilers[0])
        for other in profilers[1:]:
            with contextlib.suppress(TypeError):  # a thread that saw no call yet
                stats.add(other)
        name = f"daemon-{args.pod_id[:12]}-{os.getpid()}.prof"
        stats.dump_stats(os.path.join(os.environ[PROFILE_ENV], name))


def _stale_state(store: StateStore, args: DaemonArgs) -> PodState | None:
    """A previous daemon's state for this pod; an unreadable one is set aside, not obeyed."""
    try:
        return store.load(args.namespace, args.pod_id)
    except StateError as err:
        aside = store.set_aside(args.namespace, args.pod_id)
        log.error("event=state_corrupt pod=%s error=%r set_aside=%s", args.pod_id, str(err), aside)
        return None


async def serve(args: DaemonArgs, config: config_mod.Config) -> None:
    store = StateStore(config.state_dir)
    me = ProcRef(os.getpid(), process_start_time(os.getpid()) or 0)
    await clean_stale(store, args)
    for line in await asyncio.to_thread(collect_garbage, store, config):
        log.warning("event=orphan_cleanup %s", line)
    publisher = Publisher(os.environ.get("TTRPC_ADDRESS", ""), args.namespace)
    pod = Pod(
        config,
        args.pod_id,
        args.namespace,
        store,
        publisher,
        vmm_factory=create_vmm,
        state=PodState(pod_id=args.pod_id, namespace=args.namespace, socket=args.socket, daemon=me),
    )
    await run(args, pod, publisher, store)


async def clean_stale(store: StateStore, args: DaemonArgs) -> None:
    """What a previous daemon of this pod left, if it died and nobody ran `delete`."""
    stale = _stale_state(store, args)
    if stale is not None and (stale.daemon is None or not stale.daemon.alive()):
        for line in await asyncio.to_thread(cleanup, stale, store, keep_socket=True):
            log.warning("event=stale_pod_cleanup pod=%s %s", args.pod_id, line)


def collect_garbage(store: StateStore, config: config_mod.Config) -> list[str]:
    """Disk images of pods whose state is gone (a host reboot empties /run), the cache
    references and unfinished builds such pods left, pooled VMs nobody owns."""
    return [
        *collect_orphan_work_dirs(store, config.disk_dir),
        *collect_cache_garbage(config),
        *collect_dead_pool(config.state_dir),
    ]


async def run(args: DaemonArgs, pod: Pod, publisher: Publisher, store: StateStore) -> None:
    """Serve the task API for `pod` on the listening socket `start` passed, until told
    to stop; then stop the pod and remove its state."""
    loop = asyncio.get_running_loop()
    listener = socket.socket(fileno=args.listen_fd)
    await pod.open()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    service = TaskService(pod, stop.set)
    server = Server()
    server.register(SERVICE, service.handlers())
    try:
        async with asyncio.TaskGroup() as tg:
            events = tg.create_task(publisher.run(), name="events")
            serving = tg.create_task(server.serve_unix(args.socket, sock=listener), name="ttrpc")
            await asyncio.sleep(0)  # let the server task start accepting
            report(args, "ok")
            await stop.wait()
            log.info("event=daemon_stopping pod=%s", args.pod_id)
            await pod.close()
            await server.close()
            await serving
            if not await publisher.flush(5.0):
                log.warning("event=events_not_flushed pod=%s", args.pod_id)
            events.cancel()
    finally:
        with contextlib.suppress(Exception):
            await pod.close()
        await asyncio.to_thread(store.remove, args.namespace, args.pod_id)
        if pod.state.pool_dir:  # an adopted VM's files stay where it was pooled
            await asyncio.to_thread(remove_pool_dir, Path(pod.state.pool_dir))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.socket)

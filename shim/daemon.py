"""The long-lived shim process of one pod: ttrpc server, task service, event publisher.

Spawned by `start` (shim/cli.py) with the listening socket and a readiness pipe.
It answers "ok" on that pipe once it serves, or "error: <why>" and exits, so a
bad configuration fails `start` with a clear message. Logs are key=value lines
on the bundle's `log` FIFO, which containerd copies into its own log.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from shim import config as config_mod
from shim.events import Publisher
from shim.pod import Pod
from shim.state import PodState, ProcRef, StateStore, cleanup
from shim.task import SERVICE, TaskService
from shim.ttrpc import Server
from shim.vmm.factory import create_vmm
from shim.vmm.procs import process_start_time

log = logging.getLogger("shim")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="containerd-shim-cloudhv-v1 daemon")
    for name in (
        "namespace", "address", "publish-binary", "id", "pod-id", "bundle", "socket", "config-path"
    ):
        parser.add_argument(f"--{name}", default="")
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--ready-fd", type=int, required=True)
    parser.add_argument("--debug", action="store_true")
    return parser.parse_args(argv)


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


def _report(args: argparse.Namespace, line: str) -> None:
    """Answer `start` once on the readiness pipe, then close it."""
    fd, args.ready_fd = args.ready_fd, -1
    if fd < 0:
        return
    with contextlib.suppress(OSError):
        os.write(fd, (line + "\n").encode())
    os.close(fd)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(args.bundle, args.debug)
    try:
        config = config_mod.load(config_mod.resolve_path(args.config_path))
    except config_mod.ConfigError as err:
        log.error("event=config_invalid error=%r", str(err))
        _report(args, f"error: {err}")
        return 1
    if config.debug:
        logging.getLogger().setLevel(logging.DEBUG)
    log.info(
        "event=daemon_start pod=%s task=%s namespace=%s socket=%s vmm=%s",
        args.pod_id, args.id, args.namespace, args.socket, config.vmm,
    )
    try:
        asyncio.run(serve(args, config))
    except Exception as err:
        log.exception("event=daemon_failed")
        _report(args, f"error: {err}")
        return 1
    log.info("event=daemon_exit pod=%s", args.pod_id)
    return 0


async def serve(args: argparse.Namespace, config: config_mod.Config) -> None:
    loop = asyncio.get_running_loop()
    store = StateStore(config.state_dir)
    listener = socket.socket(fileno=args.listen_fd)
    me = ProcRef(os.getpid(), process_start_time(os.getpid()) or 0)
    stale = store.load(args.pod_id)
    if stale is not None and (stale.daemon is None or not stale.daemon.alive()):
        # A previous daemon of this pod died and nobody ran `delete` for it.
        for line in cleanup(stale, store, keep_socket=True):
            log.warning("event=stale_pod_cleanup pod=%s %s", args.pod_id, line)
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
            _report(args, "ok")
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
        store.remove(args.pod_id)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.socket)

"""A task's stdio on the host side, and the pumps between it and the guest agent.

Targets (chosen by the scheme of the stdout URI, as containerd's runc shim does):
- no scheme: FIFOs made by the client (a regular file there is appended to).
  Each FIFO is opened O_RDWR: we hold a read side, so a reader that goes away
  never makes our writes fail with EPIPE.
- `file:///path`: stdout and stderr appended to one file (parents created, 0644).
- `binary:///path?k=v` / `binary-v2://`: a logger process reading fds 3 and 4,
  signalling readiness on fd 5.

Pumps move bytes with back-pressure and never drop any: output is read from the
agent by long polls and written out before the next poll; stdin is resent until
the agent took all of it. A process' exit is reported only after `drain()` says all
of its output was written out, however long that takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from shim.errors import InvalidArgument
from shim.types import StdioSpec

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
# An output FIFO's capacity, asked for (best effort): a 1 MiB read from the guest
# then goes out in one write instead of waiting 16 times for the reader.
FIFO_SIZE = 1 << 20
LOGGER_STOP_TIMEOUT_S = 12.0
LOGGER_READY_TIMEOUT_S = 10.0
# How long a terminal's first input waits for its window size (see ProcessIO.window_sized).
TTY_SIZE_WAIT_S = 0.25
# After an exit: how long one read waits for more output, and how long in all the
# guest may keep producing (a child still holding the pipe).
DRAIN_POLL_S = 0.25
DRAIN_AFTER_EXIT_S = 5.0


# -- parsing (pure) ---------------------------------------------------------------------


@dataclass(frozen=True)
class OutputPlan:
    """Where stdout and stderr go."""

    kind: str  # "null" | "fifo" | "file" | "binary"
    stdout: str = ""  # path (fifo/file: stdout's; binary: the logger executable)
    stderr: str = ""  # fifo: stderr's path ("" = none)
    args: tuple[str, ...] = ()  # binary logger arguments
    ready_byte: bool = False  # binary-v2: readiness is one byte, not EOF


def plan_output(spec: StdioSpec) -> OutputPlan:
    """Where a task's output goes, from its stdout URI (stderr's for a stderr-only task).

    As containerd's shims read them: a value with no scheme is a FIFO path; `fifo://`,
    `file://` and `binary://`/`binary-v2://` are URLs whose path is percent-decoded.
    Stricter where containerd is loose: paths must be absolute and a URL must name no
    host (`file://etc/passwd` would mean /passwd to containerd: a typo here is refused,
    not obeyed). Anything else is an InvalidArgument naming the URI.
    """
    if not spec.stdout and not spec.stderr:
        return OutputPlan("null")
    uri = spec.stdout or spec.stderr
    scheme, path, query = _split_uri(uri, "stdout" if spec.stdout else "stderr")
    if scheme in ("", "fifo"):
        stderr = _split_uri(spec.stderr, "stderr")[1] if spec.stderr else ""
        return OutputPlan("fifo", path if spec.stdout else "", stderr)
    if scheme == "file":
        return OutputPlan("file", path)
    args: list[str] = []
    for key, value in parse_qsl(query, keep_blank_values=True):
        args.append(key)
        if value:
            args.append(value)
    return OutputPlan("binary", path, args=tuple(args), ready_byte=scheme == "binary-v2")


SCHEMES = ("fifo", "file", "binary", "binary-v2")


def _split_uri(uri: str, role: str) -> tuple[str, str, str]:
    """(scheme, decoded absolute path, query) of a stdio value; InvalidArgument if it is
    not one of the forms containerd writes."""
    what = f"{role} {uri!r}"
    if "\0" in uri:
        raise InvalidArgument(f"{what}: contains a NUL byte")
    if uri.startswith("/"):
        return "", uri, ""  # a FIFO path, used as it is (containerd does not decode it)
    parts = urlsplit(uri)
    if parts.scheme not in SCHEMES:
        if not parts.scheme:
            raise InvalidArgument(f"{what}: a FIFO path must be absolute")
        allowed = ", ".join(f"{s}://" for s in SCHEMES)
        raise InvalidArgument(
            f"{what}: unknown STDIO scheme {parts.scheme!r} (allowed: a FIFO path, {allowed})"
        )
    if not uri.startswith(f"{parts.scheme}://"):
        raise InvalidArgument(f"{what}: must be {parts.scheme}:///absolute/path")
    if parts.netloc:
        raise InvalidArgument(
            f"{what}: names host {parts.netloc!r}; a {parts.scheme}:// URI takes an absolute "
            f"path and no host ({parts.scheme}:///path)"
        )
    path = unquote(parts.path)
    if "\0" in path:
        raise InvalidArgument(f"{what}: contains a NUL byte")
    if not path.startswith("/"):
        raise InvalidArgument(f"{what}: the path must be absolute")
    if parts.fragment or (parts.query and not parts.scheme.startswith("binary")):
        raise InvalidArgument(f"{what}: only binary:// URIs take a query, none a fragment")
    if parts.scheme != "fifo" and path.endswith("/"):
        raise InvalidArgument(f"{what}: names a directory, not a file")
    return parts.scheme, path, parts.query


def stdin_path(spec: StdioSpec) -> str:
    """The stdin FIFO's path ("" for none); InvalidArgument if it is not a FIFO path."""
    if not spec.stdin:
        return ""
    scheme, path, _ = _split_uri(spec.stdin, "stdin")
    if scheme not in ("", "fifo"):
        raise InvalidArgument(f"stdin {spec.stdin!r}: must be a FIFO path, not {scheme}://")
    return path


# -- host fds ---------------------------------------------------------------------------


class FdWriter:
    """Writes whole buffers to a non-blocking fd, waiting (not failing) when it is full."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name
        os.set_blocking(fd, False)
        self._closed = False
        self.lock = asyncio.Lock()  # stdout and stderr may share one writer

    async def write(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        async with self.lock:
            while view:
                if self._closed:
                    raise OSError(errno.EBADF, f"{self.name} is closed")
                try:
                    n = os.write(self.fd, view)
                except BlockingIOError:
                    await _wait_writable(loop, self.fd)
                    continue
                view = view[n:]

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)


class FdReader:
    """Reads a non-blocking fd; b"" means EOF (for a FIFO: the last writer closed).

    After `finish()`, reads return what is already buffered, then EOF instead of
    waiting for more.
    """

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name
        os.set_blocking(fd, False)
        self._closed = False
        self._finishing = False
        self._waiter: asyncio.Future[None] | None = None

    async def read(self, size: int = CHUNK) -> bytes:
        loop = asyncio.get_running_loop()
        while True:
            if self._closed:
                return b""
            try:
                return os.read(self.fd, size)
            except BlockingIOError:
                if self._finishing:
                    return b""
                self._waiter = loop.create_future()
                loop.add_reader(self.fd, self._wake)
                try:
                    await self._waiter
                finally:
                    loop.remove_reader(self.fd)
                    self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def finish(self) -> None:
        self._finishing = True
        self._wake()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._wake()
            os.close(self.fd)


async def _wait_writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(fd, wake)
    try:
        await ready
    finally:
        loop.remove_writer(fd)


def open_output_fifo(path: str) -> int:
    """O_RDWR on a FIFO never blocks and keeps a reader; a regular file is appended to."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise InvalidArgument(f"stdio {path}: {err.strerror or err}") from err
    if stat.S_ISFIFO(mode):
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, FIFO_SIZE)
        except OSError as err:  # e.g. EPERM: over fs.pipe-max-size or the user's pipe quota
            log.debug("event=fifo_size_unchanged path=%s error=%r", path, str(err))
        return fd
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)


def open_log_file(path: str) -> int:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)


def open_stdin_fifo(path: str) -> int:
    # O_NONBLOCK so the open does not wait for a writer. Linux does not report
    # hang-up on such a FIFO until a writer has come and gone, so a read is only
    # attempted once there is data or a real EOF.
    try:
        return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise InvalidArgument(f"stdin {path}: {err.strerror or err}") from err


# -- the process' IO -------------------------------------------------------------------

# One long poll: (data, eof). The argument caps the wait (None: the guest's default).
ReadOutput = Callable[[float | None], Awaitable[tuple[bytes, bool]]]
WriteStdin = Callable[[bytes], Awaitable[int]]  # returns bytes accepted
CloseStdin = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class Guest:
    """The agent calls for one process' streams."""

    read_stdout: ReadOutput
    read_stderr: ReadOutput
    write_stdin: WriteStdin
    close_stdin: CloseStdin


class ProcessIO:
    """Host stdio of one process, and the pumps feeding it. Owns its fds and tasks.

    Lifecycle: `await open()`; `start(guest)` once the guest process exists; `drain()`
    before reporting the exit; `close()` always (idempotent).
    """

    def __init__(self, spec: StdioSpec, container_id: str, namespace: str) -> None:
        self.spec = spec
        self._container_id = container_id
        self._namespace = namespace
        self._stdout: FdWriter | None = None
        self._stderr: FdWriter | None = None
        self._stdin: FdReader | None = None
        self._logger: asyncio.subprocess.Process | None = None
        self._out_tasks: list[asyncio.Task[None]] = []
        self._in_task: asyncio.Task[None] | None = None
        self._guest: Guest | None = None
        self._stdin_closed = False
        self._sized = asyncio.Event()
        self._exited = asyncio.Event()

    @property
    def has_stdin(self) -> bool:
        return bool(self.spec.stdin)

    async def open(self) -> None:
        try:
            plan = plan_output(self.spec)
            if plan.kind == "fifo":
                if plan.stdout:
                    self._stdout = FdWriter(open_output_fifo(plan.stdout), plan.stdout)
                if plan.stderr:
                    if plan.stderr == plan.stdout:
                        self._stderr = self._stdout
                    else:
                        self._stderr = FdWriter(open_output_fifo(plan.stderr), plan.stderr)
            elif plan.kind == "file":
                self._stdout = FdWriter(open_log_file(plan.stdout), plan.stdout)
                self._stderr = self._stdout
            elif plan.kind == "binary":
                await self._start_logger(plan)
            stdin = stdin_path(self.spec)
            if stdin:
                self._stdin = FdReader(open_stdin_fifo(stdin), stdin)
        except BaseException:
            await self.close()
            raise

    async def _start_logger(self, plan: OutputPlan) -> None:
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        child_fds: tuple[int, ...] = (out_r, err_r, ready_w)
        try:
            self._stdout = FdWriter(out_w, f"{plan.stdout} stdout")
            self._stderr = FdWriter(err_w, f"{plan.stdout} stderr")

            def child_setup() -> None:
                # Runs in the child: put the pipes at fds 3, 4, 5. Move them above 5
                # first so that placing one never overwrites another. (Only dup
                # calls here: nothing that could take a lock held by another thread.)
                high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in child_fds]
                for target, fd in enumerate(high, start=3):
                    os.dup2(fd, target, inheritable=True)

            try:
                self._logger = await asyncio.create_subprocess_exec(
                    plan.stdout,
                    *plan.args,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                    env={
                        "CONTAINER_ID": self._container_id,
                        "CONTAINER_NAMESPACE": self._namespace,
                    },
                    pass_fds=(3, 4, 5),
                    preexec_fn=child_setup,
                    start_new_session=True,
                )
            except OSError as err:
                raise InvalidArgument(
                    f"start logger {plan.stdout}: {err.strerror or err}"
                ) from err
            for fd in child_fds:
                os.close(fd)
            child_fds = ()
            ready = FdReader(ready_r, "logger ready pipe")
            ready_r = -1
            try:
                async with asyncio.timeout(LOGGER_READY_TIMEOUT_S):
                    first = await ready.read(1)
            except TimeoutError:
                raise InvalidArgument(
                    f"logger {plan.stdout} did not signal ready in {LOGGER_READY_TIMEOUT_S}s"
                ) from None
            finally:
                ready.close()
            if plan.ready_byte and not first:
                raise InvalidArgument(f"logger {plan.stdout} closed fd 5 without signalling ready")
        finally:
            for fd in (*child_fds, ready_r):
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)

    def start(self, guest: Guest) -> None:
        """Start the pumps. Output pumps end at the guest's EOF; stdin at the FIFO's."""
        self._guest = guest
        loop = asyncio.get_running_loop()
        self._out_tasks.append(
            loop.create_task(self._pump_out(guest.read_stdout, self._stdout, "stdout"))
        )
        if not self.spec.terminal:
            self._out_tasks.append(
                loop.create_task(self._pump_out(guest.read_stderr, self._stderr, "stderr"))
            )
        if self._stdin is not None:
            self._in_task = loop.create_task(self._pump_in(guest, self._stdin))

    async def _pump_out(self, read: ReadOutput, sink: FdWriter | None, stream: str) -> None:
        sink_ok = sink is not None
        after_exit_s = 0.0  # time spent reading the guest after the process exited
        while True:
            draining = self._exited.is_set()
            started = time.monotonic()
            try:
                data, eof = await read(DRAIN_POLL_S if draining else None)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.warning(
                    "event=stdio_read_failed container=%s stream=%s error=%r",
                    self._container_id, stream, str(err),
                )
                return
            if data and sink is not None and sink_ok:
                try:
                    await sink.write(data)
                except OSError as err:
                    # The reader is gone for good (e.g. closed logger): keep draining
                    # the guest so the process is not blocked on a full pipe.
                    log.warning(
                        "event=stdio_write_failed container=%s stream=%s target=%s error=%r",
                        self._container_id, stream, sink.name, str(err),
                    )
                    sink_ok = False
            if eof:
                return
            if draining:
                # The process is gone. Its output is what the guest still holds; once a
                # read finds nothing pending, that was all. A process that outlived it
                # (a child holding the pipe) may write on: it gets DRAIN_AFTER_EXIT_S of
                # reading, however long the host's reader makes the writes take.
                after_exit_s += time.monotonic() - started
                if not data:
                    return
                if after_exit_s > DRAIN_AFTER_EXIT_S:
                    log.warning(
                        "event=stdio_drain_cut container=%s stream=%s: another process "
                        "still writes to the exited process' %s", self._container_id, stream,
                        stream,
                    )
                    return

    def process_exited(self) -> None:
        """The process is gone: the pumps now stop once the guest has nothing pending."""
        self._exited.set()

    def window_sized(self) -> None:
        """The terminal got its size (ResizePty reached the guest)."""
        self._sized.set()

    async def _await_window_size(self) -> None:
        # CRI starts forwarding a terminal's input and its first resize at the same
        # moment, from two goroutines. With runc the resize is one ioctl and always
        # wins; here both cross the VM boundary, so a shell could read its first
        # line, run `stty size` and see 0x0. Input waits (briefly) for the size.
        if self.spec.terminal and not self._sized.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TTY_SIZE_WAIT_S):
                    await self._sized.wait()
            self._sized.set()

    async def _pump_in(self, guest: Guest, source: FdReader) -> None:
        total = 0
        try:
            while True:
                data = await source.read(CHUNK)
                if not data:
                    break
                await self._await_window_size()
                total += len(data)
                view = memoryview(data)
                backoff = 0.005
                while view:
                    written = await guest.write_stdin(bytes(view))
                    if written <= 0:
                        await asyncio.sleep(backoff)  # the agent's buffer is full
                        backoff = min(backoff * 2, 0.2)
                        continue
                    backoff = 0.005
                    view = view[written:]
            log.debug("event=stdin_eof container=%s bytes=%d", self._container_id, total)
            await self._close_guest_stdin()
        except asyncio.CancelledError:
            raise
        except Exception as err:
            log.warning(
                "event=stdin_pump_failed container=%s error=%r", self._container_id, str(err)
            )

    async def _close_guest_stdin(self) -> None:
        if self._stdin_closed or self._guest is None:
            return
        self._stdin_closed = True
        await self._guest.close_stdin()

    async def close_stdin(self) -> None:
        """CloseIO(stdin): forward what the FIFO already holds, then close the process' stdin.

        Clients write everything and then send CloseIO at once, so bytes may still
        sit in the FIFO: the pump drains them, reads EOF and closes the guest side
        itself (also when CloseIO comes before Start: the pump starts with the
        process). A client closing its writer ends stdin too (ctr may never send
        CloseIO when its stdin ends while Create is still running).
        """
        if self._stdin is not None:
            self._stdin.finish()
        else:
            await self._close_guest_stdin()

    async def drain(self, timeout: float) -> bool:
        """Wait until stdout and stderr reached EOF and were written out. False on timeout."""
        if not self._out_tasks:
            return True
        done, pending = await asyncio.wait(self._out_tasks, timeout=timeout)
        return not pending

    async def close(self) -> None:
        tasks = [*self._out_tasks, *([self._in_task] if self._in_task else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._out_tasks, self._in_task = [], None
        writers = {id(w): w for w in (self._stdout, self._stderr) if w is not None}
        for writer in writers.values():
            writer.close()
        self._stdout = self._stderr = None
        if self._stdin is not None:
            self._stdin.close()
            self._stdin = None
        if self._logger is not None:
            await _stop_logger(self._logger)
            self._logger = None


async def _stop_logger(proc: asyncio.subprocess.Process) -> None:
    # Its input pipes are closed by now; a well-behaved logger exits on EOF.
    try:
        async with asyncio.timeout(LOGGER_STOP_TIMEOUT_S):
            await proc.wait()
            return
    except TimeoutError:
        pass
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await proc.wait()

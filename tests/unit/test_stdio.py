"""Stdio: URI parsing, and the pumps on real FIFOs, files and a real logger process.

The guest side of the pumps is a scripted sequence of chunks: the pumps take
plain callables, so these tests exercise exactly the host half.
"""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from shim.errors import InvalidArgument
from shim.stdio import TTY_SIZE_WAIT_S, Guest, OutputPlan, ProcessIO, plan_output, stdin_path
from shim.types import StdioSpec


def test_plan_null() -> None:
    assert StdioSpec().null
    assert plan_output(StdioSpec()) == OutputPlan("null")


def test_plan_fifo_default_scheme() -> None:
    plan = plan_output(StdioSpec("/in", "/out", "/err"))
    assert plan == OutputPlan("fifo", "/out", "/err")
    assert plan_output(StdioSpec(stdout="fifo:///x")) == OutputPlan("fifo", "/x")


def test_plan_file() -> None:
    assert plan_output(StdioSpec(stdout="file:///var/log/c.log")) == OutputPlan(
        "file", "/var/log/c.log"
    )


def test_plan_binary_args_in_order() -> None:
    plan = plan_output(StdioSpec(stdout="binary:///usr/bin/logger?id=abc&flag&level=debug"))
    assert plan.kind == "binary" and plan.stdout == "/usr/bin/logger"
    assert plan.args == ("id", "abc", "flag", "level", "debug")
    assert not plan.ready_byte
    assert plan_output(StdioSpec(stdout="binary-v2:///l")).ready_byte


def test_plan_unknown_scheme() -> None:
    with pytest.raises(InvalidArgument, match="unknown STDIO scheme 'http'"):
        plan_output(StdioSpec(stdout="http://example.com/x"))


def test_plan_decodes_percent_escapes() -> None:
    assert plan_output(StdioSpec(stdout="file:///var/log/a%20b.log")).stdout == "/var/log/a b.log"
    plan = plan_output(StdioSpec(stdout="binary:///opt/my%20logger?k=a%26b"))
    assert plan.stdout == "/opt/my logger" and plan.args == ("k", "a&b")


@pytest.mark.parametrize(
    ("uri", "why"),
    [
        ("file://etc/passwd", "names host 'etc'"),
        ("file:x", "must be file:///absolute/path"),
        ("file:///", "names a directory"),
        ("relative/fifo", "a FIFO path must be absolute"),
        ("binary://host/usr/bin/logger", "names host 'host'"),
        ("file:///log?x=1", "only binary:// URIs take a query"),
        ("file:///a%00b", "contains a NUL byte"),
    ],
)
def test_plan_refuses_what_containerd_never_writes(uri: str, why: str) -> None:
    with pytest.raises(InvalidArgument, match=why) as raised:
        plan_output(StdioSpec(stdout=uri))
    assert repr(uri) in str(raised.value)


def test_stdin_must_be_a_fifo_path() -> None:
    assert stdin_path(StdioSpec(stdin="/run/x/stdin")) == "/run/x/stdin"
    assert stdin_path(StdioSpec()) == ""
    with pytest.raises(InvalidArgument, match="stdin 'file:///x': must be a FIFO path"):
        stdin_path(StdioSpec(stdin="file:///x"))


class ScriptedGuest:
    """Serves fixed output chunks and records what stdin received."""

    def __init__(self, out: list[tuple[bytes, bool]], err: list[tuple[bytes, bool]]) -> None:
        self._out, self._err = iter(out), iter(err)
        self.stdin = bytearray()
        self.stdin_closed = asyncio.Event()
        self.accept = 3  # bytes taken per write: forces resends

    async def read_out(self, timeout: float | None = None) -> tuple[bytes, bool]:
        await asyncio.sleep(0)
        return next(self._out)

    async def read_err(self, timeout: float | None = None) -> tuple[bytes, bool]:
        await asyncio.sleep(0)
        return next(self._err)

    async def write(self, data: bytes) -> int:
        taken = data[: self.accept]
        self.stdin += taken
        return len(taken)

    async def close(self) -> None:
        self.stdin_closed.set()

    def guest(self) -> Guest:
        return Guest(self.read_out, self.read_err, self.write, self.close)


def _fifo(path: Path) -> str:
    os.mkfifo(path)
    return str(path)


async def test_fifos_carry_all_output_and_stdin(tmp_path: Path) -> None:
    spec = StdioSpec(
        _fifo(tmp_path / "in"), _fifo(tmp_path / "out"), _fifo(tmp_path / "err"), False
    )
    big = os.urandom(300_000)  # more than a pipe buffer: the writer must wait, not drop
    guest = ScriptedGuest(
        out=[(big[:100_000], False), (big[100_000:], False), (b"", True)],
        err=[(b"oops", True)],
    )
    io = ProcessIO(spec, "c1", "default")
    await io.open()
    # The client opens the read sides after Create, as ctr does.
    out_r = os.open(spec.stdout, os.O_RDONLY | os.O_NONBLOCK)
    err_r = os.open(spec.stderr, os.O_RDONLY | os.O_NONBLOCK)
    in_w = os.open(spec.stdin, os.O_WRONLY)
    io.start(guest.guest())
    os.write(in_w, b"hello stdin")
    os.close(in_w)
    await io.close_stdin()

    got = bytearray()
    loop = asyncio.get_running_loop()

    async def read_all(fd: int) -> bytes:
        buf = bytearray()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                await asyncio.sleep(0.001)
                continue
            if not chunk:
                return bytes(buf)
            buf += chunk

    reader = loop.create_task(read_all(out_r))
    assert await io.drain(5)
    await asyncio.wait_for(guest.stdin_closed.wait(), 5)
    assert bytes(guest.stdin) == b"hello stdin"
    await io.close()  # closes our write sides: the reader sees EOF
    got += await asyncio.wait_for(reader, 5)
    assert bytes(got) == big
    assert os.read(err_r, 100) == b"oops"
    os.close(out_r)
    os.close(err_r)


async def test_closed_reader_never_gives_epipe(tmp_path: Path) -> None:
    spec = StdioSpec(stdout=_fifo(tmp_path / "out"))
    guest = ScriptedGuest(out=[(b"a" * 1000, False), (b"b" * 1000, True)], err=[])
    io = ProcessIO(spec, "c1", "default")
    await io.open()
    reader = os.open(spec.stdout, os.O_RDONLY | os.O_NONBLOCK)
    os.close(reader)  # the client went away before any output
    io.start(guest.guest())
    assert await io.drain(5)
    await io.close()


async def test_regular_file_and_file_scheme(tmp_path: Path) -> None:
    target = tmp_path / "logs" / "c.log"
    spec = StdioSpec(stdout=f"file://{target}", stderr=f"file://{target}")
    guest = ScriptedGuest(out=[(b"out\n", True)], err=[(b"err\n", True)])
    io = ProcessIO(spec, "c1", "default")
    await io.open()
    io.start(guest.guest())
    assert await io.drain(5)
    await io.close()
    assert sorted(target.read_bytes().splitlines()) == [b"err", b"out"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


async def test_terminal_has_no_stderr_pump(tmp_path: Path) -> None:
    spec = StdioSpec(stdout=str(tmp_path / "tty.log"), terminal=True)
    (tmp_path / "tty.log").touch()
    guest = ScriptedGuest(out=[(b"tty\r\n", True)], err=[])  # reading stderr would raise
    io = ProcessIO(spec, "c1", "default")
    await io.open()
    io.start(guest.guest())
    assert await io.drain(5)
    await io.close()
    assert (tmp_path / "tty.log").read_bytes() == b"tty\r\n"


async def test_binary_logger(tmp_path: Path) -> None:
    logger = tmp_path / "logger.sh"
    logger.write_text(
        "#!/bin/sh\n"
        # Close the ready fd first so that the readers below do not inherit it.
        f'exec 5>&-\ncat <&3 > "{tmp_path}/$1.out" & cat <&4 > "{tmp_path}/$1.err" &\n'
        f'echo "$CONTAINER_ID $CONTAINER_NAMESPACE" > "{tmp_path}/env"\nwait\n'
    )
    logger.chmod(0o755)
    spec = StdioSpec(stdout=f"binary://{logger}?name", stderr=f"binary://{logger}?name")
    guest = ScriptedGuest(out=[(b"to stdout", True)], err=[(b"to stderr", True)])
    io = ProcessIO(spec, "c9", "k8s.io")
    await io.open()
    io.start(guest.guest())
    assert await io.drain(5)
    await io.close()  # closes the pipes and waits for the logger to exit
    assert (tmp_path / "name.out").read_bytes() == b"to stdout"
    assert (tmp_path / "name.err").read_bytes() == b"to stderr"
    assert (tmp_path / "env").read_text().split() == ["c9", "k8s.io"]


async def test_missing_fifo_is_invalid_argument(tmp_path: Path) -> None:
    io = ProcessIO(StdioSpec(stdout=str(tmp_path / "nope")), "c1", "default")
    with pytest.raises(InvalidArgument, match="nope"):
        await io.open()


async def test_close_stdin_delivers_what_the_fifo_holds(tmp_path: Path) -> None:
    """ctr writes everything, closes its writer and sends CloseIO at once: no byte may be lost."""
    spec = StdioSpec(stdin=_fifo(tmp_path / "in"))
    guest = ScriptedGuest(out=[(b"", True)], err=[(b"", True)])
    guest.accept = 4096
    io = ProcessIO(spec, "c1", "default")
    await io.open()
    writer = os.open(spec.stdin, os.O_WRONLY)
    payload = os.urandom(60_000)  # fits the pipe buffer: the writer never blocks
    os.write(writer, payload)
    os.close(writer)
    await io.close_stdin()  # before Start, even
    io.start(guest.guest())
    await asyncio.wait_for(guest.stdin_closed.wait(), 5)
    assert bytes(guest.stdin) == payload
    await io.close()


async def test_close_stdin_while_client_keeps_writer_open(tmp_path: Path) -> None:
    """CloseIO ends stdin even if a writer stays: buffered bytes first, then EOF."""
    spec = StdioSpec(stdin=_fifo(tmp_path / "in"))
    guest = ScriptedGuest(out=[(b"", True)], err=[(b"", True)])
    io = ProcessIO(spec, "c1", "default")
    await io.open()
    writer = os.open(spec.stdin, os.O_WRONLY)
    os.write(writer, b"abc")
    io.start(guest.guest())
    await asyncio.sleep(0.05)
    assert bytes(guest.stdin) == b"abc" and not guest.stdin_closed.is_set()
    os.write(writer, b"def")
    await io.close_stdin()
    await asyncio.wait_for(guest.stdin_closed.wait(), 5)
    assert bytes(guest.stdin) == b"abcdef"
    os.close(writer)
    await io.close()


async def test_terminal_input_waits_for_the_window_size(tmp_path: Path) -> None:
    """A terminal's first input is held until its size reached the guest (or a short grace)."""
    spec = StdioSpec(stdin=_fifo(tmp_path / "in"), stdout=_fifo(tmp_path / "out"), terminal=True)
    guest = ScriptedGuest(out=[(b"", True)], err=[])
    guest.accept = 4096
    io = ProcessIO(spec, "c1", "default")
    await io.open()
    writer = os.open(spec.stdin, os.O_WRONLY)
    os.write(writer, b"hi\n")
    io.start(guest.guest())
    await asyncio.sleep(0.05)
    assert bytes(guest.stdin) == b""  # no size yet
    io.window_sized()
    for _ in range(100):
        if guest.stdin:
            break
        await asyncio.sleep(0.01)
    assert bytes(guest.stdin) == b"hi\n"
    os.close(writer)
    await io.close()


async def test_terminal_input_flows_without_a_resize(tmp_path: Path) -> None:
    """A client that never resizes (no terminal of its own) only waits out the grace once."""
    spec = StdioSpec(stdin=_fifo(tmp_path / "in"), stdout=_fifo(tmp_path / "out"), terminal=True)
    guest = ScriptedGuest(out=[(b"", True)], err=[])
    guest.accept = 4096
    io = ProcessIO(spec, "c1", "default")
    await io.open()
    writer = os.open(spec.stdin, os.O_WRONLY)
    os.write(writer, b"a")
    io.start(guest.guest())
    await asyncio.sleep(TTY_SIZE_WAIT_S + 0.1)
    assert bytes(guest.stdin) == b"a"
    os.write(writer, b"b")
    await asyncio.sleep(0.02)
    assert bytes(guest.stdin) == b"ab"
    os.close(writer)
    await io.close()

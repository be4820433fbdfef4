"""Issue 3, stdio and failure paths through a real containerd: stdin without loss, the
file:// and binary:// loggers, TTY size, and a VM that dies under a running task."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.ctr_fixtures import BUSYBOX, Env, containerd_env

RUNTIME = "io.containerd.cloudhv.v1"


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with containerd_env() as env:
        yield env


def _ctr(env: Env, *args: str, data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["ctr", "--address", str(env.containerd.address), *args],
        input=data,
        capture_output=True,
        timeout=180,
    )


def test_stdin_arrives_whole(env: Env) -> None:
    # ctr writes everything, closes the FIFO and sends CloseIO at once: nothing may be lost.
    data = os.urandom(200_000).hex().encode()
    out = _ctr(
        env, "run", "--rm", "--runtime", RUNTIME, BUSYBOX, "in1", "sh", "-c", "wc -c", data=data
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(len(data)).encode()
    assert env.wait_clean() == []


def test_large_output_and_separate_streams(env: Env) -> None:
    out = _ctr(
        env,
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        BUSYBOX,
        "out1",
        "sh",
        "-c",
        "head -c 300000 /dev/zero | tr '\\0' x; echo; echo err >&2; exit 7",
    )
    assert out.returncode == 7
    assert out.stdout == b"x" * 300_000 + b"\n"
    assert out.stderr == b"err\n"


def test_file_and_binary_loggers(env: Env) -> None:
    log = env.scratch / "logs" / "f1.log"
    out = _ctr(
        env,
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--log-uri",
        f"file://{log}",
        BUSYBOX,
        "f1",
        "sh",
        "-c",
        "echo to-file; echo err-file >&2",
    )
    assert out.returncode == 0, out.stderr
    assert sorted(log.read_text().split()) == ["err-file", "to-file"]

    logger = env.scratch / "logger.sh"
    logger.write_text(
        "#!/bin/sh\nexec 5>&-\n"
        f'cat <&3 > "{env.scratch}/$1.out" & cat <&4 > "{env.scratch}/$1.err" &\n'
        f'echo "$CONTAINER_ID $CONTAINER_NAMESPACE" > "{env.scratch}/$1.env"\nwait\n'
    )
    logger.chmod(0o755)
    out = _ctr(
        env,
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--log-uri",
        f"binary://{logger}?b1",
        BUSYBOX,
        "b1",
        "sh",
        "-c",
        "echo to-bin; echo err-bin >&2",
    )
    assert out.returncode == 0, out.stderr
    assert (env.scratch / "b1.out").read_text() == "to-bin\n"
    assert (env.scratch / "b1.err").read_text() == "err-bin\n"
    assert (env.scratch / "b1.env").read_text().split() == ["b1", "default"]
    assert env.wait_clean() == []


def test_tty_gets_the_client_size(env: Env) -> None:
    cmd = (
        f"stty cols 91 rows 33; ctr --address {env.containerd.address} run -t --rm "
        f"--runtime {RUNTIME} {BUSYBOX} t1 sh -c 'stty size; tty'"
    )
    out = subprocess.run(
        ["script", "-qec", cmd, "/dev/null"], capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stdout
    assert "33 91" in out.stdout and "/dev/pts/" in out.stdout


def test_vm_crash_ends_the_task(env: Env) -> None:
    ctr = env.containerd.ctr
    ctr("run", "-d", "--runtime", RUNTIME, BUSYBOX, "vk", "sleep", "600")
    vmm_pid = int(ctr("task", "ls").stdout.split()[4])  # the task pid is the VMM's
    assert b"qemu" in Path(f"/proc/{vmm_pid}/cmdline").read_bytes()
    os.kill(vmm_pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while "STOPPED" not in ctr("task", "ls").stdout and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "STOPPED" in ctr("task", "ls").stdout
    ctr("task", "rm", "vk")
    ctr("container", "rm", "vk")
    assert env.wait_clean() == []

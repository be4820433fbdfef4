"""Issue 3: `ctr run --runtime io.containerd.cloudhv.v1` runs containers inside a microVM."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.integration.ctr_fixtures import BUSYBOX, Env, containerd_env, shim_processes

RUNTIME = "io.containerd.cloudhv.v1"


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with containerd_env() as env:
        yield env


def test_run_prints_from_the_guest_and_returns_exit_status(env: Env) -> None:
    result = env.containerd.ctr(
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        BUSYBOX,
        "run1",
        "sh",
        "-c",
        "echo $((6*7)); cat /proc/sys/kernel/osrelease; exit 3",
        check=False,
    )
    lines = result.stdout.split()
    assert result.returncode == 3, result.stderr
    assert lines[0] == "42"
    assert lines[1].startswith("6.1.") and lines[1] != platform.release()
    assert env.wait_clean() == []


def test_exec_kill_and_event_order(env: Env) -> None:
    ctr = env.containerd.ctr
    events = subprocess.Popen(
        ["ctr", "--address", str(env.containerd.address), "events"],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)  # let ctr subscribe before the first event
    try:
        ctr("run", "-d", "--runtime", RUNTIME, BUSYBOX, "long1", "sleep", "600")
        assert "RUNNING" in ctr("task", "ls").stdout

        plain = ctr(
            "task",
            "exec",
            "--exec-id",
            "e1",
            "long1",
            "sh",
            "-c",
            "cat /proc/1/cmdline | tr '\\0' ' '; exit 4",
            check=False,
        )
        assert plain.returncode == 4
        assert plain.stdout.strip() == "sleep 600"

        # -t needs a terminal on ctr's side: run ctr under script(1).
        tty = subprocess.run(
            [
                "script",
                "-qec",
                f"ctr --address {env.containerd.address} task exec -t --exec-id e2 long1 "
                "sh -c 'test -t 0 && echo is-a-tty; tty'",
                "/dev/null",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert tty.returncode == 0, tty.stdout + tty.stderr
        assert "is-a-tty" in tty.stdout
        assert "/dev/pts/" in tty.stdout

        ctr("task", "kill", "-s", "SIGKILL", "long1")
        deadline = time.monotonic() + 60
        while "STOPPED" not in ctr("task", "ls").stdout and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "STOPPED" in ctr("task", "ls").stdout
        ctr("task", "rm", "long1")
        ctr("container", "rm", "long1")
    finally:
        time.sleep(1)
        events.kill()
        out, _ = events.communicate(timeout=10)
    events_seen = parse_events(out, "long1")
    topics = [topic for topic, _ in events_seen]
    init = [(t, e) for t, e in events_seen if e.get("id", "long1") == "long1"]
    assert [t for t, _ in init if t != "/tasks/exec-added" and t != "/tasks/exec-started"] == [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exit",
        "/tasks/delete",
    ]
    assert topics.index("/tasks/exec-added") < topics.index("/tasks/exec-started")
    exits = {e.get("id"): e.get("exit_status", 0) for t, e in events_seen if t == "/tasks/exit"}
    assert exits == {"e1": 4, "e2": 0, "long1": 137}
    assert env.wait_clean() == []


def test_under_tcg_crun_runs_unrandomized_and_every_container_process_keeps_aslr(
    env: Env,
) -> None:
    """crun runs without address randomisation in a TCG guest (QEMU then reuses its
    translated code); the container's init and its execs get theirs back."""
    ctr = env.containerd.ctr
    init = "cat /proc/self/personality > /tmp/init; sleep 600"
    ctr("run", "-d", "--runtime", RUNTIME, BUSYBOX, "aslr1", "sh", "-c", init)
    try:
        def run(*argv: str) -> str:
            exec_id = f"x{time.monotonic_ns()}"
            return str(ctr("task", "exec", "--exec-id", exec_id, "aslr1", *argv).stdout)

        deadline = time.monotonic() + 30
        while not run("cat", "/tmp/init").strip() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert run("cat", "/tmp/init").strip() == "00000000"  # no ADDR_NO_RANDOMIZE
        assert run("cat", "/proc/self/personality").strip() == "00000000"
        stacks = {run("grep", "stack", "/proc/self/maps").split("-")[0] for _ in range(3)}
        assert len(stacks) == 3, stacks  # a new random stack for every process
        console = "".join(p.read_text(errors="replace") for p in env.state_dir.rglob("console.log"))
        assert "crun runs without address randomisation (TCG)" in console
    finally:
        env.remove_container("aslr1")
    assert env.wait_clean() == []


def parse_events(text: str, container_id: str) -> list[tuple[str, dict[str, object]]]:
    """`ctr events` lines are `DATE TIME ZONE UTC NAMESPACE TOPIC JSON`."""
    found = []
    for line in text.splitlines():
        fields = line.split(" ", 6)
        if len(fields) == 7 and fields[5].startswith("/tasks/"):
            event = json.loads(fields[6])
            if event.get("container_id") == container_id:
                found.append((fields[5], event))
    return found


def test_shim_crash_is_cleaned_up_by_delete(env: Env) -> None:
    ctr = env.containerd.ctr
    ctr("run", "-d", "--runtime", RUNTIME, BUSYBOX, "crash1", "sleep", "600")
    shims = shim_processes(env.containerd)
    assert shims, "no shim daemon running"
    for pid, _ in shims:
        os.kill(pid, signal.SIGKILL)
    # containerd notices the dead shim and runs `containerd-shim-cloudhv-v1 delete`.
    deadline = time.monotonic() + 60
    while "RUNNING" in ctr("task", "ls").stdout and time.monotonic() < deadline:
        time.sleep(0.2)
    ctr("task", "rm", "-f", "crash1", check=False)
    ctr("container", "rm", "crash1")
    left = env.wait_clean()
    # containerd's log holds its `delete` of the dead shim and what that printed.
    assert left == [], f"{left}\n--- containerd log ---\n{env.containerd.log_tail(120)}"

"""A pod's memory as the node's kernel sees it: its shim daemon offers the pages it copied
from the shared parent to same-page merging (KSM); the VMM, the guest's RAM and the
helpers never join it, so no guest can time what another pod's pages hold."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.containerd_env import VMMS
from tests.integration.ctr_fixtures import BUSYBOX, Env, containerd_env, shim_processes

RUNTIME = "io.containerd.cloudhv.v1"


def mergeable_kib(pid: int) -> int:
    """KiB of `pid`'s mappings marked mergeable (`mg` in smaps' VmFlags)."""
    total = size = 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if line.startswith("Size:"):
            size = int(line.split()[1])
        elif line.startswith("VmFlags:") and "mg" in line.split()[1:]:
            total += size
    return total


def pod_helpers(env: Env) -> dict[int, str]:
    """The VMM and helper processes of env's pods: their command lines name its state dir."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(env.state_dir) in cmdline and "containerd-shim-cloudhv" not in cmdline:
            found[int(pid)] = cmdline
    return found


@pytest.fixture(scope="module", params=VMMS)
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    with containerd_env(request.param) as env:
        yield env


def _run_pod(env: Env, name: str) -> None:
    env.containerd.ctr("run", "-d", "--runtime", RUNTIME, BUSYBOX, name, "sleep", "600")


def test_the_daemon_offers_its_memory_and_the_vm_does_not(env: Env) -> None:
    _run_pod(env, "ksm1")
    try:
        daemons = [pid for pid, _ in shim_processes(env.containerd)]
        assert len(daemons) == 1
        # The heap and arenas it shares with the parent: several MiB.
        assert mergeable_kib(daemons[0]) > 4096
        helpers = pod_helpers(env)
        programs = " ".join(helpers.values())
        assert "vhost-device-vsock" in programs and (
            "qemu-system" in programs or "chsim" in programs
        ), programs
        for pid, cmdline in helpers.items():
            assert mergeable_kib(pid) == 0, f"mergeable memory in {cmdline[:120]}"
    finally:
        env.remove_container("ksm1")
    assert env.leftovers() == []


def test_daemon_ksm_off_leaves_the_daemon_unmarked() -> None:
    with containerd_env(daemon_ksm=False) as env:
        _run_pod(env, "ksm2")
        try:
            daemons = [pid for pid, _ in shim_processes(env.containerd)]
            assert len(daemons) == 1
            assert mergeable_kib(daemons[0]) == 0
        finally:
            env.remove_container("ksm2")
        assert env.leftovers() == []

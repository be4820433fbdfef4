"""The shared parent's pool bookkeeping (shim/pool.py), with the forks replaced: which
pod is offered a pooled VM, and how every outcome of a take is answered."""

from __future__ import annotations

import json
import os
import selectors
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim import config as config_mod
from shim import pool as pool_mod
from shim import spec

POD = "p" * 64


class Forks:
    """Stand-ins for the forker's forks: warm ones hand back one end of a socketpair
    (the test plays the pooled VM's daemon at the other), cold ones are recorded."""

    def __init__(self) -> None:
        self.vm_ends: list[socket.socket] = []
        self.cold: list[tuple[list[str], list[int]]] = []
        self.dead_pid = _dead_pid()

    def warm(self, pool: pool_mod.Pool) -> tuple[int, socket.socket]:
        del pool
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.vm_ends.append(theirs)
        return self.dead_pid, ours

    def cold_fork(self, argv: list[str], env: dict[str, str], fds: list[int]) -> int:
        del env
        self.cold.append((argv, fds))
        return 4242


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


Setup = tuple[pool_mod.Pools, "Forks", dict[str, object], Path]


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    data = {
        "vmm": "qemu",
        "kernel_path": "/k",
        "rootfs_path": "/r",
        "kernel_args": "quiet",
        "state_dir": str(tmp_path / "state"),
        "pool": {"size": 1},
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    validated, digest = config_mod.load_with_digest(path)
    request = {
        "path": str(path),
        "digest": digest,
        "size": 1,
        "config": config_mod.dumps(validated),
    }
    forks = Forks()
    selector = selectors.DefaultSelector()
    pools = pool_mod.Pools(selector, forks.warm, forks.cold_fork)
    yield pools, forks, request, tmp_path
    selector.close()


def _bundle(tmp_path: Path, annotations: dict[str, str]) -> list[str]:
    bundle = tmp_path / "bundle"
    bundle.mkdir(exist_ok=True)
    (bundle / "config.json").write_text(json.dumps({"annotations": annotations}))
    return ["--id", POD, "--pod-id", POD, "--bundle", str(bundle)]


SANDBOX = {spec.SANDBOX_ID: POD, spec.CONTAINER_TYPE: "sandbox"}


def _ready(pools: pool_mod.Pools, forks: Forks, tmp_path: Path) -> pool_mod.Pool:
    del tmp_path
    pools.tick()  # boots the first pooled VM
    assert len(forks.vm_ends) == 1
    member_pool = next(iter(pools._pools.values()))
    forks.vm_ends[0].send(b"ready")
    pools.readable(member_pool.members[0])
    return member_pool


def _take(pools: pool_mod.Pools, pool: pool_mod.Pool, argv: list[str]) -> tuple[
    bool, socket.socket, list[int]
]:
    start_end, forker_end = socket.socketpair()
    fds = [os.dup(0), os.dup(0), os.dup(0)]
    handed = pools.offer(pool, argv, {"E": "1"}, fds, forker_end)
    return handed, start_end, fds


def test_a_default_size_sandbox_takes_a_ready_vm(setup: Setup) -> None:
    pools, forks, request, tmp_path = setup
    pool = pools.register(request)
    assert pool is not None
    member_pool = _ready(pools, forks, tmp_path)
    member = member_pool.members[0]
    handed, start_end, _ = _take(pools, pool, _bundle(tmp_path, SANDBOX))
    assert handed
    assert member_pool.members == []  # taken: never back in the pool
    data, ancdata, _, _ = forks.vm_ends[0].recvmsg(65536, socket.CMSG_LEN(12))
    assert json.loads(data)["env"] == {"E": "1"}
    assert len(ancdata) == 1  # the three descriptors
    forks.vm_ends[0].send(b"adopted")
    pools.readable(member)
    assert json.loads(start_end.recv(4096)) == {"pid": forks.dead_pid, "pool": "adopted"}
    assert forks.cold == []


def test_a_failed_take_starts_the_pod_cold_with_its_descriptors(setup: Setup) -> None:
    pools, forks, request, tmp_path = setup
    pool = pools.register(request)
    assert pool is not None
    member = _ready(pools, forks, tmp_path).members[0]
    argv = _bundle(tmp_path, SANDBOX)
    handed, start_end, fds = _take(pools, pool, argv)
    assert handed
    forks.vm_ends[0].send(b"failed: pod network: no such netns")
    pools.readable(member)
    assert forks.cold == [(argv, fds)]
    assert json.loads(start_end.recv(4096)) == {"pid": 4242, "pool": "cold"}


def test_a_take_with_no_answer_starts_the_pod_cold(
    setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    pools, forks, request, tmp_path = setup
    monkeypatch.setattr(pool_mod, "ADOPT_TIMEOUT_S", 0.05)
    pool = pools.register(request)
    assert pool is not None
    _ready(pools, forks, tmp_path)
    handed, start_end, _ = _take(pools, pool, _bundle(tmp_path, SANDBOX))
    assert handed
    time.sleep(0.1)
    pools.tick()
    assert json.loads(start_end.recv(4096)) == {"pid": 4242, "pool": "cold"}
    assert forks.vm_ends[0].recv(4096) != b""  # the take itself; then EOF: released
    assert forks.vm_ends[0].recv(4096) == b""


@pytest.mark.parametrize(
    "annotations",
    [
        {**SANDBOX, "io.cloudhv.config.hypervisor.default_memory": "384"},  # another size
        {**SANDBOX, "io.kubernetes.cri.sandbox-memory": str(64 << 20)},  # resources
        {spec.SANDBOX_ID: POD, spec.CONTAINER_TYPE: "container"},  # not a sandbox
        {},  # not a CRI task
        {**SANDBOX, "io.cloudhv.config.hypervisor.default_memory": "lots"},  # invalid
    ],
)
def test_anything_else_is_not_offered_a_vm(setup: Setup, annotations: dict[str, str]) -> None:
    pools, forks, request, tmp_path = setup
    pool = pools.register(request)
    assert pool is not None
    _ready(pools, forks, tmp_path)
    handed, _, fds = _take(pools, pool, _bundle(tmp_path, annotations))
    assert not handed
    assert len(pool.members) == 1  # still there for the next pod
    for fd in fds:
        os.close(fd)


def test_an_empty_pool_offers_nothing(setup: Setup) -> None:
    pools, _, request, tmp_path = setup
    pool = pools.register(request)
    assert pool is not None
    handed, _, fds = _take(pools, pool, _bundle(tmp_path, SANDBOX))
    assert not handed
    for fd in fds:
        os.close(fd)


def test_a_changed_config_drains_its_pool(setup: Setup) -> None:
    pools, forks, request, tmp_path = setup
    pool = pools.register(request)
    assert pool is not None
    _ready(pools, forks, tmp_path)
    Path(str(request["path"])).write_text(Path(str(request["path"])).read_text() + " ")
    pool.checked_at = 0.0
    pools.tick()
    assert forks.vm_ends[0].recv(4096) == b""  # EOF: the VM's daemon shuts it down
    assert not pools.active


def test_a_vm_that_died_booting_backs_off(setup: Setup) -> None:
    pools, forks, request, _ = setup
    pool = pools.register(request)
    assert pool is not None
    pools.tick()
    member = pool.members[0]
    forks.vm_ends[0].close()  # died before `ready`
    pools.readable(member)
    assert pool.members == [] and pool.failures == 1
    pools.tick()
    assert len(forks.vm_ends) == 1  # not booted again at once


def test_start_waits_as_long_as_a_take_may_take() -> None:
    from shim import forker_client

    assert forker_client.ADOPT_TIMEOUT_S == pool_mod.ADOPT_TIMEOUT_S

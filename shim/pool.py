"""The shared parent's pools of pre-booted VMs: one pool per config, keyed by the config
file's path and a hash of its content.

`start` names its config (path, content hash, the validated config, `pool.size`) in
every request to the shared parent (shim/forker.py). The parent keeps that many
pooled VMs for it, each owned by a daemon of its own (shim/warm.py) tied to the
parent by a SOCK_SEQPACKET socketpair. A sandbox whose VM would be of the default
size is offered a ready one: the pod's descriptors go to that VM's daemon, which
adopts the VM and answers `adopted` (start is then told its pid), or `failed`
(the VM is destroyed, and a cold daemon is forked with the same descriptors). No
answer within ADOPT_TIMEOUT_S counts as a failure: the daemon is killed, what it
recorded is cleaned up, and the pod starts cold. Everything else starts cold, as
without a pool.

The pool refills in the background, one VM booting at a time, and not while a
take is being decided: the adopting pod has the CPU first. A config whose file
changed or went away has its pool drained; so has one `start` says has size 0,
and one a `drain` request names. When the parent dies, each pooled VM's daemon
reads EOF and shuts its VM down.

Blocking code, driven by the parent's selector loop; standard library and the
shim's own pre-imported modules only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shim import config as config_mod
from shim import spec as spec_mod
from shim.cleanup import collect_dead_pool
from shim.errors import InvalidArgument
from shim.sandbox import vm_size
from shim.vmm.procs import is_zombie

MESSAGE_MAX = 64 * 1024
ADOPT_TIMEOUT_S = 8.0  # a take not decided by then is a failed one: the pod starts cold
FILL_DELAY_S = 1.0  # after a take is decided, before the next VM boots
WATCH_S = 5.0  # how often config files are checked for a change
BACKOFF_MAX_S = 60.0  # between boots, after pooled VMs failed to boot in a row
KILL_WAIT_S = 2.0
IDLE_TICK_S = 60.0


def file_digest(path: Path) -> str:
    """The content hash `start` and the parent key a config's pool by."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Take:
    """A pod's request handed to a pooled VM, answered once the VM's daemon decided."""

    conn: socket.socket
    argv: list[str]
    env: dict[str, str]
    fds: list[int]
    deadline: float


@dataclass(eq=False)
class Member:
    pid: int
    sock: socket.socket
    pool: Pool
    ready: bool = False
    take: Take | None = None


@dataclass(eq=False)
class Pool:
    path: str
    digest: str
    size: int
    config_text: str
    config: config_mod.Config
    members: list[Member] = field(default_factory=list)
    failures: int = 0
    not_before: float = 0.0
    checked_at: float = 0.0


# (argv, env, fds) -> the pid of a cold daemon forked with them.
ForkCold = Callable[[list[str], dict[str, str], list[int]], int]
# pool -> (pid, the parent's end of the socketpair) of a new pooled VM's daemon.
ForkWarm = Callable[[Pool], tuple[int, socket.socket]]


class Pools:
    def __init__(
        self, selector: selectors.BaseSelector, fork_warm: ForkWarm, fork_cold: ForkCold
    ) -> None:
        self._selector = selector
        self._fork_warm = fork_warm
        self._fork_cold = fork_cold
        self._pools: dict[str, Pool] = {}  # by config path
        self._taking: list[Member] = []
        self._settled_at = 0.0  # when the last take was decided

    @property
    def active(self) -> bool:
        return bool(self._pools or self._taking)

    def sockets(self) -> list[socket.socket]:
        """Every socket of ours: a forked child closes them."""
        members = [m for pool in self._pools.values() for m in pool.members]
        return [m.sock for m in (*members, *self._taking)] + [
            m.take.conn for m in self._taking if m.take is not None
        ]

    # -- requests ------------------------------------------------------------------------

    def register(self, request: Mapping[str, object]) -> Pool | None:
        """The pool `start`'s request names (created if new); None without one."""
        path, digest = str(request["path"]), str(request["digest"])
        size = int(str(request["size"]))
        known = self._pools.get(path)
        if known is not None and (known.digest != digest or size == 0):
            self.drain(path)
            known = None
        if size <= 0:
            return None
        if known is None:
            text = str(request["config"])
            known = Pool(path, digest, size, text, config_mod.from_trusted(text))
            known.checked_at = time.monotonic()
            self._pools[path] = known
        known.size = size
        return known

    def offer(
        self,
        pool: Pool,
        argv: list[str],
        env: dict[str, str],
        fds: list[int],
        conn: socket.socket,
    ) -> bool:
        """Hand the pod a ready pooled VM if it fits. True: the take is under way, and
        `conn` and `fds` are the pool's to answer and close."""
        if not _fits(pool.config, argv):
            return False
        for member in list(pool.members):
            if not member.ready:
                continue
            pool.members.remove(member)  # taken: never back in the pool
            body = json.dumps({"argv": argv, "env": env}).encode()
            try:
                member.sock.sendmsg(
                    [body], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _fd_bytes(fds))]
                )
            except OSError:  # its daemon is gone: what it recorded is collected
                self._close(member)
                _wait_gone(member.pid)
                self._collect(pool)
                continue
            member.take = Take(conn, argv, env, fds, time.monotonic() + ADOPT_TIMEOUT_S)
            self._taking.append(member)
            return True
        return False

    def drain(self, path: str = "") -> int:
        """Release the pooled VMs of config `path` (every config's for ""): each daemon
        reads EOF and shuts its VM down."""
        drained = 0
        for known in list(self._pools.values()):
            if path and known.path != path:
                continue
            for member in known.members:
                self._close(member)
                drained += 1
            del self._pools[known.path]
        return drained

    # -- events --------------------------------------------------------------------------

    def readable(self, member: Member) -> None:
        try:
            data = member.sock.recv(MESSAGE_MAX)
        except OSError:
            data = b""
        if data == b"ready":
            member.ready = True
            member.pool.failures = 0
            return
        self._close(member)
        take = member.take
        if take is None:  # died in the pool (or while booting)
            if not member.ready:
                pool = member.pool
                pool.failures += 1
                pool.not_before = time.monotonic() + min(BACKOFF_MAX_S, 2.0**pool.failures)
            with contextlib.suppress(ValueError):
                member.pool.members.remove(member)
            self._collect(member.pool)
            return
        self._taking.remove(member)
        self._settled_at = time.monotonic()
        if data == b"adopted":
            self._answer(take, {"pid": member.pid, "pool": "adopted"})
            return
        _wait_gone(member.pid)
        self._collect(member.pool)
        self._cold(take, data.decode(errors="replace") or "its daemon died")

    def tick(self) -> float:
        """Deadlines, config checks, refills; returns seconds until the next is due."""
        now = time.monotonic()
        for member in list(self._taking):
            if member.take is not None and now >= member.take.deadline:
                self._taking.remove(member)
                self._close(member)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(member.pid, signal.SIGKILL)
                _wait_gone(member.pid)
                self._collect(member.pool)
                self._settled_at = time.monotonic()
                self._cold(member.take, f"no answer in {ADOPT_TIMEOUT_S:.0f}s")
        for known in list(self._pools.values()):
            if now - known.checked_at >= WATCH_S:
                known.checked_at = now
                try:
                    unchanged = file_digest(Path(known.path)) == known.digest
                except OSError:
                    unchanged = False
                if not unchanged:
                    self.drain(known.path)
        if not self._taking and now - self._settled_at >= FILL_DELAY_S:
            for known in self._pools.values():
                self._fill(known, now)
        if not self.active:
            return IDLE_TICK_S  # nothing to watch: only the parent's idle exit
        waits = [WATCH_S]
        waits += [m.take.deadline - now for m in self._taking if m.take is not None]
        waits += [known.not_before - now for known in self._pools.values()]
        waits.append(self._settled_at + FILL_DELAY_S - now)
        return max(0.05, min(w for w in waits if w > 0) if any(w > 0 for w in waits) else 0.05)

    # -- helpers -------------------------------------------------------------------------

    def _fill(self, pool: Pool, now: float) -> None:
        booting = any(not m.ready for m in pool.members)
        if booting or len(pool.members) >= pool.size or now < pool.not_before:
            return
        try:
            pid, sock = self._fork_warm(pool)
        except OSError:
            pool.failures += 1
            pool.not_before = now + min(BACKOFF_MAX_S, 2.0**pool.failures)
            return
        member = Member(pid, sock, pool)
        pool.members.append(member)
        self._selector.register(sock, selectors.EVENT_READ, member)

    def _close(self, member: Member) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(member.sock)
        member.sock.close()

    def _collect(self, pool: Pool) -> None:
        with contextlib.suppress(OSError):
            collect_dead_pool(pool.config.state_dir)

    def _cold(self, take: Take, why: str) -> None:
        del why  # the cold daemon's own log tells how its pod went
        try:
            pid = self._fork_cold(take.argv, take.env, take.fds)
        except OSError as err:
            self._answer(take, {"error": str(err)})
            return
        self._answer(take, {"pid": pid, "pool": "cold"})

    def _answer(self, take: Take, reply: Mapping[str, object]) -> None:
        with contextlib.suppress(OSError):
            take.conn.sendall(json.dumps(reply).encode())
        take.conn.close()
        for fd in take.fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def _fits(config: config_mod.Config, argv: list[str]) -> bool:
    """A CRI sandbox whose VM would be of the pooled VMs' size (the default)."""
    flags = dict(zip(argv[::2], argv[1::2], strict=False))
    try:
        bundle = Path(flags["--bundle"])
        annotations = spec_mod.bundle_annotations(bundle)
        identity = spec_mod.identify(flags["--id"], annotations)
        if identity.kind is not spec_mod.TaskKind.SANDBOX:
            return False
        return vm_size(config, annotations) == vm_size(config, {})
    except (KeyError, OSError, spec_mod.SpecError, InvalidArgument):
        return False


def _fd_bytes(fds: list[int]) -> bytes:
    import array

    return array.array("i", fds).tobytes()


def _wait_gone(pid: int) -> None:
    """Until `pid` is dead (a zombie counts): what it recorded may then be collected."""
    deadline = time.monotonic() + KILL_WAIT_S
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        if is_zombie(pid):
            return
        time.sleep(0.02)

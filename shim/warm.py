"""A pooled VM's daemon: boots a VM with no pod identity, waits, then serves the pod that
takes it, or shuts the VM down.

The shared parent (shim/forker.py, shim/pool.py) forks one such daemon per pooled
VM, with one end of a SOCK_SEQPACKET socketpair. The daemon boots a VM of the
config's default size (no NIC, no container disk, no hostname: `Sandbox.start_vm`),
records it under the state dir's pool directory like any VM, says `ready`, and
waits. Then one of:

- **EOF** (the parent died, or drained the pool), or the VM died: the VM is shut
  down and its state removed. Nothing runs unowned for longer than a shutdown.
- **A take**: the pod's daemon flags and environment, and its listening socket,
  ready pipe and config pipe as file descriptors, as `start` sent them. The daemon
  adopts the VM for the pod: its state is re-keyed to the pod, its processes moved
  into the sandbox's cgroup, and the pod's identity given to it (`Sandbox.join`:
  clock, hostname, DNS and hosts, sysctls, NIC, port forwarding). It answers
  `adopted`, leaves the socketpair (from then on the parent's death is nothing to
  it) and serves the task API like any pod daemon. Any step failing destroys the
  VM, and the answer `failed: <why>` has the parent fork a cold daemon with the
  same descriptors: the config pipe is never read here, so that daemon finds the
  config in it.

The VM is that one pod's: it is never handed back.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from shim import config as config_mod
from shim import daemon, proctitle, samepage
from shim import spec as spec_mod
from shim.events import Publisher
from shim.pod import Pod
from shim.sandbox import Sandbox
from shim.sizing import VmSize
from shim.state import (
    POOL_NAMESPACE,
    PodState,
    ProcRef,
    StateStore,
    pool_store,
    remove_pool_dir,
)
from shim.vmm.procs import process_start_time
from shim.vmm_factory import create_vmm

log = logging.getLogger("shim")

MESSAGE_MAX = 64 * 1024
TITLE = "cloudhv-pool"


class AdoptionFailed(Exception):
    pass


def main(config_text: str, sock: socket.socket, config_path: str) -> int:
    """The pooled VM's daemon, in the process the parent forked for it."""
    config = config_mod.from_trusted(config_text)
    if config.daemon_ksm:
        samepage.offer_own_memory()
    vm_id = f"warm-{os.urandom(6).hex()}"
    proctitle.set_title([TITLE, f"config={config_path}", f"vm={vm_id}"])
    store = pool_store(config.state_dir)
    own_dir = store.pod_dir(POOL_NAMESPACE, vm_id)
    own_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    handler = logging.FileHandler(own_dir / "daemon.log")
    handler.terminator = ""  # the formatter ends each line
    handler.setFormatter(daemon._KeyValueFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if config.debug else logging.INFO)
    try:
        return asyncio.run(_run(config, store, vm_id, sock, handler))
    except Exception:
        log.exception("event=pool_vm_failed vm=%s", vm_id)
        return 1


async def _run(
    config: config_mod.Config,
    store: StateStore,
    vm_id: str,
    sock: socket.socket,
    handler: logging.Handler,
) -> int:
    me = ProcRef(os.getpid(), process_start_time(os.getpid()) or 0)
    vm_gone = asyncio.Event()

    async def vm_exited(status: int) -> None:
        log.warning("event=pool_vm_exited vm=%s status=%d", vm_id, status)
        vm_gone.set()

    state = PodState(pod_id=vm_id, namespace=POOL_NAMESPACE, daemon=me, pool="booting")
    sandbox = Sandbox(
        config, state, store, vmm_factory=create_vmm, on_vm_exit=vm_exited, on_oom=_no_oom
    )
    # A TERM (a drain by hand, a host shutdown) releases the VM like the parent's EOF.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, vm_gone.set)
    adopted = False
    try:
        await sandbox.save()
        size = sandbox.size({})
        sock.setblocking(False)
        # Nothing comes before `ready` but EOF: the VM is then shut down once booted.
        if not await _until_released(sandbox.start_vm(size), sock, vm_gone):
            log.info("event=pool_vm_released vm=%s while=booting", vm_id)
            return 0
        await sandbox.save(pool="ready")
        log.info("event=pool_vm_ready vm=%s vmm_pid=%d", vm_id, sandbox.vmm_pid)
        try:
            sock.send(b"ready")
        except OSError:
            return 0
        take = await _wait_take(sock, vm_gone)
        if take is None:
            log.info("event=pool_vm_released vm=%s", vm_id)
            return 0
        request, fds = take
        started = time.monotonic()
        try:
            args = await _adopt(sandbox, size, config, request, fds, me)
        except Exception as err:
            log.error("event=pool_adopt_failed vm=%s error=%r", vm_id, str(err), exc_info=True)
            for fd in fds:
                os.close(fd)
            await _destroy(sandbox)
            with contextlib.suppress(OSError):
                sock.send(f"failed: {err}".encode()[:MESSAGE_MAX])
            return 1
        adopted = True
        logging.getLogger().removeHandler(handler)
        handler.close()
        log.info(
            "event=pool_vm_adopted pod=%s vm=%s adopt_ms=%d",
            args.pod_id, vm_id, (time.monotonic() - started) * 1000,
        )
        sock.send(b"adopted")
        sock.close()
        publisher = Publisher(os.environ.get("TTRPC_ADDRESS", ""), args.namespace)
        pod = Pod(
            config,
            args.pod_id,
            args.namespace,
            sandbox.store,
            publisher,
            vmm_factory=create_vmm,
            sandbox=sandbox,
        )
        try:
            await daemon.run(args, pod, publisher, sandbox.store)
        except Exception as err:
            log.exception("event=daemon_failed pod=%s", args.pod_id)
            daemon.report(args, f"error: {err}")
            return 1
        log.info("event=daemon_exit pod=%s", args.pod_id)
        return 0
    finally:
        if not adopted:
            await _destroy(sandbox)


async def _until_released(
    work: Coroutine[Any, Any, None], sock: socket.socket, released: asyncio.Event
) -> bool:
    """Run `work`; False if the socket became readable (EOF) or `released` was set
    meanwhile. `work` is finished either way, not cancelled: a boot cancelled half-way
    could lose a process it had just spawned, while a finished one is stopped whole."""
    readable = _on_readable(sock)
    try:
        await work
    finally:
        asyncio.get_running_loop().remove_reader(sock.fileno())
    return not (readable.is_set() or released.is_set())


def _on_readable(sock: socket.socket) -> asyncio.Event:
    """An event set once `sock` is readable (the reader goes then: EOF stays readable)."""
    loop = asyncio.get_running_loop()
    readable = asyncio.Event()

    def fire() -> None:
        readable.set()
        loop.remove_reader(sock.fileno())

    loop.add_reader(sock.fileno(), fire)
    return readable


async def _wait_take(
    sock: socket.socket, vm_gone: asyncio.Event
) -> tuple[dict[str, Any], list[int]] | None:
    """The parent's take (request, fds), or None on EOF or when the VM died first."""
    readable = _on_readable(sock)
    try:
        waits = [asyncio.ensure_future(readable.wait()), asyncio.ensure_future(vm_gone.wait())]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for waiting in waits:
            waiting.cancel()
    finally:
        asyncio.get_running_loop().remove_reader(sock.fileno())
    if vm_gone.is_set():
        return None
    fds = array.array("i")
    try:
        data, ancdata, _, _ = sock.recvmsg(MESSAGE_MAX, socket.CMSG_LEN(3 * fds.itemsize))
    except OSError:
        return None
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if not data:
        for fd in fds:
            os.close(fd)
        return None
    try:
        request = json.loads(data)
    except ValueError:
        request = {}
    return request, list(fds)


async def _adopt(
    sandbox: Sandbox,
    size: VmSize,
    config: config_mod.Config,
    request: dict[str, Any],
    fds: list[int],
    me: ProcRef,
) -> daemon.DaemonArgs:
    """Make the pooled VM the pod's: every step raises, and the caller destroys the VM."""
    if len(fds) != 3:
        raise AdoptionFailed(f"want 3 file descriptors, got {len(fds)}")
    listen_fd, ready_fd, config_fd = fds
    args = daemon.parse_args(
        [
            *[str(a) for a in request.get("argv", ())],
            "--listen-fd", str(listen_fd),
            "--ready-fd", str(ready_fd),
            "--config-fd", str(config_fd),
        ]
    )
    # From here on the pod's log (containerd's) hears of the adoption, a failure too.
    daemon.setup_logging(args.bundle, args.debug or config.debug)
    # The config pipe stays unread: it is the cold daemon's should this fail. The
    # parent hands over a VM only to a start that sent the config it was booted with.
    os.close(config_fd)
    args.config_fd = -1
    bundle = Path(args.bundle)
    spec = await asyncio.to_thread(spec_mod.read_spec, bundle / "config.json")
    annotations = spec_mod.annotations_of(spec)
    identity = spec_mod.identify(args.id, annotations)
    if identity.kind is not spec_mod.TaskKind.SANDBOX or identity.pod_id != args.pod_id:
        raise AdoptionFailed(f"task {args.id} is not the sandbox of pod {args.pod_id}")
    wanted = sandbox.size(annotations)
    if wanted != size:
        raise AdoptionFailed(f"the pod wants {wanted}, the pooled VM is {size}")
    pod_options = spec_mod.pod_options(spec)
    hostname = spec_mod.hostname_of(spec) or os.uname().nodename
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in request.get("env", {}).items()})
    proctitle.set_title(["containerd-shim-cloudhv-v1", *request.get("argv", ())])
    store = StateStore(config.state_dir)
    await daemon.clean_stale(store, args)
    await sandbox.rekey(
        store,
        pod_id=args.pod_id,
        namespace=args.namespace,
        socket=args.socket,
        daemon=me,
    )
    await sandbox.join_cgroup(pod_options.cgroups_path)
    await sandbox.join(hostname, pod_options)
    return args


async def _destroy(sandbox: Sandbox) -> None:
    """The VM, its resources and every file of it gone; it is never handed on."""
    await sandbox.close()
    state = sandbox.state
    if state.pool_dir:  # taken: the pod's state, and the VM's files where it was pooled
        await asyncio.to_thread(sandbox.store.remove, state.namespace, state.pod_id)
        await asyncio.to_thread(remove_pool_dir, Path(state.pool_dir))
    else:
        own = sandbox.store.pod_dir(state.namespace, state.pod_id)
        await asyncio.to_thread(remove_pool_dir, own)


def _no_oom(container_id: str) -> None:
    del container_id

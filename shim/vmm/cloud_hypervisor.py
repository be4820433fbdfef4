"""Cloud Hypervisor backend: one `cloud-hypervisor` process per VM, driven over its REST API.

Start: `cloud-hypervisor --api-socket path=<dir>/api.sock --event-monitor fd=N
--log-file <dir>/ch.log --seccomp true [--landlock]`, stale sockets removed first;
ready once `GET /vmm.ping` answers. Then `PUT /vm.create` (bodies: shim/vmm/ch_api.py)
and `PUT /vm.boot`. CH chooses PCI addresses itself, so a hot-plug slot from
shim/devices.py is only a count here; devices are added with `vm.add-disk` and
`vm.add-net` (the TAP's fd rides on the request, shim/vmm/ch_http.py) and removed
with `vm.remove-device`, which returns at once: the removal is done when the
guest has ejected the device and CH reports `device-removed` on the event monitor.

The event monitor is a pipe whose write end only CH holds: its events arrive as
they happen, and its end of file is CH's exit. A guest that powers off ends the
CH process; one that reboots (a panic with `panic=-1` does) is restarted by CH
without our agent's state, so that, a reported guest panic and CH's own
shutdown all end the VM at once: `wait()` returns, after CH is stopped.

Confinement: CH's seccomp filters stay on. With `landlock` (config
`cloud_hypervisor.landlock`, on by default) `--landlock` confines CH's own
threads, and vm.create enables Landlock for the VM with rules for the VM's state
dir and the directories later disks come from (`VmSpec.host_dirs`): Landlock is
applied once, at vm.create, and cannot be widened for a file hot-plugged later.

Host files live in `VmSpec.state_dir`; the only host process is CH, recorded in
`VmProcesses` for crash cleanup.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

from shim.vmm import ch_api
from shim.vmm.base import (
    DiskSpec,
    NetSpec,
    ProcessSpawned,
    Vmm,
    VmmError,
    VmProcesses,
    VmSpec,
    ignore_process,
)
from shim.vmm.ch_http import ChHttp
from shim.vmm.console import AGENT_READY_MARK, ConsoleLog
from shim.vmm.procs import process_start_time

log = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0
UNPLUG_TIMEOUT_S = 10.0
TERM_GRACE_S = 1.0


@dataclass(frozen=True)
class ChOptions:
    binary: Path
    landlock: bool = True
    hotplug_slots: int = 16
    verbose: bool = False
    free_page_reporting: bool = False  # a balloon of size 0 reporting free guest pages


class CloudHypervisorVmm(Vmm):
    def __init__(self, spec: VmSpec, options: ChOptions) -> None:
        self._spec = spec
        self._options = options
        self._paths = ch_api.ChPaths(spec.state_dir)
        self._api = ChHttp(self._paths.api_socket)
        self._proc: asyncio.subprocess.Process | None = None
        self._console = ConsoleLog(spec.state_dir / "console.log")
        self._events: asyncio.Task[None] | None = None
        self._reaper: asyncio.Task[int] | None = None
        self._removals: dict[str, asyncio.Future[None]] = {}
        self._ended = asyncio.Event()
        self._end_reason = ""
        self._stopping = False

    # -- identity ----------------------------------------------------------
    @property
    def agent_socket(self) -> Path:
        return self._paths.vsock_socket

    @property
    def console_log(self) -> Path:
        return self._console.path

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise VmmError("VM not started")
        return self._proc.pid

    @property
    def hotplug_slots(self) -> int:
        return self._options.hotplug_slots

    def command(self, event_fd: int) -> list[str]:
        """CH's command line, its event monitor on `event_fd` (pure: no I/O)."""
        argv = [
            str(self._options.binary),
            "--api-socket", f"path={self._paths.api_socket}",
            "--event-monitor", f"fd={event_fd}",
            "--log-file", str(self._paths.log_file),
            "--seccomp", "true",
        ]
        if self._options.landlock:
            argv.append("--landlock")
        if self._options.verbose:
            argv.append("-v")
        return argv

    def processes(self) -> VmProcesses:
        return VmProcesses(vmm_pid=self.pid, vmm_start_time=process_start_time(self.pid) or 0)

    # -- lifecycle ---------------------------------------------------------
    async def start(self, on_process: ProcessSpawned = ignore_process) -> VmProcesses:
        await asyncio.to_thread(self._prepare_dirs)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        try:
            await self._spawn(on_process)
            await self._wait_ping(deadline)
            body = ch_api.vm_config(
                self._spec,
                self._paths,
                landlock=self._options.landlock,
                free_page_reporting=self._options.free_page_reporting,
            )
            await self._api.call("PUT", "vm.create", body)
            await self._api.call("PUT", "vm.boot")
            await self._console.attach(self._paths.serial_socket, deadline)
        except BaseException as error:
            detail = self._log_tail()
            await self.shutdown(timeout=1.0)
            if isinstance(error, VmmError | OSError | TimeoutError):
                raise VmmError(f"start Cloud Hypervisor: {error}{detail}") from error
            raise
        log.info(
            "event=vmm_booted vmm=cloud-hypervisor pid=%d dir=%s", self.pid, self._spec.state_dir
        )
        return self.processes()

    def _prepare_dirs(self) -> None:
        self._spec.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Landlock rules name existing paths only.
        for host_dir in self._spec.host_dirs:
            host_dir.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        for stale in self._paths.sockets:
            stale.unlink(missing_ok=True)

    async def _spawn(self, on_process: ProcessSpawned) -> None:
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            log_fd = os.open(
                self._spec.state_dir / "ch-stderr.log",
                os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600,
            )
            try:
                log.info("event=vmm_launch vmm=cloud-hypervisor dir=%s", self._spec.state_dir)
                self._proc = await asyncio.create_subprocess_exec(
                    *self.command(write_fd),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=log_fd,
                    pass_fds=(write_fd,),
                    start_new_session=True,  # a signal to the shim's group must not hit the VM
                )
            finally:
                os.close(log_fd)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)  # CH holds the only write end: EOF is its exit
        self._events = asyncio.create_task(self._read_events(read_fd))
        self._reaper = asyncio.create_task(self._reap())
        start_time = process_start_time(self._proc.pid)
        if start_time is not None:
            await on_process("vmm", self._proc.pid, start_time)

    async def _wait_ping(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            assert self._proc is not None
            if self._proc.returncode is not None:
                raise VmmError(f"cloud-hypervisor exited with {self._proc.returncode} during start")
            try:
                await self._api.call("GET", "vmm.ping", timeout=max(0.1, deadline - loop.time()))
                return
            except VmmError as err:
                if not isinstance(err.__cause__, FileNotFoundError | ConnectionRefusedError):
                    raise
            if loop.time() >= deadline:
                raise VmmError(f"{self._paths.api_socket}: no answer to vmm.ping")
            await asyncio.sleep(0.005)

    async def wait_vsock_ready(self, deadline: float) -> None:
        """Wait for the agent's ready line on the serial console.

        Cloud Hypervisor's own vsock may be dialled while the guest boots; the wait
        costs nothing there (the line comes as the agent starts listening) and
        keeps the dial off a backend that stalls on early CONNECTs (the test
        stand-in's vhost-device-vsock, see shim/vmm/qemu.py).
        """
        if await self._console.wait_for(AGENT_READY_MARK, deadline):
            return
        if self._proc is not None and self._proc.returncode is not None:
            raise VmmError(f"cloud-hypervisor exited with {self._proc.returncode} during boot")
        raise VmmError(
            "the agent did not report ready on the console before the deadline; "
            f"console ends with {self._console.tail()!r}"
        )

    async def wait(self) -> int:
        if self._reaper is None:
            raise VmmError("VM not started")
        return await asyncio.shield(self._reaper)

    async def shutdown(self, timeout: float = 5.0) -> None:
        """vm.shutdown, vmm.shutdown, then SIGTERM and SIGKILL, within about `timeout`
        seconds; then remove the VM's host files."""
        self._stopping = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            for endpoint in ("vm.shutdown", "vmm.shutdown"):
                left = deadline - loop.time()
                if left <= 0 or proc.returncode is not None:
                    break
                with contextlib.suppress(VmmError):
                    await self._api.call("PUT", endpoint, timeout=left)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    await proc.wait()
            await _terminate(proc)
        if self._reaper is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        if self._events is not None:
            self._events.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._events
        for pending in self._removals.values():
            if not pending.done():
                pending.set_exception(VmmError("the VM was shut down"))
        await self._console.close()
        await asyncio.to_thread(shutil.rmtree, self._spec.state_dir, ignore_errors=True)

    async def _reap(self) -> int:
        """Owns the VM's end: CH's exit, or an event saying the VM is gone while CH
        lives on (then CH is stopped). Returns CH's exit status."""
        assert self._proc is not None
        exited = asyncio.ensure_future(self._proc.wait())
        ended = asyncio.ensure_future(self._ended.wait())
        try:
            await asyncio.wait({exited, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
        if not exited.done() and not self._stopping:
            log.error(
                "event=vm_ended vmm=cloud-hypervisor reason=%s dir=%s: stopping the VMM",
                self._end_reason, self._spec.state_dir,
            )
            await _terminate(self._proc)
        status = await exited
        log.info(
            "event=vmm_exit vmm=cloud-hypervisor status=%s dir=%s", status, self._spec.state_dir
        )
        return status

    async def _read_events(self, read_fd: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 16)
        pipe = os.fdopen(read_fd, "rb", buffering=0)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe
        )
        parser = ch_api.EventParser()
        try:
            while data := await reader.read(1 << 16):
                for event in parser.feed(data):
                    self._on_event(event)
            self._vm_ended("event monitor closed")
        except ValueError as err:
            log.error("event=ch_events_unreadable dir=%s error=%r", self._spec.state_dir, str(err))
            self._vm_ended(str(err))
        finally:
            transport.close()

    def _on_event(self, event: ch_api.Event) -> None:
        log.debug("event=ch_event name=%s properties=%s", event.name, dict(event.properties))
        if event.name == "vm.device-removed":
            waiter = self._removals.get(event.properties.get("id", ""))
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        elif event.name in ch_api.VM_ENDED:
            self._vm_ended(event.name)

    def _vm_ended(self, reason: str) -> None:
        if not self._stopping and not self._ended.is_set():
            self._end_reason = reason
            self._ended.set()

    # -- devices -----------------------------------------------------------
    async def add_disk(self, disk: DiskSpec, slot: int) -> None:
        del slot  # CH picks the PCI address
        response = await self._api.call("PUT", "vm.add-disk", ch_api.disk_config(disk))
        log.debug("event=ch_device_added id=%s info=%s", disk.id, response.body[:200])

    async def remove_disk(self, disk_id: str) -> None:
        await self._remove(disk_id)

    async def add_net(self, net: NetSpec, slot: int) -> None:
        del slot
        response = await self._api.call(
            "PUT", "vm.add-net", ch_api.net_config(net), fds=(net.tap_fd,)
        )
        log.debug("event=ch_device_added id=%s info=%s", net.id, response.body[:200])

    async def remove_net(self, net_id: str) -> None:
        await self._remove(net_id)

    async def _remove(self, device_id: str) -> None:
        """vm.remove-device, then the guest's eject (CH's `device-removed` event)."""
        waiter = asyncio.get_running_loop().create_future()
        self._removals[device_id] = waiter
        try:
            await self._api.call("PUT", "vm.remove-device", ch_api.remove_device(device_id))
            async with asyncio.timeout(UNPLUG_TIMEOUT_S):
                await waiter
        except TimeoutError:
            raise VmmError(
                f"vm.remove-device {device_id}: the guest did not release it "
                f"within {UNPLUG_TIMEOUT_S:.0f}s"
            ) from None
        finally:
            del self._removals[device_id]

    async def resize(self, vcpus: int) -> None:
        """Set the number of online vCPUs (up to the VM's maximum)."""
        await self._api.call("PUT", "vm.resize", ch_api.resize(vcpus))

    async def state(self) -> str:
        """CH's view of the VM: Created, Running, Shutdown or Paused."""
        response = await self._api.call("GET", "vm.info")
        try:
            return ch_api.vm_state(response.body)
        except ValueError as err:
            raise VmmError(f"GET vm.info: {err}") from err

    def _log_tail(self) -> str:
        lines: list[str] = []
        for path in (self._paths.log_file, self._spec.state_dir / "ch-stderr.log"):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").strip()
                if text:
                    lines.append(f"{path.name}: {text.splitlines()[-1]}")
        return ("; " + "; ".join(lines)) if lines else ""


async def _terminate(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM (CH shuts its VM down on it), SIGKILL after TERM_GRACE_S."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(TERM_GRACE_S):
                await proc.wait()

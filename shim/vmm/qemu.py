"""QEMU backend: q35 with pre-created PCIe root ports for hotplug, QMP for control,
and vsock through one vhost-device-vsock per VM, which exposes the same hybrid-vsock
Unix socket as Cloud Hypervisor (`CONNECT <port>\\n` → `OK <n>\\n`).

QMP is spoken by the QEMU project's own client library (`qemu.qmp`), which also
delivers events as they arrive. Slot numbers come from shim/devices.py: slot n is
root port `rp<n>`.

Host files live in `VmSpec.state_dir`; host processes are QEMU and the vsock
backend, both recorded in `VmProcesses` for crash cleanup.

The options beyond the defaults (boot disks, where the serial port and the hybrid
vsock socket go, guest reboots, QMP events) let the Cloud Hypervisor stand-in in
tests/chsim carry out a CH VM config on this backend instead of a QEMU driver of
its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from qemu.qmp import ExecuteError, QMPClient, QMPError

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
from shim.vmm.console import AGENT_READY_MARK, ConsoleLog
from shim.vmm.procs import process_start_time

log = logging.getLogger(__name__)
# qemu.qmp logs every message it sends and receives at DEBUG: far too much for a
# pod's log FIFO.
logging.getLogger("qemu.qmp").setLevel(logging.WARNING)

GUEST_CID = 3  # each VM has its own vsock backend, so every guest can use the same CID
UNPLUG_TIMEOUT_S = 10.0
# Read by the agent from /proc/cmdline (agent/src/main.c).
CRUN_FIXED_LAYOUT_ARG = "cloudhv.crun_aslr=off"

# "log": the serial port on a socket this backend reads into console.log (capped);
# "socket": served on `serial_path` for someone else to read; "file": written to
# `serial_path`; "null": a serial port whose output is dropped; "off": none.
SerialMode = Literal["log", "socket", "file", "null", "off"]
QmpEvent = Callable[[str, Mapping[str, Any]], None]


@dataclass(frozen=True)
class QemuOptions:
    binary: Path
    accel: str  # "tcg" | "kvm"
    vsock_backend: Path
    hotplug_slots: int = 8
    tcg_tb_size_mib: int = 0  # 0: QEMU's default translation cache
    free_page_reporting: bool = False  # a virtio-balloon reporting the guest's free pages
    # TCG: the agent runs crun without address randomisation (config.py says why).
    tcg_crun_fixed_layout: bool = False
    # Disks attached at boot, the first as /dev/vda; empty: the spec's rootfs, read-only.
    boot_disks: tuple[DiskSpec, ...] = ()
    serial: SerialMode = "log"
    serial_path: Path | None = None
    vsock_socket: Path | None = None  # the hybrid-vsock socket; default: in state_dir
    guest_cid: int = GUEST_CID
    reboot: bool = False  # a guest reboot restarts the guest in place instead of ending QEMU
    launcher: tuple[str, ...] = ()  # argv prefix for QEMU and the vsock backend
    on_event: QmpEvent | None = None  # hears every QMP event (name, data)


def kernel_command_line(spec: VmSpec, opts: QemuOptions) -> str:
    # The serial console is ttyS0 unless the caller's command line names one.
    console_arg = "" if "console=" in spec.kernel_args else "console=ttyS0 "
    agent_args = ""
    if opts.accel == "tcg" and opts.tcg_crun_fixed_layout:
        agent_args = f" {CRUN_FIXED_LAYOUT_ARG}"
    return f"{console_arg}{spec.kernel_args}{agent_args}"


class QemuVmm(Vmm):
    def __init__(self, spec: VmSpec, options: QemuOptions) -> None:
        self._spec = spec
        self._options = options
        self._dir = spec.state_dir
        self._qemu: asyncio.subprocess.Process | None = None
        self._vsock: asyncio.subprocess.Process | None = None
        self._qmp: QMPClient | None = None
        self._exit_status: int | None = None
        self._reaper: asyncio.Task[int] | None = None
        self._events: asyncio.Task[None] | None = None
        self._console = ConsoleLog(self._dir / "console.log")

    # -- paths -------------------------------------------------------------
    @property
    def agent_socket(self) -> Path:
        return self._options.vsock_socket or self._dir / "vsock.sock"

    @property
    def _vhost_socket(self) -> Path:
        return self._dir / "vhost-vsock.sock"

    @property
    def _qmp_socket(self) -> Path:
        return self._dir / "qmp.sock"

    @property
    def console_log(self) -> Path:
        return self._console.path

    @property
    def _console_socket(self) -> Path:
        if self._options.serial == "socket" and self._options.serial_path is not None:
            return self._options.serial_path
        return self._dir / "console.sock"

    @property
    def pid(self) -> int:
        if self._qemu is None:
            raise VmmError("VM not started")
        return self._qemu.pid

    @property
    def hotplug_slots(self) -> int:
        return self._options.hotplug_slots

    # -- lifecycle ---------------------------------------------------------
    def command(self) -> list[str]:
        """The QEMU command line for this VM (pure: no I/O)."""
        spec, opts = self._spec, self._options
        # TCG: `max` without ERMS. With it the guest kernel (and libc) copy with
        # `rep movsb`, which TCG runs a byte at a time: every pipe, socket and page
        # copy in the guest went 4-5x slower (dd /dev/zero to /dev/null: 250 MB/s
        # with ERMS, 1.2 GB/s without; a pipe: 55 against 210 MB/s).
        accel_cpu = "host" if opts.accel == "kvm" else "max,-erms"
        accel = opts.accel
        if accel == "tcg" and opts.tcg_tb_size_mib:
            accel += f",tb-size={opts.tcg_tb_size_mib}"
        mem = f"{spec.memory_mib}M"
        cmd = [
            *opts.launcher,
            str(opts.binary),
            "-name", f"cloudhv-{spec.state_dir.name}",
            # mem-merge=off: no guest-writable memory joins the node's same-page
            # merging, whose timing tells one guest what another's pages hold.
            "-machine", "q35,memory-backend=mem0,mem-merge=off",
            "-accel", accel,
            "-cpu", accel_cpu,
            "-smp", f"{spec.vcpus},maxcpus={max(spec.max_vcpus, spec.vcpus)}",
            "-m", mem,
            # vhost-user needs guest memory the backend can map: a shared memfd.
            "-object", f"memory-backend-memfd,id=mem0,size={mem},share=on",
            "-nodefaults", "-no-user-config", "-nographic",
            *(() if opts.reboot else ("-no-reboot",)),
            *self._serial_args(),
            "-kernel", str(spec.kernel),
            "-append", kernel_command_line(spec, opts),
        ]
        for disk in self._boot_disks():
            readonly = "on" if disk.read_only else "off"
            serial = f",serial={disk.serial}" if disk.serial else ""
            cmd += [
                "-drive",
                f"file={disk.path},if=none,id=boot-{disk.id},format=raw,readonly={readonly}",
                "-device", f"virtio-blk-pci,drive=boot-{disk.id}{serial}",
            ]
        cmd += [
            "-chardev", f"socket,id=vsock0,path={self._vhost_socket}",
            "-device", "vhost-user-vsock-pci,chardev=vsock0",
            "-qmp", f"unix:{self._qmp_socket},server=on,wait=off",
        ]
        if spec.shared_fs is not None:
            # Guest memory is already a shared memfd (above), as vhost-user needs.
            cmd += [
                "-chardev", f"socket,id=fs0,path={spec.shared_fs.socket}",
                "-device",
                f"vhost-user-fs-pci,chardev=fs0,tag={spec.shared_fs.tag},queue-size=1024",
            ]
        if opts.free_page_reporting:
            cmd += ["-device", "virtio-balloon-pci,id=balloon0,free-page-reporting=on"]
        for index in range(opts.hotplug_slots):
            cmd += ["-device", f"pcie-root-port,id=rp{index},bus=pcie.0,chassis={index + 1},slot=0"]
        return cmd

    def _boot_disks(self) -> tuple[DiskSpec, ...]:
        if self._options.boot_disks:
            return self._options.boot_disks
        return (DiskSpec("rootfs", self._spec.rootfs, "cloudhv-rootfs", read_only=True),)

    def _serial_args(self) -> list[str]:
        mode, path = self._options.serial, self._options.serial_path
        if mode in ("log", "socket"):
            chardev = f"socket,id=console0,path={self._console_socket},server=on,wait=off"
        elif mode == "file":
            chardev = f"file,id=console0,path={path}"
        elif mode == "null":
            chardev = "null,id=console0"
        else:
            return []
        return ["-chardev", chardev, "-serial", "chardev:console0"]

    async def start(self, on_process: ProcessSpawned = ignore_process) -> VmProcesses:
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        sockets = (self.agent_socket, self._vhost_socket, self._qmp_socket, self._console_socket)
        for stale in sockets:
            stale.unlink(missing_ok=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10.0
        try:
            self._vsock = await _spawn(
                [
                    *self._options.launcher,
                    str(self._options.vsock_backend),
                    "--guest-cid", str(self._options.guest_cid),
                    "--socket", str(self._vhost_socket),
                    "--uds-path", str(self.agent_socket),
                ],
                self._dir / "vsock.log",
            )
            await _announce(on_process, "vhost-device-vsock", self._vsock.pid)
            await self._wait_for_path(
                self._vhost_socket, self._vsock, "vhost-device-vsock", deadline
            )
            argv = self.command()
            log.info("event=vmm_launch vmm=qemu dir=%s", self._dir)
            self._qemu = await _spawn(argv, self._dir / "qemu.log")
            self._reaper = asyncio.create_task(self._reap())
            await _announce(on_process, "vmm", self._qemu.pid)
            if self._options.serial in ("log", "socket"):
                await self._wait_for_path(self._console_socket, self._qemu, "QEMU", deadline)
            if self._options.serial == "log":
                await self._console.attach(self._console_socket, deadline)
            self._qmp = await self._connect_qmp(deadline)
            if self._options.on_event is not None:
                self._events = asyncio.create_task(self._forward_events(self._options.on_event))
        except BaseException as error:
            detail = self._log_tail()
            await self.shutdown(timeout=1.0)
            if isinstance(error, VmmError | OSError | TimeoutError | QMPError):
                raise VmmError(f"start QEMU: {error}{detail}") from error
            raise
        return self.processes()

    async def _connect_qmp(self, deadline: float) -> QMPClient:
        """Connect once QEMU listens (it creates the socket while starting up)."""
        assert self._qemu is not None
        loop = asyncio.get_running_loop()
        await self._wait_for_path(self._qmp_socket, self._qemu, "QEMU", deadline)
        while True:
            client = QMPClient(f"cloudhv-{self._dir.name}")
            try:
                async with asyncio.timeout_at(deadline):
                    await client.connect(str(self._qmp_socket))
                return client
            except QMPError as error:
                if self._qemu is not None and self._qemu.returncode is not None:
                    raise VmmError(f"QEMU exited with {self._qemu.returncode}") from error
                if loop.time() >= deadline:
                    raise VmmError(f"connect QMP socket {self._qmp_socket}: {error}") from error
                await asyncio.sleep(0.01)

    async def _forward_events(self, on_event: QmpEvent) -> None:
        assert self._qmp is not None
        with self._qmp.listener() as listener:
            async for event in listener:
                data = event.get("data")
                on_event(str(event.get("event")), data if isinstance(data, dict) else {})

    async def reset(self) -> None:
        """Reset the guest, as a reboot from inside it would."""
        await self._execute("system_reset", {})

    def processes(self) -> VmProcesses:
        helpers: list[tuple[int, int]] = []
        if self._vsock is not None:
            start = process_start_time(self._vsock.pid)
            if start is not None:
                helpers.append((self._vsock.pid, start))
        qemu_start = process_start_time(self.pid) or 0
        return VmProcesses(vmm_pid=self.pid, vmm_start_time=qemu_start, helper_pids=tuple(helpers))

    async def wait(self) -> int:
        if self._reaper is None:
            raise VmmError("VM not started")
        return await asyncio.shield(self._reaper)

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Quit QEMU (SIGKILL after `timeout`), stop the vsock backend, remove host files."""
        if self._events is not None:
            self._events.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._events
            self._events = None
        if self._qmp is not None:
            with contextlib.suppress(QMPError, OSError, TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._qmp.execute("quit")
            # Disconnecting re-raises what ended the connection (EOF when QEMU quit).
            with contextlib.suppress(Exception):
                await self._qmp.disconnect()
            self._qmp = None
        for proc in (self._qemu, self._vsock):
            if proc is None or proc.returncode is not None:
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout if proc is self._qemu else 0.5):
                    await proc.wait()
                    continue
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
            await proc.wait()
        if self._reaper is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        await self._console.close()
        await asyncio.to_thread(shutil.rmtree, self._dir, ignore_errors=True)

    async def _reap(self) -> int:
        """Owns the VM's end: QEMU's exit, or the vsock backend's, which the VM cannot
        live without (the agent is unreachable): then QEMU is killed. Either way both
        go, and QEMU's status is returned."""
        assert self._qemu is not None
        qemu = asyncio.ensure_future(self._qemu.wait())
        waits: set[asyncio.Future[int]] = {qemu}
        if self._vsock is not None:
            waits.add(asyncio.ensure_future(self._vsock.wait()))
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if not qemu.done():
            log.error(
                "event=vsock_backend_exited status=%s dir=%s: stopping QEMU",
                self._vsock.returncode if self._vsock else None, self._dir,
            )
            with contextlib.suppress(ProcessLookupError):
                self._qemu.kill()
        status = await qemu
        self._exit_status = status
        if self._vsock is not None and self._vsock.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._vsock.terminate()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._vsock.wait()
            if self._vsock.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self._vsock.kill()
        for pending in waits:
            with contextlib.suppress(ProcessLookupError):
                await pending
        log.info("event=vmm_exit vmm=qemu status=%s dir=%s", status, self._dir)
        return status

    async def wait_vsock_ready(self, deadline: float) -> None:
        """Wait until the agent reports on the console that it listens on vsock.

        vhost-device-vsock 0.3 can get stuck for good while the guest is booting:
        after some CONNECTs were refused (nobody listening yet), a later one goes
        unanswered, and so does every one after it, although the agent listens.
        Under load on TCG this hit about 1 boot in 50, also when dialling only after
        the guest's vsock driver was up. Dialling once the agent has said it
        listens avoided it (0 in 80). The console is ours: the agent's own line.
        """
        if await self._console.wait_for(AGENT_READY_MARK, deadline):
            return
        if self._qemu is not None and self._qemu.returncode is not None:
            raise VmmError(f"QEMU exited with {self._qemu.returncode} during boot")
        raise VmmError(
            "the agent did not report ready on the console before the deadline; "
            f"console ends with {self._console.tail()!r}"
        )

    # -- devices -----------------------------------------------------------
    async def add_disk(self, disk: DiskSpec, slot: int) -> None:
        node = f"blk-{disk.id}"
        await self._execute("blockdev-add", {
            "driver": "raw",
            "node-name": node,
            "read-only": disk.read_only,
            "file": {"driver": "host_device" if _is_block(disk.path) else "file",
                     "filename": str(disk.path)},
        })
        try:
            await self._execute("device_add", {
                "driver": "virtio-blk-pci", "id": disk.id, "drive": node,
                "bus": f"rp{slot}", "serial": disk.serial,
            })
        except BaseException:
            with contextlib.suppress(VmmError):
                await self._execute("blockdev-del", {"node-name": node})
            raise

    async def remove_disk(self, disk_id: str) -> None:
        await self._unplug(disk_id)
        await self._execute("blockdev-del", {"node-name": f"blk-{disk_id}"})

    async def add_net(self, net: NetSpec, slot: int) -> None:
        # The TAP travels to QEMU over the QMP socket (SCM_RIGHTS) under a name that
        # netdev_add then takes; QEMU closes its copy when the netdev goes.
        fd_name = f"tap-{net.id}"
        qmp = self._require_qmp()
        try:
            qmp.send_fd_scm(net.tap_fd)
        except (QMPError, OSError) as err:
            raise VmmError(f"pass the TAP of {net.id} to QEMU: {err}") from err
        await self._execute("getfd", {"fdname": fd_name})
        try:
            await self._execute("netdev_add", {
                "type": "tap", "id": f"net-{net.id}", "fd": fd_name, "vhost": False,
            })
        except BaseException:
            with contextlib.suppress(VmmError):
                await self._execute("closefd", {"fdname": fd_name})
            raise
        try:
            await self._execute("device_add", {
                "driver": "virtio-net-pci", "id": net.id, "netdev": f"net-{net.id}",
                "mac": net.mac, "bus": f"rp{slot}", "host_mtu": net.mtu,
            })
        except BaseException:
            with contextlib.suppress(VmmError):
                await self._execute("netdev_del", {"id": f"net-{net.id}"})
            raise

    async def remove_net(self, net_id: str) -> None:
        await self._unplug(net_id)
        await self._execute("netdev_del", {"id": f"net-{net_id}"})

    async def _unplug(self, device_id: str) -> None:
        qmp = self._require_qmp()
        # The guest acknowledges the eject through ACPI; only then is the device gone.
        with qmp.listener("DEVICE_DELETED") as listener:
            await self._execute("device_del", {"id": device_id})
            try:
                async with asyncio.timeout(UNPLUG_TIMEOUT_S):
                    async for event in listener:
                        data = event.get("data")
                        if isinstance(data, dict) and data.get("device") == device_id:
                            return
            except TimeoutError:
                raise VmmError(
                    f"device_del {device_id}: the guest did not release it "
                    f"within {UNPLUG_TIMEOUT_S:.0f}s"
                ) from None

    async def _execute(self, command: str, arguments: dict[str, Any]) -> object:
        """One QMP command; a refusal becomes VmmError naming the command and QEMU's reason."""
        qmp = self._require_qmp()
        try:
            return await qmp.execute(command, arguments)
        except ExecuteError as err:
            raise VmmError(f"QMP {command}: {err.error_class}: {err}") from err
        except QMPError as err:
            raise VmmError(f"QMP {command}: {err}") from err

    def _require_qmp(self) -> QMPClient:
        if self._qmp is None:
            raise VmmError("VM not running")
        return self._qmp

    async def _wait_for_path(
        self, path: Path, proc: asyncio.subprocess.Process, name: str, deadline: float
    ) -> None:
        loop = asyncio.get_running_loop()
        while not path.exists():
            if proc.returncode is not None:
                raise VmmError(f"{name} exited with {proc.returncode} during start")
            if loop.time() >= deadline:
                raise VmmError(f"{path} did not appear")
            await asyncio.sleep(0.005)

    def _log_tail(self) -> str:
        lines: list[str] = []
        for name in ("qemu.log", "vsock.log"):
            with contextlib.suppress(OSError):
                text = (self._dir / name).read_text(errors="replace").strip()
                if text:
                    lines.append(f"{name}: {text.splitlines()[-1]}")
        return ("; " + "; ".join(lines)) if lines else ""


async def _announce(on_process: ProcessSpawned, role: str, pid: int) -> None:
    start_time = process_start_time(pid)
    if start_time is not None:
        await on_process(role, pid, start_time)


def _is_block(path: Path) -> bool:
    with contextlib.suppress(OSError):
        return stat.S_ISBLK(os.stat(path).st_mode)
    return False


async def _spawn(argv: list[str], log_path: Path) -> asyncio.subprocess.Process:
    """Start a child with stdio on /dev/null and stderr appended to `log_path`."""
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=log_fd,
            start_new_session=True,  # a signal to the shim's group must not hit the VM
        )
    finally:
        os.close(log_fd)

"""Cloud Hypervisor's API semantics (v53.0), carried out on a QEMU TCG VM.

Routing, status codes and error bodies follow vmm/src/api/http (v53): an unknown
endpoint is 404 `["Not Found"]`; a method other than GET or PUT is 400 without a
body; the wrong one of those, a body where none belongs, or none where one is
needed, 400 `["Bad Request"]`; a body that does not parse, 400 `["Failed to
deserialize JSON", <why>]` (here: whatever the OpenAPI spec refuses, fields it
does not list included, which CH would ignore). An API error is the chain
`["Error from API", <action>, <causes>...]` with 404 when the VM (or its config)
is not created and 500 for every other state error (there is no 405 in v53's
code, whatever the spec's descriptions say).

The VM states are CH's: no config; created (config stored, no VM: also after
vm.shutdown); running. Devices added before boot go into the config, after
boot into the VM (and the config), with CH's automatic ids (`_disk<n>`).
vm.remove-device answers at once and reports `device-removed` once the guest has
ejected the device; removing an id that is gone or going is refused (v53).

Carried out on shim/vmm/qemu.py: the config's disks are QEMU's boot disks, the
vsock socket is vhost-device-vsock's --uds-path, the serial port goes where the
config says, hot-plugged disks and nets (from the passed TAP fd) go into root
ports. A guest reset reports rebooting/rebooted (the guest restarts in place, as
in CH); a guest power-off ends the VMM with CH's shutdown events, and QEMU dying
ends the stand-in with an error, as a crashed CH would.

Not modelled, refused with a 500 naming the stand-in: firmware and igvm payloads,
pmem, virtio-fs, vDPA, VFIO and user devices, vhost-user disks and nets, TAPs by
name, non-raw images, resizing a running VM, snapshots, migration, pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import os
import random
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shim.vmm.base import DiskSpec, NetSpec, SharedFsSpec, VmmError, VmSpec
from shim.vmm.qemu import QemuOptions, QemuVmm, SerialMode
from tests.chsim import landlock, spec
from tests.chsim.events import EventMonitor
from tests.chsim.server import Reply, Request

log = logging.getLogger("chsim")

REPO = Path(__file__).resolve().parents[2]
API_ROOT = "/api/v1/"
NOT_CREATED = "VM is not created"
MISSING_CONFIG = "VM config is missing"
ALREADY_CREATED = "VM is already created"
NOT_RUNNING = "VM is not running"
DEVICE_MANAGER = "Error from device manager"
ACTIONS = {
    "vm.create": "The VM could not be created",
    "vm.boot": "The VM could not boot",
    "vm.delete": "The VM could not be deleted",
    "vm.info": "The VM info is not available",
    "vm.shutdown": "The VM could not shutdown",
    "vm.reboot": "The VM could not reboot",
    "vm.resize": "The VM could not be resized",
    "vm.add-disk": "The disk could not be added to the VM",
    "vm.add-net": "The network device could not be added to the VM",
    "vm.remove-device": "The device could not be removed from the VM",
    "vmm.shutdown": "The VMM could not shutdown",
}
MAX_VCPUS = 8192
FIRST_HOTPLUG_DEVICE = 8  # BDFs reported for hot-plugged devices start at 00:08.0


class ChError(Exception):
    def __init__(self, status: int, chain: list[str]) -> None:
        super().__init__(": ".join(chain))
        self.status = status
        self.chain = chain


def api_error(endpoint: str, *causes: str) -> ChError:
    status = 404 if causes and causes[0] in (NOT_CREATED, MISSING_CONFIG) else 500
    return ChError(status, ["Error from API", ACTIONS.get(endpoint, endpoint), *causes])


@dataclass(frozen=True)
class Backend:
    """What the stand-in runs the VM with (not CH command-line flags: environment)."""

    qemu: Path
    vsock_backend: Path
    accel: str
    hotplug_slots: int
    private_dir: Path  # QEMU's own sockets and logs

    @classmethod
    def from_env(cls, private_dir: Path) -> Backend:
        env = os.environ
        return cls(
            qemu=Path(env.get("CHSIM_QEMU", "/usr/bin/qemu-system-x86_64")),
            vsock_backend=Path(env.get("CHSIM_VSOCK_BACKEND", "/usr/bin/vhost-device-vsock")),
            accel=env.get("CHSIM_ACCEL", "tcg"),
            hotplug_slots=int(env.get("CHSIM_HOTPLUG_SLOTS", "8")),
            private_dir=private_dir,
        )


@dataclass
class Device:
    kind: str  # "disk" | "net" | "boot"
    bdf: str
    slot: int | None = None
    removing: bool = False


Handler = Callable[[dict[str, Any] | None, list[int]], Any]


class StandIn:
    """One cloud-hypervisor process's VMM: its config, its VM, its devices."""

    def __init__(
        self, backend: Backend, events: EventMonitor, *, no_shutdown: bool = False
    ) -> None:
        self._backend = backend
        self._events = events
        self._no_shutdown = no_shutdown
        self._lock = asyncio.Lock()  # CH serves every API request on one VMM thread
        self.config: dict[str, Any] | None = None
        self._qemu: QemuVmm | None = None
        self._devices: dict[str, Device] = {}
        self._device_count = 0
        self._unplugs: set[asyncio.Task[None]] = set()
        self._watcher: asyncio.Task[None] | None = None
        self.done = asyncio.Event()
        self.exit_code = 0
        self._routes: dict[str, Handler] = {
            "vmm.ping": self._ping,
            "vmm.shutdown": self._vmm_shutdown,
            "vm.info": self._info,
            "vm.create": self._create,
            "vm.boot": self._boot,
            "vm.shutdown": self._shutdown,
            "vm.delete": self._delete,
            "vm.reboot": self._reboot,
            "vm.resize": self._resize,
            "vm.add-disk": self._add_disk,
            "vm.add-net": self._add_net,
            "vm.remove-device": self._remove_device,
        }

    # -- HTTP: routing, methods, bodies ------------------------------------------------

    async def handle(self, request: Request) -> Reply:
        try:
            return await self._handle(request)
        except ChError as err:
            log.info("HTTP API error response: %s (status %d)", err, err.status)
            return Reply(err.status, err.chain)
        finally:
            for fd in request.fds:
                with contextlib.suppress(OSError):
                    os.close(fd)

    async def _handle(self, request: Request) -> Reply:
        log.info("request: %s %s %s", request.method, request.path,
                 (request.body or b"")[:2000].decode(errors="replace"))
        endpoints = spec.endpoints()
        name = request.path.removeprefix(API_ROOT) if request.path.startswith(API_ROOT) else ""
        if name not in endpoints:
            raise ChError(404, ["Not Found"])
        if request.method not in ("GET", "PUT"):
            return Reply(400)
        if request.method not in endpoints[name]:
            raise ChError(400, ["Bad Request"])
        schema = spec.request_schema(name) if request.method == "PUT" else None
        body: dict[str, Any] | None = None
        if schema is None and request.body is not None and request.method == "PUT":
            raise ChError(400, ["Bad Request"])
        if schema is not None:
            if request.body is None:
                if name == "vm.create":
                    return Reply(400)
                raise ChError(400, ["Bad Request"])
            body = _parse_body(schema, request.body)
        handler = self._routes.get(name)
        if handler is None:
            raise api_error(name, f"stand-in: /{name} is not modelled")
        async with self._lock:
            result = await handler(body, request.fds)
        return result if isinstance(result, Reply) else Reply(204)

    # -- the VMM -----------------------------------------------------------------------

    async def _ping(self, body: Any, fds: list[int]) -> Reply:
        return Reply(200, {
            "build_version": "v53.0-chsim",
            "version": "53.0.0",
            "pid": os.getpid(),
            "features": ["kvm"],
        })

    async def _vmm_shutdown(self, body: Any, fds: list[int]) -> Reply:
        await self._delete(None, [])
        self._events.emit("vmm", "shutdown")
        self.done.set()
        return Reply(200)  # CH answers vmm.shutdown with 200 and no body

    async def terminate(self) -> None:
        """SIGTERM or SIGINT: CH shuts the VMM down as vmm.shutdown would."""
        async with self._lock:
            await self._vmm_shutdown(None, [])

    async def _info(self, body: Any, fds: list[int]) -> Reply:
        if self.config is None:
            raise api_error("vm.info", NOT_CREATED)
        tree = {
            device_id: {"id": device_id, "resources": [], "children": [], "pci_bdf": dev.bdf}
            for device_id, dev in self._devices.items()
        }
        info: dict[str, Any] = {
            "config": self.config,
            "state": "Running" if self._qemu is not None else "Created",
            "memory_actual_size": self.config.get("memory", {}).get("size", 512 << 20),
        }
        if self._qemu is not None:
            info["device_tree"] = tree
        return Reply(200, info)

    async def _create(self, body: Any, fds: list[int]) -> None:
        if self.config is not None:
            raise api_error("vm.create", ALREADY_CREATED)
        unsupported = _unsupported_config(body)
        if unsupported:
            raise api_error("vm.create", f"stand-in: {unsupported} is not modelled")
        config = copy.deepcopy(body)
        if config.get("landlock_enable"):
            try:
                skipped = landlock.restrict(self._landlock_rules(config))
            except OSError as err:
                raise api_error(
                    "vm.create", "Failed to apply landlock config during vm_create",
                    "Error creating/adding/restricting ruleset", str(err),
                ) from None
            log.info("landlock applied; paths that could not be opened: %s", skipped)
        self.config = config

    def _landlock_rules(self, config: dict[str, Any]) -> list[tuple[Path, str]]:
        """CH's own rules for its config (VmConfig::apply_landlock), the request's rules,
        and what the stand-in itself needs (Python, QEMU, its private dir)."""
        rules: list[tuple[Path, str]] = []
        payload = config.get("payload", {})
        rules += [(Path(payload[key]), "r") for key in ("kernel", "initramfs") if key in payload]
        rules += [(Path(d["path"]), "rw") for d in config.get("disks", []) if "path" in d]
        rules.append((Path(config.get("rng", {}).get("src", "/dev/urandom")), "r"))
        for key in ("serial", "console"):
            for field_name in ("file", "socket"):
                if field_name in config.get(key, {}):
                    rules.append((Path(config[key][field_name]), "rw"))
        vsock = config.get("vsock")
        if vsock:
            rules += [(Path(vsock["socket"]).parent, "w"), (Path(vsock["socket"]), "rw")]
        rules += [(Path(fs["socket"]), "rw") for fs in config.get("fs", [])]
        rules += [(Path(r["path"]), r["access"]) for r in config.get("landlock_rules", [])]
        own = {
            Path("/usr"), Path("/lib"), Path("/lib64"), Path("/etc"), Path("/proc"),
            Path("/sys"), Path(sys.prefix), Path(sys.base_prefix), REPO,
        }
        rules += [(path, "r") for path in sorted(own)]
        rules += [(Path("/dev"), "rw"), (self._backend.private_dir, "rw")]
        return rules

    async def _boot(self, body: Any, fds: list[int]) -> None:
        if self._qemu is not None:
            raise api_error("vm.boot", ALREADY_CREATED)
        self._events.emit("vm", "booting")
        if self.config is None:
            raise api_error("vm.boot", MISSING_CONFIG)
        problem = _validate(self.config)
        if problem:
            raise api_error("vm.boot", "Failed to validate config", problem)
        qemu = QemuVmm(self._vm_spec(self.config), self._qemu_options(self.config))
        try:
            await qemu.start()
        except VmmError as err:
            raise api_error("vm.boot", "stand-in: QEMU did not start", str(err)) from None
        self._qemu = qemu
        self._devices = {
            disk_id: Device("boot", f"0000:00:{index + 2:02x}.0")
            for index, disk_id in enumerate(self._boot_ids(self.config))
        }
        self._watcher = asyncio.create_task(self._watch(qemu))
        self._events.emit("vm", "booted")

    def _boot_ids(self, config: dict[str, Any]) -> list[str]:
        ids = [d["id"] for d in config.get("disks", [])]
        vsock = config.get("vsock")
        return ids + ([vsock["id"]] if vsock else [])

    def _vm_spec(self, config: dict[str, Any]) -> VmSpec:
        cpus = config.get("cpus", {"boot_vcpus": 1, "max_vcpus": 1})
        disks = config.get("disks", [])
        return VmSpec(
            state_dir=self._backend.private_dir / "qemu",
            kernel=Path(config["payload"]["kernel"]),
            rootfs=Path(disks[0]["path"]) if disks else Path("/dev/null"),
            kernel_args=config["payload"].get("cmdline", ""),
            vcpus=cpus["boot_vcpus"],
            max_vcpus=cpus["max_vcpus"],
            memory_mib=config.get("memory", {}).get("size", 512 << 20) >> 20,
            shared_fs=self._shared_fs(config),
        )

    def _shared_fs(self, config: dict[str, Any]) -> SharedFsSpec | None:
        """One virtio-fs device (the shim's pod has one), served by the caller's virtiofsd;
        CH refuses `fs` without shared memory, and so does the stand-in."""
        devices = config.get("fs") or []
        if not devices:
            return None
        if len(devices) > 1:
            raise ChError(400, ["the stand-in models one fs device"])
        if not config.get("memory", {}).get("shared"):
            why = "vhost-user requires shared memory"
            raise ChError(400, ["Error validating configuration", why])
        return SharedFsSpec(socket=Path(devices[0]["socket"]), tag=devices[0]["tag"])

    def _qemu_options(self, config: dict[str, Any]) -> QemuOptions:
        for disk in config.get("disks", []):
            disk.setdefault("id", self._next_name("_disk"))
        boot_disks = tuple(
            DiskSpec(d["id"], Path(d["path"]), d.get("serial", ""), d.get("readonly", False))
            for d in config.get("disks", [])
        )
        serial = config.get("serial", {"mode": "Null"})
        mode: SerialMode = {"Socket": "socket", "File": "file", "Null": "null", "Off": "off",
                            "Tty": "null"}[serial["mode"]]
        path = serial.get("socket") if mode == "socket" else serial.get("file")
        vsock = config.get("vsock")
        if vsock is not None:
            vsock.setdefault("id", self._next_name("_vsock"))
        balloon = config.get("balloon") or {}
        return QemuOptions(
            binary=self._backend.qemu,
            accel=self._backend.accel,
            free_page_reporting=bool(balloon.get("free_page_reporting")),
            vsock_backend=self._backend.vsock_backend,
            hotplug_slots=self._backend.hotplug_slots,
            boot_disks=boot_disks,
            serial=mode,
            serial_path=Path(path) if path else None,
            vsock_socket=Path(vsock["socket"]) if vsock else None,
            guest_cid=vsock["cid"] if vsock else 3,
            reboot=True,
            # The VM is this process's: QEMU and its vsock backend die with it.
            launcher=("setpriv", "--pdeathsig", "SIGKILL", "--"),
            on_event=self._qmp_event,
        )

    def _qmp_event(self, name: str, data: Mapping[str, Any]) -> None:
        if name == "RESET":
            # CH rebuilds the VM on a guest reset; QEMU resets it in place.
            self._events.emit("vm", "rebooting")
            self._events.emit("vm", "rebooted")
        elif name == "GUEST_PANICKED":
            self._events.emit("guest", "panic", {"event": "panicked"})

    async def _watch(self, qemu: QemuVmm) -> None:
        status = await qemu.wait()
        if status != 0 and self._qemu is qemu:
            # The VM died under the VMM: CH would be gone with it, at once. The vsock
            # backend is gone already; the shim removes the files.
            log.error("QEMU exited with %s: the VMM dies with its VM", status)
            logging.shutdown()
            os._exit(1)
        async with self._lock:
            if self._qemu is not qemu:
                return  # stopped on purpose
            await self._stop_vm()
            log.info("VM guest exit event")
            self._events.emit("vm", "shutdown")
            if not self._no_shutdown:
                self.config = None
                self._events.emit("vm", "deleted")
                self._events.emit("vmm", "shutdown")
                self.done.set()

    async def _stop_vm(self) -> None:
        qemu, self._qemu = self._qemu, None
        self._devices = {}
        for task in list(self._unplugs):
            task.cancel()
        if qemu is not None:
            await qemu.shutdown(timeout=2.0)

    async def _shutdown(self, body: Any, fds: list[int]) -> None:
        if self._qemu is None:
            raise api_error("vm.shutdown", NOT_RUNNING)
        await self._stop_vm()
        self._events.emit("vm", "shutdown")

    async def _delete(self, body: Any, fds: list[int]) -> None:
        if self.config is None:
            return
        if self._qemu is not None:
            await self._shutdown(None, [])
        self.config = None
        self._events.emit("vm", "deleted")

    async def _reboot(self, body: Any, fds: list[int]) -> None:
        if self._qemu is None:
            raise api_error("vm.reboot", NOT_CREATED)
        try:
            await self._qemu.reset()
        except VmmError as err:
            raise api_error("vm.reboot", str(err)) from None

    async def _resize(self, body: Any, fds: list[int]) -> None:
        if self.config is None:
            raise api_error("vm.resize", NOT_CREATED)
        if self._qemu is not None:
            raise api_error("vm.resize", "stand-in: resizing a running VM is not carried out")
        if "desired_vcpus" in body:
            self.config.setdefault("cpus", {"max_vcpus": 1})["boot_vcpus"] = body["desired_vcpus"]
        if "desired_ram" in body:
            self.config.setdefault("memory", {})["size"] = body["desired_ram"]

    # -- devices -----------------------------------------------------------------------

    def _next_name(self, prefix: str) -> str:
        while True:
            name = f"{prefix}{self._device_count}"
            self._device_count += 1
            if name not in _config_ids(self.config or {}):
                return name

    def _new_device_id(self, endpoint: str, body: dict[str, Any], prefix: str) -> str:
        assert self.config is not None
        device_id = body.get("id") or self._next_name(prefix)
        if device_id.startswith("__"):
            raise api_error(endpoint, "Failed to validate config",
                            f"Identifier {device_id} is not invalid")
        if device_id in _config_ids(self.config):
            raise api_error(endpoint, "Failed to validate config",
                            f"Identifier {device_id} is not unique")
        return device_id

    def _free_slot(self, endpoint: str) -> int:
        used = {d.slot for d in self._devices.values() if d.slot is not None}
        for slot in range(self._backend.hotplug_slots):
            if slot not in used:
                return slot
        raise api_error(endpoint, DEVICE_MANAGER, "Failed to find an available PCI device ID")

    async def _add_disk(self, body: Any, fds: list[int]) -> Reply | None:
        if self.config is None:
            raise api_error("vm.add-disk", NOT_CREATED)
        disk = dict(body, id=self._new_device_id("vm.add-disk", body, "_disk"))
        if disk.get("vhost_user") or "path" not in disk:
            raise api_error(
                "vm.add-disk", DEVICE_MANAGER, "stand-in: vhost-user disks are not modelled"
            )
        if disk.get("image_type", "Raw") != "Raw":
            raise api_error(
                "vm.add-disk", DEVICE_MANAGER, "stand-in: only raw images are modelled"
            )
        if self._qemu is None:
            self.config.setdefault("disks", []).append(disk)
            return None
        slot = self._free_slot("vm.add-disk")
        spec_ = DiskSpec(disk["id"], Path(disk["path"]), disk.get("serial", ""),
                         disk.get("readonly", False))
        try:
            await self._qemu.add_disk(spec_, slot)
        except VmmError as err:
            raise api_error(
                "vm.add-disk", DEVICE_MANAGER, "Cannot open disk path", str(err)
            ) from None
        return self._plugged("disk", disk, slot, "disks")

    async def _add_net(self, body: Any, fds: list[int]) -> Reply | None:
        if self.config is None:
            raise api_error("vm.add-net", NOT_CREATED)
        net = dict(body, id=self._new_device_id("vm.add-net", body, "_net"))
        if self._qemu is None:
            raise api_error("vm.add-net", "stand-in: nets added before boot are not modelled")
        if net.get("vhost_user") or "tap" in net:
            raise api_error(
                "vm.add-net", DEVICE_MANAGER, "stand-in: only TAPs passed as fds are modelled"
            )
        if len(fds) != 1:
            raise api_error("vm.add-net", DEVICE_MANAGER,
                            f"stand-in: a net needs exactly one TAP fd (got {len(fds)})")
        slot = self._free_slot("vm.add-net")
        mac = net.get("mac") or _local_mac()
        try:
            await self._qemu.add_net(NetSpec(net["id"], fds[0], mac, net.get("mtu", 1500)), slot)
        except VmmError as err:
            raise api_error("vm.add-net", DEVICE_MANAGER, "Cannot create virtio-net device",
                            str(err)) from None
        return self._plugged("net", dict(net, mac=mac), slot, "net")

    def _plugged(self, kind: str, device: dict[str, Any], slot: int, key: str) -> Reply:
        assert self.config is not None
        bdf = f"0000:00:{FIRST_HOTPLUG_DEVICE + slot:02x}.0"
        self._devices[device["id"]] = Device(kind, bdf, slot)
        self.config.setdefault(key, []).append(device)
        return Reply(200, {"id": device["id"], "bdf": bdf})

    async def _remove_device(self, body: Any, fds: list[int]) -> None:
        device_id = body.get("id", "")
        if self._qemu is None:
            if self.config is None:
                raise api_error("vm.remove-device", NOT_CREATED)
            if not _remove_from_config(self.config, device_id):
                raise api_error("vm.remove-device", f'No device with id "{device_id}" to remove')
            return
        device = self._devices.get(device_id)
        if device is None or device.removing:
            raise api_error(
                "vm.remove-device", DEVICE_MANAGER,
                f"Failed to find device corresponding to the given identifier: {device_id}",
            )
        if device.slot is None:
            raise api_error("vm.remove-device", DEVICE_MANAGER,
                            "stand-in: boot devices are on QEMU's root bus and cannot be unplugged")
        assert self.config is not None
        device.removing = True
        _remove_from_config(self.config, device_id)
        task = asyncio.create_task(self._unplug(self._qemu, device_id, device))
        self._unplugs.add(task)
        task.add_done_callback(self._unplugs.discard)

    async def _unplug(self, qemu: QemuVmm, device_id: str, device: Device) -> None:
        """The guest's eject, then CH's `device-removed` event (DeviceManager::eject_device)."""
        try:
            if device.kind == "disk":
                await qemu.remove_disk(device_id)
            else:
                await qemu.remove_net(device_id)
        except VmmError as err:
            log.error("unplug %s: %s", device_id, err)
            return
        self._devices.pop(device_id, None)
        self._events.emit("vm", "device-removed", {"id": device_id, "bdf": device.bdf})


def _parse_body(schema: str, raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError as err:
        raise ChError(400, ["Failed to deserialize JSON", str(err)]) from None
    problems = spec.errors(schema, body)
    if problems:
        detail = "; ".join(problems)
        why = f"{schema} ({spec.SPEC_VERSION}): {detail}"
        raise ChError(400, ["Failed to deserialize JSON", why])
    assert isinstance(body, dict)
    return body


_UNMODELLED = ("pmem", "devices", "user_devices", "vdpa", "generic-vhost-user", "net",
               "numa", "tpm", "pci_segments", "rate_limit_groups")


def _unsupported_config(config: dict[str, Any]) -> str:
    payload = config["payload"]
    for key in ("firmware", "igvm", "host_data"):
        if key in payload:
            return f"payload.{key}"
    if "kernel" not in payload:
        return "a payload without a kernel"
    for key in _UNMODELLED:
        if config.get(key):
            return key
    for disk in config.get("disks", []):
        if disk.get("vhost_user") or "path" not in disk:
            return "a vhost-user disk"
        if disk.get("image_type", "Raw") != "Raw":
            return f"image_type {disk['image_type']}"
    balloon = config.get("balloon")
    if balloon and (balloon.get("size") or balloon.get("deflate_on_oom")):
        return "a balloon that inflates (the stand-in models size 0, free page reporting)"
    if config.get("serial", {}).get("mode") == "Pty":
        return "serial mode Pty"
    if config.get("console", {}).get("mode", "Tty") not in ("Off", "Null", "Tty"):
        return f"console mode {config['console']['mode']}"
    return ""


def _validate(config: dict[str, Any]) -> str:
    """The parts of CH's VmConfig::validate a config of this shim could break."""
    cpus = config.get("cpus", {"boot_vcpus": 1, "max_vcpus": 1})
    if cpus["max_vcpus"] < cpus["boot_vcpus"]:
        return f"Max CPUs ({cpus['max_vcpus']}) lower than boot CPUs ({cpus['boot_vcpus']})"
    if cpus["max_vcpus"] > MAX_VCPUS:
        return f"Too many CPUs: specified {cpus['max_vcpus']} but {MAX_VCPUS} is the limit"
    seen: set[str] = set()
    for device_id in _config_ids(config, with_duplicates=True):
        if device_id.startswith("__"):
            return f"Identifier {device_id} is not invalid"
        if device_id in seen:
            return f"Identifier {device_id} is not unique"
        seen.add(device_id)
    for rule in config.get("landlock_rules", []):
        if not Path(rule["path"]).exists():
            return f"Path {json.dumps(rule['path'])} provided in landlock-rules does not exist"
    return ""


def _config_ids(config: dict[str, Any], *, with_duplicates: bool = False) -> list[str]:
    ids = [d["id"] for key in ("disks", "net") for d in config.get(key, []) if "id" in d]
    for single in ("vsock", "balloon"):
        if (config.get(single) or {}).get("id"):
            ids.append(config[single]["id"])
    return ids if with_duplicates else sorted(set(ids))


def _remove_from_config(config: dict[str, Any], device_id: str) -> bool:
    for key in ("disks", "net"):
        kept = [d for d in config.get(key, []) if d.get("id") != device_id]
        if len(kept) != len(config.get(key, [])):
            config[key] = kept
            return True
    return False


def _local_mac() -> str:
    octets = [random.randrange(256) for _ in range(6)]
    octets[0] = (octets[0] & 0xFC) | 0x02  # locally administered, unicast
    return ":".join(f"{o:02x}" for o in octets)

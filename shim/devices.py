"""Hot-plug slots and device ids of one VM, above its VMM backend.

Every disk and NIC plugged into a running VM takes a slot: a PCIe root port on
QEMU's q35, a place on Cloud Hypervisor's PCI bus. The device manager counts
them, hands one to each device, refuses a device id twice, and frees the slot
only once the VMM confirmed the removal, so the backends stay thin and cannot
disagree about what is plugged.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from shim.errors import AlreadyExists, NotFound, ResourceExhausted
from shim.vmm.base import DiskSpec, NetSpec, Vmm

log = logging.getLogger(__name__)

VIRTIO_BLK_SERIAL_MAX = 20  # VIRTIO_BLK_ID_BYTES: also the longest device id we make


def device_id(prefix: str, name: str) -> str:
    """A device id and virtio serial for `name`: stable, starts with a letter, and short
    (`prefix` of at most 5 letters and 15 hex digits fit the 20-byte serial)."""
    return prefix[:5] + hashlib.sha256(name.encode()).hexdigest()[:15]


@dataclass(frozen=True)
class Plugged:
    kind: str  # "disk" | "net"
    slot: int


class DeviceManager:
    """The devices hot-plugged into one VM and the slots they hold."""

    def __init__(self, vmm: Vmm, slots: int) -> None:
        self._vmm = vmm
        self._slots = slots
        self._plugged: dict[str, Plugged] = {}

    @property
    def plugged(self) -> dict[str, Plugged]:
        return dict(self._plugged)

    def _claim(self, device: str, kind: str) -> int:
        if device in self._plugged:
            raise AlreadyExists(f"device {device} is already plugged")
        used = {p.slot for p in self._plugged.values()}
        for slot in range(self._slots):
            if slot not in used:
                self._plugged[device] = Plugged(kind, slot)
                return slot
        raise ResourceExhausted(
            f"no free hot-plug slot for {device}: all {self._slots} are in use "
            "(raise the VMM's hotplug_slots in the config)"
        )

    async def add_disk(self, disk: DiskSpec) -> None:
        if len(disk.serial) > VIRTIO_BLK_SERIAL_MAX:
            raise ResourceExhausted(
                f"disk {disk.id}: serial {disk.serial!r} is longer than "
                f"{VIRTIO_BLK_SERIAL_MAX} bytes"
            )
        slot = self._claim(disk.id, "disk")
        try:
            await self._vmm.add_disk(disk, slot)
        except BaseException:
            del self._plugged[disk.id]
            raise
        log.debug("event=device_plugged kind=disk id=%s slot=%d", disk.id, slot)

    async def add_net(self, net: NetSpec) -> None:
        slot = self._claim(net.id, "net")
        try:
            await self._vmm.add_net(net, slot)
        except BaseException:
            del self._plugged[net.id]
            raise
        log.debug("event=device_plugged kind=net id=%s slot=%d", net.id, slot)

    async def remove(self, device: str) -> None:
        """Unplug `device`; its slot is free once the VMM confirmed the removal."""
        found = self._plugged.get(device)
        if found is None:
            raise NotFound(f"device {device} is not plugged")
        if found.kind == "disk":
            await self._vmm.remove_disk(device)
        else:
            await self._vmm.remove_net(device)
        del self._plugged[device]
        log.debug("event=device_unplugged kind=%s id=%s slot=%d", found.kind, device, found.slot)

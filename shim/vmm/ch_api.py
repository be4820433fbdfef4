"""Cloud Hypervisor's REST API as this shim speaks it: request bodies, error bodies, events.

Pure: no I/O, so every body can be checked without a VMM. tests/unit/test_ch_api.py
validates each one, with every field it can carry, against the official OpenAPI spec
(tests/chsim/cloud-hypervisor-v53.0.yaml) with unknown fields refused: Cloud
Hypervisor itself ignores a field it does not know, so a misspelt one would
otherwise be lost in silence.

What goes into `vm.create` (docs/cloud-hypervisor.md has the whole list): the kernel
and its command line with the serial port as console, boot and maximum vCPUs,
shared memory (virtio-fs and vhost-user devices map it), the guest's root disk
read-only with its serial and an explicit raw image type, the pod's virtio-fs device
when it has one, vsock on the pod's hybrid socket, an entropy source, the serial port
on a Unix socket the shim reads (the console stays off), and Landlock rules for the
pod's directories.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shim.vmm.base import DiskSpec, HostDir, NetSpec, VmSpec

MIB = 1 << 20
GUEST_CID = 3  # each VM has its own vsock device and socket: every guest can be CID 3
ROOTFS_ID = "rootfs"
ROOTFS_SERIAL = "cloudhv-rootfs"  # the guest finds its disks by serial
RNG_SOURCE = "/dev/urandom"
IMAGE_TYPE = "Raw"  # v52 deprecated guessing the image type from its content
CMDLINE_MAX = 0x10000  # x86_64 CMDLINE_MAX_SIZE in Cloud Hypervisor's arch crate
MAX_VCPUS = 8192  # MAX_SUPPORTED_CPUS on x86_64 (vmm/src/config.rs)


@dataclass(frozen=True)
class ChPaths:
    """The host paths one VM's Cloud Hypervisor uses, all inside the VM's state dir."""

    state_dir: Path

    @property
    def api_socket(self) -> Path:
        return self.state_dir / "api.sock"

    @property
    def vsock_socket(self) -> Path:
        return self.state_dir / "vsock.sock"

    @property
    def serial_socket(self) -> Path:
        return self.state_dir / "console.sock"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "ch.log"

    @property
    def sockets(self) -> tuple[Path, ...]:
        return (self.api_socket, self.vsock_socket, self.serial_socket)


def kernel_cmdline(kernel_args: str) -> str:
    """The serial port is the guest's console: the agent's ready line is read there."""
    return f"console=ttyS0 {kernel_args}".strip()


def landlock_rules(spec: VmSpec) -> list[dict[str, str]]:
    """Landlock rules beyond what Cloud Hypervisor adds for its own config (kernel, boot
    disks, sockets, rng): the VM's state dir, and the directories whose files are
    hot-plugged later. Landlock cannot be widened once applied (at vm.create), so
    a later disk is only reachable through a rule given here."""
    rules = [{"path": str(spec.state_dir), "access": "rw"}]
    rules += [_rule(d) for d in spec.host_dirs]
    return rules


def _rule(host_dir: HostDir) -> dict[str, str]:
    return {"path": str(host_dir.path), "access": "rw" if host_dir.writable else "r"}


def vm_config(
    spec: VmSpec, paths: ChPaths, *, landlock: bool, free_page_reporting: bool = False
) -> dict[str, Any]:
    """The body of PUT /vm.create."""
    body: dict[str, Any] = {
        "payload": {"kernel": str(spec.kernel), "cmdline": kernel_cmdline(spec.kernel_args)},
        "cpus": {"boot_vcpus": spec.vcpus, "max_vcpus": max(spec.vcpus, spec.max_vcpus)},
        # Not mergeable: a guest's memory never joins the node's same-page merging
        # (shim/samepage.py says why).
        "memory": {"size": spec.memory_mib * MIB, "shared": True, "mergeable": False},
        "disks": [
            {
                "path": str(spec.rootfs),
                "readonly": True,
                "serial": ROOTFS_SERIAL,
                "id": ROOTFS_ID,
                "image_type": IMAGE_TYPE,
            }
        ],
        "vsock": {"cid": GUEST_CID, "socket": str(paths.vsock_socket), "id": "vsock"},
        "rng": {"src": RNG_SOURCE},
        "serial": {"mode": "Socket", "socket": str(paths.serial_socket)},
        "console": {"mode": "Off"},
    }
    if spec.shared_fs is not None:
        # The pod's virtio-fs: virtiofsd already listens on the socket (shim/sharedfs.py).
        body["fs"] = [
            {
                "tag": spec.shared_fs.tag,
                "socket": str(spec.shared_fs.socket),
                "num_queues": 1,
                "queue_size": 1024,
                "id": "fs0",
            }
        ]
    if free_page_reporting:
        # A balloon that never inflates (size 0): the guest reports its free pages and
        # CH gives them back to the host (the guest kernel's PAGE_REPORTING).
        body["balloon"] = {"size": 0, "free_page_reporting": True, "id": "balloon0"}
    if landlock:
        body["landlock_enable"] = True
        body["landlock_rules"] = landlock_rules(spec)
    return body


def disk_config(disk: DiskSpec) -> dict[str, Any]:
    """The body of PUT /vm.add-disk."""
    return {
        "path": str(disk.path),
        "readonly": disk.read_only,
        "serial": disk.serial,
        "id": disk.id,
        "image_type": IMAGE_TYPE,
    }


def net_config(net: NetSpec) -> dict[str, Any]:
    """The body of PUT /vm.add-net. The TAP itself travels beside it, as the request's
    SCM_RIGHTS file descriptor: one fd, one queue pair (num_queues' default, 2).

    No `mtu`: for an fd-backed TAP, CH (v53, virtio-devices net.rs) sets the MTU with
    SIOCSIFMTU by the TAP's name on a socket of its own network namespace, and CH does
    not run in the pod's: the name would miss, or hit a host interface of that name.
    The TAP's MTU is set where it was made, the guest's by the agent."""
    return {"id": net.id, "mac": net.mac}


def remove_device(device_id: str) -> dict[str, Any]:
    """The body of PUT /vm.remove-device."""
    return {"id": device_id}


def resize(vcpus: int) -> dict[str, Any]:
    """The body of PUT /vm.resize: vCPUs only. (Memory would need `memory.hotplug_size`
    set at boot, which the shim does not reserve.)"""
    return {"desired_vcpus": vcpus}


def error_detail(body: bytes) -> str:
    """What a CH error body says: its error chain (a JSON array of strings, outermost
    first) joined as CH prints it, or the text as it came (older versions)."""
    text = body.decode(errors="replace").strip()
    try:
        chain = json.loads(text)
    except ValueError:
        return text
    if isinstance(chain, list) and all(isinstance(item, str) for item in chain):
        return ": ".join(chain)
    return text


def vm_state(body: bytes) -> str:
    """The `state` of a GET /vm.info response (Created, Running, Shutdown, Paused)."""
    info = json.loads(body)
    state = info.get("state") if isinstance(info, dict) else None
    if not isinstance(state, str):
        raise ValueError(f"vm.info without a state: {body[:200]!r}")
    return state


@dataclass(frozen=True)
class Event:
    """One event-monitor record: {timestamp: {secs, nanos}, source, event, properties}."""

    source: str
    event: str
    properties: Mapping[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.source}.{self.event}"


# The VM is gone (or its guest restarted without the agent) when one of these arrives.
VM_ENDED = frozenset({"vm.shutdown", "vm.deleted", "vm.rebooting", "vmm.shutdown", "guest.panic"})


class EventParser:
    """Cuts the event monitor's byte stream into events.

    CH writes each event as pretty-printed JSON followed by a blank line; a read
    may end anywhere inside one. At most `limit` bytes of an unfinished event are
    kept: a stream that never closes its JSON cannot grow the buffer without end.
    """

    def __init__(self, limit: int = 1 << 20) -> None:
        self._buffer = ""
        self._limit = limit
        # A read may also end inside a UTF-8 sequence.
        self._text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._decoder = json.JSONDecoder()

    def feed(self, data: bytes) -> list[Event]:
        self._buffer += self._text.decode(data)
        events: list[Event] = []
        while True:
            text = self._buffer.lstrip()
            if not text:
                self._buffer = ""
                break
            try:
                value, end = self._decoder.raw_decode(text)
            except ValueError:
                self._buffer = text
                if len(self._buffer) > self._limit:
                    raise ValueError(
                        f"event monitor: {len(self._buffer)} bytes without a whole JSON event"
                    ) from None
                break
            self._buffer = text[end:]
            event = _event(value)
            if event is not None:
                events.append(event)
        return events


def _event(value: object) -> Event | None:
    if not isinstance(value, dict):
        return None
    source, event = value.get("source"), value.get("event")
    if not isinstance(source, str) or not isinstance(event, str):
        return None
    props = value.get("properties")
    properties = {str(k): str(v) for k, v in props.items()} if isinstance(props, dict) else {}
    return Event(source, event, properties)

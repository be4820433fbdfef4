"""Every request body the Cloud Hypervisor backend builds, with every field it ever sets,
against the official v53.0 OpenAPI spec, checked by openapi-schema-validator itself (no
stand-in in between); and bodies that are wrong in each way the validator must catch."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shim import config as config_mod
from shim.vmm import ch_api
from shim.vmm.base import DiskSpec, HostDir, NetSpec, SharedFsSpec, VmSpec
from shim.vmm.cloud_hypervisor import ChOptions, CloudHypervisorVmm
from tests.chsim import spec
from tests.chsim.main import parse_args

STATE = Path("/run/cloudhv/k8s.io-abc/vm")


def vm_spec(**changes: Any) -> VmSpec:
    values: dict[str, Any] = {
        "state_dir": STATE,
        "kernel": Path("/usr/share/cloudhv/vmlinux"),
        "rootfs": Path("/usr/share/cloudhv/rootfs.ext4"),
        "kernel_args": "root=/dev/vda ro init=/init panic=-1 quiet",
        "vcpus": 1,
        "max_vcpus": 2,
        "memory_mib": 256,
        "host_dirs": (
            HostDir(Path("/var/lib/cloudhv/disks/abc"), writable=True),
            HostDir(Path("/var/cache/cloudhv/rootfs"), writable=False),
        ),
    }
    values.update(changes)
    return VmSpec(**values)


def every_vm_config() -> list[dict[str, Any]]:
    """vm.create bodies over every choice the backend makes."""
    paths = ch_api.ChPaths(STATE)
    bodies = []
    shared = SharedFsSpec(socket=Path("/run/cloudhv/pod/fs/virtiofsd.sock"), tag="cloudhv")
    for landlock, (vcpus, max_vcpus), host_dirs, shared_fs, reporting in itertools.product(
        (True, False),
        ((1, 1), (2, 4), (3, 1)),
        ((), vm_spec().host_dirs),
        (None, shared),
        (True, False),
    ):
        spec_ = vm_spec(
            vcpus=vcpus, max_vcpus=max_vcpus, host_dirs=host_dirs, shared_fs=shared_fs
        )
        bodies.append(
            ch_api.vm_config(spec_, paths, landlock=landlock, free_page_reporting=reporting)
        )
    return bodies


def every_request() -> list[tuple[str, dict[str, Any]]]:
    """(schema, body) for every body the backend sends."""
    requests = [("VmConfig", body) for body in every_vm_config()]
    for read_only in (False, True):
        disk = DiskSpec("ctr0123456789abcde", Path("/var/lib/cloudhv/disks/abc/c.ext4"),
                        serial="ctr0123456789abcde", read_only=read_only)
        requests.append(("DiskConfig", ch_api.disk_config(disk)))
    requests.append(("NetConfig", ch_api.net_config(NetSpec("net0", 7, "0a:58:0a:58:00:05", 1450))))
    requests.append(("VmRemoveDevice", ch_api.remove_device("ctr0123456789abcde")))
    requests.append(("VmResize", ch_api.resize(2)))
    return requests


@pytest.mark.parametrize(("schema", "body"), every_request())
def test_every_body_the_backend_sends_validates_against_the_spec(
    schema: str, body: dict[str, Any]
) -> None:
    assert spec.errors(schema, body) == []


def _field_paths(value: object, prefix: str = "") -> set[str]:
    if isinstance(value, dict):
        found = set()
        for key, item in value.items():
            found.add(f"{prefix}{key}")
            found |= _field_paths(item, f"{prefix}{key}.")
        return found
    if isinstance(value, list):
        return set().union(*(_field_paths(item, f"{prefix}[].") for item in value))
    return set()


def test_the_bodies_carry_every_field_the_backend_ever_sets() -> None:
    """The list in docs/cloud-hypervisor.md: a field added to a builder shows up here (and
    is then validated above), a field dropped does too."""
    sent = set().union(*(_field_paths(body) for _, body in every_request()))
    assert sent == {
        "payload", "payload.kernel", "payload.cmdline",
        "cpus", "cpus.boot_vcpus", "cpus.max_vcpus",
        "memory", "memory.size", "memory.shared", "memory.mergeable",
        "balloon", "balloon.size", "balloon.free_page_reporting", "balloon.id",
        "disks", "disks.[].path", "disks.[].readonly", "disks.[].serial", "disks.[].id",
        "disks.[].image_type",
        "fs", "fs.[].tag", "fs.[].socket", "fs.[].num_queues", "fs.[].queue_size", "fs.[].id",
        "vsock", "vsock.cid", "vsock.socket", "vsock.id",
        "rng", "rng.src",
        "serial", "serial.mode", "serial.socket",
        "console", "console.mode",
        "landlock_enable", "landlock_rules", "landlock_rules.[].path",
        "landlock_rules.[].access",
        # vm.add-disk, vm.add-net, vm.remove-device, vm.resize
        "path", "readonly", "id", "image_type", "mac", "desired_vcpus",
    }


def test_vm_config_carries_the_pods_virtio_fs_device() -> None:
    socket = Path("/run/cloudhv/pod/fs/virtiofsd.sock")
    spec_ = vm_spec(shared_fs=SharedFsSpec(socket=socket, tag="cloudhv"))
    body = ch_api.vm_config(spec_, ch_api.ChPaths(STATE), landlock=True)
    assert body["fs"] == [
        {"tag": "cloudhv", "socket": str(socket), "num_queues": 1, "queue_size": 1024, "id": "fs0"}
    ]
    assert body["memory"]["shared"] is True  # vhost-user maps guest memory
    assert "fs" not in ch_api.vm_config(vm_spec(), ch_api.ChPaths(STATE), landlock=True)


def test_vm_config_says_what_the_guest_needs() -> None:
    body = ch_api.vm_config(vm_spec(vcpus=2, max_vcpus=1), ch_api.ChPaths(STATE), landlock=True)
    assert body["cpus"] == {"boot_vcpus": 2, "max_vcpus": 2}  # never below boot
    assert body["memory"] == {"size": 256 << 20, "shared": True, "mergeable": False}
    assert body["payload"]["cmdline"].startswith("console=ttyS0 root=/dev/vda")
    assert body["disks"][0]["readonly"] is True
    assert body["console"] == {"mode": "Off"}
    assert body["serial"] == {"mode": "Socket", "socket": str(STATE / "console.sock")}
    assert body["vsock"]["socket"] == str(STATE / "vsock.sock")
    assert body["landlock_rules"] == [
        {"path": str(STATE), "access": "rw"},
        {"path": "/var/lib/cloudhv/disks/abc", "access": "rw"},
        {"path": "/var/cache/cloudhv/rootfs", "access": "r"},
    ]
    unconfined = ch_api.vm_config(vm_spec(), ch_api.ChPaths(STATE), landlock=False)
    assert "landlock_enable" not in unconfined and "landlock_rules" not in unconfined


@pytest.mark.parametrize(
    ("schema", "body", "why"),
    [
        # A misspelt field: CH and the plain spec would both ignore it.
        ("DiskConfig", {"path": "/d", "read_only": True}, "'read_only' was unexpected"),
        ("DiskConfig", {"path": "/d", "image_type": "raw"}, "'raw' is not one of"),
        ("DiskConfig", {"path": "/d", "readonly": "yes"}, "'yes' is not of type 'boolean'"),
        ("DiskConfig", {"path": "/d", "pci_device_id": 256}, "256 is not a 'uint8'"),
        ("VmConfig", {"cpus": {"boot_vcpus": 1, "max_vcpus": 1}}, "'payload' is a required"),
        ("VmConfig", {"payload": {}, "cpus": {"boot_vcpus": 0, "max_vcpus": 1}},
         "0 is less than the minimum of 1"),
        ("VmConfig", {"payload": {}, "serial": {"mode": "Unix"}}, "'Unix' is not one of"),
        ("VmConfig", {"payload": {}, "vsock": {"cid": 2, "socket": "/v"}},
         "2 is less than the minimum of 3"),
        ("VmConfig", {"payload": {}, "memory": {"size": 1 << 64}}, "is not a 'int64'"),
        ("NetConfig", {"mac": "0a:58:0a:58:00:05", "fds": [3]}, "'fds' was unexpected"),
        ("VmRemoveDevice", {"id": 3}, "3 is not of type 'string'"),
        ("VmResize", {"desired_vcpus": 0}, "0 is less than the minimum of 1"),
    ],
)
def test_a_wrong_body_is_rejected(schema: str, body: dict[str, Any], why: str) -> None:
    found = spec.errors(schema, body)
    assert any(why in line for line in found), found


def test_a_wrong_field_in_a_built_body_is_caught() -> None:
    """The validation test above can fail: break one built body and it does."""
    body = ch_api.vm_config(vm_spec(), ch_api.ChPaths(STATE), landlock=True)
    body["disks"][0]["image_type"] = "RAW"
    body["landlock_rules"][0]["mode"] = "rw"
    found = spec.errors("VmConfig", body)
    assert len(found) == 2, found


def test_strictness_is_ours_not_the_specs() -> None:
    """Unknown fields pass the spec as written (CH ignores them too): the strict check
    is what catches a misspelt field."""
    body = {"path": "/d", "read_only": True}
    assert spec.errors("DiskConfig", body, strict=False) == []
    assert spec.errors("DiskConfig", body) != []


def test_the_spec_is_the_official_one() -> None:
    loaded = spec.spec()
    assert loaded["openapi"] == "3.0.1"
    assert {"/vm.create", "/vm.add-disk", "/vm.add-net", "/vm.remove-device", "/vm.resize",
            "/vm.info", "/vmm.ping", "/vm.boot", "/vm.shutdown", "/vmm.shutdown"} <= set(
        loaded["paths"]
    )
    assert spec.request_schema("vm.add-net") == "NetConfig"
    assert spec.request_schema("vm.boot") is None


def test_the_command_line_is_cloud_hypervisors() -> None:
    vmm = CloudHypervisorVmm(vm_spec(), ChOptions(binary=Path("/usr/bin/cloud-hypervisor")))
    argv = vmm.command(5)
    assert argv[:3] == ["/usr/bin/cloud-hypervisor", "--api-socket", f"path={STATE}/api.sock"]
    assert argv[argv.index("--event-monitor") + 1] == "fd=5"
    assert argv[argv.index("--seccomp") + 1] == "true"  # CH's seccomp filters stay on
    assert "--landlock" in argv
    parsed = parse_args(argv[1:])  # the stand-in takes exactly CH's flags
    assert parsed.options["--log-file"] == [str(STATE / "ch.log")]
    off = CloudHypervisorVmm(vm_spec(), ChOptions(binary=Path("/ch"), landlock=False))
    assert "--landlock" not in off.command(5)


def test_error_bodies_are_read_as_chains() -> None:
    chain = ["Error from API", "The VM could not boot", "VM is already created"]
    assert ch_api.error_detail(json.dumps(chain).encode()) == (
        "Error from API: The VM could not boot: VM is already created"
    )
    assert ch_api.error_detail(b"plain words\n") == "plain words"
    assert ch_api.error_detail(b'{"a": 1}') == '{"a": 1}'
    assert ch_api.error_detail(b"") == ""


def test_events_are_parsed_across_reads() -> None:
    records = [
        {"timestamp": {"secs": 0, "nanos": 5}, "source": "vmm", "event": "starting",
         "properties": None},
        {"timestamp": {"secs": 1, "nanos": 2}, "source": "vm", "event": "device-removed",
         "properties": {"id": "disk\u00e9", "bdf": "0000:00:08.0"}},
    ]
    stream = b"".join(json.dumps(r, indent=2).encode() + b"\n\n" for r in records)
    for cut in range(1, len(stream)):  # every split point, inside UTF-8 sequences too
        parser = ch_api.EventParser()
        events = parser.feed(stream[:cut]) + parser.feed(stream[cut:])
        assert [e.name for e in events] == ["vmm.starting", "vm.device-removed"]
        assert events[1].properties == {"id": "disk\u00e9", "bdf": "0000:00:08.0"}


def test_an_endless_event_is_refused() -> None:
    parser = ch_api.EventParser(limit=100)
    parser.feed(b'{"source": "vm", "event": "x", "properties": {"a": "')
    with pytest.raises(ValueError, match="without a whole JSON event"):
        parser.feed(b"b" * 200)


def test_vm_state_is_read_from_vm_info() -> None:
    assert ch_api.vm_state(b'{"config": {}, "state": "Running"}') == "Running"
    with pytest.raises(ValueError):
        ch_api.vm_state(b'{"config": {}}')


def test_the_backend_stays_light_in_the_daemon() -> None:
    """One daemon runs per pod: the CH backend brings no HTTP library (requests would
    cost ~7 MiB PSS each, bench/ch_http_memory.py), no QMP client, no validator."""
    repo = Path(__file__).resolve().parents[2]
    code = (
        f"import sys; sys.path.insert(0, {str(repo)!r}); import shim.daemon; "
        "import shim.vmm.cloud_hypervisor; print(' '.join(sorted(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-sE", "-c", code], capture_output=True, text=True, check=True
    )
    loaded = set(out.stdout.split())
    heavy = {"requests", "urllib3", "http.client", "email", "pydantic", "yaml", "jsonschema",
             "qemu", "qemu.qmp", "openapi_schema_validator"}
    assert sorted(heavy & loaded) == []


def test_the_reporting_balloon_only_when_asked() -> None:
    plain = ch_api.vm_config(vm_spec(), ch_api.ChPaths(STATE), landlock=True)
    assert "balloon" not in plain
    asked = ch_api.vm_config(
        vm_spec(), ch_api.ChPaths(STATE), landlock=True, free_page_reporting=True
    )
    # Size 0: it never takes memory from the guest, it only reports free pages.
    assert asked["balloon"] == {"size": 0, "free_page_reporting": True, "id": "balloon0"}
    assert config_mod.CloudHypervisorConfig().free_page_reporting

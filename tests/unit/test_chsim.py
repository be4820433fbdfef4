"""The Cloud Hypervisor stand-in's command line, API states and error bodies, before any
VM boots (no QEMU needed): the real executable, driven through the shim's own client.

Each expectation is what CH v53's code answers (vmm/src/api/http, vmm/src/lib.rs):
404 for a VM that is not created, 500 for other wrong-state calls, 400 with CH's
shapes for bad requests, and a removed device refused.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from shim.vmm import ch_api
from shim.vmm.ch_http import ApiError, ChHttp

STANDIN = Path(__file__).resolve().parents[1] / "chsim" / "cloud-hypervisor"


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    api: ChHttp
    socket: Path
    events_fd: int

    def call(self, method: str, endpoint: str, body: Any = None) -> tuple[int, Any]:
        """(status, parsed JSON body or None)."""
        try:
            response = asyncio.run(self.api.call(method, endpoint, body))
        except ApiError as err:
            return err.status, json.loads(err.body) if err.body else None
        return response.status, response.json() if response.body else None

    def events(self) -> list[str]:
        os.set_blocking(self.events_fd, False)
        data = b""
        while True:
            try:
                chunk = os.read(self.events_fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            data += chunk
        return [e.name for e in ch_api.EventParser().feed(data)]


@pytest.fixture
def standin(tmp_path: Path) -> Iterator[Running]:
    read_fd, write_fd = os.pipe()
    sock = tmp_path / "api.sock"
    sock.touch()  # a stale file where the socket goes is replaced
    proc = subprocess.Popen(
        [str(STANDIN), "--api-socket", f"path={sock}", "--event-monitor", f"fd={write_fd}",
         "--log-file", str(tmp_path / "ch.log"), "--seccomp", "true"],
        pass_fds=(write_fd,),
    )
    os.close(write_fd)
    running = Running(proc, ChHttp(sock), sock, read_fd)
    deadline = time.monotonic() + 30
    while True:
        try:
            if running.call("GET", "vmm.ping")[0] == 200:
                break
        except Exception:  # not listening yet
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    try:
        yield running
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        os.close(read_fd)


def vm_config(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    kernel = tmp_path / "vmlinux"
    kernel.touch()
    config: dict[str, Any] = {
        "payload": {"kernel": str(kernel), "cmdline": "console=ttyS0"},
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 128 << 20},
    }
    config.update(changes)
    return config


def chain(*causes: str) -> list[str]:
    return ["Error from API", *causes]


def test_before_create_a_vm_is_404_and_other_states_500(standin: Running) -> None:
    ping = standin.call("GET", "vmm.ping")
    assert ping[0] == 200 and ping[1]["version"] and ping[1]["pid"] == standin.proc.pid
    assert standin.call("GET", "vm.info") == (
        404, chain("The VM info is not available", "VM is not created"))
    assert standin.call("PUT", "vm.boot") == (
        404, chain("The VM could not boot", "VM config is missing"))
    assert standin.call("PUT", "vm.add-disk", {"path": "/d"}) == (
        404, chain("The disk could not be added to the VM", "VM is not created"))
    assert standin.call("PUT", "vm.remove-device", {"id": "x"}) == (
        404, chain("The device could not be removed from the VM", "VM is not created"))
    assert standin.call("PUT", "vm.resize", {"desired_vcpus": 2}) == (
        404, chain("The VM could not be resized", "VM is not created"))
    assert standin.call("PUT", "vm.reboot") == (
        404, chain("The VM could not reboot", "VM is not created"))
    # vm.shutdown asks for a running VM, not a created one: CH answers 500 here.
    assert standin.call("PUT", "vm.shutdown") == (
        500, chain("The VM could not shutdown", "VM is not running"))
    assert standin.call("PUT", "vm.delete") == (204, None)  # nothing to delete is fine


def test_bad_requests_get_chs_answers(standin: Running, tmp_path: Path) -> None:
    assert standin.call("GET", "vm.nonsense") == (404, ["Not Found"])
    assert standin.call("GET", "vm.create") == (400, ["Bad Request"])
    assert standin.call("PUT", "vmm.ping") == (400, ["Bad Request"])
    assert standin.call("PUT", "vm.boot", {"now": True}) == (400, ["Bad Request"])
    assert standin.call("PUT", "vm.add-disk") == (400, ["Bad Request"])
    assert standin.call("PUT", "vm.create") == (400, None)  # CH's VmCreate: no body at all
    assert _raw(standin.socket, b"POST /api/v1/vm.boot HTTP/1.1\r\n\r\n").startswith(
        b"HTTP/1.1 400"
    )
    assert _raw(standin.socket, b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 3\r\n\r\n{x}"
                ).split(b"\r\n\r\n", 1)[1].startswith(b'["Failed to deserialize JSON", ')
    status, body = standin.call(
        "PUT", "vm.create", vm_config(tmp_path, disks=[{"path": "/d", "image_type": "raw"}])
    )
    assert status == 400 and body[0] == "Failed to deserialize JSON"
    assert "disks/0/image_type: 'raw' is not one of" in body[1] and "v53.0" in body[1]
    status, body = standin.call("PUT", "vm.create", vm_config(tmp_path, kernel="/k"))
    assert (status, body[0]) == (400, "Failed to deserialize JSON")
    assert "'kernel' was unexpected" in body[1]  # a field the spec does not list
    assert standin.call("GET", "vm.info")[0] == 404  # nothing was created


def test_created_vm_states_and_cold_devices(standin: Running, tmp_path: Path) -> None:
    config = vm_config(tmp_path)
    assert standin.call("PUT", "vm.create", config) == (204, None)
    assert standin.call("PUT", "vm.create", config) == (
        500, chain("The VM could not be created", "VM is already created"))
    status, info = standin.call("GET", "vm.info")
    assert (status, info["state"]) == (200, "Created")
    assert info["config"]["payload"] == config["payload"]
    disk = {"path": str(tmp_path / "d.img"), "id": "d1", "image_type": "Raw"}
    assert standin.call("PUT", "vm.add-disk", disk) == (204, None)  # cold: into the config
    assert standin.call("PUT", "vm.add-disk", disk) == (500, chain(
        "The disk could not be added to the VM", "Failed to validate config",
        "Identifier d1 is not unique"))
    assert [d["id"] for d in standin.call("GET", "vm.info")[1]["config"]["disks"]] == ["d1"]
    assert standin.call("PUT", "vm.remove-device", {"id": "d1"}) == (204, None)
    assert standin.call("PUT", "vm.remove-device", {"id": "d1"}) == (500, chain(
        "The device could not be removed from the VM", 'No device with id "d1" to remove'))
    assert standin.call("PUT", "vm.resize", {"desired_vcpus": 1}) == (204, None)
    assert standin.call("PUT", "vm.delete") == (204, None)
    assert standin.call("GET", "vm.info")[0] == 404


def test_boot_refuses_a_config_ch_would_refuse(standin: Running, tmp_path: Path) -> None:
    config = vm_config(tmp_path, cpus={"boot_vcpus": 2, "max_vcpus": 1})
    assert standin.call("PUT", "vm.create", config) == (204, None)
    assert standin.call("PUT", "vm.boot") == (500, chain(
        "The VM could not boot", "Failed to validate config",
        "Max CPUs (1) lower than boot CPUs (2)"))


def test_vmm_shutdown_ends_the_process_with_chs_events(standin: Running, tmp_path: Path) -> None:
    assert standin.call("PUT", "vm.create", vm_config(tmp_path)) == (204, None)
    assert standin.call("PUT", "vmm.shutdown") == (200, None)
    assert standin.proc.wait(10) == 0
    assert standin.events() == ["vmm.starting", "vm.deleted", "vmm.shutdown"]
    assert not standin.socket.exists()


def test_sigterm_shuts_the_vmm_down(standin: Running) -> None:
    standin.proc.send_signal(signal.SIGTERM)
    assert standin.proc.wait(10) == 0
    assert standin.events() == ["vmm.starting", "vmm.shutdown"]


def test_the_command_line_is_checked_as_chs(tmp_path: Path) -> None:
    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(STANDIN), *argv], capture_output=True, text=True, timeout=30)

    assert run("-V").stdout.startswith("cloud-hypervisor v53.0")
    bogus = run("--api-socket", f"path={tmp_path}/a.sock", "--bogus")
    assert bogus.returncode == 2 and "unexpected argument '--bogus'" in bogus.stderr
    seccomp = run("--api-socket", f"path={tmp_path}/a.sock", "--seccomp", "maybe")
    assert seccomp.returncode == 2 and "possible values: true, false, log, errno" in seccomp.stderr
    monitor = run("--api-socket", f"{tmp_path}/a.sock", "--event-monitor", "/x")
    assert monitor.returncode == 1 and "Error parsing --event-monitor" in monitor.stderr


def _raw(path: Path, request: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(body) < length:
            body += sock.recv(65536)
        return head + b"\r\n\r\n" + body

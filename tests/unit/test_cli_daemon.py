"""`start` → detached daemon → Connect/Shutdown over ttrpc; SIGKILL + `delete` cleans up.

Real processes, real sockets (under /run/containerd/s, so root). No VM is booted:
the daemon serves before any Create.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from shim._pb.containerd.task.v2 import shim_pb2
from shim.cli import socket_path
from shim.errors import NotFound, Unimplemented
from shim.ttrpc import Client

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the socket root /run/containerd/s needs root"
)


def _shim(
    bundle: Path, *argv: str, env: dict[str, str], stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [
            sys.executable,
            "-sE",
            "-c",
            f"import sys; sys.path.insert(0, {str(REPO)!r}); "
            "from shim.cli import main; sys.exit(main())",
            *argv,
        ],
        cwd=bundle,
        env=env,
        input=stdin,
        capture_output=True,
        timeout=60,
    )


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, dict[str, str], list[str]]:
    state_dir = tmp_path / "state"
    cfg = tmp_path / "config.json"
    cfg.write_text(
        json.dumps(
            {
                "vmm": "qemu",
                "kernel_path": "/nonexistent/vmlinux",
                "rootfs_path": "/nonexistent/rootfs",
                "kernel_args": "quiet",
                "state_dir": str(state_dir),
                "disk_dir": str(tmp_path / "disks"),
            }
        )
    )
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"ociVersion": "1.0.2", "annotations": {}}))
    os.mkfifo(bundle / "log")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CLOUDHV_CONFIG": str(cfg)}
    task_id = f"t{uuid.uuid4().hex[:12]}"
    flags = [
        "-namespace",
        "testns",
        "-address",
        str(tmp_path / "containerd.sock"),
        "-publish-binary",
        "/bin/true",
        "-id",
        task_id,
    ]
    return bundle, env, flags


async def _call(address: str, method: str, req: object, resp_cls: type) -> object:
    client = await Client.connect_unix(address.removeprefix("unix://"))
    try:
        payload = await client.call(
            "containerd.task.v2.Task", method, req.SerializeToString(), timeout=5
        )  # type: ignore[attr-defined]
    finally:
        await client.close()
    resp = resp_cls()
    resp.ParseFromString(payload)
    return resp


def _pid_of(address: str) -> int:
    resp = asyncio.run(
        _call(address, "Connect", shim_pb2.ConnectRequest(), shim_pb2.ConnectResponse)
    )
    return int(resp.shim_pid)  # type: ignore[attr-defined]


def test_start_connect_shutdown(setup: tuple[Path, dict[str, str], list[str]]) -> None:
    bundle, env, flags = setup
    t0 = time.monotonic()
    out = _shim(bundle, *flags, "start", env=env)
    elapsed = time.monotonic() - t0
    assert out.returncode == 0, out.stderr
    address = out.stdout.decode()
    assert address.startswith("unix:///run/containerd/s/") and "\n" not in address
    assert (bundle / "address").read_text() == address
    assert elapsed < 10
    pid = _pid_of(address)
    # A second start for the same group finds the live daemon.
    again = _shim(bundle, *flags, "start", env=env)
    assert again.stdout.decode() == address
    assert _pid_of(address) == pid
    # Unknown task → NotFound; no containers → Shutdown makes the daemon exit.
    with pytest.raises(NotFound, match="container nope not found"):
        asyncio.run(
            _call(address, "State", shim_pb2.StateRequest(id="nope"), shim_pb2.StateResponse)
        )
    for method, req in (
        ("Kill", shim_pb2.KillRequest(id="nope", signal=9)),
        ("Delete", shim_pb2.DeleteRequest(id="nope")),
        ("Wait", shim_pb2.WaitRequest(id="nope")),
    ):
        with pytest.raises(NotFound):
            asyncio.run(_call(address, method, req, shim_pb2.StateResponse))
    with pytest.raises(Unimplemented):
        checkpoint = shim_pb2.CheckpointTaskRequest(id="x")
        asyncio.run(_call(address, "Checkpoint", checkpoint, shim_pb2.PidsRequest))
    with pytest.raises(Unimplemented):
        asyncio.run(_call(address, "Bogus", shim_pb2.PidsRequest(), shim_pb2.PidsRequest))
    asyncio.run(
        _call(address, "Shutdown", shim_pb2.ShutdownRequest(id="x"), shim_pb2.ShutdownRequest)
    )
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}")
    assert not Path(address.removeprefix("unix://")).exists()
    deleted = _shim(bundle, *flags, "-bundle", str(bundle), "delete", env=env)
    assert deleted.returncode == 0, deleted.stderr
    resp = shim_pb2.DeleteResponse()
    resp.ParseFromString(deleted.stdout)
    assert resp.exit_status == 137 and resp.exited_at.seconds > 0


def _bootstrap_params(task_id: str, namespace: str, config_path: str, socket_dir: str) -> bytes:
    """BootstrapParams as containerd 2.3's pkg/shim Command writes them on start's stdin,
    assembled field by field (api/runtime/bootstrap/v1 numbers): instance_id=1,
    namespace=2, log_level=3 (DEBUG = -4, a 10-byte varint), containerd_version=4,
    ttrpc=5, grpc=6, binary=7, extensions=8 {Any value=1 of runtimeoptions.v1.Options
    {config_path=2}}, socket_dir=9."""

    def field(number: int, value: bytes) -> bytes:
        assert len(value) < 128
        return bytes([number << 3 | 2, len(value)]) + value

    options = field(2, config_path.encode())
    any_ = field(1, b"containerd.runtimeoptions.v1.Options") + field(2, options)
    return b"".join(
        [
            field(1, task_id.encode()),
            field(2, namespace.encode()),
            bytes([3 << 3]) + b"\xfc\xff\xff\xff\xff\xff\xff\xff\xff\x01",
            field(4, b"2.3.4"),
            field(5, b"unix:///run/containerd/containerd.sock.ttrpc"),
            field(6, b"unix:///run/containerd/containerd.sock"),
            field(7, b"/usr/bin/containerd"),
            field(8, field(1, any_)),
            field(9, socket_dir.encode()),
        ]
    )


def test_containerd_2_3_bootstrap_protocol(
    setup: tuple[Path, dict[str, str], list[str]], tmp_path: Path
) -> None:
    """containerd 2.3 writes BootstrapParams and reads a BootstrapResult; the runtime
    option inside is honoured, and so is the socket dir."""
    from shim._pb.containerd.runtime.bootstrap.v1 import bootstrap_pb2

    bundle, env, flags = setup
    task_id = flags[flags.index("-id") + 1]
    socket_dir = Path(tempfile.mkdtemp(prefix="chv-s", dir="/run"))
    try:
        env = {k: v for k, v in env.items() if k != "CLOUDHV_CONFIG"}
        stdin = _bootstrap_params(task_id, "testns", str(tmp_path / "config.json"), str(socket_dir))
        out = _shim(bundle, *flags, "start", env=env, stdin=stdin)
        assert out.returncode == 0, out.stderr
        result = bootstrap_pb2.BootstrapResult()
        result.ParseFromString(out.stdout)
        assert (result.version, result.protocol) == (2, "ttrpc")
        assert result.address.startswith(f"unix://{socket_dir}/")
        pid = _pid_of(result.address)
        shutdown = shim_pb2.ShutdownRequest(id="x")
        asyncio.run(_call(result.address, "Shutdown", shutdown, shim_pb2.PidsRequest))
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)


def test_sigkill_then_delete_leaves_nothing(
    setup: tuple[Path, dict[str, str], list[str]], tmp_path: Path
) -> None:
    bundle, env, flags = setup
    out = _shim(bundle, *flags, "start", env=env)
    assert out.returncode == 0, out.stderr
    address = out.stdout.decode()
    pid = _pid_of(address)
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    assert any((tmp_path / "state").iterdir())
    deleted = _shim(bundle, *flags, "-bundle", str(bundle), "delete", env=env)
    assert deleted.returncode == 0, deleted.stderr
    assert not Path(address.removeprefix("unix://")).exists()
    assert list((tmp_path / "state").iterdir()) == []
    again = _shim(bundle, *flags, "-bundle", str(bundle), "delete", env=env)
    assert again.returncode == 0


def test_delete_cleans_up_after_the_config_broke(
    setup: tuple[Path, dict[str, str], list[str]], tmp_path: Path
) -> None:
    """What crash cleanup needs is in the bundle: an edited config cannot stop it."""
    bundle, env, flags = setup
    out = _shim(bundle, *flags, "start", env=env)
    assert out.returncode == 0, out.stderr
    os.kill(_pid_of(out.stdout.decode()), signal.SIGKILL)
    time.sleep(0.2)
    (tmp_path / "config.json").write_text('{"vmm": "vbox"')
    deleted = _shim(bundle, *flags, "-bundle", str(bundle), "delete", env=env)
    assert deleted.returncode == 0, deleted.stderr
    assert list((tmp_path / "state").iterdir()) == []


def test_delete_of_a_traversal_id_is_a_warning(
    setup: tuple[Path, dict[str, str], list[str]], tmp_path: Path
) -> None:
    bundle, env, flags = setup
    annotations = {
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.sandbox-id": "../../etc",
    }
    (bundle / "config.json").write_text(json.dumps({"annotations": annotations}))
    deleted = _shim(bundle, *flags, "-bundle", str(bundle), "delete", env=env)
    assert deleted.returncode == 0
    assert b"Traceback" not in deleted.stderr
    assert b"'../../etc' is not a valid id" in deleted.stderr
    started = _shim(bundle, *flags, "start", env=env)
    assert started.returncode == 1 and b"'../../etc' is not a valid id" in started.stderr


def test_bad_config_fails_start_clearly(
    setup: tuple[Path, dict[str, str], list[str]], tmp_path: Path
) -> None:
    bundle, env, flags = setup
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"vmm": "vbox"}))
    out = _shim(bundle, *flags, "start", env={**env, "CLOUDHV_CONFIG": str(bad)})
    assert out.returncode == 1
    assert out.stderr.decode().startswith(
        f"containerd-shim-cloudhv-v1 start: config {bad}: "
        "vmm: must be one of 'qemu' or 'cloud-hypervisor' (got 'vbox'); "
        "kernel_path: required but missing;"
    )
    assert out.stdout == b""
    # `start` validated the config itself: the daemon it spawned is gone, and so is
    # the pod's socket.
    flag_values = dict(zip(flags[::2], flags[1::2], strict=True))
    sock = socket_path(flag_values["-address"], flag_values["-namespace"], flag_values["-id"])
    assert not sock.exists()
    assert not [
        pid for pid in os.listdir("/proc") if pid.isdigit() and _cmdline_has(pid, str(sock))
    ]


def test_cloud_hypervisor_config_is_checked_before_any_vm_starts(
    setup: tuple[Path, dict[str, str], list[str]], tmp_path: Path
) -> None:
    """A missing binary or kernel fails `start` naming the field: no daemon, no VM."""
    bundle, env, flags = setup
    bad = tmp_path / "ch.json"
    state_dir = tmp_path / "ch-state"
    bad.write_text(json.dumps({
        "vmm": "cloud-hypervisor",
        "cloud_hypervisor": {"binary": str(tmp_path / "no-such-ch")},
        "kernel_path": "/nonexistent/vmlinux",
        "rootfs_path": str(REPO / "config" / "cloudhv.json"),
        "kernel_args": "quiet",
        "state_dir": str(state_dir),
    }))
    out = _shim(bundle, *flags, "start", env={**env, "CLOUDHV_CONFIG": str(bad)})
    assert out.returncode == 1
    err = out.stderr.decode()
    assert f"cloud_hypervisor.binary: {tmp_path / 'no-such-ch'} does not exist" in err
    assert "kernel_path: /nonexistent/vmlinux does not exist" in err
    assert "rootfs_path" not in err
    assert not state_dir.exists()
    flag_values = dict(zip(flags[::2], flags[1::2], strict=True))
    sock = socket_path(flag_values["-address"], flag_values["-namespace"], flag_values["-id"])
    assert not sock.exists()
    assert not [
        pid for pid in os.listdir("/proc") if pid.isdigit() and _cmdline_has(pid, str(sock))
    ]


def _cmdline_has(pid: str, text: str) -> bool:
    try:
        return text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False

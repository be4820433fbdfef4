"""The shim binary's bootstrap: Go-style flags, the socket convention, start's stdin."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from shim import daemon, pbwire
from shim._pb.containerd.runtimeoptions.v1 import api_pb2
from shim.cli import Args, UsageError, _daemon_argv, parse_args, socket_path

REPO = Path(__file__).resolve().parents[2]


def test_containerd_start_argv() -> None:
    argv = [
        "-namespace",
        "k8s.io",
        "-address",
        "/run/containerd/containerd.sock",
        "-publish-binary",
        "/usr/bin/containerd",
        "-id",
        "abc",
        "-debug",
        "start",
    ]
    assert parse_args(argv) == Args(
        namespace="k8s.io",
        address="/run/containerd/containerd.sock",
        publish_binary="/usr/bin/containerd",
        id="abc",
        debug=True,
        action="start",
    )


def test_go_flag_forms() -> None:
    args = parse_args(["--namespace=ns", "-id=x", "--bundle", "/b", "-debug=false", "delete"])
    assert (args.namespace, args.id, args.bundle, args.debug, args.action) == (
        "ns",
        "x",
        "/b",
        False,
        "delete",
    )
    assert parse_args(["-v"]).version
    assert parse_args(["-info"]).info
    assert parse_args(["-id", "x", "--", "-start"]).action == "-start"
    assert parse_args(["-debug=1", "start", "-ignored"]).action == "start"


def test_flag_errors() -> None:
    with pytest.raises(UsageError, match="not defined: -nope"):
        parse_args(["-nope", "start"])
    with pytest.raises(UsageError, match="needs an argument: -id"):
        parse_args(["-id"])
    with pytest.raises(UsageError, match="invalid boolean"):
        parse_args(["-debug=maybe"])
    with pytest.raises(UsageError, match="bad flag syntax"):
        parse_args(["---x"])


def test_socket_path_matches_containerd() -> None:
    path = socket_path("/run/containerd/containerd.sock", "k8s.io", "pod1")
    digest = hashlib.sha256(b"/run/containerd/containerd.sock/k8s.io/pod1").hexdigest()
    assert path == Path("/run/containerd/s") / digest


def _options_any(config_path: str) -> bytes:
    opts = api_pb2.Options(type_url="io.containerd.cloudhv.v1", config_path=config_path)
    wrapped = any_pb2.Any(type_url="cri.runtimeoptions.v1.Options", value=opts.SerializeToString())
    return wrapped.SerializeToString()


def test_config_path_from_legacy_any() -> None:
    data = _options_any("/etc/cloudhv/other.json")
    assert pbwire.config_path_from_stdin(data, "id", "ns") == "/etc/cloudhv/other.json"
    assert pbwire.config_path_from_stdin(b"", "id", "ns") == ""
    other = any_pb2.Any(
        type_url="containerd.runc.v1.Options", value=b"\x0a\x01x"
    ).SerializeToString()
    assert pbwire.config_path_from_stdin(other, "id", "ns") == ""


def test_config_path_from_bootstrap_params() -> None:
    # BootstrapParams{instance_id=1, namespace=2, extensions=8 {Any value=1}}, hand-assembled
    # from the generated Any so the field layout is containerd 2.3's.
    ext_any = _options_any("/cfg.json")
    extension = b"\x0a" + bytes([len(ext_any)]) + ext_any
    params = b"\x0a\x02id" + b"\x12\x02ns" + b"\x42" + bytes([len(extension)]) + extension
    assert pbwire.config_path_from_stdin(params, "id", "ns") == "/cfg.json"


def test_wire_errors() -> None:
    with pytest.raises(pbwire.WireError):
        list(pbwire.fields(b"\x0a\x05ab"))
    with pytest.raises(pbwire.WireError):
        list(pbwire.fields(b"\x0b"))  # wire type 3 (groups)


def _run(*argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-c", "import sys; from shim.cli import main; sys.exit(main())", *argv],
        capture_output=True,
        cwd=REPO,
    )


def test_version_and_usage() -> None:
    out = _run("-v")
    assert out.returncode == 0 and b"io.containerd.cloudhv.v1" in out.stdout
    bad = _run("-bogus")
    assert bad.returncode == 2 and b"not defined: -bogus" in bad.stderr


def test_info_echoes_options() -> None:
    from shim._pb.containerd.types import introspection_pb2

    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from shim.cli import main; sys.exit(main())", "-info"],
        input=_options_any("/x.json"),
        capture_output=True,
        cwd=REPO,
        check=True,
    )
    info = introspection_pb2.RuntimeInfo()
    info.ParseFromString(proc.stdout)
    assert info.name == "io.containerd.cloudhv.v1"
    assert info.version.version
    assert info.options.type_url == "cri.runtimeoptions.v1.Options"


def test_start_imports_stay_light() -> None:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import shim.cli"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    heavy = [m for m in ("google.protobuf", "pydantic", "asyncio") if f" {m}" in proc.stderr]
    assert heavy == []


def test_daemon_reads_the_command_line_start_writes() -> None:
    args = Args(namespace="k8s.io", address="/a.sock", publish_binary="/bin/ctrd", id="t1")
    argv = _daemon_argv(args, "pod1", Path("/run/containerd/s/abc"), (5, 6, 7))
    assert argv[1:3] == ["-sE", "-c"]
    parsed = daemon.parse_args(argv[4:])
    assert parsed == daemon.DaemonArgs(
        namespace="k8s.io",
        address="/a.sock",
        publish_binary="/bin/ctrd",
        id="t1",
        pod_id="pod1",
        bundle=str(Path.cwd()),
        socket="/run/containerd/s/abc",
        listen_fd=5,
        ready_fd=6,
        config_fd=7,
        debug=False,
    )
    debug = _daemon_argv(Args(id="t1", debug=True), "p", Path("/s"), (5, 6, 7))
    assert daemon.parse_args(debug[4:]).debug


def test_daemon_argument_errors() -> None:
    with pytest.raises(daemon.UsageError, match="unknown argument '--config-path'"):
        daemon.parse_args(["--config-path", "/x"])
    with pytest.raises(daemon.UsageError, match="--id needs a value"):
        daemon.parse_args(["--id"])
    with pytest.raises(daemon.UsageError, match="not a number"):
        daemon.parse_args(["--ready-fd", "x"])
    with pytest.raises(daemon.UsageError, match="missing --listen-fd, --ready-fd, --config-fd"):
        daemon.parse_args(["--id", "x"])


def test_daemon_without_config_exits_and_says_why() -> None:
    """`start` died or refused the config: the pipe closes empty, the daemon must not serve."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ready_r, ready_w = os.pipe()
    config_r, config_w = os.pipe()
    os.close(config_w)
    fds = (listener.fileno(), ready_w, config_r)
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from shim.daemon import main; sys.exit(main())",
                "--listen-fd",
                str(fds[0]),
                "--ready-fd",
                str(fds[1]),
                "--config-fd",
                str(fds[2]),
            ],
            pass_fds=fds,
            capture_output=True,
            cwd=REPO,
            timeout=30,
        )
        os.close(ready_w)
        ready_w = -1
        assert proc.returncode == 1
        assert os.read(ready_r, 4096) == b"error: start sent no config\n"
    finally:
        listener.close()
        for fd in (ready_r, ready_w, config_r):
            if fd >= 0:
                os.close(fd)

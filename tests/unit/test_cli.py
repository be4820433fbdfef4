"""The shim binary's bootstrap: Go-style flags, the socket convention, start's stdin."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from shim import pbwire
from shim._pb.containerd.runtimeoptions.v1 import api_pb2
from shim.cli import Args, UsageError, parse_args, socket_path

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

"""Pure OCI spec helpers: pod identity from CRI annotations, exec/update payload checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shim import spec


def test_identify_standalone() -> None:
    ident = spec.identify("hello", {})
    assert ident == spec.TaskIdentity("hello", spec.TaskKind.STANDALONE)


def test_identify_cri() -> None:
    sandbox = spec.identify("pod1", {spec.CONTAINER_TYPE: "sandbox", spec.SANDBOX_ID: "pod1"})
    assert sandbox == spec.TaskIdentity("pod1", spec.TaskKind.SANDBOX)
    app = spec.identify("app1", {spec.CONTAINER_TYPE: "container", spec.SANDBOX_ID: "pod1"})
    assert app == spec.TaskIdentity("pod1", spec.TaskKind.CONTAINER)


def test_bundle_annotations(tmp_path: Path) -> None:
    assert spec.bundle_annotations(tmp_path) == {}
    (tmp_path / "config.json").write_text(json.dumps({"annotations": {"a": "b"}}))
    assert spec.bundle_annotations(tmp_path) == {"a": "b"}
    (tmp_path / "config.json").write_text("not json")
    assert spec.bundle_annotations(tmp_path) == {}
    with pytest.raises(spec.SpecError, match="invalid JSON"):
        spec.read_spec(tmp_path / "config.json")


def test_exec_process_json() -> None:
    good = json.dumps({"args": ["sh"], "cwd": "/"}).encode()
    assert spec.exec_process_json(spec.PROCESS_TYPE_URL, good) == good
    with pytest.raises(spec.SpecError, match="want"):
        spec.exec_process_json("types.containerd.io/other", good)
    with pytest.raises(spec.SpecError, match="args"):
        spec.exec_process_json(spec.PROCESS_TYPE_URL, b'{"args": []}')
    with pytest.raises(spec.SpecError, match="invalid JSON"):
        spec.exec_process_json(spec.PROCESS_TYPE_URL, b"{")


def test_resources_json() -> None:
    body = b'{"memory": {"limit": 1048576}}'
    assert spec.resources_json(spec.RESOURCES_TYPE_URL, body) == body
    with pytest.raises(spec.SpecError):
        spec.resources_json("x/Other", body)


def test_hostname_of() -> None:
    assert spec.hostname_of({"hostname": "pod-a"}) == "pod-a"
    assert spec.hostname_of({}) == ""
    with pytest.raises(spec.SpecError, match="hostname"):
        spec.hostname_of({"hostname": 7})


def test_mounts_of() -> None:
    mounts = [{"destination": "/proc", "type": "proc", "source": "proc"}]
    assert spec.mounts_of({"mounts": mounts}) == mounts
    assert spec.mounts_of({}) == []
    with pytest.raises(spec.SpecError, match="mounts"):
        spec.mounts_of({"mounts": ["/proc"]})
    with pytest.raises(spec.SpecError, match="mounts"):
        spec.mounts_of({"mounts": {"destination": "/proc"}})


def test_pod_options() -> None:
    """A sandbox spec as containerd writes it: sysctls in linux.sysctl; a pid or ipc
    namespace entry left out when the pod's mode for it is NODE."""
    pod = {
        "linux": {
            "sysctl": {"kernel.shm_rmid_forced": "1"},
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "network"}],
        },
        "mounts": [
            {"destination": "/dev/shm", "type": "bind", "source": "/s/shm"},
            {"destination": "/etc/resolv.conf", "type": "bind", "source": "/s/resolv.conf"},
        ],
    }
    assert spec.pod_options(pod) == spec.PodOptions(
        sysctls={"kernel.shm_rmid_forced": "1"},
        node_pid=False,
        node_ipc=False,
        resolv_conf="/s/resolv.conf",
    )
    host = {"linux": {"namespaces": [{"type": "uts"}, {"type": "network", "path": "/x"}]}}
    assert spec.pod_options(host) == spec.PodOptions(node_pid=True, node_ipc=True, netns="/x")
    with pytest.raises(spec.SpecError, match="linux.sysctl"):
        spec.pod_options({"linux": {"sysctl": {"kernel.sem": 1}}})
    with pytest.raises(spec.SpecError, match="linux.namespaces"):
        spec.pod_options({"linux": {"namespaces": "pid"}})


def test_host_network_is_refused_saying_why() -> None:
    """No network namespace in a VM's spec is the host's network: refused by name."""
    with pytest.raises(spec.SpecError, match="hostNetwork.*VM cannot share"):
        spec.netns_of({"linux": {"namespaces": [{"type": "pid"}]}})
    with pytest.raises(spec.SpecError, match="hostNetwork"):
        spec.pod_options({"linux": {"namespaces": [{"type": "uts"}]}})
    assert spec.netns_of({"linux": {"namespaces": [{"type": "network"}]}}) == ""
    with pytest.raises(spec.SpecError, match="path is not a string"):
        spec.netns_of({"linux": {"namespaces": [{"type": "network", "path": 3}]}})

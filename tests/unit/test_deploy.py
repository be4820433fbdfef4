"""deploy/: every manifest is valid against the Kubernetes OpenAPI schemas (not just
YAML), and what the manifests carry agrees with the runtime and the docs."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from shim.ctl.containerd import HANDLER

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
# The oldest Kubernetes the manifests target, and the newest the validator knows.
VERSIONS = ("1.27.0", kubernetes_validate.latest_version())


def _documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        for index, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                docs.append((f"{path.name}#{index}", doc))
    return docs


def _kinds() -> dict[str, list[dict[str, Any]]]:
    kinds: dict[str, list[dict[str, Any]]] = {}
    for _, doc in _documents():
        kinds.setdefault(doc["kind"], []).append(doc)
    return kinds


def test_there_are_manifests() -> None:
    assert set(_kinds()) >= {"RuntimeClass", "DaemonSet", "ConfigMap", "Namespace"}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name,doc", _documents(), ids=[n for n, _ in _documents()])
def test_manifest_is_valid(name: str, doc: dict[str, Any], version: str) -> None:
    # strict: an unknown field is an error too (a typo kubectl would silently drop).
    kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_rejects_a_wrong_manifest() -> None:
    runtime_class = _kinds()["RuntimeClass"][0]
    broken = {**runtime_class, "overhead": {"podFixed": {"memory": ["320Mi"]}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[0], strict=True)
    typo = {**runtime_class, "handlr": "cloudhv"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, VERSIONS[0], strict=True)


def test_runtime_class_names_the_handler_the_installer_registers() -> None:
    (runtime_class,) = _kinds()["RuntimeClass"]
    assert runtime_class["handler"] == HANDLER
    assert runtime_class["metadata"]["name"] == "cloudhv"
    memory = runtime_class["overhead"]["podFixed"]["memory"]
    # docs/kubernetes.md states the measurement the overhead comes from.
    assert f"podFixed.memory: {memory}" in (REPO / "docs" / "kubernetes.md").read_text()
    label = runtime_class["scheduling"]["nodeSelector"]
    assert label == {"cloudhv.io/runtime": "ready"}
    script = _kinds()["ConfigMap"][0]["data"]["node.sh"]
    assert "cloudhv.io/runtime" in script and "label ready" in script


def test_installer_scripts_parse() -> None:
    data = _kinds()["ConfigMap"][0]["data"]
    subprocess.run(["sh", "-n"], input=data["node.sh"], text=True, check=True)
    compile(data["label.py"], "label.py", "exec")
    daemonset = _kinds()["DaemonSet"][0]
    container = daemonset["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["sh", "/scripts/node.sh"]
    assert container["securityContext"]["privileged"] is True
    assert daemonset["spec"]["template"]["spec"]["hostPID"] is True

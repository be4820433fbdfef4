"""A CRI (runtime.v1) client for tests: grpcio stubs generated at test time from
Debian's cri-api proto (extracted by scripts/setup.sh), talking to real containerd."""

from __future__ import annotations

import functools
import hashlib
import importlib
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

CRI_ROOT = Path("/var/cache/cloudhv/cri-api/root/usr/share/gocode/src")
API_PROTO = CRI_ROOT / "k8s.io/cri-api/pkg/apis/runtime/v1/api.proto"
GEN_ROOT = Path("/var/cache/cloudhv/cri-stubs")


@functools.cache
def stubs() -> tuple[ModuleType, ModuleType]:
    """(cri_api_pb2, cri_api_pb2_grpc), generated once per proto content.

    The gogoproto import and its file options only steer Go code generation, so they
    are dropped; messages and services are untouched.
    """
    text = API_PROTO.read_text()
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    out = GEN_ROOT / digest
    if not (out / "cri_api_pb2_grpc.py").exists():
        tmp = GEN_ROOT / f"{digest}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        kept = [
            line
            for line in text.splitlines()
            if "gogo.proto" not in line and not line.startswith("option (gogoproto.")
        ]
        (tmp / "cri_api.proto").write_text("\n".join(kept) + "\n")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"-I{tmp}",
                f"--python_out={tmp}",
                f"--grpc_python_out={tmp}",
                "cri_api.proto",
            ],
            check=True,
        )
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    if str(out) not in sys.path:
        sys.path.insert(0, str(out))
    return importlib.import_module("cri_api_pb2"), importlib.import_module("cri_api_pb2_grpc")


class CriClient:
    """RuntimeService and ImageService over containerd's gRPC socket."""

    def __init__(self, address: Path) -> None:
        import grpc

        self.pb, grpc_mod = stubs()
        self._channel = grpc.insecure_channel(f"unix://{address}")
        self.runtime = grpc_mod.RuntimeServiceStub(self._channel)
        self.images = grpc_mod.ImageServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def start_pod(
        self, name: str, log_dir: Path, image: str, command: list[str], *,
        namespace: str = "bench", handler: str = "cloudhv", timeout: float = 300,
    ) -> tuple[str, str, float]:
        """RunPodSandbox, then one container (`app`, logging to log_dir/app.log) created
        and started: (pod id, container id, RunPodSandbox seconds)."""
        pb, rt = self.pb, self.runtime
        config = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, uid=f"u-{name}", namespace=namespace),
            hostname=name,
            log_directory=str(log_dir),
        )
        started = time.monotonic()
        pod = rt.RunPodSandbox(
            pb.RunPodSandboxRequest(config=config, runtime_handler=handler), timeout=timeout
        ).pod_sandbox_id
        ran = time.monotonic() - started
        container = pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name="app"),
            image=pb.ImageSpec(image=image),
            command=command,
            log_path="app.log",
        )
        cid = rt.CreateContainer(
            pb.CreateContainerRequest(pod_sandbox_id=pod, config=container, sandbox_config=config),
            timeout=timeout,
        ).container_id
        rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=timeout)
        return pod, cid, ran

    def remove_pod(self, pod_id: str, timeout: float = 300) -> None:
        self.runtime.StopPodSandbox(self.pb.StopPodSandboxRequest(pod_sandbox_id=pod_id),
                                    timeout=timeout)
        self.runtime.RemovePodSandbox(self.pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id),
                                      timeout=timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pb, name)

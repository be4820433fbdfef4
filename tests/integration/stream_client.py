"""Client for the CRI streaming server (exec/attach URLs), speaking the Kubernetes
`v4.channel.k8s.io` websocket protocol: every message starts with a channel byte
(0 stdin, 1 stdout, 2 stderr, 3 status JSON, 4 terminal resize).

containerd's streaming server listens on loopback inside containerd's network
namespace (one the test made), so `stream()` runs this module there with nsenter.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class StreamResult:
    stdout: bytes
    stderr: bytes
    status: dict[str, object]

    @property
    def exit_code(self) -> int:
        if self.status.get("status") == "Success":
            return 0
        for cause in self.status.get("details", {}).get("causes", []):  # type: ignore[union-attr]
            if cause.get("reason") == "ExitCode":
                return int(cause["message"])
        return -1


def stream(
    netns: str, url: str, stdin: bytes = b"", resize: tuple[int, int] | None = None
) -> StreamResult:
    request = {"url": url, "stdin": stdin.decode("latin-1"), "resize": resize}
    result = subprocess.run(
        [
            "nsenter",
            f"--net=/run/netns/{netns}",
            sys.executable,
            "-m",
            "tests.integration.stream_client",
        ],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    answer = json.loads(result.stdout)
    return StreamResult(
        stdout=answer["stdout"].encode("latin-1"),
        stderr=answer["stderr"].encode("latin-1"),
        status=answer["status"],
    )


def _run(request: dict[str, object]) -> dict[str, object]:
    import websocket

    url = str(request["url"]).replace("http://", "ws://", 1)
    ws = websocket.create_connection(url, subprotocols=["v4.channel.k8s.io"], timeout=60)
    if request.get("resize"):
        width, height = request["resize"]  # type: ignore[misc]
        ws.send_binary(b"\x04" + json.dumps({"Width": width, "Height": height}).encode())
    stdin = str(request.get("stdin", "")).encode("latin-1")
    if stdin:
        ws.send_binary(b"\x00" + stdin)
    out = {1: b"", 2: b""}
    status: dict[str, object] = {}
    while True:
        try:
            opcode, data = ws.recv_data()
        except websocket.WebSocketConnectionClosedException:
            break
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            break
        if not data:
            continue
        channel, payload = data[0], data[1:]
        if channel in out:
            out[channel] += payload
        elif channel == 3 and payload:
            status = json.loads(payload)
    return {
        "stdout": out[1].decode("latin-1"),
        "stderr": out[2].decode("latin-1"),
        "status": status,
    }


if __name__ == "__main__":
    json.dump(_run(json.load(sys.stdin)), sys.stdout)

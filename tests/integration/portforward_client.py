"""Client for CRI PortForward URLs, speaking the streaming server's websocket protocol.

containerd 1.6 serves port-forward over SPDY and over websocket (the
`v4.channel.k8s.io` subprotocol); this is the websocket side. The forward's
ports are those of the PortForwardRequest, each as a pair of channels: data
(2i) and error (2i+1). The server starts every channel with the port number (2
bytes, little endian); after that, each message is a channel byte and the
payload. A pair ends when the server closes its connection to the pod's port;
the websocket closes when every pair has ended. There is no half-close from the
client: a server in the pod must know how much it reads.

Like stream_client, `forward()` runs this module inside containerd's network
namespace (where the streaming server listens on loopback) with nsenter.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

CHUNK = 32 * 1024


@dataclass(frozen=True)
class Forwarded:
    data: tuple[bytes, ...]  # what each pair's data channel carried (after the port prefix)
    errors: tuple[str, ...]  # each pair's error channel
    seconds: float  # from connecting to the websocket closing


def forward(netns: str, url: str, send: Sequence[bytes], *, timeout: float = 120) -> Forwarded:
    """Send `send[i]` on pair i of the forward at `url`; collect everything until close."""
    request = {"url": url, "send": [base64.b64encode(s).decode() for s in send]}
    result = subprocess.run(
        [
            "nsenter",
            f"--net=/run/netns/{netns}",
            sys.executable,
            "-m",
            "tests.integration.portforward_client",
        ],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    answer = json.loads(result.stdout)
    return Forwarded(
        data=tuple(base64.b64decode(d) for d in answer["data"]),
        errors=tuple(answer["errors"]),
        seconds=float(answer["seconds"]),
    )


def _run(request: dict[str, object]) -> dict[str, object]:
    import websocket

    sends = [base64.b64decode(s) for s in request["send"]]  # type: ignore[attr-defined]
    pairs = len(sends)
    url = str(request["url"]).replace("http://", "ws://", 1)
    started = time.monotonic()
    ws = websocket.create_connection(url, subprotocols=["v4.channel.k8s.io"], timeout=90)
    channels: dict[int, bytearray] = {c: bytearray() for c in range(2 * pairs)}
    prefixed: set[int] = set()

    def take(data: bytes) -> None:
        channel, payload = data[0], data[1:]
        if channel not in channels:
            raise ValueError(f"message on unknown channel {channel}")
        if channel not in prefixed:
            # The port number comes first, alone or ahead of data.
            if len(payload) < 2:
                return
            prefixed.add(channel)
            payload = payload[2:]
        channels[channel] += payload

    # The port prefixes arrive before the server reads anything we send.
    for index, payload in enumerate(sends):
        for at in range(0, len(payload), CHUNK):
            ws.send_binary(bytes([2 * index]) + payload[at : at + CHUNK])
    while True:
        try:
            opcode, data = ws.recv_data()
        except websocket.WebSocketConnectionClosedException:
            break
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            break
        if data:
            take(data)
    seconds = time.monotonic() - started
    return {
        "data": [base64.b64encode(bytes(channels[2 * i])).decode() for i in range(pairs)],
        "errors": [bytes(channels[2 * i + 1]).decode(errors="replace") for i in range(pairs)],
        "seconds": seconds,
    }


if __name__ == "__main__":
    json.dump(_run(json.load(sys.stdin)), sys.stdout)

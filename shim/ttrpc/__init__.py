"""ttrpc (containerd's RPC protocol) on asyncio: frames, unary client and server.

The wire format is in shim/ttrpc/frames.py (a 10-byte header: length, stream id,
type, flags; then the protobuf Request or Response). Streaming is not supported:
every call is one Request frame and one Response frame.
"""

from shim.errors import Code
from shim.ttrpc.client import Client
from shim.ttrpc.frames import ProtocolError
from shim.ttrpc.server import CallContext, Handler, Server, bind_unix
from shim.ttrpc.status import TtrpcError, error_for_status

__all__ = [
    "CallContext",
    "Client",
    "Code",
    "Handler",
    "ProtocolError",
    "Server",
    "TtrpcError",
    "bind_unix",
    "error_for_status",
]

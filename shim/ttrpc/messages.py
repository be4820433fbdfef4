"""The ttrpc Request/Response envelopes as frozen dataclasses, and their codec.

The protobuf classes stay inside this module. Decoding raises only ProtocolError.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from shim._pb import ttrpc_pb2 as _ttrpc_pb2
from shim.ttrpc.frames import ProtocolError

# Generated modules have no type stubs; everything read from them is converted.
_pb: Any = _ttrpc_pb2


@dataclass(frozen=True, slots=True)
class Request:
    service: str
    method: str
    payload: bytes = b""
    timeout_nano: int = 0
    metadata: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Response:
    code: int = 0
    message: str = ""
    payload: bytes = b""


def encode_request(req: Request) -> bytes:
    msg = _pb.Request(
        service=req.service,
        method=req.method,
        payload=req.payload,
        timeout_nano=req.timeout_nano,
        metadata=[_pb.KeyValue(key=k, value=v) for k, v in req.metadata],
    )
    return bytes(msg.SerializeToString())


def decode_request(data: bytes) -> Request:
    msg = _parse(_pb.Request, data, "request")
    return Request(
        service=str(msg.service),
        method=str(msg.method),
        payload=bytes(msg.payload),
        timeout_nano=int(msg.timeout_nano),
        metadata=_pairs(msg.metadata),
    )


def encode_response(resp: Response) -> bytes:
    msg = _pb.Response(payload=resp.payload)
    if resp.code != 0:
        msg.status.code = resp.code
        msg.status.message = resp.message
    return bytes(msg.SerializeToString())


def decode_response(data: bytes) -> Response:
    msg = _parse(_pb.Response, data, "response")
    return Response(
        code=int(msg.status.code),
        message=str(msg.status.message),
        payload=bytes(msg.payload),
    )


def _parse(cls: Any, data: bytes, what: str) -> Any:
    msg = cls()
    try:
        msg.ParseFromString(data)
    except (DecodeError, ValueError) as err:
        raise ProtocolError(f"malformed ttrpc {what}: {err}") from None
    return msg


def _pairs(kvs: Iterable[Any]) -> tuple[tuple[str, str], ...]:
    return tuple((str(kv.key), str(kv.value)) for kv in kvs)

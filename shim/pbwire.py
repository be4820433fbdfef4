"""A minimal protobuf wire format for the shim's short-lived commands.

`start` runs once per container and `delete` once per task: both must stay fast,
and importing the protobuf runtime alone costs ~45 ms here. The messages they
read (an Any holding runtimeoptions.v1.Options, or containerd 2.3's
BootstrapParams) and write (DeleteResponse) need only varint and
length-delimited fields, which this module handles. The long-lived daemon uses
the generated protobuf classes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

VARINT, I64, LEN, I32 = 0, 1, 2, 5


class WireError(ValueError):
    """The bytes are not a valid protobuf encoding."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise WireError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 64:
            raise WireError("varint longer than 10 bytes")


def fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """Yield (field number, wire type, value): an int for VARINT/I64/I32, bytes for LEN."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0")
        value: int | bytes
        if wire_type == VARINT:
            value, pos = _varint(data, pos)
        elif wire_type == LEN:
            size, pos = _varint(data, pos)
            if pos + size > len(data):
                raise WireError(f"field {number}: length {size} runs past the end")
            value, pos = data[pos : pos + size], pos + size
        elif wire_type in (I64, I32):
            width = 8 if wire_type == I64 else 4
            if pos + width > len(data):
                raise WireError(f"field {number}: truncated fixed-width value")
            value, pos = int.from_bytes(data[pos : pos + width], "little"), pos + width
        else:
            raise WireError(f"field {number}: unsupported wire type {wire_type}")
        yield number, wire_type, value


def _text(value: int | bytes) -> str:
    if not isinstance(value, bytes):
        raise WireError("expected a length-delimited field")
    try:
        return value.decode()
    except UnicodeDecodeError as err:
        raise WireError(f"invalid UTF-8: {err}") from err


@dataclass(frozen=True)
class AnyMessage:
    type_url: str
    value: bytes


def parse_any(data: bytes) -> AnyMessage:
    type_url, value = "", b""
    for number, _, raw in fields(data):
        if number == 1:
            type_url = _text(raw)
        elif number == 2 and isinstance(raw, bytes):
            value = raw
    return AnyMessage(type_url, value)


def options_config_path(options: AnyMessage) -> str:
    """ConfigPath from runtimeoptions.v1.Options (field 2), or "" for any other type."""
    if not options.type_url.endswith("runtimeoptions.v1.Options"):
        return ""
    for number, _, raw in fields(options.value):
        if number == 2:
            return _text(raw)
    return ""


@dataclass(frozen=True)
class StartInput:
    """What `start` learns from its stdin."""

    config_path: str = ""  # the CRI runtime option ConfigPath
    bootstrap: bool = False  # containerd 2.3+: answer with a BootstrapResult
    socket_dir: str = ""  # BootstrapParams.socket_dir, where the shim socket goes


def parse_start_stdin(data: bytes, shim_id: str, namespace: str) -> StartInput:
    """containerd ≤2.2 sends an Any of the runtime options; 2.3+ sends BootstrapParams
    (api/runtime/bootstrap/v1), told apart by instance_id (1) and namespace (2)
    matching our flags, with the options inside extensions (8) as Extension{Any
    value=1}, and an optional socket_dir (9)."""
    if not data:
        return StartInput()
    try:
        bootstrap = _bootstrap(data, shim_id, namespace)
    except WireError:
        bootstrap = None
    if bootstrap is not None:
        extensions, socket_dir = bootstrap
        path = next((p for p in map(options_config_path, extensions) if p), "")
        return StartInput(path, bootstrap=True, socket_dir=socket_dir)
    return StartInput(options_config_path(parse_any(data)))


def config_path_from_stdin(data: bytes, shim_id: str, namespace: str) -> str:
    """The ConfigPath runtime option in `start`'s stdin, "" if none."""
    return parse_start_stdin(data, shim_id, namespace).config_path


def _bootstrap(data: bytes, shim_id: str, namespace: str) -> tuple[list[AnyMessage], str] | None:
    instance_id = ns = socket_dir = ""
    extensions: list[AnyMessage] = []
    for number, wire_type, raw in fields(data):
        if number == 1 and wire_type == LEN:
            instance_id = _text(raw)
        elif number == 2 and wire_type == LEN:
            ns = _text(raw)
        elif number == 8 and isinstance(raw, bytes):
            for inner_number, _, inner in fields(raw):
                if inner_number == 1 and isinstance(inner, bytes):
                    extensions.append(parse_any(inner))
        elif number == 9 and wire_type == LEN:
            socket_dir = _text(raw)
    if instance_id != shim_id or ns != namespace:
        return None
    return extensions, socket_dir


def _put_varint(out: bytearray, value: int) -> None:
    value &= (1 << 64) - 1  # negative int64/int32 values are 10-byte two's complement
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


def _put_field(out: bytearray, number: int, value: int | bytes) -> None:
    """One field; proto3 leaves zero and empty values out."""
    if not value:
        return
    if isinstance(value, bytes):
        _put_varint(out, number << 3 | LEN)
        _put_varint(out, len(value))
        out += value
    else:
        _put_varint(out, number << 3 | VARINT)
        _put_varint(out, value)


def delete_response(pid: int, exit_status: int, exited_at_ns: int) -> bytes:
    """containerd.task.v2.DeleteResponse{pid=1, exit_status=2, exited_at=3 Timestamp}."""
    seconds, nanos = divmod(exited_at_ns, 1_000_000_000)
    timestamp = bytearray()
    _put_field(timestamp, 1, seconds)
    _put_field(timestamp, 2, nanos)
    out = bytearray()
    _put_field(out, 1, pid)
    _put_field(out, 2, exit_status)
    _put_field(out, 3, bytes(timestamp))
    return bytes(out)


def bootstrap_result(address: str, *, version: int = 2, protocol: str = "ttrpc") -> bytes:
    """containerd.runtime.bootstrap.v1.BootstrapResult{version=1, address=2, protocol=3}."""
    out = bytearray()
    _put_field(out, 1, version)
    _put_field(out, 2, address.encode())
    _put_field(out, 3, protocol.encode())
    return bytes(out)

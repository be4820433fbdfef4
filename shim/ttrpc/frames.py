"""ttrpc framing: the 10-byte header and an incremental frame decoder. No I/O.

A frame is `length:u32be stream_id:u32be type:u8 flags:u8` followed by `length`
bytes of data. A frame whose data is larger than `MAX_DATA` is skipped without
buffering it and reported as `OversizedFrame`, so the receiver can answer
RESOURCE_EXHAUSTED on that stream and keep the connection.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

HEADER_SIZE = 10
MAX_DATA = 4 << 20
MAX_STREAM_ID = 0xFFFF_FFFF

_HEADER = struct.Struct(">IIBB")


class ProtocolError(Exception):
    """The byte stream is not ttrpc; the connection cannot be trusted any more."""


class MessageType(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    DATA = 3


class Flags(enum.IntFlag):
    REMOTE_CLOSED = 0x01
    REMOTE_OPEN = 0x02
    NO_DATA = 0x04


@dataclass(frozen=True, slots=True)
class FrameHeader:
    length: int
    stream_id: int
    type: MessageType
    flags: int


@dataclass(frozen=True, slots=True)
class Frame:
    stream_id: int
    type: MessageType
    flags: int
    data: bytes


@dataclass(frozen=True, slots=True)
class OversizedFrame:
    """A frame whose data exceeded the limit; its data has been discarded."""

    stream_id: int
    type: MessageType
    flags: int
    length: int


def encode_header(length: int, stream_id: int, type_: MessageType, flags: int = 0) -> bytes:
    if not 0 <= length <= 0xFFFF_FFFF:
        raise ValueError(f"frame length {length} out of range")
    if not 0 <= stream_id <= MAX_STREAM_ID:
        raise ValueError(f"stream id {stream_id} out of range")
    if not 0 <= flags <= 0xFF:
        raise ValueError(f"flags {flags} out of range")
    return _HEADER.pack(length, stream_id, int(type_), flags)


def decode_header(header: bytes) -> FrameHeader:
    """Parse exactly HEADER_SIZE bytes. Raises ProtocolError on an unknown type."""
    if len(header) != HEADER_SIZE:
        raise ProtocolError(f"frame header is {len(header)} bytes, want {HEADER_SIZE}")
    length, stream_id, raw_type, flags = _HEADER.unpack(header)
    try:
        type_ = MessageType(raw_type)
    except ValueError:
        # Go's ttrpc ignores unknown types; we treat them as a desynchronised or
        # foreign byte stream (e.g. HTTP on the socket), which is what they are in practice.
        raise ProtocolError(f"unknown message type {raw_type:#x} on stream {stream_id}") from None
    return FrameHeader(length, stream_id, type_, flags)


def encode_frame(stream_id: int, type_: MessageType, data: bytes, flags: int = 0) -> bytes:
    """One frame, ready to write. Raises ValueError if data is over MAX_DATA."""
    if len(data) > MAX_DATA:
        raise ValueError(f"frame data is {len(data)} bytes, more than {MAX_DATA}")
    return encode_header(len(data), stream_id, type_, flags) + data


class FrameDecoder:
    """Turns arbitrary chunks of a byte stream into frames.

    `feed` returns every frame completed by the chunk. Once it has raised
    ProtocolError the decoder stays broken and raises again on every call.
    """

    def __init__(self, max_data: int = MAX_DATA) -> None:
        self._max_data = max_data
        self._buf = bytearray()
        self._header: FrameHeader | None = None
        self._discard = 0
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame."""
        return len(self._buf)

    def feed(self, chunk: bytes) -> list[Frame | OversizedFrame]:
        if self._error is not None:
            raise ProtocolError(str(self._error))
        try:
            return self._feed(chunk)
        except ProtocolError as err:
            self._error = err
            self._buf.clear()
            raise

    def _feed(self, chunk: bytes) -> list[Frame | OversizedFrame]:
        out: list[Frame | OversizedFrame] = []
        view = memoryview(chunk)
        if self._discard:
            skip = min(self._discard, len(view))
            self._discard -= skip
            view = view[skip:]
        self._buf += view
        buf = self._buf
        pos = 0
        while True:
            if self._discard:
                # Only reachable after an OversizedFrame header in this same chunk.
                skip = min(self._discard, len(buf) - pos)
                self._discard -= skip
                pos += skip
                if self._discard:
                    break
            if self._header is None:
                if len(buf) - pos < HEADER_SIZE:
                    break
                header = decode_header(bytes(buf[pos : pos + HEADER_SIZE]))
                pos += HEADER_SIZE
                if header.length > self._max_data:
                    out.append(
                        OversizedFrame(header.stream_id, header.type, header.flags, header.length)
                    )
                    self._discard = header.length
                    continue
                self._header = header
            header = self._header
            if len(buf) - pos < header.length:
                break
            data = bytes(buf[pos : pos + header.length])
            pos += header.length
            self._header = None
            out.append(Frame(header.stream_id, header.type, header.flags, data))
        del buf[:pos]
        return out

"""The pure ttrpc codec: frame header, incremental decoder, envelopes."""

from __future__ import annotations

import contextlib
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shim.ttrpc.frames import (
    HEADER_SIZE,
    MAX_DATA,
    Frame,
    FrameDecoder,
    MessageType,
    OversizedFrame,
    ProtocolError,
    decode_header,
    encode_frame,
    encode_header,
)
from shim.ttrpc.messages import (
    Request,
    Response,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def test_header_layout_matches_the_spec() -> None:
    raw = encode_header(0x0102, 0x0A0B0C0D, MessageType.RESPONSE, 0x04)
    assert raw == bytes([0, 0, 1, 2, 0x0A, 0x0B, 0x0C, 0x0D, 2, 4])
    header = decode_header(raw)
    assert (header.length, header.stream_id, header.type, header.flags) == (
        0x0102,
        0x0A0B0C0D,
        MessageType.RESPONSE,
        4,
    )


def test_unknown_message_type_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="unknown message type 0x9"):
        decode_header(bytes([0, 0, 0, 0, 0, 0, 0, 1, 9, 0]))


def test_decoder_stays_broken_after_garbage() -> None:
    dec = FrameDecoder()
    with pytest.raises(ProtocolError):
        dec.feed(b"GET / HTTP/1.1\r\n")
    with pytest.raises(ProtocolError):
        dec.feed(encode_frame(1, MessageType.REQUEST, b"ok"))


def test_encode_refuses_oversized_data() -> None:
    with pytest.raises(ValueError):
        encode_frame(1, MessageType.REQUEST, bytes(MAX_DATA + 1))


def test_oversized_frame_is_skipped_without_buffering() -> None:
    dec = FrameDecoder(max_data=100)
    big = encode_header(1000, 3, MessageType.REQUEST) + bytes(1000)
    after = encode_frame(5, MessageType.REQUEST, b"next")
    out: list[Frame | OversizedFrame] = []
    stream = big + after
    for i in range(0, len(stream), 64):
        out += dec.feed(stream[i : i + 64])
        assert dec.buffered <= HEADER_SIZE + 100
    assert out == [
        OversizedFrame(3, MessageType.REQUEST, 0, 1000),
        Frame(5, MessageType.REQUEST, 0, b"next"),
    ]


frames_st = st.lists(
    st.builds(
        Frame,
        stream_id=st.integers(0, 0xFFFF_FFFF),
        type=st.sampled_from(MessageType),
        flags=st.integers(0, 255),
        data=st.binary(max_size=300),
    ),
    max_size=8,
)


@settings(max_examples=300)
@given(frames=frames_st, cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_round_trip_over_any_chunking(frames: list[Frame], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(f.stream_id, f.type, f.data, f.flags) for f in frames)
    dec = FrameDecoder()
    out: list[Frame | OversizedFrame] = []
    for chunk in chunked(stream, cuts):
        out += dec.feed(chunk)
    assert out == frames
    assert dec.buffered == 0


@settings(max_examples=500)
@given(
    data=st.binary(max_size=2000),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
    max_data=st.sampled_from([0, 16, 1000, MAX_DATA]),
)
def test_garbage_gives_frames_or_protocol_error(
    data: bytes, cuts: list[int], max_data: int
) -> None:
    dec = FrameDecoder(max_data=max_data)
    try:
        for chunk in chunked(data, cuts):
            for item in dec.feed(chunk):
                assert isinstance(item, Frame | OversizedFrame)
                if isinstance(item, Frame):
                    assert len(item.data) <= max_data
    except ProtocolError:
        pass


@settings(max_examples=300)
@given(
    prefix=st.lists(
        st.tuples(
            st.integers(0, 0xFFFF_FFFF), st.sampled_from(MessageType), st.binary(max_size=50)
        ),
        max_size=3,
    ),
    tail=st.binary(max_size=200),
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
)
def test_valid_frames_then_garbage(
    prefix: list[tuple[int, MessageType, bytes]], tail: bytes, cuts: list[int]
) -> None:
    """Frames before the garbage come out intact; the garbage never escapes as another error."""
    expected = [Frame(sid, t, 0, d) for sid, t, d in prefix]
    stream = b"".join(encode_frame(sid, t, d) for sid, t, d in prefix) + tail
    dec = FrameDecoder()
    out: list[Frame | OversizedFrame] = []
    try:
        for chunk in chunked(stream, cuts):
            out += dec.feed(chunk)
    except ProtocolError:
        pass
    n = min(len(out), len(expected))
    assert out[:n] == expected[:n]


@settings(max_examples=500)
@given(data=st.binary(max_size=500))
def test_envelope_decoders_raise_only_protocol_error(data: bytes) -> None:
    for decode in (decode_request, decode_response):
        with contextlib.suppress(ProtocolError):
            decode(data)


@given(
    service=st.text(max_size=40),
    method=st.text(max_size=20),
    payload=st.binary(max_size=100),
    timeout_nano=st.integers(0, 2**63 - 1),
    metadata=st.lists(st.tuples(st.text(max_size=10), st.text(max_size=10)), max_size=4),
)
def test_request_round_trip(
    service: str, method: str, payload: bytes, timeout_nano: int, metadata: list[tuple[str, str]]
) -> None:
    req = Request(service, method, payload, timeout_nano, tuple(metadata))
    assert decode_request(encode_request(req)) == req


def test_response_round_trip_and_ok_has_no_status() -> None:
    ok = Response(payload=b"\x01\x02")
    assert encode_response(ok) == b"\x12\x02\x01\x02"  # field 2 only
    assert decode_response(encode_response(ok)) == ok
    err = Response(code=5, message="container x: not found")
    assert decode_response(encode_response(err)) == err


def test_invalid_utf8_in_a_string_field_is_a_protocol_error() -> None:
    # Request.service (field 1, string) = b"\xff"
    with pytest.raises(ProtocolError):
        decode_request(b"\x0a\x01\xff")

"""RFC 6455 frame codec: encoders, decoder rules and close codes, captures, properties."""

from __future__ import annotations

import base64
import json
import pathlib
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wse_proto.errors import DecodeError, LocalProtocolError, PayloadTooLarge, WSEError
from wse_proto.ws import (
    BINARY,
    CLOSE,
    CONTINUATION,
    DEFAULT_MAX_MESSAGE_SIZE,
    PING,
    PONG,
    TEXT,
    FrameDecoder,
    apply_mask,
    binary_frame,
    decode_text,
    encode_close,
    encode_frame,
    frame_header,
    is_valid_close_code,
    parse_close,
    text_frame,
)

RECORDS = json.loads(
    (pathlib.Path(__file__).parent / "data" / "client-protocol.json").read_text("utf-8")
)["records"]


def naive_mask(data: bytes, mask: bytes) -> bytes:
    return bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def raw_frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = None,
    length_form: int | None = None,
    declared: int | None = None,
) -> bytes:
    """Independent frame builder (test oracle); can produce invalid frames on purpose.

    ``length_form`` forces 7, 16 or 64-bit lengths; ``declared`` lies about the length.
    """
    n = len(payload) if declared is None else declared
    if length_form is None:
        length_form = 7 if n < 126 else 16 if n < 65536 else 64
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    mbit = 0x80 if mask is not None else 0
    if length_form == 7:
        head += bytes([mbit | n])
    elif length_form == 16:
        head += bytes([mbit | 126]) + struct.pack(">H", n)
    else:
        head += bytes([mbit | 127]) + struct.pack(">Q", n)
    if mask is not None:
        return head + mask + naive_mask(payload, mask)
    return head + payload


def decode_all(data: bytes, *, client_side: bool, **kw: Any) -> list[tuple[int, bytes]]:
    dec = FrameDecoder(client_side=client_side, **kw)
    dec.receive_data(data)
    return dec.messages()


def error_of(data: bytes, *, client_side: bool, **kw: Any) -> WSEError:
    dec = FrameDecoder(client_side=client_side, **kw)
    dec.receive_data(data)
    with pytest.raises(WSEError) as info:
        while dec.messages():
            pass
    return info.value


MASK = b"\x37\xfa\x21\x3d"


# ---------------------------------------------------------------- encoders


@pytest.mark.parametrize("n", [0, 1, 125, 126, 127, 65535, 65536, 65537])
def test_length_encodings_are_minimal(n: int) -> None:
    payload = bytes(range(256)) * (n // 256) + bytes(range(n % 256))
    frame = encode_frame(BINARY, payload)
    assert frame == raw_frame(BINARY, payload)
    assert frame == binary_frame(payload)
    assert text_frame(payload) == raw_frame(TEXT, payload)
    expected_header = 2 if n < 126 else 4 if n < 65536 else 10
    assert frame_header(BINARY, n) == frame[:expected_header]
    assert len(frame) == expected_header + n
    masked = encode_frame(TEXT, payload, mask_key=MASK)
    assert masked == raw_frame(TEXT, payload, mask=MASK)


def test_fragment_and_control_encoding() -> None:
    assert encode_frame(TEXT, b"ab", fin=False) == b"\x01\x02ab"
    assert encode_frame(CONTINUATION, b"c") == b"\x80\x01c"
    assert frame_header(TEXT, 3, fin=False) == b"\x01\x03"
    assert encode_frame(PING, b"x" * 125)[:2] == b"\x89\x7d"
    with pytest.raises(LocalProtocolError):
        encode_frame(PING, b"x" * 126)
    with pytest.raises(LocalProtocolError):
        encode_frame(PONG, b"", fin=False)
    with pytest.raises(LocalProtocolError):
        encode_frame(3, b"")
    with pytest.raises(LocalProtocolError):
        encode_frame(TEXT, b"", mask_key=b"abc")


def test_encode_close_forms() -> None:
    assert encode_close(None) == b"\x88\x00"
    assert encode_close(1000, "bye") == b"\x88\x05\x03\xe8bye"
    assert encode_close(4401, "é") == b"\x88\x04\x11\x31\xc3\xa9"
    masked = encode_close(1001, "going", mask_key=MASK)
    assert masked == raw_frame(CLOSE, struct.pack(">H", 1001) + b"going", mask=MASK)
    assert encode_close(4999, "r" * 123)[1] == 125
    for bad_code in (999, 1004, 1005, 1006, 1015, 2000, 5000):
        with pytest.raises(LocalProtocolError):
            encode_close(bad_code)
    with pytest.raises(LocalProtocolError):
        encode_close(1000, "r" * 124)
    with pytest.raises(LocalProtocolError):
        encode_close(None, "reason without code")


def test_close_code_validity_matches_rfc_ranges() -> None:
    valid = [c for c in range(0, 6000) if is_valid_close_code(c)]
    assert valid[:11] == [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013]
    assert valid[11] == 3000
    assert valid[-1] == 4999
    assert len(valid) == 11 + 2000


@settings(max_examples=200)
@given(st.binary(max_size=3000), st.binary(min_size=4, max_size=4))
def test_apply_mask_matches_byte_loop_and_is_an_involution(data: bytes, mask: bytes) -> None:
    masked = apply_mask(data, mask)
    assert masked == naive_mask(data, mask)
    assert apply_mask(masked, mask) == data
    assert apply_mask(memoryview(data), bytearray(mask)) == masked


# ------------------------------------------------------------- captures


def _payload(rec: dict[str, object]) -> bytes:
    data = str(rec["data"])
    return base64.b64decode(data) if rec["encoding"] == "base64" else data.encode("utf-8")


CAPTURED_SERVER_FRAMES = [
    r
    for r in RECORDS
    if r["direction"] == "server->client" and r.get("frame_header_hex") and r["opcode"] in (1, 2)
]


@pytest.mark.parametrize("rec", CAPTURED_SERVER_FRAMES, ids=lambda r: str(r["description"])[:40])
def test_captured_server_frame_headers(rec: dict[str, object]) -> None:
    payload = _payload(rec)
    assert len(payload) == rec["length"]
    header = bytes.fromhex(str(rec["frame_header_hex"]))
    build = text_frame if rec["opcode"] == TEXT else binary_frame
    frame = build(payload)
    assert frame[: len(header)] == header
    assert encode_frame(int(str(rec["opcode"])), payload) == frame
    assert decode_all(frame, client_side=True) == [(rec["opcode"], payload)]


def test_captured_control_frames() -> None:
    by_desc = {r["description"]: r for r in RECORDS}
    pong = by_desc["WebSocket pong control frame (echoes the ping payload)"]
    assert encode_frame(PONG, b"abc") == bytes.fromhex(pong["frame_header_hex"]) + b"abc"
    close_reply = by_desc["server close reply"]
    body = base64.b64decode(close_reply["data"])
    assert parse_close(body) == (1000, "bye")
    assert encode_close(1000, "bye") == bytes.fromhex(close_reply["frame_header_hex"]) + body
    auth = by_desc["no token at all: frame 2"]
    body = base64.b64decode(auth["data"])
    assert parse_close(body) == (4401, "Authentication failed")
    assert encode_close(4401, "Authentication failed")[:2] == bytes.fromhex(
        auth["frame_header_hex"]
    )
    oversize_reply = by_desc["reply to the oversized frame"]
    assert encode_close(None) == bytes.fromhex(oversize_reply["frame_header_hex"])


def test_captured_oversized_text_frame_is_refused_at_the_header() -> None:
    rec = next(r for r in RECORDS if r["description"] == "text frame of 1 MiB + 10 bytes")
    size = DEFAULT_MAX_MESSAGE_SIZE + 10
    assert str(size) in rec["data"]
    frame = encode_frame(TEXT, b"x" * size, mask_key=MASK)
    dec = FrameDecoder(client_side=False)
    dec.receive_data(frame[:14])  # header + mask only: refused before the payload arrives
    with pytest.raises(PayloadTooLarge) as info:
        dec.messages()
    assert info.value.close_code == 1009
    exact = encode_frame(TEXT, b"x" * DEFAULT_MAX_MESSAGE_SIZE, mask_key=MASK)
    assert decode_all(exact, client_side=False) == [(TEXT, b"x" * DEFAULT_MAX_MESSAGE_SIZE)]


# ------------------------------------------------------- decoder rules


ERROR_CASES = [
    ("unmasked frame to server", raw_frame(TEXT, b"hi"), False, 1002),
    ("masked frame to client", raw_frame(TEXT, b"hi", mask=MASK), True, 1002),
    ("rsv1 (no deflate negotiated)", raw_frame(TEXT, b"hi", rsv=4, mask=MASK), False, 1002),
    ("rsv2", raw_frame(BINARY, b"hi", rsv=2), True, 1002),
    ("rsv3", raw_frame(BINARY, b"hi", rsv=1), True, 1002),
    ("opcode 3", raw_frame(3, b"", mask=MASK), False, 1002),
    ("opcode 7", raw_frame(7, b""), True, 1002),
    ("opcode 0xB", raw_frame(0xB, b"", mask=MASK), False, 1002),
    ("opcode 0xF", raw_frame(0xF, b""), True, 1002),
    ("ping of 126 bytes", raw_frame(PING, b"p" * 126, mask=MASK), False, 1002),
    ("fragmented ping", raw_frame(PING, b"p", fin=False), True, 1002),
    ("orphan continuation", raw_frame(CONTINUATION, b"x", mask=MASK), False, 1002),
    (
        "text inside fragmented binary",
        raw_frame(BINARY, b"a", fin=False) + raw_frame(TEXT, b"b"),
        True,
        1002,
    ),
    ("16-bit length for 5 bytes", raw_frame(BINARY, b"12345", length_form=16), True, 1002),
    (
        "64-bit length for 300 bytes",
        raw_frame(BINARY, b"x" * 300, length_form=64, mask=MASK),
        False,
        1002,
    ),
    ("64-bit length with MSB set", raw_frame(BINARY, b"", declared=1 << 63), True, 1002),
    ("invalid UTF-8 text", raw_frame(TEXT, b"\xff\xfe", mask=MASK), False, 1007),
    ("overlong UTF-8 text", raw_frame(TEXT, b"\xc0\xaf"), True, 1007),
    ("UTF-16 surrogate in text", raw_frame(TEXT, b"\xed\xa0\x80", mask=MASK), False, 1007),
    (
        "UTF-8 split across fragments, truncated at FIN",
        raw_frame(TEXT, b"ok \xe2\x82", fin=False) + raw_frame(CONTINUATION, b""),
        True,
        1007,
    ),
    ("close with 1-byte payload", raw_frame(CLOSE, b"\x03", mask=MASK), False, 1002),
    ("close code 999", raw_frame(CLOSE, struct.pack(">H", 999)), True, 1002),
    ("close code 1005", raw_frame(CLOSE, struct.pack(">H", 1005), mask=MASK), False, 1002),
    ("close code 1006", raw_frame(CLOSE, struct.pack(">H", 1006)), True, 1002),
    ("close code 1004", raw_frame(CLOSE, struct.pack(">H", 1004)), True, 1002),
    ("close code 1015", raw_frame(CLOSE, struct.pack(">H", 1015), mask=MASK), False, 1002),
    ("close code 2999", raw_frame(CLOSE, struct.pack(">H", 2999)), True, 1002),
    ("close code 5000", raw_frame(CLOSE, struct.pack(">H", 5000), mask=MASK), False, 1002),
    ("close reason not UTF-8", raw_frame(CLOSE, b"\x03\xe8\xff", mask=MASK), False, 1007),
]


@pytest.mark.parametrize(
    ("data", "client_side", "code"),
    [c[1:] for c in ERROR_CASES],
    ids=[c[0] for c in ERROR_CASES],
)
def test_protocol_errors_carry_the_close_code(data: bytes, client_side: bool, code: int) -> None:
    err = error_of(data, client_side=client_side)
    assert isinstance(err, DecodeError)
    assert err.close_code == code
    # Also when the bytes arrive one at a time.
    dec = FrameDecoder(client_side=client_side)
    with pytest.raises(DecodeError) as info:
        for i in range(len(data)):
            dec.receive_data(data[i : i + 1])
            dec.messages()
    assert info.value.close_code == code


def test_message_cap_applies_to_the_running_total_of_fragments() -> None:
    stream = (
        raw_frame(BINARY, b"a" * 60, fin=False, mask=MASK)
        + raw_frame(CONTINUATION, b"b" * 40, fin=False, mask=MASK)
        + raw_frame(CONTINUATION, b"c" * 1, mask=MASK)
    )
    assert error_of(stream, client_side=False, max_message_size=100).close_code == 1009
    assert isinstance(error_of(stream, client_side=False, max_message_size=100), PayloadTooLarge)
    assert decode_all(stream, client_side=False, max_message_size=101) == [
        (BINARY, b"a" * 60 + b"b" * 40 + b"c")
    ]
    # Control frames are not counted against the message cap.
    pings = raw_frame(PING, b"p" * 125) * 3
    assert decode_all(pings, client_side=True, max_message_size=10) == [(PING, b"p" * 125)] * 3


def test_control_frames_interleave_with_fragments() -> None:
    stream = (
        raw_frame(TEXT, "héllo ".encode(), fin=False, mask=MASK)
        + raw_frame(PING, b"1", mask=MASK)
        + raw_frame(CONTINUATION, b"", fin=False, mask=MASK)
        + raw_frame(PONG, b"", mask=MASK)
        + raw_frame(CONTINUATION, "wörld".encode(), mask=MASK)
    )
    assert decode_all(stream, client_side=False) == [
        (PING, b"1"),
        (PONG, b""),
        (TEXT, "héllo wörld".encode()),
    ]


def test_multibyte_character_split_across_fragments_is_valid() -> None:
    text = "€uro".encode()
    stream = raw_frame(TEXT, text[:2], fin=False) + raw_frame(CONTINUATION, text[2:])
    assert decode_all(stream, client_side=True) == [(TEXT, text)]


def test_close_stops_the_stream() -> None:
    stream = (
        raw_frame(TEXT, b"before")
        + raw_frame(CLOSE, struct.pack(">H", 1000) + b"bye")
        + raw_frame(TEXT, b"after")
        + b"\xff\xff garbage"
    )
    dec = FrameDecoder(client_side=True)
    dec.receive_data(stream)
    assert dec.messages() == [(TEXT, b"before"), (CLOSE, b"\x03\xe8bye")]
    assert dec.closed
    dec.receive_data(raw_frame(TEXT, b"later"))
    assert dec.messages() == []
    assert dec.buffered == 0
    assert parse_close(b"\x03\xe8bye") == (1000, "bye")
    assert decode_all(raw_frame(CLOSE, b""), client_side=True) == [(CLOSE, b"")]
    assert parse_close(b"") == (None, "")


def test_messages_before_an_error_are_returned_then_the_error() -> None:
    stream = raw_frame(TEXT, b"good", mask=MASK) + raw_frame(PING, b"x", mask=MASK)
    stream += raw_frame(TEXT, b"bad")  # unmasked: protocol error
    dec = FrameDecoder(client_side=False)
    dec.receive_data(stream)
    assert dec.messages() == [(TEXT, b"good"), (PING, b"x")]
    assert dec.error is not None and dec.error.close_code == 1002
    with pytest.raises(DecodeError):
        dec.messages()
    dec.receive_data(raw_frame(TEXT, b"more", mask=MASK))
    with pytest.raises(DecodeError):
        dec.messages()


def test_bad_utf8_in_a_first_fragment_fails_before_the_message_ends() -> None:
    dec = FrameDecoder(client_side=True)
    dec.receive_data(raw_frame(TEXT, b"ok \xff", fin=False))
    with pytest.raises(DecodeError) as info:
        dec.messages()
    assert info.value.close_code == 1007
    unchecked = FrameDecoder(client_side=True, validate_utf8=False)
    unchecked.receive_data(raw_frame(TEXT, b"\xff", fin=False) + raw_frame(CONTINUATION, b"!"))
    assert unchecked.messages() == [(TEXT, b"\xff!")]


def test_validate_utf8_off_leaves_checking_to_decode_text() -> None:
    bad = raw_frame(TEXT, b"\xff", mask=MASK)
    assert decode_all(bad, client_side=False, validate_utf8=False) == [(TEXT, b"\xff")]
    with pytest.raises(DecodeError) as info:
        decode_text(b"\xff")
    assert info.value.close_code == 1007
    assert decode_text("ünïcode".encode()) == "ünïcode"
    # Binary messages are never UTF-8 checked.
    assert decode_all(raw_frame(BINARY, b"\xff"), client_side=True) == [(BINARY, b"\xff")]


def test_big_frame_in_small_reads_is_not_reparsed_per_read() -> None:
    payload = bytes(range(256)) * 1024  # 256 KiB
    frame = encode_frame(BINARY, payload, mask_key=MASK)
    dec = FrameDecoder(client_side=False)
    for i in range(0, len(frame) - 1, 1000):
        dec.receive_data(frame[i : min(i + 1000, len(frame) - 1)])
        assert dec.messages() == []
    assert dec.buffered == len(frame) - 1
    dec.receive_data(frame[-1:])
    assert dec.messages() == [(BINARY, payload)]
    assert dec.buffered == 0


def test_decoder_accepts_bytearray_and_memoryview_without_aliasing() -> None:
    frame = bytearray(raw_frame(TEXT, b"hello"))
    dec = FrameDecoder(client_side=True)
    dec.receive_data(frame[:3])
    dec.receive_data(memoryview(frame)[3:])
    frame[2:] = b"XXXXX"  # the caller reuses its read buffer
    assert dec.messages() == [(TEXT, b"hello")]
    with pytest.raises(LocalProtocolError):
        FrameDecoder(client_side=True, max_message_size=-1)


# ---------------------------------------------------------- properties

_sizes = st.sampled_from([0, 1, 2, 3, 4, 5, 50, 124, 125, 126, 127, 300, 65535, 65536, 65537])


@st.composite
def messages_strategy(draw: st.DrawFn) -> list[tuple[int, bytes]]:
    out = []
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from([TEXT, BINARY, PING, PONG]))
        if kind in (PING, PONG):
            out.append((kind, draw(st.binary(max_size=125))))
        elif kind == TEXT:
            out.append((TEXT, draw(st.text(max_size=40)).encode("utf-8")))
        else:
            size = draw(_sizes)
            seed = draw(st.integers(0, 255))
            out.append((BINARY, bytes((seed + i) & 0xFF for i in range(size))))
    return out


@st.composite
def stream_strategy(draw: st.DrawFn, *, masked: bool) -> tuple[bytes, list[tuple[int, bytes]]]:
    """A byte stream of fragmented messages with interleaved controls, and what it means."""
    msgs = draw(messages_strategy())
    stream = b""
    expected: list[tuple[int, bytes]] = []
    for opcode, payload in msgs:
        mask = draw(st.binary(min_size=4, max_size=4)) if masked else None
        if opcode in (PING, PONG):
            stream += raw_frame(opcode, payload, mask=mask)
            expected.append((opcode, payload))
            continue
        cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=3)))
        parts = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)])]
        controls: list[tuple[int, bytes]] = []
        for i, part in enumerate(parts):
            op = opcode if i == 0 else CONTINUATION
            stream += raw_frame(op, part, fin=i == len(parts) - 1, mask=mask)
            if i < len(parts) - 1 and draw(st.booleans()):
                control = (PING, draw(st.binary(max_size=10)))
                stream += raw_frame(*control, mask=mask)
                controls.append(control)
        expected.extend(controls)
        expected.append((opcode, payload))
    return stream, expected


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


@settings(max_examples=60, deadline=None)
@given(stream_strategy(masked=True), st.lists(st.integers(0, 1 << 20), max_size=12))
def test_server_decoder_split_invariance(
    case: tuple[bytes, list[tuple[int, bytes]]], cuts: list[int]
) -> None:
    stream, expected = case
    assert decode_all(stream, client_side=False) == expected
    dec = FrameDecoder(client_side=False)
    got: list[tuple[int, bytes]] = []
    for piece in _split(stream, cuts):
        dec.receive_data(piece)
        got.extend(dec.messages())
    assert got == expected
    assert dec.buffered == 0


@settings(max_examples=60, deadline=None)
@given(stream_strategy(masked=False), st.lists(st.integers(0, 1 << 20), max_size=12))
def test_client_decoder_split_invariance(
    case: tuple[bytes, list[tuple[int, bytes]]], cuts: list[int]
) -> None:
    stream, expected = case
    dec = FrameDecoder(client_side=True)
    got: list[tuple[int, bytes]] = []
    for piece in _split(stream, cuts):
        dec.receive_data(piece)
        got.extend(dec.messages())
    assert got == expected


@settings(max_examples=40, deadline=None)
@given(stream_strategy(masked=True))
def test_one_byte_at_a_time(case: tuple[bytes, list[tuple[int, bytes]]]) -> None:
    stream, expected = case
    dec = FrameDecoder(client_side=False)
    got: list[tuple[int, bytes]] = []
    limit = min(len(stream), 3000)  # byte by byte, then the rest of a long stream at once
    for piece in [stream[i : i + 1] for i in range(limit)] + [stream[limit:]]:
        dec.receive_data(piece)
        got.extend(dec.messages())
    assert got == expected


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from([TEXT, BINARY, PING, PONG, CLOSE]),
    st.binary(max_size=125),
    st.one_of(st.none(), st.binary(min_size=4, max_size=4)),
)
def test_encode_then_decode_round_trip(opcode: int, payload: bytes, mask: bytes | None) -> None:
    if opcode == TEXT:
        payload = payload.decode("latin-1").encode("utf-8")[:125]
        payload = payload.decode("utf-8", "ignore").encode("utf-8")
    if opcode == CLOSE:
        payload = encode_close(1000, payload.hex()[:100])[2:]
    frame = encode_frame(opcode, payload, mask_key=mask)
    assert decode_all(frame, client_side=mask is None) == [(opcode, payload)]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.booleans())
def test_arbitrary_bytes_raise_only_decode_errors(data: bytes, client_side: bool) -> None:
    dec = FrameDecoder(client_side=client_side, max_message_size=200)
    dec.receive_data(data)
    try:
        while dec.messages():
            pass
    except DecodeError as exc:
        assert exc.close_code in (1002, 1007, 1009)


# --------------------------------------------------------------------------- server fast path
# Runs of complete, unfragmented, masked TEXT/BINARY frames are unmasked in one pass
# (FrameDecoder._masked_run); everything else goes through the general walk. These
# tests build long runs with every length form and mask overshoot, interleave what
# must end a run, and check the result against the independent frame builder.

_run_sizes = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 45, 124, 125, 126, 127, 128, 129, 300, 1001])


@st.composite
def run_strategy(draw: st.DrawFn) -> tuple[bytes, list[tuple[int, bytes]]]:
    """Many frames, mostly fast-path ones, with controls and fragments breaking runs."""
    stream = b""
    expected: list[tuple[int, bytes]] = []
    for _ in range(draw(st.integers(1, 40))):
        mask = draw(st.binary(min_size=4, max_size=4))
        kind = draw(st.sampled_from(["text", "text", "text", "binary", "ping", "fragmented"]))
        size = draw(_run_sizes)
        if kind == "ping":
            payload = draw(st.binary(max_size=125))
            stream += raw_frame(PING, payload, mask=mask)
            expected.append((PING, payload))
            continue
        if kind == "binary":
            payload = bytes((size + i) & 0xFF for i in range(size))
            stream += raw_frame(BINARY, payload, mask=mask)
            expected.append((BINARY, payload))
            continue
        payload = (draw(st.text(max_size=3)) + "x" * size).encode("utf-8")
        if kind == "fragmented":
            cut = len(payload) // 2
            stream += raw_frame(TEXT, payload[:cut], fin=False, mask=mask)
            stream += raw_frame(CONTINUATION, payload[cut:], mask=mask)
        else:
            stream += raw_frame(TEXT, payload, mask=mask)
        expected.append((TEXT, payload))
    return stream, expected


@settings(max_examples=150, deadline=None)
@given(run_strategy(), st.lists(st.integers(0, 1 << 20), max_size=8), st.booleans())
def test_fast_path_runs_decode_like_the_frames_say(
    case: tuple[bytes, list[tuple[int, bytes]]], cuts: list[int], validate: bool
) -> None:
    stream, expected = case
    assert decode_all(stream, client_side=False, validate_utf8=validate) == expected
    dec = FrameDecoder(client_side=False, validate_utf8=validate)
    got: list[tuple[int, bytes]] = []
    for piece in _split(stream, cuts):
        dec.receive_data(piece)
        got.extend(dec.messages())
    assert got == expected
    assert dec.buffered == 0


def _masked_texts(sizes: list[int]) -> bytes:
    return b"".join(
        raw_frame(TEXT, bytes([0x61 + i]) * n, mask=bytes([i, 0x5A, 0xA5, 0xFF]))
        for i, n in enumerate(sizes)
    )


@pytest.mark.parametrize(
    ("cap", "sizes"),
    [
        (150, [10, 130, 151, 5]),  # a 16-bit length over the cap ends the run
        (100, [10, 100, 101, 5]),  # a cap under 125: 7-bit lengths need the check too
        (125, [125, 126, 5]),
    ],
)
def test_cap_inside_a_run_returns_the_messages_before_it(cap: int, sizes: list[int]) -> None:
    dec = FrameDecoder(client_side=False, max_message_size=cap)
    dec.receive_data(_masked_texts(sizes))
    ok = sizes[: next(i for i, n in enumerate(sizes) if n > cap)]
    assert [len(p) for _, p in dec.messages()] == ok
    with pytest.raises(PayloadTooLarge):
        dec.messages()


def test_bad_utf8_inside_a_run_returns_the_messages_before_it() -> None:
    good = raw_frame(TEXT, b'{"a":1}', mask=b"\x01\x02\x03\x04")
    bad = raw_frame(TEXT, b'{"a":"\xff"}', mask=b"\x05\x06\x07\x08")
    dec = FrameDecoder(client_side=False)
    dec.receive_data(good + good + bad + good)
    assert dec.messages() == [(TEXT, b'{"a":1}')] * 2
    with pytest.raises(DecodeError) as err:
        dec.messages()
    assert err.value.close_code == 1007
    # Without validation the same stream decodes whole (the caller checks the UTF-8).
    assert len(decode_all(good + good + bad + good, client_side=False, validate_utf8=False)) == 4


def test_unmasked_or_rsv_frame_after_a_run_is_still_refused() -> None:
    run = _masked_texts([3, 200, 4])
    for bad in (raw_frame(TEXT, b"x"), raw_frame(TEXT, b"x", rsv=4, mask=b"abcd")):
        dec = FrameDecoder(client_side=False)
        dec.receive_data(run + bad)
        assert [len(p) for _, p in dec.messages()] == [3, 200, 4]
        with pytest.raises(DecodeError) as err:
            dec.messages()
        assert err.value.close_code == 1002

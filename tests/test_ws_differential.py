"""Ours against the reference implementations: wsproto (frames, handshake) and
websockets, the library wse-client 2.5.1 connects with."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import find, given, settings
from hypothesis import strategies as st
from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import enable_client_permessage_deflate
from websockets.frames import Close, Opcode
from websockets.http11 import Request as WsRequest
from websockets.http11 import Response as WsResponse
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, RejectConnection, TextMessage
from wsproto.events import Request as WsprotoRequest
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import FrameProtocol, ParseFailed

from wse_proto.errors import DecodeError
from wse_proto.ws import (
    ACCEPTED,
    BINARY,
    CLOSE,
    CONTINUATION,
    PING,
    PONG,
    REJECTED,
    TEXT,
    ClientHandshake,
    FrameDecoder,
    HandshakeRejected,
    ServerHandshake,
    binary_frame,
    encode_close,
    encode_frame,
    text_frame,
)

Message = tuple[int, bytes]
SIZES = [0, 1, 2, 5, 124, 125, 126, 127, 1000, 65535, 65536, 65537]


def payload_of(size: int, seed: int) -> bytes:
    return bytes((seed + 7 * i) & 0xFF for i in range(size))


def text_of(size: int, seed: int) -> str:
    alphabet = 'aé€𝄞{}":, '
    return "".join(alphabet[(seed + i) % len(alphabet)] for i in range(size))


def cut(n: int, points: list[int]) -> list[tuple[int, int]]:
    pts = sorted({p % (n + 1) for p in points})
    return list(zip([0, *pts], [*pts, n]))


def ours(stream: bytes, *, client_side: bool, pieces: list[int] | None = None) -> list[Message]:
    dec = FrameDecoder(client_side=client_side, max_message_size=1 << 30)
    out: list[Message] = []
    for a, b in cut(len(stream), pieces or []):
        dec.receive_data(stream[a:b])
        while batch := dec.messages():
            out.extend(batch)
    return out


def wsproto_messages(stream: bytes, *, client: bool) -> tuple[list[Message], int | None]:
    """Complete messages wsproto sees, and the close code it fails with (or None)."""
    proto = FrameProtocol(client=client, extensions=[])
    proto.receive_bytes(stream)
    out: list[Message] = []
    parts: list[bytes] = []
    try:
        for frame in proto.received_frames():
            op = int(frame.opcode)
            if op == CLOSE:
                code, reason = frame.payload
                body = b"" if code == 1005 else struct.pack(">H", code) + reason.encode()
                out.append((CLOSE, body))
            elif op in (PING, PONG):
                out.append((op, bytes(frame.payload)))
            else:
                data = frame.payload
                parts.append(data.encode() if isinstance(data, str) else bytes(data))
                if frame.frame_finished and frame.message_finished:
                    out.append((op, b"".join(parts)))
                    parts = []
    except ParseFailed as exc:
        return out, int(exc.code)
    return out, None


# ------------------------------------------------- valid streams, both ways


@st.composite
def plans(draw: st.DrawFn) -> list[tuple[str, Any, list[int], list[bytes]]]:
    """Messages with fragment cut points and pings to slip between fragments."""
    plan = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["text", "binary", "ping", "pong"]))
        seed = draw(st.integers(0, 255))
        if kind in ("ping", "pong"):
            plan.append((kind, payload_of(draw(st.integers(0, 125)), seed), [], []))
            continue
        size = draw(st.sampled_from(SIZES))
        value: Any = text_of(size, seed) if kind == "text" else payload_of(size, seed)
        cuts = sorted(set(draw(st.lists(st.integers(0, max(size, 0)), max_size=3))))
        pings = draw(st.lists(st.binary(max_size=8), min_size=len(cuts), max_size=len(cuts)))
        plan.append((kind, value, cuts, pings))
    return plan


def expected_of(plan: list[tuple[str, Any, list[int], list[bytes]]]) -> list[Message]:
    out: list[Message] = []
    for kind, value, _cuts, pings in plan:
        if kind in ("ping", "pong"):
            out.append((PING if kind == "ping" else PONG, value))
        else:
            out.extend((PING, p) for p in pings)
            data = value.encode() if kind == "text" else value
            out.append((TEXT if kind == "text" else BINARY, data))
    return out


def encode_with_wsproto(
    plan: list[tuple[str, Any, list[int], list[bytes]]], *, client: bool
) -> bytes:
    proto = FrameProtocol(client=client, extensions=[])
    out = bytearray()
    for kind, value, cuts, pings in plan:
        if kind == "ping":
            out += proto.ping(value)
        elif kind == "pong":
            out += proto.pong(value)
        else:
            spans = list(zip([0, *cuts], [*cuts, len(value)]))
            for i, (a, b) in enumerate(spans):
                out += proto.send_data(value[a:b], fin=i == len(spans) - 1)
                if i < len(pings):
                    out += proto.ping(pings[i])
    return bytes(out)


def encode_with_ours(
    plan: list[tuple[str, Any, list[int], list[bytes]]], masks: list[bytes] | None
) -> bytes:
    out = bytearray()
    counter = 0

    def mask() -> bytes | None:
        nonlocal counter
        counter += 1
        return None if masks is None else masks[counter % len(masks)]

    for kind, value, cuts, pings in plan:
        if kind in ("ping", "pong"):
            out += encode_frame(PING if kind == "ping" else PONG, value, mask_key=mask())
            continue
        opcode = TEXT if kind == "text" else BINARY
        data = value.encode() if kind == "text" else value
        # Cut text on character boundaries, as wsproto must; binary anywhere.
        offsets = [len(value[:c].encode()) for c in cuts] if kind == "text" else cuts
        spans = list(zip([0, *offsets], [*offsets, len(data)]))
        if len(spans) == 1 and masks is None:
            out += text_frame(data) if opcode == TEXT else binary_frame(data)
            continue
        for i, (a, b) in enumerate(spans):
            op = opcode if i == 0 else CONTINUATION
            out += encode_frame(op, data[a:b], mask_key=mask(), fin=i == len(spans) - 1)
            if i < len(pings):
                out += encode_frame(PING, pings[i], mask_key=mask())
    return bytes(out)


masks_st = st.lists(st.binary(min_size=4, max_size=4), min_size=1, max_size=3)
pieces_st = st.lists(st.integers(0, 1 << 18), max_size=6)


@settings(max_examples=40, deadline=None)
@given(plans(), pieces_st)
def test_wsproto_client_frames_decode_on_our_server(plan: Any, pieces: list[int]) -> None:
    stream = encode_with_wsproto(plan, client=True)
    assert ours(stream, client_side=False, pieces=pieces) == expected_of(plan)


@settings(max_examples=40, deadline=None)
@given(plans(), pieces_st)
def test_wsproto_server_frames_decode_on_our_client(plan: Any, pieces: list[int]) -> None:
    stream = encode_with_wsproto(plan, client=False)
    assert ours(stream, client_side=True, pieces=pieces) == expected_of(plan)


@settings(max_examples=40, deadline=None)
@given(plans(), masks_st)
def test_our_client_frames_decode_on_wsproto_server(plan: Any, masks: list[bytes]) -> None:
    stream = encode_with_ours(plan, masks)
    assert wsproto_messages(stream, client=False) == (expected_of(plan), None)
    assert ours(stream, client_side=False) == expected_of(plan)


@settings(max_examples=40, deadline=None)
@given(plans())
def test_our_server_frames_decode_on_wsproto_client(plan: Any) -> None:
    stream = encode_with_ours(plan, None)
    assert wsproto_messages(stream, client=True) == (expected_of(plan), None)


# ----------------------------------- arbitrary (often invalid) frame streams


VIOLATIONS = [
    "rsv",
    "opcode",
    "mask",
    "length16",
    "length64",
    "control-fin",
    "control-long",
    "orphan-cont",
    "bad-utf8",
    "bad-close",
]
TEXT_PIECES = [b"ok", "é".encode(), b"\xe2\x82", b"\xac", b""]


def _frame(draw: st.DrawFn, b0: int, payload: bytes, masked: bool, form: str = "minimal") -> bytes:
    n = len(payload)
    mbit = 0x80 if masked else 0
    if form == "minimal" and n < 126:
        head = bytes([b0, mbit | n])
    elif form == "64" or (form == "minimal" and n > 65535):
        head = bytes([b0, mbit | 127]) + struct.pack(">Q", n)
    else:
        head = bytes([b0, mbit | 126]) + struct.pack(">H", n)
    if masked:
        key = draw(st.binary(min_size=4, max_size=4))
        head += key
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + payload


@st.composite
def raw_frames(draw: st.DrawFn, *, masked_side: bool) -> bytes:
    """Mostly valid frame sequences with occasional violations of every kind.

    Both decoders must agree on the messages and on the close code of the failure.
    """
    out = b""
    in_frag = False
    for _ in range(draw(st.integers(1, 6))):
        if draw(st.integers(0, 9)) == 0:
            kind = draw(st.sampled_from(VIOLATIONS))
            payload = payload_of(draw(st.sampled_from([0, 3, 125, 126])), 5)
            if kind == "rsv":
                b0 = 0x82 | (draw(st.sampled_from([1, 2, 4])) << 4)
                out += _frame(draw, b0, payload, masked_side)
            elif kind == "opcode":
                b0 = 0x80 | draw(st.sampled_from([3, 4, 7, 0xB, 0xF]))
                out += _frame(draw, b0, payload, masked_side)
            elif kind == "mask":
                out += _frame(draw, 0x82, payload, not masked_side)
            elif kind in ("length16", "length64"):
                form = "16" if kind == "length16" else "64"
                b0 = 0x82 if not in_frag else 0x80
                out += _frame(draw, b0, payload, masked_side, form)
            elif kind == "control-fin":
                out += _frame(draw, PING, payload[:10], masked_side)
            elif kind == "control-long":
                out += _frame(draw, 0x80 | PONG, payload_of(126, 1), masked_side)
            elif kind == "orphan-cont" and not in_frag:
                out += _frame(draw, 0x80, payload, masked_side)
            elif kind == "bad-utf8":
                out += _frame(draw, 0x81, b"ok\xff", masked_side)
            else:
                code = draw(st.sampled_from([0, 999, 1004, 1005, 1006, 1014, 1015, 2999, 5000]))
                body = draw(st.sampled_from([b"\x03", struct.pack(">H", code), b"\x03\xe8\xff"]))
                out += _frame(draw, 0x80 | CLOSE, body, masked_side)
            continue
        action = draw(st.sampled_from(["data", "data", "control", "close" if in_frag else "data"]))
        fin = draw(st.booleans())
        if action == "control":
            op = draw(st.sampled_from([PING, PONG]))
            out += _frame(draw, 0x80 | op, payload_of(draw(st.integers(0, 125)), 3), masked_side)
        elif action == "close":
            code = draw(st.sampled_from([1000, 1001, 1012, 1013, 3000, 4401]))
            reason = draw(st.sampled_from([b"", b"bye", "é".encode()]))
            body = draw(st.sampled_from([b"", struct.pack(">H", code) + reason]))
            out += _frame(draw, 0x80 | CLOSE, body, masked_side)
        else:
            if in_frag:
                op = CONTINUATION
                text = draw(st.booleans())
            else:
                op = draw(st.sampled_from([TEXT, BINARY]))
                text = op == TEXT
            if text:
                payload = b"".join(draw(st.lists(st.sampled_from(TEXT_PIECES), max_size=3)))
            else:
                payload = payload_of(draw(st.sampled_from([0, 3, 125, 126, 200, 65536])), 9)
            out += _frame(draw, (0x80 if fin else 0) | op, payload, masked_side)
            in_frag = not fin
    return out


def ours_outcome(stream: bytes, *, client_side: bool) -> tuple[list[Message], int | None]:
    dec = FrameDecoder(client_side=client_side, max_message_size=1 << 30)
    dec.receive_data(stream)
    out: list[Message] = []
    try:
        while batch := dec.messages():
            out.extend(batch)
    except DecodeError as exc:
        return out, exc.close_code
    return out, None


@settings(max_examples=300, deadline=None)
@given(raw_frames(masked_side=True))
def test_server_side_agrees_with_wsproto_on_any_frames(stream: bytes) -> None:
    assert ours_outcome(stream, client_side=False) == wsproto_messages(stream, client=False)


@settings(max_examples=300, deadline=None)
@given(raw_frames(masked_side=False))
def test_client_side_agrees_with_wsproto_on_any_frames(stream: bytes) -> None:
    assert ours_outcome(stream, client_side=True) == wsproto_messages(stream, client=True)


@pytest.mark.parametrize(("outcome", "min_messages"), [(None, 3), (1002, 1), (1007, 1), (1002, 0)])
def test_frame_generator_reaches_every_outcome(outcome: int | None, min_messages: int) -> None:
    """Guard: the generator above yields clean streams and each failure kind."""

    def hit(stream: bytes) -> bool:
        messages, code = ours_outcome(stream, client_side=False)
        return code == outcome and len(messages) >= min_messages

    found = find(
        raw_frames(masked_side=True), hit, settings=settings(database=None, max_examples=2000)
    )
    assert hit(found)


# ------------------------------------------------------- handshake vs wsproto


def test_wsproto_client_request_is_accepted_and_our_101_is_accepted_by_it() -> None:
    client = WSConnection(ConnectionType.CLIENT)
    request = client.send(
        WsprotoRequest(
            host="127.0.0.1:5007",
            target="/wse?client_version=2.5.1&format=msgpack",
            extensions=[PerMessageDeflate()],
            subprotocols=["wse"],
            extra_headers=[(b"cookie", b"access_token=tok")],
        )
    )
    server = ServerHandshake()
    server.receive_data(request)
    assert server.state is ACCEPTED
    req = server.request
    assert req is not None
    assert (req.path, req.cookie, req.wants_msgpack) == ("/wse", "access_token=tok", True)
    assert req.offered_extensions
    client.receive_data(server.accept() + text_frame(b'{"t":"server_ready"}'))
    events = list(client.events())
    assert isinstance(events[0], AcceptConnection)
    assert events[0].extensions == []  # permessage-deflate declined
    assert events[0].subprotocol is None
    assert events[1].data == '{"t":"server_ready"}'


def test_our_client_request_is_accepted_by_a_wsproto_server() -> None:
    ours_client = ClientHandshake(
        "h.test", "/wse?x=1", headers=[("Cookie", "a=b")], rand=lambda n: b"\x07" * n
    )
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(ours_client.request_bytes)
    (event,) = list(server.events())
    assert isinstance(event, WsprotoRequest)
    assert event.target == "/wse?x=1"
    assert (b"cookie", b"a=b") in [(k.lower(), v) for k, v in event.extra_headers]
    reply = server.send(AcceptConnection()) + server.send(TextMessage(data="hi"))
    ours_client.receive_data(reply)
    assert ours_client.state is ACCEPTED
    dec = FrameDecoder(client_side=True)
    dec.receive_data(ours_client.trailing_data)
    assert dec.messages() == [(TEXT, b"hi")]


def test_wsproto_server_rejection_reaches_our_client_as_status() -> None:
    ours_client = ClientHandshake("h.test", "/", rand=lambda n: b"\x01" * n)
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(ours_client.request_bytes)
    list(server.events())
    with pytest.raises(HandshakeRejected) as info:
        ours_client.receive_data(server.send(RejectConnection(status_code=403)))
    assert info.value.status == 403


# --------------------------------------------------- websockets (wse-client)


def websockets_client(query: str = "") -> tuple[ClientProtocol, bytes]:
    """The request wse-client 2.5.1 sends: websockets' defaults plus its headers."""
    protocol = ClientProtocol(
        parse_uri(f"ws://127.0.0.1:5007/wse{query}"),
        extensions=enable_client_permessage_deflate(None),
        max_size=2**20,
    )
    request = protocol.connect()
    request.headers["Cookie"] = "access_token=jwt.token.here"
    request.headers["Authorization"] = "Bearer jwt.token.here"
    request.headers["User-Agent"] = "Python/3.11 websockets/17"
    protocol.send_request(request)
    return protocol, b"".join(protocol.data_to_send())


def test_websockets_client_handshake_and_frames() -> None:
    protocol, request = websockets_client("?client_version=2.5.1&protocol_version=1&format=msgpack")
    assert b"permessage-deflate" in request
    server = ServerHandshake()
    server.receive_data(request)
    assert server.state is ACCEPTED
    req = server.request
    assert req is not None
    assert req.wants_msgpack and req.path == "/wse"
    assert req.cookie == "access_token=jwt.token.here"
    assert req.offered_extensions[0].startswith("permessage-deflate")

    first = text_frame(b'{"c":"WSE","t":"server_ready"}') + binary_frame(b"M:\x80")
    protocol.receive_data(server.accept() + first)
    assert protocol.state is State.OPEN
    assert protocol.extensions == []  # declined by omission
    events = protocol.events_received()
    assert isinstance(events[0], WsResponse) and events[0].status_code == 101
    assert [(f.opcode, f.data) for f in events[1:]] == [
        (Opcode.TEXT, b'{"c":"WSE","t":"server_ready"}'),
        (Opcode.BINARY, b"M:\x80"),
    ]

    # Client frames (masked by websockets) decode on our server side.
    protocol.send_text(b'{"t":"ping"}')
    protocol.send_binary(b"E:" + b"\x00" * 40)
    protocol.send_ping(b"abc")
    protocol.send_text(b"frag-", fin=False)
    protocol.send_continuation(b"ment", fin=True)
    protocol.send_close(1000, "bye")
    dec = FrameDecoder(client_side=False)
    dec.receive_data(b"".join(protocol.data_to_send()))
    assert dec.messages() == [
        (TEXT, b'{"t":"ping"}'),
        (BINARY, b"E:" + b"\x00" * 40),
        (PING, b"abc"),
        (TEXT, b"frag-ment"),
        (CLOSE, b"\x03\xe8bye"),
    ]


@pytest.mark.parametrize(
    ("frame", "code", "reason"),
    [
        (encode_close(None), 1005, ""),
        (encode_close(4401, "Authentication failed"), 4401, "Authentication failed"),
        (encode_close(1001, "server shutting down"), 1001, "server shutting down"),
        (encode_close(4300, "draining"), 4300, "draining"),
    ],
)
def test_websockets_client_reads_our_close_frames(frame: bytes, code: int, reason: str) -> None:
    protocol, request = websockets_client()
    server = ServerHandshake()
    server.receive_data(request)
    protocol.receive_data(server.accept() + frame)
    events = protocol.events_received()
    assert events[-1].opcode is Opcode.CLOSE
    assert protocol.close_rcvd == Close(code, reason)


def test_websockets_client_rejects_oversized_frames_like_wse_client() -> None:
    protocol, request = websockets_client()
    server = ServerHandshake()
    server.receive_data(request)
    protocol.receive_data(server.accept() + binary_frame(b"x" * (2**20 + 1)))
    assert protocol.state is State.CLOSING  # websockets fails the connection (1009)


def test_websockets_server_accepts_our_client_request() -> None:
    client = ClientHandshake(
        "127.0.0.1:5007",
        "/wse?format=msgpack",
        headers=[("Cookie", "t=1")],
        rand=lambda n: b"k" * n,
    )
    server = ServerProtocol()
    server.receive_data(client.request_bytes)
    (request,) = server.events_received()
    assert isinstance(request, WsRequest)
    assert request.path == "/wse?format=msgpack"
    response = server.accept(request)
    assert response.status_code == 101
    server.send_response(response)
    server.send_text(b"hello")
    client.receive_data(b"".join(server.data_to_send()))
    assert client.state is ACCEPTED
    dec = FrameDecoder(client_side=True)
    dec.receive_data(client.trailing_data)
    assert dec.messages() == [(TEXT, b"hello")]


def test_non_websocket_request_from_a_browser_gets_426() -> None:
    browser = b"GET /wse HTTP/1.1\r\nHost: h\r\nAccept: text/html\r\nConnection: keep-alive\r\n\r\n"
    server = ServerHandshake()
    server.receive_data(browser)
    assert server.state is REJECTED and server.status == 426

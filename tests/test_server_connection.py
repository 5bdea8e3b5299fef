"""ServerConnection against the bytes captured from the original (tests/data/client-protocol.json).

The captured client frames are masked here (by a small independent masker) and fed to
the machine; the server frames it produces must be the captured ones, byte for byte,
wherever they are deterministic given the clock, the ids and the connection id. The
clock and the RNG are injected, so ids and timestamps are reproduced by handing the
machine the captured values (the random bits of a captured UUIDv7 are what the RNG
returns for it).

The captured JWTs were signed with a secret we do not have, so the upgrade request is
replayed with a real pyjwt token carrying the same claims; nothing in the server's
answer depends on the token bytes.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import itertools
import json
import pathlib
import random
import zlib
from collections.abc import Iterator
from typing import Any

import jwt as pyjwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wse_proto import codec
from wse_proto.auth import JWTConfig
from wse_proto.config import ServerConfig
from wse_proto.errors import LocalProtocolError, PayloadTooLarge
from wse_proto.events import (
    AuthRejected,
    BytesReceived,
    Connected,
    ConnectionClosed,
    DecryptFailed,
    HelloReceived,
    KeyExchangeFailed,
    MessageReceived,
    TextReceived,
)
from wse_proto.server import ConnectionState, ServerConnection, resolve
from wse_proto.ws import encode_close

DATA = pathlib.Path(__file__).resolve().parent / "data" / "client-protocol.json"
RECORDS: list[dict[str, Any]] = json.loads(DATA.read_text(encoding="utf-8"))["records"]
SECRET = b"wse-py-test-secret-0123456789abcdef"
ISSUER = "wse-peer"
AUDIENCE = "wse-peer-bench"
CONN_ID = "01a20492-38bd-7c13-a892-19f4504307a4"  # the captured connection id


# --------------------------------------------------------------------------- helpers


def rec(i: int) -> dict[str, Any]:
    return RECORDS[i]


def raw(i: int) -> bytes:
    r = rec(i)
    return base64.b64decode(r["data"]) if r["encoding"] == "base64" else r["data"].encode()


def server_frame(i: int) -> bytes:
    """A captured server frame: its header plus its payload."""
    return bytes.fromhex(rec(i)["frame_header_hex"]) + raw(i)


def masked(opcode: int, payload: bytes, key: bytes = b"\x37\xfa\x21\x3d") -> bytes:
    """A masked client frame (RFC 6455 §5.2/§5.3), written independently of wse_proto.ws."""
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        header = bytes((0x80 | opcode, 0xFE)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0xFF)) + n.to_bytes(8, "big")
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload)) if n < 4096 else _bulk(payload, key)
    return header + key + body


def _bulk(payload: bytes, key: bytes) -> bytes:
    rep = (key * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(rep, "big")).to_bytes(
        len(payload), "big"
    )


def ts_ms(text: str) -> int:
    """Milliseconds of an RFC 3339 ``...Z`` timestamp."""
    d = dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)
    return int(d.timestamp() * 1000 + 0.5)


def uuid7_rand(uuid: str) -> bytes:
    """The 10 RNG bytes envelope.uuid7 turns into ``uuid`` (rand_a, then rand_b)."""
    v = int(uuid.replace("-", ""), 16)
    return ((v >> 64) & 0x0FFF).to_bytes(2, "big") + (v & ((1 << 62) - 1)).to_bytes(8, "big")


class Clock:
    def __init__(self, ms: int = 1_795_373_021_000) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


class Rand:
    """Queued answers first (when the size matches), then a seeded PRNG."""

    def __init__(self) -> None:
        self.queue: list[bytes] = []
        self._prng = random.Random(1234)

    def __call__(self, n: int) -> bytes:
        if self.queue and len(self.queue[0]) == n:
            return self.queue.pop(0)
        return self._prng.randbytes(n)


def token(**claims: Any) -> str:
    base = {"sub": "alice", "iss": ISSUER, "aud": AUDIENCE, "iat": 1795373021, "exp": 1795376621}
    base.update(claims)
    return pyjwt.encode({k: v for k, v in base.items() if v is not None}, SECRET, "HS256")


def request(
    cookie: str | None = "default",
    bearer: str | None = "default",
    path: str = "/wse",
    key: str = "goDO3MzHCE0d77y2Dkxikg==",
) -> bytes:
    """The captured upgrade request (record 0) with our own token(s)."""
    tok = token()
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: 127.0.0.1:18100",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if cookie is not None:
        lines.append(f"Cookie: access_token={tok if cookie == 'default' else cookie}")
    if bearer is not None:
        lines.append(f"Authorization: Bearer {tok if bearer == 'default' else bearer}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def accept_101(key: str) -> bytes:
    digest = hashlib.sha1(key.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nconnection: Upgrade\r\nupgrade: websocket\r\n"
        b"sec-websocket-accept: " + base64.b64encode(digest) + b"\r\n\r\n"
    )


def make(
    conn_id: str = CONN_ID, seq: Iterator[int] | None = None, **config: Any
) -> tuple[ServerConnection, Clock, Rand]:
    clock = Clock()
    rand = Rand()
    config.setdefault("jwt", JWTConfig(SECRET, issuer=ISSUER, audience=AUDIENCE))
    counter = seq if seq is not None else itertools.count()
    conn = ServerConnection(
        ServerConfig(**config),
        conn_id=conn_id,
        now=0.0,
        rand=rand,
        wall_ms=clock,
        next_seq=lambda: next(counter),
    )
    return conn, clock, rand


def open_with_ready(
    ready_record: int, req: bytes | None = None, **kwargs: Any
) -> tuple[ServerConnection, Clock, Rand]:
    """Upgrade + JWT, reproducing the captured server_ready of ``ready_record``."""
    ready = json.loads(rec(ready_record)["data"])
    conn, clock, rand = make(conn_id=ready["p"]["details"]["connection_id"], **kwargs)
    clock.ms = ts_ms(ready["ts"])
    rand.queue.append(uuid7_rand(ready["id"]))
    user = ready["p"]["details"]["user_id"]
    conn.receive_data(req if req is not None else request(cookie=token(sub=user)), 0.0)
    out = conn.data_to_send()
    assert out.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert out.endswith(server_frame(ready_record))
    return conn, clock, rand


# --------------------------------------------------------------------------- the main capture


def test_captured_session_byte_for_byte() -> None:
    conn, clock, rand = make()
    # Record 0/1/2: upgrade with JWT, the exact 101, then server_ready as the first frame.
    ready = json.loads(rec(2)["data"])
    clock.ms = ts_ms(ready["ts"])
    rand.queue.append(uuid7_rand(ready["id"]))
    conn.receive_data(request(), 0.0)
    assert conn.data_to_send() == raw(1) + server_frame(2)
    events = conn.events_received()
    assert len(events) == 1 and isinstance(events[0], Connected)
    assert events[0].user_id == "alice" and events[0].path == "/wse"
    assert conn.state is ConnectionState.OPEN and conn.user_id == "alice"

    # Record 3/4: client_hello without encryption -> server_hello.
    clock.ms = ts_ms(json.loads(rec(4)["data"])["p"]["server_time"])
    conn.receive_data(masked(1, raw(3)), 0.1)
    assert conn.data_to_send() == server_frame(4)
    assert conn.events_received() == [HelloReceived(1, False)]

    # Record 5/6 and 7/8: JSON ping (also WSE-prefixed) -> the literal PONG.
    clock.ms = json.loads(rec(6)["data"])["p"]["server_timestamp"]
    conn.receive_data(masked(1, raw(5)) + masked(1, raw(7)), 0.2)
    assert conn.data_to_send() == server_frame(6) + server_frame(8)
    assert conn.events_received() == []

    # Record 9/10: uppercase PING is not the fast path: it goes to the app, no reply.
    conn.receive_data(masked(1, raw(9)), 0.3)
    assert conn.data_to_send() == b""
    assert conn.events_received() == [MessageReceived(json.loads(raw(9)))]

    # Record 11-14: a WebSocket ping gets exactly one pong (F3), not the original's two.
    conn.receive_data(masked(9, raw(11)), 0.4)
    assert conn.data_to_send() == server_frame(12)

    # Record 19/20: the app answers with send_event; binary JSON with id/seq/ts added.
    reply = json.loads(rec(20)["data"])
    clock.ms = ts_ms(reply["ts"])
    rand.queue.append(uuid7_rand(reply["id"]))
    conn.receive_data(masked(1, raw(19)), 0.5)
    request_msg = conn.events_received()
    assert request_msg == [MessageReceived({"t": "echo", "p": {"hello": "world"}})]
    n = conn.send_event({"t": "echo", "p": {"hello": "world"}}, now=0.5)
    assert conn.data_to_send() == server_frame(20)
    assert n == len(raw(20))

    # Record 21-23: over the 1024-byte threshold -> C: + zlib level 1 (body bytes may
    # differ from zlib-rs, the decompressed envelope may not).
    big = json.loads(rec(23)["data"])
    clock.ms = ts_ms(big["ts"])
    rand.queue.append(uuid7_rand(big["id"]))
    conn.receive_data(masked(1, raw(21)), 0.6)
    assert conn.events_received() == [MessageReceived(json.loads(raw(21)))]
    conn.send_event({"t": "echo", "p": big["p"]}, now=0.6)
    out = conn.data_to_send()
    assert out[:2] == b"\x82\x7e" and out[4:8] == b"C:\x78\x01"
    assert int.from_bytes(out[2:4], "big") == len(out) - 4
    assert zlib.decompress(out[6:]) == raw(23)

    # Record 24-31: non-JSON text, truncated JSON, binary garbage, E: without a key.
    conn.receive_data(
        masked(1, raw(24)) + masked(1, raw(26)) + masked(2, raw(28)) + masked(2, raw(30)), 0.7
    )
    assert conn.data_to_send() == b""
    assert conn.events_received() == [
        TextReceived(raw(24).decode()),
        TextReceived(raw(26).decode()),
        BytesReceived(raw(28)),
        DecryptFailed("no key negotiated"),
    ]
    assert conn.state is ConnectionState.OPEN and conn.decrypt_failures == 1

    # Record 32-34: invalid public key -> KEY_EXCHANGE_FAILED, then server_hello (false).
    clock.ms = ts_ms(json.loads(rec(34)["data"])["p"]["server_time"])
    conn.receive_data(masked(1, raw(32)), 0.8)
    assert conn.data_to_send() == server_frame(33) + server_frame(34)
    assert conn.events_received() == [
        KeyExchangeFailed("Invalid ECDH public key: crypto error"),
        HelloReceived(1, False),
    ]
    assert not conn.encrypted

    # Record 36/37: the client's close 1000 "bye" is echoed verbatim.
    conn.receive_data(masked(8, raw(36)), 0.9)
    assert conn.data_to_send() == server_frame(37)
    assert conn.events_received() == [ConnectionClosed(1000, "bye")]
    assert conn.state is ConnectionState.CLOSED and conn.wants_close


def test_captured_101_is_what_the_test_helper_computes() -> None:
    """The independent accept_101 helper reproduces record 1 from record 0's key."""
    assert raw(1) == accept_101("goDO3MzHCE0d77y2Dkxikg==")


# --------------------------------------------------------------------------- auth failures


def _expired() -> str:
    return token(iat=1795300000, exp=1795373021 - 40)  # 40 s past: beyond the 30 s leeway


def _other_key() -> str:
    return pyjwt.encode(
        {"sub": "alice", "exp": 1795376621}, b"another-secret-of-32-bytes-or-more!", "HS256"
    )


@pytest.mark.parametrize(
    ("cookie", "bearer", "records", "code"),
    [
        (None, None, (39, 40), "AUTH_REQUIRED"),
        ("bad", "bad", (42, 43), "AUTH_FAILED"),
        ("expired", None, (45, 46), "AUTH_FAILED"),
        ("audience", None, (48, 49), "AUTH_FAILED"),
    ],
)
def test_auth_failures_match_capture(
    cookie: str | None, bearer: str | None, records: tuple[int, int], code: str
) -> None:
    tokens = {
        "bad": _other_key(),
        "expired": _expired(),
        "audience": token(aud="somebody-else"),
    }
    conn, clock, _ = make()
    error = json.loads(rec(records[0])["data"])
    clock.ms = ts_ms(error["p"]["timestamp"])
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    conn.receive_data(
        request(
            cookie=tokens.get(cookie, cookie) if cookie else None,
            bearer=tokens.get(bearer, bearer) if bearer else None,
            key=key,
        ),
        0.0,
    )
    # K4: HTTP 101, one error text frame, then Close 4401 "Authentication failed".
    assert conn.data_to_send() == accept_101(key) + server_frame(records[0]) + server_frame(
        records[1]
    )
    events = conn.events_received()
    assert events[0] == AuthRejected(code, error["p"]["message"])
    assert events[1] == ConnectionClosed(4401, "Authentication failed")
    assert events[1].error is not None and events[1].error.error_code == code
    assert len(events) == 2
    assert conn.state is ConnectionState.CLOSED and conn.wants_close
    # Refuses further input quietly.
    conn.receive_data(masked(1, b'{"t":"ping"}'), 1.0)
    assert conn.data_to_send() == b"" and conn.events_received() == []


def test_token_missing_user_id() -> None:
    conn, _, _ = make()
    conn.receive_data(request(cookie=token(sub=None)), 0.0)
    out = conn.data_to_send()
    assert b'"message":"Token missing user ID"' in out
    assert out.endswith(server_frame(40))


@pytest.mark.parametrize(("cookie", "bearer", "ready"), [(False, True, 51), (True, False, 53)])
def test_single_token_source_gives_server_ready(cookie: bool, bearer: bool, ready: int) -> None:
    tok = token(sub="bob")
    req = request(cookie=tok if cookie else None, bearer=tok if bearer else None)
    conn, _, _ = open_with_ready(ready, req)
    [connected] = conn.events_received()
    assert isinstance(connected, Connected) and connected.user_id == "bob"
    assert connected.cookies == (f"access_token={tok}" if cookie else "")


def test_no_jwt_configured_connects_with_cookies_and_no_server_ready() -> None:
    conn, _, _ = make(jwt=None)
    req = request(cookie="whatever; theme=dark", bearer=None)
    conn.receive_data(req, 0.0)
    assert conn.data_to_send() == accept_101("goDO3MzHCE0d77y2Dkxikg==")
    assert conn.events_received() == [
        Connected(user_id=None, cookies="access_token=whatever; theme=dark", path="/wse", query="")
    ]


# --------------------------------------------------------------------------- limits


def test_oversize_message_gets_close_1009() -> None:
    """Record 54/55: a text message of 1 MiB + 10 bytes. The original answered with a
    status-less Close (captured); we send 1009 (decision F12)."""
    conn, _, _ = open_with_ready(2)
    assert isinstance(conn.events_received()[0], Connected)
    conn.receive_data(masked(1, b"x" * (1_048_576 + 10)), 1.0)
    assert server_frame(55) == b"\x88\x00"
    assert conn.data_to_send() == encode_close(1009, "message too large")
    [closed] = conn.events_received()
    assert closed == ConnectionClosed(1009, "message too large")
    assert isinstance(closed.error, PayloadTooLarge)
    assert conn.wants_close


# --------------------------------------------------------------------------- encryption


def test_encrypted_connection_frame_shapes_match_capture() -> None:
    """Records 56-71. The server key is random, so server_hello is compared with the key
    swapped in; E: frames are compared by header (IV + tag add exactly 28 bytes)."""
    conn, clock, rand = open_with_ready(56)
    conn.events_received()
    hello = json.loads(rec(58)["data"])
    clock.ms = ts_ms(hello["p"]["server_time"])
    conn.receive_data(masked(1, raw(57)), 1.0)
    out = conn.data_to_send()
    ours = json.loads(out[4:])["p"]["encryption_public_key"]
    expected = raw(58).replace(hello["p"]["encryption_public_key"].encode(), ours.encode())
    assert out == bytes.fromhex(rec(58)["frame_header_hex"]) + expected
    assert conn.encrypted and conn.events_received() == [HelloReceived(1, True)]

    # Record 59/60: a plain JSON ping still gets a plain PONG.
    clock.ms = json.loads(rec(60)["data"])["p"]["server_timestamp"]
    conn.receive_data(masked(1, raw(59)), 1.1)
    assert conn.data_to_send() == server_frame(60)

    # Record 61/62: broadcast -> per-connection E: binary frame.
    conn.send_broadcast(b"\x81\x22" + raw(62), raw(62))
    out = conn.data_to_send()
    assert out[:2] == bytes.fromhex(rec(61)["frame_header_hex"]) and out[2:4] == b"E:"

    # Record 63-65 and 69-71: send_event replies, never compressed (F4 and the original).
    for request_rec, plain_rec, frame_rec in ((63, 65, 64), (69, 71, 70)):
        reply = json.loads(rec(plain_rec)["data"])
        clock.ms = ts_ms(reply["ts"])
        rand.queue.append(uuid7_rand(reply["id"]))
        conn.receive_data(masked(1, raw(request_rec)), 1.2)
        conn.send_event({"t": "echo", "p": reply["p"], "seq": reply["seq"]}, now=1.2)
        out = conn.data_to_send()
        header = bytes.fromhex(rec(frame_rec)["frame_header_hex"])
        assert out[: len(header)] == header and out[len(header) : len(header) + 2] == b"E:"
        assert len(out) == len(header) + 2 + 12 + len(raw(plain_rec)) + 16

    # send_text/send_bytes stay plain even on an encrypted connection (§4.3).
    conn.send_text("hi")
    conn.send_bytes(b"\x00")
    assert conn.data_to_send() == b"\x81\x02hi\x82\x01\x00"


# --------------------------------------------------------------------------- msgpack


def test_msgpack_connection_matches_capture() -> None:
    """Records 72-76: ?format=msgpack -> send_event is M: + msgpack; broadcasts stay text."""
    req = request(cookie=token(sub="mp-user"), path="/wse?format=msgpack", bearer=None)
    conn, clock, rand = open_with_ready(72, req, seq=iter([6]))
    assert conn.msgpack
    reply = json.loads(rec(75)["data"])
    clock.ms = ts_ms(reply["ts"])
    rand.queue.append(uuid7_rand(reply["id"]))
    conn.receive_data(masked(1, raw(73)), 1.0)
    conn.events_received()
    conn.send_event({"t": "echo", "p": {"a": 1}}, now=1.0)
    assert conn.data_to_send() == server_frame(74)
    conn.send_broadcast(server_frame(76), raw(76))
    assert conn.data_to_send() == server_frame(76)


# --------------------------------------------------------------------------- heartbeat


def test_server_pings_match_capture() -> None:
    """Records 77-80 (ping_interval=1): the literal server ping, once per interval."""
    conn, clock, _ = open_with_ready(77, ping_interval=1.0, idle_timeout=3.5)
    assert conn.next_deadline() == 1.0
    for i, record in enumerate((78, 79, 80), start=1):
        clock.ms = ts_ms(json.loads(rec(record)["data"])["p"]["server_time"])
        conn.handle_timer(float(i))
        assert conn.data_to_send() == server_frame(record)
        assert conn.next_deadline() == (float(i + 1) if i < 3 else 3.5)
    conn.handle_timer(3.49)  # nothing due yet
    assert conn.data_to_send() == b""
    # F2: at idle_timeout the connection gets a status-less Close (no deadlock).
    conn.handle_timer(3.5)
    assert conn.data_to_send() == b"\x88\x00"
    assert conn.events_received()[-1] == ConnectionClosed(None, "idle timeout")
    assert conn.state is ConnectionState.CLOSING


def test_send_before_handshake_is_local_misuse() -> None:
    conn, _, _ = make()
    with pytest.raises(LocalProtocolError):
        conn.send_text("too early")
    with pytest.raises(LocalProtocolError):
        conn.send_event({"t": "x"}, now=0.0)


# --------------------------------------------------------------------------- wse-client 2.5.1


def _text_payload(frame: bytes) -> str:
    """The payload of one unmasked text frame (server -> client)."""
    assert frame[0] == 0x81
    n = frame[1]
    if n == 126:
        return frame[4:].decode()
    assert n < 126 and len(frame) == n + 2
    return frame[2:].decode()


@pytest.mark.interop
def test_wse_client_transport_rules_accept_our_heartbeats() -> None:
    """K2 / reference §3.5: wse-client's ConnectionManager._handle_raw_message (called
    here, not re-implemented) must see our server ping and PONG as heartbeats, and the
    PONG it answers with must be consumed by our server."""
    import asyncio

    from wse_client.connection import ConnectionManager

    conn, clock, _ = open_with_ready(2, ping_interval=10.0, idle_timeout=15.0)
    conn.events_received()
    clock.ms += 10_000
    conn.handle_timer(10.0)
    ping_text = _text_payload(conn.data_to_send())

    manager = ConnectionManager("ws://127.0.0.1:9/wse")
    delivered: list[str | bytes] = []
    fired: list[Any] = []
    sent: list[str] = []

    async def capture_send(data: str) -> bool:
        sent.append(data)
        return True

    manager._on_message = delivered.append
    manager._fire_task = fired.append  # the coroutine wse-client would schedule
    manager.send = capture_send  # type: ignore[method-assign]
    manager._last_pong = None

    manager._handle_raw_message(ping_text)
    assert manager._last_pong is not None and delivered == []
    assert [c.cr_code.co_name for c in fired] == ["_respond_ping_json"]
    asyncio.run(fired.pop())
    [pong_reply] = sent
    assert (
        json.loads(pong_reply)["p"]["server_timestamp"] == json.loads(ping_text)["p"]["server_time"]
    )
    # Our server consumes wse-client's PONG silently, and it counts as activity.
    conn.receive_data(masked(1, pong_reply.encode()), 14.0)
    assert conn.events_received() == [] and conn.data_to_send() == b""
    assert conn.next_deadline() == 20.0  # the idle deadline moved from 15.0 to 29.0
    conn.handle_timer(20.0)
    assert conn.state is ConnectionState.OPEN and conn.next_deadline() == 29.0

    # wse-client's own JSON ping (its _heartbeat_loop form) -> our PONG -> seen as PONG.
    wse_ping = json.dumps(
        {"c": "WSE", "t": "ping", "p": {"timestamp": clock.ms - 3}, "v": 1}, separators=(",", ":")
    )
    conn.data_to_send()
    conn.receive_data(masked(1, wse_ping.encode()), 21.0)
    pong_text = _text_payload(conn.data_to_send())
    manager._last_pong = None
    manager._handle_raw_message(pong_text)
    assert manager._last_pong is not None and delivered == [pong_text] and fired == []
    assert json.loads(pong_text)["p"]["latency"] == 3

    # Negative control: the same PONG with sorted keys would not pass the 25-char rule.
    manager._last_pong = None
    manager._handle_raw_message(
        json.dumps(json.loads(pong_text), sort_keys=True, separators=(",", ":"))
    )
    assert manager._last_pong is None


@pytest.mark.interop
def test_wse_client_codec_and_security_against_our_server() -> None:
    """wse-client 2.5.1's own SecurityManager and MessageCodec against ServerConnection:
    key exchange, E: both ways, C: compression, plain JSON, control frames."""
    from wse_client.compression import CompressionHandler
    from wse_client.msgpack_handler import MsgPackHandler
    from wse_client.protocol import MessageCodec
    from wse_client.security import SecurityManager

    conn, _, _ = open_with_ready(2)
    conn.events_received()
    security = SecurityManager()
    public = base64.b64encode(security.generate_keypair()).decode()
    codec = MessageCodec(CompressionHandler(), security=security, msgpack=MsgPackHandler())
    hello = {
        "c": "WSE",
        "t": "client_hello",
        "p": {
            "client_version": "2.0.7",
            "protocol_version": 1,
            "features": {"compression": True, "encryption": True},
            "connection_id": CONN_ID,
            "encryption_public_key": public,
        },
        "v": 1,
        "pri": 10,
    }
    conn.receive_data(masked(1, json.dumps(hello, separators=(",", ":")).encode()), 1.0)
    server_hello = codec.decode(_text_payload(conn.data_to_send()))
    assert server_hello.type == "server_hello" and server_hello.payload["features"]["encryption"]
    security.derive_shared_secret(base64.b64decode(server_hello.payload["encryption_public_key"]))
    assert conn.encrypted and security.is_enabled
    assert conn.events_received() == [HelloReceived(1, True)]

    # Server -> client: send_event (large: still not compressed) and a broadcast.
    for event in ({"t": "quote", "p": {"px": 1.25}}, {"t": "doc", "p": {"s": "q" * 3000}}):
        conn.send_event(event, now=1.0)
        frame = conn.data_to_send()
        payload = frame[4:] if frame[1] == 126 else frame[2:]
        decoded = codec.decode(payload)
        assert decoded.type == event["t"] and decoded.payload == event["p"]
    conn.send_broadcast(b"unused for encrypted", b'{"c":"U","t":"news","p":{"n":1}}')
    frame = conn.data_to_send()
    decoded = codec.decode(frame[2:])
    assert (decoded.type, decoded.payload, decoded.category) == ("news", {"n": 1}, "U")

    # Client -> server: wse-client's E: frames decrypt to the application message.
    message = codec.encode("order", {"qty": 3})
    conn.receive_data(masked(2, b"E:" + security.encrypt(message)), 1.1)
    assert conn.events_received() == [MessageReceived(json.loads(message))]
    # A tampered frame is dropped with a DecryptFailed event; the connection stays open.
    bad = bytearray(b"E:" + security.encrypt(message))
    bad[-1] ^= 1
    conn.receive_data(masked(2, bytes(bad)), 1.2)
    assert conn.events_received() == [DecryptFailed("AES-GCM authentication failed")]
    assert conn.state is ConnectionState.OPEN


@pytest.mark.interop
def test_wse_client_codec_decodes_plain_compressed_and_msgpack_frames() -> None:
    from wse_client.compression import CompressionHandler
    from wse_client.msgpack_handler import MsgPackHandler
    from wse_client.protocol import MessageCodec

    codec = MessageCodec(CompressionHandler(), security=None, msgpack=MsgPackHandler())
    for msgpack_conn in (False, True):
        path = "/wse?format=msgpack" if msgpack_conn else "/wse"
        conn, _, _ = open_with_ready(2, request(path=path))
        for p in ({"a": [1, 2.5, None]}, {"blob": "w" * 5000}):
            conn.send_event({"t": "x", "p": p}, now=1.0)
            frame = conn.data_to_send()
            payload = frame[4:] if frame[1] == 126 else frame[2:]
            assert payload[:2] == (b"M:" if msgpack_conn else b"C:" if "blob" in p else b'{"')
            decoded = codec.decode(payload)
            assert decoded.type == "x" and decoded.payload == p


# --------------------------------------------------------------------------- handshake edges


def test_frames_in_the_same_packet_as_the_request() -> None:
    """Bytes after the request head go to the frame decoder, after server_ready."""
    conn, clock, _ = make()
    clock.ms = 1_795_373_021_379
    conn.receive_data(request() + masked(1, raw(5)) + masked(1, b'{"t":"a"}'), 0.0)
    out = conn.data_to_send()
    assert out.endswith(server_frame(6))
    assert out.index(b'"t":"server_ready"') < out.index(b'"t":"PONG"')
    events = conn.events_received()
    assert [type(e) for e in events] == [Connected, MessageReceived]


@pytest.mark.parametrize("split", [1, 7, 100])
def test_request_split_anywhere(split: int) -> None:
    whole, _, _ = make(jwt=None)
    whole.receive_data(request(), 0.0)
    parts, _, _ = make(jwt=None)
    data = request()
    for i in range(0, len(data), split):
        parts.receive_data(data[i : i + split], 0.0)
    assert parts.data_to_send() == whole.data_to_send()
    assert parts.events_received() == whole.events_received()


def test_bad_upgrade_is_rejected_with_http_error() -> None:
    conn, _, _ = make()
    conn.receive_data(b"GET /wse HTTP/1.1\r\nHost: x\r\n\r\n", 0.0)
    out = conn.data_to_send()
    assert out.startswith(b"HTTP/1.1 426 ")
    [closed] = conn.events_received()
    assert isinstance(closed, ConnectionClosed) and closed.code == 1006
    assert conn.wants_close


def test_handshake_timeout_is_exact() -> None:
    conn, _, _ = make(handshake_timeout=10.0)
    conn.receive_data(b"GET /wse HTTP/1.1\r\n", 3.0)  # a slow sender
    assert conn.next_deadline() == 10.0
    conn.handle_timer(9.999)
    assert conn.state is ConnectionState.HANDSHAKE
    conn.handle_timer(10.0)
    assert conn.events_received() == [ConnectionClosed(1006, "handshake timeout")]
    assert conn.wants_close and conn.data_to_send() == b"" and conn.next_deadline() is None


def test_config_is_validated_like_the_original() -> None:
    with pytest.raises(ValueError, match="idle_timeout"):
        ServerConfig(ping_interval=25, idle_timeout=25)
    with pytest.raises(ValueError):
        ServerConfig(max_message_size=0)
    with pytest.raises(ValueError):
        ServerConfig(rate_limit_capacity=0)
    assert ServerConfig(ping_interval=1, idle_timeout=2).idle_timeout == 2


def test_hello_protocol_version_and_cluster_flag() -> None:
    """§3.1: min(client version, 2); 1 when absent or not an unsigned integer."""
    cluster = [False]
    conn, _, _ = open_with_ready(2, cluster_connected=lambda: cluster[0])
    conn.events_received()
    for version, expected in ((5, 2), (0, 0), (-1, 1), (1.0, 1), (True, 1), ("2", 1), (None, 1)):
        cluster[0] = not cluster[0]
        hello = {"t": "client_hello", "p": {"protocol_version": version}}
        conn.receive_data(masked(1, json.dumps(hello).encode()), 1.0)
        reply = json.loads(_text_payload(conn.data_to_send()))
        assert reply["p"]["protocol_version"] == expected
        assert reply["p"]["features"]["cluster"] is cluster[0]
        assert conn.events_received() == [HelloReceived(expected, False)]
    # {"type": "client_hello"} is not intercepted: it is an application message (§3.2).
    conn.receive_data(masked(1, b'{"type":"client_hello"}'), 1.0)
    assert conn.data_to_send() == b""
    assert conn.events_received() == [MessageReceived({"t": "client_hello"})]


# --------------------------------------------------------------------------- inbound fast path
# A JSON object text frame is parsed straight from its bytes and queued in compact form
# (server.resolve parses it again for the hub). Whatever the text, the events must be
# those of the general route: codec.decode_client_text plus the §3.2 interceptions.

_INTERCEPTED = {"client_hello", "ping", "pong", "PONG"}
_json_scalars = st.one_of(
    st.sampled_from(["ping", "pong", "PONG", "client_hello", "bench", "Ping", "", "é€"]),
    st.integers(-(2**70), 2**70),
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
)
_json_values = st.recursive(
    _json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["t", "p", "i", "timestamp"]), inner, max_size=3)
    ),
    max_leaves=6,
)
_objects = st.dictionaries(
    st.sampled_from(["t", "type", "p", "payload", "id", "x"]), _json_values, max_size=5
)
_odd_texts = st.sampled_from(
    [
        '{"t":"p\\u0069ng","p":{"timestamp":5}}',  # an escaped ping is still a ping
        '{"\\u0074":"ping"}',
        '{"t":"x","t":"ping"}',  # duplicate key: the last one counts
        '{"t":"ping","t":"x"}',
        '{"type":"ping","payload":{}}',  # renamed, never intercepted
        ' {"t":"ping"}',
        '{"t":"ping"} junk',
        "{",
        "{]",
        "{}",
        "hello",
        "",
        'WSE{"t":"ping"}',
        'S{"t":"a","payload":1}',
        'U{"type":"b"}',
        '{"t":"client_hello","p":{"protocol_version":2}}',
        '{"t":["ping"]}',
        '{"t":{"a":1},"p":2}',
        '{"t":null,"payload":3}',
    ]
)


@st.composite
def _client_texts(draw: st.DrawFn) -> str:
    if draw(st.booleans()):
        return draw(_odd_texts)
    return json.dumps(draw(_objects), ensure_ascii=draw(st.booleans()))


def _expected(texts: list[str]) -> tuple[list[Any], int]:
    """Events of the general route, and how many PONG replies it writes."""
    events: list[Any] = []
    pongs = 0
    for text in texts:
        inbound = codec.decode_client_text(text)
        if inbound.kind == "msg" and inbound.raw_type in _INTERCEPTED:
            if inbound.raw_type == "client_hello":
                events.append(HelloReceived)
            pongs += inbound.raw_type == "ping"
        elif inbound.kind == "msg":
            events.append(MessageReceived(inbound.value))
        else:
            events.append(TextReceived(inbound.value))
    return events, pongs


def _open_plain(deferred: bool = False) -> ServerConnection:
    conn, _, _ = make(jwt=None)
    conn._mode.deferred = deferred  # what the hub sets while its queue is deep
    conn.receive_data(request(bearer=None), 0.0)
    conn.data_to_send()
    assert [type(e) for e in conn.events_received()] == [Connected]
    return conn


@pytest.mark.parametrize("deferred", [False, True])
@settings(max_examples=100, deadline=None)
@given(texts=st.lists(_client_texts(), min_size=1, max_size=25))
def test_text_fast_path_matches_the_general_route(deferred: bool, texts: list[str]) -> None:
    keys = [bytes([i, 7, 99, 200]) for i in range(len(texts))]
    frames = b"".join(masked(1, t.encode("utf-8"), k) for t, k in zip(texts, keys))
    expected, pongs = _expected(texts)
    conn = _open_plain(deferred)
    conn.receive_data(frames, 1.0)
    got = [HelloReceived if isinstance(e, HelloReceived) else e for e in conn.events_received()]
    assert got == expected
    assert conn.data_to_send().count(b'"t":"PONG"') == pongs
    # The hub's route: compact items, resolved into the same drain tuples.
    other = _open_plain(deferred)
    other.receive_data(frames, 1.0)
    items, _ = other.take_items()
    messages = [i for i in items if isinstance(i, bytes | tuple)]
    assert deferred or not any(isinstance(i, bytes) for i in messages)
    drained = resolve(other.conn_id, messages)
    want = [
        ("msg", other.conn_id, e.value)
        if isinstance(e, MessageReceived)
        else ("raw", other.conn_id, e.text)
        for e in expected
        if e is not HelloReceived
    ]
    assert drained == want


def test_invalid_utf8_in_a_json_looking_frame_fails_the_connection() -> None:
    conn = _open_plain()
    conn.receive_data(masked(1, b'{"t":"a"}') + masked(1, b'{"t":"\xff"}') + masked(1, b"{}"), 1.0)
    events = conn.events_received()
    assert events[0] == MessageReceived({"t": "a"})
    assert isinstance(events[1], ConnectionClosed) and events[1].code == 1007
    assert len(events) == 2
    assert conn.wants_close


def test_idle_deadline_moves_once_per_batch_and_not_after_a_failure() -> None:
    conn = _open_plain()
    idle = conn.config.idle_timeout
    conn.receive_data(masked(1, b'{"t":"a"}') * 3, 5.0)
    assert conn.next_deadline() == min(5.0 + idle, conn.config.ping_interval)
    conn.receive_data(masked(1, b'{"t":"a"}') + masked(1, b"\xff"), 9.0)
    assert conn.next_deadline() is None  # closed: no timer but the transport's close

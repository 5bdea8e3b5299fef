"""ClientConnection on its own: what it sends compared with wse-client 2.5.1's own code,
and how it reacts to every server frame form, driven by hand-made server bytes."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import random
import zlib
from typing import Any

import msgpack
import pytest

from wse_proto.client import ClientConnection
from wse_proto.crypto import EncryptionSession, derive_key, generate_keypair
from wse_proto.errors import LocalProtocolError
from wse_proto.events import (
    ConnectionClosed,
    DecodeFailed,
    Hello,
    PingReceived,
    PongReceived,
    Ready,
    Received,
    Upgraded,
)
from wse_proto.server import ConnectionState
from wse_proto.ws import FrameDecoder

T0 = 1_795_373_021_000


class Clock:
    def __init__(self) -> None:
        self.ms = T0

    def __call__(self) -> int:
        return self.ms


def client(**kwargs: Any) -> tuple[ClientConnection, Clock]:
    clock = Clock()
    kwargs.setdefault("host", "127.0.0.1:5006")
    conn = ClientConnection(rand=random.Random(3).randbytes, wall_ms=clock, **kwargs)
    return conn, clock


def frame(opcode: int, payload: bytes) -> bytes:
    """An unmasked server frame, written independently of wse_proto.ws."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big") + payload


def text(obj: Any) -> bytes:
    return frame(1, json.dumps(obj, separators=(",", ":")).encode())


def upgrade(conn: ClientConnection, now: float = 0.0) -> bytes:
    """Answer the client's upgrade request with a valid 101; returns the request."""
    req = conn.data_to_send()
    key = next(
        line.split(b": ", 1)[1]
        for line in req.split(b"\r\n")
        if line.lower().startswith(b"sec-websocket-key:")
    )
    accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    conn.receive_data(
        b"HTTP/1.1 101 Switching Protocols\r\nconnection: Upgrade\r\nupgrade: websocket\r\n"
        b"sec-websocket-accept: " + accept + b"\r\n\r\n",
        now,
    )
    return req


def sent_frames(conn: ClientConnection) -> list[tuple[int, bytes]]:
    """What the client sent, decoded as a server would (frames must be masked)."""
    dec = FrameDecoder(client_side=False, max_message_size=1 << 24)
    dec.receive_data(conn.data_to_send())
    return dec.messages()


READY = {
    "c": "WSE",
    "t": "server_ready",
    "p": {"details": {"connection_id": "cid-9", "features": {"recovery": True}}},
    "seq": 1,
    "v": 1,
}


# --------------------------------------------------------------------------- the upgrade


@pytest.mark.interop
@pytest.mark.parametrize("encryption", [False, True])
def test_upgrade_target_and_auth_headers_match_wse_client(encryption: bool) -> None:
    from wse_client.connection import ConnectionManager
    from wse_client.security import SecurityManager

    manager = ConnectionManager(
        "ws://127.0.0.1:5006/wse",
        token="tok.en.x",
        security=SecurityManager() if encryption else None,
    )
    expected_target = manager._build_url().removeprefix("ws://127.0.0.1:5006")
    conn, _ = client(token="tok.en.x", encryption=encryption)
    req = conn.data_to_send().decode()
    assert req.startswith(f"GET {expected_target} HTTP/1.1\r\n")
    assert "\r\nCookie: access_token=tok.en.x\r\n" in req
    assert "\r\nAuthorization: Bearer tok.en.x\r\n" in req


def test_msgpack_query_and_no_token() -> None:
    conn, _ = client(msgpack=True, token=None, path="/ws?x=1")
    req = conn.data_to_send().decode()
    first = req.split("\r\n", 1)[0]
    assert first.startswith("GET /ws?x=1&client_version=2.0.7&") and "&format=msgpack " in first
    assert "Cookie" not in req and "Authorization" not in req


def test_rejected_upgrade_ends_the_connection() -> None:
    conn, _ = client()
    conn.data_to_send()
    conn.receive_data(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n", 0.0)
    [closed] = conn.events_received()
    assert isinstance(closed, ConnectionClosed) and closed.code == 1006
    assert closed.error is not None and "400" in closed.reason
    assert conn.wants_close
    conn.receive_data(b"more", 0.1)  # refused quietly
    assert conn.events_received() == [] and conn.data_to_send() == b""


# --------------------------------------------------------------------------- hello


@pytest.mark.interop
@pytest.mark.parametrize("encryption", [False, True])
def test_client_hello_after_server_ready_like_wse_client(encryption: bool) -> None:
    from wse_client.connection import ConnectionManager
    from wse_client.security import SecurityManager

    conn, _ = client(encryption=encryption)
    upgrade(conn)
    assert conn.events_received() == [Upgraded()]
    assert conn.data_to_send() == b""  # nothing before server_ready
    conn.receive_data(text(READY), 0.1)
    assert conn.events_received() == [Ready(READY["p"])]
    [(opcode, payload)] = sent_frames(conn)
    ours = json.loads(payload)

    # What wse-client 2.5.1 itself sends in the same situation.
    manager = ConnectionManager("ws://h/wse", security=SecurityManager() if encryption else None)
    sent: list[str] = []

    async def capture(data: str) -> bool:
        sent.append(data)
        return True

    manager.send = capture  # type: ignore[method-assign]
    manager._connection_id = "cid-9"
    asyncio.run(manager._send_client_hello())
    theirs = json.loads(sent[0])

    assert opcode == 1
    assert list(ours) == list(theirs)  # same keys, same order
    for volatile in ("id", "ts"):
        ours.pop(volatile), theirs.pop(volatile)
    ours_key = ours["p"].pop("encryption_public_key", None)
    theirs_key = theirs["p"].pop("encryption_public_key", None)
    assert ours == theirs
    assert (ours_key is None) is (theirs_key is None) is (not encryption)
    if encryption:
        assert len(base64.b64decode(ours_key)) == 65


def test_encryption_key_from_server_hello_then_everything_is_encrypted() -> None:
    conn, _ = client(encryption=True)
    upgrade(conn)
    conn.receive_data(text(READY), 0.1)
    [(_, hello_bytes)] = sent_frames(conn)
    client_key = json.loads(hello_bytes)["p"]["encryption_public_key"]
    server_pair = generate_keypair(random.Random(9).randbytes)
    session = EncryptionSession(derive_key(server_pair, client_key), random.Random(5).randbytes)
    conn.events_received()
    server_hello = {
        "c": "WSE",
        "t": "server_hello",
        "p": {
            "features": {"encryption": True},
            "encryption_public_key": server_pair.public_key_b64,
        },
        "v": 1,
    }
    conn.receive_data(text(server_hello), 0.2)
    assert conn.events_received() == [Hello(server_hello["p"], True)]
    assert conn.encrypted

    sent = conn.send_message("buy", {"qty": 1})
    conn.send_ping()
    conn.send_text("raw")
    frames = sent_frames(conn)
    assert [op for op, _ in frames] == [2, 2, 2]
    plain = [session.decrypt(payload) for _, payload in frames]
    assert json.loads(plain[0]) == sent
    assert json.loads(plain[1])["t"] == "ping" and plain[2] == b"raw"

    # Server E: frames are decrypted with the session.
    conn.receive_data(frame(2, session.encrypt(b'{"t":"fill","p":{"qty":1}}')), 0.3)
    assert conn.events_received() == [Received({"t": "fill", "p": {"qty": 1}})]
    with pytest.raises(LocalProtocolError):
        conn.send_bytes(b"\xff\xfe")  # only UTF-8 can be encrypted (like wse-client)
    conn.send_bytes(b"\xff\xfe", encrypt=False)
    assert sent_frames(conn) == [(2, b"\xff\xfe")]


# --------------------------------------------------------------------------- heartbeats


@pytest.mark.interop
def test_pong_reply_matches_wse_client() -> None:
    from wse_client.connection import ConnectionManager

    ping = b'{"c":"WSE","t":"ping","p":{"server_time":"2026-11-22T18:43:47.278Z"}}'
    conn, clock = client()
    upgrade(conn)
    conn.events_received()
    conn.receive_data(frame(1, ping), 1.0)
    assert conn.events_received() == [PingReceived("2026-11-22T18:43:47.278Z")]
    [(opcode, payload)] = sent_frames(conn)

    manager = ConnectionManager("ws://h/wse")
    sent: list[str] = []

    async def capture(data: str) -> bool:
        sent.append(data)
        return True

    manager.send = capture  # type: ignore[method-assign]
    asyncio.run(manager._respond_ping_json(ping.decode()))
    ours, theirs = json.loads(payload), json.loads(sent[0])
    assert opcode == 1 and list(ours) == list(theirs) and list(ours["p"]) == list(theirs["p"])
    assert ours["p"]["client_timestamp"] == clock.ms
    ours["p"].pop("client_timestamp"), theirs["p"].pop("client_timestamp")
    assert ours == theirs


def test_heartbeat_detection_is_wse_clients_25_character_rule() -> None:
    conn, clock = client(ping_interval=15.0)
    upgrade(conn, now=0.0)
    conn.events_received()
    assert conn.next_deadline() == 15.0
    conn.handle_timer(15.0)
    [(_, ping)] = sent_frames(conn)
    assert json.loads(ping) == {"c": "WSE", "t": "ping", "p": {"timestamp": T0}, "v": 1}
    assert conn.next_deadline() == 30.0
    clock.ms += 35
    literal = (
        b'{"c":"WSE","t":"PONG","p":{"client_timestamp":%d,"server_timestamp":1,"latency":0},"v":1}'
    )
    conn.receive_data(frame(1, literal % T0), 15.1)
    assert conn.events_received() == [PongReceived(35)]
    # Key-sorted, "t" is past the 25th character: wse-client would not see a PONG either.
    sorted_pong = {"c": "WSE", "p": {"client_timestamp": T0}, "t": "PONG", "v": 1}
    conn.receive_data(text(sorted_pong), 15.2)
    assert conn.events_received() == [Received(sorted_pong)]
    assert sent_frames(conn) == []


def test_late_timer_does_not_burst_pings() -> None:
    conn, _ = client(ping_interval=10.0)
    upgrade(conn, now=100.0)
    conn.handle_timer(145.0)  # the transport slept through several intervals
    assert len(sent_frames(conn)) == 1
    assert conn.next_deadline() == 150.0


# --------------------------------------------------------------------------- server frame forms


def test_every_server_frame_form_is_decoded() -> None:
    conn, _ = client()
    upgrade(conn)
    conn.events_received()
    env = {"c": "U", "t": "tick", "p": {"n": 1}, "v": 1}
    body = json.dumps(env).encode()
    forms = [
        frame(1, body),  # text JSON (broadcast form)
        frame(1, b'WSE{"t":"sys","p":{}}'),  # legacy prefix sets c
        frame(2, body),  # send_event: JSON in a binary frame
        frame(2, b"C:" + zlib.compress(body, 1)),  # compressed
        frame(2, b"M:" + msgpack.packb(env)),  # msgpack
        frame(2, zlib.compress(body)),  # raw zlib
        frame(2, msgpack.packb(env)),  # raw msgpack (not UTF-8)
        text({"t": "batch", "p": {"messages": [{"t": "a", "p": {}}, {"t": "b", "p": 5}]}}),
    ]
    conn.receive_data(b"".join(forms), 1.0)
    events = conn.events_received()
    assert [e.envelope["t"] for e in events] == ["tick", "sys"] + ["tick"] * 5 + ["a", "b"]  # type: ignore[attr-defined]
    assert events[1] == Received({"t": "sys", "p": {}, "c": "WSE"})
    assert events[-1] == Received({"t": "b", "p": {"data": 5}})


def test_undecodable_frames_are_reported_not_fatal() -> None:
    conn, _ = client()
    upgrade(conn)
    conn.events_received()
    conn.receive_data(frame(1, b"not json") + frame(2, b"E:" + bytes(40)), 1.0)
    events = conn.events_received()
    assert [type(e) for e in events] == [DecodeFailed, DecodeFailed]
    assert conn.state is ConnectionState.OPEN


def test_control_frames_and_close() -> None:
    conn, _ = client()
    upgrade(conn)
    conn.events_received()
    conn.receive_data(frame(9, b"hb"), 1.0)
    assert sent_frames(conn) == [(10, b"hb")]
    conn.receive_data(frame(8, b"\x11\x31Authentication failed"), 1.1)
    assert conn.events_received() == [ConnectionClosed(4401, "Authentication failed")]
    assert sent_frames(conn) == [(8, b"\x11\x31Authentication failed")]  # echoed, masked
    assert conn.wants_close


def test_oversize_server_frame_fails_with_1009() -> None:
    conn, _ = client(max_message_size=100)
    upgrade(conn)
    conn.events_received()
    conn.receive_data(frame(1, b"x" * 101), 1.0)
    [closed] = conn.events_received()
    assert isinstance(closed, ConnectionClosed) and closed.code == 1009
    [(opcode, payload)] = sent_frames(conn)
    assert opcode == 8 and payload[:2] == b"\x03\xf1"


def test_close_timeout_and_misuse() -> None:
    conn, _ = client(close_timeout=3.0)
    with pytest.raises(LocalProtocolError):
        conn.send_message("early", {})
    upgrade(conn, now=10.0)
    conn.close(1000, "bye", now=20.0)
    assert conn.state is ConnectionState.CLOSING and conn.next_deadline() == 23.0
    conn.send_text("dropped")  # a send racing the close is dropped, not an error
    assert sent_frames(conn) == [(8, b"\x03\xe8bye")]
    conn.handle_timer(22.9)
    assert conn.state is ConnectionState.CLOSING
    conn.handle_timer(23.0)
    assert conn.state is ConnectionState.CLOSED
    events = conn.events_received()
    assert events[-1] == ConnectionClosed(1000, "bye")
    assert sum(isinstance(e, ConnectionClosed) for e in events) == 1

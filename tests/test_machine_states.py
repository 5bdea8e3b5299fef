"""Every (state, input) pair of both connection machines, drawn by hypothesis (h2 style).

Each pair must either follow the transition table, or end CLOSING/CLOSED with a Close
queued and one terminal event; the only exception allowed out of a machine is
LocalProtocolError, and only for application misuse (sending before the upgrade).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import random
from collections.abc import Callable
from typing import Any

import jwt as pyjwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wse_proto.auth import JWTConfig
from wse_proto.client import ClientConnection
from wse_proto.config import ServerConfig
from wse_proto.errors import LocalProtocolError
from wse_proto.events import ConnectionClosed, Event
from wse_proto.server import (
    CLIENT_TRANSITIONS,
    SERVER_TRANSITIONS,
    ConnectionState,
    Input,
    ServerConnection,
)
from wse_proto.ws import CLOSE, FrameDecoder

S = ConnectionState
SECRET = b"machine-states-secret-0123456789abc"
T0 = 1_795_373_021_000


def _mask(opcode: int, payload: bytes, key: bytes = b"\x01\x02\x03\x04") -> bytes:
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        header = bytes((0x80 | opcode, 0xFE)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0xFF)) + n.to_bytes(8, "big")
    return header + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def _plain(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    return bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big") + payload


def _request(token: str | None) -> bytes:
    lines = [
        "GET /wse?format=msgpack HTTP/1.1",
        "Host: h",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ]
    if token:
        lines.append(f"Cookie: access_token={token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# --------------------------------------------------------------------------- server side

SERVER_BYTES: dict[str, bytes] = {
    "handshake": _request(pyjwt.encode({"sub": "u", "exp": T0 // 1000 + 99}, SECRET, "HS256")),
    "handshake_bad_token": _request("not-a-jwt"),
    "http_garbage": b"\x16\x03\x01\x02\x00garbage",
    "text": _mask(1, b'{"t":"chat","p":{"m":1}}'),
    "text_raw": _mask(1, b"plain words"),
    "ping_json": _mask(1, b'{"t":"ping","p":{"timestamp":1}}'),
    "hello": _mask(1, b'{"t":"client_hello","p":{"features":{"encryption":true}}}'),
    "binary": _mask(2, b"\x81\xa1t\xa1x"),
    "encrypted_garbage": _mask(2, b"E:" + bytes(40)),
    "ws_ping": _mask(9, b"p"),
    "ws_pong": _mask(10, b"p"),
    "close": _mask(8, b"\x03\xe8bye"),
    "close_statusless": _mask(8, b""),
    "bad_utf8": _mask(1, b"\xff\xfe"),
    "bad_close": _mask(8, b"\x03"),
    "unmasked": _plain(1, b"{}"),
    "reserved_bits": b"\xf1\x80\x00\x00\x00\x00",
    "oversize": _mask(2, b"\x00" * 2048),
}
SERVER_DATA_OK = {"text", "text_raw", "ping_json", "hello", "binary", "encrypted_garbage"}
SERVER_DATA_OK |= {"ws_ping", "ws_pong"}
SERVER_FRAME_ERRORS = {"bad_close", "unmasked", "reserved_bits", "oversize"}
SERVER_APP: dict[str, Callable[[ServerConnection], Any]] = {
    "send_event": lambda c: c.send_event({"t": "x", "p": {}}, now=1.0),
    "send_text": lambda c: c.send_text("t"),
    "send_bytes": lambda c: c.send_bytes(b"b"),
    "send_broadcast": lambda c: c.send_broadcast(b"\x81\x02{}", b"{}"),
}
OTHER = ["eof", "abort", "close_app", "timer_due", "timer_late"]
SERVER_KINDS = sorted(SERVER_BYTES) + sorted(SERVER_APP) + OTHER


def new_server(jwt: bool = True) -> ServerConnection:
    seq = itertools.count()
    return ServerConnection(
        ServerConfig(max_message_size=1024, jwt=JWTConfig(SECRET) if jwt else None),
        conn_id="c",
        now=0.0,
        rand=random.Random(0).randbytes,
        wall_ms=lambda: T0,
        next_seq=lambda: next(seq),
    )


def server_in(state: ConnectionState, jwt: bool) -> tuple[ServerConnection, list[Event]]:
    conn = new_server(jwt)
    if state is not S.HANDSHAKE:
        conn.receive_data(SERVER_BYTES["handshake"], 0.5)
    if state is S.CLOSING:
        conn.close(1000, "bye", now=0.6)
    if state is S.CLOSED:
        conn.receive_data(SERVER_BYTES["close"], 0.6)
    assert conn.state is state
    conn.data_to_send()
    return conn, conn.events_received()


def apply_server(conn: ServerConnection, kind: str) -> None:
    if kind in SERVER_BYTES:
        conn.receive_data(SERVER_BYTES[kind], 1.0)
    elif kind in SERVER_APP:
        SERVER_APP[kind](conn)
    elif kind == "eof":
        conn.receive_eof(1.0)
    elif kind == "abort":
        conn.abort()
    elif kind == "close_app":
        conn.close(None, now=1.0)
    elif kind == "timer_due":
        deadline = conn.next_deadline()
        conn.handle_timer(deadline if deadline is not None else 1.0)
    elif kind == "timer_late":
        conn.handle_timer(10_000.0)
    else:  # pragma: no cover
        raise AssertionError(kind)


def expected_server(state: ConnectionState, kind: str, jwt: bool) -> tuple[Input | None, S]:
    """The input the machine must see and the state it must end in (None: no transition)."""
    if state is S.CLOSED:
        return None, S.CLOSED
    if kind in SERVER_APP:
        if state is S.HANDSHAKE:
            return Input.SEND, S.HANDSHAKE  # missing from the table: LocalProtocolError
        return Input.SEND, state
    if kind == "eof":
        return Input.EOF, S.CLOSED
    if kind == "abort":
        return Input.ABORT, S.CLOSED
    if kind == "close_app":
        return Input.CLOSE, SERVER_TRANSITIONS[(state, Input.CLOSE)]
    if state is S.HANDSHAKE:
        if kind in ("timer_due", "timer_late"):
            return Input.HANDSHAKE_TIMEOUT, S.CLOSED
        if kind == "handshake":
            return Input.ACCEPT, S.OPEN
        if kind == "handshake_bad_token" and jwt:
            return Input.AUTH_FAIL, S.CLOSED
        if kind == "handshake_bad_token":
            return Input.ACCEPT, S.OPEN
        return Input.REJECT, S.CLOSED  # anything else is not an HTTP request
    if kind == "timer_due":
        return (Input.PING_DUE, S.OPEN) if state is S.OPEN else (Input.CLOSE_TIMEOUT, S.CLOSED)
    if kind == "timer_late":
        if state is S.OPEN:
            return Input.IDLE_TIMEOUT, S.CLOSING
        return Input.CLOSE_TIMEOUT, S.CLOSED
    if kind in ("close", "close_statusless"):
        return Input.RECV_CLOSE, S.CLOSED
    if kind in SERVER_DATA_OK:
        return Input.RECV_MESSAGE, state
    if kind == "bad_utf8":  # text is only decoded while OPEN
        return (Input.PEER_ERROR, S.CLOSED) if state is S.OPEN else (Input.RECV_MESSAGE, state)
    # Framing errors, oversize, HTTP bytes where frames are expected.
    return Input.PEER_ERROR, S.CLOSED


def _close_frames(output: bytes) -> list[bytes]:
    dec = FrameDecoder(client_side=True, max_message_size=1 << 20)
    # The 101 (and HTTP error answers) come first; frames follow the blank line.
    if output.startswith(b"HTTP/"):
        output = output.split(b"\r\n\r\n", 1)[1]
    dec.receive_data(output)
    return [payload for op, payload in dec.messages() if op == CLOSE]


def _check_outcome(
    conn: ServerConnection | ClientConnection,
    state: ConnectionState,
    kind: str,
    target: ConnectionState,
    close_queued: Callable[[bytes], bool],
) -> None:
    """After one input in ``state``: the state is ``target``, output and events agree with it,
    and leaving OPEN on our own (not EOF or abort) queued a Close (``close_queued(out)``)."""
    assert conn.state is target
    assert conn.wants_close is (target is S.CLOSED)
    out = conn.data_to_send()
    events = conn.events_received()
    closed = [e for e in events if isinstance(e, ConnectionClosed)]
    if state is S.CLOSED:
        assert out == b"" and events == []
    elif target is not state and target in (S.CLOSING, S.CLOSED):
        # Exactly one terminal event per connection: CLOSING already emitted it.
        assert len(closed) == (0 if state is S.CLOSING else 1), events
        if state is S.OPEN and kind not in ("eof", "abort"):
            assert close_queued(out), out  # a Close was queued for the peer
    else:
        assert closed == []


def _masked_close_last(out: bytes) -> bool:
    """The client's output ends with a (masked) Close frame."""
    dec = FrameDecoder(client_side=False, max_message_size=1 << 20)
    dec.receive_data(out)
    return [op for op, _ in dec.messages()][-1] == CLOSE


@settings(max_examples=400, deadline=None)
@given(
    state=st.sampled_from(list(S)),
    kind=st.sampled_from(SERVER_KINDS),
    jwt=st.booleans(),
)
def test_server_every_state_input_pair(state: ConnectionState, kind: str, jwt: bool) -> None:
    conn, _ = server_in(state, jwt)
    inp, target = expected_server(state, kind, jwt)
    if inp is not None:
        assert SERVER_TRANSITIONS.get((state, inp), state) == target
    if state is S.HANDSHAKE and kind in SERVER_APP:
        with pytest.raises(LocalProtocolError):
            apply_server(conn, kind)
        assert conn.state is S.HANDSHAKE
        return
    apply_server(conn, kind)  # nothing else may raise
    _check_outcome(conn, state, kind, target, lambda out: bool(_close_frames(out)))
    # After CLOSED every input is refused quietly.
    if conn.state is S.CLOSED:
        for other in SERVER_KINDS:
            apply_server(conn, other)
        assert conn.data_to_send() == b"" and conn.events_received() == []


@settings(max_examples=150, deadline=None)
@given(kinds=st.lists(st.sampled_from(SERVER_KINDS), max_size=25), jwt=st.booleans())
def test_server_random_input_sequences(kinds: list[str], jwt: bool) -> None:
    conn = new_server(jwt)
    targets = {(a, b) for (a, _), b in SERVER_TRANSITIONS.items()}
    terminal = 0
    for kind in kinds:
        before = conn.state
        try:
            apply_server(conn, kind)
        except LocalProtocolError:
            assert before is S.HANDSHAKE and kind in SERVER_APP
        after = conn.state
        assert after is before or (before, after) in targets
        if before is S.CLOSED:
            assert after is S.CLOSED
        terminal += sum(isinstance(e, ConnectionClosed) for e in conn.events_received())
        assert terminal <= 1
        assert terminal == 1 or after in (S.HANDSHAKE, S.OPEN)
        conn.data_to_send()


def test_tables_make_closed_absorbing_and_every_state_reachable() -> None:
    for table in (SERVER_TRANSITIONS, CLIENT_TRANSITIONS):
        assert all(new is S.CLOSED for (old, _), new in table.items() if old is S.CLOSED)
        reachable = {S.HANDSHAKE}
        for _ in range(4):
            reachable |= {new for (old, _), new in table.items() if old in reachable}
        assert reachable == set(S)
        # Sending before the upgrade is the only missing application input.
        assert (S.HANDSHAKE, Input.SEND) not in table
        assert all((s, Input.EOF) in table and (s, Input.ABORT) in table for s in S)


# --------------------------------------------------------------------------- client side

CLIENT_BYTES: dict[str, bytes] = {
    "text": _plain(1, b'{"c":"U","t":"x","p":{}}'),
    "ready": _plain(1, b'{"c":"WSE","t":"server_ready","p":{"connection_id":"z"}}'),
    "server_ping": _plain(1, b'{"c":"WSE","t":"ping","p":{"server_time":"t"}}'),
    "binary_json": _plain(2, b'{"t":"y","p":{}}'),
    "undecodable": _plain(2, b"\xc1\xc1"),
    "ws_ping": _plain(9, b"p"),
    "ws_pong": _plain(10, b"p"),
    "close": _plain(8, b"\x03\xe8"),
    "bad_utf8": _plain(1, b"\xff"),
    "masked": _mask(1, b"{}"),
    "bad_close": _plain(8, b"\x00\x00"),
    "http_400": b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n",
    "oversize": _plain(2, b"\x00" * 2048),
}
CLIENT_DATA_OK = {"text", "ready", "server_ping", "binary_json", "undecodable"}
CLIENT_DATA_OK |= {"ws_ping", "ws_pong"}
CLIENT_APP: dict[str, Callable[[ClientConnection], Any]] = {
    "send_message": lambda c: c.send_message("m", {}),
    "send_text": lambda c: c.send_text("t"),
    "send_bytes": lambda c: c.send_bytes(b"b"),
    "send_ping": lambda c: c.send_ping(),
    "subscribe": lambda c: c.subscribe(["a"]),
    "send_hello": lambda c: c.send_hello(),
}
CLIENT_KINDS = ["upgrade", *sorted(CLIENT_BYTES), *sorted(CLIENT_APP), *OTHER]


class _Client:
    def __init__(self) -> None:
        self.conn = ClientConnection(
            host="h",
            token="tok",
            encryption=True,
            rand=random.Random(1).randbytes,
            wall_ms=lambda: T0,
            max_message_size=1024,
        )
        request = self.conn.data_to_send()
        key = request.split(b"Sec-WebSocket-Key: ", 1)[1].split(b"\r\n", 1)[0]
        digest = hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
        self.upgrade = (
            b"HTTP/1.1 101 Switching Protocols\r\nconnection: Upgrade\r\nupgrade: websocket\r\n"
            b"sec-websocket-accept: " + base64.b64encode(digest) + b"\r\n\r\n"
        )

    def apply(self, kind: str) -> None:
        conn = self.conn
        if kind == "upgrade":
            conn.receive_data(self.upgrade, 1.0)
        elif kind in CLIENT_BYTES:
            conn.receive_data(CLIENT_BYTES[kind], 1.0)
        elif kind in CLIENT_APP:
            CLIENT_APP[kind](conn)
        elif kind == "eof":
            conn.receive_eof(1.0)
        elif kind == "abort":
            conn.abort()
        elif kind == "close_app":
            conn.close(1000, now=1.0)
        elif kind == "timer_due":
            deadline = conn.next_deadline()
            conn.handle_timer(deadline if deadline is not None else 1.0)
        else:
            conn.handle_timer(10_000.0)


def client_in(state: ConnectionState) -> _Client:
    c = _Client()
    if state is not S.HANDSHAKE:
        c.apply("upgrade")
    if state is S.CLOSING:
        c.conn.close(1000, now=0.6)
    if state is S.CLOSED:
        c.apply("close")
    assert c.conn.state is state
    c.conn.data_to_send()
    c.conn.events_received()
    return c


def expected_client(state: ConnectionState, kind: str) -> S:
    if state is S.CLOSED or kind in ("eof", "abort"):
        return S.CLOSED
    if kind in CLIENT_APP:
        return state
    if kind == "close_app":
        return CLIENT_TRANSITIONS[(state, Input.CLOSE)]
    if state is S.HANDSHAKE:
        if kind == "upgrade":
            return S.OPEN
        return S.CLOSED  # handshake timeout, or anything that is not a valid 101
    if kind in ("timer_due", "timer_late"):
        return S.OPEN if state is S.OPEN else S.CLOSED
    if kind in CLIENT_DATA_OK:
        return state
    if kind == "bad_utf8":
        return S.CLOSED if state is S.OPEN else state
    return S.CLOSED  # close, framing errors, HTTP bytes where frames are expected


@settings(max_examples=300, deadline=None)
@given(state=st.sampled_from(list(S)), kind=st.sampled_from(CLIENT_KINDS))
def test_client_every_state_input_pair(state: ConnectionState, kind: str) -> None:
    c = client_in(state)
    conn = c.conn
    if state is S.HANDSHAKE and kind in CLIENT_APP:
        with pytest.raises(LocalProtocolError):
            c.apply(kind)
        assert conn.state is S.HANDSHAKE
        return
    c.apply(kind)
    target = expected_client(state, kind)
    _check_outcome(conn, state, kind, target, _masked_close_last)


@settings(max_examples=150, deadline=None)
@given(kinds=st.lists(st.sampled_from(CLIENT_KINDS), max_size=25))
def test_client_random_input_sequences(kinds: list[str]) -> None:
    c = _Client()
    targets = {(a, b) for (a, _), b in CLIENT_TRANSITIONS.items()}
    terminal = 0
    for kind in kinds:
        before = c.conn.state
        try:
            c.apply(kind)
        except LocalProtocolError:
            assert before is S.HANDSHAKE and kind in CLIENT_APP
        after = c.conn.state
        assert after is before or (before, after) in targets
        terminal += sum(isinstance(e, ConnectionClosed) for e in c.conn.events_received())
        assert terminal <= 1
        assert terminal == 1 or after in (S.HANDSHAKE, S.OPEN)
        c.conn.data_to_send()

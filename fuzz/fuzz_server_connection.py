"""Arbitrary bytes after a valid upgrade must never raise out of ServerConnection.

The first input byte picks the setup (JWT or not, msgpack connection, encryption
agreed or not) and where the rest is cut in two; the rest is fed as client bytes,
then timers fire and the application sends. Nothing at all may escape (``ALLOWED``
is empty: bad peer input becomes events and a Close), and the machine's invariants
must hold: at most one ConnectionClosed, ``wants_close`` exactly when CLOSED.
"""

from __future__ import annotations

import itertools
import json
import random

from wse_proto.auth import JWTConfig, encode_token
from wse_proto.config import ServerConfig
from wse_proto.crypto import EncryptionSession, derive_key, keypair_from_scalar
from wse_proto.events import ConnectionClosed
from wse_proto.server import ConnectionState, ServerConnection
from wse_proto.ws import encode_frame

ALLOWED: tuple[type[BaseException], ...] = ()

_SECRET = b"fuzz-server-connection-secret-0123"
_T0 = 1_795_373_021_000
_CLIENT_KEYS = keypair_from_scalar(0x1234_5678_9ABC_DEF0_1234_5678_9ABC_DEF0)
_MASK = b"\x0f\xf0\x55\xaa"


def _request(msgpack: bool) -> bytes:
    token = encode_token({"sub": "fuzz", "exp": _T0 // 1000 + 3600}, _SECRET)
    target = "/wse?format=msgpack" if msgpack else "/wse"
    return (
        f"GET {target} HTTP/1.1\r\nHost: f\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"Cookie: access_token={token}\r\n\r\n"
    ).encode()


def _masked(opcode: int, payload: bytes) -> bytes:
    return encode_frame(opcode, payload, mask_key=_MASK)


def _setup(flags: int) -> tuple[ServerConnection, EncryptionSession | None]:
    jwt, msgpack, encrypt = bool(flags & 1), bool(flags & 2), bool(flags & 4)
    seq = itertools.count()
    rand = random.Random(flags).randbytes
    conn = ServerConnection(
        ServerConfig(max_message_size=4096, jwt=JWTConfig(_SECRET) if jwt else None),
        conn_id="fuzz",
        now=0.0,
        rand=rand,
        wall_ms=lambda: _T0,
        next_seq=lambda: next(seq),
    )
    conn.receive_data(_request(msgpack), 0.0)
    session = None
    if encrypt:
        hello = {
            "t": "client_hello",
            "p": {
                "features": {"encryption": True},
                "encryption_public_key": _CLIENT_KEYS.public_key_b64,
            },
        }
        conn.receive_data(_masked(1, json.dumps(hello).encode()), 0.0)
        reply = conn.data_to_send().split(b'"encryption_public_key":"', 1)[1]
        server_key = reply.split(b'"', 1)[0].decode()
        session = EncryptionSession(derive_key(_CLIENT_KEYS, server_key), rand)
    conn.data_to_send()
    conn.events_received()
    assert conn.state is ConnectionState.OPEN
    return conn, session


def target(data: bytes) -> None:
    flags = data[0] if data else 0
    cut = data[1] if len(data) > 1 else 0
    body = data[2:]
    conn, _ = _setup(flags)
    closed = 0
    for chunk in (body[:cut], body[cut:]):
        conn.receive_data(chunk, 1.0)
        closed += sum(isinstance(e, ConnectionClosed) for e in conn.events_received())
        conn.data_to_send()
    for now in (30.0, 100.0, 200.0):
        deadline = conn.next_deadline()
        conn.handle_timer(now if deadline is None else max(deadline, now))
        if conn.state is not ConnectionState.HANDSHAKE:
            conn.send_event({"t": "after", "p": {}}, now=now)
            conn.send_broadcast(b"\x81\x02{}", b"{}")
        closed += sum(isinstance(e, ConnectionClosed) for e in conn.events_received())
        conn.data_to_send()
    conn.receive_eof(300.0)
    closed += sum(isinstance(e, ConnectionClosed) for e in conn.events_received())
    assert closed == 1, closed
    assert conn.state is ConnectionState.CLOSED and conn.wants_close


def _seeds() -> list[bytes]:
    _, session = _setup(7)
    assert session is not None
    frames = [
        _masked(1, b'{"t":"chat","p":{"m":"hi"}}'),
        _masked(1, b'WSE{"t":"ping","p":{"timestamp":1}}'),
        _masked(1, b'{"t":"client_hello","p":{"protocol_version":5}}'),
        _masked(1, b"plain"),
        _masked(2, b"\x82\xa1t\xa1m\xa1p\x80"),
        _masked(2, session.encrypt(b'{"t":"secret","p":{}}')),
        _masked(2, session.encrypt(b"{broken")),
        _masked(9, b"hb"),
        _masked(10, b""),
        _masked(8, b"\x03\xe8bye"),
        encode_frame(1, b"{}", mask_key=_MASK, fin=False) + _masked(0, b""),
    ]
    seeds = []
    for flags in range(8):
        seeds.append(bytes((flags, 0)) + b"".join(frames))
        seeds.append(bytes((flags, 7)) + frames[0] + frames[5])
    return seeds


SEEDS: list[bytes] = _seeds()

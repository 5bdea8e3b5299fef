"""ServerConnection <-> ClientConnection in memory, on a virtual clock.

Bytes are passed both ways (optionally cut at arbitrary points); nothing is mocked:
real JWTs (pyjwt), real ECDH/AES-GCM, real zlib/msgpack.
"""

from __future__ import annotations

import itertools
import random
import zlib
from collections.abc import Callable
from typing import Any

import jwt as pyjwt
import msgpack
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wse_proto.auth import JWTConfig
from wse_proto.client import ClientConnection
from wse_proto.config import ServerConfig
from wse_proto.events import (
    AuthRejected,
    Connected,
    ConnectionClosed,
    Event,
    Hello,
    HelloReceived,
    MessageReceived,
    PingReceived,
    PongReceived,
    RateLimited,
    Ready,
    Received,
    Upgraded,
)
from wse_proto.server import ConnectionState, ServerConnection
from wse_proto.ws import BINARY, FrameDecoder

SECRET = b"pair-test-secret-0123456789abcdef!"
T0_MS = 1_795_373_021_000


def make_token(sub: str = "alice", exp_offset: int = 3600, key: bytes = SECRET) -> str:
    return pyjwt.encode({"sub": sub, "exp": T0_MS // 1000 + exp_offset}, key, "HS256")


class Pair:
    """A server and a client machine wired back to back.

    ``cut`` splits every transfer into chunks (a list of chunk sizes, cycled), so the
    same scenario can be replayed with arbitrary fragmentation. ``to_client`` keeps every
    byte the server sent (for inspecting frame forms).
    """

    def __init__(
        self,
        *,
        jwt: bool = True,
        token: str | None = None,
        encryption: bool = False,
        msgpack_conn: bool = False,
        cut: list[int] | None = None,
        client_ping: float = 15.0,
        seed: int = 7,
        **config: Any,
    ) -> None:
        self.now = 0.0
        self.wall_ms = T0_MS
        prng = random.Random(seed)
        self.rand: Callable[[int], bytes] = prng.randbytes
        if jwt:
            config.setdefault("jwt", JWTConfig(SECRET))
        self.config = ServerConfig(**config)
        seq = itertools.count()
        self.server = ServerConnection(
            self.config,
            conn_id="conn-1",
            now=self.now,
            rand=self.rand,
            wall_ms=self.clock,
            next_seq=lambda: next(seq),
        )
        self.client = ClientConnection(
            host="127.0.0.1",
            token=make_token() if token is None and jwt else token,
            msgpack=msgpack_conn,
            encryption=encryption,
            rand=self.rand,
            wall_ms=self.clock,
            ping_interval=client_ping,
        )
        self.cut = cut
        self.to_client = bytearray()
        self.client_silent = False
        self.server_events: list[Event] = []
        self.client_events: list[Event] = []

    def clock(self) -> int:
        return self.wall_ms

    def _chunks(self, data: bytes) -> list[bytes]:
        if not self.cut:
            return [data]
        out, pos = [], 0
        for size in itertools.cycle(self.cut):
            if pos >= len(data):
                break
            out.append(data[pos : pos + size])
            pos += size
        return out

    def pump(self) -> None:
        """Move bytes until both sides are quiet; EOF follows a wanted close."""
        for _ in range(100):
            moved = False
            data = self.client.data_to_send()
            if data and not self.client_silent:
                moved = True
                for chunk in self._chunks(data):
                    self.server.receive_data(chunk, self.now)
            data = self.server.data_to_send()
            if data:
                moved = True
                self.to_client += data
                for chunk in self._chunks(data):
                    self.client.receive_data(chunk, self.now)
            if self.server.wants_close and self.client.state is not ConnectionState.CLOSED:
                self.client.receive_eof(self.now)
                moved = True
            if (
                self.client.wants_close
                and not self.client_silent
                and self.server.state is not ConnectionState.CLOSED
            ):
                self.server.receive_eof(self.now)
                moved = True
            self.server_events += self.server.events_received()
            self.client_events += self.client.events_received()
            if not moved:
                return
        raise AssertionError("pair did not settle")

    def advance(self, seconds: float) -> None:
        """Move the virtual clock, firing every deadline on the way, in order."""
        end = self.now + seconds
        while True:
            deadlines = [d for d in (self.server.next_deadline(), self.client.next_deadline()) if d]
            due = min((d for d in deadlines if d <= end), default=None)
            if due is None:
                break
            self._set_time(due)
            if self.server.next_deadline() == due:
                self.server.handle_timer(due)
            if self.client.next_deadline() == due:
                self.client.handle_timer(due)
            self.pump()
        self._set_time(end)
        self.pump()

    def _set_time(self, t: float) -> None:
        self.wall_ms = T0_MS + round(t * 1000)
        self.now = t

    def take(self) -> tuple[list[Event], list[Event]]:
        s, c = self.server_events, self.client_events
        self.server_events, self.client_events = [], []
        return s, c

    def server_frames(self) -> list[tuple[int, bytes]]:
        dec = FrameDecoder(client_side=True, max_message_size=1 << 30)
        dec.receive_data(bytes(self.to_client))
        self.to_client.clear()
        return dec.messages()


def opened(**kwargs: Any) -> Pair:
    pair = Pair(**kwargs)
    pair.pump()
    pair.take()
    return pair


# --------------------------------------------------------------------------- handshake + JWT


def test_jwt_success_server_ready_then_hello() -> None:
    token = make_token()
    pair = Pair(token=token)
    pair.pump()
    server, client = pair.take()
    assert [type(e) for e in server] == [Connected, HelloReceived]
    assert server[0] == Connected(
        user_id="alice",
        cookies=f"access_token={token}",  # wse-client sends the cookie and the bearer
        path="/wse",
        query="client_version=2.0.7&protocol_version=1&compression=true&encryption=false",
    )
    assert server[0].claims == {"sub": "alice", "exp": T0_MS // 1000 + 3600}
    assert server[1] == HelloReceived(1, False)
    assert [type(e) for e in client] == [Upgraded, Ready, Hello]
    ready, hello = client[1], client[2]
    assert isinstance(ready, Ready) and isinstance(hello, Hello)
    assert ready.payload["details"]["user_id"] == "alice"
    assert ready.payload["details"]["connection_id"] == "conn-1"
    assert hello.payload["connection_id"] == "conn-1" and hello.encrypted is False
    assert pair.client.connection_id == "conn-1"
    assert pair.server.state is pair.client.state is ConnectionState.OPEN


@pytest.mark.parametrize(
    ("token", "code", "message"),
    [
        ("cookie", "AUTH_REQUIRED", "No JWT cookie or Authorization header"),
        (make_token(key=b"x" * 32), "AUTH_FAILED", "Authentication failed"),
        (make_token(exp_offset=-100), "AUTH_FAILED", "Authentication failed"),
    ],
)
def test_jwt_failure_closes_4401(token: str, code: str, message: str) -> None:
    pair = Pair(token=token)  # "cookie": wse-client sends no token at all
    pair.pump()
    server, client = pair.take()
    assert server[0] == AuthRejected(code, message)
    assert server[1] == ConnectionClosed(4401, "Authentication failed")
    assert [type(e) for e in client] == [Upgraded, Received, ConnectionClosed]
    error = client[1]
    assert isinstance(error, Received)
    assert error.envelope["t"] == "error" and error.envelope["p"]["code"] == code
    assert client[2] == ConnectionClosed(4401, "Authentication failed")
    assert pair.server.wants_close and pair.client.state is ConnectionState.CLOSED


def test_no_jwt_no_server_ready_no_hello() -> None:
    """Without JWT the transport sends no server_ready, so (like wse-client) no hello."""
    pair = Pair(jwt=False)
    pair.pump()
    server, client = pair.take()
    assert server == [Connected(user_id=None, cookies="", path="/wse", query=server[0].query)]
    assert client == [Upgraded()]
    # The application may send its own server_ready: the client then says hello.
    pair.server.send_text('{"c":"WSE","t":"server_ready","p":{"connection_id":"app-1"}}')
    pair.pump()
    server, client = pair.take()
    assert [type(e) for e in client] == [Ready, Hello]
    assert server == [HelloReceived(1, False)]
    assert pair.client.connection_id == "app-1"


# --------------------------------------------------------------------------- encryption


def test_encryption_both_ways_including_broadcasts() -> None:
    pair = opened(encryption=True)
    assert pair.server.encrypted and pair.client.encrypted
    pair.to_client.clear()

    sent = pair.client.send_message("chat", {"text": "héllo"})
    pair.pump()
    server, _ = pair.take()
    assert server == [MessageReceived(sent)]

    n = pair.server.send_event({"t": "chat", "p": {"text": "back"}}, now=pair.now)
    pair.server.send_broadcast(
        b'\x81\x1b{"c":"U","t":"news","p":{}}', b'{"c":"U","t":"news","p":{}}'
    )
    pair.pump()
    frames = pair.server_frames()
    assert [op for op, _ in frames] == [BINARY, BINARY]
    assert all(payload.startswith(b"E:") for _, payload in frames)
    assert n == len(frames[0][1])
    _, client = pair.take()
    assert [e.envelope["t"] for e in client if isinstance(e, Received)] == ["chat", "news"]
    assert client[0].envelope["p"] == {"text": "back"}  # type: ignore[attr-defined]


def test_encrypted_ping_is_not_intercepted() -> None:
    """§3.2: a ping arriving as E: is an application message, not answered with PONG."""
    pair = opened(encryption=True)
    pair.client.send_ping()
    pair.pump()
    server, client = pair.take()
    assert len(server) == 1 and isinstance(server[0], MessageReceived)
    assert server[0].value["t"] == "ping"
    assert client == []


def test_large_event_on_encrypted_connection_is_not_compressed() -> None:
    """F4: the plaintext of an encrypted send_event is JSON, never C:/M:."""
    pair = opened(encryption=True, msgpack_conn=True)
    blob = "abcdefghij" * 300
    pair.to_client.clear()
    pair.server.send_event({"t": "big", "p": {"blob": blob}}, now=pair.now)
    pair.pump()
    [(op, payload)] = pair.server_frames()
    assert op == BINARY and payload[:2] == b"E:"
    assert len(payload) > 3000  # 16 + 12 + 2 bytes over the uncompressed JSON
    _, client = pair.take()
    assert isinstance(client[0], Received) and client[0].envelope["p"]["blob"] == blob


# --------------------------------------------------------------------------- frame forms


def test_msgpack_connection() -> None:
    pair = opened(msgpack_conn=True)
    assert pair.server.msgpack
    pair.to_client.clear()
    pair.server.send_event({"t": "tick", "p": {"n": 1, "f": 1.5}}, now=pair.now)
    pair.pump()
    [(op, payload)] = pair.server_frames()
    assert op == BINARY and payload[:2] == b"M:"
    decoded = msgpack.unpackb(payload[2:])
    assert decoded["p"] == {"f": 1.5, "n": 1}
    _, client = pair.take()
    assert isinstance(client[0], Received) and client[0].envelope["p"] == {"f": 1.5, "n": 1}
    # Client text frames are still parsed as JSON on a msgpack connection.
    pair.client.send_message("hi", {"x": 1})
    pair.pump()
    server, _ = pair.take()
    assert isinstance(server[0], MessageReceived) and server[0].value["t"] == "hi"


@pytest.mark.parametrize(("size", "compressed"), [(500, False), (2000, True)])
def test_compression_over_threshold(size: int, compressed: bool) -> None:
    pair = opened()
    pair.to_client.clear()
    pair.server.send_event({"t": "doc", "p": {"body": "z" * size}}, now=pair.now)
    pair.pump()
    [(op, payload)] = pair.server_frames()
    assert op == BINARY
    assert payload.startswith(b"C:\x78\x01") is compressed
    if compressed:
        assert orjson.loads(zlib.decompress(payload[2:]))["p"]["body"] == "z" * size
    _, client = pair.take()
    assert isinstance(client[0], Received) and client[0].envelope["p"]["body"] == "z" * size


# --------------------------------------------------------------------------- heartbeats


def test_ping_pong_both_ways_on_virtual_clock() -> None:
    pair = opened(client_ping=15.0)
    assert pair.client.next_deadline() == 15.0
    assert pair.server.next_deadline() == 25.0
    pair.advance(15.0)  # client JSON ping -> server PONG -> RTT sample
    server, client = pair.take()
    assert server == []
    assert client == [PongReceived(0)]
    pair.advance(10.0)  # t=25: server ping -> client PONG (consumed by the server)
    server, client = pair.take()
    assert server == []
    assert len(client) == 1 and isinstance(client[0], PingReceived)
    assert client[0].server_time == "2026-11-22T18:44:06.000Z"
    assert pair.client.next_deadline() == 30.0
    assert pair.server.next_deadline() == 50.0  # next ping; idle would be 25 + 60
    # Live client: pings flow for minutes and idle_timeout (60 s) never fires.
    pair.advance(300.0)
    server, client = pair.take()
    assert server == []
    assert sum(isinstance(e, PingReceived) for e in client) == 12  # t = 50, 75, ..., 325
    assert sum(isinstance(e, PongReceived) for e in client) == 20  # t = 30, 45, ..., 315
    assert pair.server.state is ConnectionState.OPEN


def test_pong_rtt_uses_the_wall_clock() -> None:
    pair = opened(client_ping=1000.0)
    pair.client.send_ping()
    pair.wall_ms += 42  # the network takes 42 ms round trip
    pair.pump()
    _, client = pair.take()
    assert client == [PongReceived(42)]


def test_idle_close_is_exact_and_statusless() -> None:
    pair = opened(client_ping=1000.0)
    pair.client_silent = True  # the client stops sending anything
    pair.advance(59.999)
    assert pair.server.state is ConnectionState.OPEN
    assert pair.server.next_deadline() == 60.0
    pair.advance(0.001)
    server, client = pair.take()
    assert server == [ConnectionClosed(None, "idle timeout")]
    assert client[-1] == ConnectionClosed(None, "")  # RFC 6455: no status -> 1005 upstream
    assert pair.server.state is ConnectionState.CLOSING  # the client's echo was not heard
    assert pair.server.next_deadline() == 65.0  # close_timeout
    pair.advance(5.0)
    assert pair.server.state is ConnectionState.CLOSED and pair.server.wants_close


def test_activity_pushes_the_idle_deadline() -> None:
    pair = opened(client_ping=1000.0)
    pair.advance(50.0)  # a server ping at 25 and 50, each answered with PONG (activity)
    assert pair.server.next_deadline() == 75.0
    pair.client_silent = True
    pair.advance(59.0)  # last activity at 50 -> idle close at 110
    assert pair.server.state is ConnectionState.OPEN
    pair.advance(1.0)
    assert pair.server.state is ConnectionState.CLOSING


# --------------------------------------------------------------------------- rate limiting


def test_rate_limit_warning_then_rate_limited() -> None:
    """Reference §6.2 [V]: capacity 10 -> 10 sends pass, a warning with current_rate 8 and
    remaining 1, then RATE_LIMITED; each at most once per second; never a close."""
    pair = opened(rate_limit_capacity=10.0, rate_limit_refill=1.0)
    results = []
    for _ in range(12):
        pair.now += 0.03
        results.append(pair.server.send_event({"t": "x"}, now=pair.now))
    assert all(n > 0 for n in results[:10]) and results[10:] == [0, 0]
    assert pair.server.rate_limited_count == 2
    pair.pump()
    server, client = pair.take()
    assert server == [RateLimited()]  # one frame for two drops: throttled to 1/s
    controls = [e.envelope for e in client if e.envelope["t"] != "x"]  # type: ignore[attr-defined]
    assert controls[0]["t"] == "rate_limit_warning"
    assert controls[0]["p"] == {"current_rate": 8, "limit": 10, "remaining": 1, "retry_after": 1.0}
    assert controls[1]["p"]["code"] == "RATE_LIMITED" and len(controls) == 2
    assert sum(1 for e in client if e.envelope["t"] == "x") == 10  # type: ignore[attr-defined]
    # One second later the bucket has refilled a token and the throttles have reset.
    pair.now += 1.0
    assert pair.server.send_event({"t": "x"}, now=pair.now) > 0
    assert pair.server.send_event({"t": "x"}, now=pair.now) == 0
    pair.pump()
    _, client = pair.take()
    assert [e.envelope["t"] for e in client] == ["rate_limit_warning", "x", "error"]  # type: ignore[attr-defined]
    assert pair.server.state is ConnectionState.OPEN


# --------------------------------------------------------------------------- limits and close


def test_oversize_message_gets_close_1009() -> None:
    pair = opened(max_message_size=1024)
    pair.client.send_text("x" * 1025)
    pair.pump()
    server, client = pair.take()
    assert server == [ConnectionClosed(1009, "message too large")]  # F12
    assert client == [ConnectionClosed(1009, "message too large")]
    assert pair.server.wants_close


def test_close_handshake_from_the_server() -> None:
    pair = opened()
    pair.server.close(4300, "draining", now=pair.now)
    assert pair.server.state is ConnectionState.CLOSING
    pair.pump()
    server, client = pair.take()
    assert server == [ConnectionClosed(4300, "draining")]
    assert client == [ConnectionClosed(4300, "draining")]
    assert pair.server.state is pair.client.state is ConnectionState.CLOSED
    # Sends after a close are dropped, not errors (the peer may close at any time).
    assert pair.server.send_event({"t": "late"}, now=pair.now) == 0
    pair.server.send_text("late")
    assert pair.server.data_to_send() == b""


def test_close_handshake_from_the_client() -> None:
    pair = opened()
    pair.client.close(1000, "bye")
    pair.pump()
    server, client = pair.take()
    assert server == [ConnectionClosed(1000, "bye")]
    assert client == [ConnectionClosed(1000, "bye")]
    assert pair.server.wants_close and pair.client.wants_close


def test_close_timeout_when_the_peer_never_answers() -> None:
    pair = opened(close_timeout=2.0)
    pair.client_silent = True
    pair.server.close(None, now=pair.now)
    pair.pump()
    assert pair.server.next_deadline() == pair.now + 2.0
    pair.advance(2.0)
    assert pair.server.state is ConnectionState.CLOSED


def test_subscription_update_messages() -> None:
    pair = opened()
    sub = pair.client.subscribe(["prices", "news.*"], recovery={"prices": ("0a1b2c3d", 41)})
    unsub = pair.client.unsubscribe(["news.*"])
    pair.pump()
    server, _ = pair.take()
    assert server == [MessageReceived(sub), MessageReceived(unsub)]
    assert sub["c"] == "WSE" and sub["t"] == "subscription_update" and sub["pri"] == 8
    assert sub["p"] == {
        "action": "subscribe",
        "topics": ["prices", "news.*"],
        "recover": True,
        "recovery": {"prices": {"epoch": "0a1b2c3d", "offset": 41}},
    }
    assert unsub["p"] == {"action": "unsubscribe", "topics": ["news.*"]}
    assert (sub["seq"], unsub["seq"]) == (1, 2)


# --------------------------------------------------------------------------- splitting


def _scenario(cut: list[int] | None, encryption: bool) -> tuple[list[Event], list[Event]]:
    pair = Pair(cut=cut, encryption=encryption, client_ping=10.0)
    pair.pump()
    pair.client.send_message("a", {"k": list(range(50))})
    pair.client.send_text("plain text")
    pair.client.send_bytes(b"\x00\x01")
    pair.server.send_event({"t": "b", "p": {"s": "y" * 1500}}, now=0.0)
    pair.server.send_broadcast(b'\x81\x0c{"t":"news"}', b'{"t":"news"}')
    pair.pump()
    pair.advance(30.0)
    pair.client.close(1000, "done")
    pair.pump()
    return pair.take()


@settings(max_examples=25, deadline=None)
@given(
    cut=st.lists(st.integers(1, 300), min_size=1, max_size=6),
    encryption=st.booleans(),
)
def test_splitting_the_byte_stream_changes_nothing(cut: list[int], encryption: bool) -> None:
    assert _scenario(cut, encryption) == _scenario(None, encryption)


def test_one_byte_at_a_time() -> None:
    whole = _scenario(None, True)
    assert _scenario([1], True) == whole
    server, client = whole
    assert [type(e).__name__ for e in server][:2] == ["Connected", "HelloReceived"]
    assert server[-1] == ConnectionClosed(1000, "done")
    assert [type(e).__name__ for e in client][:3] == ["Upgraded", "Ready", "Hello"]
    assert client[-1] == ConnectionClosed(1000, "done")

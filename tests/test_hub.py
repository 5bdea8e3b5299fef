"""ServerCore: connections, subscriptions, ACLs, queue groups, fan-out, inbound queue.

Every test drives real :class:`~wse_proto.server.ServerConnection` machines through a
real upgrade with real HS256 JWTs (signed by pyjwt), and reads what the server sent
with real :class:`~wse_proto.client.ClientConnection` machines (or the raw frame bytes).
The :class:`Net` helper wires both sides back to back, doing what a transport does:
feed, flush ``take_dirty()``, close sockets that ``wants_close``.
"""

from __future__ import annotations

import json
import logging
import pathlib
import random
import zlib
from collections.abc import Iterable
from typing import Any

import jwt as pyjwt
import orjson
import pytest

from wse_proto.auth import JWTConfig
from wse_proto.client import ClientConnection
from wse_proto.config import ServerConfig
from wse_proto.crypto import EncryptionSession
from wse_proto.events import ConnectionClosed, Received
from wse_proto.hub import CoreConfig, ServerCore
from wse_proto.server import ConnectionState, ServerConnection
from wse_proto.ws import BINARY, TEXT, FrameDecoder, encode_frame

SECRET = b"hub-tests-secret-0123456789abcdef-0123"
WALL_MS = 1_795_000_000_000
EXP = WALL_MS // 1000 + 3600
DATA = pathlib.Path(__file__).resolve().parent / "data" / "client-protocol.json"


def make_token(sub: str = "alice", **claims: Any) -> str:
    """A real HS256 JWT (pyjwt, independent of wse_proto.auth)."""
    body = {"sub": sub, "iat": WALL_MS // 1000, "exp": EXP, **claims}
    return pyjwt.encode(body, SECRET, algorithm="HS256")


def jwt_config(*, connection: dict[str, Any] | None = None, **kw: Any) -> CoreConfig:
    """A CoreConfig whose connections require our JWT; ``connection`` adds ServerConfig args."""
    return CoreConfig(connection=ServerConfig(jwt=JWTConfig(SECRET), **(connection or {})), **kw)


class Peer:
    """One client: its machine, the server-side connection and what it received."""

    def __init__(self, client: ClientConnection, conn: ServerConnection) -> None:
        self.client = client
        self.conn = conn
        self.received: list[dict[str, Any]] = []
        self.closed: ConnectionClosed | None = None

    @property
    def id(self) -> str:
        return self.conn.conn_id

    def payloads(self) -> list[Any]:
        """The ``p`` of each message (clients wrap non-object payloads as ``{"data": x}``
        and replace falsy ones by ``{}``, so tests use truthy payloads)."""
        out = []
        for m in self.received:
            p = m.get("p")
            out.append(p["data"] if isinstance(p, dict) and list(p) == ["data"] else p)
        return out


class Net:
    """A ServerCore and its clients wired back to back: a minimal in-memory transport."""

    def __init__(self, config: CoreConfig | None = None, *, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        self.core = ServerCore(
            config if config is not None else jwt_config(),
            rand=self.rng.randbytes,
            wall_ms=lambda: WALL_MS,
        )
        self.peers: dict[ServerConnection, Peer] = {}

    def connect(
        self,
        token: str | None = "default",
        *,
        encryption: bool = False,
        msgpack: bool = False,
        headers: Iterable[tuple[str, str]] = (),
        pump: bool = True,
    ) -> Peer:
        client = ClientConnection(
            host="hub.test",
            token=make_token() if token == "default" else token,
            encryption=encryption,
            msgpack=msgpack,
            headers=headers,
            rand=self.rng.randbytes,
            wall_ms=lambda: WALL_MS,
        )
        conn = self.core.open_connection(self.now)
        assert conn is not None
        peer = Peer(client, conn)
        self.peers[conn] = peer
        if pump:
            self.pump()
        return peer

    def pump(self) -> None:
        """Move bytes both ways until nothing moves (what a transport's loop does)."""
        core = self.core
        for _ in range(100):
            moved = False
            for conn, peer in list(self.peers.items()):
                data = peer.client.data_to_send()
                if data and conn.conn_id in core._open:
                    core.feed(conn, data, self.now)
                    moved = True
            for conn in core.take_dirty():
                data = core.data_to_send(conn)
                self.peers[conn].client.receive_data(data, self.now)
                moved = True
            for conn, peer in list(self.peers.items()):
                if conn.wants_close and conn.conn_id in core._open:
                    # flush what is left, then the socket goes away on both sides
                    rest = core.data_to_send(conn)
                    if rest:
                        peer.client.receive_data(rest, self.now)
                    core.connection_lost(conn, self.now)
                    peer.client.receive_eof(self.now)
                    moved = True
                for ev in peer.client.events_received():
                    if isinstance(ev, Received):
                        peer.received.append(ev.envelope)
                    elif isinstance(ev, ConnectionClosed) and peer.closed is None:
                        peer.closed = ev
            if not moved:
                return
        raise AssertionError("pump did not settle")


def frames(data: bytes) -> list[tuple[int, bytes]]:
    """Server->client frames in ``data`` (decoded independently of the hub)."""
    dec = FrameDecoder(client_side=True, max_message_size=1 << 24)
    dec.receive_data(data)
    out: list[tuple[int, bytes]] = []
    while batch := dec.messages():
        out.extend(batch)
    return out


def drain(net: Net) -> list[tuple[str, str | None, Any]]:
    return net.core.pop_inbound(10_000)


# --------------------------------------------------------------------------- config


def test_core_config_defaults_are_the_originals() -> None:
    c = CoreConfig()
    assert (c.max_connections, c.max_inbound_queue_size, c.max_outbound_queue_bytes) == (
        1000,
        131072,
        16777216,
    )
    assert c.max_subscriptions_per_connection == 0
    assert c.slow_consumer_policy == "drop" and c.inbound_overflow == "backpressure"
    assert c.dedup_size == 50_000
    assert not c.recovery_enabled and not c.presence_enabled


@pytest.mark.parametrize(
    "kw",
    [
        {"max_connections": 0},
        {"max_inbound_queue_size": True},
        {"max_outbound_queue_bytes": -1},
        {"max_subscriptions_per_connection": -1},
        {"dedup_size": 0},
        {"inbound_low_water": 10, "max_inbound_queue_size": 10},
        {"slow_consumer_policy": "kill"},
        {"inbound_overflow": "block"},
    ],
)
def test_core_config_rejects_bad_values(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        CoreConfig(**kw)


def test_recovery_flag_reaches_the_connection_config() -> None:
    c = CoreConfig(recovery_enabled=True)
    assert c.connection.recovery_enabled
    c2 = CoreConfig(connection=ServerConfig(recovery_enabled=True))
    assert c2.recovery_enabled


# --------------------------------------------------------------------------- lifecycle


def test_jwt_connection_registers_and_queues_auth_connect() -> None:
    net = Net()
    p = net.connect()
    events = drain(net)
    assert events == [("auth_connect", p.id, "alice")]
    # Connection ids are UUIDv7 and match the one announced in server_ready.
    assert p.id[14] == "7" and len(p.id) == 36
    assert p.client.connection_id == p.id
    assert net.core.get_connections() == [p.id]
    assert net.core.get_connection_count() == 1
    assert net.core.get_connection(p.id) is p.conn


def test_connection_without_jwt_queues_connect_with_cookies() -> None:
    net = Net(CoreConfig())
    p = net.connect(token=None, headers=[("Cookie", "theme=dark; sid=42")])
    assert drain(net) == [("connect", p.id, "theme=dark; sid=42")]


def test_handshaking_connection_is_invisible_until_connected() -> None:
    net = Net()
    p = net.connect(pump=False)
    assert net.core.get_connection_count() == 0
    assert net.core.broadcast_all('{"t":"x"}') == 0
    net.core.subscribe(p.id, ["a"])  # unknown (not yet registered): silent no-op
    assert net.core.get_topic_subscriber_count("a") == 0
    net.pump()
    assert net.core.get_connection_count() == 1


def test_messages_become_drain_tuples() -> None:
    net = Net()
    p = net.connect()
    drain(net)
    p.client.send_text('{"t":"chat","p":{"x":1}}')
    p.client.send_text("not json")
    p.client.send_bytes(b"\x00\x01raw", encrypt=False)
    net.pump()
    assert drain(net) == [
        ("msg", p.id, {"t": "chat", "p": {"x": 1}}),
        ("raw", p.id, "not json"),
        ("bin", p.id, b"\x00\x01raw"),
    ]
    assert net.core.metrics.messages_received == 3


def test_client_close_unregisters_and_queues_disconnect() -> None:
    net = Net()
    p = net.connect()
    net.core.subscribe(p.id, ["a", "b.*"])
    net.core.subscribe(p.id, ["a"], queue_group="g")
    p.client.close(1000)
    net.pump()
    assert drain(net)[-1] == ("disconnect", p.id, None)
    assert net.core.get_connection_count() == 0
    assert net.core.get_topic_subscriber_count("a") == 0
    assert net.core.get_topic_subscriber_count("b.*") == 0
    assert net.core.get_queue_group_info("a") == {}
    assert net.core.broadcast_local("a", '{"t":"x"}') == 0
    assert p.conn.conn_id not in net.core._open


def test_auth_failure_counts_and_queues_nothing() -> None:
    net = Net()
    p = net.connect(token=pyjwt.encode({"sub": "eve", "exp": EXP}, b"w" * 40, algorithm="HS256"))
    assert p.closed is not None and p.closed.code == 4401
    assert drain(net) == []
    assert net.core.metrics.auth_failures == 1
    assert net.core.get_connection_count() == 0


def test_max_connections_refuses_and_frees_slots() -> None:
    net = Net(jwt_config(max_connections=2))
    a = net.connect()
    net.connect(pump=False)  # a handshaking connection holds a slot too
    assert net.core.open_connection(0.0) is None
    assert net.core.metrics.connections_rejected == 1
    a.client.close(1000)
    net.pump()
    assert net.core.open_connection(0.0) is not None
    assert net.core.metrics.connections_accepted == 3


def test_connection_lost_without_close_still_disconnects() -> None:
    net = Net()
    p = net.connect()
    drain(net)
    net.core.connection_lost(p.conn, 1.0)
    assert drain(net) == [("disconnect", p.id, None)]
    net.core.connection_lost(p.conn, 2.0)  # idempotent
    assert drain(net) == []


def test_eof_disconnects() -> None:
    net = Net()
    p = net.connect()
    drain(net)
    net.core.eof(p.conn, 1.0)
    assert drain(net) == [("disconnect", p.id, None)]


def test_timer_drives_pings_and_idle_close() -> None:
    net = Net(jwt_config(connection={"ping_interval": 1, "idle_timeout": 3}))
    p = net.connect()
    drain(net)
    net.core.timer(p.conn, 1.0)
    data = net.core.data_to_send(p.conn)
    assert frames(data)[0][0] == TEXT and b'"t":"ping"' in frames(data)[0][1]
    net.core.timer(p.conn, 3.0)  # idle: status-less close (K7/F2)
    assert drain(net) == [("disconnect", p.id, None)]
    assert frames(net.core.data_to_send(p.conn))[-1] == (0x8, b"")


def test_drain_closes_everyone_with_the_code_and_refuses_new_connections() -> None:
    net = Net()
    a, b = net.connect(), net.connect()
    late = net.connect(pump=False)
    drain(net)
    net.core.drain(4300, "maintenance")
    assert drain(net) == [("disconnect", a.id, None), ("disconnect", b.id, None)]
    assert net.core.draining
    assert net.core.open_connection(0.0) is None
    net.pump()
    assert a.closed is not None and (a.closed.code, a.closed.reason) == (4300, "maintenance")
    assert b.closed is not None and b.closed.code == 4300
    # A handshake that completes during the drain is closed the same way.
    assert late.closed is not None and late.closed.code == 4300
    assert net.core.get_connection_count() == 0


def test_shutdown_closes_with_1001() -> None:
    net = Net()
    a = net.connect()
    net.core.shutdown()
    net.pump()
    assert a.closed is not None and (a.closed.code, a.closed.reason) == (
        1001,
        "server shutting down",
    )
    assert net.core.open_connection(0.0) is None


def test_disconnect_is_a_status_less_close() -> None:
    net = Net()
    a, b = net.connect(), net.connect()
    drain(net)
    net.core.disconnect(a.id)
    net.core.disconnect("no-such-id")
    # The connection carries no more messages: it is gone for the app right away.
    assert drain(net) == [("disconnect", a.id, None)]
    assert net.core.get_connections() == [b.id]
    assert a.id in net.core._open  # the socket stays until the transport closes it
    net.pump()
    assert a.id not in net.core._open
    assert a.closed is not None and a.closed.code is None  # the peer sees 1005
    assert b.closed is None
    assert net.core.get_connections() == [b.id]


# --------------------------------------------------------------------------- inbound queue


def _send_n(net: Net, peer: Peer, n: int) -> None:
    for i in range(n):
        peer.client.send_text(json.dumps({"t": "m", "p": {"i": i}}))
    net.pump()


def test_inbound_backpressure_never_drops() -> None:
    net = Net(jwt_config(max_inbound_queue_size=4))
    p = net.connect()  # 1 event (auth_connect)
    assert not net.core.inbound_full()
    _send_n(net, p, 5)
    assert net.core.inbound_queue_depth() == 6
    assert net.core.inbound_full() and not net.core.inbound_resumable()
    assert net.core.inbound_dropped_count() == 0
    got = net.core.pop_inbound(3)
    assert [e[0] for e in got] == ["auth_connect", "msg", "msg"]
    assert net.core.inbound_full() is False and not net.core.inbound_resumable()
    net.core.pop_inbound(1)
    assert net.core.inbound_resumable()  # 2 left <= low water (4 // 2)
    assert [e[2]["p"]["i"] for e in net.core.pop_inbound()] == [3, 4]
    assert net.core.pop_inbound() == []


def test_resumable_hook_fires_once_when_a_full_queue_drains() -> None:
    net = Net(jwt_config(max_inbound_queue_size=4))
    resumed: list[int] = []
    net.core.on_inbound_resumable = lambda: resumed.append(net.core.inbound_queue_depth())
    p = net.connect()
    _send_n(net, p, 2)  # 3 queued: below the limit, no pause
    net.core.pop_inbound(3)
    assert resumed == []
    _send_n(net, p, 6)  # 6 queued: full
    net.core.pop_inbound(3)
    assert resumed == []  # 3 left > low water 2
    net.core.pop_inbound(1)
    assert resumed == [2]
    net.core.pop_inbound()
    assert resumed == [2]


def test_inbound_drop_mode_counts_and_keeps_lifecycle_events() -> None:
    net = Net(jwt_config(max_inbound_queue_size=2, inbound_overflow="drop"))
    p = net.connect()
    _send_n(net, p, 3)
    assert net.core.inbound_dropped_count() == 2
    assert not net.core.inbound_full()  # never asks the transport to pause
    p.client.close(1000)
    net.pump()
    events = drain(net)
    assert [e[0] for e in events] == ["auth_connect", "msg", "disconnect"]
    assert net.core.health_snapshot(0.0)["inbound_dropped"] == 2


def test_custom_low_water_mark() -> None:
    net = Net(jwt_config(max_inbound_queue_size=4, inbound_low_water=0))
    p = net.connect()
    _send_n(net, p, 1)
    assert not net.core.inbound_resumable()
    drain(net)
    assert net.core.inbound_resumable()


def test_deep_queue_defers_parsing_without_changing_what_is_drained() -> None:
    net = Net()
    p = net.connect()
    drain(net)
    texts = [
        json.dumps({"type": "m", "payload": {"i": i}} if i % 3 else {"t": "m", "p": i, "x": [i]})
        for i in range(9000)
    ]
    for chunk in range(0, len(texts), 1000):  # several reads, as a transport would feed
        for text in texts[chunk : chunk + 1000]:
            p.client.send_text(text)
        net.pump()
    assert net.core._mode.deferred  # past the depth: later messages are queued as bytes
    first = net.core.pop_inbound(5)
    rest = net.core.pop_inbound(100_000)
    assert not net.core._mode.deferred
    want = [
        {"t": "m", "p": {"i": i}} if i % 3 else {"t": "m", "p": i, "x": [i]} for i in range(9000)
    ]
    assert [e[0] for e in first + rest] == ["msg"] * 9000
    assert {e[1] for e in first + rest} == {p.id}
    assert [e[2] for e in first + rest] == want
    assert net.core.metrics.messages_received == 9000


def test_on_inbound_hook_fires_once_per_feed_with_events() -> None:
    net = Net()
    calls: list[int] = []
    net.core.on_inbound = lambda: calls.append(net.core.inbound_queue_depth())
    p = net.connect()
    assert calls == [1]
    p.client.send_text('{"t":"a"}')
    p.client.send_text('{"t":"b"}')
    net.pump()
    assert calls == [1, 3]
    p.client.send_ping()  # answered by the machine: no drain event, no hook
    net.pump()
    assert calls == [1, 3]


# --------------------------------------------------------------------------- dirty set


def test_take_dirty_lists_connections_with_output_once() -> None:
    net = Net()
    a, b, c = net.connect(), net.connect(), net.connect()
    for p in (a, b):
        net.core.subscribe(p.id, ["t", "t*"])
    net.core.broadcast_local("t", '{"t":"x"}')
    net.core.broadcast_local("t", '{"t":"y"}')
    net.core.send(a.id, "direct")
    dirty = net.core.take_dirty()
    assert sorted(x.conn_id for x in dirty) == sorted([a.id, b.id])
    assert c.conn not in dirty
    assert net.core.take_dirty() == []


def test_wakeup_fires_when_an_app_call_makes_output_pending() -> None:
    net = Net()
    a, b = net.connect(), net.connect()
    net.core.subscribe(a.id, ["t"])
    wakes: list[int] = []
    net.core.set_wakeup(lambda: wakes.append(1))
    net.core.broadcast_local("t", '{"t":"x"}')
    assert wakes == [1]
    net.core.send(b.id, "more")  # already dirty: no second wakeup
    net.core.send_event(a.id, {"t": "e"}, now=0.0)
    assert wakes == [1]
    net.pump()
    net.core.send_event(b.id, {"t": "e"}, now=0.0)
    assert wakes == [1, 1]
    net.pump()
    b.client.send_ping()  # output caused by feed: the transport flushes anyway
    net.pump()
    assert wakes == [1, 1]
    net.core.broadcast_local("nobody", '{"t":"x"}')
    assert wakes == [1, 1]


def test_unsubscribed_connection_with_pending_output_is_still_flushed() -> None:
    net = Net()
    a = net.connect()
    net.core.subscribe(a.id, ["t"])
    net.core.broadcast_local("t", '{"t":"x","p":1}')
    net.core.unsubscribe(a.id)  # leaves the recipient map before the flush
    net.pump()
    assert a.payloads() == [1]


# --------------------------------------------------------------------------- send_event & co


def _sorted_json(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def test_send_event_envelope_and_global_seq() -> None:
    net = Net()
    a, b = net.connect(), net.connect()
    n1 = net.core.send_event(a.id, {"t": "echo", "p": {"k": 1}}, now=0.0)
    n2 = net.core.send_event(b.id, {"t": "echo", "p": {"k": 2}}, now=0.0)
    n3 = net.core.send_event(a.id, {"t": "echo", "p": {"k": 3}, "seq": 99}, now=0.0)
    net.pump()
    assert [m["seq"] for m in a.received] == [0, 99]
    assert [m["seq"] for m in b.received] == [1]
    first = a.received[0]
    assert n1 == len(_sorted_json(first))
    assert (n2, n3) == (len(_sorted_json(b.received[0])), len(_sorted_json(a.received[1])))
    assert first["c"] == "U" and first["v"] == 1 and first["p"] == {"k": 1}
    assert net.core.metrics.messages_sent == 3


def test_send_event_dedup_is_per_connection_and_fifo() -> None:
    net = Net(jwt_config(dedup_size=2))
    a, b = net.connect(), net.connect()
    ev = {"t": "x", "id": "id-1"}
    assert net.core.send_event(a.id, ev, now=0.0) > 0
    assert net.core.send_event(a.id, ev, now=0.0) == 0
    assert net.core.send_event(b.id, ev, now=0.0) > 0  # key is conn_id + "\0" + id
    assert net.core.send_event(a.id, {"t": "x", "id": "id-2"}, now=0.0) > 0
    # a/id-1 was evicted by b/id-1 and a/id-2 (window of 2 keys)
    assert net.core.send_event(a.id, ev, now=0.0) > 0
    assert net.core.send_event(a.id, {"t": "x", "id": 5}, now=0.0) > 0  # non-str id: no dedup
    assert net.core.send_event(a.id, {"t": "x", "id": 5}, now=0.0) > 0
    net.pump()
    assert [m["id"] for m in a.received] == ["id-1", "id-2", "id-1", 5, 5]


def test_send_event_to_unknown_connection_returns_the_computed_length() -> None:
    net = Net()
    ev = {"t": "x", "p": {"a": 1}, "id": "fixed", "ts": "2026-01-01T00:00:00.000Z", "seq": 7}
    expected = _sorted_json({**ev, "c": "U", "v": 1})
    assert net.core.send_event("ghost", ev, now=0.0) == len(expected)
    big = {**ev, "id": "fixed-2", "p": {"blob": "ab" * 1000}}
    body = _sorted_json({**big, "c": "U", "v": 1})
    n = net.core.send_event("ghost", big, now=0.0)
    assert n == len(b"C:" + zlib.compress(body, 1))
    assert net.core.send_event("ghost", big, now=0.0) == 0  # dedup applies all the same
    assert net.core.metrics.messages_sent == 0


def test_send_event_rate_limited_is_counted() -> None:
    net = Net(jwt_config(connection={"rate_limit_capacity": 2, "rate_limit_refill": 0}))
    a = net.connect()
    results = [net.core.send_event(a.id, {"t": "x"}, now=0.0) for _ in range(4)]
    assert [r > 0 for r in results] == [True, True, False, False]
    assert net.core.metrics.rate_limited == 2
    net.pump()
    errors = [m for m in a.received if m.get("t") == "error"]
    assert errors and errors[0]["p"]["code"] == "RATE_LIMITED"


def test_send_and_send_bytes_are_verbatim_and_never_encrypted() -> None:
    net = Net()
    a = net.connect(encryption=True)
    assert a.client.encrypted
    net.core.send(a.id, "hello ünïcode")
    net.core.send_bytes(a.id, b"\x00\xff")
    net.core.send("ghost", "x")  # unknown: nothing, no error
    out = frames(net.core.data_to_send(a.conn))
    assert out == [(TEXT, "hello ünïcode".encode()), (BINARY, b"\x00\xff")]
    assert net.core.metrics.messages_sent == 2


# --------------------------------------------------------------------------- fan-out


def _captured_broadcasts() -> list[tuple[str, bytes]]:
    records = json.loads(DATA.read_text(encoding="utf-8"))["records"]
    out = []
    for r in records:
        if r["direction"] == "server->client" and r["description"].startswith("topic broadcast"):
            if r["opcode_name"] != "text":
                continue
            frame = bytes.fromhex(r["frame_header_hex"]) + r["data"].encode()
            out.append((r["description"], frame))
    return out


CAPTURED = _captured_broadcasts()


def test_captured_broadcasts_were_found() -> None:
    assert len(CAPTURED) >= 4


@pytest.mark.parametrize("frame", [f for _, f in CAPTURED], ids=[d[:40] for d, _ in CAPTURED])
def test_broadcast_local_reproduces_captured_frames(frame: bytes) -> None:
    payload = frames(frame)[0][1].decode()
    # The captured input had no "c" unless the description says so; the server added
    # "c" right after the first brace (compact input, so F1 does not change bytes).
    sent = payload
    if payload.startswith('{"c":"U",') or payload.startswith('{"c":"S",'):
        sent = "{" + payload[len('{"c":"U",') :]
    net = Net()
    a = net.connect()
    net.core.subscribe(a.id, ["bench"])
    assert net.core.broadcast_local("bench", sent) == 1
    assert net.core.data_to_send(a.conn) == frame


def test_broadcast_frame_is_built_once_and_shared() -> None:
    net = Net()
    a, b = net.connect(), net.connect()
    for p in (a, b):
        net.core.subscribe(p.id, ["room"])
    net.core.broadcast_local("room", '{"t":"chat","p":{"x":1}}')
    da = a.conn.data_to_send()
    db = b.conn.data_to_send()
    assert da is db  # the very same bytes object queued on both connections
    assert frames(da) == [(TEXT, b'{"c":"U","t":"chat","p":{"x":1}}')]


def test_encrypted_subscriber_gets_its_own_e_frame() -> None:
    net = Net()
    plain, enc = net.connect(), net.connect(encryption=True)
    assert enc.client.encrypted
    for p in (plain, enc):
        net.core.subscribe(p.id, ["room"])
    net.core.broadcast_local("room", '{"t":"chat","p":{"x":1}}')
    raw = enc.conn.data_to_send()
    ((opcode, body),) = frames(raw)
    assert opcode == BINARY and body.startswith(b"E:")
    session: EncryptionSession = enc.client._session  # type: ignore[assignment]
    assert session.decrypt(body) == b'{"c":"U","t":"chat","p":{"x":1}}'
    net.pump()
    assert plain.received == [{"c": "U", "t": "chat", "p": {"x": 1}}]


def test_each_connection_gets_a_publication_once_whatever_matches() -> None:
    net = Net()
    a, b = net.connect(), net.connect()
    net.core.subscribe(a.id, ["a.b", "a.*", "*", "?.b"])
    net.core.subscribe(b.id, ["a.*"])
    assert net.core.broadcast_local("a.b", '{"t":"x","p":1}') == 2
    assert net.core.broadcast_local("zz", '{"t":"x","p":2}') == 1
    net.pump()
    assert a.payloads() == [1, 2]
    assert b.payloads() == [1]


def test_globs_match_bytes_not_characters() -> None:
    net = Net()
    one, two = net.connect(), net.connect()
    net.core.subscribe(one.id, ["caf?"])
    net.core.subscribe(two.id, ["caf??"])
    net.core.broadcast_local("café", '{"t":"x","p":1}')  # é is two UTF-8 bytes
    net.core.broadcast_local("cafe", '{"t":"x","p":2}')
    net.pump()
    assert one.payloads() == [2]
    assert two.payloads() == [1]


def test_glob_added_after_a_cached_lookup_is_seen() -> None:
    net = Net()
    a, b = net.connect(), net.connect()
    net.core.subscribe(a.id, ["x.*"])
    net.core.broadcast_local("x.1", '{"t":"x","p":1}')
    net.core.subscribe(b.id, ["x.?"])
    net.core.broadcast_local("x.1", '{"t":"x","p":2}')
    net.core.unsubscribe(a.id, ["x.*"])
    net.core.broadcast_local("x.1", '{"t":"x","p":3}')
    net.pump()
    assert a.payloads() == [1, 2]
    assert b.payloads() == [2, 3]


def test_broadcast_without_subscribers_is_counted_per_topic() -> None:
    net = Net()
    assert net.core.broadcast_local("empty", '{"t":"x"}') == 0
    assert net.core.metrics.topic_messages == {"empty": 1}


def test_non_json_broadcast_is_sent_unchanged() -> None:
    net = Net()
    a = net.connect()
    net.core.subscribe(a.id, ["t"])
    net.core.broadcast_local("t", "not json [")
    assert frames(net.core.data_to_send(a.conn)) == [(TEXT, b"not json [")]


def test_broadcast_all_reaches_every_registered_connection() -> None:
    net = Net()
    a, enc = net.connect(), net.connect(encryption=True)
    net.connect(pump=False)
    assert net.core.broadcast_all('{"t":"order_snapshot","p":{}}') == 2
    net.pump()
    expected = {"c": "S", "t": "order_snapshot", "p": {}}
    assert a.received == [expected] and enc.received == [expected]


def test_broadcast_all_bytes_binary_and_encrypted() -> None:
    net = Net()
    a, enc = net.connect(), net.connect(encryption=True)
    assert net.core.broadcast_all_bytes(b'{"t":"bin"}') == 2
    assert frames(net.core.data_to_send(a.conn)) == [(BINARY, b'{"t":"bin"}')]
    ((op, body),) = frames(net.core.data_to_send(enc.conn))
    session: EncryptionSession = enc.client._session  # type: ignore[assignment]
    assert op == BINARY and session.decrypt(body) == b'{"t":"bin"}'


# --------------------------------------------------------------------------- queue groups


def test_queue_group_round_robin_three_members_six_messages() -> None:
    net = Net()
    members = [net.connect() for _ in range(3)]
    for p in members:
        net.core.subscribe(p.id, ["jobs"], queue_group="workers")
    assert net.core.get_queue_group_info("jobs") == {"workers": 3}
    assert net.core.get_topic_subscriber_count("jobs") == 0  # groups are not fan-out
    for i in range(6):
        assert net.core.broadcast_local("jobs", json.dumps({"t": "job", "p": f"m{i}"})) == 1
    net.pump()
    assert [p.payloads() for p in members] == [["m0", "m3"], ["m1", "m4"], ["m2", "m5"]]


def test_queue_groups_are_independent_of_each_other_and_of_fan_out() -> None:
    net = Net()
    g1 = [net.connect() for _ in range(2)]
    g2 = [net.connect()]
    fan = net.connect()
    for p in g1:
        net.core.subscribe(p.id, ["jobs"], queue_group="a")
    net.core.subscribe(g2[0].id, ["jobs"], queue_group="b")
    net.core.subscribe(fan.id, ["jobs"])
    for i in range(4):
        assert net.core.broadcast_local("jobs", json.dumps({"t": "job", "p": f"m{i}"})) == 3
    net.pump()
    assert [p.payloads() for p in g1] == [["m0", "m2"], ["m1", "m3"]]
    assert g2[0].payloads() == ["m0", "m1", "m2", "m3"]
    assert fan.payloads() == ["m0", "m1", "m2", "m3"]


def test_queue_group_resubscribe_does_not_duplicate_and_unsubscribe_leaves() -> None:
    net = Net()
    a, b = net.connect(), net.connect()
    for p in (a, b):
        net.core.subscribe(p.id, ["jobs"], queue_group="w")
        net.core.subscribe(p.id, ["jobs"], queue_group="w")
        net.core.subscribe(p.id, ["jobs"], queue_group="other")
    assert net.core.get_queue_group_info("jobs") == {"w": 2, "other": 2}
    net.core.unsubscribe(a.id, ["jobs"])  # leaves every group of the topic
    assert net.core.get_queue_group_info("jobs") == {"w": 1, "other": 1}
    net.core.unsubscribe(b.id, ["not-held"])
    net.core.unsubscribe(b.id)
    assert net.core.get_queue_group_info("jobs") == {}


def test_queue_group_skips_backlogged_and_closing_members() -> None:
    net = Net(jwt_config(max_outbound_queue_bytes=1000))
    a, b, c = (net.connect() for _ in range(3))
    for p in (a, b, c):
        net.core.subscribe(p.id, ["jobs"], queue_group="w")
    a.conn.transport_backlog = 1000  # a is a slow consumer
    b.conn.close(1000)  # b is closing (its ConnectionClosed was already emitted)
    for i in range(3):
        net.core.broadcast_local("jobs", json.dumps({"t": "job", "p": f"m{i}"}))
    net.pump()
    assert c.payloads() == ["m0", "m1", "m2"]
    assert a.payloads() == []
    c.conn.transport_backlog = 5000
    assert net.core.broadcast_local("jobs", '{"t":"job","p":9}') == 0
    assert net.core.metrics.slow_consumer_drops == 1


def test_queue_group_delivery_is_encrypted_for_encrypted_members() -> None:
    net = Net()
    enc = net.connect(encryption=True)
    net.core.subscribe(enc.id, ["jobs"], queue_group="w")
    net.core.broadcast_local("jobs", '{"t":"job","p":1}')
    ((op, body),) = frames(enc.conn.data_to_send())
    assert op == BINARY and body.startswith(b"E:")  # F5: never plaintext
    session: EncryptionSession = enc.client._session  # type: ignore[assignment]
    assert session.decrypt(body) == b'{"c":"U","t":"job","p":1}'


# --------------------------------------------------------------------------- slow consumers


def test_slow_consumer_drop_policy() -> None:
    net = Net(jwt_config(max_outbound_queue_bytes=100))
    slow, fast = net.connect(), net.connect()
    for p in (slow, fast):
        net.core.subscribe(p.id, ["t"])
    slow.conn.transport_backlog = 100
    assert net.core.broadcast_local("t", '{"t":"x","p":1}') == 1
    assert net.core.send_event(slow.id, {"t": "x"}, now=0.0) == 0
    net.core.send(slow.id, "x")
    net.core.send_bytes(slow.id, b"x")
    assert net.core.metrics.slow_consumer_drops == 4
    assert slow.conn.pending_bytes == 0
    slow.conn.transport_backlog = 0
    assert net.core.broadcast_local("t", '{"t":"x","p":2}') == 2
    net.pump()
    assert slow.payloads() == [2] and fast.payloads() == [1, 2]
    assert slow.closed is None


def test_slow_consumer_disconnect_policy() -> None:
    net = Net(jwt_config(max_outbound_queue_bytes=100, slow_consumer_policy="disconnect"))
    slow, fast = net.connect(), net.connect()
    for p in (slow, fast):
        net.core.subscribe(p.id, ["t"])
    slow.conn.transport_backlog = 100
    drain(net)
    assert net.core.broadcast_local("t", '{"t":"x","p":1}') == 1
    assert drain(net) == [("disconnect", slow.id, None)]
    assert net.core.get_topic_subscriber_count("t") == 1
    slow.conn.transport_backlog = 0
    net.pump()
    assert slow.closed is not None
    assert (slow.closed.code, slow.closed.reason) == (1013, "slow consumer")  # F16
    assert fast.payloads() == [1]
    assert net.core.get_connections() == [fast.id]


def test_pending_bytes_count_toward_the_backlog() -> None:
    net = Net(jwt_config(max_outbound_queue_bytes=200))
    a = net.connect()
    net.core.subscribe(a.id, ["t"])
    sent = 0
    while net.core.broadcast_local("t", '{"t":"x","p":"' + "z" * 40 + '"}'):
        sent += 1
    assert sent == 4  # 4 frames of 58 bytes reach the 200-byte limit
    assert a.conn.pending_bytes >= 200 and net.core.metrics.slow_consumer_drops == 1


# --------------------------------------------------------------------------- subscribe rules


def test_jwt_topic_acl_filters_subscriptions() -> None:
    net = Net()
    tok = make_token(wse_topics={"allow": ["chat.*"], "deny": ["chat.secret"]})
    a = net.connect(token=tok)
    net.core.subscribe(a.id, ["chat.a", "chat.secret", "news", "chat.*"])
    assert net.core.get_topic_subscriber_count("chat.a") == 1
    assert net.core.get_topic_subscriber_count("chat.secret") == 0
    assert net.core.get_topic_subscriber_count("news") == 0
    assert net.core.get_topic_subscriber_count("chat.*") == 1  # a pattern checked literally


def test_set_topic_acl_replaces_the_jwt_acl() -> None:
    net = Net()
    a = net.connect(token=make_token(wse_topics={"allow": ["chat.*"]}))
    net.core.set_topic_acl(a.id, allow=["news.*"], deny=["news.x"])
    net.core.subscribe(a.id, ["chat.a", "news.a", "news.x"])
    assert net.core.get_topic_subscriber_count("chat.a") == 0
    assert net.core.get_topic_subscriber_count("news.a") == 1
    assert net.core.get_topic_subscriber_count("news.x") == 0
    net.core.set_topic_acl(a.id)  # no lists: everything allowed again
    net.core.subscribe(a.id, ["chat.a", "news.x"])
    assert net.core.get_topic_subscriber_count("chat.a") == 1
    assert net.core.get_topic_subscriber_count("news.x") == 1
    net.core.set_topic_acl("ghost", allow=["x"])  # unknown id: no-op


def test_acl_applies_to_subscriptions_not_to_existing_ones_or_publishing() -> None:
    net = Net()
    a = net.connect()
    net.core.subscribe(a.id, ["t"])
    net.core.set_topic_acl(a.id, deny=["t"])
    net.core.broadcast_local("t", '{"t":"x","p":1}')
    net.pump()
    assert a.payloads() == [1]


def test_control_character_topics_are_dropped_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    net = Net()
    a = net.connect()
    with caplog.at_level(logging.WARNING, logger="wse_proto.hub"):
        net.core.subscribe(a.id, ["ok", "bad\nline", "tab\there", "del\x7f", "ünï"])
    assert net.core.get_topic_subscriber_count("ok") == 1
    assert net.core.get_topic_subscriber_count("ünï") == 1
    assert net.core.get_topic_subscriber_count("bad\nline") == 0
    assert len([r for r in caplog.records if "control characters" in r.getMessage()]) == 3


def test_subscription_limit_truncates_then_raises() -> None:
    net = Net(jwt_config(max_subscriptions_per_connection=3))
    a = net.connect()
    net.core.subscribe(a.id, ["a", "b"])
    net.core.subscribe(a.id, ["c", "d", "e"])  # truncated to fit: c only
    assert [net.core.get_topic_subscriber_count(t) for t in "abcde"] == [1, 1, 1, 0, 0]
    with pytest.raises(RuntimeError) as info:
        net.core.subscribe(a.id, ["a"])  # even re-subscribing an existing topic
    assert str(info.value) == f"Connection {a.id} reached max subscriptions (3)"
    net.core.unsubscribe(a.id, ["a"])
    net.core.subscribe(a.id, ["q"], queue_group="g")  # groups count too
    with pytest.raises(RuntimeError):
        net.core.subscribe(a.id, ["z"])


def test_resubscribe_does_not_duplicate_delivery() -> None:
    net = Net()
    a = net.connect()
    net.core.subscribe(a.id, ["t"])
    net.core.subscribe(a.id, ["t", "t"])
    assert net.core.get_topic_subscriber_count("t") == 1
    net.core.broadcast_local("t", '{"t":"x","p":1}')
    net.pump()
    assert a.payloads() == [1]


def test_subscribe_argument_checks() -> None:
    net = Net()
    a = net.connect()
    with pytest.raises(TypeError):
        net.core.subscribe(a.id, "topic")
    with pytest.raises(TypeError):
        net.core.unsubscribe(a.id, "topic")
    net.core.subscribe("ghost", ["t"])  # unknown: silent
    net.core.unsubscribe("ghost", ["t"])
    assert net.core.get_topic_subscriber_count("t") == 0


def test_presence_data_is_tracked_only_when_presence_is_on() -> None:
    net = Net(jwt_config(presence_enabled=True))
    a = net.connect()
    net.core.subscribe(a.id, ["t"], presence_data={"status": "online"})
    assert net.core.presence("t") == {"alice": {"data": {"status": "online"}, "connections": 1}}
    off = Net()
    b = off.connect()
    off.core.subscribe(b.id, ["t"], presence_data={"status": "online"})  # ignored, like 2.5.1
    assert off.core.get_topic_subscriber_count("t") == 1
    assert off.core.presence("t") == {}


def test_unsubscribe_stops_delivery() -> None:
    net = Net()
    a = net.connect()
    net.core.subscribe(a.id, ["t", "u", "v*"])
    net.core.unsubscribe(a.id, ["t", "missing", "t"])
    for topic, n in (("t", 1), ("u", 2), ("v1", 3)):
        net.core.broadcast_local(topic, json.dumps({"t": "x", "p": n}))
    net.core.unsubscribe(a.id)
    net.core.broadcast_local("u", '{"t":"x","p":4}')
    net.pump()
    assert a.payloads() == [2, 3]
    assert net.core.health_snapshot(0.0)["connections"] == 1


def test_recovery_stamp_is_the_single_payload_of_every_fan_out() -> None:
    """With recovery on, glob and queue-group deliveries carry the same stamped bytes,
    and a publication nobody receives is still stored (tests/test_hub_recovery.py has
    the rest)."""
    net = Net(jwt_config(recovery_enabled=True))
    a = net.connect()
    net.core.subscribe(a.id, ["r*"], queue_group=None)
    net.core.subscribe(a.id, ["room"], queue_group="g")
    net.core.broadcast_local("room", '{"t":"x"}')
    out = frames(net.core.data_to_send(a.conn))
    assert len(out) == 2 and out[0] == out[1]
    assert out[0][1].startswith(b'{"tp":"room","e":"') and out[0][1].endswith(
        b'"o":0,"c":"U","t":"x"}'
    )
    net.core.broadcast_local("nobody", '{"t":"x"}')
    assert net.core.health_snapshot(0.0)["recovery_topic_count"] == 2
    plain = Net()
    plain.core.broadcast_local("nobody", '{"t":"x"}')
    assert plain.core.health_snapshot(0.0)["recovery_topic_count"] == 0


def test_client_frames_masked_with_literal_bytes_reach_the_queue() -> None:
    """A raw client (literal handshake + masked frames) works as well as ClientConnection."""
    net = Net(CoreConfig())
    conn = net.core.open_connection(0.0)
    assert conn is not None
    net.core.feed(
        conn,
        b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        + encode_frame(TEXT, b'{"type":"hi","payload":1}', mask_key=b"abcd"),
        0.0,
    )
    head = net.core.data_to_send(conn)
    assert head.startswith(b"HTTP/1.1 101") and b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head
    assert drain(net) == [("connect", conn.conn_id, ""), ("msg", conn.conn_id, {"t": "hi", "p": 1})]
    assert conn.state is ConnectionState.OPEN

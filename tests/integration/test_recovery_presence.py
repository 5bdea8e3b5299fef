"""Recovery and presence over real sockets, with the published wse-client 2.5.1.

Each test runs on every transport (conftest.py). The application side is a small drain
thread (:class:`App`) that subscribes connections when the client asks with a plain
``subscription_update``, as an application written for the original does; the
``recover: true`` resubscription after a reconnect is answered by the server itself
(PROTOCOL §13.3). Waits are bounded.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from wse_client import AsyncWSEClient, ReconnectConfig, WSEEvent

from wse_server import WSEServer

from .conftest import IN_PROCESS_TRANSPORTS, SECRET, AnyServer, make_token, url_of

pytestmark = [pytest.mark.loopback, pytest.mark.interop]

FAST_RECONNECT = ReconnectConfig(base_delay=0.05, max_delay=0.2, jitter=False, max_attempts=50)
NO_RECONNECT = ReconnectConfig(max_attempts=0)
TOPIC = "ticks"


class App:
    """A drain-mode application: records events, subscribes on plain subscribe requests."""

    def __init__(self, server: AnyServer) -> None:
        self.server = server
        self.events: list[tuple[str, Any, Any]] = []
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for kind, cid, value in self.server.drain_inbound(256, 20):
                with self.lock:
                    self.events.append((kind, cid, value))
                if kind == "msg" and isinstance(value, dict):
                    p = value.get("p")
                    if value.get("t") == "subscription_update" and isinstance(p, dict):
                        if p.get("action") == "subscribe":
                            self.server.subscribe_connection(cid, p["topics"])
                        elif p.get("action") == "unsubscribe":
                            self.server.unsubscribe_connection(cid, p["topics"])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def of_kind(self, *kinds: str) -> list[tuple[str, Any, Any]]:
        with self.lock:
            return [e for e in self.events if e[0] in kinds]

    async def wait(self, cond: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = cond()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.01)


def raw_frames(client: AsyncWSEClient) -> list[str | bytes]:
    """Every frame the client's connection processes (observation only)."""
    frames: list[str | bytes] = []
    manager = client._connection
    original = manager._handle_raw_message

    def spy(data: str | bytes) -> None:
        frames.append(data)
        original(data)

    manager._handle_raw_message = spy  # type: ignore[method-assign]
    return frames


def wire_offsets(frames: list[str | bytes], topic: str) -> list[int]:
    """Offsets of the stamped text frames of ``topic``, in arrival order."""
    out = []
    for f in frames:
        if isinstance(f, str) and f.startswith('{"tp":'):
            msg = json.loads(f)
            if msg["tp"] == topic:
                out.append(msg["o"])
    return out


def wire_replies(frames: list[str | bytes]) -> list[dict[str, Any]]:
    """The ``p`` of every ``subscription_update`` the server sent (binary JSON frames);
    wse-client consumes them internally and never hands them to handlers."""
    out = []
    for f in frames:
        if isinstance(f, bytes) and f[:1] == b"{":
            msg = json.loads(f)
            if msg.get("t") == "subscription_update":
                out.append(msg["p"])
    return out


def run(coro: Any, timeout: float = 40.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Publisher:
    """Publishes ``{"t":"tick","p":{"n":i}}`` to a topic continuously, in its own thread."""

    def __init__(self, server: AnyServer, topic: str, interval: float = 0.002) -> None:
        self.server = server
        self.topic = topic
        self.count = 0
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.server.broadcast_local(
                self.topic, json.dumps({"t": "tick", "p": {"n": self.count}})
            )
            self.count += 1
            self._stop.wait(self._interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.count


# --------------------------------------------------------------------------- recovery


def test_reconnect_recovers_exactly_the_missed_messages(
    server_factory: Callable[..., AnyServer],
) -> None:
    """wse-client subscribes, its socket dies while the server keeps publishing, it
    reconnects and resubscribes with recover:true: it gets exactly what it missed, then
    the live stream: on the wire every offset arrives once, in order (F8), so its own
    dedup sees no duplicate and no gap (no second recovery request)."""
    server = server_factory(recovery_enabled=True)
    app = App(server)
    publisher: Publisher | None = None

    async def scenario() -> None:
        nonlocal publisher
        client = AsyncWSEClient(url_of(server), token=make_token("rita"), reconnect=FAST_RECONNECT)
        frames = raw_frames(client)
        delivered: list[int] = []

        @client.on("tick")
        def on_tick(event: WSEEvent) -> None:
            delivered.append(event.payload["n"])

        async with client:
            assert client.recovery_enabled  # server_ready said recovery:true
            first = await app.wait(lambda: app.of_kind("auth_connect"), "auth_connect")
            assert await client.subscribe([TOPIC])
            await app.wait(lambda: server.get_topic_subscriber_count(TOPIC) == 1, "subscribe")
            publisher = Publisher(server, TOPIC)
            await app.wait(lambda: len(delivered) >= 30, "30 live messages")
            ws = client._connection._ws
            assert ws is not None
            ws.transport.abort()  # the TCP connection dies: no Close frame (1006)
            await app.wait(
                lambda: len(app.of_kind("auth_connect")) == 2, "the reconnection", timeout=15
            )
            await app.wait(lambda: wire_replies(frames), "the recovery reply")
            await asyncio.sleep(0.3)  # live traffic after the replay
            total = publisher.stop()
            await app.wait(lambda: delivered and delivered[-1] == total - 1, "the last tick")
        await asyncio.sleep(0.05)
        # The application saw the first plain subscribe only; the recover:true one after
        # the reconnect was answered by the server.
        subs = [v for k, _, v in app.of_kind("msg") if v.get("t") == "subscription_update"]
        assert [s["p"] for s in subs] == [{"action": "subscribe", "topics": [TOPIC]}]
        assert first[0][1] != app.of_kind("auth_connect")[1][1]
        assert delivered == list(range(total))
        assert wire_offsets(frames, TOPIC) == list(range(total))  # nothing twice on the wire
        (reply,) = wire_replies(frames)  # one recovery request: the client saw no gap
        entry = reply["recovery"][TOPIC]
        assert reply["success"] is True and reply["recovered"] is True
        assert entry["recovered"] is True and entry["count"] >= 1
        assert client.recovery_state[TOPIC][1] == total - 1

    try:
        run(scenario())
    finally:
        if publisher is not None:
            publisher.stop()
        app.stop()
    snap = server.health_snapshot()
    assert snap["recovery_enabled"] is True and snap["recovery_topic_count"] == 1
    assert 0 < snap["recovery_total_bytes"] <= 128 * 200


def test_bad_recovery_input_gives_clear_errors_and_corrupts_nothing(
    server_factory: Callable[..., AnyServer],
) -> None:
    server = server_factory(recovery_enabled=True)
    app = App(server)

    async def scenario() -> None:
        client = AsyncWSEClient(url_of(server), token=make_token("bea"), reconnect=NO_RECONNECT)
        frames = raw_frames(client)
        async with client:
            ((_, cid, _),) = await app.wait(lambda: app.of_kind("auth_connect"), "connect")
            server.subscribe_connection(cid, ["t"])
            for i in range(3):
                server.broadcast_local("t", json.dumps({"t": "tick", "p": {"n": i}}))
            await app.wait(lambda: len(wire_offsets(frames, "t")) == 3, "3 stamped ticks")
            epoch = client.recovery_state["t"][0]
            with pytest.raises(RuntimeError, match=r"Invalid epoch hex string: 'zz'"):
                server.subscribe_with_recovery(cid, ["t"], recover=True, epoch="zz", offset=0)
            for bad_offset in (-1, 2**64):
                with pytest.raises(OverflowError):
                    server.subscribe_with_recovery(
                        cid, ["t"], recover=True, epoch=epoch, offset=bad_offset
                    )
            with pytest.raises(TypeError):
                server.subscribe_with_recovery(cid, ["t"], recover=True, epoch=5, offset=0)
            result = server.subscribe_with_recovery(
                cid, ["never-published", "t"], recover=True, epoch=epoch, offset=2
            )
            assert result == {
                "recovered": False,
                "topics": {
                    "never-published": {
                        "epoch": None,
                        "offset": 0,
                        "recoverable": False,
                        "recovered": False,
                        "count": 0,
                    },
                    "t": {
                        "epoch": epoch,
                        "offset": 2,
                        "recoverable": True,
                        "recovered": True,
                        "count": 0,
                    },
                },
            }
            # A malformed wire request gets an answer; the connection stays usable.
            await client.send(
                "subscription_update",
                {"action": "subscribe", "recover": True, "topics": ["t"],
                 "recovery": {"t": {"epoch": "not-hex", "offset": 0}}},
            )  # fmt: skip
            await client.send(
                "subscription_update", {"action": "subscribe", "recover": True, "topics": 7}
            )
            await app.wait(lambda: len(wire_replies(frames)) == 2, "two answers")
            replies = wire_replies(frames)
            assert replies[0]["invalid"]["t"].startswith("Invalid epoch hex string")
            assert replies[0]["recovery"]["t"]["recovered"] is False
            assert replies[1]["success"] is False and "topics" in replies[1]["error"]
            server.broadcast_local("t", json.dumps({"t": "tick", "p": {"n": 3}}))
            await app.wait(lambda: wire_offsets(frames, "t")[-1:] == [3], "the next tick")
            assert wire_offsets(frames, "t") == [0, 1, 2, 3]

    try:
        run(scenario())
    finally:
        app.stop()
    assert server.health_snapshot()["recovery_topic_count"] == 1


# --------------------------------------------------------------------------- presence


def test_presence_events_reach_wse_client_handlers(
    server_factory: Callable[..., AnyServer],
) -> None:
    server = server_factory(presence_enabled=True, presence_max_data_size=64)
    app = App(server)

    async def scenario() -> None:
        alice = AsyncWSEClient(url_of(server), token=make_token("alice"), reconnect=NO_RECONNECT)
        events: list[tuple[str, str, Any]] = []
        for kind in ("presence_join", "presence_leave", "presence_update"):
            alice.on(kind)(lambda ev: events.append((ev.type, ev.payload["user_id"],
                                                     ev.payload["data"])))  # fmt: skip
        async with alice:
            ((_, a_id, _),) = await app.wait(lambda: app.of_kind("auth_connect"), "alice")
            server.subscribe_connection(a_id, ["room"], presence_data={"status": "online"})
            bob = AsyncWSEClient(url_of(server), token=make_token("bob"), reconnect=NO_RECONNECT)
            async with bob:
                auths = await app.wait(
                    lambda: len(app.of_kind("auth_connect")) == 2 and app.of_kind("auth_connect"),
                    "bob",
                )
                b_id = auths[1][1]
                server.subscribe_connection(b_id, ["room"], presence_data={"status": "away"})
                await app.wait(lambda: len(events) == 2, "bob's join")
                assert server.presence("room") == {
                    "alice": {"data": {"status": "online"}, "connections": 1},
                    "bob": {"data": {"status": "away"}, "connections": 1},
                }
                assert server.presence_stats("room") == {"num_users": 2, "num_connections": 2}
                server.update_presence(b_id, {"status": "busy"})
                with pytest.raises(RuntimeError, match="Failed to update presence data"):
                    server.update_presence(b_id, {"blob": "x" * 100})  # over 64 bytes
                server.subscribe_connection(b_id, ["big"], presence_data={"blob": "x" * 100})
                assert server.presence("big") == {}  # not tracked, as the original
                await app.wait(lambda: len(events) == 3, "bob's update")
            await app.wait(lambda: len(events) == 4, "bob's leave")
        assert events == [
            ("presence_join", "alice", {"status": "online"}),
            ("presence_join", "bob", {"status": "away"}),
            ("presence_update", "bob", {"status": "busy"}),
            ("presence_leave", "bob", {"status": "busy"}),
        ]
        await app.wait(lambda: len(app.of_kind("presence_leave")) == 2, "alice's leave")
        drained = [
            (k, v["topic"], v["user_id"], v["data"])
            for k, c, v in app.of_kind("presence_join", "presence_leave", "presence_update")
        ]
        assert drained == [
            ("presence_join", "room", "alice", {"status": "online"}),
            ("presence_join", "room", "bob", {"status": "away"}),
            ("presence_update", "room", "bob", {"status": "busy"}),
            ("presence_leave", "room", "bob", {"status": "busy"}),
            ("presence_leave", "room", "alice", {"status": "online"}),
        ]

    try:
        run(scenario())
    finally:
        app.stop()
    snap = server.health_snapshot()
    assert list(snap)[-3:] == ["presence_enabled", "presence_topics", "presence_total_users"]
    assert (snap["presence_topics"], snap["presence_total_users"]) == (0, 0)


async def _presence_script(server: WSEServer, conn_ids: Callable[[], list[str]]) -> None:
    """Two wse-clients join, update and leave a topic (used by both delivery modes)."""
    clients = [
        AsyncWSEClient(url_of(server), token=make_token(user), reconnect=NO_RECONNECT)
        for user in ("ann", "ben")
    ]
    for client in clients:
        await client.connect()
    deadline = time.monotonic() + 10
    while len(conn_ids()) < 2:
        assert time.monotonic() < deadline, "clients did not connect"
        await asyncio.sleep(0.01)
    first, second = conn_ids()[:2]
    server.subscribe_connection(first, ["lobby"], presence_data={"n": 1})
    server.subscribe_connection(second, ["lobby", "l*"], presence_data={"n": 2})
    server.update_presence(second, {"n": 3})
    server.unsubscribe_connection(first, ["lobby"])
    for client in clients:
        await client.disconnect()


def _presence_in_mode(transport: str, mode: str) -> list[tuple[str, str, str, Any]]:
    """Run the presence script against a server in drain or callback mode; return the
    presence events the application received."""
    server = WSEServer(
        "127.0.0.1", 0, jwt_secret=SECRET, presence_enabled=True, transport=transport
    )
    got: list[tuple[str, str, str, Any]] = []
    conns: list[str] = []
    stop = threading.Event()
    drainer: threading.Thread | None = None

    def on_presence(kind: str, v: dict[str, Any]) -> None:
        got.append((kind, v["topic"], v["user_id"], v["data"]))

    def drain_loop() -> None:
        while not stop.is_set():
            for kind, cid, v in server.drain_inbound(256, 20):
                if kind == "auth_connect":
                    conns.append(cid)
                elif cid is None:
                    on_presence(kind, v)

    if mode == "callbacks":
        server.set_callbacks(
            lambda cid, _cookies: conns.append(cid), None, None, on_presence=on_presence
        )
    else:
        server.enable_drain_mode()
        drainer = threading.Thread(target=drain_loop, daemon=True)
        drainer.start()
    server.start()
    try:
        run(_presence_script(server, lambda: list(conns)), timeout=20)
        deadline = time.monotonic() + 5
        while len(got) < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        server.stop()
        if drainer is not None:
            drainer.join(5)
    return got


@pytest.mark.parametrize("transport", IN_PROCESS_TRANSPORTS)
def test_callback_mode_and_drain_mode_see_the_same_presence(transport: str) -> None:
    """F11: the tracking and its events do not depend on how the application takes them."""
    drained = _presence_in_mode(transport, "drain")
    assert _presence_in_mode(transport, "callbacks") == drained
    assert [(k, t, u) for k, t, u, _ in drained] == [
        ("presence_join", "lobby", "ann"),
        ("presence_join", "lobby", "ben"),
        ("presence_join", "l*", "ben"),
        ("presence_update", "lobby", "ben"),
        ("presence_update", "l*", "ben"),
        ("presence_leave", "lobby", "ann"),
        ("presence_leave", "lobby", "ben"),
        ("presence_leave", "l*", "ben"),
    ]


def test_constructor_and_idle_server_rules() -> None:
    """Recovery/presence arguments, and what a server that is not started answers."""
    with pytest.raises(ValueError, match="recovery_ttl"):
        WSEServer("127.0.0.1", 0, recovery_enabled=True, recovery_ttl=0)
    WSEServer("127.0.0.1", 0, recovery_ttl=0)  # accepted while recovery is off
    server = WSEServer(
        "127.0.0.1", 0, recovery_enabled=True, recovery_buffer_size=20, presence_enabled=True
    )
    assert server._core.config.recovery.capacity == 32  # 20 rounded up (PROTOCOL §13.1)
    assert server._core.config.connection.recovery_enabled is True
    snap = server.health_snapshot()
    assert (snap["recovery_enabled"], snap["recovery_topic_count"]) == (True, 0)
    assert (snap["presence_topics"], snap["presence_total_users"]) == (0, 0)
    assert server.presence_stats("t") == {"num_users": 0, "num_connections": 0}
    with pytest.raises(RuntimeError, match="Failed to update presence data"):
        server.update_presence("ghost", {"a": 1})  # unknown connection (ref §8)
    plain = WSEServer("127.0.0.1", 0)
    plain.update_presence("ghost", {"a": 1})  # presence disabled: a no-op
    assert plain.subscribe_with_recovery("ghost", [], recover=True, epoch="0", offset=0) == {
        "recovered": True,
        "topics": {},
    }

"""The published wse-client 2.5.1 (async and sync APIs) against WSEServer over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import wse_client
import wse_client.connection
from wse_client import AsyncWSEClient, ReconnectConfig, SyncWSEClient

from wse_proto.envelope import inject_category

from .conftest import AnyServer, conn_info, make_token, url_of

pytestmark = [pytest.mark.loopback, pytest.mark.interop]

NO_RECONNECT = ReconnectConfig(max_attempts=0)
PRICE_TEXT = json.dumps({"t": "price", "p": {"px": 1.5}})  # json.dumps spacing (F1)


async def adrain(
    server: AnyServer,
    predicate: Callable[[tuple[str, Any, Any]], bool],
    timeout: float = 5.0,
) -> tuple[str, Any, Any]:
    """Drain from a coroutine without blocking the client's loop."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ev in server.drain_inbound(256, 0):
            if predicate(ev):
                return ev
        await asyncio.sleep(0.01)
    raise TimeoutError("expected drain event did not arrive")


async def next_event(client: AsyncWSEClient, type_: str, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        ev = await client.recv(timeout=max(0.01, deadline - time.monotonic()))
        if ev.type == type_:
            return ev


def run(coro: Any, timeout: float = 20.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def record_raw(client: AsyncWSEClient) -> list[str | bytes]:
    """Keep every frame the client's connection receives (observation only)."""
    frames: list[str | bytes] = []
    manager = client._connection
    original = manager._handle_raw_message

    def spy(data: str | bytes) -> None:
        frames.append(data)
        original(data)

    manager._handle_raw_message = spy  # type: ignore[method-assign]
    return frames


@pytest.mark.parametrize("how", ["client-default", "cookie-only", "bearer-only"])
def test_connect_cookie_and_bearer(server: AnyServer, how: str) -> None:
    token = make_token("alice")
    kwargs: dict[str, Any] = {"reconnect": NO_RECONNECT}
    if how == "client-default":
        kwargs["token"] = token  # wse-client sends Cookie and Authorization
    elif how == "cookie-only":
        kwargs["extra_headers"] = {"Cookie": f"theme=dark; access_token={token}"}
    else:
        kwargs["extra_headers"] = {"Authorization": f"Bearer {token}"}

    async def scenario() -> None:
        async with AsyncWSEClient(url_of(server), **kwargs) as client:
            assert client.is_ready
            _, conn_id, user = await adrain(server, lambda e: e[0] == "auth_connect")
            assert user == "alice"
            assert client._connection.connection_id == conn_id
            assert server.get_connections() == [conn_id]

    run(scenario())


def test_server_ready_then_server_hello(server: AnyServer) -> None:
    async def scenario() -> None:
        client = AsyncWSEClient(url_of(server), token=make_token("bob"), reconnect=NO_RECONNECT)
        frames = record_raw(client)
        async with client:
            deadline = time.monotonic() + 5
            while not client._server_features and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert client.is_fully_ready
        texts = [json.loads(f) for f in frames if isinstance(f, str)]
        assert [m["t"] for m in texts[:2]] == ["server_ready", "server_hello"]
        ready, hello = texts[0], texts[1]
        assert ready["p"]["details"]["user_id"] == "bob"
        assert ready["p"]["details"]["connection_id"] == hello["p"]["connection_id"]
        assert hello["p"]["server_version"] == "2.5.1"
        assert hello["p"]["limits"]["max_message_size"] == 1_048_576
        assert hello["p"]["ping_interval"] == 25_000
        assert hello["p"]["features"]["encryption"] is False

    run(scenario())


def test_subscribe_broadcast_json_and_compressed_send_event(server: AnyServer) -> None:
    async def scenario() -> None:
        client = AsyncWSEClient(url_of(server), token=make_token("carol"), reconnect=NO_RECONNECT)
        frames = record_raw(client)
        async with client:
            _, cid, _ = await adrain(server, lambda e: e[0] == "auth_connect")
            server.subscribe_connection(cid, ["prices", "news.*"])
            assert server.get_topic_subscriber_count("prices") == 1
            server.broadcast_local("prices", PRICE_TEXT)
            server.broadcast_local("news.eu", '{"t":"headline_snapshot","p":{"h":"x"}}')
            server.broadcast_local("other", '{"t":"never","p":{}}')
            price = await next_event(client, "price")
            assert price.payload == {"px": 1.5}
            assert price.category == "U"
            headline = await next_event(client, "headline_snapshot")
            assert headline.category == "S"  # category injected from the type
            blob = "abcdefghij" * 200
            size = server.send_event(cid, {"t": "big", "p": {"blob": blob}})
            assert size > 0
            big = await next_event(client, "big")
            assert big.payload == {"blob": blob}
            assert any(isinstance(f, bytes) and f.startswith(b"C:x") for f in frames)
            small = server.send_event(cid, {"t": "small", "p": {"n": 1}})
            assert (await next_event(client, "small")).payload == {"n": 1}
            assert small < size
        # the broadcast went out as one text frame holding the category-injected text
        broadcast_frames = [f for f in frames if isinstance(f, str) and '"price"' in f]
        assert broadcast_frames == [inject_category(PRICE_TEXT)]

    run(scenario())


def test_msgpack_connection(server: AnyServer) -> None:
    async def scenario() -> None:
        client = AsyncWSEClient(
            url_of(server, "?format=msgpack"), token=make_token("dave"), reconnect=NO_RECONNECT
        )
        frames = record_raw(client)
        async with client:
            _, cid, _ = await adrain(server, lambda e: e[0] == "auth_connect")
            server.send_event(cid, {"t": "packed", "p": {"k": [1, 2, 3], "s": "é"}})
            ev = await next_event(client, "packed")
            assert ev.payload == {"k": [1, 2, 3], "s": "é"}
            server.subscribe_connection(cid, ["t"])
            server.broadcast_local("t", '{"t":"live","p":{"v":1}}')
            assert (await next_event(client, "live")).payload == {"v": 1}
        assert any(isinstance(f, bytes) and f.startswith(b"M:") for f in frames)
        # broadcasts stay JSON text even on msgpack connections (§5.2)
        assert any(isinstance(f, str) and '"live"' in f for f in frames)

    run(scenario())


def test_e2e_encryption_both_ways_including_broadcasts(server: AnyServer) -> None:
    async def scenario() -> None:
        client = AsyncWSEClient(
            url_of(server), token=make_token("eve"), encryption=True, reconnect=NO_RECONNECT
        )
        frames = record_raw(client)
        async with client:
            _, cid, _ = await adrain(server, lambda e: e[0] == "auth_connect")
            deadline = time.monotonic() + 5
            while not (client._security and client._security.is_enabled):
                assert time.monotonic() < deadline, "key exchange did not complete"
                await asyncio.sleep(0.01)
            info = conn_info(server, cid)
            assert info is not None and info.encrypted
            # client -> server: E: frames, delivered decrypted to the app
            assert await client.send("secret_note", {"text": "hello"})
            _, _, msg = await adrain(server, lambda e: e[0] == "msg")
            assert msg["t"] == "secret_note" and msg["p"] == {"text": "hello"}
            # server -> client: send_event and a topic broadcast, both encrypted
            mark = len(frames)
            server.send_event(cid, {"t": "private", "p": {"n": 7}})
            server.subscribe_connection(cid, ["room"])
            server.broadcast_local("room", '{"t":"room_msg","p":{"who":"all"}}')
            assert (await next_event(client, "private")).payload == {"n": 7}
            assert (await next_event(client, "room_msg")).payload == {"who": "all"}
            later = frames[mark:]
            assert later and all(isinstance(f, bytes) and f.startswith(b"E:") for f in later)

    run(scenario())


def test_ping_rtt_measured_by_network_monitor(
    server_factory: Callable[..., AnyServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The client pings every 15 s; shorten that so the test sees a few round trips.
    monkeypatch.setattr(wse_client.connection, "HEARTBEAT_INTERVAL", 0.1)
    server = server_factory(ping_interval=0.2, idle_timeout=5)

    async def scenario() -> None:
        client = AsyncWSEClient(url_of(server), token=make_token("pat"), reconnect=NO_RECONNECT)
        frames = record_raw(client)
        async with client:
            deadline = time.monotonic() + 5
            while client._network_monitor._pongs_received < 3:
                assert time.monotonic() < deadline, "no PONG recorded"
                await asyncio.sleep(0.02)
            stats = client.get_stats()
            assert 0 <= stats["network"]["latency_ms"] < 1000
            # the server's own heartbeat reached the client in the form it recognises
            assert any(isinstance(f, str) and f.startswith('{"c":"WSE","t":"ping"') for f in frames)
            assert client.is_connected

    run(scenario())


def test_rate_limit_warning_and_error(server_factory: Callable[..., AnyServer]) -> None:
    server = server_factory(rate_limit_capacity=10.0, rate_limit_refill=0.5)

    async def scenario() -> None:
        async with AsyncWSEClient(
            url_of(server), token=make_token("rl"), reconnect=NO_RECONNECT
        ) as client:
            _, cid, _ = await adrain(server, lambda e: e[0] == "auth_connect")
            results = [server.send_event(cid, {"t": "n", "p": {"i": i}}) for i in range(12)]
            assert all(r > 0 for r in results[:10]) and results[10:] == [0, 0]
            warning = await next_event(client, "rate_limit_warning")
            assert warning.payload["limit"] == 10
            assert warning.payload["remaining"] < 2
            error = await next_event(client, "error")
            assert error.payload["code"] == "RATE_LIMITED"
            assert "wse_rate_limited_total 2" in server.prometheus_metrics()

    run(scenario())


def test_auth_failure_stops_the_client(server: AnyServer) -> None:
    async def scenario() -> None:
        client = AsyncWSEClient(
            url_of(server), token=make_token("x", exp_in=-3600), reconnect=NO_RECONNECT
        )
        frames = record_raw(client)
        # The upgrade succeeds (101), then error + close 4401; connect() itself would
        # keep waiting 10 s for a server_ready that never comes, so watch the state.
        connecting = asyncio.create_task(client.connect())
        deadline = time.monotonic() + 5
        while client.state != wse_client.ConnectionState.ERROR:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        connecting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await connecting
        await client.disconnect()
        errors = [json.loads(f) for f in frames if isinstance(f, str)]
        assert errors[0]["t"] == "error" and errors[0]["p"]["code"] == "AUTH_FAILED"
        assert server.get_connection_count() == 0

    run(scenario())


def test_sync_client(server: AnyServer) -> None:
    client = SyncWSEClient(url_of(server), token=make_token("sync"), reconnect=NO_RECONNECT)
    client.connect(timeout=10)
    try:
        deadline = time.monotonic() + 5
        cid = None
        while cid is None and time.monotonic() < deadline:
            for kind, conn, _ in server.drain_inbound(256, 50):
                if kind == "auth_connect":
                    cid = conn
        assert cid is not None
        server.subscribe_connection(cid, ["sync_topic"])
        server.broadcast_local("sync_topic", '{"t":"hello_sync","p":{"ok":true}}')
        ev = client.recv(timeout=5)
        while ev.type != "hello_sync":
            ev = client.recv(timeout=5)
        assert ev.payload == {"ok": True}
        assert client.send("reply", {"n": 1})
        seen: list[Any] = []
        end = time.monotonic() + 5
        while not any(k == "msg" for k, _, _ in seen) and time.monotonic() < end:
            seen += server.drain_inbound(256, 50)
        msg = next(v for k, _, v in seen if k == "msg")
        assert msg["t"] == "reply" and msg["p"] == {"n": 1}
    finally:
        client.close()

"""WSEServer's public API: modes, lifecycle, close codes, native asyncio API, errors, aliases."""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import wse_server
from wse_server import RustWSEServer, WSEServer, rust_jwt_decode, rust_jwt_encode

from .conftest import IN_PROCESS_TRANSPORTS, SECRET, AnyServer, drain_until, make_token, wait_for
from .rawws import RawWS
from .test_raw_protocol import assert_dropped_without_http

pytestmark = pytest.mark.loopback


def test_constructor_mirrors_the_original_signature() -> None:
    params = inspect.signature(WSEServer).parameters
    positional = [p.name for p in params.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == [
        "host", "port", "max_connections", "jwt_secret", "jwt_issuer", "jwt_audience",
        "jwt_cookie_name", "jwt_previous_secret", "jwt_key_id", "jwt_algorithm",
        "jwt_private_key", "max_inbound_queue_size", "recovery_enabled", "recovery_buffer_size",
        "recovery_ttl", "recovery_max_messages", "recovery_memory_budget", "presence_enabled",
        "presence_max_data_size", "presence_max_members", "rate_limit_capacity",
        "rate_limit_refill", "max_message_size", "ping_interval", "idle_timeout",
        "max_outbound_queue_bytes", "max_subscriptions_per_connection",
    ]  # fmt: skip
    defaults = {name: params[name].default for name in positional[2:]}
    assert defaults == {
        "max_connections": 1000, "jwt_secret": None, "jwt_issuer": None, "jwt_audience": None,
        "jwt_cookie_name": None, "jwt_previous_secret": None, "jwt_key_id": None,
        "jwt_algorithm": None, "jwt_private_key": None, "max_inbound_queue_size": 131072,
        "recovery_enabled": False, "recovery_buffer_size": 128, "recovery_ttl": 300,
        "recovery_max_messages": 500, "recovery_memory_budget": 268435456,
        "presence_enabled": False, "presence_max_data_size": 4096, "presence_max_members": 0,
        "rate_limit_capacity": 100000.0, "rate_limit_refill": 10000.0,
        "max_message_size": 1048576, "ping_interval": 25, "idle_timeout": 60,
        "max_outbound_queue_bytes": 16777216, "max_subscriptions_per_connection": 0,
    }  # fmt: skip
    assert all(p.kind is p.KEYWORD_ONLY for p in params.values() if p.name not in positional)
    assert RustWSEServer is WSEServer
    assert set(wse_server.__all__) >= {"RustWSEServer", "rust_jwt_encode", "rust_jwt_decode"}


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"ping_interval": 30, "idle_timeout": 30}, "idle_timeout"),
        ({"jwt_secret": b"short"}, "32 bytes"),
        ({"jwt_secret": SECRET, "jwt_algorithm": "HS512"}, "Unsupported jwt_algorithm"),
        ({"jwt_secret": SECRET, "jwt_previous_secret": b"tiny"}, "32 bytes"),
        ({"jwt_secret": b"not a pem", "jwt_algorithm": "RS256"}, "PEM"),
        ({"transport": "carrier-pigeon"}, "asyncio, uvloop"),
        ({"max_connections": 0}, "max_connections"),
    ],
)
def test_constructor_value_errors(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        WSEServer("127.0.0.1", 0, **kwargs)


def test_not_running_rules() -> None:
    server = WSEServer("127.0.0.1", 0)
    for call in (
        lambda: server.send("c", "x"),
        lambda: server.send_bytes("c", b"x"),
        lambda: server.send_event("c", {"t": "x"}),
        lambda: server.broadcast_all("x"),
        lambda: server.broadcast_all_bytes(b"x"),
        lambda: server.broadcast_local("t", "x"),
        lambda: server.disconnect("c"),
        lambda: server.drain(),
    ):
        with pytest.raises(RuntimeError, match="Not running"):
            call()
    server.broadcast("t", "x")  # silently skips local delivery before start
    assert server.drain_inbound(10, 0) == []
    assert server.get_connection_count() == 0 and server.get_connections() == []
    assert not server.is_running()
    snap = server.health_snapshot()
    assert list(snap)[:3] == ["connections", "inbound_queue_depth", "inbound_dropped"]
    assert "presence_topics" not in snap


def test_not_built_yet_features_raise_clearly() -> None:
    server = WSEServer("127.0.0.1", 0, presence_enabled=True)
    with pytest.raises(RuntimeError, match="not started"):
        server.connect_cluster(["127.0.0.1:9999"])  # the original's error (ref §10.6)
    # recovery and presence are built (tests/integration/test_recovery_presence.py)
    unknown = {"epoch": None, "offset": 0, "recoverable": False, "recovered": False, "count": 0}
    assert server.subscribe_with_recovery("c", ["t"]) == {
        "recovered": False,
        "topics": {"t": unknown},
    }
    server.subscribe_connection("c", ["t"], presence_data={"a": 1})  # unknown id: no-op
    assert server.presence("t") == {}
    assert server.cluster_connected() is False and server.cluster_peers_count() == 0
    assert "presence_topics" in server.health_snapshot()
    plain = WSEServer("127.0.0.1", 0)
    assert plain.presence("t") == {}
    assert plain.presence_stats("t") == {"num_users": 0, "num_connections": 0}


def test_start_twice_and_bind_error_in_callers_thread(
    server_factory: Callable[..., AnyServer],
) -> None:
    server = server_factory()
    with pytest.raises(RuntimeError):
        server.start()
    other = server_factory(port=server.port, start=False)  # same transport, taken port
    with pytest.raises(OSError):
        other.start()
    assert not other.is_running()


@pytest.mark.parametrize("transport", IN_PROCESS_TRANSPORTS)
def test_callback_mode_runs_on_dispatcher_thread(transport: str) -> None:
    calls: list[tuple[str, Any, str]] = []
    done = threading.Event()

    def on_connect(cid: str, cookies: str) -> None:
        calls.append(("connect", (cid, cookies), threading.current_thread().name))

    def on_message(cid: str, value: Any) -> None:
        calls.append(("message", (cid, value), threading.current_thread().name))

    def on_disconnect(cid: str) -> None:
        calls.append(("disconnect", cid, threading.current_thread().name))
        done.set()

    server = WSEServer("127.0.0.1", 0, jwt_secret=SECRET, transport=transport)
    server.set_callbacks(on_connect, on_message, on_disconnect)
    server.start()
    try:
        token = make_token("cb")
        ws = RawWS(server.port, headers={"Cookie": f"theme=dark; access_token={token}"})
        ws.recv_json()
        ws.send_text('{"t":"a","p":{}}')
        ws.send_text("raw text")
        time.sleep(0.2)
        ws.close()
        assert done.wait(5)
    finally:
        server.stop()
    kinds = [c[0] for c in calls]
    assert kinds == ["connect", "message", "message", "disconnect"]
    cid = calls[0][1][0]
    assert calls[0][1] == (cid, f"theme=dark; access_token={token}")  # cookies, even with JWT
    assert calls[1][1] == (cid, {"t": "a", "p": {}})
    assert calls[2][1] == (cid, "raw text")
    assert {c[2] for c in calls} == {"wse-callbacks"}


def test_drain_mode_blocks_until_first_event_then_batches(server: AnyServer) -> None:
    started = time.monotonic()
    assert server.drain_inbound(10, 150) == []
    assert time.monotonic() - started >= 0.14
    ws = RawWS(server.port, token=make_token())
    try:
        ws.recv_json()
        for i in range(5):
            ws.send_json({"t": "n", "p": {"i": i}})
        wait_for(lambda: server.inbound_queue_depth() >= 6)
        first = server.drain_inbound(2, 0)
        rest = server.drain_inbound(256, 0)
        assert [e[0] for e in first] == ["auth_connect", "msg"]
        assert [e[2]["p"]["i"] for e in first[1:] + rest] == [0, 1, 2, 3, 4]
        assert server.inbound_dropped_count() == 0
    finally:
        ws.close()


def test_drain_inbound_wakes_when_an_event_arrives(server: AnyServer) -> None:
    result: list[Any] = []
    waiter = threading.Thread(target=lambda: result.append(server.drain_inbound(10, 5000)))
    waiter.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    ws = RawWS(server.port, token=make_token())
    try:
        waiter.join(5)
        assert time.monotonic() - t0 < 2.0
        assert result and result[0][0][0] == "auth_connect"
    finally:
        ws.close()


def test_stop_sends_1001_and_disconnect_events(server_factory: Callable[..., AnyServer]) -> None:
    server = server_factory()
    clients = [RawWS(server.port, token=make_token(f"u{i}")) for i in range(3)]
    try:
        for ws in clients:
            ws.recv_json()
        wait_for(lambda: server.get_connection_count() == 3)
        codes: list[Any] = []

        def read_close(ws: RawWS) -> None:
            code, reason, _ = ws.recv_close()
            codes.append((code, reason))
            ws.send(8, b"\x03\xe9")

        readers = [threading.Thread(target=read_close, args=(ws,)) for ws in clients]
        for r in readers:
            r.start()
        t0 = time.monotonic()
        server.stop()
        assert time.monotonic() - t0 < 2.5
        for r in readers:
            r.join(5)
        assert codes == [(1001, "server shutting down")] * 3
        assert not server.is_running()
        events = server.drain_inbound(256, 0)
        assert sorted(e[0] for e in events).count("disconnect") == 3
    finally:
        for ws in clients:
            ws.close()


def test_drain_closes_with_code_and_refuses_new_connections(
    server_factory: Callable[..., AnyServer],
) -> None:
    server = server_factory()
    ws = RawWS(server.port, token=make_token())
    try:
        ws.recv_json()
        drain_until(server, lambda e: e[0] == "auth_connect")
        server.drain(4321, "maintenance", timeout=2)
        code, reason, _ = ws.recv_close()
        assert (code, reason) == (4321, "maintenance")
        ws.send(8, b"")
        ws.expect_eof()
        assert_dropped_without_http(server.port)
        assert server.is_running()  # drain does not stop the server
        drain_until(server, lambda e: e[0] == "disconnect")
    finally:
        ws.close()
    with pytest.raises(ValueError):
        server.drain(1005)  # not a code that may be sent


def test_restart_after_stop(server_factory: Callable[..., AnyServer]) -> None:
    server = server_factory()
    server.stop()
    server.start()
    ws = RawWS(server.port, token=make_token())
    try:
        assert ws.recv_json()["t"] == "server_ready"
    finally:
        ws.close()


def test_disconnect_statusless_and_send_forms(server: AnyServer) -> None:
    ws = RawWS(server.port, token=make_token())
    try:
        ws.recv_json()
        _, cid, _ = drain_until(server, lambda e: e[0] == "auth_connect")
        server.send(cid, "verbatim text")
        server.send_bytes(cid, b"\x01\x02")
        server.broadcast_all('{"t":"all","p":{}}')
        server.broadcast_all_bytes(b"\x09")
        assert ws.recv_frame() == (1, b"verbatim text")
        assert ws.recv_frame() == (2, b"\x01\x02")
        assert ws.recv_frame() == (1, b'{"c":"U","t":"all","p":{}}')
        assert ws.recv_frame() == (2, b"\x09")
        server.disconnect(cid)
        code, reason, _ = ws.recv_close()
        assert (code, reason) == (None, "")
    finally:
        ws.close()


def test_acl_queue_groups_and_limits(server_factory: Callable[..., AnyServer]) -> None:
    server = server_factory(max_subscriptions_per_connection=2)
    restricted = make_token("r", wse_topics={"allow": ["public.*"], "deny": ["public.secret"]})
    a = RawWS(server.port, token=restricted)
    b = RawWS(server.port, token=make_token("b"))
    try:
        a.recv_json()
        b.recv_json()
        ids: dict[str, str] = {}
        while len(ids) < 2:
            for kind, cid, user in server.drain_inbound(256, 50):
                if kind == "auth_connect":
                    ids[user] = cid
        server.subscribe_connection(ids["r"], ["public.secret", "private", "public.news"])
        assert server.get_topic_subscriber_count("public.news") == 1
        assert server.get_topic_subscriber_count("public.secret") == 0
        assert server.get_topic_subscriber_count("private") == 0
        server.subscribe_connection(ids["b"], ["public.jobs"], queue_group="workers")
        server.subscribe_connection(ids["r"], ["public.jobs"], queue_group="workers")
        assert server.get_queue_group_info("public.jobs") == {"workers": 2}
        with pytest.raises(RuntimeError, match="max subscriptions"):
            server.subscribe_connection(ids["r"], ["public.more"])
        for i in range(4):
            server.broadcast_local("public.jobs", f'{{"t":"job","p":{{"i":{i}}}}}')
        got = [b.recv_json()["p"]["i"], b.recv_json()["p"]["i"]]
        got += [a.recv_json()["p"]["i"], a.recv_json()["p"]["i"]]
        assert sorted(got) == [0, 1, 2, 3]
        server.unsubscribe_connection(ids["b"])
        assert server.get_queue_group_info("public.jobs") == {"workers": 1}
        server.set_topic_acl(ids["b"], deny=["x*"])
        server.subscribe_connection(ids["b"], ["xyz", "abc"])
        assert server.get_topic_subscriber_count("xyz") == 0
        assert server.get_topic_subscriber_count("abc") == 1
    finally:
        a.close()
        b.close()


def test_native_asyncio_api() -> None:
    async def scenario() -> list[Any]:
        server = WSEServer("127.0.0.1", 0, jwt_secret=SECRET)
        seen: list[Any] = []
        async with server.running():
            assert server.is_running()
            port = server.port

            def client() -> None:
                ws = RawWS(port, token=make_token("aio"))
                try:
                    ws.recv_json()
                    ws.send_json({"t": "q", "p": {"n": 1}})
                    seen.append(ws.recv_json())  # the broadcast below
                finally:
                    ws.close()

            thread = threading.Thread(target=client)
            thread.start()
            async for kind, cid, value in server.events():
                if kind == "auth_connect":
                    server.subscribe_connection(cid, ["aio"])
                elif kind == "msg":
                    assert value["p"] == {"n": 1}
                    await server.publish("aio", '{"t":"published","p":{}}')
                elif kind == "disconnect":
                    break
            await asyncio.to_thread(thread.join, 5)
        assert not server.is_running()
        return seen

    seen = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert seen and seen[0]["t"] == "published"


def test_serve_coroutine_and_uvloop_transport() -> None:
    async def scenario() -> None:
        server = WSEServer("127.0.0.1", 0, jwt_secret=SECRET)
        task = asyncio.create_task(server.serve())
        while not server.is_running():
            await asyncio.sleep(0.01)
        ws = await asyncio.to_thread(RawWS, server.port, token=make_token())
        assert (await asyncio.to_thread(ws.recv_json))["t"] == "server_ready"
        ws.close()
        await server.aclose()
        await asyncio.wait_for(task, 5)
        assert not server.is_running()
        # stop() from another thread also works while serving inside this loop
        task = asyncio.create_task(server.serve())
        while not server.is_running():
            await asyncio.sleep(0.01)
        with pytest.raises(RuntimeError, match="aclose"):
            server.stop()  # from the serving loop itself it would deadlock
        await asyncio.to_thread(server.stop)
        await asyncio.wait_for(task, 5)
        assert not server.is_running()

    asyncio.run(asyncio.wait_for(scenario(), 20))
    server = WSEServer("127.0.0.1", 0, jwt_secret=SECRET, transport="uvloop")
    server.start()
    try:
        ws = RawWS(server.port, token=make_token())
        assert ws.recv_json()["t"] == "server_ready"
        ws.close()
    finally:
        server.stop()


def test_compat_jwt_helpers_match_server_validation() -> None:
    token = rust_jwt_encode({"sub": "z", "exp": int(time.time()) + 60}, SECRET, key_id="k")
    assert rust_jwt_decode(token, SECRET, key_id="k")["sub"] == "z"
    assert rust_jwt_decode(token, SECRET, key_id="other") is None
    assert rust_jwt_decode(token, b"x" * 40) is None
    expired = rust_jwt_encode({"sub": "z", "exp": int(time.time()) - 120}, SECRET)
    assert rust_jwt_decode(expired, SECRET) is None
    server = WSEServer("127.0.0.1", 0, jwt_secret=SECRET, jwt_key_id="k")
    server.start()
    try:
        ws = RawWS(server.port, token=token)
        assert ws.recv_json()["p"]["details"]["user_id"] == "z"
        ws.close()
    finally:
        server.stop()


def test_serve_raises_bind_errors(server_factory: Callable[..., AnyServer]) -> None:
    taken = server_factory()

    async def scenario() -> None:
        server = WSEServer("127.0.0.1", taken.port)
        with pytest.raises(OSError):
            await server.serve()
        with pytest.raises(OSError):
            async with server.running():
                pass
        assert not server.is_running()

    asyncio.run(asyncio.wait_for(scenario(), 10))

"""Presence through ServerCore: joins, leaves and updates on the wire and in the drain queue.

Real :class:`~wse_proto.server.ServerConnection` machines behind a real upgrade with real
HS256 JWTs, read by real :class:`~wse_proto.client.ClientConnection` machines (the ``Net``
helper of test_hub.py). The presence rules themselves are tested in test_presence.py;
here the hub must feed them the right user ids and topics, and deliver each event to the
topic's current subscribers (exact, glob, one queue-group member; ``E:`` when
encrypted; never stamped) and to the application's drain queue.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hub import Net, Peer, frames, jwt_config, make_token

from wse_proto.config import ServerConfig
from wse_proto.errors import LocalProtocolError
from wse_proto.hub import CoreConfig
from wse_proto.hub_presence import SWEEP_INTERVAL
from wse_proto.presence import UPDATE_FAILED, PresenceConfig
from wse_proto.ws import BINARY, TEXT

KINDS = ("presence_join", "presence_leave", "presence_update")


def pres_config(**kw: Any) -> CoreConfig:
    presence = kw.pop("presence", PresenceConfig())
    return jwt_config(presence_enabled=True, presence=presence, **kw)


def seen(peer: Peer) -> list[tuple[str, str, Any]]:
    """``(kind, user_id, data)`` of the presence events a client received."""
    return [(m["t"], m["p"]["user_id"], m["p"]["data"]) for m in peer.received if m["t"] in KINDS]


def drained(net: Net) -> list[tuple[str, str, str, Any]]:
    """``(kind, topic, user_id, data)`` of the presence drain tuples (conn id None)."""
    out = []
    for kind, cid, value in net.core.pop_inbound(10_000):
        if kind in KINDS:
            assert cid is None
            assert set(value) == {"topic", "user_id", "data"}
            out.append((kind, value["topic"], value["user_id"], value["data"]))
    return out


def test_join_frame_is_the_captured_form_and_reaches_every_kind_of_subscriber() -> None:
    net = Net(pres_config(recovery_enabled=True))
    watcher = net.connect(token=make_token("watcher"))
    glob = net.connect(token=make_token("glob"))
    w1 = net.connect(token=make_token("w1"))
    w2 = net.connect(token=make_token("w2"))
    secret = net.connect(token=make_token("secret"), encryption=True)
    net.core.subscribe(watcher.id, ["room"])
    net.core.subscribe(glob.id, ["ro*"])
    net.core.subscribe(w1.id, ["room"], queue_group="g")
    net.core.subscribe(w2.id, ["room"], queue_group="g")
    net.core.subscribe(secret.id, ["room"])
    net.pump()
    alice = net.connect()
    net.core.pop_inbound(100)
    net.core.subscribe(alice.id, ["room"], presence_data={"status": "online", "a": [1]})
    raw = frames(net.core.data_to_send(watcher.conn))
    # PROTOCOL §7.6 / §14.2: sorted keys, no v, id, ts or stamp (recovery is on here).
    assert raw == [
        (TEXT, b'{"c":"WSE","p":{"data":{"a":[1],"status":"online"},"user_id":"alice"},'
         b'"t":"presence_join"}')
    ]  # fmt: skip
    data = net.core.data_to_send(secret.conn)
    secret_raw = frames(data)
    assert [op for op, _ in secret_raw] == [BINARY] and secret_raw[0][1][:2] == b"E:"
    secret.client.receive_data(data, net.now)  # and it decrypts to the same event
    net.pump()
    want = [("presence_join", "alice", {"a": [1], "status": "online"})]
    for peer in (alice, glob, secret):
        assert seen(peer) == want
    assert sorted([len(seen(w1)), len(seen(w2))]) == [0, 1]  # one queue-group member
    assert drained(net) == [("presence_join", "room", "alice", {"a": [1], "status": "online"})]
    snap = net.core.health_snapshot(0.0)
    assert snap["recovery_topic_count"] == 0  # presence events are never stored


def test_tabs_leave_and_update() -> None:
    """Ref §8: a user's later tabs produce nothing; the last leave carries the entry's
    data; update_presence replaces the data on every topic of the user."""
    net = Net(pres_config())
    watcher = net.connect(token=make_token("watcher"))
    net.core.subscribe(watcher.id, ["a", "b"])
    tab1 = net.connect()
    tab2 = net.connect()
    net.core.subscribe(tab1.id, ["a", "b"], presence_data={"v": 1})
    net.core.subscribe(tab2.id, ["a"], presence_data={"v": 2})  # later tab: silent
    net.core.update_presence(tab2.id, {"v": 3})  # the user's data on a and b
    net.core.unsubscribe(tab1.id, ["a"])  # tab2 still holds a: silent
    net.core.unsubscribe(tab2.id, ["a"])  # last connection on a
    net.core.unsubscribe(tab1.id)  # everything: b
    net.pump()
    assert seen(watcher) == [
        ("presence_join", "alice", {"v": 1}),
        ("presence_join", "alice", {"v": 1}),
        ("presence_update", "alice", {"v": 3}),
        ("presence_update", "alice", {"v": 3}),
        ("presence_leave", "alice", {"v": 3}),
        ("presence_leave", "alice", {"v": 3}),
    ]
    assert [(k, t) for k, t, _, _ in drained(net)] == [
        ("presence_join", "a"),
        ("presence_join", "b"),
        ("presence_update", "a"),
        ("presence_update", "b"),
        ("presence_leave", "a"),
        ("presence_leave", "b"),
    ]
    assert net.core.presence("a") == {} and net.core.presence_stats("b")["num_users"] == 0


def test_disconnect_leaves_and_the_others_see_it() -> None:
    net = Net(pres_config())
    watcher = net.connect(token=make_token("watcher"))
    net.core.subscribe(watcher.id, ["room"])
    bob = net.connect(token=make_token("bob"))
    net.core.subscribe(bob.id, ["room", "lobby"], presence_data={"s": "here"})
    assert net.core.presence_stats("room") == {"num_users": 1, "num_connections": 1}
    net.core.pop_inbound(100)
    bob.client.close()
    net.pump()
    assert seen(watcher)[-1] == ("presence_leave", "bob", {"s": "here"})
    events = net.core.pop_inbound(100)
    kinds = [(k, v["topic"] if k in KINDS else c) for k, c, v in events]
    assert kinds == [
        ("presence_leave", "room"),
        ("presence_leave", "lobby"),
        ("disconnect", bob.id),
    ]
    assert net.core.presence("room") == {} and net.core.presence("lobby") == {}


def test_app_disconnect_also_leaves() -> None:
    net = Net(pres_config())
    watcher = net.connect(token=make_token("watcher"))
    net.core.subscribe(watcher.id, ["room"])
    bob = net.connect(token=make_token("bob"))
    net.core.subscribe(bob.id, ["room"], presence_data={})  # {} counts as data
    net.core.disconnect(bob.id)
    net.pump()
    assert seen(watcher) == [("presence_join", "bob", {}), ("presence_leave", "bob", {})]


def test_user_id_without_jwt_is_the_connection_id() -> None:
    """F11: every connection without a JWT identity is its own user."""
    net = Net(CoreConfig(presence_enabled=True, connection=ServerConfig()))
    a = net.connect(token=None)
    b = net.connect(token=None)
    net.core.subscribe(a.id, ["t"], presence_data={"n": 1})
    net.core.subscribe(b.id, ["t"], presence_data={"n": 2})
    net.pump()
    assert seen(a) == [("presence_join", a.id, {"n": 1}), ("presence_join", b.id, {"n": 2})]
    assert net.core.presence("t") == {
        a.id: {"data": {"n": 1}, "connections": 1},
        b.id: {"data": {"n": 2}, "connections": 1},
    }
    net.core.update_presence(b.id, {"n": 3})
    assert net.core.presence("t")[b.id]["data"] == {"n": 3}


def test_update_errors_and_limits(caplog: pytest.LogCaptureFixture) -> None:
    net = Net(pres_config(presence=PresenceConfig(max_data_size=20, max_members=1)))
    watcher = net.connect(token=make_token("watcher"))
    net.core.subscribe(watcher.id, ["t"])
    a = net.connect()
    with caplog.at_level(logging.WARNING, logger="wse_proto.hub"):
        net.core.subscribe(a.id, ["t"], presence_data={"blob": "x" * 30})
    assert "data_too_large" in caplog.text
    assert net.core.presence("t") == {} and net.core.get_topic_subscriber_count("t") == 2
    net.core.subscribe(a.id, ["t"], presence_data={"ok": 1})
    b = net.connect(token=make_token("bob"))
    with caplog.at_level(logging.WARNING, logger="wse_proto.hub"):
        net.core.subscribe(b.id, ["t"], presence_data={"ok": 2})  # over max_members
    assert "max_members" in caplog.text
    assert list(net.core.presence("t")) == ["alice"]
    with pytest.raises(LocalProtocolError) as info:
        net.core.update_presence(a.id, {"blob": "x" * 30})
    assert info.value.message == UPDATE_FAILED
    with pytest.raises(LocalProtocolError):
        net.core.update_presence("ghost", {"ok": 3})
    net.core.update_presence(b.id, {"ok": 4})  # a connection with no presence topic: nothing
    net.pump()
    assert seen(watcher) == [("presence_join", "alice", {"ok": 1})]
    assert net.core.presence("t")["alice"]["data"] == {"ok": 1}  # the failed update changed nothing


def test_filtered_topics_are_not_tracked() -> None:
    """ACL-denied, control-character and truncated topics are not tracked (ref §8)."""
    net = Net(pres_config(max_subscriptions_per_connection=2))
    a = net.connect(token=make_token("alice", wse_topics={"deny": ["secret"]}))
    net.core.subscribe(a.id, ["secret", "bad\x01", "one", "two", "three"], presence_data={})
    assert [t for t in ("secret", "bad\x01", "one", "two", "three") if net.core.presence(t)] == [
        "one",
        "two",
    ]


def test_disabled_presence_is_inert() -> None:
    net = Net(jwt_config())
    a = net.connect()
    net.core.subscribe(a.id, ["t"], presence_data={"x": 1})
    net.core.update_presence(a.id, {"x": 2})
    net.core.update_presence("ghost", {"x": 2})
    assert net.core.presence("t") == {}
    assert net.core.presence_stats("t") == {"num_users": 0, "num_connections": 0}
    snap = net.core.health_snapshot(0.0)
    assert "presence_topics" not in snap and snap["presence_enabled"] is False
    assert net.core.next_housekeeping() is None


def test_health_keys_in_the_original_order() -> None:
    net = Net(pres_config())
    a = net.connect()
    b = net.connect(token=make_token("bob"))
    net.core.subscribe(a.id, ["x", "y"], presence_data={})
    net.core.subscribe(b.id, ["x"], presence_data={})
    snap = net.core.health_snapshot(0.0)
    keys = list(snap)
    assert keys[-4:] == ["recovery_total_bytes", "presence_enabled", "presence_topics",
                         "presence_total_users"]  # fmt: skip
    assert (snap["presence_topics"], snap["presence_total_users"]) == (2, 3)


def test_sweep_removes_entries_of_connections_that_are_gone() -> None:
    """The 30 s sweep is a safety net: an entry whose connection is not registered leaves
    (here planted directly in the state, since unregistering already leaves)."""
    net = Net(pres_config())
    watcher = net.connect(token=make_token("watcher"))
    net.core.subscribe(watcher.id, ["t"])
    state = net.core._presence.state  # type: ignore[union-attr]
    state.join("t", "ghost-user", "ghost-conn", {"g": 1}, 0)
    assert net.core.next_housekeeping() == SWEEP_INTERVAL
    net.core.housekeeping(SWEEP_INTERVAL - 1)
    assert "ghost-user" in net.core.presence("t")
    net.core.housekeeping(SWEEP_INTERVAL)
    net.pump()
    assert seen(watcher) == [("presence_leave", "ghost-user", {"g": 1})]
    assert net.core.presence("t") == {}
    assert net.core.next_housekeeping() == 2 * SWEEP_INTERVAL


def test_inbound_hook_fires_for_app_side_presence_events() -> None:
    """Drain waiters are woken by presence events that app calls produce."""
    net = Net(pres_config())
    a = net.connect()
    net.core.pop_inbound(100)
    calls: list[int] = []
    net.core.on_inbound = lambda: calls.append(net.core.inbound_queue_depth())
    net.core.subscribe(a.id, ["t"], presence_data={})
    net.core.update_presence(a.id, {"x": 1})
    net.core.unsubscribe(a.id, ["t"])
    assert calls == [1, 2, 3]


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("join"), st.integers(0, 4), st.sampled_from("ab"), st.integers(0, 3)),
        st.tuples(st.just("leave"), st.integers(0, 4), st.sampled_from("ab")),
        st.tuples(st.just("update"), st.integers(0, 4), st.integers(0, 3)),
        st.tuples(st.just("close"), st.integers(0, 4)),
        st.tuples(st.just("pump")),
    ),
    max_size=25,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS)
def test_wire_and_drain_tell_the_same_story(ops: list[tuple[Any, ...]]) -> None:
    """Whatever the order of joins, leaves, updates and disconnects (two users, several
    tabs), a glob watcher receives exactly the drain queue's events, in order, and
    replaying them gives presence()'s users on every topic (a later tab may replace the
    data silently, ref §8, so only updates are checked for data)."""
    net = Net(pres_config())
    watcher = net.connect(token=make_token("watcher"))
    net.core.subscribe(watcher.id, ["*"])
    users = ["alice", "bob", "alice", "bob", "alice"]
    conns: list[Peer | None] = [net.connect(token=make_token(u)) for u in users]
    net.core.pop_inbound(1000)
    log: list[tuple[str, str, str, Any]] = []
    for op in ops:
        kind = op[0]
        if kind == "pump":
            net.pump()
            log += drained(net)
            continue
        peer = conns[op[1]]
        if peer is None:
            continue
        if kind == "join":
            net.core.subscribe(peer.id, [op[2]], presence_data={"v": op[3]})
        elif kind == "leave":
            net.core.unsubscribe(peer.id, [op[2]])
        elif kind == "update":
            net.core.update_presence(peer.id, {"v": op[2]})
        else:
            peer.client.close()
            net.pump()
            conns[op[1]] = None
    net.pump()
    log += drained(net)
    assert seen(watcher) == [(k, u, d) for k, _, u, d in log]
    for topic in "ab":
        model: dict[str, Any] = {}
        for k, t, u, d in log:
            if t != topic:
                continue
            if k == "presence_leave":
                assert u in model
                del model[u]
            else:
                assert (u in model) is (k == "presence_update")
                model[u] = d
        members = net.core.presence(topic)
        assert set(members) == set(model)
        tabs = sum(m["connections"] for m in members.values())
        assert net.core.presence_stats(topic) == {"num_users": len(model), "num_connections": tabs}


def test_presence_frames_are_sorted_json_for_any_data() -> None:
    net = Net(pres_config())
    watcher = net.connect(token=make_token("wätcher"))
    net.core.subscribe(watcher.id, ["t"])
    a = net.connect(token=make_token('a"b/é'))
    data = {"z": 1.0, "a": {"y": None, "b": [True, "\u2028"]}}
    net.core.subscribe(a.id, ["t"], presence_data=data)
    (op, payload), *_ = frames(net.core.data_to_send(watcher.conn))
    assert op == TEXT
    assert payload == orjson.dumps(
        {"c": "WSE", "p": {"data": data, "user_id": 'a"b/é'}, "t": "presence_join"},
        option=orjson.OPT_SORT_KEYS,
    )

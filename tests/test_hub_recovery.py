"""Recovery through ServerCore: stamps on the wire, the outcome table, the replay seam.

Real :class:`~wse_proto.server.ServerConnection` machines behind a real upgrade with real
HS256 JWTs, read by real :class:`~wse_proto.client.ClientConnection` machines (the
``Net`` helper of test_hub.py does what a transport does). The store's own rules are
tested in test_recovery.py; here the hub must apply them to connections: stamp once and
send that object, replay in offset order before the live stream (F8), judge each topic
on its own position (F10), refuse a replay that does not fit the outbound backlog, and
answer the client's ``subscription_update`` recovery request.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hub import Net, Peer, frames, jwt_config, make_token

from wse_proto.envelope import inject_category
from wse_proto.errors import DecodeError
from wse_proto.hub import CoreConfig
from wse_proto.hub_recovery import framed_size, request_payload, split_requests
from wse_proto.recovery import RecoveryConfig, stamp
from wse_proto.ws import BINARY, TEXT

TTL = 300.0


def rec_config(**kw: Any) -> CoreConfig:
    recovery = kw.pop("recovery", RecoveryConfig())
    return jwt_config(recovery_enabled=True, recovery=recovery, **kw)


def stamps(peer: Peer, topic: str | None = None) -> list[tuple[str, str, int]]:
    """``(tp, e, o)`` of every stamped message the client received, in order."""
    return [
        (m["tp"], m["e"], m["o"])
        for m in peer.received
        if "o" in m and (topic is None or m["tp"] == topic)
    ]


def offsets(peer: Peer, topic: str) -> list[int]:
    return [o for _, _, o in stamps(peer, topic)]


def publish(net: Net, topic: str, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        net.core.broadcast_local(topic, json.dumps({"t": "tick", "p": {"n": i}}), now=net.now)


def position(net: Net, topic: str) -> tuple[str, int]:
    """The topic's (epoch, last offset), asked as a client would: a not-requested probe."""
    out = net.core.subscribe_with_recovery("nobody", [topic], now=net.now)[topic]
    assert out.epoch is not None
    return out.epoch, out.offset


def replies(peer: Peer) -> list[dict[str, Any]]:
    return [m["p"] for m in peer.received if m.get("t") == "subscription_update"]


# --------------------------------------------------------------------------- stamps


def test_publication_is_stamped_once_and_the_stored_object_is_sent() -> None:
    net = Net(rec_config())
    a = net.connect()
    net.core.subscribe(a.id, ["room"])
    texts = ['{"t":"chat","p":{"x":1}}', json.dumps({"t": "chat", "p": {"x": 2}}), "{}"]
    for text in texts:
        net.core.broadcast_local("room", text, now=0.0)
    sent = frames(net.core.data_to_send(a.conn))
    epoch, last = position(net, "room")
    assert last == 2
    expected = [stamp("room", epoch, i, inject_category(t).encode()) for i, t in enumerate(texts)]
    assert sent == [(TEXT, e) for e in expected]
    assert expected[2] == b'{"tp":"room","e":"' + epoch.encode() + b'","o":2}'
    # The recovery helper hands out the very object it stored: no second copy.
    rec = net.core._recovery
    assert rec is not None
    produced = rec.produce("room", '{"t":"again"}', 0.0)
    assert produced is rec.store._local["room"].get(3)


def test_non_objects_are_delivered_unstamped_and_take_no_offset() -> None:
    """F7: non-objects, including text that only looks like one, keep offsets contiguous."""
    net = Net(rec_config())
    a = net.connect()
    net.core.subscribe(a.id, ["t"])
    inputs = ['{"t":"a"}', "not json", "[1,2]", '{"t":"x"', '  \n{"t":"b"}', '"s"', "{}"]
    for text in inputs:
        net.core.broadcast_local("t", text, now=0.0)
    sent = [payload for _, payload in frames(net.core.data_to_send(a.conn))]
    assert sent[1:4] == [b"not json", b"[1,2]", b'{"t":"x"']
    assert sent[5] == b'"s"'
    stamped = [orjson.loads(sent[i]) for i in (0, 4, 6)]
    assert [m["o"] for m in stamped] == [0, 1, 2]
    assert stamped[1]["t"] == "b" and sent[4].startswith(b'{"tp":"t"')  # whitespace dropped
    assert list(net.core._recovery.store.held("t")) == [0, 1, 2]  # type: ignore[union-attr]


def test_stamps_reach_glob_queue_group_encrypted_and_msgpack_subscribers() -> None:
    net = Net(rec_config())
    plain = net.connect()
    glob = net.connect()
    worker = net.connect()
    secret = net.connect(encryption=True)
    packed = net.connect(msgpack=True)
    net.core.subscribe(plain.id, ["news.eu"])
    net.core.subscribe(glob.id, ["news.*"])
    net.core.subscribe(worker.id, ["news.eu"], queue_group="g")
    net.core.subscribe(secret.id, ["news.eu"])
    net.core.subscribe(packed.id, ["news.eu"])
    publish(net, "news.eu", 3)
    net.pump()
    want = [("news.eu", position(net, "news.eu")[0], o) for o in range(3)]
    for peer in (plain, glob, worker, secret, packed):
        assert stamps(peer) == want
    assert [m["p"]["n"] for m in secret.received if m.get("t") == "tick"] == [0, 1, 2]


def test_recovery_off_means_no_stamp_and_nothing_recoverable() -> None:
    net = Net(jwt_config())
    a = net.connect()
    net.core.subscribe(a.id, ["t"])
    net.core.broadcast_local("t", '{"t":"x"}')
    assert frames(net.core.data_to_send(a.conn)) == [(TEXT, b'{"c":"U","t":"x"}')]
    out = net.core.subscribe_with_recovery(a.id, ["t"], {"t": ("00000000", 0)}, now=0.0)
    assert (out["t"].recovered, out["t"].recoverable, out["t"].epoch) == (False, False, None)
    with pytest.raises(DecodeError, match="Invalid epoch hex string: 'zz'"):
        net.core.subscribe_with_recovery(a.id, ["u"], {"u": ("zz", 0)}, now=0.0)
    assert net.core.get_topic_subscriber_count("u") == 1  # subscribed before the error


# --------------------------------------------------------------------------- outcome table


def test_outcome_table_through_the_hub() -> None:
    """Every row of PROTOCOL §13.4, each topic judged on its own position (F10)."""
    cfg = rec_config(recovery=RecoveryConfig(buffer_size=16, max_messages=5))
    net = Net(cfg)
    published = {"up": 4, "some": 8, "many": 12, "evicted": 40, "other": 2, "ahead": 2}
    for topic, n in published.items():
        publish(net, topic, n)
    epochs = {t: position(net, t)[0] for t in published}
    wrong = f"{int(epochs['other'], 16) ^ 1:08x}"
    b = net.connect()
    asked = {
        "up": (epochs["up"], 3),  # up to date
        "some": (epochs["some"], 4),  # 3 missed: replayed
        "many": (epochs["many"], 2),  # 9 missed > max_messages 5
        "evicted": (epochs["evicted"], 5),  # ring of 16 holds 24..39 only
        "other": (wrong, 0),  # epoch differs
        "never": (epochs["up"], 0),  # no buffer
        "ahead": (epochs["ahead"], 2**64 - 1),  # beyond head: up to date
    }
    topics = [*asked, "plain"]
    out = net.core.subscribe_with_recovery(b.id, topics, asked, now=0.0)
    got = {t: (o.recovered, o.count, o.recoverable, o.epoch, o.offset) for t, o in out.items()}
    assert got == {
        "up": (True, 0, True, epochs["up"], 3),
        "some": (True, 3, True, epochs["some"], 7),
        "many": (False, 0, True, epochs["many"], 11),
        "evicted": (False, 0, True, epochs["evicted"], 39),
        "other": (False, 0, True, epochs["other"], 1),
        "never": (False, 0, False, None, 0),
        "ahead": (True, 0, True, epochs["ahead"], 1),
        "plain": (False, 0, False, None, 0),
    }
    net.pump()
    assert stamps(b) == [("some", epochs["some"], o) for o in (5, 6, 7)]
    # Every topic was subscribed for live delivery.
    assert all(net.core.get_topic_subscriber_count(t) == 1 for t in topics)


def test_acl_denied_topics_reveal_nothing_and_replay_nothing() -> None:
    net = Net(rec_config())
    publish(net, "secret", 3)
    publish(net, "open", 3)
    epoch_s, _ = position(net, "secret")
    epoch_o, _ = position(net, "open")
    b = net.connect(token=make_token("bob", wse_topics={"deny": ["secret"]}))
    out = net.core.subscribe_with_recovery(
        b.id, ["secret", "open"], {"secret": (epoch_s, 0), "open": (epoch_o, 0)}, now=0.0
    )
    s, o = out["secret"], out["open"]
    assert (s.recovered, s.recoverable, s.epoch, s.offset, s.count) == (False, False, None, 0, 0)
    assert (o.recovered, o.count) == (True, 2)
    net.pump()
    assert [t for t, _, _ in stamps(b)] == ["open", "open"]
    # A topic dropped for control characters is not recoverable either.
    out = net.core.subscribe_with_recovery(b.id, ["bad\x00"], {"bad\x00": (epoch_o, 0)}, now=0.0)
    assert out["bad\x00"].recoverable is False


def test_invalid_positions_raise_after_the_subscription_and_change_nothing() -> None:
    net = Net(rec_config())
    publish(net, "t", 3)
    epoch, _ = position(net, "t")
    b = net.connect()
    before = net.core.health_snapshot(0.0)
    for bad in (("not hex", 0), ("0x1f", 0), ("123456789", 0), (epoch, -1), (epoch, 2**64)):
        with pytest.raises(DecodeError):
            net.core.subscribe_with_recovery(b.id, ["t", "u"], {"t": bad}, now=0.0)
    assert net.core.get_topic_subscriber_count("t") == 1
    assert net.core.get_topic_subscriber_count("u") == 1
    assert b.conn.pending_bytes == 0  # nothing replayed
    after = net.core.health_snapshot(0.0)
    assert after["recovery_total_bytes"] == before["recovery_total_bytes"]
    # Upper-case hex and a leading '+' are epochs like the original's from_str_radix.
    out = net.core.subscribe_with_recovery(b.id, ["t"], {"t": ("+" + epoch.upper(), 0)}, now=0.0)
    assert (out["t"].recovered, out["t"].count) == (True, 2)


def test_connection_gone_gets_positions_only() -> None:
    net = Net(rec_config())
    publish(net, "t", 3)
    epoch, _ = position(net, "t")
    out = net.core.subscribe_with_recovery("ghost", ["t", "u"], {"t": (epoch, 0)}, now=0.0)
    assert (out["t"].recovered, out["t"].recoverable, out["t"].epoch, out["t"].offset) == (
        False,
        True,
        epoch,
        2,
    )
    assert out["u"].recoverable is False


def test_subscription_limit_raises_before_anything() -> None:
    net = Net(rec_config(max_subscriptions_per_connection=1))
    publish(net, "t", 2)
    b = net.connect()
    net.core.subscribe(b.id, ["x"])
    with pytest.raises(RuntimeError, match="reached max subscriptions"):
        net.core.subscribe_with_recovery(b.id, ["t"], {"t": (position(net, "t")[0], 0)}, now=0.0)
    assert b.conn.pending_bytes == 0


# --------------------------------------------------------------------------- backlog budget


@pytest.mark.parametrize("encryption", [False, True])
def test_replay_is_all_or_nothing_against_the_outbound_backlog(encryption: bool) -> None:
    """A replay that would take the connection over max_outbound_queue_bytes is refused
    (recovered:false, nothing queued); one that just fits is sent whole."""
    probe = Net(rec_config())
    publish(probe, "t", 6)
    rec = probe.core._recovery
    assert rec is not None
    replay = sum(
        framed_size(len(rec.store._local["t"].get(o) or b""), encryption) for o in range(1, 6)
    )
    for limit, fits in ((1000 + replay, True), (1000 + replay - 1, False)):
        net = Net(rec_config(max_outbound_queue_bytes=limit))
        publish(net, "t", 6)
        epoch, _ = position(net, "t")
        b = net.connect(encryption=encryption)
        net.core.send(b.id, "x" * 996)  # 1000 bytes queued (a 4-byte header + 996)
        assert b.conn.pending_bytes == 1000
        out = net.core.subscribe_with_recovery(b.id, ["t"], {"t": (epoch, 0)}, now=0.0)
        o = out["t"]
        assert (o.recovered, o.count, o.recoverable, o.epoch, o.offset) == (
            fits,
            5 if fits else 0,
            True,
            epoch,
            5,
        )
        assert b.conn.pending_bytes - 1000 == (replay if fits else 0)
        net.pump()
        assert offsets(b, "t") == ([1, 2, 3, 4, 5] if fits else [])


def test_slow_consumer_after_a_full_replay_is_an_ordinary_gap() -> None:
    """A replay that fills the backlog exactly makes the next live message a slow-consumer
    drop, counted; the client sees an ordinary gap (PROTOCOL §13.5)."""
    probe = Net(rec_config())
    publish(probe, "t", 4)
    rec = probe.core._recovery
    assert rec is not None
    replay = sum(framed_size(len(rec.store._local["t"].get(o) or b""), False) for o in (1, 2, 3))
    net = Net(rec_config(max_outbound_queue_bytes=replay))
    publish(net, "t", 4)
    epoch, _ = position(net, "t")
    b = net.connect()
    out = net.core.subscribe_with_recovery(b.id, ["t"], {"t": (epoch, 0)}, now=0.0)
    assert out["t"].recovered and b.conn.pending_bytes == replay
    publish(net, "t", 1, start=4)
    assert net.core.metrics.slow_consumer_drops == 1
    net.pump()
    publish(net, "t", 1, start=5)
    net.pump()
    assert offsets(b, "t") == [1, 2, 3, 5]


# --------------------------------------------------------------------------- the seam (F8)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("pub"), st.integers(1, 6)),
            st.tuples(st.just("join"), st.integers(0, 40), st.booleans(), st.booleans()),
            st.tuples(st.just("pump")),
            st.tuples(st.just("drop"), st.integers(0, 5)),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_replay_then_live_each_offset_once_in_order(ops: list[tuple[Any, ...]]) -> None:
    """Clients recover from arbitrary earlier offsets (by API or by the wire request, plain
    or encrypted) while publications continue and output is flushed at random points:
    each receives offset+1 .. the last publication, each once, in order (F8)."""
    net = Net(rec_config(recovery=RecoveryConfig(buffer_size=64, max_messages=64)))
    published = 0
    joined: list[tuple[Peer, int]] = []  # (peer, first offset it must receive)
    pub_topic = "feed"
    for op in ops:
        if op[0] == "pub":
            publish(net, pub_topic, op[1], start=published)
            published += op[1]
        elif op[0] == "pump":
            net.pump()
        elif op[0] == "drop" and joined:
            peer, _ = joined[op[1] % len(joined)]
            net.core.unsubscribe(peer.id, [pub_topic])
            joined = [(p, f) for p, f in joined if p is not peer]
        elif op[0] == "join":
            _, back, wire, encrypted = op
            peer = net.connect(encryption=encrypted)
            if published == 0:
                net.core.subscribe(peer.id, [pub_topic])
                joined.append((peer, 0))
                continue
            epoch, last = position(net, pub_topic)
            had = max(0, last - back)
            if wire:
                peer.client.subscribe([pub_topic], {pub_topic: (epoch, had)})
                net.pump()  # the request reaches the hub (and the replay goes out)
            else:
                net.core.subscribe_with_recovery(
                    peer.id, [pub_topic], {pub_topic: (epoch, had)}, now=net.now
                )
            joined.append((peer, had + 1))
    net.pump()
    for peer, first in joined:
        assert offsets(peer, pub_topic) == list(range(first, published))
        assert all(p.get("recovered") is True for p in replies(peer))


def test_gap_fill_request_on_a_subscribed_topic_replays_in_order() -> None:
    """wse-client re-asks for an already subscribed topic after a gap: the replay follows
    what was queued, then live messages continue, nothing twice."""
    net = Net(rec_config())
    a = net.connect()
    net.core.subscribe(a.id, ["t"])
    publish(net, "t", 3)
    net.pump()
    epoch, _ = position(net, "t")
    a.client.subscribe(["t"], {"t": (epoch, 0)})  # claims to have only offset 0
    net.pump()  # the request reaches the hub
    publish(net, "t", 2, start=3)
    net.pump()
    assert offsets(a, "t") == [0, 1, 2, 1, 2, 3, 4]  # the requested replay (1, 2) sits in line
    assert replies(a)[-1]["recovery"]["t"] == {
        "epoch": epoch,
        "offset": 2,
        "recovered": True,
        "count": 2,
    }


# --------------------------------------------------------------------------- the wire request


def test_wire_request_is_answered_by_the_hub_and_not_queued_for_the_app() -> None:
    net = Net(rec_config())
    publish(net, "room", 5)
    publish(net, "news", 2)
    e_room, _ = position(net, "room")
    e_news, _ = position(net, "news")
    b = net.connect()
    net.core.pop_inbound(100)
    b.client.subscribe(
        ["room", "news", "fresh"], {"room": (e_room, 1), "news": (e_news.upper(), 0)}
    )
    b.client.send_message("chat", {"text": "after"})
    raw_before = len(b.received)
    net.pump()
    got = b.received[raw_before:]
    assert [m.get("t") for m in got] == ["tick", "tick", "tick", "tick", "subscription_update"]
    assert stamps(b) == [("room", e_room, o) for o in (2, 3, 4)] + [("news", e_news, 1)]
    reply = got[-1]
    assert reply["p"] == {
        "action": "subscribe",
        "success": True,
        "success_topics": ["room", "news", "fresh"],
        "failed_topics": [],
        "recoverable": True,
        "recovered": False,  # "fresh" has no buffer
        "recovery": {
            "room": {"epoch": e_room, "offset": 4, "recovered": True, "count": 3},
            "news": {"epoch": e_news, "offset": 1, "recovered": True, "count": 1},
            "fresh": {"epoch": None, "offset": 0, "recovered": False, "count": 0},
        },
    }
    assert {"c", "t", "p", "id", "ts", "seq", "v"} <= set(reply)
    # The request never reaches the application; the other message does, in order.
    events = net.core.pop_inbound(100)
    assert [(k, v["t"]) for k, _, v in events] == [("msg", "chat")]
    # live messages follow on every topic
    publish(net, "fresh", 1)
    net.pump()
    assert stamps(b, "fresh")[0][2] == 0


def test_wire_reply_frames_are_binary_json_or_e_frames() -> None:
    for encryption in (False, True):
        net = Net(rec_config())
        publish(net, "t", 2)
        epoch, _ = position(net, "t")
        b = net.connect(encryption=encryption)
        assert b.client.encrypted is encryption
        b.client.subscribe(["t"], {"t": (epoch, 0)})
        net.core.feed(b.conn, b.client.data_to_send(), net.now)
        out = frames(net.core.data_to_send(b.conn))
        assert [op for op, _ in out] == ([BINARY] * 2 if encryption else [TEXT, BINARY])
        assert all(p.startswith(b"E:") for _, p in out) is encryption
        if not encryption:
            reply = orjson.loads(out[1][1])
            assert reply["t"] == "subscription_update" and reply["p"]["recovered"] is True


def test_bad_requests_get_clear_answers_and_corrupt_nothing() -> None:
    net = Net(rec_config())
    publish(net, "t", 3)
    epoch, _ = position(net, "t")
    b = net.connect()
    net.core.pop_inbound(100)
    bad_payloads: list[dict[str, Any]] = [
        {"action": "subscribe", "recover": True, "topics": "t"},
        {"action": "subscribe", "recover": True, "topics": ["t"], "recovery": ["t"]},
    ]
    for p in bad_payloads:
        b.client.send_message("subscription_update", p)
    request = {
        "c": "WSE",
        "t": "subscription_update",
        "p": {
            "action": "subscribe",
            "topics": ["t", "u", "v"],
            "recover": True,
            "recovery": {
                "t": {"epoch": "xyz", "offset": 1},
                "u": {"epoch": epoch, "offset": -1},
                "v": {"epoch": epoch, "offset": 2**70},
                "w": {"epoch": epoch, "offset": 0},
            },
        },
    }
    b.client.send_text(json.dumps(request))  # offsets beyond 64 bits: not orjson
    net.pump()
    answers = replies(b)
    assert [a["success"] for a in answers] == [False, False, True]
    assert "topics" in answers[0]["error"] and "recovery" in answers[1]["error"]
    last = answers[2]
    assert set(last["invalid"]) == {"t", "u", "v", "w"}
    assert "Invalid epoch hex string: 'xyz'" in last["invalid"]["t"]
    # bad positions are judged "not requested": the current position, no replay
    assert last["recovery"]["t"] == {"epoch": epoch, "offset": 2, "recovered": False, "count": 0}
    assert stamps(b) == []
    assert net.core.pop_inbound(100) == []
    assert b.closed is None  # the connection stays open
    publish(net, "t", 1, start=3)
    net.pump()
    assert offsets(b, "t") == [3]


def test_plain_subscription_updates_stay_application_messages() -> None:
    net = Net(rec_config())
    b = net.connect()
    net.core.pop_inbound(100)
    b.client.subscribe(["t"])
    b.client.unsubscribe(["t"])
    b.client.send_message("subscription_update", {"action": "subscribe", "recover": 1})
    net.pump()
    got = [v["p"] for _, _, v in net.core.pop_inbound(100)]
    assert got == [
        {"action": "subscribe", "topics": ["t"]},
        {"action": "unsubscribe", "topics": ["t"]},
        {"action": "subscribe", "recover": 1},
    ]
    assert net.core.get_topic_subscriber_count("t") == 0 and replies(b) == []


def test_wire_handling_off_hands_recovery_requests_to_the_app() -> None:
    net = Net(rec_config(recovery_wire_handling=False))
    publish(net, "t", 2)
    b = net.connect()
    net.core.pop_inbound(100)
    b.client.subscribe(["t"], {"t": (position(net, "t")[0], 0)})
    net.pump()
    (kind, cid, value), *_ = net.core.pop_inbound(100)
    assert (kind, cid, value["t"], value["p"]["recover"]) == (
        "msg",
        b.id,
        "subscription_update",
        True,
    )
    assert net.core.get_topic_subscriber_count("t") == 0 and stamps(b) == []


def test_request_detection_on_compact_and_parsed_forms() -> None:
    p = {"action": "subscribe", "topics": ["a"], "recover": True}
    as_bytes = orjson.dumps({"c": "WSE", "t": "subscription_update", "p": p})
    long_keys = orjson.dumps({"type": "subscription_update", "payload": p})
    assert request_payload(as_bytes) == p
    assert request_payload(long_keys) == p
    assert request_payload(("msg", "c", {"t": "subscription_update", "p": p})) == p
    for other in (
        orjson.dumps({"t": "subscription_update", "p": {**p, "recover": "yes"}}),
        orjson.dumps({"t": "subscription_update", "p": {**p, "action": "unsubscribe"}}),
        orjson.dumps({"t": "chat", "p": {"text": "subscription_update"}}),
        ("raw", "c", "subscription_update"),
        ("bin", "c", b"subscription_update"),
    ):
        assert request_payload(other) is None  # type: ignore[arg-type]
    items: list[Any] = [b'{"t":"a"}', as_bytes, ("raw", "c", "x"), long_keys]
    assert split_requests(items) == ([b'{"t":"a"}', ("raw", "c", "x")], [p, p])
    assert split_requests([b'{"t":"a"}', ("raw", "c", "x")]) is None
    assert split_requests([b'{"t":"chat","p":"subscription_update"}']) is None


def test_wse_client_sequencer_sees_no_duplicate_and_no_gap() -> None:
    """The published client's own dedup/gap logic, fed with what the hub sent to a
    recovering subscriber while publications continued."""
    from wse_client.event_sequencer import EventSequencer

    net = Net(rec_config())
    a = net.connect()
    net.core.subscribe(a.id, ["t"])
    publish(net, "t", 10)
    net.pump()
    seq = EventSequencer()
    verdicts = [seq.check_topic_stamp(tp, e, o) for tp, e, o in stamps(a)]
    epoch, last = seq.topic_position("t") or ("", -1)
    net.core.disconnect(a.id)
    net.pump()
    publish(net, "t", 7, start=10)  # missed while away
    b = net.connect()
    b.client.subscribe(["t"], {"t": (epoch, last)})
    for i in range(3):
        net.pump()
        publish(net, "t", 2, start=17 + 2 * i)
    net.pump()
    verdicts += [seq.check_topic_stamp(tp, e, o) for tp, e, o in stamps(b)]
    assert set(verdicts) == {"deliver"} and len(verdicts) == 23
    assert seq.topic_position("t") == (epoch, 22)


# --------------------------------------------------------------------------- memory


def test_ttl_expiry_and_health_keys() -> None:
    net = Net(rec_config(recovery=RecoveryConfig(ttl=10.0)))
    publish(net, "a", 2)
    net.now = 5.0
    publish(net, "b", 1)
    snap = net.core.health_snapshot(5.0)
    rec = net.core._recovery
    assert rec is not None
    stored = sum(len(rec.store._local[t].get(o) or b"") for t, o in (("a", 0), ("a", 1), ("b", 0)))
    assert (snap["recovery_enabled"], snap["recovery_topic_count"]) == (True, 2)
    assert snap["recovery_total_bytes"] == stored
    assert net.core.next_housekeeping() == 10.0
    net.core.housekeeping(10.0)
    assert net.core.health_snapshot(10.0)["recovery_topic_count"] == 1
    b = net.connect()
    out = net.core.subscribe_with_recovery(b.id, ["a"], {"a": ("00000000", 0)}, now=10.0)
    assert out["a"].recoverable is False  # gone with its buffer
    # an idle buffer is dead at once for a request, even before the sweep
    out = net.core.subscribe_with_recovery(b.id, ["b"], {"b": ("00000000", 0)}, now=15.0)
    assert out["b"].recoverable is False


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 400), min_size=1, max_size=40), budget=st.integers(0, 3000))
def test_budget_holds_after_every_publication(sizes: list[int], budget: int) -> None:
    net = Net(rec_config(recovery=RecoveryConfig(memory_budget=budget)))
    a = net.connect()
    net.core.subscribe(a.id, ["t0", "t1", "t2"])
    for i, size in enumerate(sizes):
        net.core.broadcast_local(f"t{i % 3}", json.dumps({"t": "x", "p": "y" * size}), now=i)
        assert net.core.health_snapshot(float(i))["recovery_total_bytes"] <= budget
    net.pump()
    assert len(stamps(a)) == len(sizes)  # every publication is delivered, kept or not


def test_server_ready_and_hello_announce_recovery() -> None:
    for on in (False, True):
        net = Net(jwt_config(recovery_enabled=on))
        a = net.connect()
        ready = [e for e in a.client.events_received()]  # already consumed by pump
        assert not ready
        assert a.client.server_features.get("recovery") is on

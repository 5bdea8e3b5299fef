"""Interop with the published client (wse-client 2.5.1): what we encode, its MessageCodec
decodes to the same events; what its codec encodes, our server-side decoder accepts."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wse_client.compression import CompressionHandler
from wse_client.msgpack_handler import MsgPackHandler
from wse_client.protocol import MessageCodec
from wse_client.types import WSEEvent

from wse_proto import codec, envelope

pytestmark = pytest.mark.interop

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=15,
)
EXTRA = {
    "pri": st.integers(1, 10),
    "cid": st.text(max_size=8),
    "tp": st.text(max_size=8),
    "e": st.text(alphabet="0123456789abcdef", min_size=8, max_size=8),
    "o": st.integers(0, 2**40),
}
events = st.builds(
    lambda t, p, extra: {"t": t, "p": p, **extra},
    st.text(min_size=1, max_size=16),
    st.dictionaries(st.text(max_size=6), json_values, min_size=1, max_size=5),
    st.fixed_dictionaries({}, optional=EXTRA),
)


def their_codec() -> MessageCodec:
    return MessageCodec(CompressionHandler(), msgpack=MsgPackHandler())


def as_wse_event(ev: dict[str, Any]) -> WSEEvent:
    """Our decoded event in the shape wse-client builds (its WSEEvent field rules)."""
    topic = ev.get("tp") or ev.get("topic")
    epoch = ev.get("e") or ev.get("epoch")
    offset = ev.get("o") if ev.get("o") is not None else ev.get("offset")
    return WSEEvent(
        type=ev["t"],
        payload=ev["p"],
        id=ev.get("id"),
        sequence=ev.get("seq"),
        timestamp=ev.get("ts"),
        version=ev.get("v", 1),
        category=ev.get("c"),
        priority=ev.get("pri"),
        correlation_id=ev.get("cid"),
        signature=ev.get("sig"),
        topic=topic if isinstance(topic, str) else None,
        epoch=str(epoch) if epoch is not None else None,
        offset=offset if isinstance(offset, int) else None,
    )


@SETTINGS
@given(events, st.sampled_from(["json", "zlib", "msgpack"]), st.integers(0, 2**40))
def test_send_event_frames_decode_in_wse_client(event: dict[str, Any], form: str, seq: int) -> None:
    env = envelope.build_event(event, wall_ms=1795373022884, rand=lambda n: bytes(n), seq=seq)
    frame, binary = codec.encode_event(
        env, msgpack=form == "msgpack", compression_threshold=1 if form == "zlib" else 1024
    )
    assert binary
    theirs = their_codec().decode(frame)
    ours = codec.decode_server_message(frame)
    assert isinstance(theirs, WSEEvent)
    assert [theirs] == [as_wse_event(e) for e in ours]
    assert theirs.category == envelope.message_category(event["t"])


def control_frames() -> list[bytes]:
    return [
        envelope.server_ready(conn_id="c-1", user_id="alice", recovery=True, wall_ms=1, rand=bytes),
        envelope.server_hello(
            conn_id="c-1",
            encryption_public_key="QUJD",
            cluster=False,
            recovery=True,
            protocol_version=1,
            max_message_size=1_048_576,
            rate_limit_capacity=100_000.0,
            rate_limit_refill=10_000.0,
            ping_interval_s=25,
            wall_ms=2,
        ),
        envelope.server_ping(3),
        envelope.pong(1, 5),
        envelope.rate_limited(),
        envelope.rate_limit_warning(10, 5, 0),
        envelope.key_exchange_failed("Invalid base64: Invalid symbol 33, offset 0."),
        envelope.auth_error("AUTH_REQUIRED", envelope.AUTH_REQUIRED_MESSAGE, 4),
        envelope.presence_event("presence_join", "bob", {"status": "online"}),
        envelope.inject_category('{"t": "order_snapshot", "p": {"rows": []}}').encode(),
    ]


@pytest.mark.parametrize("frame", control_frames(), ids=lambda f: f[:40].decode())
def test_text_frames_decode_in_wse_client(frame: bytes) -> None:
    text = frame.decode()
    theirs = their_codec().decode(text)
    assert isinstance(theirs, WSEEvent)
    assert [theirs] == [as_wse_event(e) for e in codec.decode_server_message(text)]
    assert theirs.category in ("WSE", "S")


def test_wse_client_reads_what_it_needs_from_our_handshake_frames() -> None:
    ready = their_codec().decode(control_frames()[0].decode())
    assert isinstance(ready, WSEEvent) and ready.type == "server_ready"
    assert ready.payload["details"]["connection_id"] == "c-1"
    assert ready.payload["details"]["features"]["recovery"] is True
    hello = their_codec().decode(control_frames()[1].decode())
    assert isinstance(hello, WSEEvent)
    assert hello.payload["features"]["encryption"] is True
    assert hello.payload["encryption_public_key"] == "QUJD"
    assert hello.payload["limits"]["max_message_size"] == 1_048_576
    assert hello.payload["ping_interval"] == 25000


def test_batches_decode_alike() -> None:
    batch = json.dumps(
        {
            "c": "WSE",
            "t": "batch",
            "p": {
                "messages": [
                    {"t": "a", "p": {"x": 1}, "id": "1", "seq": 1, "v": 1, "ts": "t"},
                    {"t": "b", "p": [2]},
                    3,
                    {"t": "batch", "p": {"messages": [{"t": "c"}]}},
                ],
                "count": 4,
            },
        }
    )
    for frame in (batch, "S" + batch, batch.encode()):
        theirs = their_codec().decode(frame)
        assert theirs == [as_wse_event(e) for e in codec.decode_server_message(frame)]


@SETTINGS
@given(
    st.text(min_size=1, max_size=16),
    st.dictionaries(st.text(max_size=6), json_values, max_size=5),
    st.none() | st.integers(1, 10),
    st.none() | st.text(max_size=8),
)
def test_wse_client_frames_decode_on_our_server(
    t: str, p: dict[str, Any], priority: int | None, cid: str | None
) -> None:
    text = their_codec().encode(t, p, priority=priority, correlation_id=cid)
    inbound = codec.decode_client_text(text)
    sent = json.loads(text)
    assert inbound == codec.Inbound("msg", sent, t)
    assert inbound.value["p"] == p and inbound.value["c"] in ("WSE", "S", "U")


def test_wse_client_control_messages_are_intercepted() -> None:
    ping = their_codec().encode("ping", {"timestamp": 1795373021379})
    assert codec.decode_client_text(ping).raw_type == "ping"
    hello = their_codec().encode(
        "client_hello", {"protocol_version": 1, "features": {"encryption": False}}
    )
    inbound = codec.decode_client_text(hello)
    assert inbound.raw_type == "client_hello" and inbound.value["c"] == "WSE"
    pong = their_codec().encode(
        "PONG", {"server_timestamp": "2026-11-22T18:43:47.278Z", "client_timestamp": 1}
    )
    assert codec.decode_client_text(pong).raw_type == "PONG"
    assert envelope.ping_client_timestamp(codec.decode_client_text(ping).value) == 1795373021379

"""PeerLink (spec/CLUSTER.md §8): HELLO exchange and decision, setup order, heartbeat,
interest, SHUTDOWN/DRAIN, malformed input, queues; unit tests, the recorded traffic of two
original nodes, and hypothesis properties (splitting, garbage, every state/input pair)."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wse_proto.cluster import frames as cf
from wse_proto.cluster.link import (
    LINK_TRANSITIONS,
    AddressAnnounced,
    CloseReason,
    FrameRejected,
    LinkClosed,
    LinkConfig,
    LinkEvent,
    LinkInput,
    LinkRole,
    LinkState,
    MsgReceived,
    PeerDraining,
    PeerHello,
    PeerInterest,
    PeerLink,
    PeerListReceived,
    PresenceFullReceived,
    PresenceReceived,
    ResyncDue,
)
from wse_proto.errors import ClusterFrameError, LocalProtocolError

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

A_ID = "01a20492-c71a-73d3-97ab-a5d91ed28f29"  # the recorded node A (lower id)
B_ID = "01a20492-c8e8-7b30-865d-cfbedfadc71e"  # the recorded node B

DATA: dict[str, Any] = json.loads(
    (pathlib.Path(__file__).resolve().parent / "data" / "cluster.json").read_text("utf-8")
)


def decode_all(data: bytes) -> list[cf.Frame]:
    reader = cf.FrameReader()
    reader.receive_data(data)
    out: list[cf.Frame] = []
    while batch := reader.frames():
        out.extend(batch)
    return out


def hello(instance: str = B_ID, caps: int = cf.OUR_CAPABILITIES, version: int = 1) -> bytes:
    return cf.encode(cf.Hello(version, instance, caps))


def open_link(
    role: LinkRole = LinkRole.ACCEPTOR,
    *,
    caps: int = cf.OUR_CAPABILITIES,
    config: LinkConfig | None = None,
    now: float = 0.0,
) -> PeerLink:
    """A link that has read the peer's HELLO and was accepted (output drained)."""
    link = PeerLink(role, A_ID, now, address="10.0.0.2:7000", config=config)
    link.receive_data(hello(caps=caps), now)
    assert link.events_received() == [PeerHello(B_ID, 1, caps)]
    link.accept(now)
    link.data_to_send()
    return link


def of_type(events: list[LinkEvent], cls: type) -> list[Any]:
    return [e for e in events if isinstance(e, cls)]


# --------------------------------------------------------------------------- HELLO exchange


def test_dialer_speaks_first_with_the_recorded_hello_bytes() -> None:
    link = PeerLink(LinkRole.DIALER, A_ID, 0.0, address="127.0.0.1:18312")
    recorded = DATA["frames"]["proxy to B #1 to B [HELLO from A]"][0]
    assert link.data_to_send() == bytes.fromhex(recorded["raw_hex"])
    assert link.state is LinkState.AWAIT_HELLO


def test_acceptor_reads_hello_first_and_decides_before_answering() -> None:
    link = PeerLink(LinkRole.ACCEPTOR, A_ID, 0.0)
    assert link.data_to_send() == b""
    # HELLO and the setup burst behind it arrive in one read.
    link.receive_data(hello(caps=0x07) + cf.encode(cf.Resync(("room",))), 0.5)
    assert link.events_received() == [PeerHello(B_ID, 1, 0x07)]
    assert link.state is LinkState.DECIDING
    assert link.data_to_send() == b""  # nothing said before the decision
    assert not link.interest.known  # the RESYNC behind the HELLO waits too
    assert link.capabilities == cf.OUR_CAPABILITIES & 0x07
    link.accept(0.5, interest=["a", "b*"], announce="10.0.0.1:7000", peers=["10.0.0.3:7000"])
    out = decode_all(link.data_to_send())
    assert out == [
        cf.Hello(1, A_ID, cf.OUR_CAPABILITIES),
        cf.Resync(("a", "b*")),
        cf.PeerAnnounce("10.0.0.1:7000"),
        cf.PeerList(("10.0.0.3:7000",)),
    ]
    assert link.interest.known and link.interest.topics() == {"room"}


def test_refusing_acceptor_never_answers() -> None:
    link = PeerLink(LinkRole.ACCEPTOR, A_ID, 0.0)
    link.receive_data(hello(), 0.0)
    link.events_received()
    link.refuse()
    assert link.data_to_send() == b""
    assert link.wants_close
    assert link.events_received() == [LinkClosed(CloseReason.REFUSED)]


def test_setup_order_and_capability_gating_of_presence() -> None:
    chunks = cf.presence_full_frames({"room": {"u": ({"s": 1}, 5)}})
    for caps, expect_presence in ((cf.OUR_CAPABILITIES, True), (0x03, False)):
        link = PeerLink(LinkRole.DIALER, A_ID, 0.0)
        link.data_to_send()
        link.receive_data(hello(caps=caps), 0.0)
        link.events_received()
        link.accept(0.0, interest=["t"], announce="1.2.3.4:5", peers=["5.6.7.8:9"], presence=chunks)
        types = [type(f) for f in decode_all(link.data_to_send())]
        tail = [cf.PresenceFull] if expect_presence else []
        assert types == [cf.Resync, cf.PeerAnnounce, cf.PeerList, *tail]


def test_setup_sends_only_what_applies() -> None:
    link = PeerLink(LinkRole.DIALER, A_ID, 0.0)
    link.data_to_send()
    link.receive_data(hello(), 0.0)
    link.events_received()
    link.accept(0.0, interest=[], announce=None, peers=[], presence=None)
    assert link.data_to_send() == b""  # empty interest: no RESYNC (CLUSTER §8.3)


def test_large_interest_set_is_split_over_resync_frames() -> None:
    topics = [f"topic-{i:06d}-" + "x" * 200 for i in range(6000)]  # ~1.3 MB of topics
    link = PeerLink(LinkRole.DIALER, A_ID, 0.0)
    link.data_to_send()
    link.receive_data(hello(), 0.0)
    link.events_received()
    link.accept(0.0, interest=topics)
    resyncs = decode_all(link.data_to_send())
    assert len(resyncs) == 2
    assert [r.continuation for r in resyncs] == [False, True]  # type: ignore[union-attr]
    # The receiving side rebuilds the whole set.
    peer = open_link()
    peer.receive_data(b"".join(cf.encode(r) for r in resyncs), 1.0)
    assert peer.interest.topics() == set(topics)


@pytest.mark.parametrize(
    ("first", "reason"),
    [
        (cf.encode(cf.Ping()), CloseReason.BAD_HELLO),
        (hello(version=0), CloseReason.BAD_HELLO),
        (cf.encode(cf.Unknown(0x42, 0, b"", b"")), CloseReason.BAD_HELLO),
        (b"\x00\x00\x00\x00", CloseReason.MALFORMED),
        (b"\x00\x00\x00\x0c\x04\x00\x00\x00\x04\x00\x00\x00WSE\x01", CloseReason.MALFORMED),
    ],
)
@pytest.mark.parametrize("role", list(LinkRole))
def test_bad_first_frame_fails_the_setup(first: bytes, reason: CloseReason, role: LinkRole) -> None:
    link = PeerLink(role, A_ID, 0.0)
    link.data_to_send()
    link.receive_data(first, 0.1)
    events = link.events_received()
    assert [type(e) for e in events] == [FrameRejected, LinkClosed]
    assert isinstance(events[0].error, ClusterFrameError)  # type: ignore[attr-defined]
    assert events[1] == LinkClosed(reason)
    assert link.wants_close and link.data_to_send() == b""
    link.receive_data(hello(), 0.2)  # ignored from now on
    assert link.events_received() == []


def test_hello_timeout() -> None:
    link = PeerLink(LinkRole.ACCEPTOR, A_ID, 10.0)
    assert link.next_deadline() == 15.0
    link.handle_timer(14.9)
    assert link.events_received() == []
    link.handle_timer(15.0)
    assert link.events_received() == [LinkClosed(CloseReason.HELLO_TIMEOUT)]
    assert link.next_deadline() is None


def test_api_misuse_is_a_local_protocol_error() -> None:
    link = PeerLink(LinkRole.ACCEPTOR, A_ID, 0.0)
    with pytest.raises(LocalProtocolError):
        link.accept(0.0)
    with pytest.raises(LocalProtocolError):
        link.send_sub("x")
    link.receive_data(hello(), 0.0)
    with pytest.raises(LocalProtocolError):
        link.send_resync(["x"])  # DECIDING: not open yet
    link.accept(0.0)
    with pytest.raises(LocalProtocolError):
        link.accept(0.0)
    link.close()
    assert link.send_sub("x") is False  # closed: dropped, no error
    link.accept(0.0)  # a late accept of a closed link is ignored


# --------------------------------------------------------------------------- the recorded traffic


def recorded(name: str) -> list[bytes]:
    return [bytes.fromhex(r["raw_hex"]) for r in DATA["frames"][name]]


def test_our_dialer_reproduces_the_recorded_setup_of_node_a() -> None:
    """wse-py in node A's place (lower id, dialer, empty interest) writes the same bytes."""
    a_out = recorded("proxy to B #1 to B [HELLO from A]")
    b_out = recorded("proxy to B #1 from B [HELLO from B]")
    link = PeerLink(LinkRole.DIALER, A_ID, 0.0, address="127.0.0.1:18312")
    sent = link.data_to_send()
    link.receive_data(b_out[0], 0.01)  # B's HELLO
    assert link.events_received() == [PeerHello(B_ID, 1, 0x0F)]
    link.accept(0.01, interest=[], announce="127.0.0.1:18311", peers=["127.0.0.1:18312"])
    sent += link.data_to_send()
    assert sent == b"".join(a_out[:3])  # HELLO, PEER_ANNOUNCE, PEER_LIST
    # The rest of what B sent: RESYNC, announce, list, heartbeats, SUB/UNSUB, SHUTDOWN.
    events: list[LinkEvent] = []
    answers = b""
    for i, frame in enumerate(b_out[1:]):
        link.receive_data(frame, 1.0 + i)
        events += link.events_received()
        answers += link.data_to_send()
        if isinstance(decode_all(frame)[0], cf.Sub):
            assert link.interest.topics() == {"bench", "news"}
    assert events[:2] == [
        AddressAnnounced("127.0.0.1:18312", own=True),
        PeerListReceived(("127.0.0.1:18311",)),
    ]
    assert events[-1] == LinkClosed(CloseReason.PEER_SHUTDOWN)
    assert link.interest.known and link.interest.topics() == set()  # UNSUB news, UNSUB bench
    # Every recorded PING from B was answered with one PONG.
    pongs = [f for f in decode_all(answers) if isinstance(f, cf.Pong)]
    assert len(pongs) == sum(isinstance(decode_all(f)[0], cf.Ping) for f in b_out)


def test_original_setup_announce_is_the_peers_own_address_only_in_setup() -> None:
    link = open_link()
    link.receive_data(cf.encode(cf.Resync(("a",))) + cf.encode(cf.PeerAnnounce("1.1.1.1:1")), 1)
    link.receive_data(cf.encode(cf.PeerAnnounce("2.2.2.2:2")), 2)
    assert of_type(link.events_received(), AddressAnnounced) == [
        AddressAnnounced("1.1.1.1:1", own=True),
        AddressAnnounced("2.2.2.2:2", own=False),
    ]
    late = open_link()
    late.receive_data(cf.encode(cf.Ping()) + cf.encode(cf.PeerAnnounce("3.3.3.3:3")), 1)
    assert of_type(late.events_received(), AddressAnnounced) == [
        AddressAnnounced("3.3.3.3:3", own=False)
    ]


# --------------------------------------------------------------------------- heartbeat


def test_ping_every_interval_and_pong_answers() -> None:
    link = open_link(now=100.0)
    assert link.next_deadline() == 105.0
    link.handle_timer(105.0)
    assert decode_all(link.data_to_send()) == [cf.Ping()]
    assert link.next_deadline() == 110.0
    link.receive_data(cf.encode(cf.Ping()) * 2, 106.0)
    assert decode_all(link.data_to_send()) == [cf.Pong(), cf.Pong()]
    link.handle_timer(120.5)  # a late timer: one PING, no burst, next tick on the grid
    assert decode_all(link.data_to_send()) == [cf.Ping()]
    assert link.next_deadline() == 125.0


def test_silence_for_more_than_15s_tears_the_link_down_at_a_tick() -> None:
    link = open_link(now=0.0)
    for t in (5.0, 10.0, 15.0):
        link.handle_timer(t)  # silent since 0: 15 s is not "more than 15 s"
    assert not link.wants_close
    link.handle_timer(20.0)
    assert link.events_received() == [LinkClosed(CloseReason.HEARTBEAT_TIMEOUT)]


def test_any_frame_but_hello_and_shutdown_keeps_the_link_alive() -> None:
    link = open_link(now=0.0)
    link.receive_data(cf.encode(cf.Pong()), 12.0)
    link.receive_data(hello(), 19.0)  # a stray HELLO is ignored and does not count
    for t in (15.0, 20.0, 25.0):
        link.handle_timer(t)
    assert not link.wants_close and link.unexpected_hellos == 1
    link.handle_timer(30.0)  # 18 s after the PONG
    assert link.wants_close


def test_resync_due_every_60s() -> None:
    link = open_link(now=0.0)
    due = []
    for t in range(5, 181, 5):
        link.receive_data(cf.encode(cf.Pong()), float(t))
        link.handle_timer(float(t))
        if of_type(link.events_received(), ResyncDue):
            due.append(t)
    assert due == [60, 120, 180]


# --------------------------------------------------------------------------- interest


def test_forward_everything_until_the_first_resync() -> None:
    interest = PeerInterest()
    assert interest.wants("any", b"any")
    interest.add("room.*")  # SUB alone does not make the set known
    assert interest.wants("other", b"other")
    interest.replace(["news", "room.*", "r??m"])
    assert interest.wants("news", b"news") and interest.wants("room.7", b"room.7")
    assert interest.wants("roam", b"roam") and not interest.wants("other", b"other")
    interest.extend(["other"])
    assert interest.wants("other", b"other")
    interest.remove("room.*")
    assert not interest.wants("room.7", b"room.7")
    assert interest.topics() == {"news", "r??m", "other"}


def test_sub_unsub_resync_and_continuation_on_the_wire() -> None:
    link = open_link()
    link.receive_data(cf.encode(cf.Sub("a")) + cf.encode(cf.Sub("b.*")), 1)
    assert not link.interest.known and link.interest.topics() == {"a", "b.*"}
    link.receive_data(cf.encode(cf.Resync(("x",))), 2)
    assert link.interest.known and link.interest.topics() == {"x"}
    link.receive_data(cf.encode(cf.Resync(("y", "z*"), continuation=True)), 3)
    link.receive_data(cf.encode(cf.Unsub("x")), 4)
    assert link.interest.topics() == {"y", "z*"}


def test_interest_cap() -> None:
    link = open_link(config=LinkConfig(max_interest=3))
    link.receive_data(cf.encode(cf.Resync(("a", "b", "c", "d", "e*"))), 1)
    assert len(link.interest) == 3 and link.interest.overflow == 2


def test_drain_clears_the_peers_interest_and_keeps_the_link() -> None:
    link = open_link()
    link.receive_data(cf.encode(cf.Resync(("a", "b*"))) + cf.encode(cf.Drain()), 1)
    assert of_type(link.events_received(), PeerDraining) == [PeerDraining()]
    assert link.interest.known and not link.interest.wants("a", b"a")
    assert link.is_open
    link.receive_data(cf.encode(cf.Resync(("a",))), 61)  # its next periodic RESYNC
    assert link.interest.wants("a", b"a")


def test_interest_frames_need_capability_bit0() -> None:
    with_bit = open_link(caps=cf.CAP_INTEREST)
    assert with_bit.send_sub("a") and with_bit.send_unsub("a")
    assert decode_all(with_bit.data_to_send()) == [cf.Sub("a"), cf.Unsub("a")]
    without = open_link(caps=cf.CAP_ZSTD)
    assert not without.send_sub("a") and not without.send_unsub("a")
    assert without.send_resync(["a", "", "bad\ntopic"])  # RESYNC whatever the caps
    assert decode_all(without.data_to_send()) == [cf.Resync(("a",))]
    assert not without.send_resync([])  # never an empty RESYNC


# --------------------------------------------------------------------------- other frames


def test_publications_presence_and_lists_become_events() -> None:
    link = open_link()
    update = cf.PresenceUpdate("room", cf.PRESENCE_JOIN, 7, "alice", b'{"s":1}')
    stream = b"".join(
        (
            cf.encode_msg("t", b'{"a":1}', epoch=5, offset=9),
            cf.encode_msg("t", b"x" * 600, zstd=True),
            cf.encode(update),
            cf.encode(cf.PresenceFull(b"{}")),
            cf.encode(cf.PeerList(("1.2.3.4:5",))),
        )
    )
    link.receive_data(stream, 1.0)
    assert link.events_received() == [
        MsgReceived("t", b'{"a":1}', 5, 9),
        MsgReceived("t", b"x" * 600, None, None),
        PresenceReceived(update),
        PresenceFullReceived(b"{}"),
        PeerListReceived(("1.2.3.4:5",)),
    ]


def test_non_utf8_publication_is_dropped_and_the_link_kept() -> None:
    link = open_link()
    link.receive_data(cf.encode_msg("t", b"\xff\xfe") + cf.encode_msg("t", "é".encode()), 1)
    assert link.events_received() == [MsgReceived("t", "é".encode(), None, None)]
    assert link.invalid_msgs == 1 and link.is_open


def test_unknown_types_are_counted_and_skipped() -> None:
    link = open_link()
    junk = cf.encode(cf.Unknown(0x00, 3, b"t", b"p")) + cf.encode(cf.Unknown(0xEE, 0, b"", b""))
    link.receive_data(junk + cf.encode_msg("t", b"{}"), 1)
    assert link.events_received() == [MsgReceived("t", b"{}", None, None)]
    assert link.unknown_frames == 2


def test_malformed_frame_after_good_ones() -> None:
    link = open_link()
    bad = b"\x00\x00\x00\x09\x01\x00\x05\x00\x00\x00\x00\x00t"  # topic_len beyond the body
    link.receive_data(cf.encode_msg("t", b"{}") + bad + cf.encode_msg("t", b"{}"), 1)
    events = link.events_received()
    assert [type(e) for e in events] == [MsgReceived, FrameRejected, LinkClosed]
    assert events[-1] == LinkClosed(CloseReason.MALFORMED)


def test_shutdown_both_ways() -> None:
    link = open_link()
    link.receive_data(cf.encode(cf.Shutdown()) + cf.encode_msg("t", b"{}"), 1)
    assert link.events_received() == [LinkClosed(CloseReason.PEER_SHUTDOWN)]
    ours = open_link()
    ours.send_msg(cf.encode_msg("t", b"{}"))
    ours.shutdown()
    # Graceful: what was queued still goes out, then SHUTDOWN; nothing is a dead letter.
    assert decode_all(ours.data_to_send()) == [cf.Msg("t", b"{}"), cf.Shutdown()]
    assert ours.events_received() == [LinkClosed(CloseReason.SHUTDOWN)]
    ours.shutdown()  # idempotent
    assert ours.events_received() == []


def test_eof_and_abort() -> None:
    for call, reason in (("receive_eof", CloseReason.EOF), ("abort", CloseReason.ABORTED)):
        link = open_link()
        getattr(link, call)(1.0)
        assert link.events_received() == [LinkClosed(reason)]
        getattr(link, call)(2.0)
        assert link.events_received() == []


def test_queue_cap_drops_and_counts() -> None:
    link = open_link(config=LinkConfig(max_queued_frames=3))
    frame = cf.encode_msg("t", b"{}")
    assert [link.send_msg(frame) for _ in range(4)] == [True, True, True, False]
    assert link.dropped_frames == 1
    link.data_to_send()
    link.transport_pending_frames = 3  # the transport has not written them yet
    assert not link.send_msg(frame)
    link.transport_pending_frames = 0
    assert link.send_msg(frame)


def test_unflushed_publications_become_dead_letters() -> None:
    link = open_link()
    link.send_msg(cf.encode_msg("t", b"1"))
    link.data_to_send()  # handed to the transport: not a dead letter
    link.send_msg(cf.encode_msg("t", b"2", zstd=True))
    link.send_sub("x")
    link.send_presence(cf.encode(cf.PresenceUpdate("room", 0, 1, "u", b"{}")))
    link.receive_eof(3.0)
    assert link.data_to_send() == b""  # discarded with the link
    (closed,) = link.events_received()
    assert isinstance(closed, LinkClosed)
    assert [(d.topic, d.payload, d.peer_addr, d.error) for d in closed.dead_letters] == [
        ("t", b"2", "10.0.0.2:7000", "peer channel closed"),
        ("room", b"{}", "10.0.0.2:7000", "presence update failed"),
    ]


def test_link_config_validation() -> None:
    for kw in ({"ping_interval": 0}, {"max_queued_frames": 0}, {"capabilities": -1}):
        with pytest.raises(ValueError):
            LinkConfig(**kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- properties

_line = st.text(st.characters(codec="utf-8", exclude_characters="\n"), min_size=1, max_size=12)
_peer_frames = st.lists(
    st.one_of(
        st.builds(
            lambda t, p, tr: cf.Msg(t, p, *(tr or (None, None))),
            _line,
            st.binary(max_size=40).map(lambda b: b.hex().encode()),
            st.none() | st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)),
        ),
        st.just(cf.Ping()),
        st.just(cf.Pong()),
        st.builds(cf.Sub, _line),
        st.builds(cf.Unsub, _line),
        st.builds(cf.Resync, st.lists(_line, max_size=4).map(tuple), st.booleans()),
        st.builds(cf.PeerAnnounce, _line),
        st.builds(cf.PeerList, st.lists(_line, max_size=3).map(tuple)),
        st.builds(
            cf.PresenceUpdate, _line, st.integers(0, 3), st.integers(0, 99), _line, st.just(b"1")
        ),
        st.just(cf.Drain()),
        st.builds(
            cf.Unknown,
            st.integers(0x0E, 0xFF),
            st.integers(0, 255),
            st.binary(max_size=4),
            st.binary(max_size=4),
        ),
    ),
    max_size=12,
)


def drive(chunks: list[bytes], role: LinkRole) -> tuple[list[LinkEvent], bytes, frozenset[str]]:
    """Feed the chunks, accepting at the HELLO; returns events, output and interest."""
    link = PeerLink(role, A_ID, 0.0)
    out = link.data_to_send()
    events: list[LinkEvent] = []
    for chunk in chunks:
        link.receive_data(chunk, 1.0)
        while batch := link.events_received():
            events += batch
            if any(isinstance(e, PeerHello) for e in batch):
                link.accept(1.0, interest=["mine"], announce="9.9.9.9:9")
        out += link.data_to_send()
    return events, out, link.interest.topics()


@SETTINGS
@given(
    frames=_peer_frames,
    cuts=st.lists(st.integers(0, 2000), max_size=8),
    role=st.sampled_from(LinkRole),
)
def test_splitting_the_stream_changes_nothing(
    frames: list[cf.Frame], cuts: list[int], role: LinkRole
) -> None:
    stream = hello() + b"".join(cf.encode(f) for f in frames)
    whole = drive([stream], role)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    assert drive(pieces, role) == whole
    assert drive([stream[i : i + 1] for i in range(len(stream))], role) == whole
    assert not any(isinstance(e, LinkClosed) for e in whole[0])


@SETTINGS
@given(data=st.binary(max_size=300), prefix=st.booleans())
def test_garbage_never_raises(data: bytes, prefix: bool) -> None:
    link = PeerLink(LinkRole.ACCEPTOR, A_ID, 0.0)
    link.receive_data((hello() if prefix else b"") + data, 1.0)
    events = link.events_received()
    if events and isinstance(events[0], PeerHello):
        link.accept(1.0)
        events = link.events_received()
    closed = [e for e in events if isinstance(e, LinkClosed)]
    assert len(closed) <= 1
    if any(isinstance(e, FrameRejected) for e in events):
        assert closed and link.wants_close


_calls = st.sampled_from(
    [
        "hello",
        "bad_hello",
        "frame",
        "shutdown_frame",
        "garbage",
        "accept",
        "refuse",
        "send_sub",
        "send_msg",
        "eof",
        "abort",
        "close",
        "shutdown",
        "timer",
    ]
)


@SETTINGS
@given(role=st.sampled_from(LinkRole), calls=st.lists(_calls, max_size=12))
def test_every_state_input_pair(role: LinkRole, calls: list[str]) -> None:
    """Misuse raises LocalProtocolError exactly where the table has no entry; anything
    else follows the table; one LinkClosed at most; wants_close iff CLOSED."""
    link = PeerLink(role, A_ID, 0.0)
    now = 0.0
    closed = 0
    for call in calls:
        now += 7.0
        before = link.state
        try:
            if call == "hello":
                link.receive_data(hello(), now)
            elif call == "bad_hello":
                link.receive_data(hello(version=0), now)
            elif call == "frame":
                link.receive_data(cf.encode(cf.Ping()), now)
            elif call == "shutdown_frame":
                link.receive_data(cf.encode(cf.Shutdown()), now)
            elif call == "garbage":
                link.receive_data(b"\x00\x00\x00\x00", now)
            elif call == "accept":
                link.accept(now)
            elif call == "refuse":
                link.refuse()
            elif call == "send_sub":
                link.send_sub("t")
            elif call == "send_msg":
                link.send_msg(cf.encode_msg("t", b"{}"))
            elif call == "eof":
                link.receive_eof(now)
            elif call == "abort":
                link.abort(now)
            elif call == "close":
                link.close()
            elif call == "shutdown":
                link.shutdown()
            else:
                link.handle_timer(now)
        except LocalProtocolError:
            inp = {
                "accept": LinkInput.ACCEPT,
                "refuse": LinkInput.REFUSE,
                "send_sub": LinkInput.SEND,
                "send_msg": LinkInput.SEND,
            }[call]
            assert (before, inp) not in LINK_TRANSITIONS
            assert link.state is before
        closed += sum(isinstance(e, LinkClosed) for e in link.events_received())
        link.data_to_send()
        assert link.wants_close is (link.state is LinkState.CLOSED)
        assert (link.next_deadline() is None) is (link.state is LinkState.CLOSED)
    assert closed == (1 if link.state is LinkState.CLOSED else 0)

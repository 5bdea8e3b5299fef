"""Recovery history: stamps, the per-topic outcome table, TTL, budget, foreign buffers,
the replay seam and the subscription_update helpers (PROTOCOL §13, spec/RECOVERY_PRESENCE.md).
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wse_proto.errors import DecodeError, WSEError
from wse_proto.recovery import (
    MAX_OFFSET,
    NOT_RECOVERABLE,
    RecoveryConfig,
    RecoveryOutcome,
    RecoveryStore,
    format_epoch,
    parse_epoch,
    parse_offset,
    parse_recovery_request,
    recovery_result,
    ring_capacity,
    stamp,
    subscription_reply,
)

EPOCH = 0xDC81257D
MSG = b'{"c":"U","t":"chat_message","p":{"x":1},"v":1}'


def fixed_rand(*epochs: int) -> Callable[[int], bytes]:
    """A RandFn handing out the given epochs in turn (then repeating the last)."""
    it = iter(epochs)
    last = [epochs[-1]]

    def rand(n: int) -> bytes:
        value = next(it, last[0])
        last[0] = value
        return value.to_bytes(4, "big")[:n].rjust(n, b"\0")

    return rand


def seeded(seed: int = 1) -> Callable[[int], bytes]:
    return random.Random(seed).randbytes


def store(**kw: Any) -> RecoveryStore:
    rand = kw.pop("rand", None) or fixed_rand(EPOCH, 0x0A1B2C3D, 0x11111111, 0x22222222)
    return RecoveryStore(RecoveryConfig(**kw), rand=rand)


def fill(s: RecoveryStore, topic: str, n: int, now: float = 0.0) -> list[bytes]:
    out = []
    for i in range(n):
        res = s.publish(topic, b'{"i":%d}' % i, now)
        assert res is not None
        out.append(res[0])
    return out


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("size", "cap"),
    [(128, 128), (20, 32), (1, 16), (0, 16), (-5, 16), (16, 16), (17, 32), (129, 256)],
)
def test_ring_capacity_is_at_least_16_and_a_power_of_two(size: int, cap: int) -> None:
    assert ring_capacity(size) == cap
    assert RecoveryConfig(buffer_size=size).capacity == cap


def test_config_defaults_are_the_originals() -> None:
    c = RecoveryConfig()
    assert (c.buffer_size, c.ttl, c.max_messages, c.memory_budget) == (128, 300.0, 500, 268435456)


@pytest.mark.parametrize(
    "kw",
    [
        {"ttl": 0},
        {"ttl": -1.0},
        {"ttl": float("nan")},
        {"max_messages": -1},
        {"memory_budget": -1},
        {"buffer_size": 1.5},
        {"buffer_size": True},
        {"buffer_size": 1 << 30},
    ],
)
def test_config_rejects_bad_values(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RecoveryConfig(**kw)


# --------------------------------------------------------------------------- stamp (§13.2)


def test_stamp_matches_the_capture() -> None:
    assert (
        stamp("room", EPOCH, 0, MSG)
        == b'{"tp":"room","e":"dc81257d","o":0,"c":"U","t":"chat_message","p":{"x":1},"v":1}'
    )
    assert stamp("room", "dc81257d", 2, b"{}") == b'{"tp":"room","e":"dc81257d","o":2}'


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b'  \n\t{"a":1}', b'{"tp":"t","e":"0000abcd","o":7,"a":1}'),
        (b'{ "a":1}', b'{"tp":"t","e":"0000abcd","o":7, "a":1}'),
        (b"{ }", b'{"tp":"t","e":"0000abcd","o":7 }'),
        (b"\r\n{\n}\n", b'{"tp":"t","e":"0000abcd","o":7\n}\n'),
        (b'{\n  "a": 1\n}', b'{"tp":"t","e":"0000abcd","o":7,\n  "a": 1\n}'),
    ],
)
def test_stamp_trims_leading_whitespace_and_keeps_the_rest(payload: bytes, expected: bytes) -> None:
    assert stamp("t", 0xABCD, 7, payload) == expected


@pytest.mark.parametrize(
    "payload", [b"", b"   ", b"[1,2]", b'"x"', b"not json", b"1", b"null", b"\xa0{}", b"\x0b{}"]
)
def test_stamp_leaves_non_objects_alone(payload: bytes) -> None:
    # F7: not an object (JSON whitespace only is trimmed) -> no stamp.
    assert stamp("t", 1, 0, payload) is None


def test_stamp_escapes_the_topic_like_the_server_json() -> None:
    out = stamp('a"b\\c/é\u2028', 1, 0, b'{"x":1}')
    assert out is not None
    assert out.startswith(b'{"tp":"a\\"b\\\\c/\xc3\xa9\xe2\x80\xa8","e":"00000001","o":0,')
    assert orjson.loads(out)["tp"] == 'a"b\\c/é\u2028'


def test_stamp_rejects_bad_arguments_with_wse_errors() -> None:
    with pytest.raises(DecodeError):
        stamp("t", "xyz", 0, b"{}")
    with pytest.raises(DecodeError):
        stamp("t", 1 << 32, 0, b"{}")
    with pytest.raises(DecodeError):
        stamp("t", 1, -1, b"{}")
    with pytest.raises(WSEError):
        stamp("\ud800", 1, 0, b"{}")  # a lone surrogate cannot be written as JSON


def test_large_payload_stamp_is_identical_to_small_path() -> None:
    body = b'{"blob":"' + b"x" * 10000 + b'"}'
    out = stamp("big", 5, 3, body)
    assert out == b'{"tp":"big","e":"00000005","o":3,' + body[1:]


@pytest.mark.parametrize("size", [10, 4094, 4095, 4096, 50_000])
@pytest.mark.parametrize("topic", ["plain", "100%d %s %%", "ü/%b"])
def test_publish_stamps_exactly_like_stamp(size: int, topic: str) -> None:
    s = store()
    for body in (b'{"k":"' + b"v" * size + b'"}', b' \n{ "k" : "' + b"w" * size + b'"}', b"{}"):
        res = s.publish(topic, body, 0.0)
        assert res is not None
        assert res[0] == stamp(topic, res[1], res[2], body)
        assert json.loads(res[0])["tp"] == topic


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=200)
@given(
    obj=st.dictionaries(
        st.text(max_size=6).filter(lambda k: k not in ("tp", "e", "o")), json_values, max_size=5
    ),
    topic=st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=10),
    epoch=st.integers(0, 0xFFFFFFFF),
    offset=st.integers(0, MAX_OFFSET),
    lead=st.text(alphabet=" \t\r\n", max_size=4),
    pretty=st.booleans(),
)
def test_stamp_property(
    obj: dict[str, Any], topic: str, epoch: int, offset: int, lead: str, pretty: bool
) -> None:
    text = json.dumps(obj, indent=1 if pretty else None) if pretty else orjson.dumps(obj).decode()
    out = stamp(topic, epoch, offset, (lead + text).encode())
    assert out is not None
    decoded = json.loads(out)
    assert list(decoded)[:3] == ["tp", "e", "o"]
    assert decoded.pop("tp") == topic
    assert decoded.pop("e") == format_epoch(epoch)
    assert decoded.pop("o") == offset
    assert decoded == obj


@given(st.binary(max_size=40))
def test_stamp_on_arbitrary_bytes_only_stamps_objects(data: bytes) -> None:
    out = stamp("t", 1, 0, data)
    if data.lstrip(b" \t\r\n")[:1] == b"{":
        assert out is not None and out.startswith(b'{"tp":"t","e":"00000001","o":0')
    else:
        assert out is None


# --------------------------------------------------------------------------- epochs and offsets


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("dc81257d", EPOCH),
        ("DC81257D", EPOCH),
        ("Dc81257D", EPOCH),
        ("+dc81257d", EPOCH),
        ("0", 0),
        ("00000000", 0),
        ("000000000001", 1),
        ("ffffffff", 0xFFFFFFFF),
        ("abc", 0xABC),
    ],
)
def test_parse_epoch_accepts_hex_u32(text: str, value: int) -> None:
    assert parse_epoch(text) == value


@pytest.mark.parametrize(
    "text",
    ["", "+", "-1", "0x1", "1_0", " 1", "1 ", "g", "100000000", "ffffffffff", "١٢", None, 5, b"ab"],
)
def test_parse_epoch_rejects_everything_else(text: object) -> None:
    with pytest.raises(DecodeError, match="Invalid epoch hex string"):
        parse_epoch(text)


@pytest.mark.parametrize("value", [-1, MAX_OFFSET + 1, True, False, 1.0, "3", None])
def test_parse_offset_rejects(value: object) -> None:
    with pytest.raises(DecodeError):
        parse_offset(value)


def test_parse_offset_accepts_the_u64_range() -> None:
    assert parse_offset(0) == 0
    assert parse_offset(MAX_OFFSET) == MAX_OFFSET


@given(st.integers(0, 0xFFFFFFFF))
def test_epoch_round_trip(epoch: int) -> None:
    text = format_epoch(epoch)
    assert len(text) == 8 and text == text.lower()
    assert parse_epoch(text) == parse_epoch(text.upper()) == epoch


# --------------------------------------------------------------------------- publish (§13.1)


def test_offsets_start_at_zero_and_the_stored_object_is_the_sent_one() -> None:
    s = store()
    sent = fill(s, "room", 3)
    assert [orjson.loads(b)["o"] for b in sent] == [0, 1, 2]
    out = s.recover("room", "dc81257d", -1 + 1, 0.0)  # has 0, wants 1..2
    assert out.messages[0] is sent[1] and out.messages[1] is sent[2]
    assert s.position("room") == ("dc81257d", 2)
    assert s.held("room") == range(0, 3)


def test_non_objects_take_no_offset() -> None:
    # F7: the original stores them and skips an offset; we do neither.
    s = store()
    assert s.publish("room", b"[1,2]", 0.0) is None
    assert s.position("room") is None and s.stats() == (0, 0)
    fill(s, "room", 1)
    assert s.publish("room", b"plain text", 0.0) is None
    res = s.publish("room", b"{}", 0.0)
    assert res is not None and res[1:] == (EPOCH, 1)
    assert res[0] == b'{"tp":"room","e":"dc81257d","o":1}'


def test_each_topic_has_its_own_buffer_and_epoch() -> None:
    s = store()
    a = s.publish("a", b"{}", 0.0)
    b = s.publish("b", b"{}", 0.0)
    assert a is not None and b is not None
    assert (a[1], a[2]) == (EPOCH, 0) and (b[1], b[2]) == (0x0A1B2C3D, 0)
    assert s.stats()[0] == 2


def test_ring_evicts_the_oldest() -> None:
    s = store(buffer_size=16)
    sent = fill(s, "t", 20)
    assert s.held("t") == range(4, 20)
    assert s.stats() == (1, sum(len(b) for b in sent[4:]))


def test_new_buffer_gets_a_new_epoch_even_from_a_stuck_rng() -> None:
    s = RecoveryStore(RecoveryConfig(ttl=10.0), rand=fixed_rand(7))
    first = s.publish("t", b"{}", 0.0)
    assert first is not None and first[1] == 7
    assert s.expire(10.0) == 1 and s.position("t") is None
    again = s.publish("t", b"{}", 11.0)
    assert again is not None and again[1] != 7 and again[2] == 0


def test_idle_buffer_is_replaced_at_publish_even_before_the_sweep() -> None:
    s = store(ttl=10.0)
    fill(s, "t", 2, now=0.0)
    res = s.publish("t", b"{}", 10.0)
    assert res is not None and res[1] == 0x0A1B2C3D and res[2] == 0
    # the old epoch is history: recovering from it says "epoch differs"
    out = s.recover("t", "dc81257d", 0, 10.0)
    assert (out.recovered, out.epoch, out.offset) == (False, "0a1b2c3d", 0)


def test_ttl_sweep_and_deadline() -> None:
    s = store(ttl=5.0)
    assert s.next_deadline() is None
    s.publish("a", b"{}", 1.0)
    s.publish("b", b"{}", 2.0)
    assert s.next_deadline() == 6.0
    assert s.expire(5.9) == 0
    s.publish("a", b"{}", 3.0)  # a written again: b is now the oldest
    assert s.next_deadline() == 7.0
    assert s.expire(7.0) == 1 and s.position("b") is None and s.position("a") is not None
    assert s.expire(100.0) == 1 and s.stats() == (0, 0) and s.next_deadline() is None


def test_clock_going_backwards_does_not_reorder_last_writes() -> None:
    s = store(ttl=5.0)
    s.publish("a", b"{}", 10.0)
    s.publish("b", b"{}", 3.0)  # treated as written at 10.0
    assert s.next_deadline() == 15.0
    assert s.expire(14.0) == 0


# --------------------------------------------------------------------------- budget


def test_budget_evicts_least_recently_written_buffers_on_push() -> None:
    sizes = {}
    s = store(memory_budget=200)
    for t in ("a", "b", "c"):
        res = s.publish(t, b'{"pad":"' + b"x" * 20 + b'"}', 0.0)
        assert res is not None
        sizes[t] = len(res[0])
    assert s.stats() == (3, sum(sizes.values()))  # 3 * ~50 bytes fit
    s.publish("a", b'{"pad":"' + b"x" * 20 + b'"}', 0.0)  # a is now the newest
    # over 200: b (least recently written) goes as a whole, never a
    assert s.position("b") is None and s.position("a") is not None and s.position("c") is not None
    assert s.stats()[1] <= 200


def test_budget_trims_the_written_buffer_only_when_it_is_alone() -> None:
    s = store(memory_budget=120)
    sent = fill(s, "t", 5)
    total = s.stats()[1]
    assert total <= 120
    assert s.held("t").stop == 5 and sum(len(b) for b in sent[s.held("t").start :]) == total
    # one message larger than the whole budget is sent but cannot be kept
    big = s.publish("t", b'{"x":"' + b"y" * 200 + b'"}', 0.0)
    assert big is not None and big[2] == 5
    assert s.held("t") == range(6, 6) and s.stats() == (1, 0)
    # the offset sequence goes on and recovery reports the hole honestly
    nxt = s.publish("t", b"{}", 0.0)
    assert nxt is not None and nxt[2] == 6
    out = s.recover("t", "dc81257d", 4, 0.0)
    assert (out.recovered, out.count, out.offset) == (False, 0, 6)


@settings(max_examples=60)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from("abcde"), st.integers(0, 300), st.floats(0, 3)), max_size=60
    ),
    budget=st.integers(0, 2000),
)
def test_budget_holds_at_every_moment(ops: list[tuple[str, int, float]], budget: int) -> None:
    s = RecoveryStore(RecoveryConfig(buffer_size=16, memory_budget=budget, ttl=4.0), rand=seeded())
    sizes: dict[tuple[str, int, int], int] = {}
    now = 0.0
    for topic, size, dt in ops:
        now += dt
        res = s.publish(topic, b'{"p":"' + b"z" * size + b'"}', now)
        assert res is not None
        sizes[(topic, res[1], res[2])] = len(res[0])
        topics, total = s.stats()
        assert total <= budget
        # what the buffers hold is exactly what is accounted for
        held = 0
        for t in "abcde":
            pos = s.position(t)
            if pos is not None:
                epoch = parse_epoch(pos[0])
                assert s.held(t).stop == pos[1] + 1
                held += sum(sizes[(t, epoch, o)] for o in s.held(t))
        assert held == total and topics == sum(s.position(t) is not None for t in "abcde")
        # the buffer being written never loses its newest entry to other buffers
        if len(res[0]) <= budget:
            assert res[2] in s.held(topic)


# ----------------------------------------------------------------- the outcome table (§13.4)


def outcome(
    s: RecoveryStore, topic: str, epoch: str | None, offset: int | None, **kw: Any
) -> tuple:
    o = s.recover(topic, epoch, offset, 0.0, **kw)
    return (o.recovered, o.count, o.recoverable, o.epoch, o.offset)


def test_table_epoch_matches_and_history_is_there() -> None:
    s = store()
    sent = fill(s, "t", 10)
    o = s.recover("t", "dc81257d", 4, 0.0)
    assert (o.recovered, o.count, o.recoverable, o.epoch, o.offset) == (
        True,
        5,
        True,
        "dc81257d",
        9,
    )
    assert o.messages == sent[5:]
    assert outcome(s, "t", "DC81257D", 9) == (True, 0, True, "dc81257d", 9)  # up to date


@pytest.mark.parametrize("offset", [10, 11, 1000, MAX_OFFSET])
def test_table_offset_beyond_head_is_recovered_with_nothing(offset: int) -> None:
    s = store()
    fill(s, "t", 10)
    assert outcome(s, "t", "dc81257d", offset) == (True, 0, True, "dc81257d", 9)


def test_table_backlog_cap_is_all_or_nothing() -> None:
    s = store(buffer_size=64, max_messages=5)
    fill(s, "t", 20)
    assert outcome(s, "t", "dc81257d", 14) == (True, 5, True, "dc81257d", 19)  # exactly the cap
    assert outcome(s, "t", "dc81257d", 13) == (False, 0, True, "dc81257d", 19)
    s0 = store(max_messages=0)
    fill(s0, "t", 3)
    assert outcome(s0, "t", "dc81257d", 1) == (False, 0, True, "dc81257d", 2)
    assert outcome(s0, "t", "dc81257d", 2) == (True, 0, True, "dc81257d", 2)


def test_table_evicted_history_is_not_recovered() -> None:
    s = store(buffer_size=16)
    fill(s, "t", 40)  # holds 24..39
    assert outcome(s, "t", "dc81257d", 23) == (True, 16, True, "dc81257d", 39)
    assert outcome(s, "t", "dc81257d", 22) == (False, 0, True, "dc81257d", 39)
    assert outcome(s, "t", "dc81257d", 0) == (False, 0, True, "dc81257d", 39)


def test_table_other_epoch_gets_the_current_position() -> None:
    s = store()
    fill(s, "t", 3)
    assert outcome(s, "t", "0a1b2c3d", 1) == (False, 0, True, "dc81257d", 2)


def test_table_no_buffer() -> None:
    s = store()
    assert outcome(s, "t", "dc81257d", 1) == (False, 0, False, None, 0)
    assert s.recover("t", "dc81257d", 1, 0.0) == NOT_RECOVERABLE


def test_table_not_requested_reports_the_position() -> None:
    s = store()
    fill(s, "t", 3)
    for epoch, offset in ((None, None), ("dc81257d", None), (None, 1)):
        assert outcome(s, "t", epoch, offset) == (False, 0, True, "dc81257d", 2)
    assert outcome(s, "u", None, None) == (False, 0, False, None, 0)


def test_table_replay_larger_than_the_backlog_room() -> None:
    s = store()
    sent = fill(s, "t", 4)
    room = sum(len(b) for b in sent[1:])
    assert outcome(s, "t", "dc81257d", 0, max_bytes=room) == (True, 3, True, "dc81257d", 3)
    assert outcome(s, "t", "dc81257d", 0, max_bytes=room - 1) == (False, 0, True, "dc81257d", 3)


def test_table_expired_buffer_counts_as_gone() -> None:
    s = store(ttl=5.0)
    fill(s, "t", 3, now=0.0)
    assert s.recover("t", "dc81257d", 0, 4.9).recovered
    assert s.recover("t", "dc81257d", 0, 5.0) == NOT_RECOVERABLE
    assert s.stats() == (0, 0)


@pytest.mark.parametrize(
    ("epoch", "offset"),
    [
        ("zz", 1),
        ("", 1),
        ("0x1", 1),
        ("123456789", 1),
        ("dc81257d", -1),
        ("dc81257d", MAX_OFFSET + 1),
        ("dc81257d", True),
        ("dc81257d", 1.0),
        (12, 1),
    ],
)
def test_invalid_positions_raise_and_change_nothing(epoch: Any, offset: Any) -> None:
    s = store()
    fill(s, "t", 3)
    before = (s.stats(), s.position("t"), s.held("t"))
    with pytest.raises(DecodeError):
        s.recover("t", epoch, offset, 0.0)
    with pytest.raises(DecodeError):
        s.begin_replay("t", epoch, offset, 0.0)
    assert (s.stats(), s.position("t"), s.held("t")) == before
    assert s.recover("t", "dc81257d", 0, 0.0).count == 2


def test_invalid_epoch_message_names_the_string() -> None:
    with pytest.raises(DecodeError) as err:
        store().recover("t", "xyz", 0, 0.0)
    assert str(err.value) == "Invalid epoch hex string: 'xyz'"


# --------------------------------------------------------------------------- foreign buffers


def test_foreign_buffer_recovery() -> None:
    s = store()
    fill(s, "t", 2)  # local epoch dc81257d
    for o in range(5, 9):
        assert s.store_foreign("t", 0xAAAA0001, o, b'{"f":%d}' % o, 0.0)
    o = s.recover("t", "aaaa0001", 5, 0.0)
    assert (o.recovered, o.count, o.epoch, o.offset) == (True, 3, "aaaa0001", 8)
    assert o.messages == [b'{"f":6}', b'{"f":7}', b'{"f":8}']
    assert outcome(s, "t", "aaaa0001", 8) == (True, 0, True, "aaaa0001", 8)
    assert outcome(s, "t", "aaaa0001", 4) == (True, 4, True, "aaaa0001", 8)
    # the local position is what other epochs get
    assert outcome(s, "t", "aaaa0002", 4) == (False, 0, True, "dc81257d", 1)
    assert s.stats() == (1, sum(len(b) for b in fill(store(), "t", 2)) + 4 * 7)
    assert s.foreign_count == 1


def test_foreign_buffer_without_local_buffer_and_with_holes() -> None:
    s = store()
    s.store_foreign("x", "0000beef", 0, b"{}", 0.0)
    s.store_foreign("x", "0000beef", 2, b"{}", 0.0)  # 1 never arrived
    assert outcome(s, "x", "0000beef", 0) == (False, 0, True, "0000beef", 2)
    assert outcome(s, "x", "0000beef", 1) == (True, 1, True, "0000beef", 2)
    outcome_paced, seam = s.begin_replay("x", "0000beef", 0, 0.0)
    assert not outcome_paced.recovered and seam is None
    s.store_foreign("x", "0000beef", 1, b'{"late":1}', 0.0)  # out of order fills the hole
    assert outcome(s, "x", "0000beef", 0)[:2] == (True, 2)
    assert s.position("x") is None  # foreign buffers are not the topic's own position


def test_foreign_window_and_overwrite() -> None:
    s = store(buffer_size=16)
    s.store_foreign("x", 1, 100, b"{}", 0.0)
    assert not s.store_foreign("x", 1, 84, b"{}", 0.0)  # below the 16-offset window
    assert s.store_foreign("x", 1, 85, b'{"a":1}', 0.0)
    assert s.store_foreign("x", 1, 85, b'{"a":22}', 0.0)  # replaced
    assert s.recover("x", "00000001", 84, 0.0).recovered is False  # 86..99 missing
    assert s.stats()[1] == len(b"{}") + len(b'{"a":22}')
    s.store_foreign("x", 1, 116, b"{}", 0.0)  # window moves to 101..116: 85 and 100 go
    assert s.stats()[1] == 2
    s.store_foreign("x", 1, 10_000, b"{}", 0.0)  # a far jump clears everything older
    assert s.stats()[1] == 2
    with pytest.raises(DecodeError):
        s.store_foreign("x", 1 << 32, 0, b"{}", 0.0)
    with pytest.raises(DecodeError):
        s.store_foreign("x", "nothex", 0, b"{}", 0.0)
    with pytest.raises(DecodeError):
        s.store_foreign("x", 1, -1, b"{}", 0.0)


def test_foreign_buffers_share_the_ttl_and_the_budget() -> None:
    s = store(ttl=5.0, memory_budget=60)
    s.store_foreign("x", 1, 0, b'{"p":"' + b"x" * 20 + b'"}', 0.0)
    s.store_foreign("y", 2, 0, b'{"p":"' + b"x" * 20 + b'"}', 1.0)
    s.store_foreign("z", 3, 0, b'{"p":"' + b"x" * 20 + b'"}', 2.0)  # over 60: x goes
    assert s.foreign_count == 2 and s.stats()[1] <= 60
    assert s.recover("x", "00000001", 0, 2.0) == NOT_RECOVERABLE
    assert s.next_deadline() == 6.0
    assert s.recover("y", "00000002", 0, 6.0) == NOT_RECOVERABLE  # expired (lazily)
    assert s.expire(7.0) == 1 and s.foreign_count == 0 and s.stats() == (0, 0)


def test_new_local_epoch_avoids_foreign_epochs_of_the_topic() -> None:
    s = RecoveryStore(RecoveryConfig(), rand=fixed_rand(9, 9, 9, 9, 9, 9, 9, 9, 9, 9))
    s.store_foreign("t", 9, 0, b"{}", 0.0)
    res = s.publish("t", b"{}", 0.0)
    assert res is not None and res[1] != 9


# --------------------------------------------------------------------------- the replay seam (F8)


def test_paced_replay_holds_back_live_messages_until_caught_up() -> None:
    s = store(buffer_size=64)
    sent = fill(s, "t", 10)
    outcome_, seam = s.begin_replay("t", "dc81257d", 2, 0.0)
    assert (outcome_.recovered, outcome_.count, outcome_.messages) == (True, 7, [])
    assert seam is not None and seam.pending and seam.epoch_hex == "dc81257d"
    got = seam.pull(max_count=3)
    assert got == sent[3:6]
    live = s.publish("t", b'{"live":1}', 0.0)  # offset 10 published mid-replay
    assert live is not None and not seam.accept_live(live[1])
    assert seam.accept_live(0x12345678)  # another epoch's stream is not ours to hold
    rest = seam.pull(max_count=100)
    assert rest == [*sent[6:], live[0]]
    assert not seam.pending and seam.gaps == 0 and seam.delivered == 8
    nxt = s.publish("t", b"{}", 0.0)
    assert nxt is not None and seam.accept_live(nxt[1])
    assert seam.pull() == []


def test_seam_is_none_when_there_is_nothing_to_replay() -> None:
    s = store()
    fill(s, "t", 3)
    assert s.begin_replay("t", "dc81257d", 2, 0.0)[1] is None
    assert s.begin_replay("t", "dc81257d", 99, 0.0)[1] is None
    assert s.begin_replay("t", "0a1b2c3d", 0, 0.0)[1] is None
    assert s.begin_replay("t", None, None, 0.0)[1] is None


def test_seam_pull_respects_max_bytes_but_always_progresses() -> None:
    s = store()
    sent = fill(s, "t", 5)
    _, seam = s.begin_replay("t", "dc81257d", 0, 0.0)
    assert seam is not None
    assert seam.pull(max_bytes=1) == [sent[1]]
    assert seam.pull(max_bytes=len(sent[2]) + len(sent[3])) == sent[2:4]
    assert seam.pull(max_bytes=0) == [sent[4]] and not seam.pending


def test_seam_counts_a_gap_when_the_ring_overtakes_it() -> None:
    s = store(buffer_size=16)
    sent = fill(s, "t", 16)
    _, seam = s.begin_replay("t", "dc81257d", 0, 0.0)
    assert seam is not None
    assert seam.pull(max_count=2) == sent[1:3]
    more = fill(s, "t", 10)  # offsets 16..25: ring now holds 10..25, 3..9 lost
    got = seam.pull(max_count=100)
    assert seam.gaps == 1 and got == [*sent[10:], *more]


def test_seam_ends_honestly_when_its_buffer_disappears() -> None:
    s = store(ttl=5.0)
    sent = fill(s, "t", 4, now=0.0)
    _, seam = s.begin_replay("t", "dc81257d", 0, 0.0)
    assert seam is not None
    assert seam.pull(max_count=1) == [sent[1]]
    s.expire(6.0)
    assert seam.pull() == [] and not seam.pending and seam.gaps == 1


def test_seam_ends_at_the_first_live_message_of_a_newer_local_buffer() -> None:
    s = store(ttl=5.0)
    sent = fill(s, "t", 4, now=0.0)
    _, seam = s.begin_replay("t", "dc81257d", 0, 0.0)
    assert seam is not None and seam.pull(max_count=1) == [sent[1]]
    fresh = s.publish("t", b"{}", 6.0)  # idle past the TTL: new buffer, new epoch
    assert fresh is not None and fresh[1] != EPOCH and fresh[2] == 0
    assert seam.accept_live(fresh[1])  # sent live; offsets 2..3 of the old epoch are lost
    assert not seam.pending and seam.gaps == 1 and seam.pull() == []


def test_seam_no_gap_when_the_buffer_ended_where_the_replay_was() -> None:
    s = store(ttl=5.0)
    sent = fill(s, "t", 3, now=0.0)
    _, seam = s.begin_replay("t", "dc81257d", 0, 0.0)
    assert seam is not None and seam.pull(max_count=2) == sent[1:]
    # pull() saw the head: done. A hub keeping the seam longer still gets nothing twice.
    assert not seam.pending
    s2 = store(ttl=5.0)
    sent2 = fill(s2, "t", 3, now=0.0)
    _, seam2 = s2.begin_replay("t", "dc81257d", 0, 0.0)
    assert seam2 is not None and seam2.pull(max_count=1) == [sent2[1]]
    s2.publish("t", b"{}", 1.0)  # offset 3, held back (pending)
    assert seam2.pull(max_count=2) == [
        sent2[2],
        s2.recover("t", "dc81257d", 2, 1.0).messages[0],
    ]
    assert not seam2.pending and seam2.gaps == 0


def test_seam_delivers_through_the_published_client_without_gaps_or_duplicates() -> None:
    """wse-client 2.5.1's own sequencer sees a clean stream across a reconnect."""
    from wse_client.client import AsyncWSEClient

    client = AsyncWSEClient("ws://127.0.0.1:9/wse")
    seen: list[tuple[str, int]] = []
    gaps: list[str] = []
    client._dispatch_event = lambda ev: seen.append((ev.epoch, ev.offset))  # type: ignore[method-assign]
    client._on_recovery_gap = gaps.append  # type: ignore[method-assign]

    def deliver(frame: bytes) -> None:
        client._process_event(client._codec.decode(frame.decode()))

    s = store(buffer_size=64)
    for b in fill(s, "room", 5):
        deliver(b)
    fill(s, "room", 7)  # missed while disconnected: offsets 5..11
    state = client.recovery_state
    payload = {
        "action": "subscribe",
        "topics": ["room"],
        "recover": True,
        "recovery": {t: {"epoch": e, "offset": o} for t, (e, o) in state.items()},
    }
    req = parse_recovery_request(payload)
    epoch, offset = req.position("room")
    outcome_, seam = s.begin_replay("room", epoch, offset, 0.0)
    assert seam is not None
    rng = random.Random(3)
    while seam.pending:
        for b in seam.pull(max_count=rng.randint(1, 3)):
            deliver(b)
        res = s.publish("room", b'{"t":"x"}', 0.0)
        assert res is not None
        if not seam.pending or seam.accept_live(res[1]):
            deliver(res[0])
    for _ in range(3):
        res = s.publish("room", b'{"t":"x"}', 0.0)
        assert res is not None
        deliver(res[0])
    assert gaps == []
    assert seen == [("dc81257d", o) for o in range(len(seen))]
    assert seen[-1][1] == s.position("room")[1]  # type: ignore[index]
    reply = subscription_reply({"room": outcome_}, success_topics=["room"])
    assert reply["recovered"] is True and reply["recovery"]["room"]["count"] == 7


# ----------------------------------------------------------------- wire helpers (§3.3, §3.4)


def test_parse_request_gives_each_topic_its_own_position() -> None:
    # F10: the original's example app used the first topic's position for all.
    req = parse_recovery_request(
        {
            "action": "subscribe",
            "topics": ["room", "news", "room", "plain"],
            "recover": True,
            "recovery": {
                "room": {"epoch": "DC81257D", "offset": 41},
                "news": {"epoch": "0a1b2c3d", "offset": 7},
            },
        }
    )
    assert req.topics == ("room", "news", "plain") and req.recover
    assert dict(req.positions) == {"room": ("dc81257d", 41), "news": ("0a1b2c3d", 7)}
    assert req.position("plain") == (None, None) and not req.invalid


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ({"epoch": "zz", "offset": 1}, "Invalid epoch"),
        ({"epoch": None, "offset": 1}, "Invalid epoch"),
        ({"epoch": "1", "offset": -1}, "out of range"),
        ({"epoch": "1", "offset": MAX_OFFSET + 1}, "out of range"),
        ({"epoch": "1", "offset": "5"}, "Invalid recovery offset"),
        ({"epoch": "1", "offset": 2.0}, "Invalid recovery offset"),
        ({"epoch": "1", "offset": True}, "Invalid recovery offset"),
        ({"epoch": "1"}, "Invalid recovery offset"),
        ([1, 2], "must be an object"),
        ("x", "must be an object"),
    ],
)
def test_parse_request_marks_bad_positions(entry: Any, reason: str) -> None:
    req = parse_recovery_request(
        {
            "topics": ["a", "b"],
            "recover": True,
            "recovery": {"a": entry, "b": {"epoch": "2", "offset": 0}},
        }
    )
    assert reason in req.invalid["a"] and "a" not in req.positions
    assert req.positions["b"] == ("00000002", 0)


def test_parse_request_ignores_positions_without_recover_true_and_unknown_topics() -> None:
    base = {
        "topics": ["a"],
        "recovery": {"a": {"epoch": "1", "offset": 1}, "zz": {"epoch": "1", "offset": 1}},
    }
    for flag in (None, False, 1, "true"):
        req = parse_recovery_request({**base, "recover": flag} if flag is not None else base)
        assert not req.positions and not req.recover
    req = parse_recovery_request({**base, "recover": True})
    assert dict(req.positions) == {"a": ("00000001", 1)} and "zz" in req.invalid
    assert parse_recovery_request({"topics": ["a"], "recover": True}).positions == {}


@pytest.mark.parametrize(
    "payload",
    [
        None,
        [],
        "x",
        {},
        {"topics": "a"},
        {"topics": [1]},
        {"topics": ["a", None]},
        {"topics": ["a"], "recover": True, "recovery": ["a"]},
    ],
)
def test_parse_request_structural_errors(payload: Any) -> None:
    with pytest.raises(DecodeError):
        parse_recovery_request(payload)


@settings(max_examples=150)
@given(
    st.recursive(
        json_values,
        lambda x: st.dictionaries(
            st.sampled_from(["topics", "recover", "recovery", "a", "epoch", "offset"]),
            x,
            max_size=4,
        ),
        max_leaves=12,
    )
)
def test_parse_request_never_raises_anything_but_decode_error(payload: Any) -> None:
    try:
        req = parse_recovery_request(payload)
    except DecodeError:
        return
    for topic, (epoch, offset) in req.positions.items():
        assert topic in req.topics and len(epoch) == 8 and 0 <= offset <= MAX_OFFSET


def test_reply_shape() -> None:
    ok = RecoveryOutcome(True, 3, True, "dc81257d", 41)
    bad = RecoveryOutcome(False, 0, True, "0a1b2c3d", 9)
    reply = subscription_reply({"room": ok, "news": bad}, success_topics=["room", "news"])
    assert reply == {
        "action": "subscribe",
        "success": True,
        "success_topics": ["room", "news"],
        "failed_topics": [],
        "recoverable": True,
        "recovered": False,
        "recovery": {
            "room": {"epoch": "dc81257d", "offset": 41, "recovered": True, "count": 3},
            "news": {"epoch": "0a1b2c3d", "offset": 9, "recovered": False, "count": 0},
        },
    }
    assert subscription_reply({"room": ok}, success_topics=["room"])["recovered"] is True
    assert subscription_reply({}, success_topics=["room"])["recovered"] is False
    plain = subscription_reply(None, success_topics=[], failed_topics=["x"])
    assert plain == {
        "action": "subscribe",
        "success": False,
        "success_topics": [],
        "failed_topics": ["x"],
    }
    none = subscription_reply({"q": NOT_RECOVERABLE}, success_topics=["q"])
    assert none["recovery"]["q"] == {"epoch": None, "offset": 0, "recovered": False, "count": 0}


def test_reply_rebaselines_the_published_client() -> None:
    from wse_client.client import AsyncWSEClient
    from wse_client.types import WSEEvent

    client = AsyncWSEClient("ws://127.0.0.1:9/wse")
    s = store()
    fill(s, "room", 3)
    out = s.recover("room", "0a1b2c3d", 17, 0.0)  # stale epoch: not recovered
    reply = orjson.loads(orjson.dumps(subscription_reply({"room": out}, success_topics=["room"])))
    client._handle_subscription_update(WSEEvent(type="subscription_update", payload=reply))
    assert client._sequencer.topic_position("room") == ("dc81257d", 2)
    # the next live message (offset 3) is then in order, not a gap
    res = s.publish("room", b'{"t":"x"}', 0.0)
    assert res is not None
    ev = client._codec.decode(res[0].decode())
    assert client._sequencer.check_topic_stamp(ev.topic, ev.epoch, ev.offset) == "deliver"


def test_api_result_shape() -> None:
    s = store()
    fill(s, "a", 2)
    outs = {"a": s.recover("a", "dc81257d", 0, 0.0), "b": s.recover("b", "dc81257d", 0, 0.0)}
    assert recovery_result(outs) == {
        "recovered": False,
        "topics": {
            "a": {
                "epoch": "dc81257d",
                "offset": 1,
                "recoverable": True,
                "recovered": True,
                "count": 1,
            },
            "b": {"epoch": None, "offset": 0, "recoverable": False, "recovered": False, "count": 0},
        },
    }
    assert recovery_result({"a": outs["a"]})["recovered"] is True


def test_multi_topic_request_end_to_end() -> None:
    s = RecoveryStore(RecoveryConfig(), rand=seeded(5))
    positions = {}
    for topic, n in (("a", 4), ("b", 6)):
        fill(s, topic, n)
        positions[topic] = s.position(topic)
    fill(s, "a", 2)
    fill(s, "b", 1)
    req = parse_recovery_request(
        {
            "topics": ["a", "b", "c"],
            "recover": True,
            "recovery": {t: {"epoch": e, "offset": o} for t, (e, o) in positions.items()},  # type: ignore[misc]
        }
    )
    outs = {t: s.recover(t, *req.position(t), 0.0) for t in req.topics}
    assert [(t, o.recovered, o.count) for t, o in outs.items()] == [
        ("a", True, 2),
        ("b", True, 1),
        ("c", False, 0),
    ]


def test_stamped_offsets_are_contiguous_per_topic_under_mixed_publications() -> None:
    s = RecoveryStore(RecoveryConfig(buffer_size=16), rand=seeded(2))
    rng = random.Random(0)
    payloads = [b"{}", b"[]", b"x", b' {"a":1}', b"null", b'{"b":[1]}']
    counts = dict.fromkeys("xyz", 0)
    for t, p in zip(itertools.cycle("xyz"), (rng.choice(payloads) for _ in range(300))):
        res = s.publish(t, p, 0.0)
        if res is not None:
            assert res[2] == counts[t]
            counts[t] += 1

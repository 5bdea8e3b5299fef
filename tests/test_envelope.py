"""Unit and property tests of wse_proto.envelope beyond the vector file."""

from __future__ import annotations

import collections
import dataclasses
import datetime
import decimal
import enum
import json
import re
import uuid
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from wse_proto import envelope
from wse_proto.errors import LocalProtocolError

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# JSON values as orjson/serde can hold them (no NaN, ints within i64).
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=envelope.I64_MIN, max_value=envelope.I64_MAX)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
json_values_no_float = st.recursive(
    json_scalars.filter(lambda v: not isinstance(v, float)),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
type_names = st.sampled_from(
    [
        "server_ready",
        "error",
        "pong",
        "PONG",
        "ping",
        "order_snapshot",
        "snapshot_complete",
        "chat",
        "x_snapshotty",
        "snapshot_",
        "",
        "batch",
    ]
) | st.text(max_size=12)


def rand_zero(n: int) -> bytes:
    return bytes(n)


# --------------------------------------------------------------------------- categories


@SETTINGS
@given(type_names)
def test_category_rule(t: str) -> None:
    c = envelope.message_category(t)
    if "_snapshot" in t or t.startswith("snapshot_"):
        assert c == "S"
    elif t in {
        "server_ready",
        "server_hello",
        "client_hello_ack",
        "connection_state_change",
        "subscription_update",
        "error",
        "pong",
        "PONG",
    }:
        assert c == "WSE"
    else:
        assert c == "U"


# ---------------------------------------------------------------------- inject_category


def dump_styles(obj: dict[str, Any]) -> list[str]:
    """The shapes broadcasts arrive in: compact, json.dumps defaults, indented, ASCII-escaped."""
    return [
        json.dumps(obj, separators=(",", ":"), ensure_ascii=False),
        json.dumps(obj),
        json.dumps(obj, indent=2),
        json.dumps(obj, separators=(" , ", " : ")),
        " \n" + json.dumps(obj, ensure_ascii=True),
    ]


objects_with_t = st.dictionaries(
    st.text(max_size=5).filter(lambda k: k not in ("c", "t")), json_values, max_size=3
)


@SETTINGS
@given(objects_with_t, type_names, st.data())
def test_inject_adds_category_of_t(rest: dict[str, Any], t: str, data: st.DataObject) -> None:
    items = list(rest.items())
    position = data.draw(st.integers(min_value=0, max_value=len(items)))
    items.insert(position, ("t", t))
    obj = dict(items)
    for text in dump_styles(obj):
        out = envelope.inject_category(text)
        brace = text.index("{")
        category = envelope.message_category(t)
        # Only the member is inserted after the first brace; everything else is verbatim.
        assert out == f'{text[: brace + 1]}"c":"{category}",{text[brace + 1 :]}'
        assert json.loads(out) == {"c": category, **obj}
        assert envelope.inject_category(out) == out


@SETTINGS
@given(objects_with_t, json_values, st.booleans())
def test_existing_c_leaves_text_unchanged(rest: dict[str, Any], c: Any, with_t: bool) -> None:
    obj = {**rest, "c": c}
    if with_t:
        obj["t"] = "order_snapshot"
    for text in dump_styles(obj):
        assert envelope.inject_category(text) == text


@SETTINGS
@given(objects_with_t, json_values)
def test_non_string_t_gives_u(rest: dict[str, Any], t: Any) -> None:
    assume(not isinstance(t, str))
    text = json.dumps({"t": t, **rest}, separators=(",", ":"))
    assert envelope.inject_category(text) == '{"c":"U",' + text[1:]


@SETTINGS
@given(st.text() | st.text(alphabet=st.characters(exclude_categories=())))
def test_inject_never_raises_and_only_inserts(text: str) -> None:
    out = envelope.inject_category(text)
    if out != text:
        brace = text.index("{")
        assert re.fullmatch(r'"c":"(WSE|S|U)",', out[brace + 1 : brace + 1 + len(out) - len(text)])
        assert envelope.inject_category(out) == out


@SETTINGS
@given(json_values)
def test_inject_ignores_non_objects(value: Any) -> None:
    assume(not isinstance(value, dict))
    text = json.dumps(value)
    assert envelope.inject_category(text) == text


def test_inject_first_of_duplicate_t_even_after_big_values() -> None:
    big = json.dumps({"p": {"rows": [[i, str(i)] for i in range(200)]}})[:-1]
    text = big + ',"t":"a_snapshot","t":"chat"}'
    assert envelope.inject_category(text) == '{"c":"S",' + text[1:]


# ----------------------------------------------------------------------- normalize_keys


@SETTINGS
@given(
    st.dictionaries(st.sampled_from(["t", "type", "p", "payload", "x"]), json_values, max_size=5)
)
def test_normalize_keys(obj: dict[str, Any]) -> None:
    before = dict(obj)
    out = envelope.normalize_keys(obj)
    assert obj == before, "the argument is not modified"
    renames = {
        long: short
        for short, long in (("t", "type"), ("p", "payload"))
        if short not in obj and long in obj
    }
    # Same members in the same order, the renamed ones under their short name.
    assert list(out.items()) == [(renames.get(k, k), v) for k, v in obj.items()]


# ------------------------------------------------------------------------ format_ts/uuid7


@SETTINGS
@given(st.lists(st.integers(min_value=-62135596800000, max_value=253402300799999), max_size=8))
def test_format_ts_matches_datetime(values: list[int]) -> None:
    # Several calls in any order: the per-second cache must never leak a stale prefix.
    for wall_ms in values + values[::-1]:
        d = datetime.datetime(1970, 1, 1) + datetime.timedelta(milliseconds=wall_ms)
        expected = f"{d.year:04d}-{d:%m-%dT%H:%M:%S}.{d.microsecond // 1000:03d}Z"
        assert envelope.format_ts(wall_ms) == expected


def test_format_ts_below_range() -> None:
    with pytest.raises(LocalProtocolError):
        envelope.format_ts(-62135596800001)


@SETTINGS
@given(st.integers(min_value=0, max_value=(1 << 48) - 1), st.binary(min_size=10, max_size=10))
def test_uuid7_layout(wall_ms: int, rand: bytes) -> None:
    value = envelope.uuid7(wall_ms, lambda n: rand)
    u = uuid.UUID(value)
    assert str(u) == value
    assert u.version == 7 and u.variant == uuid.RFC_4122
    assert u.int >> 80 == wall_ms
    assert (u.int >> 64) & 0xFFF == int.from_bytes(rand[:2], "big") & 0xFFF
    assert u.int & ((1 << 62) - 1) == int.from_bytes(rand[2:], "big") & ((1 << 62) - 1)


def test_uuid7_orders_by_time_and_checks_rand() -> None:
    ids = [envelope.uuid7(ms, lambda n: b"\xff" * n) for ms in (1, 2, 1000, 1 << 40)]
    assert ids == sorted(ids)
    with pytest.raises(LocalProtocolError):
        envelope.uuid7(0, lambda n: b"\x00" * 9)


# -------------------------------------------------------------------- to_json_value


class Color(enum.Enum):
    RED = "r"


class Level(enum.IntEnum):
    HIGH = 8


class Kind(str, enum.Enum):  # noqa: UP042 - str() differs from the value here
    A = "a-value"


class Big(int):
    pass


@dataclasses.dataclass
class Point:
    x: int


class IsoNonStr:
    def isoformat(self) -> int:
        return 42


Pair = collections.namedtuple("Pair", "a b")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (Level.HIGH, 8),
        (Big(2**64), "18446744073709551616"),
        (Kind.A, "a-value"),
        (Color.RED, "Color.RED"),
        (Point(1), "Point(x=1)"),
        (collections.OrderedDict([(2, b"\x01")]), {"2": "01"}),
        (Pair(1, 2.5), [1, 2.5]),
        (IsoNonStr(), "42"),
        (datetime.time(1, 2, 3), "01:02:03"),
        (Decimal("NaN"), "NaN"),
        (bytearray(b"a"), "bytearray(b'a')"),
        ({Kind.A: 1}, {"a-value": 1}),
        (float("nan"), None),
        ([(), {}], [[], {}]),
    ],
    ids=repr,
)
def test_to_json_value_python_types(value: Any, expected: Any) -> None:
    out = envelope.to_json_value(value)
    assert out == expected
    assert type(out) is type(expected)


def test_to_json_value_cycle() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(LocalProtocolError):
        envelope.to_json_value(loop)
    with pytest.raises(LocalProtocolError):
        envelope.build_event({"t": "x", "p": loop}, wall_ms=0, rand=rand_zero, seq=0)
    with pytest.raises(LocalProtocolError):
        envelope.dumps_server({"p": loop})


python_values = st.recursive(
    json_scalars
    | st.integers()
    | st.binary(max_size=8)
    | st.floats()
    | st.decimals(allow_nan=False)
    | st.uuids()
    | st.datetimes(),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=4) | st.integers() | st.booleans(), inner, max_size=3)
    ),
    max_leaves=10,
)


@SETTINGS
@given(python_values)
def test_to_json_value_gives_json_and_is_idempotent(value: Any) -> None:
    out = envelope.to_json_value(value)
    assert envelope.to_json_value(out) == out
    assert orjson.loads(orjson.dumps(out)) == out  # plain JSON data, ints within 64 bits
    text = envelope.dumps_server(value)
    assert orjson.loads(text) == out


# ---------------------------------------------------------------------- dumps_server


def serde_float(f: float) -> str:
    """Reference float form written from the rules (shortest digits, ryu layout, e+)."""
    sign, digits, exponent = Decimal(repr(f)).normalize().as_tuple()
    assert isinstance(exponent, int)
    ds = "".join(map(str, digits)) or "0"
    if ds == "0":
        return ("-" if sign else "") + "0.0"
    k = exponent
    kk = len(ds) + k  # value = 0.ds * 10**kk
    prefix = "-" if sign else ""
    if k >= 0 and kk <= 16:
        return prefix + ds + "0" * k + ".0"
    if 0 < kk <= 16:
        return prefix + ds[:kk] + "." + ds[kk:]
    if -5 < kk <= 0:
        return prefix + "0." + "0" * -kk + ds
    e = kk - 1
    mantissa = ds[0] + ("." + ds[1:] if len(ds) > 1 else "")
    return f"{prefix}{mantissa}e{'+' if e >= 0 else '-'}{abs(e)}"


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1.0, "1.0"),
        (0.1, "0.1"),
        (-0.0, "-0.0"),
        (1e20, "1e+20"),
        (1.5e-7, "1.5e-7"),
        (1e16, "1e+16"),
        (1e15, "1000000000000000.0"),
        (123456789.12345679, "123456789.12345679"),
    ],
)
def test_reference_float_rule_matches_the_notes(value: float, text: str) -> None:
    assert serde_float(value) == text


@settings(max_examples=400, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_dumps_server_floats(f: float) -> None:
    assert envelope.dumps_server(f).decode() == serde_float(f)


@SETTINGS
@given(json_values_no_float)
def test_dumps_server_equals_sorted_compact_json(value: Any) -> None:
    # Without floats serde's form is exactly Python's sorted, compact, non-ASCII json.
    expected = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert envelope.dumps_server(value) == expected.encode()


@SETTINGS
@given(json_values)
def test_dumps_server_round_trip(value: Any) -> None:
    assert orjson.loads(envelope.dumps_server(value)) == value


def test_dumps_server_rejects_what_cannot_be_json() -> None:
    with pytest.raises(LocalProtocolError):
        envelope.dumps_server("\ud800")


# ----------------------------------------------------------------------- build_event


@SETTINGS
@given(
    st.dictionaries(st.text(max_size=4), json_values, max_size=4),
    st.one_of(st.none(), type_names, st.integers()),
    st.integers(min_value=0, max_value=253402300799999),
    st.integers(min_value=0, max_value=2**63 - 1),
)
def test_build_event_rules(extra: dict[str, Any], t: Any, wall_ms: int, seq: int) -> None:
    event: dict[str, Any] = dict(extra)
    if t is not None:
        event["t"] = t
    calls: list[int] = []

    def rand(n: int) -> bytes:
        calls.append(n)
        return bytes(range(n))

    env = envelope.build_event(event, wall_ms=wall_ms, rand=rand, seq=seq)
    if isinstance(t, str) and t:
        assert env["t"] == t and env["c"] == envelope.message_category(t)
    else:
        assert "t" not in env and env["c"] == "U"
    assert env["v"] == 1
    for key, value in event.items():
        if key not in ("c", "t", "v"):
            assert env[key] == envelope.to_json_value(value)
    assert env["seq"] == event.get("seq", seq)
    assert env["ts"] == event.get("ts", envelope.format_ts(wall_ms))
    if "id" in event:
        assert env["id"] == event["id"] and calls == []
    else:
        assert env["id"] == envelope.uuid7(wall_ms, lambda n: bytes(range(n))) and calls == [10]
    assert set(env) == set(event) - {"t"} | {"c", "v", "id", "seq", "ts"} | (
        {"t"} if "t" in env else set()
    )


def test_build_event_accepts_mappings_and_str_subclass_keys() -> None:
    event = collections.ChainMap({Kind.A: 1, "t": Kind.A}, {"p": {}})
    env = envelope.build_event(event, wall_ms=0, rand=rand_zero, seq=3)
    assert env["a-value"] == 1 and env["t"] == "a-value" and type(env["t"]) is str


# ------------------------------------------------------------------- control frames


@SETTINGS
@given(
    st.integers(min_value=0, max_value=253402300799999),
    st.integers(),
    st.integers(min_value=0, max_value=2**62),
)
def test_heartbeat_frames_satisfy_wse_client_prefix_check(
    wall_ms: int, client: int, server: int
) -> None:
    # wse-client 2.5.1 looks for these in the first 25 characters of a text frame (K2).
    assert '"t":"ping"' in envelope.server_ping(wall_ms).decode()[:25]
    frame = envelope.pong(client, server).decode()
    assert '"t":"PONG"' in frame[:25]
    p = json.loads(frame)["p"]
    expected_client = client if envelope.I64_MIN <= client <= envelope.I64_MAX else 0
    assert p["client_timestamp"] == expected_client
    assert p["latency"] == min(max(0, server - expected_client), envelope.I64_MAX)


def test_pong_ignores_non_integers() -> None:
    frame = json.loads(envelope.pong(True, 10))  # type: ignore[arg-type]
    assert frame["p"] == {"client_timestamp": 0, "server_timestamp": 10, "latency": 10}


@SETTINGS
@given(st.text().filter(lambda s: "\\" not in s and not any(ord(ch) < 0x20 for ch in s)))
def test_key_exchange_failed_is_json_for_plain_details(detail: str) -> None:
    frame = envelope.key_exchange_failed(detail)
    assert frame.startswith(b'{"c":"WSE","t":"error","p":{"code":"KEY_EXCHANGE_FAILED"')
    assert json.loads(frame)["p"]["message"] == "ECDH key exchange failed: " + detail


@SETTINGS
@given(st.text(), st.text(), st.booleans(), st.integers(min_value=0, max_value=253402300799999))
def test_server_ready_is_sorted_json(
    conn_id: str, user_id: str, recovery: bool, wall_ms: int
) -> None:
    frame = envelope.server_ready(
        conn_id=conn_id, user_id=user_id, recovery=recovery, wall_ms=wall_ms, rand=rand_zero
    )
    obj = json.loads(frame)
    assert frame == envelope.dumps_server(obj)
    assert obj["id"] == envelope.uuid7(wall_ms, rand_zero)
    details = obj["p"]["details"]
    assert (details["connection_id"], details["user_id"]) == (conn_id, user_id)
    assert details["features"]["recovery"] is recovery and obj["seq"] == 1
    assert obj["ts"] == details["server_time"] == envelope.format_ts(wall_ms)


def test_server_hello_encryption_flag_follows_the_key() -> None:
    common: dict[str, Any] = dict(
        conn_id="c",
        cluster=False,
        recovery=False,
        protocol_version=1,
        max_message_size=1,
        rate_limit_capacity=1.0,
        rate_limit_refill=1.0,
        ping_interval_s=0.25,
        wall_ms=0,
    )
    with_key = json.loads(envelope.server_hello(encryption_public_key="K", **common))
    without = json.loads(envelope.server_hello(encryption_public_key=None, **common))
    assert (
        with_key["p"]["features"]["encryption"] is True
        and with_key["p"]["encryption_public_key"] == "K"
    )
    assert (
        without["p"]["features"]["encryption"] is False
        and "encryption_public_key" not in without["p"]
    )
    assert without["p"]["ping_interval"] == 250
    assert {"id", "ts", "seq"}.isdisjoint(without)


def test_presence_event_converts_data() -> None:
    frame = envelope.presence_event(
        "presence_update", "u", {"b": b"\x01", 2: decimal.Decimal("1.5")}
    )
    assert (
        frame
        == b'{"c":"WSE","p":{"data":{"2":"1.5","b":"01"},"user_id":"u"},"t":"presence_update"}'
    )


def test_auth_messages() -> None:
    assert envelope.AUTH_REQUIRED_MESSAGE == "No JWT cookie or Authorization header"
    frame = json.loads(envelope.auth_error("AUTH_FAILED", envelope.AUTH_FAILED_MESSAGE, 1000))
    assert frame["p"] == {
        "code": "AUTH_FAILED",
        "message": "Authentication failed",
        "timestamp": "1970-01-01T00:00:01.000Z",
    }
    assert list(frame) == ["c", "p", "t", "v"]

"""Fuzz the recovery stamp splicer, epoch/offset parsing and the request parser.

The first byte picks the target:

- 0: ``stamp`` on the rest as the payload (topic and position fixed). The result
  must be None exactly for non-objects, start with the stamp, keep the rest of the
  payload byte for byte, and parse as JSON with ``tp``/``e``/``o`` first whenever the
  payload itself was a JSON object.
- 1: ``parse_epoch`` on the rest as text (surrogateescape, so any bytes); accepted
  values re-format to an equal epoch.
- 2: ``parse_recovery_request`` on the rest parsed as JSON (non-JSON is skipped);
  accepted positions are canonical.
- 3: a store driven by the rest as a list of operations (publish / recover / clock);
  the memory budget and offset contiguity must hold throughout.
"""

from __future__ import annotations

import json

import orjson

from wse_proto.recovery import (
    MAX_OFFSET,
    RecoveryConfig,
    RecoveryStore,
    format_epoch,
    parse_epoch,
    parse_recovery_request,
    stamp,
)

_PREFIX = b'{"tp":"room","e":"dc81257d","o":42'

SEEDS: list[bytes] = [
    b'\x00{"c":"U","t":"chat_message","p":{"x":1},"v":1}',
    b"\x00{}",
    b"\x00 \n{ }",
    b'\x00\t{"a":[1,{"b":null}]}',
    b"\x00[1,2]",
    b"\x00not json",
    b"\x01dc81257d",
    b"\x01+DC81257D",
    b"\x010000000000ff",
    b"\x01zz",
    b'\x02{"action":"subscribe","topics":["a","b"],"recover":true,'
    b'"recovery":{"a":{"epoch":"dc81257d","offset":41},"b":{"epoch":"x","offset":-1}}}',
    b'\x02{"topics":["a"],"recover":true,"recovery":{"a":{"epoch":"1","offset":18446744073709551615}}}',
    b"\x03\x00\x10\x01\x20\x02\x05\x03\x40\x00\x80",
]


def _stamp_target(payload: bytes) -> None:
    out = stamp("room", 0xDC81257D, 42, payload)
    stripped = payload.lstrip(b" \t\r\n")
    if not stripped.startswith(b"{"):
        assert out is None
        return
    assert out is not None and out.startswith(_PREFIX)
    rest = out[len(_PREFIX) :]
    body = stripped[1:]
    assert rest in (body, b"," + body)
    assert (rest == body) == (body.lstrip(b" \t\r\n")[:1] == b"}")
    try:  # NaN/Infinity kept as strings so that equal documents compare equal
        original = json.loads(payload.decode("utf-8"), parse_constant=str)
    except (ValueError, UnicodeDecodeError):
        return
    if isinstance(original, dict) and not ({"tp", "e", "o"} & original.keys()):
        decoded = json.loads(out.decode("utf-8"), parse_constant=str)
        assert list(decoded)[:3] == ["tp", "e", "o"]
        assert {k: v for k, v in decoded.items() if k not in ("tp", "e", "o")} == original


def _epoch_target(text: str) -> None:
    value = parse_epoch(text)
    assert 0 <= value <= 0xFFFFFFFF
    assert parse_epoch(format_epoch(value)) == value


def _request_target(data: bytes) -> None:
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        return
    req = parse_recovery_request(payload)
    for topic, (epoch, offset) in req.positions.items():
        assert topic in req.topics
        assert format_epoch(parse_epoch(epoch)) == epoch and 0 <= offset <= MAX_OFFSET
        assert topic not in req.invalid


def _store_target(data: bytes) -> None:
    store = RecoveryStore(
        RecoveryConfig(buffer_size=16, ttl=5.0, max_messages=8, memory_budget=300),
        rand=lambda n: bytes(n),
    )
    now = 0.0
    heads: dict[str, tuple[int, int]] = {}
    for i in range(0, len(data) - 1, 2):
        op, arg = data[i], data[i + 1]
        topic = f"t{op >> 4 & 3}"
        kind = op & 3
        if kind in (0, 1):
            # kind 1 publishes arg repeated: a non-object unless arg is "{"
            payload = b'{"p":"' + b"x" * arg + b'"}' if kind == 0 else bytes([arg]) * 3
            res = store.publish(topic, payload, now)
            if res is None:
                assert kind == 1 and arg != 0x7B
                continue
            _, epoch, offset = res
            prev = heads.get(topic)
            assert offset == 0 or (prev is not None and prev == (epoch, offset - 1))
            heads[topic] = (epoch, offset)
        elif kind == 2:
            pos = store.position(topic)
            if pos is not None:
                out = store.recover(topic, pos[0], max(pos[1] - arg % 20, 0), now)
                assert out.offset == pos[1] and len(out.messages) == out.count
        else:
            now += arg / 16
            store.expire(now)
        assert store.stats()[1] <= 300


def target(data: bytes) -> None:
    if not data:
        return
    which, body = data[0] & 3, data[1:]
    if which == 0:
        _stamp_target(body)
    elif which == 1:
        _epoch_target(body.decode("utf-8", "surrogateescape"))
    elif which == 2:
        _request_target(body)
    else:
        _store_target(body)

"""Unit and property tests of wse_proto.codec beyond the vector file."""

from __future__ import annotations

import dataclasses
import json
import math
import time
import zlib
from typing import Any

import msgpack
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wse_proto import codec, envelope
from wse_proto.errors import (
    DecodeError,
    DecryptionError,
    LocalProtocolError,
    PayloadTooLarge,
    WSEError,
)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=15,
)
RESERVED = {"c", "t", "p", "type", "payload", "id", "seq", "ts", "v"}
envelopes = st.builds(
    lambda t, p, extra, id_, seq, ts: {**extra, "t": t, "p": p, "id": id_, "seq": seq, "ts": ts},
    st.text(min_size=1, max_size=20),
    st.dictionaries(st.text(max_size=6), json_values, max_size=5),
    st.dictionaries(
        st.text(max_size=4).filter(lambda k: k not in RESERVED), json_values, max_size=3
    ),
    st.text(max_size=40),
    st.integers(min_value=0, max_value=2**63 - 1),
    st.text(max_size=30),
)


def built(event: dict[str, Any]) -> dict[str, Any]:
    return envelope.build_event(event, wall_ms=1795373022884, rand=lambda n: bytes(n), seq=1)


# ------------------------------------------------------------------------- Inbound


def test_inbound_is_frozen_and_compares_by_value() -> None:
    a = codec.Inbound("msg", {"t": "x"}, "x")
    assert a == codec.Inbound("msg", {"t": "x"}, "x")
    assert codec.Inbound("raw", "s") == codec.Inbound("raw", "s", None)
    assert a != codec.Inbound("msg", {"t": "x"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.kind = "raw"  # type: ignore[misc]
    assert not hasattr(a, "__dict__")
    assert repr(a) == "Inbound(kind='msg', value={'t': 'x'}, raw_type='x')"


# ------------------------------------------------------------------- round trips


@SETTINGS
@given(envelopes, st.sampled_from(["json", "zlib", "msgpack"]))
def test_encode_then_client_decode_round_trip(event: dict[str, Any], form: str) -> None:
    env = built(event)
    payload, binary = codec.encode_event(
        env, msgpack=form == "msgpack", compression_threshold=1 if form == "zlib" else 0
    )
    assert binary is True
    assert payload[:2] == {"json": b'{"', "zlib": b"C:", "msgpack": b"M:"}[form]
    (decoded,) = codec.decode_server_message(payload)
    expected = orjson.loads(envelope.dumps_server(env))
    if not expected["p"]:
        expected["p"] = {}
    assert decoded == expected


@SETTINGS
@given(envelopes, st.lists(st.integers(min_value=0, max_value=4000), max_size=5))
def test_zlib_flush_points_do_not_matter(event: dict[str, Any], cuts: list[int]) -> None:
    body = envelope.dumps_server(built(event))
    squeezer = zlib.compressobj(1)
    stream = b""
    start = 0
    for cut in sorted({min(c, len(body)) for c in cuts}):
        stream += squeezer.compress(body[start:cut]) + squeezer.flush(zlib.Z_SYNC_FLUSH)
        start = cut
    stream += squeezer.compress(body[start:]) + squeezer.flush()
    assert codec.zlib_decompress(stream, len(body)) == body
    assert codec.decode_server_message(b"C:" + stream) == codec.decode_server_message(body)


@SETTINGS
@given(envelopes)
def test_send_event_form_is_sorted_and_compact(event: dict[str, Any]) -> None:
    env = built(event)
    payload, _ = codec.encode_event(env, msgpack=False, compression_threshold=0)
    assert payload == envelope.dumps_server(env)
    unpacked = msgpack.unpackb(
        codec.encode_event(env, msgpack=True, compression_threshold=0)[0][2:]
    )

    def keys_sorted(value: Any) -> bool:
        if isinstance(value, dict):
            keys = [k.encode() for k in value]
            return keys == sorted(keys) and all(keys_sorted(v) for v in value.values())
        if isinstance(value, list):
            return all(keys_sorted(v) for v in value)
        return True

    assert keys_sorted(unpacked)


def test_threshold_boundary() -> None:
    env = {"t": "x", "p": {"s": "x" * 100}}
    body = envelope.dumps_server(env)
    assert codec.encode_event(env, msgpack=False, compression_threshold=len(body)) == (body, True)
    payload, _ = codec.encode_event(env, msgpack=False, compression_threshold=len(body) - 1)
    assert payload[:4] == b"C:\x78\x01" and zlib.decompress(payload[2:]) == body


def test_encode_event_rejects_unencodable() -> None:
    with pytest.raises(LocalProtocolError):
        codec.encode_event({"t": "\udc80"}, msgpack=False, compression_threshold=0)
    with pytest.raises(LocalProtocolError):
        codec.encode_event({"t": "\udc80"}, msgpack=True, compression_threshold=0)


# --------------------------------------------------------- server-side inbound


prefixes = st.sampled_from(["", "WSE", "S", "U", "W", "{", " "])


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(),
        st.text(alphabet=st.characters(exclude_categories=())),  # lone surrogates included
        st.builds(lambda p, v: p + json.dumps(v), prefixes, json_values),
    )
)
def test_decode_client_text_never_raises(text: str) -> None:
    inbound = codec.decode_client_text(text)
    if inbound.kind == "raw":
        assert inbound.value == text and inbound.raw_type is None
    else:
        assert inbound.kind == "msg" and isinstance(inbound.value, dict)
        body = envelope.strip_legacy_prefix(text)[1]
        parsed = json.loads(body)
        assert inbound.value == envelope.normalize_keys(parsed)
        t = parsed.get("t")
        assert inbound.raw_type == (t if isinstance(t, str) else None)


@SETTINGS
@given(st.dictionaries(st.text(max_size=6), json_values, max_size=5), prefixes)
def test_decode_client_text_objects(obj: dict[str, Any], prefix: str) -> None:
    text = prefix + json.dumps(obj, separators=(",", ":"))
    inbound = codec.decode_client_text(text)
    if prefix in ("", "WSE", "S", "U"):
        assert inbound == codec.Inbound(
            "msg",
            envelope.normalize_keys(obj),
            obj.get("t") if isinstance(obj.get("t"), str) else None,
        )
    else:
        assert inbound == codec.Inbound("raw", text)


def test_decode_client_plaintext() -> None:
    assert codec.decode_client_plaintext(b'{"t":"ping","p":{}}') == codec.Inbound(
        "msg", {"t": "ping", "p": {}}
    ), "encrypted ping is not intercepted (raw_type None)"
    assert codec.decode_client_plaintext(b'WSE{"type":"x"}') == codec.Inbound("msg", {"t": "x"})
    assert codec.decode_client_plaintext(b"hello") == codec.Inbound("raw", "hello")
    assert codec.decode_client_plaintext(b'{"t":') is None, "bad JSON is dropped (ref §4.4)"
    assert codec.decode_client_plaintext(b"S{nope") is None
    assert codec.decode_client_plaintext(b"\xff\xfe") is None, "invalid UTF-8 is dropped"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.booleans())
def test_decode_client_binary_never_raises(data: bytes, mp: bool) -> None:
    inbound = codec.decode_client_binary(data, msgpack=mp)
    assert inbound.raw_type is None
    if inbound.kind == "bin":
        assert inbound.value == data
    else:
        assert mp and inbound.kind == "msg"


def nest(depth: int, kinds: list[bool]) -> tuple[bytes, Any]:
    """``depth`` containers, each an array or a one-key map, around an empty array."""
    data = b""
    value: Any = []
    for i in range(depth - 1):
        if kinds[i % len(kinds)]:
            data += b"\x91"
        else:
            data += b"\x81\xa1k"
    data += b"\x90"
    for i in reversed(range(depth - 1)):
        value = [value] if kinds[i % len(kinds)] else {"k": value}
    return data, value


@SETTINGS
@given(st.integers(min_value=1, max_value=100), st.lists(st.booleans(), min_size=1, max_size=5))
def test_msgpack_depth_limit(depth: int, kinds: list[bool]) -> None:
    data, value = nest(depth, kinds)
    inbound = codec.decode_client_binary(data, msgpack=True)
    if depth <= 64:
        assert inbound == codec.Inbound("msg", value)
    else:
        assert inbound == codec.Inbound("bin", data)


def test_msgpack_many_containers_but_shallow() -> None:
    # 200 container headers but depth 2: the cheap pre-count must not reject it.
    data = msgpack.packb([[] for _ in range(199)])
    assert codec.msgpack_loads(data) == [[] for _ in range(199)]
    wide_deep = msgpack.packb([[[]] * 70, 1])
    assert codec.msgpack_loads(wide_deep) == [[[]] * 70, 1]


# msgpack values of every kind, including what needs mapping.
mp_keys = (
    st.text(max_size=4)
    | st.integers(min_value=-5, max_value=5)
    | st.binary(max_size=3)
    | st.booleans()
)
mp_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=6)
    | st.builds(msgpack.ExtType, st.integers(min_value=0, max_value=127), st.binary(max_size=5)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(mp_keys, inner, max_size=4),
    max_leaves=15,
)


def reference(value: Any, key: bool = False) -> Any:
    """The ref §5.2 mapping written independently of the codec."""
    if isinstance(value, dict):
        return {k if isinstance(k, str) else key_text(k): reference(v) for k, v in value.items()}
    if isinstance(value, list):
        return [reference(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, msgpack.ExtType):
        return value.data.hex()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def key_text(k: Any) -> str:
    if isinstance(k, bool):
        return "true" if k else "false"
    if isinstance(k, bytes):
        return "[" + ", ".join(str(b) for b in k) + "]"
    return str(k)


@SETTINGS
@given(mp_values)
def test_msgpack_mapping(value: Any) -> None:
    data = msgpack.packb(value, use_bin_type=True)
    # Python dicts merge True and 1 as keys; the wire keeps both: compare with what was packed.
    unpacked = msgpack.unpackb(
        data, raw=False, strict_map_key=False, timestamp=0, ext_hook=msgpack.ExtType
    )
    assert codec.msgpack_loads(data) == reference(unpacked)
    slow, end = codec._py_value(data, 0, 0, 64, False)
    assert end == len(data) and slow == reference(unpacked), "fast and pure-Python paths agree"


@SETTINGS
@given(mp_values, st.binary(min_size=1, max_size=5))
def test_msgpack_trailing(value: Any, tail: bytes) -> None:
    data = msgpack.packb(value, use_bin_type=True)
    first = codec.msgpack_loads(data)
    with pytest.raises(DecodeError):
        codec.msgpack_loads(data + tail)
    assert codec.msgpack_loads(data + tail, allow_trailing=True) == first


@SETTINGS
@given(mp_values, st.data())
def test_msgpack_truncation_always_detected(value: Any, data: st.DataObject) -> None:
    packed = msgpack.packb(value, use_bin_type=True)
    cut = data.draw(st.integers(min_value=0, max_value=len(packed) - 1))
    with pytest.raises(DecodeError):
        codec.msgpack_loads(packed[:cut])
    assert codec.decode_client_binary(packed[:cut], msgpack=True).kind == "bin"


# ---------------------------------------------------------------- client side


def only_wse_errors(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except WSEError:
        return None


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.builds(
            lambda p, b: p + b,
            st.sampled_from([b"C:", b"M:", b"E:", b"\x78\x9c", b"\x78\x01", b"{"]),
            st.binary(max_size=200),
        ),
        st.builds(lambda b: b"C:" + zlib.compress(b), st.binary(max_size=200)),
    )
)
def test_decoders_raise_only_wse_errors(data: bytes) -> None:
    only_wse_errors(codec.decode_server_message, data)
    only_wse_errors(codec.decode_server_message, data, decrypt=lambda f: f[2:])
    only_wse_errors(codec.decode_server_message, data, max_size=50)
    only_wse_errors(codec.zlib_decompress, data, 100)
    only_wse_errors(codec.msgpack_loads, data)
    text = data.decode("utf-8", "replace")
    only_wse_errors(codec.decode_server_message, text)


def test_decrypt_callable_errors() -> None:
    frame = b"E:" + bytes(40)

    def raises_wse(frame: bytes) -> bytes:
        raise DecryptionError("tag mismatch")

    def raises_other(frame: bytes) -> bytes:
        raise ValueError("boom")

    with pytest.raises(DecryptionError, match="tag mismatch"):
        codec.decode_server_message(frame, decrypt=raises_wse)
    with pytest.raises(DecryptionError) as info:
        codec.decode_server_message(frame, decrypt=raises_other)
    assert isinstance(info.value.__cause__, ValueError)
    seen: list[bytes] = []

    def as_text(frame: bytes) -> str:  # a decrypt returning str is accepted too
        seen.append(frame)
        return 'U{"t":"x"}'

    assert codec.decode_server_message(frame, decrypt=as_text) == [{"t": "x", "c": "U", "p": {}}]
    assert seen == [frame], "decrypt gets the whole frame, prefix included"


def test_bytes_like_inputs() -> None:
    body = b'{"t":"x","p":{"a":1}}'
    expected = [{"t": "x", "p": {"a": 1}}]
    assert codec.decode_server_message(bytearray(body)) == expected
    assert codec.decode_server_message(memoryview(body)) == expected
    assert codec.decode_client_binary(bytearray(b"\x01"), msgpack=True) == codec.Inbound("msg", 1)
    assert codec.decode_client_binary(memoryview(b"ab"), msgpack=False) == codec.Inbound(
        "bin", b"ab"
    )


def test_decompression_bomb_is_cut_off_early() -> None:
    squeezer = zlib.compressobj(9)
    chunk = bytes(1 << 20)
    bomb = b"".join(squeezer.compress(chunk) for _ in range(64)) + squeezer.flush()  # 64 MiB
    assert len(bomb) < 100_000
    started = time.perf_counter()
    with pytest.raises(PayloadTooLarge):
        codec.decode_server_message(b"C:" + bomb)
    with pytest.raises(PayloadTooLarge):
        codec.zlib_decompress(bomb, 1 << 20)
    assert time.perf_counter() - started < 2.0, "stops at the cap instead of inflating 64 MiB"
    with pytest.raises(LocalProtocolError):
        codec.zlib_decompress(bomb, -1)


def test_client_decode_sizes_use_the_cap() -> None:
    text = json.dumps({"t": "x", "p": {"k": "a" * 100}})
    assert codec.decode_server_message(text, max_size=len(text))[0]["t"] == "x"
    with pytest.raises(PayloadTooLarge):
        codec.decode_server_message(text, max_size=len(text) - 1)
    with pytest.raises(PayloadTooLarge):
        codec.decode_server_message(text.encode(), max_size=len(text) - 1)


@SETTINGS
@given(
    st.lists(
        st.dictionaries(st.sampled_from(["t", "p", "id", "x"]), json_values, max_size=4), max_size=6
    ),
    st.sampled_from(["", "WSE", "S", "U"]),
)
def test_batches_expand(items: list[dict[str, Any]], prefix: str) -> None:
    batch = {"c": "WSE", "t": "batch", "p": {"messages": items, "count": len(items)}}
    events = codec.decode_server_message(prefix + json.dumps(batch))
    expected = []
    for item in items:
        t = item.get("t") or "unknown"
        p = item.get("p") or {}
        if t == "batch" and isinstance(p, dict) and "messages" in p:
            continue
        ev = {**item, "t": t, "p": p if isinstance(p, dict) else {"data": p}}
        if prefix:
            ev["c"] = prefix
        expected.append(ev)
    assert events == expected


def test_non_object_messages_are_errors() -> None:
    for frame in ("5", "null", '"x"', "[]", b"\x93\x01\x02\x03", b"M:\x01"):
        with pytest.raises(DecodeError):
            codec.decode_server_message(frame)

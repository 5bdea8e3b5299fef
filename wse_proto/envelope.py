"""Envelope rules: categories, key normalisation, the server's JSON byte form, the
Python -> JSON conversion of ``send_event``, timestamps, UUIDv7 and the control frames.

Everything here must reproduce the original server's bytes (wse-server 2.5.1), so each
rule cites the section of the reference notes it implements (``ref §N``, the wire facts
that ``spec/PROTOCOL.md`` was written from). Time and randomness come in as arguments.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from collections.abc import Mapping
from typing import Any, Final

import orjson

from ._defaults import RandFn
from .errors import LocalProtocolError

__all__ = [
    "AUTH_FAILED_MESSAGE",
    "AUTH_MISSING_SUB_MESSAGE",
    "AUTH_REQUIRED_MESSAGE",
    "auth_error",
    "build_event",
    "dumps_server",
    "format_ts",
    "inject_category",
    "message_category",
    "normalize_keys",
    "ping_client_timestamp",
    "pong",
    "presence_event",
    "rate_limit_warning",
    "rate_limited",
    "server_hello",
    "server_ping",
    "server_ready",
    "strip_legacy_prefix",
    "to_json_value",
    "uuid7",
]

I64_MIN: Final = -(1 << 63)
I64_MAX: Final = (1 << 63) - 1

# Auth error messages as the original words them (ref §1.3).
AUTH_REQUIRED_MESSAGE: Final = "No JWT cookie or Authorization header"
AUTH_FAILED_MESSAGE: Final = "Authentication failed"
AUTH_MISSING_SUB_MESSAGE: Final = "Token missing user ID"

# --------------------------------------------------------------------------------------
# Categories (ref §2.5)

_WSE_TYPES: Final = frozenset(
    {
        "server_ready",
        "server_hello",
        "client_hello_ack",
        "connection_state_change",
        "subscription_update",
        "error",
        "pong",
        "PONG",
        "snapshot_complete",  # listed by the original, but the S rule below wins
    }
)


def message_category(t: str) -> str:
    """The ``c`` of a message type: ``"S"``, ``"WSE"`` or ``"U"`` (ref §2.5).

    The snapshot rule is checked first, so ``snapshot_complete`` is ``S``.
    """
    if "_snapshot" in t or t.startswith("snapshot_"):
        return "S"
    if t in _WSE_TYPES:
        return "WSE"
    return "U"


# --------------------------------------------------------------------------------------
# inject_category (ref §2.5, decision F1)

_WS = re.compile(r"[ \t\n\r]*")
_raw_decode = json.JSONDecoder().raw_decode
_MISSING: Final = object()


def _skip_ws(text: str, pos: int) -> int:
    m = _WS.match(text, pos)
    return m.end() if m else pos


def _first_top_level(text: str, key: str) -> Any:
    """Value of the first top-level member named ``key`` of an already validated object.

    Needed because a JSON parser keeps the *last* duplicate, while the original reads the
    first one; values before it are skipped with the C scanner of :mod:`json`.
    """
    pos = _skip_ws(text, text.index("{") + 1)
    while text[pos] != "}":
        name, pos = _raw_decode(text, pos)
        pos = _skip_ws(text, _skip_ws(text, pos) + 1)  # past ':'
        value, pos = _raw_decode(text, pos)
        if name == key:
            return value
        pos = _skip_ws(text, pos)
        if text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
    return _MISSING


def inject_category(text: str) -> str:
    """Add ``"c":"<category>",`` right after the opening brace of a broadcast text.

    The original (ref §2.5) matched raw byte patterns, so its result depended on the
    whitespace and escaping of the input. Decision F1 (spec/DECISIONS.md): top-level keys
    are found with JSON whitespace allowed, the category comes from the decoded value of
    the first top-level ``t`` (a non-string ``t`` gives ``"U"``), an existing top-level
    ``c`` leaves the text unchanged, and so do a missing ``t``, non-object JSON and text
    that does not parse. For compact input the output is byte-identical to the original.
    """
    try:
        obj = orjson.loads(text)
    except ValueError:
        return text
    if type(obj) is not dict or "c" in obj or "t" not in obj:
        return text
    try:
        t = _first_top_level(text, "t")
    except (ValueError, IndexError, RecursionError):  # pragma: no cover - parsers disagree
        t = _MISSING
    if t is _MISSING:  # pragma: no cover - orjson saw the key, so the scan finds it
        t = obj["t"]
    category = message_category(t) if isinstance(t, str) else "U"
    brace = text.index("{") + 1
    return f'{text[:brace]}"c":"{category}",{text[brace:]}'


# --------------------------------------------------------------------------------------
# Inbound helpers (ref §2.6, §2.8)


def strip_legacy_prefix(text: str) -> tuple[str | None, str]:
    """Split a legacy category prefix (``WSE{``, ``S{``, ``U{``) off a JSON text (ref §2.6).

    Returns ``(category or None, json_text)``; the brace stays with the JSON.
    """
    if text.startswith("WSE{"):
        return "WSE", text[3:]
    if text.startswith("S{"):
        return "S", text[1:]
    if text.startswith("U{"):
        return "U", text[1:]
    return None, text


def normalize_keys(obj: dict[str, Any]) -> dict[str, Any]:
    """Server inbound renaming ``type`` -> ``t`` and ``payload`` -> ``p`` (ref §2.8).

    Top level only, each rename only when the short key is absent. The argument is not
    modified: a new dict (same member order) is returned when something is renamed.
    """
    rename_t = "t" not in obj and "type" in obj
    rename_p = "p" not in obj and "payload" in obj
    if not (rename_t or rename_p):
        return obj
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if rename_t and key == "type":
            key = "t"
        elif rename_p and key == "payload":
            key = "p"
        out[key] = value
    return out


# --------------------------------------------------------------------------------------
# Timestamps and ids (ref §2.1)

_EPOCH: Final = _dt.datetime(1970, 1, 1)
_ts_last: tuple[int, str] = (0, "1970-01-01T00:00:00")


def format_ts(wall_ms: int) -> str:
    """RFC 3339 UTC with exactly three fractional digits and ``Z`` (ref §2.1)."""
    global _ts_last
    seconds, millis = divmod(wall_ms, 1000)
    last_seconds, prefix = _ts_last
    if seconds != last_seconds:
        try:
            d = _EPOCH + _dt.timedelta(seconds=seconds)
        except OverflowError:
            raise LocalProtocolError(f"timestamp out of range: {wall_ms} ms") from None
        prefix = (
            f"{d.year:04d}-{d.month:02d}-{d.day:02d}T{d.hour:02d}:{d.minute:02d}:{d.second:02d}"
        )
        _ts_last = (seconds, prefix)  # one tuple, replaced atomically
    return f"{prefix}.{millis:03d}Z"


def uuid7(wall_ms: int, rand: RandFn) -> str:
    """An RFC 9562 UUIDv7 string for ``wall_ms`` from 10 bytes of ``rand``.

    Layout: 48-bit ms timestamp, version 7, ``rand_a`` = low 12 bits of bytes 0-1,
    variant ``10``, ``rand_b`` = low 62 bits of bytes 2-9 (both big-endian).
    """
    if not 0 <= wall_ms < 1 << 48:
        raise LocalProtocolError(f"UUIDv7 timestamp out of range: {wall_ms} ms")
    r = rand(10)
    if len(r) != 10:
        raise LocalProtocolError("rand(10) must return 10 bytes")
    raw = wall_ms.to_bytes(6, "big") + bytes((0x70 | (r[0] & 0x0F), r[1], 0x80 | (r[2] & 0x3F)))
    h = (raw + r[3:]).hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# --------------------------------------------------------------------------------------
# Python -> JSON conversion of send_event (ref §2.2)


def _key(key: object) -> str:
    if type(key) is str:
        return key
    if isinstance(key, str):
        return str.__str__(key)
    return _plain_str(key)


def _plain_str(obj: object) -> str:
    try:
        return str(obj)
    except ValueError as exc:  # e.g. an int beyond sys.get_int_max_str_digits()
        raise LocalProtocolError(f"cannot convert value to a string: {exc}") from None


def _conv(obj: Any) -> Any:
    t = type(obj)
    if t is str or obj is None or t is bool:
        return obj
    if t is int:
        return obj if I64_MIN <= obj <= I64_MAX else _plain_str(obj)
    if t is float:
        return obj if math.isfinite(obj) else None
    if t is dict:
        return {_key(k): _conv(v) for k, v in obj.items()}
    if t is list or t is tuple:
        return [_conv(v) for v in obj]
    return _conv_other(obj)


def _conv_other(obj: Any) -> Any:
    """Subclasses and foreign types, in the original's order of checks."""
    if isinstance(obj, int):  # int subclasses such as IntEnum keep their integer value
        value = int.__index__(obj)
        return value if I64_MIN <= value <= I64_MAX else _plain_str(value)
    if isinstance(obj, float):
        number = float.__float__(obj)
        return number if math.isfinite(number) else None
    if isinstance(obj, str):
        return str.__str__(obj)
    if isinstance(obj, dict):
        return {_key(k): _conv(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_conv(v) for v in obj]
    if isinstance(obj, bytes):
        return obj.hex()
    isoformat = getattr(obj, "isoformat", None)
    if callable(isoformat):
        result = isoformat()
        return result if type(result) is str else _plain_str(result)
    return _plain_str(obj)


def to_json_value(obj: object) -> Any:
    """Convert a Python value like ``send_event`` does (ref §2.2).

    bool/None/str/finite float as is (NaN and infinities become null); ints outside i64
    become their decimal string; dict keys that are not strings are stringified with
    ``str()``; list/tuple -> array; bytes -> lowercase hex; objects with ``isoformat()``
    -> its result; anything else -> ``str(obj)``. Raises LocalProtocolError on cycles.
    """
    try:
        return _conv(obj)
    except RecursionError:
        raise LocalProtocolError("value nested too deeply (or cyclic)") from None


# --------------------------------------------------------------------------------------
# The server's JSON byte form (ref §2.2, decision K1)

_DUMPS_OPTS: Final = (
    orjson.OPT_SORT_KEYS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)


def dumps_server(obj: Any) -> bytes:
    """Serialise like the original's serde_json: keys sorted by byte order at every level,
    compact, raw UTF-8, lowercase ``\\u00XX`` control escapes, ``/`` unescaped, floats in
    the shortest round-trip form (``1.0``, ``1e+20``, ``1.5e-7``), NaN/inf as ``null``.

    orjson (>= 3.10) writes exactly these forms. Values it cannot serialise as they are
    (bytes, datetimes, subclasses, non-string keys, ints beyond 64 bits) are converted by
    :func:`to_json_value` first; only what that cannot fix raises LocalProtocolError.
    """
    try:
        return orjson.dumps(obj, default=_conv_other, option=_DUMPS_OPTS)
    except orjson.JSONEncodeError:
        pass
    try:
        return orjson.dumps(to_json_value(obj), option=_DUMPS_OPTS)
    except orjson.JSONEncodeError as exc:
        raise LocalProtocolError(f"not serialisable as JSON: {exc}") from None


# --------------------------------------------------------------------------------------
# send_event envelopes (ref §2.3)


def build_event(
    event: Mapping[str, Any], *, wall_ms: int, rand: RandFn, seq: int
) -> dict[str, Any]:
    """The envelope ``send_event`` sends for ``event`` (ref §2.3 steps 3-6).

    ``c`` is derived from ``t`` (any ``c`` given is ignored); ``t`` is kept only when it is
    a non-empty string; every other string key is copied through :func:`to_json_value`
    (non-string top-level keys are dropped); ``v`` is forced to 1; a missing ``id`` gets a
    UUIDv7, a missing ``ts`` the time ``wall_ms``, a missing ``seq`` the value ``seq``.
    The caller advances its global counter only when the event had no ``seq``.
    """
    out: dict[str, Any] = {}
    t = event.get("t")
    if isinstance(t, str) and t:
        out["c"] = message_category(t)
        out["t"] = t if type(t) is str else str.__str__(t)
    else:
        out["c"] = "U"
    try:
        for key, value in event.items():
            if type(key) is not str:
                if not isinstance(key, str):
                    continue  # ref §2.2: top-level non-string keys are dropped
                key = str.__str__(key)
            if key == "c" or key == "t":
                continue
            out[key] = _conv(value)
    except RecursionError:
        raise LocalProtocolError("event nested too deeply (or cyclic)") from None
    out["v"] = 1
    if "id" not in out:
        out["id"] = uuid7(wall_ms, rand)
    if "seq" not in out:
        out["seq"] = seq
    if "ts" not in out:
        out["ts"] = format_ts(wall_ms)
    return out


# --------------------------------------------------------------------------------------
# Control frames (ref §3.1). The literal ones keep the original's member order (K2):
# wse-client 2.5.1 looks for '"t":"ping"' / '"t":"PONG"' in the first 25 characters.

_RATE_LIMITED: Final = (
    b'{"c":"WSE","t":"error","p":{"code":"RATE_LIMITED",'
    b'"message":"Rate limit exceeded","retry_after":1.0},"v":1}'
)


def server_ping(wall_ms: int) -> bytes:
    """The server heartbeat text (no ``v``, no ``id``)."""
    return f'{{"c":"WSE","t":"ping","p":{{"server_time":"{format_ts(wall_ms)}"}}}}'.encode()


def ping_client_timestamp(msg: Any) -> int:
    """``p.timestamp`` of a client ``ping`` if it is an i64 integer, else 0 (ref §3.1)."""
    if type(msg) is dict:
        p = msg.get("p")
        if type(p) is dict:
            ts = p.get("timestamp")
            if type(ts) is int and I64_MIN <= ts <= I64_MAX:
                return ts
    return 0


def pong(client_timestamp: int, server_ms: int) -> bytes:
    """Reply to a client JSON ``ping``; ``latency = max(0, server - client)``.

    A ``client_timestamp`` that is not an i64 integer is sent as 0, as the original does.
    """
    if type(client_timestamp) is not int or not I64_MIN <= client_timestamp <= I64_MAX:
        client_timestamp = 0
    latency = min(max(0, server_ms - client_timestamp), I64_MAX)
    return (
        f'{{"c":"WSE","t":"PONG","p":{{"client_timestamp":{client_timestamp},'
        f'"server_timestamp":{server_ms},"latency":{latency}}},"v":1}}'
    ).encode()


def rate_limited() -> bytes:
    """The ``RATE_LIMITED`` error a limited ``send_event`` produces."""
    return _RATE_LIMITED


def rate_limit_warning(current_rate: int, limit: int, remaining: int) -> bytes:
    """The outbound rate limiter's warning (fields in the original's order)."""
    return (
        f'{{"c":"WSE","t":"rate_limit_warning","p":{{"current_rate":{int(current_rate)},'
        f'"limit":{int(limit)},"remaining":{int(remaining)},"retry_after":1.0}},"v":1}}'
    ).encode()


def key_exchange_failed(detail: str) -> bytes:
    """``KEY_EXCHANGE_FAILED`` error (no ``v``). As in the original only ``"`` is escaped
    in ``detail``; the details we produce contain no backslash or control character."""
    detail = detail.replace('"', '\\"')
    return (
        '{"c":"WSE","t":"error","p":{"code":"KEY_EXCHANGE_FAILED",'
        f'"message":"ECDH key exchange failed: {detail}","recoverable":true}}}}'
    ).encode()


def auth_error(code: str, message: str, wall_ms: int) -> bytes:
    """The one ``error`` frame sent before closing with 4401 (ref §1.3)."""
    return dumps_server(
        {
            "c": "WSE",
            "p": {"code": code, "message": message, "timestamp": format_ts(wall_ms)},
            "t": "error",
            "v": 1,
        }
    )


def server_ready(
    *,
    conn_id: str,
    user_id: str,
    recovery: bool,
    wall_ms: int,
    rand: RandFn,
    msg_id: str | None = None,
) -> bytes:
    """First frame after a successful JWT check (ref §3.1, K5). ``seq`` is always 1 and
    ``encryption`` always false here; ``msg_id`` overrides the UUIDv7 (for replays)."""
    ts = format_ts(wall_ms)
    return dumps_server(
        {
            "c": "WSE",
            "id": msg_id if msg_id is not None else uuid7(wall_ms, rand),
            "p": {
                "details": {
                    "connection_id": conn_id,
                    "features": {
                        "batching": True,
                        "circuit_breaker": True,
                        "compression": True,
                        "encryption": False,
                        "priority_queue": True,
                        "recovery": bool(recovery),
                        "rust_jwt": True,
                        "rust_transport": True,
                    },
                    "server_time": ts,
                    "user_id": user_id,
                    "version": 1,
                },
                "message": "Connection established (Rust transport)",
            },
            "seq": 1,
            "t": "server_ready",
            "ts": ts,
            "v": 1,
        }
    )


def server_hello(
    *,
    conn_id: str,
    encryption_public_key: str | None,
    cluster: bool,
    recovery: bool,
    protocol_version: int,
    max_message_size: int,
    rate_limit_capacity: float,
    rate_limit_refill: float,
    ping_interval_s: float,
    wall_ms: int,
    server_version: str = "2.5.1",
) -> bytes:
    """Reply to a text ``client_hello`` (ref §3.1). ``encryption`` is true exactly when
    this hello derived a key, i.e. when ``encryption_public_key`` is given; limits are
    truncated to integers and ``ping_interval`` is in (rounded) milliseconds. No id/ts/seq."""
    p: dict[str, Any] = {
        "connection_id": conn_id,
        "features": {
            "batching": True,
            "cluster": bool(cluster),
            "compression": True,
            "encryption": encryption_public_key is not None,
            "msgpack": True,
            "priority_queue": True,
            "recovery": bool(recovery),
        },
        "limits": {
            "max_message_size": int(max_message_size),
            "rate_limit_capacity": int(rate_limit_capacity),
            "rate_limit_refill": int(rate_limit_refill),
        },
        "ping_interval": round(ping_interval_s * 1000),
        "protocol_version": int(protocol_version),
        "server_time": format_ts(wall_ms),
        "server_version": server_version,
    }
    if encryption_public_key is not None:
        p["encryption_public_key"] = encryption_public_key
    return dumps_server({"c": "WSE", "p": p, "t": "server_hello", "v": 1})


def presence_event(t: str, user_id: str, data: Any) -> bytes:
    """``presence_join`` / ``presence_leave`` / ``presence_update`` text (ref §3.1, §8):
    keys sorted, ``c`` always ``WSE``, no ``v``."""
    return dumps_server(
        {"c": "WSE", "p": {"data": to_json_value(data), "user_id": user_id}, "t": t}
    )

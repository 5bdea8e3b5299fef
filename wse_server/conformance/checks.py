"""Small predicates and comparisons shared by the scenarios of both modes."""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from wse_proto.envelope import dumps_server

__all__ = [
    "TS_RE",
    "UUID7_RE",
    "describe",
    "is_sorted_compact",
    "is_std_b64_point",
    "json_equal",
    "strip_stamp",
    "token_subject",
]

TS_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
"""PROTOCOL §4.2: ``YYYY-MM-DDTHH:MM:SS.mmmZ``."""

UUID7_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
"""PROTOCOL §4.2: lowercase hyphenated RFC 9562 version 7."""

_STAMP_RE = re.compile(r'^\{"tp":"(?:[^"\\]|\\.)*","e":"[0-9a-f]{8}","o":\d+,?')


def json_equal(a: Any, b: Any) -> bool:
    """JSON equality that tells ``1`` from ``1.0`` and ``true`` from ``1`` (vectors README)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if isinstance(a, float) or isinstance(b, float):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def is_sorted_compact(text: str) -> bool:
    """K1 / PROTOCOL §4.3: the bytes are the server JSON form of their own value."""
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return dumps_server(value) == text.encode("utf-8")


def is_std_b64_point(text: object) -> bool:
    """PROTOCOL §8.1: canonical standard base64 of a 65-byte uncompressed P-256 point."""
    if not isinstance(text, str):
        return False
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return False
    return len(raw) == 65 and raw[0] == 4 and base64.b64encode(raw).decode() == text


def strip_stamp(text: str) -> tuple[str, bool]:
    """Remove a recovery stamp (PROTOCOL §13.2) spliced at the start of an object."""
    m = _STAMP_RE.match(text)
    if m is None:
        return text, False
    rest = text[m.end() :]
    return "{" + rest, True


def describe(value: Any, limit: int = 160) -> str:
    """A short printable form of a value for failure messages."""
    if isinstance(value, bytes):
        text = value[:limit].hex() + ("..." if len(value) > limit else "")
        return f"bytes[{len(value)}] {text}"
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def token_subject(token: str) -> str | None:
    """The ``sub`` claim of a JWT, read without verifying it (to know the expected user id)."""
    try:
        body = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (IndexError, ValueError):
        return None
    sub = claims.get("sub") if isinstance(claims, dict) else None
    return sub if isinstance(sub, str) else None

"""Topic rules: byte-wise globs, per-connection topic ACLs and topic validity.

The original matches globs over the UTF-8 bytes of topic names (reference §10.2): ``*`` is any
run of bytes (including none) and ``?`` exactly one byte, so ``é`` needs ``??``. There is no
escape character and no character class: ``[``, ``]`` and ``\\`` are literal bytes.

Matching never backtracks over the pattern: a pattern is cut at its stars into fixed-length
pieces; the first piece is anchored at the start, the last at the end and the middle ones are
found greedily left to right. That is exact for ``*`` globs and costs at most
``len(topic) * len(pattern)`` byte comparisons, so a hostile pattern cannot stall the hub.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from .errors import LocalProtocolError

__all__ = [
    "GlobPattern",
    "TopicACL",
    "compile_glob",
    "glob_match",
    "is_glob",
    "topic_bytes",
    "valid_topic",
]

_STAR = b"*"
_QMARK = ord("?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def topic_bytes(topic: str) -> bytes:
    """UTF-8 bytes of a topic; lone surrogates (never valid topics) encode as 3 bytes each.

    ``surrogatepass`` keeps matching total (no UnicodeEncodeError can escape), while
    :func:`valid_topic` rejects such strings before they are ever subscribed.
    """
    try:
        return topic.encode()
    except UnicodeEncodeError:
        return topic.encode("utf-8", "surrogatepass")


class _Piece:
    """A star-free run of the pattern: plain bytes, or bytes with ``?`` (one-byte) holes."""

    __slots__ = ("literal", "regex", "size")

    def __init__(self, raw: bytes) -> None:
        self.size = len(raw)
        if _QMARK in raw:
            self.literal: bytes | None = None
            body = b"".join(b"." if c == _QMARK else re.escape(bytes((c,))) for c in raw)
            # Only literals and '.': the regex engine cannot backtrack catastrophically.
            self.regex: re.Pattern[bytes] | None = re.compile(body, re.DOTALL)
        else:
            self.literal = raw
            self.regex = None

    def at(self, data: bytes, pos: int) -> bool:
        """Does the piece match ``data`` starting exactly at ``pos``? (caller checks length)."""
        if self.literal is not None:
            return data.startswith(self.literal, pos)
        assert self.regex is not None
        return self.regex.match(data, pos) is not None

    def find(self, data: bytes, start: int, end: int) -> int:
        """Leftmost start of the piece within ``data[start:end]``, or -1."""
        if self.literal is not None:
            return data.find(self.literal, start, end)
        assert self.regex is not None
        m = self.regex.search(data, start, end)
        return -1 if m is None else m.start()


class GlobPattern:
    """A compiled glob. Build with :func:`compile_glob` (cached) and reuse on the hot path."""

    __slots__ = ("_head", "_middle", "_min_len", "_tail", "exact", "pattern", "raw")

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.raw = topic_bytes(pattern)
        parts = self.raw.split(_STAR)
        if len(parts) == 1:
            # No star: the topic must have exactly the pattern's length.
            self.exact: bool = True
            self._head = _Piece(parts[0])
            self._tail: _Piece | None = None
            self._middle: tuple[_Piece, ...] = ()
        else:
            self.exact = False
            self._head = _Piece(parts[0])
            self._tail = _Piece(parts[-1])
            # Empty middle pieces come from "**": they match anywhere, so drop them.
            self._middle = tuple(_Piece(p) for p in parts[1:-1] if p)
        self._min_len = (
            self._head.size
            + (self._tail.size if self._tail is not None else 0)
            + sum(p.size for p in self._middle)
        )

    def match_bytes(self, topic: bytes) -> bool:
        """Match against already-encoded topic bytes (lets fan-out encode a topic once)."""
        n = len(topic)
        head = self._head
        if self.exact:
            return n == head.size and head.at(topic, 0)
        if n < self._min_len or not head.at(topic, 0):
            return False
        tail = self._tail
        assert tail is not None
        end = n - tail.size
        if not tail.at(topic, end):
            return False
        pos = head.size
        for piece in self._middle:
            found = piece.find(topic, pos, end)
            if found < 0:
                return False
            pos = found + piece.size
        return True

    def match(self, topic: str) -> bool:
        """Match a topic string (compared as UTF-8 bytes, §10.2)."""
        return self.match_bytes(topic_bytes(topic))

    def __repr__(self) -> str:
        return f"GlobPattern({self.pattern!r})"


@lru_cache(maxsize=4096)
def compile_glob(pattern: str) -> GlobPattern:
    """Compiled form of ``pattern``; cached because the same ACL and subscription patterns
    are checked again and again."""
    return GlobPattern(pattern)


def glob_match(pattern: str, topic: str) -> bool:
    """Whether ``topic`` matches ``pattern`` byte-wise: ``*`` any bytes, ``?`` one byte."""
    return compile_glob(pattern).match_bytes(topic_bytes(topic))


def is_glob(topic: str) -> bool:
    """A subscription topic containing ``*`` or ``?`` is a glob subscription (§10.2)."""
    return "*" in topic or "?" in topic


def valid_topic(topic: str) -> bool:
    """False for topics the original drops: ASCII control characters (0x00-0x1F, 0x7F).

    Non-ASCII is fine (U+0085 included). Strings holding lone surrogates are not valid
    UTF-8 and could never reach the original either, so they are refused too.
    """
    if _CONTROL.search(topic) is not None:
        return False
    if not topic.isascii():
        try:
            topic.encode()
        except UnicodeEncodeError:
            return False
    return True


def _str_tuple(name: str, values: Iterable[str] | None) -> tuple[str, ...]:
    if values is None:
        return ()
    if isinstance(values, str | bytes):
        raise LocalProtocolError(f"{name} must be a list of glob strings, not a single string")
    out = tuple(values)
    for v in out:
        if not isinstance(v, str):
            raise LocalProtocolError(f"{name} entries must be str, got {type(v).__name__}")
    return out


@dataclass(frozen=True, slots=True)
class TopicACL:
    """Per-connection subscription filter (§10.2), from ``set_topic_acl`` or the JWT claim.

    Any deny match refuses the topic; an empty allow list allows everything else; otherwise
    an allow pattern must match. Glob subscriptions are checked as literal strings, so
    ``a*`` is allowed by ``a*`` but also refused by a deny pattern ``a?``.
    """

    allow: Sequence[str] = ()
    deny: Sequence[str] = ()
    _allow: tuple[GlobPattern, ...] = field(init=False, repr=False, compare=False)
    _deny: tuple[GlobPattern, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        allow = _str_tuple("allow", self.allow)
        deny = _str_tuple("deny", self.deny)
        object.__setattr__(self, "allow", allow)
        object.__setattr__(self, "deny", deny)
        object.__setattr__(self, "_allow", tuple(compile_glob(p) for p in allow))
        object.__setattr__(self, "_deny", tuple(compile_glob(p) for p in deny))

    def is_allowed(self, topic: str) -> bool:
        """Whether a subscription to ``topic`` passes this ACL."""
        data = topic_bytes(topic)
        for pat in self._deny:
            if pat.match_bytes(data):
                return False
        if not self._allow:
            return True
        return any(pat.match_bytes(data) for pat in self._allow)

    @classmethod
    def from_claim(cls, value: Any) -> TopicACL | None:
        """ACL from the ``wse_topics`` JWT claim (§1.3), lenient like the original.

        Not an object: no ACL. A list member that is not a list, or list entries that are
        not strings, are ignored (a missing or malformed list is empty).
        """
        if not isinstance(value, dict):
            return None

        def strings(key: str) -> tuple[str, ...]:
            items = value.get(key)
            if not isinstance(items, list):
                return ()
            return tuple(v for v in items if isinstance(v, str))

        return cls(strings("allow"), strings("deny"))

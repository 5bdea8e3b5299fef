"""Per-topic message history for recovery (spec/RECOVERY_PRESENCE.md, PROTOCOL §13).

Pure state: the caller passes ``now`` (monotonic seconds) and the store draws epochs
from an injected ``rand``. The pieces:

- :func:`stamp` splices ``{"tp":..,"e":..,"o":..`` into an object payload (§13.2);
- :class:`RecoveryStore` keeps one ring buffer per published topic plus buffers
  received from other cluster nodes ("foreign", keyed by topic and origin epoch),
  judges recovery requests with the per-topic table of §13.4, and holds the TTL
  and memory budget;
- :class:`RecoverySubscription` is the replay seam (F8): one subscriber's paced
  replay of one topic, ordered against live publications;
- :func:`parse_recovery_request`, :func:`subscription_reply` and
  :func:`recovery_result` translate between the wire / API shapes and outcomes.

The publish path returns the stamped ``bytes`` object it stored, so the broadcast
path sends the very same object (no copy).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from ._defaults import RandFn
from .errors import DecodeError, LocalProtocolError

__all__ = [
    "MAX_OFFSET",
    "NOT_RECOVERABLE",
    "RecoveryConfig",
    "RecoveryOutcome",
    "RecoveryRequest",
    "RecoveryStore",
    "RecoverySubscription",
    "format_epoch",
    "parse_epoch",
    "parse_offset",
    "parse_recovery_request",
    "recovery_result",
    "ring_capacity",
    "stamp",
    "subscription_reply",
]

MAX_OFFSET: Final = (1 << 64) - 1
"""Offsets are u64 on the wire; this one means "already up to date" (ref §7 edge cases)."""

_MAX_EPOCH: Final = 0xFFFFFFFF
_HEX_DIGITS: Final = frozenset("0123456789abcdefABCDEF")
_JSON_WS: Final = b" \t\n\r"
_OPEN: Final = 0x7B  # "{"
_CLOSE: Final = 0x7D  # "}"
_JOIN_MIN: Final = 4096
"""From this size on, splice through a memoryview (no copy of the payload tail first);
inlined as a literal in :meth:`RecoveryStore.publish`."""
_RETIRED_MAX: Final = 16384
"""Epochs of removed buffers remembered (to avoid reusing one for the same topic)."""


# --------------------------------------------------------------------------- config


@dataclass(frozen=True, slots=True)
class RecoveryConfig:
    """Recovery limits; defaults are the original's (ref §6.1, §7.1)."""

    buffer_size: int = 128
    ttl: float = 300.0
    max_messages: int = 500
    memory_budget: int = 268_435_456

    def __post_init__(self) -> None:
        if isinstance(self.buffer_size, bool) or not isinstance(self.buffer_size, int):
            raise ValueError(f"buffer_size must be an int, got {self.buffer_size!r}")
        if self.buffer_size > 1 << 24:
            raise ValueError(f"buffer_size too large: {self.buffer_size}")
        if not self.ttl > 0:
            raise ValueError(f"ttl must be > 0, got {self.ttl!r}")
        if isinstance(self.max_messages, bool) or self.max_messages < 0:
            raise ValueError(f"max_messages must be >= 0, got {self.max_messages!r}")
        if isinstance(self.memory_budget, bool) or self.memory_budget < 0:
            raise ValueError(f"memory_budget must be >= 0, got {self.memory_budget!r}")

    @property
    def capacity(self) -> int:
        return ring_capacity(self.buffer_size)


def ring_capacity(buffer_size: int) -> int:
    """``max(buffer_size, 16)`` rounded up to a power of two (ref §7.1: 128 → 128, 20 → 32)."""
    n = max(buffer_size, 16)
    return 1 << (n - 1).bit_length()


# --------------------------------------------------------------------------- epochs, offsets


def format_epoch(epoch: int) -> str:
    """The wire form: 8 lowercase hex digits."""
    return f"{epoch:08x}"


def parse_epoch(text: object) -> int:
    """Parse a client's epoch string as a hex u32 (case-insensitive, like the original's
    ``u32::from_str_radix(s, 16)``: an optional ``+``, then hex digits).

    Raises DecodeError("Invalid epoch hex string: ...") otherwise; the server facade
    turns it into the original's ``RuntimeError`` (ref §7.3).
    """
    if not isinstance(text, str):
        raise DecodeError(f"Invalid epoch hex string: {text!r}")
    digits = text[1:] if text[:1] == "+" else text
    if not digits or not _HEX_DIGITS.issuperset(digits) or len(digits.lstrip("0")) > 8:
        raise DecodeError(f"Invalid epoch hex string: {text!r}")
    return int(digits, 16)


def parse_offset(value: object) -> int:
    """A client's offset: an int in ``[0, 2**64 - 1]`` (bools and floats are not offsets)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise DecodeError(f"Invalid recovery offset: {value!r}")
    if value < 0 or value > MAX_OFFSET:
        raise DecodeError(f"Recovery offset out of range: {value!r}")
    return value


def _epoch_of(epoch: int | str) -> int:
    if isinstance(epoch, int) and not isinstance(epoch, bool):
        if 0 <= epoch <= _MAX_EPOCH:
            return epoch
        raise DecodeError(f"Epoch out of range: {epoch!r}")
    return parse_epoch(epoch)


# --------------------------------------------------------------------------- stamp


def _object_start(payload: bytes) -> int:
    """Index of the ``{`` that opens an object payload after JSON whitespace, else -1."""
    if payload[:1] == b"{":
        return 0
    n = len(payload)
    i = 0
    while i < n and payload[i] in _JSON_WS:
        i += 1
    return i if i < n and payload[i] == _OPEN else -1


def _is_empty_object(payload: bytes, start: int) -> bool:
    """True when only whitespace separates the opening ``{`` from a ``}``."""
    i = start + 1
    n = len(payload)
    while i < n and payload[i] in _JSON_WS:
        i += 1
    return i < n and payload[i] == _CLOSE


def _stamp_prefix(topic: str, epoch_hex: str) -> bytes:
    try:
        quoted = orjson.dumps(topic)
    except orjson.JSONEncodeError as exc:  # lone surrogates
        raise LocalProtocolError(f"topic is not encodable as JSON: {exc}") from None
    return b'{"tp":' + quoted + b',"e":"' + epoch_hex.encode("ascii") + b'","o":'


def _templates(topic: str, epoch_hex: str) -> tuple[bytes, bytes]:
    """``%``-templates of the stamped text, followed by more members or not: one
    formatting operation per publication is the cheapest splice in CPython."""
    prefix = _stamp_prefix(topic, epoch_hex).replace(b"%", b"%%")
    return prefix + b"%d,%b", prefix + b"%d%b"


def _splice(templates: tuple[bytes, bytes], offset: int, payload: bytes, start: int) -> bytes:
    # The usual object opens with a key; only otherwise look for an empty object.
    body = start + 1
    if payload[body : body + 1] == b'"' or not _is_empty_object(payload, start):
        template = templates[0]
    else:
        template = templates[1]
    if len(payload) < _JOIN_MIN:
        return template % (offset, payload[body:])
    return template % (offset, memoryview(payload)[body:])


def stamp(topic: str, epoch: int | str, offset: int, payload: bytes) -> bytes | None:
    """Splice the recovery stamp into ``payload`` (PROTOCOL §13.2).

    ``{"tp":<topic as JSON>,"e":"<8 hex>","o":<offset>`` replaces the opening ``{``
    (leading JSON whitespace is dropped), followed by ``,`` unless the object was
    empty, then the rest of the payload unchanged. Returns None when the payload is
    not an object: F7, such publications are delivered unstamped.
    """
    start = _object_start(payload)
    if start < 0:
        return None
    templates = _templates(topic, format_epoch(_epoch_of(epoch)))
    return _splice(templates, parse_offset(offset), payload, start)


# --------------------------------------------------------------------------- buffers


class TopicBuffer:
    """A local topic's ring: offsets ``tail .. head-1`` are held, oldest evicted first."""

    __slots__ = (
        "epoch",
        "epoch_hex",
        "head",
        "last_write",
        "mask",
        "nbytes",
        "slots",
        "tail",
        "templates",
        "topic",
    )

    def __init__(self, topic: str, epoch: int, capacity: int, now: float) -> None:
        self.topic = topic
        self.epoch = epoch
        self.epoch_hex = format_epoch(epoch)
        self.templates = _templates(topic, self.epoch_hex)
        self.slots: list[bytes | None] = [None] * capacity
        self.mask = capacity - 1
        self.head = 0
        self.tail = 0
        self.nbytes = 0
        self.last_write = now

    @property
    def capacity(self) -> int:
        return self.mask + 1

    @property
    def last_offset(self) -> int:
        return self.head - 1

    def get(self, offset: int) -> bytes | None:
        if self.tail <= offset < self.head:
            return self.slots[offset & self.mask]
        return None

    def evict_oldest(self) -> int:
        """Drop the oldest held entry (budget pressure); returns the bytes freed."""
        i = self.tail & self.mask
        old = self.slots[i]
        self.slots[i] = None
        self.tail += 1
        size = len(old) if old is not None else 0
        self.nbytes -= size
        return size


class ForeignBuffer:
    """Messages of another node's buffer, stored at the offsets its trailer gave.

    Entries may arrive out of order and with holes; the window keeps the latest
    ``capacity`` offsets (``high - capacity + 1 .. high``).
    """

    __slots__ = (
        "capacity",
        "entries",
        "epoch",
        "epoch_hex",
        "high",
        "last_write",
        "nbytes",
        "topic",
    )

    def __init__(self, topic: str, epoch: int, capacity: int, now: float) -> None:
        self.topic = topic
        self.epoch = epoch
        self.epoch_hex = format_epoch(epoch)
        self.capacity = capacity
        self.entries: dict[int, bytes] = {}
        self.high = -1
        self.nbytes = 0
        self.last_write = now

    @property
    def head(self) -> int:
        return self.high + 1

    @property
    def tail(self) -> int:
        return max(0, self.high - self.capacity + 1)

    @property
    def last_offset(self) -> int:
        return self.high

    def get(self, offset: int) -> bytes | None:
        return self.entries.get(offset)

    def put(self, offset: int, payload: bytes) -> int:
        """Store ``payload`` at ``offset``; returns the change in stored bytes."""
        entries = self.entries
        delta = 0
        if offset > self.high:
            new_low = offset - self.capacity + 1
            if new_low > self.tail and entries:
                if new_low - self.tail >= len(entries):
                    stale = [o for o in entries if o < new_low]
                else:
                    stale = [o for o in range(self.tail, new_low) if o in entries]
                for o in stale:
                    delta -= len(entries.pop(o))
            self.high = offset
        elif offset < self.tail:
            return 0  # older than the window: dropped
        old = entries.get(offset)
        if old is not None:
            delta -= len(old)
        entries[offset] = payload
        delta += len(payload)
        self.nbytes += delta
        return delta

    def evict_oldest(self) -> int:
        if not self.entries:
            return 0
        o = min(self.entries)
        size = len(self.entries.pop(o))
        self.nbytes -= size
        return size


_Buffer = TopicBuffer | ForeignBuffer


# --------------------------------------------------------------------------- outcomes


@dataclass(frozen=True, slots=True)
class RecoveryOutcome:
    """One topic's answer to a recovery request (PROTOCOL §13.4).

    ``epoch``/``offset`` is the position the client should hold afterwards (the
    buffer's last offset, head - 1), ``count`` the number of replayed messages and
    ``messages`` the stamped payloads to send, in offset order (empty for a paced
    replay, see :meth:`RecoveryStore.begin_replay`).
    """

    recovered: bool
    count: int
    recoverable: bool
    epoch: str | None
    offset: int
    messages: list[bytes] = field(default_factory=list)

    def reply_entry(self) -> dict[str, Any]:
        """The per-topic entry of the ``subscription_update`` reply (ref §3.4)."""
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "recovered": self.recovered,
            "count": self.count,
        }

    def result_entry(self) -> dict[str, Any]:
        """The per-topic entry of ``subscribe_with_recovery``'s return value (ref §7.3)."""
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "recoverable": self.recoverable,
            "recovered": self.recovered,
            "count": self.count,
        }


NOT_RECOVERABLE: Final = RecoveryOutcome(False, 0, False, None, 0)
"""No buffer for the topic, or the topic is denied by the ACL (nothing revealed)."""


def _position(buf: _Buffer | None) -> RecoveryOutcome:
    if buf is None:
        return NOT_RECOVERABLE
    return RecoveryOutcome(False, 0, True, buf.epoch_hex, max(buf.last_offset, 0))


# --------------------------------------------------------------------------- the store


class RecoveryStore:
    """All recovery history of one server: local ring buffers and foreign buffers.

    Buffers are kept in least-recently-written order, which serves both the TTL
    (the oldest write is at the front) and the memory budget (whole buffers are
    evicted from the front). The budget counts stored payload bytes and holds after
    every call: a publication that would exceed it first evicts other buffers, and
    if the written buffer alone is too large, its own oldest entries.
    """

    __slots__ = (
        "_budget",
        "_capacity",
        "_clock",
        "_foreign",
        "_local",
        "_lru",
        "_rand",
        "_retired",
        "_total",
        "_ttl",
        "config",
    )

    def __init__(self, config: RecoveryConfig | None, rand: RandFn) -> None:
        self.config = config if config is not None else RecoveryConfig()
        self._rand = rand
        self._capacity = self.config.capacity
        self._ttl: float = self.config.ttl
        self._budget: int = self.config.memory_budget
        self._local: dict[str, TopicBuffer] = {}
        self._foreign: dict[tuple[str, int], ForeignBuffer] = {}
        self._lru: OrderedDict[_Buffer, None] = OrderedDict()
        self._retired: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._total = 0
        self._clock = float("-inf")

    # ------------------------------------------------------------- bookkeeping

    def _tick(self, now: float) -> float:
        """Last-write times never go backwards, so the LRU order is also time order."""
        if now > self._clock:
            self._clock = now
        return self._clock

    def _expired(self, buf: _Buffer, now: float) -> bool:
        return now - buf.last_write >= self._ttl

    def _drop(self, buf: _Buffer) -> None:
        del self._lru[buf]
        self._total -= buf.nbytes
        if isinstance(buf, TopicBuffer):
            del self._local[buf.topic]
            retired = self._retired
            retired[buf.topic] = (buf.epoch, buf.head)
            retired.move_to_end(buf.topic)
            if len(retired) > _RETIRED_MAX:
                retired.popitem(last=False)
        else:
            del self._foreign[(buf.topic, buf.epoch)]

    def _new_epoch(self, topic: str) -> int:
        """A random epoch that differs from this topic's previous one and from its
        foreign buffers' epochs, so a stale (epoch, offset) never matches new history."""
        prev = self._retired.get(topic)
        foreign = self._foreign

        def taken(e: int) -> bool:
            return (prev is not None and prev[0] == e) or (topic, e) in foreign

        epoch = 0
        for _ in range(8):
            epoch = int.from_bytes(self._rand(4), "big") & _MAX_EPOCH
            if not taken(epoch):
                return epoch
        while taken(epoch):  # a degenerate rand (tests): step deterministically
            epoch = (epoch + 1) & _MAX_EPOCH
        return epoch

    def _enforce_budget(self, keep: _Buffer) -> None:
        budget = self._budget
        lru = self._lru
        while self._total > budget:
            victim = next(iter(lru))
            if victim is keep:  # the buffer being written is the only one left
                while self._total > budget and keep.nbytes:
                    self._total -= keep.evict_oldest()
                return
            self._drop(victim)

    def _live_local(self, topic: str, now: float) -> TopicBuffer | None:
        buf = self._local.get(topic)
        if buf is not None and self._expired(buf, now):
            self._drop(buf)
            return None
        return buf

    def _live_foreign(self, topic: str, epoch: int, now: float) -> ForeignBuffer | None:
        buf = self._foreign.get((topic, epoch))
        if buf is not None and self._expired(buf, now):
            self._drop(buf)
            return None
        return buf

    # ------------------------------------------------------------- publishing

    def publish(self, topic: str, payload: bytes, now: float) -> tuple[bytes, int, int] | None:
        """Stamp and store one publication; returns ``(stamped, epoch, offset)``.

        Non-object payloads return None and take no offset (F7). A buffer idle for
        ``ttl`` is replaced by a new one (new epoch) even before :meth:`expire` runs.
        The returned bytes object is the one stored: send it as it is.
        """
        # The usual payload opens an object with a key: no whitespace, not empty.
        usual = payload[:2] == b'{"'
        if not usual:
            start = _object_start(payload)
            if start < 0:
                return None
        if now > self._clock:
            self._clock = now
        else:
            now = self._clock
        buf = self._local.get(topic)
        if buf is None or now - buf.last_write >= self._ttl:
            if buf is not None:
                self._drop(buf)
            buf = TopicBuffer(topic, self._new_epoch(topic), self._capacity, now)
            self._local[topic] = buf
            self._lru[buf] = None
        else:
            self._lru.move_to_end(buf)
            buf.last_write = now
        offset = buf.head
        if not usual:
            stamped = _splice(buf.templates, offset, payload, start)
        elif len(payload) < 4096:
            stamped = buf.templates[0] % (offset, payload[1:])
        else:
            stamped = buf.templates[0] % (offset, memoryview(payload)[1:])
        slots = buf.slots
        i = offset & buf.mask
        old = slots[i]
        slots[i] = stamped
        buf.head = offset + 1
        size = len(stamped)
        if old is not None:  # the ring is full: ``old`` was the tail entry
            size -= len(old)
            buf.tail += 1
        buf.nbytes += size
        total = self._total = self._total + size
        if total > self._budget:
            self._enforce_budget(buf)
        return stamped, buf.epoch, offset

    def store_foreign(
        self, topic: str, epoch: int | str, offset: int, payload: bytes, now: float
    ) -> bool:
        """Store a message received from another node with its origin (epoch, offset).

        Same TTL and budget as local buffers. An entry older than the window is
        dropped (returns False); one at an offset already held replaces it.
        """
        ep = _epoch_of(epoch)
        off = parse_offset(offset)
        now = self._tick(now)
        key = (topic, ep)
        buf = self._foreign.get(key)
        if buf is not None and self._expired(buf, now):
            self._drop(buf)
            buf = None
        if buf is None:
            buf = ForeignBuffer(topic, ep, self._capacity, now)
            self._foreign[key] = buf
            self._lru[buf] = None
        else:
            if off < buf.tail:
                return False
            self._lru.move_to_end(buf)
            buf.last_write = now
        self._total += buf.put(off, bytes(payload))
        if self._total > self._budget:
            self._enforce_budget(buf)
        return True

    # ------------------------------------------------------------- queries

    def position(self, topic: str) -> tuple[str, int] | None:
        """``(epoch_hex, last_offset)`` of the topic's local buffer (no TTL check)."""
        buf = self._local.get(topic)
        if buf is None:
            return None
        return buf.epoch_hex, buf.head - 1

    def held(self, topic: str) -> range:
        """Offsets the topic's local buffer still holds (empty range if none)."""
        buf = self._local.get(topic)
        return range(0) if buf is None else range(buf.tail, buf.head)

    def stats(self) -> tuple[int, int]:
        """``(local topic buffers, stored payload bytes incl. foreign buffers)``."""
        return len(self._local), self._total

    @property
    def foreign_count(self) -> int:
        return len(self._foreign)

    def next_deadline(self) -> float | None:
        """When the least recently written buffer expires (for the TTL sweep timer)."""
        for buf in self._lru:
            return buf.last_write + self._ttl
        return None

    def expire(self, now: float) -> int:
        """Remove buffers (local and foreign) idle for ``ttl`` or more; returns how many."""
        lru = self._lru
        ttl = self._ttl
        removed = 0
        while lru:
            buf = next(iter(lru))
            if now - buf.last_write < ttl:
                break
            self._drop(buf)
            removed += 1
        return removed

    def clear(self) -> None:
        while self._lru:
            self._drop(next(iter(self._lru)))

    # ------------------------------------------------------------- recovery

    def recover(
        self,
        topic: str,
        epoch: str | None,
        offset: int | None,
        now: float,
        *,
        max_bytes: int | None = None,
    ) -> RecoveryOutcome:
        """Judge a client's position for one topic (PROTOCOL §13.4) and collect the replay.

        ``epoch``/``offset`` None means recovery was not requested for this topic:
        the outcome only carries the current position. ``max_bytes`` (the room left
        in the connection's outbound backlog) turns a replay that would not fit into
        ``recovered: false``; the cap is all or nothing, like ``max_messages``.
        Raises DecodeError for an invalid epoch string or offset.
        """
        return self._judge(topic, epoch, offset, now, max_bytes, collect=True)

    def begin_replay(
        self, topic: str, epoch: str | None, offset: int | None, now: float
    ) -> tuple[RecoveryOutcome, RecoverySubscription | None]:
        """Like :meth:`recover`, but for a paced replay (F8): returns the outcome
        (``messages`` empty, ``count`` = backlog now) and, when there is something to
        replay, the :class:`RecoverySubscription` that hands it out in order."""
        outcome = self._judge(topic, epoch, offset, now, None, collect=False)
        if not outcome.recovered or outcome.count == 0:
            return outcome, None
        assert epoch is not None and offset is not None  # recovered implies both
        seam = RecoverySubscription(self, topic, parse_epoch(epoch), parse_offset(offset) + 1)
        return outcome, seam

    def _judge(
        self,
        topic: str,
        epoch: str | None,
        offset: int | None,
        now: float,
        max_bytes: int | None,
        *,
        collect: bool,
    ) -> RecoveryOutcome:
        if epoch is None or offset is None:
            return _position(self._live_local(topic, now))
        ep = parse_epoch(epoch)
        off = parse_offset(offset)
        buf: _Buffer | None = self._live_local(topic, now)
        if buf is None or buf.epoch != ep:
            foreign = self._live_foreign(topic, ep, now)
            if foreign is None:
                return _position(buf)  # epoch differs, or no buffer at all
            buf = foreign
        head = buf.head
        last = head - 1
        start = off + 1
        if start >= head:
            return RecoveryOutcome(True, 0, True, buf.epoch_hex, last)
        backlog = head - start
        if start < buf.tail or backlog > self.config.max_messages:
            return RecoveryOutcome(False, 0, True, buf.epoch_hex, last)
        get = buf.get
        if not collect:
            if isinstance(buf, ForeignBuffer) and any(get(o) is None for o in range(start, head)):
                return RecoveryOutcome(False, 0, True, buf.epoch_hex, last)
            return RecoveryOutcome(True, backlog, True, buf.epoch_hex, last)
        messages: list[bytes] = []
        size = 0
        for o in range(start, head):
            item = get(o)
            if item is None:  # a hole (foreign buffers; or evicted by the budget)
                return RecoveryOutcome(False, 0, True, buf.epoch_hex, last)
            messages.append(item)
            size += len(item)
        if max_bytes is not None and size > max_bytes:
            return RecoveryOutcome(False, 0, True, buf.epoch_hex, last)
        return RecoveryOutcome(True, backlog, True, buf.epoch_hex, last, messages)

    # ------------------------------------------------------------- seam support

    def _replay_source(self, topic: str, epoch: int) -> _Buffer | None:
        buf = self._local.get(topic)
        if buf is not None and buf.epoch == epoch:
            return buf
        return self._foreign.get((topic, epoch))

    def _retired_head(self, topic: str, epoch: int) -> int | None:
        info = self._retired.get(topic)
        if info is not None and info[0] == epoch:
            return info[1]
        return None


# --------------------------------------------------------------------------- the replay seam


class RecoverySubscription:
    """One subscriber's replay of one topic, ordered against live publications (F8).

    Contract for the hub, all under the lock that also serialises publications:

    1. subscribe the connection for live delivery, then call
       :meth:`RecoveryStore.begin_replay`; keep the returned seam (if any) for the
       (connection, topic) pair;
    2. for each live stamped message of that topic, while the seam is kept, send it
       only if :meth:`accept_live` says so (O(1)); unstamped publications (non-objects)
       carry no offset and are sent at once;
    3. whenever the connection has room, send :meth:`pull`'s batch; once
       :attr:`pending` is False, forget the seam.

    While the replay is pending, live messages are not sent: each of them was stored
    in the buffer before the fan-out, so the replay reaches it in order. The
    subscriber thus receives every offset once, in increasing order. If history is
    lost before the replay reaches it (ring eviction, budget, TTL), the seam skips
    the hole and counts it in :attr:`gaps` (the client then sees an ordinary gap).
    """

    __slots__ = ("_store", "delivered", "epoch", "gaps", "next_offset", "pending", "topic")

    def __init__(self, store: RecoveryStore, topic: str, epoch: int, next_offset: int) -> None:
        self._store = store
        self.topic = topic
        self.epoch = epoch
        self.next_offset = next_offset
        self.pending = True
        self.gaps = 0
        self.delivered = 0

    @property
    def epoch_hex(self) -> str:
        return format_epoch(self.epoch)

    def accept_live(self, epoch: int) -> bool:
        """May a live message stamped with ``epoch`` go out now? Not while this seam
        still replays that epoch (the replay will reach it). Another epoch is either
        another node's stream, not ours to hold back, or a newer local buffer, which
        means ours is gone: the replay ends there (with a gap if it was behind)."""
        if not self.pending:
            return True
        if epoch == self.epoch:
            return False
        if self._store._replay_source(self.topic, self.epoch) is None:
            self._lost()
        return True

    def pull(self, max_count: int = 64, max_bytes: int | None = None) -> list[bytes]:
        """The next replay batch, in offset order: at most ``max_count`` messages and,
        beyond the first, at most ``max_bytes`` bytes. Clears :attr:`pending` once it
        has caught up with the buffer's head."""
        out: list[bytes] = []
        if not self.pending:
            return out
        src = self._store._replay_source(self.topic, self.epoch)
        if src is None:
            self._lost()
            return out
        if self.next_offset < src.tail:
            self.gaps += 1
            self.next_offset = src.tail
        head = src.head
        nxt = self.next_offset
        size = 0
        get = src.get
        while nxt < head and len(out) < max_count:
            item = get(nxt)
            if item is None:  # hole: evicted by the budget, or missing in a foreign buffer
                self.gaps += 1
                nxt += 1
                continue
            if max_bytes is not None and out and size + len(item) > max_bytes:
                break
            out.append(item)
            size += len(item)
            nxt += 1
        self.next_offset = nxt
        self.delivered += len(out)
        if nxt >= head:
            self.pending = False
        return out

    def _lost(self) -> None:
        """Our buffer is gone (TTL, budget). Messages of a newer buffer have a new
        epoch and went out live, so the replay simply ends; it counts a gap unless
        the old buffer ended exactly where we were."""
        if self._store._retired_head(self.topic, self.epoch) != self.next_offset:
            self.gaps += 1
        self.pending = False


# --------------------------------------------------------------------------- wire helpers


@dataclass(frozen=True, slots=True)
class RecoveryRequest:
    """A parsed ``subscription_update`` subscribe (ref §3.3) with per-topic positions (F10).

    ``positions`` has a canonical ``(epoch_hex, offset)`` for each listed topic whose
    entry was valid; ``invalid`` maps topics whose entry was unusable to the reason
    (they are judged as "not requested": the reply carries the current position, so
    the client re-baselines instead of looping). Entries for topics not in
    ``topics`` are listed in ``invalid`` too and otherwise ignored.
    """

    topics: tuple[str, ...]
    recover: bool
    positions: Mapping[str, tuple[str, int]]
    invalid: Mapping[str, str]

    def position(self, topic: str) -> tuple[str | None, int | None]:
        pos = self.positions.get(topic)
        return (None, None) if pos is None else pos


def parse_recovery_request(payload: object) -> RecoveryRequest:
    """Parse the ``p`` of a client's ``subscription_update`` subscribe.

    Structural errors (payload not an object, ``topics`` not a list of strings,
    ``recovery`` not an object) raise DecodeError; a bad position only marks its
    topic in ``invalid``. ``recover`` must be JSON ``true`` for positions to count.
    """
    if not isinstance(payload, Mapping):
        raise DecodeError("subscription_update payload must be an object")
    raw_topics = payload.get("topics")
    if not isinstance(raw_topics, list) or not all(isinstance(t, str) for t in raw_topics):
        raise DecodeError("subscription_update 'topics' must be a list of strings")
    topics = tuple(dict.fromkeys(raw_topics))
    recover = payload.get("recover") is True
    raw = payload.get("recovery")
    positions: dict[str, tuple[str, int]] = {}
    invalid: dict[str, str] = {}
    if raw is None or not recover:
        return RecoveryRequest(topics, recover, positions, invalid)
    if not isinstance(raw, Mapping):
        raise DecodeError("subscription_update 'recovery' must be an object")
    wanted = set(topics)
    for topic, entry in raw.items():
        if not isinstance(topic, str) or topic not in wanted:
            invalid[str(topic)] = "topic not in 'topics'"
            continue
        if not isinstance(entry, Mapping):
            invalid[topic] = "position must be an object"
            continue
        try:
            epoch = format_epoch(parse_epoch(entry.get("epoch")))
            offset = parse_offset(entry.get("offset"))
        except DecodeError as exc:
            invalid[topic] = exc.message
            continue
        positions[topic] = (epoch, offset)
    return RecoveryRequest(topics, recover, positions, invalid)


def subscription_reply(
    outcomes: Mapping[str, RecoveryOutcome] | None,
    *,
    success_topics: Iterable[str],
    failed_topics: Iterable[str] = (),
    recoverable: bool = True,
) -> dict[str, Any]:
    """The ``p`` of the server's ``subscription_update`` reply (ref §3.4).

    ``success`` is false only when every topic failed. With ``outcomes`` None (no
    recovery asked or recovery disabled) the recovery members are left out;
    otherwise ``recovered`` is true only when every topic recovered.
    """
    ok = list(success_topics)
    failed = list(failed_topics)
    reply: dict[str, Any] = {
        "action": "subscribe",
        "success": bool(ok) or not failed,
        "success_topics": ok,
        "failed_topics": failed,
    }
    if outcomes is not None:
        reply["recoverable"] = recoverable
        reply["recovered"] = bool(outcomes) and all(o.recovered for o in outcomes.values())
        reply["recovery"] = {t: o.reply_entry() for t, o in outcomes.items()}
    return reply


def recovery_result(outcomes: Mapping[str, RecoveryOutcome]) -> dict[str, Any]:
    """``subscribe_with_recovery``'s return value (ref §7.3)."""
    return {
        "recovered": all(o.recovered for o in outcomes.values()),
        "topics": {t: o.result_entry() for t, o in outcomes.items()},
    }

"""``ClusterNode``: one node's whole cluster state, without I/O (CLUSTER §8).

Theory of operation
-------------------
The node owns every :class:`~wse_proto.cluster.link.PeerLink` of this server and the
address book behind them. A transport drives it and executes what it asks for; the
server (hub) tells it about local interest, publications and presence changes.

Inputs (transport): :meth:`ClusterNode.accept` for an inbound socket,
:meth:`connection_made` / :meth:`connection_failed` for a :class:`Dial` it executed,
:meth:`receive_data`, :meth:`receive_eof`, :meth:`connection_lost`, and
:meth:`handle_timer` at :meth:`next_deadline`.
Inputs (server): :meth:`subscribe` / :meth:`unsubscribe` (reference-counted local
interest), :meth:`publish`, :meth:`sync_presence`, :meth:`drain`, :meth:`shutdown`.

Output: after every call, :meth:`intents` returns what to do, in order:
:class:`Dial` an address, :class:`Send` bytes on a link, :class:`CloseLink` (after
writing the Sends before it), :class:`Deliver` a received publication to local
subscribers, :class:`PresenceNotify` local subscribers, and the informational
:class:`LinkUp` / :class:`LinkDown`.

Decisions (CLUSTER §8, DECISIONS F9):

- Duplicate links (F9a): the instance id rule only chooses between two links of the
  same pair. A link dialed by the lower id beats one dialed by the higher id; between
  two links of the same dialer the newer one wins (the dialer only dials again when it
  believes the old one is dead). An acceptor answers any dialer unless the dialer is
  itself or already holds a better link; a losing or refused dial is retried with the
  normal backoff, so late joiners and restarted nodes (higher ids) always link.
- Addresses: every known address (static, seed or discovered) is dialed unless the
  instance last seen behind it is linked. The instance comes from our own dial's
  HELLO or from the PEER_ANNOUNCE of a peer's setup burst (its own address), so two
  nodes that already share a link do not keep dialing each other. Discovered
  addresses are forgotten after ``forget_after`` failures in a row; static ones are
  retried forever. Backoff and circuit breaker are per address (§8.7).
- Discovery: a new address is forwarded to the other peers, and so is the own address
  a peer announces when its link comes up, so a node that joins or returns is
  announced to everybody even where its address was already known (§8.7 forwards
  only new ones; receivers still forward only what is new to them, so nothing loops).
- Presence (§8.6): each link is its own origin. Everything a link told us is purged
  when it ends (F9d), and a new link starts from the peer's PRESENCE_FULL, so a
  leave lost with a dying link never leaves a ghost behind.
- Recovery (§8.4, F9b/F9c): :meth:`publish` takes the payload local subscribers got
  (stamped when the topic has a buffer) and the publication's own epoch and offset;
  received MSGs with a trailer are stored in the foreign buffers of the
  :class:`~wse_proto.recovery.RecoveryStore`, never re-stamped.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from wse_proto._defaults import RandFn, WallClockMs
from wse_proto.errors import LocalProtocolError
from wse_proto.presence import PresenceEvent, PresenceState
from wse_proto.recovery import RecoveryStore
from wse_proto.topics import topic_bytes

from .frames import (
    CAP_RECOVERY,
    CAP_ZSTD,
    PRESENCE_JOIN,
    PRESENCE_LEAVE,
    PeerAnnounce,
    PresenceFull,
    PresenceUpdate,
    ZstdContext,
    encode,
    encode_msg,
    parse_presence_full,
    presence_full_frames,
)
from .link import (
    AddressAnnounced,
    CloseReason,
    DeadLetter,
    FrameRejected,
    LinkClosed,
    LinkConfig,
    LinkEvent,
    LinkRole,
    MsgReceived,
    PeerDraining,
    PeerHello,
    PeerInterest,
    PeerLink,
    PeerListReceived,
    PresenceFullReceived,
    PresenceReceived,
    ResyncDue,
    dead_letters_from,
)

__all__ = [
    "Backoff",
    "BreakerState",
    "CircuitBreaker",
    "CloseLink",
    "ClusterConfig",
    "ClusterMetrics",
    "ClusterNode",
    "Deliver",
    "Dial",
    "Intent",
    "LinkDown",
    "LinkUp",
    "PresenceNotify",
    "Send",
    "valid_peer_address",
]


# --------------------------------------------------------------------------- config


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """Node-wide settings; defaults are the original's (CLUSTER §5, §8.7)."""

    link: LinkConfig = field(default_factory=LinkConfig)
    backoff_initial: float = 1.0
    backoff_factor: float = 1.5
    backoff_max: float = 60.0
    jitter_min: float = 0.8
    jitter_max: float = 1.2
    breaker_threshold: int = 10
    breaker_open_for: float = 60.0
    breaker_half_open_calls: int = 3
    breaker_close_after: int = 3
    max_peers: int = 256
    max_inbound: int = 128
    dlq_size: int = 1000
    dial_timeout: float = 10.0
    """A :class:`Dial` not answered by connection_made/failed in time counts as failed
    (TCP connect 5 s + TLS 5 s in the original)."""
    forget_after: int = 10
    """Consecutive failures after which a discovered (non-static) address is dropped."""
    presence: bool = True
    """Exchange PRESENCE_UPDATE / PRESENCE_FULL (needs a PresenceState)."""

    def __post_init__(self) -> None:
        positive = ("backoff_initial", "backoff_max", "breaker_open_for", "dial_timeout")
        for name in positive:
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value > 0):
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if not self.backoff_factor >= 1:
            raise ValueError(f"backoff_factor must be >= 1, got {self.backoff_factor!r}")
        if not 0 < self.jitter_min <= self.jitter_max:
            raise ValueError("jitter bounds must satisfy 0 < jitter_min <= jitter_max")
        counts = (
            "breaker_threshold",
            "breaker_half_open_calls",
            "breaker_close_after",
            "max_peers",
            "max_inbound",
            "dlq_size",
            "forget_after",
        )
        for name in counts:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")


# --------------------------------------------------------------------------- backoff, breaker


class Backoff:
    """Reconnect delays: ``initial * factor**n`` capped at ``max``, times a jitter factor
    drawn uniformly from ``[jitter_min, jitter_max)`` with the injected ``rand``."""

    __slots__ = ("_max_n", "_rand", "attempts", "config")

    def __init__(self, config: ClusterConfig, rand: RandFn) -> None:
        self.config = config
        self._rand = rand
        self.attempts = 0
        n = 0
        while config.backoff_initial * config.backoff_factor**n < config.backoff_max and n < 64:
            n += 1
        self._max_n = n  # beyond this the cap applies (and powers cannot overflow)

    def base(self) -> float:
        c = self.config
        n = min(self.attempts, self._max_n)
        return float(min(c.backoff_initial * c.backoff_factor**n, c.backoff_max))

    def next_delay(self) -> float:
        """The delay before the next attempt; each call moves one step up."""
        c = self.config
        base = self.base()
        self.attempts += 1
        u = int.from_bytes(self._rand(4), "big") / 4294967296.0
        return base * (c.jitter_min + (c.jitter_max - c.jitter_min) * u)

    def reset(self) -> None:
        self.attempts = 0


class BreakerState:
    CLOSED: Final = "closed"
    OPEN: Final = "open"
    HALF_OPEN: Final = "half_open"


class CircuitBreaker:
    """CLUSTER §8.7: ``threshold`` failures in a row open it for ``open_for`` seconds;
    then half-open lets ``half_open_calls`` attempts run at a time; ``close_after``
    successes close it, any failure reopens it."""

    __slots__ = (
        "close_after",
        "failures",
        "half_open_calls",
        "in_flight",
        "open_for",
        "open_until",
        "state",
        "successes",
        "threshold",
    )

    def __init__(
        self,
        threshold: int = 10,
        open_for: float = 60.0,
        half_open_calls: int = 3,
        close_after: int = 3,
    ) -> None:
        self.threshold = threshold
        self.open_for = open_for
        self.half_open_calls = half_open_calls
        self.close_after = close_after
        self.state: str = BreakerState.CLOSED
        self.failures = 0
        self.successes = 0
        self.in_flight = 0
        self.open_until = 0.0

    def ready_at(self, now: float) -> float | None:
        """When an attempt may start (``now`` if it may start now); None while the
        half-open slots are all taken (wait for an outcome)."""
        if self.state == BreakerState.OPEN:
            return self.open_until if self.open_until > now else now
        if self.state == BreakerState.HALF_OPEN and self.in_flight >= self.half_open_calls:
            return None
        return now

    def allow(self, now: float) -> bool:
        """Start an attempt now? (Takes a half-open slot when it says yes.)"""
        if self.state == BreakerState.OPEN:
            if now < self.open_until:
                return False
            self.state = BreakerState.HALF_OPEN
            self.in_flight = 0
            self.successes = 0
        if self.state == BreakerState.HALF_OPEN:
            if self.in_flight >= self.half_open_calls:
                return False
            self.in_flight += 1
        return True

    def record_success(self) -> None:
        if self.state == BreakerState.HALF_OPEN:
            self.in_flight = max(0, self.in_flight - 1)
            self.successes += 1
            if self.successes >= self.close_after:
                self.state = BreakerState.CLOSED
                self.failures = 0
        else:
            self.failures = 0

    def record_failure(self, now: float) -> None:
        if self.state == BreakerState.HALF_OPEN:
            self._open(now)
        elif self.state == BreakerState.CLOSED:
            self.failures += 1
            if self.failures >= self.threshold:
                self._open(now)

    def _open(self, now: float) -> None:
        self.state = BreakerState.OPEN
        self.open_until = now + self.open_for
        self.in_flight = 0
        self.successes = 0


# --------------------------------------------------------------------------- intents


@dataclass(frozen=True, slots=True)
class Intent:
    """Base of what the node asks its transport or server to do."""


@dataclass(frozen=True, slots=True)
class Dial(Intent):
    """Open a TCP (or TLS) connection to ``address``; report the outcome with
    ``connection_made(link_id, now)`` or ``connection_failed(link_id, now)``."""

    link_id: int
    address: str


@dataclass(frozen=True, slots=True)
class Send(Intent):
    link_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class CloseLink(Intent):
    """Close the socket of ``link_id`` once the Sends queued before this are written."""

    link_id: int


@dataclass(frozen=True, slots=True)
class Deliver(Intent):
    """A publication from a peer for local subscribers: send ``payload`` as a text
    frame, as received (never stamped; encrypted per connection, F9e)."""

    topic: str
    payload: bytes
    instance_id: str


@dataclass(frozen=True, slots=True)
class PresenceNotify(Intent):
    """A visible presence change caused by a peer: emit ``event`` to local subscribers."""

    event: PresenceEvent


@dataclass(frozen=True, slots=True)
class LinkUp(Intent):
    link_id: int
    instance_id: str
    address: str
    capabilities: int


@dataclass(frozen=True, slots=True)
class LinkDown(Intent):
    link_id: int
    instance_id: str
    address: str
    reason: CloseReason


@dataclass(slots=True)
class ClusterMetrics:
    """Counters behind the ``cluster_*`` health keys (reference §10.5)."""

    messages_sent: int = 0
    messages_delivered: int = 0
    messages_dropped: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    reconnects: int = 0
    unknown_message_types: int = 0
    frames_rejected: int = 0
    dead_letters: int = 0
    invalid_addresses: int = 0
    presence_ignored: int = 0


# --------------------------------------------------------------------------- addresses


def valid_peer_address(address: str) -> bool:
    """``ip:port`` with a literal IPv4 or bracketed IPv6 address (CLUSTER §8.7: gossip
    carries socket addresses, never host names)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not port.isascii() or not 0 < int(port) < 65536:
        return False
    try:
        if host.startswith("[") and host.endswith("]"):
            ipaddress.IPv6Address(host[1:-1])
        else:
            ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


class _Addr:
    """One known address: how to reach it and what was behind it last time."""

    __slots__ = (
        "address",
        "backoff",
        "breaker",
        "dial_link",
        "dials",
        "failures",
        "instance",
        "not_before",
        "self_alias",
        "static",
    )

    def __init__(self, address: str, static: bool, config: ClusterConfig, rand: RandFn) -> None:
        self.address = address
        self.static = static
        self.instance: str | None = None
        self.backoff = Backoff(config, rand)
        self.breaker = CircuitBreaker(
            config.breaker_threshold,
            config.breaker_open_for,
            config.breaker_half_open_calls,
            config.breaker_close_after,
        )
        self.not_before = float("-inf")
        self.dial_link: int | None = None
        self.failures = 0
        self.dials = 0
        self.self_alias = False


class _Link:
    """A PeerLink plus what the node knows about it."""

    __slots__ = ("addr", "connected_at", "counted", "established", "link", "origin")

    def __init__(self, link: PeerLink, addr: _Addr | None) -> None:
        self.link = link
        self.addr = addr  # the dialed address (dialer links only)
        self.origin = ""
        self.established = False
        self.connected_at = 0
        self.counted = False  # the dial outcome was already recorded


# --------------------------------------------------------------------------- the node


class ClusterNode:
    """All cluster links and cluster state of one server. See the module docstring."""

    def __init__(
        self,
        instance_id: str,
        *,
        rand: RandFn,
        wall_ms: WallClockMs,
        now: float,
        address: str | None = None,
        peers: Iterable[str] = (),
        config: ClusterConfig | None = None,
        recovery: RecoveryStore | None = None,
        presence: PresenceState | None = None,
    ) -> None:
        if not instance_id:
            raise LocalProtocolError("a cluster node needs an instance id")
        self.instance_id = instance_id
        self.address = address
        self.config = config if config is not None else ClusterConfig()
        self.recovery = recovery
        self.presence = presence
        self.metrics = ClusterMetrics()
        self._rand = rand
        self._wall_ms = wall_ms
        self._zstd = ZstdContext()
        self._links: dict[int, _Link] = {}
        self._peers: dict[str, _Link] = {}  # instance id -> its established link
        self._dials: dict[int, tuple[_Addr, float]] = {}  # Dial sent, no socket yet
        self._addrs: dict[str, _Addr] = {}
        self._interest: dict[str, int] = {}
        self._origins: set[str] = set()
        self._intents: list[Intent] = []
        self._dirty: dict[int, _Link] = {}
        self._dlq: deque[DeadLetter] = deque(maxlen=self.config.dlq_size)
        self._inbound = 0
        self._next_id = 0
        self._unknown_closed = 0
        self._stopped = False
        self._dial_at: float | None = None
        self._dial_stale = True  # addresses or links changed: recompute _dial_at
        self.draining = False
        for peer in peers:
            self._learn(peer, now, static=True)

    # ------------------------------------------------------------------ output

    def intents(self) -> list[Intent]:
        """Everything to do since the last call, in order (the list is handed over)."""
        out = self._intents
        self._intents = []
        return out

    def _flush(self, now: float) -> None:
        """End of every public call: start due dials, hand link output over."""
        if not self._stopped:
            at = self._dial_deadline()
            if at is not None and now >= at:
                self._dial_due(now)
        dirty = self._dirty
        if not dirty:
            return
        intents = self._intents
        sent = 0
        for lid, lk in dirty.items():
            data = lk.link.data_to_send()
            if data:
                intents.append(Send(lid, data))
                sent += len(data)
        dirty.clear()
        self.metrics.bytes_sent += sent

    # ------------------------------------------------------------------ queries

    @property
    def peer_count(self) -> int:
        return len(self._peers)

    def peers(self) -> list[str]:
        """Instance ids of the linked peers."""
        return list(self._peers)

    def link_of(self, instance_id: str) -> PeerLink | None:
        lk = self._peers.get(instance_id)
        return None if lk is None else lk.link

    def peer_interest(self, instance_id: str) -> PeerInterest | None:
        lk = self._peers.get(instance_id)
        return None if lk is None else lk.link.interest

    def local_interest(self) -> list[str]:
        return list(self._interest)

    def known_addresses(self) -> list[str]:
        return list(self._addrs)

    def address_state(self, address: str) -> dict[str, Any] | None:
        """Backoff, breaker and last instance of a known address (for metrics and tests)."""
        a = self._addrs.get(address)
        if a is None:
            return None
        return {
            "static": a.static,
            "instance_id": a.instance,
            "failures": a.failures,
            "breaker": a.breaker.state,
            "not_before": a.not_before,
            "dialing": a.dial_link is not None,
        }

    def cluster_info(self) -> list[dict[str, Any]]:
        """``cluster_info()`` entries (reference §10.5)."""
        return [
            {
                "address": lk.link.address,
                "capabilities": lk.link.capabilities,
                "connected_at": lk.connected_at,
                "instance_id": inst,
            }
            for inst, lk in self._peers.items()
        ]

    @property
    def dlq_size(self) -> int:
        return len(self._dlq)

    def take_dead_letters(self) -> list[DeadLetter]:
        """Drain the dead-letter queue (``get_cluster_dlq_entries``)."""
        out = list(self._dlq)
        self._dlq.clear()
        return out

    @property
    def unknown_message_types(self) -> int:
        return self._unknown_closed + sum(lk.link.unknown_frames for lk in self._links.values())

    # ------------------------------------------------------------------ transport input

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def accept(self, remote_address: str, now: float) -> int | None:
        """A socket was accepted on the cluster port; None: refuse it (close at once).

        At most ``max_inbound`` inbound links at a time (CLUSTER §8.7).
        """
        if self._stopped or self._inbound >= self.config.max_inbound:
            return None
        lid = self._new_id()
        link = PeerLink(
            LinkRole.ACCEPTOR,
            self.instance_id,
            now,
            address=remote_address,
            link_id=lid,
            config=self.config.link,
        )
        self._links[lid] = _Link(link, None)
        self._inbound += 1
        return lid

    def connection_made(self, link_id: int, now: float) -> None:
        """The connection of a :class:`Dial` is up: send our HELLO."""
        entry = self._dials.pop(link_id, None)
        if entry is None:
            self._intents.append(CloseLink(link_id))  # timed out or cancelled meanwhile
            return
        self._dial_stale = True
        a = entry[0]
        link = PeerLink(
            LinkRole.DIALER,
            self.instance_id,
            now,
            address=a.address,
            link_id=link_id,
            config=self.config.link,
        )
        lk = _Link(link, a)
        self._links[link_id] = lk
        self._dirty[link_id] = lk
        self._flush(now)

    def connection_failed(self, link_id: int, now: float) -> None:
        """The connection of a :class:`Dial` could not be opened."""
        entry = self._dials.pop(link_id, None)
        if entry is not None:
            self._dial_failed(entry[0], now)
        self._flush(now)

    def receive_data(self, link_id: int, data: bytes | bytearray | memoryview, now: float) -> None:
        lk = self._links.get(link_id)
        if lk is None:
            return
        self.metrics.bytes_received += len(data)
        lk.link.receive_data(data, now)
        self._drive(lk, now)
        self._flush(now)

    def receive_eof(self, link_id: int, now: float) -> None:
        lk = self._links.get(link_id)
        if lk is not None:
            lk.link.receive_eof(now)
            self._drive(lk, now)
        self._flush(now)

    def connection_lost(self, link_id: int, now: float, *, unsent: bytes = b"") -> None:
        """The transport lost the socket (reset, write error) or gave up a Dial.

        ``unsent``: bytes of earlier :class:`Send` intents it could not write, from a
        frame boundary on; their publications go to the dead-letter queue (§8.7).
        """
        lk = self._links.get(link_id)
        if lk is not None:
            if unsent:
                letters = dead_letters_from(unsent, lk.link.address)
                self._dlq.extend(letters)
                self.metrics.dead_letters += len(letters)
            lk.link.abort(now)
            self._drive(lk, now)
        else:
            entry = self._dials.pop(link_id, None)
            if entry is not None:
                self._dial_failed(entry[0], now)
        self._flush(now)

    # ------------------------------------------------------------------ timers

    def next_deadline(self) -> float | None:
        """The earliest time :meth:`handle_timer` has work to do, or None."""
        best: float | None = None
        for lk in self._links.values():
            dl = lk.link.next_deadline()
            if dl is not None and (best is None or dl < best):
                best = dl
        for _, dl in self._dials.values():
            if best is None or dl < best:
                best = dl
        if not self._stopped:
            t = self._dial_deadline()
            if t is not None and (best is None or t < best):
                best = t
        return best

    def handle_timer(self, now: float) -> None:
        """Heartbeats, periodic RESYNC, dial timeouts and due dials."""
        for lk in list(self._links.values()):
            dl = lk.link.next_deadline()
            if dl is not None and now >= dl:
                lk.link.handle_timer(now)
                self._drive(lk, now)
        for lid, (a, deadline) in list(self._dials.items()):
            if now >= deadline:
                del self._dials[lid]
                self._intents.append(CloseLink(lid))
                self._dial_failed(a, now)
        self._flush(now)

    # ------------------------------------------------------------------ dialing

    def _learn(
        self, address: str, now: float, *, static: bool = False
    ) -> tuple[_Addr | None, bool]:
        """Add an address to the book; returns ``(entry, is_new)`` (None: own or full)."""
        a = self._addrs.get(address)
        if a is not None:
            if static:
                a.static = True
            return a, False
        if address == self.address:
            return None, False
        if len(self._addrs) >= self.config.max_peers:
            return None, False
        a = _Addr(address, static, self.config, self._rand)
        a.not_before = now
        self._addrs[address] = a
        self._dial_stale = True
        return a, True

    def _wants_dial(self, a: _Addr) -> bool:
        if a.dial_link is not None or a.self_alias:
            return False
        inst = a.instance
        return inst is None or inst not in self._peers

    def _dial_time(self, a: _Addr) -> float | None:
        ready = a.breaker.ready_at(a.not_before)
        if ready is None:
            return None
        return a.not_before if a.not_before > ready else ready

    def _dial_deadline(self) -> float | None:
        """When the next dial is due (cached: publications must not scan the book)."""
        if self._dial_stale:
            self._dial_stale = False
            best: float | None = None
            for a in self._addrs.values():
                if self._wants_dial(a):
                    t = self._dial_time(a)
                    if t is not None and (best is None or t < best):
                        best = t
            self._dial_at = best
        return self._dial_at

    def _dial_due(self, now: float) -> None:
        self._dial_stale = True
        for a in list(self._addrs.values()):
            if not self._wants_dial(a):
                continue
            t = self._dial_time(a)
            if t is None or now < t or not a.breaker.allow(now):
                continue
            lid = self._new_id()
            a.dial_link = lid
            a.dials += 1
            if a.dials > 1:
                self.metrics.reconnects += 1
            self._dials[lid] = (a, now + self.config.dial_timeout)
            self._intents.append(Dial(lid, a.address))

    def _dial_failed(self, a: _Addr, now: float) -> None:
        self._dial_stale = True
        a.dial_link = None
        a.breaker.record_failure(now)
        a.failures += 1
        a.not_before = now + a.backoff.next_delay()
        forget = not a.static and a.failures >= self.config.forget_after
        if forget and self._addrs.get(a.address) is a:
            del self._addrs[a.address]

    def _dial_reached(self, a: _Addr) -> None:
        """The address answered with a HELLO: reachable, whatever we then decided."""
        self._dial_stale = True
        a.dial_link = None
        a.breaker.record_success()
        a.backoff.reset()
        a.failures = 0

    def _instance_lost(self, instance: str, now: float) -> None:
        """The instance has no link any more: its addresses are dialed again after the
        first backoff step (CLUSTER §8.7: a dialer reconnects with backoff)."""
        self._dial_stale = True
        for a in self._addrs.values():
            if a.instance == instance and a.dial_link is None:
                a.not_before = max(a.not_before, now + a.backoff.next_delay())

    # ------------------------------------------------------------------ link events

    def _drive(self, lk: _Link, now: float) -> None:
        link = lk.link
        while True:
            events = link.events_received()
            if not events:
                break
            for ev in events:
                self._on_event(lk, ev, now)
        if lk.link.link_id in self._links:
            self._dirty[link.link_id] = lk

    def _on_event(self, lk: _Link, ev: LinkEvent, now: float) -> None:
        cls = type(ev)
        if cls is MsgReceived:
            assert isinstance(ev, MsgReceived)
            self._on_msg(lk, ev, now)
        elif cls is PresenceReceived:
            assert isinstance(ev, PresenceReceived)
            self._on_presence(lk, ev.update)
        elif cls is PresenceFullReceived:
            assert isinstance(ev, PresenceFullReceived)
            self._on_presence_full(lk, ev.data)
        elif cls is ResyncDue:
            lk.link.send_resync(self._interest)
        elif cls is AddressAnnounced:
            assert isinstance(ev, AddressAnnounced)
            self._on_announce(lk, ev, now)
        elif cls is PeerListReceived:
            assert isinstance(ev, PeerListReceived)
            for address in ev.addresses:
                if valid_peer_address(address):
                    self._learn(address, now)
                else:
                    self.metrics.invalid_addresses += 1
        elif cls is PeerHello:
            assert isinstance(ev, PeerHello)
            self._on_hello(lk, ev, now)
        elif cls is LinkClosed:
            assert isinstance(ev, LinkClosed)
            self._on_closed(lk, ev, now)
        elif cls is FrameRejected:
            self.metrics.frames_rejected += 1
        elif cls is PeerDraining:
            pass  # the link already cleared the peer's interest (CLUSTER §8.3)

    def _preferred(self, lk: _Link) -> bool:
        """Was this link dialed by the lower instance id of the pair? (CLUSTER §8.2)"""
        peer = lk.link.peer_instance
        assert peer is not None
        if lk.link.role is LinkRole.DIALER:
            return self.instance_id < peer
        return peer < self.instance_id

    def _on_hello(self, lk: _Link, ev: PeerHello, now: float) -> None:
        """The tiebreak of F9a, decided before an acceptor answers."""
        peer = ev.instance_id
        a = lk.addr
        if a is not None:
            a.instance = peer
            self._dial_stale = True
        if peer == self.instance_id:
            # We reached ourselves (an alias of our address). The acceptor answers so
            # that our dialing side learns it and never dials that address again.
            if a is not None:
                a.self_alias = True
            lk.link.refuse(answer=True)
            return
        if self._stopped:
            lk.link.refuse()
            return
        current = self._peers.get(peer)
        if current is not None:
            if self._preferred(lk) < self._preferred(current):
                if a is not None:
                    self._dial_reached(a)
                    lk.counted = True
                lk.link.refuse(CloseReason.REFUSED)
                return
            # Better, or the same dialer again (it believes the old link is dead).
            current.link.close(CloseReason.SUPERSEDED)
            self._drive(current, now)
        elif len(self._peers) >= self.config.max_peers:
            lk.link.refuse()
            return
        self._establish(lk, peer, now)

    def _establish(self, lk: _Link, peer: str, now: float) -> None:
        link = lk.link
        lk.established = True
        lk.connected_at = self._wall_ms()
        origin = link.address or f"link-{link.link_id}"
        if origin in self._origins:
            origin = f"{origin}#{link.link_id}"
        self._origins.add(origin)
        lk.origin = origin
        self._peers[peer] = lk
        self._dial_stale = True
        if lk.addr is not None:
            self._dial_reached(lk.addr)
            lk.counted = True
        self._intents.append(LinkUp(link.link_id, peer, link.address, link.capabilities))
        link.accept(
            now,
            interest=self._interest,
            announce=self.address,
            peers=self._peer_list(),
            presence=self._presence_chunks(),
        )
        if self.draining:
            link.send_drain()

    def _peer_list(self) -> list[str]:
        """Known addresses for PEER_LIST (at most 256), linked ones first."""
        linked = [
            a.address
            for a in self._addrs.values()
            if not a.self_alias and a.instance is not None and a.instance in self._peers
        ]
        seen = set(linked)
        rest = [
            a.address for a in self._addrs.values() if not a.self_alias and a.address not in seen
        ]
        return (linked + rest)[:256]

    def _presence_chunks(self) -> list[PresenceFull] | None:
        if self.presence is None or not self.config.presence:
            return None
        snapshot = self.presence.full_snapshot()
        entries = {
            topic: {
                user: (item["data"], max(0, int(item["updated_at"])))
                for user, item in users.items()
            }
            for topic, users in snapshot.items()
        }
        try:
            return presence_full_frames(entries)
        except LocalProtocolError:
            return None

    def _on_closed(self, lk: _Link, ev: LinkClosed, now: float) -> None:
        """F9d: the same cleanup for every link end, dialed or accepted."""
        link = lk.link
        lid = link.link_id
        if self._links.pop(lid, None) is None:
            return
        self._dirty.pop(lid, None)
        data = link.data_to_send()
        if data:
            self._intents.append(Send(lid, data))
            self.metrics.bytes_sent += len(data)
        self._intents.append(CloseLink(lid))
        self._unknown_closed += link.unknown_frames
        self.metrics.messages_dropped += link.dropped_frames + link.invalid_msgs
        if link.role is LinkRole.ACCEPTOR:
            self._inbound -= 1
        if ev.dead_letters:
            self._dlq.extend(ev.dead_letters)
            self.metrics.dead_letters += len(ev.dead_letters)
        if lk.established:
            peer = link.peer_instance
            assert peer is not None
            self._intents.append(LinkDown(lid, peer, link.address, ev.reason))
            self._origins.discard(lk.origin)
            if self._peers.get(peer) is lk:
                del self._peers[peer]
                self._instance_lost(peer, now)
            if self.presence is not None:
                for pev in self.presence.purge_origin(lk.origin):
                    if pev.notify:
                        self._intents.append(PresenceNotify(pev))
        elif lk.addr is not None and not lk.counted:
            self._dial_failed(lk.addr, now)

    # ------------------------------------------------------------------ publications

    def _on_msg(self, lk: _Link, ev: MsgReceived, now: float) -> None:
        self.metrics.messages_delivered += 1
        peer = lk.link.peer_instance
        assert peer is not None
        self._intents.append(Deliver(ev.topic, ev.payload, peer))
        if ev.epoch is not None and ev.offset is not None and self.recovery is not None:
            # CLUSTER §8.4: stored as received, at the origin's (epoch, offset).
            self.recovery.store_foreign(ev.topic, ev.epoch, ev.offset, ev.payload, now)

    def publish(
        self,
        topic: str,
        payload: bytes,
        now: float,
        *,
        epoch: int | None = None,
        offset: int | None = None,
    ) -> int:
        """Send a local publication to every peer that wants it (CLUSTER §8.3, §7).

        ``payload`` is exactly what local subscribers received: the stamped JSON when
        the topic has a recovery buffer, with that stamp's ``epoch`` and ``offset``
        (F9b, F9c). Each MSG variant (trailer or not, zstd or not) is built once.
        Returns the number of peers it was queued for.
        """
        peers = self._peers
        if not peers:
            return 0
        raw = topic_bytes(topic)
        has_trailer = epoch is not None and offset is not None
        variants: list[bytes | None] = [None, None, None, None]
        sent = 0
        dirty = self._dirty
        for lk in peers.values():
            link = lk.link
            if not link.interest.wants(topic, raw):
                continue
            caps = link.capabilities
            index = (2 if has_trailer and caps & CAP_RECOVERY else 0) | (
                1 if caps & CAP_ZSTD else 0
            )
            frame = variants[index]
            if frame is None:
                frame = variants[index] = encode_msg(
                    topic,
                    payload,
                    epoch=epoch if index & 2 else None,
                    offset=offset if index & 2 else None,
                    zstd=bool(index & 1),
                    context=self._zstd,
                )
            if link.send_msg(frame):
                sent += 1
                dirty[link.link_id] = lk
            else:
                self.metrics.messages_dropped += 1
        self.metrics.messages_sent += sent
        self._flush(now)
        return sent

    # ------------------------------------------------------------------ interest

    def subscribe(self, topic: str, now: float) -> bool:
        """One more local subscription to ``topic`` (exact or glob). The first one sends
        SUB to peers with bit0 (CLUSTER §8.3); returns True then."""
        count = self._interest.get(topic, 0)
        self._interest[topic] = count + 1
        if count:
            return False
        for lk in self._peers.values():
            if lk.link.send_sub(topic):
                self._dirty[lk.link.link_id] = lk
        self._flush(now)
        return True

    def unsubscribe(self, topic: str, now: float) -> bool:
        """One local subscription fewer; the last one sends UNSUB (returns True then)."""
        count = self._interest.get(topic, 0)
        if count <= 0:
            return False
        if count > 1:
            self._interest[topic] = count - 1
            return False
        del self._interest[topic]
        for lk in self._peers.values():
            if lk.link.send_unsub(topic):
                self._dirty[lk.link.link_id] = lk
        self._flush(now)
        return True

    # ------------------------------------------------------------------ discovery

    def _on_announce(self, lk: _Link, ev: AddressAnnounced, now: float) -> None:
        address = ev.address
        if not valid_peer_address(address):
            self.metrics.invalid_addresses += 1
            return
        a, new = self._learn(address, now)
        if a is None:
            return
        if ev.own:
            a.instance = lk.link.peer_instance  # the peer's own address (setup burst)
            self._dial_stale = True
        if not (new or ev.own):
            return
        frame = PeerAnnounce(address)
        for other in self._peers.values():
            if other is not lk:
                other.link.send_frame(frame)
                self._dirty[other.link.link_id] = other

    # ------------------------------------------------------------------ presence

    def sync_presence(self, events: Iterable[PresenceEvent], now: float) -> int:
        """Send local presence changes (the ``sync`` events of the PresenceState) to peers
        with bit2 as PRESENCE_UPDATE (CLUSTER §8.6). Returns the frames queued."""
        if not self.config.presence:
            return 0
        queued = 0
        for pev in events:
            if not pev.sync:
                continue
            frame = encode(
                PresenceUpdate(pev.topic, pev.action, pev.updated_at, pev.user_id, pev.data_json)
            )
            for lk in self._peers.values():
                if lk.link.send_presence(frame):
                    queued += 1
                    self._dirty[lk.link.link_id] = lk
        self._flush(now)
        return queued

    def _notify(self, events: list[PresenceEvent]) -> None:
        intents = self._intents
        for pev in events:
            if pev.notify:
                intents.append(PresenceNotify(pev))

    def _on_presence(self, lk: _Link, update: PresenceUpdate) -> None:
        presence = self.presence
        if presence is None or not self.config.presence:
            return
        data: Any = None
        if update.action != PRESENCE_LEAVE and update.data:
            try:
                data = orjson.loads(update.data)
            except orjson.JSONDecodeError:
                self.metrics.presence_ignored += 1
                return
        self._notify(
            presence.merge_remote(
                lk.origin, update.topic, update.action, update.user_id, data, update.updated_at
            )
        )

    def _on_presence_full(self, lk: _Link, data: bytes) -> None:
        presence = self.presence
        if presence is None or not self.config.presence:
            return
        parsed = parse_presence_full(data)
        if parsed is None:
            self.metrics.presence_ignored += 1  # CLUSTER §3.12: ignored, not a link error
            return
        origin = lk.origin
        out: list[PresenceEvent] = []
        for topic, users in parsed.items():
            for user, (value, updated_at) in users.items():
                out.extend(
                    presence.merge_remote(origin, topic, PRESENCE_JOIN, user, value, updated_at)
                )
        self._notify(out)

    # ------------------------------------------------------------------ lifecycle

    def drain(self, now: float) -> None:
        """We are draining: DRAIN to every peer, so they stop routing to us (§8.3)."""
        self.draining = True
        for lk in self._peers.values():
            lk.link.send_drain()
            self._dirty[lk.link.link_id] = lk
        self._flush(now)

    def shutdown(self, now: float) -> None:
        """Stop: SHUTDOWN on every open link, close the others, dial nothing more."""
        self._stopped = True
        for lk in list(self._links.values()):
            if lk.link.is_open:
                lk.link.shutdown()
            else:
                lk.link.close(CloseReason.SHUTDOWN)
            self._drive(lk, now)
        for lid in list(self._dials):
            self._intents.append(CloseLink(lid))
        self._dials.clear()
        for a in self._addrs.values():
            a.dial_link = None
        self._dial_stale = True
        self._flush(now)

    @property
    def stopped(self) -> bool:
        return self._stopped

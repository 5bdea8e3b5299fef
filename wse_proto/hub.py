"""``ServerCore``: the whole multi-connection server state, without I/O.

Theory of operation
-------------------
A transport (asyncio, gevent, threads) owns the sockets and calls into one
``ServerCore`` under one lock:

- ``open_connection(now)`` when a TCP connection is accepted (``None``: refuse it),
  then ``feed``/``eof``/``timer``/``connection_lost`` with that connection. Each of
  these drives the :class:`~wse_proto.server.ServerConnection` machine and then
  turns its events into hub state and into the inbound queue of 3-tuples the
  application drains (reference §10.4).
- After *every* call into the core the transport flushes :meth:`ServerCore.take_dirty`
  (each connection's ``data_to_send()``), closes sockets whose connection
  ``wants_close``, re-arms ``next_deadline()`` timers, and pauses reading while
  :meth:`ServerCore.inbound_full` (F6: TCP backpressure instead of drops), resuming
  when :meth:`ServerCore.inbound_resumable`.
- The application (``WSEServer``) calls the app API (``send_event``, ``broadcast_local``,
  ``subscribe``...). Those calls queue output on connections and mark them dirty; when
  the dirty set goes from empty to non-empty the ``set_wakeup`` hook fires so a
  transport running in another thread knows to flush.

Connections become visible to the app API and to broadcasts when their ``Connected``
event is processed, i.e. after ``server_ready`` was queued (reference §3.1), and stop
being visible at ``ConnectionClosed``.

Inbound queue: received messages arrive from the machine in its compact form (drain
tuples, no event object per message; see :mod:`wse_proto.server`) and are queued as one
batch per transport call, so a read of hundreds of messages costs one append;
:meth:`ServerCore.pop_inbound` slices batches. While the queue is deep (a slow consumer)
the machines queue JSON text unparsed (:class:`~wse_proto.server.InboundMode`) and
``pop_inbound`` parses it: a backlog of bytes is far cheaper to hold than one of dicts.
A transport may set ``defer_inbound_notice`` and call :meth:`ServerCore.announce_inbound`
after its writes, so waking the application never delays the bytes for the peer.

Fan-out (reference §2.4, decisions K3/F5): a publication is category-injected once,
framed once as a text frame, and the same ``bytes`` object is queued on every plain
subscriber; encrypted subscribers encrypt it themselves inside ``send_broadcast``.

Recovery and presence (PROTOCOL §13-§14) live in :mod:`wse_proto.hub_recovery` and
:mod:`wse_proto.hub_presence`; the core calls them at publication (stamp and store, the
stored object is the one sent), subscription (replay in the same step, F8; presence join),
unsubscription and unregistering (presence leave), for clients' ``subscription_update``
recovery requests, and from :meth:`ServerCore.housekeeping` (TTL, presence sweep).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal

from . import envelope, hub_recovery
from ._defaults import RandFn, WallClockMs
from .codec import encode_event
from .config import ServerConfig
from .events import AuthRejected, Connected, ConnectionClosed, Event
from .hub_presence import HubPresence
from .hub_recovery import HubRecovery, Position
from .metrics import Gauges, Metrics, health_snapshot, prometheus_text
from .presence import PresenceConfig, PresenceEvent
from .ratelimit import DEDUP_WINDOW_SIZE, DedupWindow
from .recovery import NOT_RECOVERABLE, RecoveryConfig, RecoveryOutcome
from .server import ConnectionState, InboundMode, Pending, ServerConnection, resolve
from .topics import GlobPattern, TopicACL, compile_glob, is_glob, topic_bytes, valid_topic
from .ws import binary_frame, text_frame

__all__ = [
    "CoreConfig",
    "InboundEvent",
    "ServerCore",
]

InboundEvent = tuple[str, str | None, Any]
"""A drain tuple: ``(kind, conn_id, value)`` (reference §10.4)."""

_OPEN: Final = ConnectionState.OPEN

_GLOB_CACHE_MAX: Final = 4096
"""Topics whose glob matches are memoised; the cache is dropped when it grows past this."""
_DEFER_DEPTH: Final = 8192
"""Inbound queue depth from which connections queue JSON text unparsed (InboundMode)."""


@dataclass(frozen=True, slots=True)
class CoreConfig:
    """Server-wide settings of the hub; defaults are the original constructor's (§6.1).

    ``connection`` is handed to every :class:`ServerConnection`. ``recovery_enabled``
    is kept in sync with ``connection.recovery_enabled`` (server_ready announces it).
    ``inbound_low_water`` defaults to half of ``max_inbound_queue_size``. ``recovery`` and
    ``presence`` hold the limits used when the feature is enabled;
    ``recovery_wire_handling`` makes the hub answer clients' recovery requests itself
    (PROTOCOL §13.3).
    """

    max_connections: int = 1000
    max_inbound_queue_size: int = 131_072
    inbound_low_water: int | None = None
    max_outbound_queue_bytes: int = 16_777_216
    max_subscriptions_per_connection: int = 0
    recovery_enabled: bool = False
    presence_enabled: bool = False
    slow_consumer_policy: Literal["drop", "disconnect"] = "drop"
    inbound_overflow: Literal["backpressure", "drop"] = "backpressure"
    dedup_size: int = DEDUP_WINDOW_SIZE
    connection: ServerConfig = field(default_factory=ServerConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    presence: PresenceConfig = field(default_factory=PresenceConfig)
    recovery_wire_handling: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.recovery, RecoveryConfig):
            raise ValueError("recovery must be a RecoveryConfig")
        if not isinstance(self.presence, PresenceConfig):
            raise ValueError("presence must be a PresenceConfig")
        for name in (
            "max_connections",
            "max_inbound_queue_size",
            "max_outbound_queue_bytes",
            "dedup_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        limit = self.max_subscriptions_per_connection
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"max_subscriptions_per_connection must be an int >= 0, got {limit!r}")
        low = self.inbound_low_water
        if low is not None and (
            isinstance(low, bool)
            or not isinstance(low, int)
            or not 0 <= low < self.max_inbound_queue_size
        ):
            raise ValueError("inbound_low_water must be an int in [0, max_inbound_queue_size)")
        if self.slow_consumer_policy not in ("drop", "disconnect"):
            raise ValueError(
                "slow_consumer_policy must be 'drop' or 'disconnect', "
                f"got {self.slow_consumer_policy!r}"
            )
        if self.inbound_overflow not in ("backpressure", "drop"):
            raise ValueError(
                f"inbound_overflow must be 'backpressure' or 'drop', got {self.inbound_overflow!r}"
            )
        if not isinstance(self.connection, ServerConfig):
            raise ValueError("connection must be a ServerConfig")
        if self.recovery_enabled != self.connection.recovery_enabled:
            on = self.recovery_enabled or self.connection.recovery_enabled
            object.__setattr__(self, "recovery_enabled", on)
            object.__setattr__(self, "connection", replace(self.connection, recovery_enabled=on))


class _Member:
    """Hub-side state of one registered connection: what to undo when it goes."""

    __slots__ = ("acl", "conn", "groups", "topics")

    def __init__(self, conn: ServerConnection, acl: TopicACL | None) -> None:
        self.conn = conn
        self.acl = acl
        self.topics: dict[str, None] = {}  # fan-out subscriptions, exact and glob
        self.groups: dict[tuple[str, str], None] = {}  # (topic, group) memberships

    def count(self) -> int:
        """Subscriptions held, as counted against max_subscriptions_per_connection (§10.1)."""
        return len(self.topics) + len(self.groups)


class _Group:
    """One queue group of one topic: members in join order and a round-robin counter."""

    __slots__ = ("counter", "members")

    def __init__(self) -> None:
        self.members: list[ServerConnection] = []
        self.counter = 0


class ServerCore:
    """Connections, subscriptions, ACLs, queue groups, fan-out, inbound queue, metrics.

    ``rand`` and ``wall_ms`` are injected (connection ids are UUIDv7s, envelopes need
    timestamps); ``now`` is the monotonic time the server started (for uptime).
    """

    def __init__(
        self,
        config: CoreConfig | None = None,
        *,
        rand: RandFn,
        wall_ms: WallClockMs,
        now: float = 0.0,
        logger: logging.Logger | None = None,
    ) -> None:
        self.config = config = config if config is not None else CoreConfig()
        self._rand = rand
        self._wall_ms = wall_ms
        self._started = now
        self._log = logger if logger is not None else logging.getLogger("wse_proto.hub")
        self.metrics = Metrics()
        self._seq = 0
        self._draining = False
        self._drain_close: tuple[int | None, str] | None = None
        # Every connection the transport opened and that is not gone (handshakes too).
        self._open: dict[str, ServerConnection] = {}
        # Registered (Connected, not yet ConnectionClosed): what the app API sees.
        self._members: dict[str, _Member] = {}
        self._registered: dict[str, ServerConnection] = {}  # same keys, for broadcast_all
        # Subscription indexes: topic/pattern -> {conn_id: conn}, insertion-ordered.
        self._exact: dict[str, dict[str, ServerConnection]] = {}
        self._globs: dict[str, dict[str, ServerConnection]] = {}
        self._glob_list: tuple[tuple[GlobPattern, dict[str, ServerConnection]], ...] = ()
        self._glob_cache: dict[str, tuple[dict[str, ServerConnection], ...]] = {}
        self._groups: dict[str, dict[str, _Group]] = {}
        self._dedup = DedupWindow(config.dedup_size)
        self._backlog_limit = config.max_outbound_queue_bytes
        self._disconnect_slow = config.slow_consumer_policy == "disconnect"
        # Inbound queue (§10.4) and its water marks (F6). Messages are queued in batches
        # (one list per transport call and connection, as the machine hands them over,
        # in its compact form), so a burst costs one append here; pop_inbound slices
        # the batches and turns them into drain tuples (server.resolve).
        # Entries: (conn_id, items, deferred): deferred batches may hold unparsed JSON.
        self._inbound: deque[tuple[str, list[Pending], bool]] = deque()
        self._inbound_len = 0  # messages and lifecycle tuples queued, not yet popped
        self._inbound_head = 0  # items of the first batch already popped
        self._mode = InboundMode()  # shared with every connection
        self._inbound_max = config.max_inbound_queue_size
        self._inbound_low = (
            config.inbound_low_water
            if config.inbound_low_water is not None
            else config.max_inbound_queue_size // 2
        )
        self._drop_inbound = config.inbound_overflow == "drop"
        self._inbound_added = False
        self._inbound_paused = False  # the queue reached its limit since the last resume
        self.on_inbound: Callable[[], None] | None = None
        """Called after events were queued (e.g. to wake a blocked ``drain_inbound``)."""
        self.defer_inbound_notice = False
        """Set by a transport that calls :meth:`announce_inbound` itself after writing
        the output of a call: ``on_inbound`` then fires after the write, not before, so
        waking the application does not delay the bytes for the peer."""
        self.on_inbound_resumable: Callable[[], None] | None = None
        """Called by :meth:`pop_inbound` when a queue that was full drains to the low-water
        mark, so a transport in another thread can resume reading."""
        self.on_interest: Callable[[str, bool], None] | None = None
        """Cluster glue (hub_cluster.py): called with ``(topic, True)`` for every new
        fan-out subscription and ``(topic, False)`` for every one dropped (CLUSTER §8.3:
        counted per connection subscription; queue groups create no interest)."""
        self.on_presence_sync: Callable[[list[PresenceEvent]], None] | None = None
        """Cluster glue: every batch of local presence events (the ``sync`` ones go to
        peers, CLUSTER §8.6)."""
        # Output bookkeeping. A fan-out records its whole recipient map in _dirty_maps
        # (one entry per publication, merged at take_dirty) instead of one entry per
        # recipient; whoever leaves a map before the merge is added to _dirty directly.
        self._dirty: dict[str, ServerConnection] = {}
        self._dirty_maps: dict[int, dict[str, ServerConnection]] = {}
        self._wakeup: Callable[[], None] | None = None
        # Recovery and presence (hub_recovery.py, hub_presence.py); None when disabled.
        self._recovery = (
            HubRecovery(self, config.recovery, rand, wire=config.recovery_wire_handling)
            if config.recovery_enabled
            else None
        )
        self._take_requests = (
            self._recovery.take_requests
            if self._recovery is not None and config.recovery_wire_handling
            else None
        )
        self._presence = (
            HubPresence(self, config.presence, now) if config.presence_enabled else None
        )

    # ------------------------------------------------------------------ small helpers

    def _next_seq(self) -> int:
        """The server-wide ``seq`` counter of ``send_event`` (§2.3): 0, 1, 2, ..."""
        seq = self._seq
        self._seq = seq + 1
        return seq

    @property
    def draining(self) -> bool:
        """``drain()`` or ``shutdown()`` was called: new connections are refused."""
        return self._draining

    def set_wakeup(self, fn: Callable[[], None] | None) -> None:
        """Register the hook called when app calls make the dirty set non-empty."""
        self._wakeup = fn

    def data_to_send(self, conn: ServerConnection) -> bytes:
        """``conn.data_to_send()``, counted in ``wse_bytes_sent_total``: transports flush
        through this so the byte counter covers every frame, control frames included."""
        data = conn.data_to_send()
        self.metrics.bytes_sent += len(data)
        return data

    def take_dirty(self) -> list[ServerConnection]:
        """Open connections with output queued since the last call, each once.

        The transport writes ``data_to_send(conn)`` for each of them.
        """
        dirty = self._dirty
        maps = self._dirty_maps
        if maps:
            for recipients in maps.values():
                dirty.update(recipients)
            maps.clear()
        if not dirty:
            return []
        self._dirty = {}
        is_open = self._open
        return [c for cid, c in dirty.items() if c.pending_bytes and cid in is_open]

    def _clean(self) -> bool:
        return not self._dirty and not self._dirty_maps

    def _woken(self, was_clean: bool) -> None:
        """Fire the wakeup hook if this app call made the dirty set non-empty."""
        if was_clean and self._wakeup is not None and not self._clean():
            self._wakeup()

    def get_connection(self, conn_id: str) -> ServerConnection | None:
        """The registered connection with this id (cookies, claims, path...)."""
        member = self._members.get(conn_id)
        return member.conn if member is not None else None

    # ------------------------------------------------------------------ transport side

    def open_connection(self, now: float) -> ServerConnection | None:
        """A new TCP connection; ``None`` means drop it (draining or max_connections, §6.5)."""
        if self._draining or len(self._open) >= self.config.max_connections:
            self.metrics.connections_rejected += 1
            return None
        conn_id = envelope.uuid7(self._wall_ms(), self._rand)
        conn = ServerConnection(
            self.config.connection,
            conn_id=conn_id,
            now=now,
            rand=self._rand,
            wall_ms=self._wall_ms,
            next_seq=self._next_seq,
            inbound_mode=self._mode,
        )
        self._open[conn_id] = conn
        self.metrics.connections_accepted += 1
        return conn

    def feed(
        self, conn: ServerConnection, data: bytes | bytearray | memoryview, now: float
    ) -> None:
        """Bytes read from ``conn``'s socket."""
        self.metrics.bytes_received += len(data)
        conn.receive_data(data, now)
        self._after_io(conn)

    def eof(self, conn: ServerConnection, now: float) -> None:
        """The peer closed its side of ``conn``'s socket."""
        conn.receive_eof(now)
        self._after_io(conn)

    def timer(self, conn: ServerConnection, now: float) -> None:
        """``conn.next_deadline()`` has passed."""
        conn.handle_timer(now)
        self._after_io(conn)

    def connection_lost(self, conn: ServerConnection, now: float) -> None:
        """The socket is gone (closed by us after ``wants_close``, or an I/O error)."""
        conn.abort()
        self._after_io(conn)
        self._open.pop(conn.conn_id, None)
        self._dirty.pop(conn.conn_id, None)

    def _after_io(self, conn: ServerConnection) -> None:
        """Process what a transport call produced; the conn is flushed via take_dirty."""
        self._process(conn)
        if conn.pending_bytes:
            self._dirty[conn.conn_id] = conn
        if not self.defer_inbound_notice:
            self._notify_inbound()

    def announce_inbound(self) -> None:
        """Fire ``on_inbound`` if events were queued since the last notice (for
        transports that set ``defer_inbound_notice``)."""
        self._notify_inbound()

    def _closed_by_app(self, conn: ServerConnection) -> None:
        """After an app-side ``close()``: unregister at once (ConnectionClosed is already
        emitted: the connection carries no more messages) and queue ``disconnect``."""
        self._process(conn)
        if conn.pending_bytes:
            self._dirty[conn.conn_id] = conn
        self._notify_inbound()

    def _notify_inbound(self) -> None:
        if self._inbound_added:
            self._inbound_added = False
            if self.on_inbound is not None:
                self.on_inbound()

    def _process(self, conn: ServerConnection) -> None:
        """Turn the machine's events into hub state and inbound tuples (§10.4)."""
        while True:
            items, has_events = conn.take_items()
            if not items:
                break
            if has_events:
                self._dispatch(conn, items)
            else:  # the common case: only received messages
                self.metrics.messages_received += len(items)
                self._push_many(conn.conn_id, items)  # type: ignore[arg-type]
        # Counters kept by the machine itself.
        if conn.decrypt_failures:
            self.metrics.decrypt_failures += conn.decrypt_failures
            conn.decrypt_failures = 0

    def _dispatch(self, conn: ServerConnection, items: list[Event | Pending]) -> None:
        metrics = self.metrics
        cid = conn.conn_id
        run: list[Pending] = []  # messages since the last event object
        for ev in items:
            if not isinstance(ev, Event):
                run.append(ev)
                continue
            if run:
                metrics.messages_received += len(run)
                self._push_many(cid, run)
                run = []
            if isinstance(ev, Connected):
                self._register(conn, ev)
            elif isinstance(ev, ConnectionClosed):
                self._unregister(conn)
            elif isinstance(ev, AuthRejected):
                metrics.auth_failures += 1
        if run:
            metrics.messages_received += len(run)
            self._push_many(cid, run)

    def _push(self, cid: str, item: InboundEvent) -> None:
        """Queue a lifecycle tuple (connect/disconnect): never dropped, in either mode."""
        self._inbound.append((cid, [item], False))  # type: ignore[list-item]
        self._inbound_len += 1
        self._inbound_added = True
        if self._inbound_len >= self._inbound_max and not self._drop_inbound:
            self._inbound_paused = True

    def _push_many(self, cid: str, items: list[Pending]) -> None:
        """Queue received messages (the list is kept, not copied). Without
        ``inbound_overflow="drop"`` nothing is ever dropped (F6): the transport pauses
        reading while :meth:`inbound_full`; with it, what does not fit is counted.
        Recovery requests are answered here when the hub handles them (PROTOCOL §13.3).
        """
        if self._take_requests is not None:
            items = self._take_requests(cid, items)
            if not items:
                return
        if self._drop_inbound:
            room = self._inbound_max - self._inbound_len
            if room < len(items):
                self.metrics.inbound_dropped += len(items) - max(room, 0)
                if room <= 0:
                    return
                items = items[:room]
        # A batch made while deferral was on may hold bytes; the flag cannot have been
        # switched on after the batch was made without being on now (pop clears it).
        self._inbound.append((cid, items, self._mode.deferred))
        self._inbound_len += len(items)
        self._inbound_added = True
        if self._inbound_len >= _DEFER_DEPTH:
            self._mode.deferred = True
        if self._inbound_len >= self._inbound_max and not self._drop_inbound:
            self._inbound_paused = True

    def _register(self, conn: ServerConnection, ev: Connected) -> None:
        cid = conn.conn_id
        self._members[cid] = _Member(conn, ev.acl)
        self._registered[cid] = conn
        if ev.user_id is not None:
            self._push(cid, ("auth_connect", cid, ev.user_id))
        else:
            self._push(cid, ("connect", cid, ev.cookies))
        if self._drain_close is not None:
            # Finished its handshake while we drain: it gets the same Close as the rest.
            code, reason = self._drain_close
            conn.close(code, reason)

    def _unregister(self, conn: ServerConnection) -> None:
        cid = conn.conn_id
        member = self._members.pop(cid, None)
        if member is None:
            return  # never reached Connected (rejected upgrade or auth): no disconnect event
        del self._registered[cid]
        if conn.pending_bytes:
            self._dirty[cid] = conn  # it leaves recipient maps that may still be pending
        self._drop_topics(member, list(member.topics))
        self._drop_groups(member, list(member.groups))
        if self._presence is not None:
            self._presence.leave(cid, None)  # the other subscribers see it leave (ref §8)
        self._push(cid, ("disconnect", cid, None))

    # ------------------------------------------------------------------ inbound queue

    def inbound_full(self) -> bool:
        """The transport must stop reading (backpressure mode only, F6)."""
        return not self._drop_inbound and self._inbound_len >= self._inbound_max

    def inbound_resumable(self) -> bool:
        """The queue drained below the low-water mark: reading may resume."""
        return self._inbound_len <= self._inbound_low

    def inbound_queue_depth(self) -> int:
        return self._inbound_len

    def inbound_dropped_count(self) -> int:
        """Events dropped because the queue was full (always 0 in backpressure mode)."""
        return self.metrics.inbound_dropped

    def pop_inbound(self, max_count: int = 256) -> list[InboundEvent]:
        """Take up to ``max_count`` queued drain tuples, oldest first."""
        total = self._inbound_len
        if total <= 0 or max_count <= 0:
            return []
        queue = self._inbound
        head = self._inbound_head
        items: list[InboundEvent] = []
        need = min(max_count, total)
        self._inbound_len = total - need
        while need:
            cid, batch, deferred = queue[0]
            left = len(batch) - head
            if left > need:
                part = batch[head : head + need]
                items += resolve(cid, part) if deferred else part  # type: ignore[arg-type]
                head += need
                break
            part = batch[head:] if head else batch
            items += resolve(cid, part) if deferred else part  # type: ignore[arg-type]
            queue.popleft()
            head = 0
            need -= left
        self._inbound_head = head
        if self._inbound_len < _DEFER_DEPTH // 2:
            self._mode.deferred = False
        if self._inbound_paused and self._inbound_len <= self._inbound_low:
            self._inbound_paused = False
            if self.on_inbound_resumable is not None:
                self.on_inbound_resumable()
        return items

    # ------------------------------------------------------------------ app API: sends

    def send_event(
        self,
        conn_id: str,
        event: Mapping[str, Any],
        compression_threshold: int = 1024,
        *,
        now: float,
    ) -> int:
        """Envelope and send one event (§2.3); returns the frame payload length.

        0 when ``event["id"]`` repeats within the server-wide dedup window, when the
        rate limiter drops it, when the connection is backlogged (slow consumer) or
        closing. Like the original, an unknown ``conn_id`` still returns the length
        the payload would have had (the original's delivery is asynchronous).
        """
        event_id = event.get("id")
        if isinstance(event_id, str) and not self._dedup.add(f"{conn_id}\0{event_id}"):
            return 0
        if conn_id not in self._members:
            built = envelope.build_event(
                event,
                wall_ms=self._wall_ms(),
                rand=self._rand,
                seq=self._next_seq() if "seq" not in event else 0,
            )
            payload, _ = encode_event(
                built, msgpack=False, compression_threshold=compression_threshold
            )
            return len(payload)
        conn = self._writable(conn_id)
        if conn is None:
            return 0
        was_clean, before = self._clean(), conn.pending_bytes
        limited = conn.rate_limited_count
        n = conn.send_event(event, now=now, compression_threshold=compression_threshold)
        if conn.rate_limited_count != limited:
            self.metrics.rate_limited += conn.rate_limited_count - limited
        if n:
            self._sent_one(conn, before, was_clean)
        elif conn.pending_bytes > before:  # a RATE_LIMITED frame went out
            self._dirty[conn_id] = conn
            self._woken(was_clean)
        return n

    def _writable(self, conn_id: str) -> ServerConnection | None:
        """The registered connection, or None when unknown or backlogged (counted, §6.4)."""
        member = self._members.get(conn_id)
        if member is None:
            return None
        conn = member.conn
        if conn.pending_bytes + conn.transport_backlog >= self._backlog_limit:
            self._slow_consumer(conn)
            return None
        return conn

    def _sent_one(self, conn: ServerConnection, before: int, was_clean: bool) -> None:
        if conn.pending_bytes > before:
            self.metrics.messages_sent += 1
            self._dirty[conn.conn_id] = conn
            self._woken(was_clean)

    def send(self, conn_id: str, text: str) -> None:
        """A verbatim text frame, never encrypted (§2.4, §6.4 edge cases)."""
        conn = self._writable(conn_id)
        if conn is not None:
            was_clean, before = self._clean(), conn.pending_bytes
            conn.send_text(text)
            self._sent_one(conn, before, was_clean)

    def send_bytes(self, conn_id: str, data: bytes) -> None:
        """A verbatim binary frame, never encrypted."""
        conn = self._writable(conn_id)
        if conn is not None:
            was_clean, before = self._clean(), conn.pending_bytes
            conn.send_bytes(data)
            self._sent_one(conn, before, was_clean)

    # ------------------------------------------------------------------ app API: fan-out

    def _glob_targets(self, topic: str) -> tuple[dict[str, ServerConnection], ...]:
        """Subscriber maps of every glob pattern matching ``topic`` (memoised)."""
        cache = self._glob_cache
        hit = cache.get(topic)
        if hit is not None:
            return hit
        data = topic_bytes(topic)
        found = tuple(subs for pattern, subs in self._glob_list if pattern.match_bytes(data))
        if len(cache) >= _GLOB_CACHE_MAX:
            cache.clear()
        cache[topic] = found
        return found

    def _globs_changed(self) -> None:
        """A pattern appeared or vanished: rebuild the match list, forget memoised matches."""
        self._glob_list = tuple((compile_glob(p), subs) for p, subs in self._globs.items())
        self._glob_cache.clear()

    def _targets(self, topic: str) -> dict[str, ServerConnection] | None:
        """Fan-out recipients of ``topic``, each connection once (exact and globs, §10.2)."""
        exact = self._exact.get(topic)
        if not self._globs:
            return exact
        globs = self._glob_targets(topic)
        if not globs:
            return exact
        merged: dict[str, ServerConnection] = dict(exact) if exact else {}
        for subs in globs:
            merged.update(subs)
        return merged

    def _is_active_topic(self, topic: str) -> bool:
        return bool(self._targets(topic)) or topic in self._groups

    def broadcast_local(self, topic: str, text: str, *, now: float | None = None) -> int:
        """Publish ``text`` to the subscribers of ``topic`` on this server (§2.4).

        With recovery on, a JSON object is stamped and stored first (PROTOCOL §13.2);
        ``now`` (monotonic) dates the write for the TTL; without it the store's latest
        time counts (never older than the core's start). Returns the number of
        connections the message was queued on (the original returns None; the facade
        drops it).
        """
        self.metrics.count_topic(topic, self._is_active_topic)
        targets = self._targets(topic)
        groups = self._groups.get(topic)
        if not targets and not groups and not self.config.recovery_enabled:
            return 0  # nobody to deliver to and nothing to record
        rec = self._recovery
        if rec is not None:  # one stamped bytes object, stored and sent (no copy)
            payload = rec.produce(topic, text, self._started if now is None else now)
        else:
            payload = envelope.inject_category(text).encode("utf-8")
        if not targets and not groups:
            return 0
        frame = text_frame(payload)
        was_clean = self._clean()
        sent = self._fan_out(targets, frame, payload) if targets else 0
        if groups:
            sent += self._deliver_groups(groups, frame, payload)
        self._woken(was_clean)
        return sent

    def broadcast_all(self, text: str) -> int:
        """Send ``text`` (category-injected, text frame) to every connection (§2.4)."""
        payload = envelope.inject_category(text).encode("utf-8")
        return self._broadcast_everyone(text_frame(payload), payload)

    def broadcast_all_bytes(self, data: bytes) -> int:
        """Send ``data`` as a binary frame to every connection (encrypted ones get ``E:``)."""
        payload = bytes(data)
        return self._broadcast_everyone(binary_frame(payload), payload)

    def _broadcast_everyone(self, frame: bytes, payload: bytes) -> int:
        targets = self._registered
        if not targets:
            return 0
        was_clean = self._clean()
        sent = self._fan_out(targets, frame, payload)
        self._woken(was_clean)
        return sent

    def _fan_out(self, targets: dict[str, ServerConnection], frame: bytes, payload: bytes) -> int:
        """The hot loop: one ``send_broadcast`` per recipient, nothing allocated per delivery."""
        limit = self._backlog_limit
        slow: list[ServerConnection] | None = None
        for conn in targets.values():
            if conn.pending_bytes + conn.transport_backlog >= limit:
                if slow is None:
                    slow = []
                slow.append(conn)
                continue
            conn.send_broadcast(frame, payload)
        self._dirty_maps[id(targets)] = targets
        sent = len(targets)
        if slow is not None:
            sent -= len(slow)
            for conn in slow:
                self._slow_consumer(conn)
        self.metrics.messages_sent += sent
        return sent

    def _deliver_groups(self, groups: dict[str, _Group], frame: bytes, payload: bytes) -> int:
        """One copy per queue group, round-robin, skipping closing or backlogged members
        (§10.1); encrypted members get ``E:`` frames like any fan-out (F5)."""
        limit = self._backlog_limit
        sent = 0
        for group in groups.values():
            members = group.members
            n = len(members)
            start = group.counter % n
            group.counter += 1
            for i in range(n):
                conn = members[(start + i) % n]
                if conn.state is not _OPEN or conn.pending_bytes + conn.transport_backlog >= limit:
                    continue
                conn.send_broadcast(frame, payload)
                self._dirty[conn.conn_id] = conn
                sent += 1
                break
            else:
                self.metrics.slow_consumer_drops += 1
        self.metrics.messages_sent += sent
        return sent

    def _slow_consumer(self, conn: ServerConnection) -> None:
        """§6.4: a message for a backlogged connection is dropped and counted; with
        ``slow_consumer_policy="disconnect"`` the connection is also closed with 1013, so
        the client reconnects and can recover (F16; a status-less Close would end a
        wse-client session for good)."""
        self.metrics.slow_consumer_drops += 1
        if self._disconnect_slow and conn.state is _OPEN:
            conn.close(1013, "slow consumer")
            self._closed_by_app(conn)

    # ------------------------------------------------------------------ app API: subscriptions

    def subscribe(
        self,
        conn_id: str,
        topics: Iterable[str],
        queue_group: str | None = None,
        presence_data: Any = None,
    ) -> None:
        """Subscribe a connection to topics (exact or glob), or join a queue group (§10.1-2).

        Topics with control characters are dropped with a warning, topics the
        connection's ACL denies are dropped silently; at the subscription limit this
        raises ``RuntimeError`` (even for a topic already held), below it the list is
        truncated to fit. Unknown connection ids are a silent no-op. With presence
        enabled, ``presence_data`` (not None) joins the presence of the topics kept
        (ref §8); without it, it is ignored like the original.
        """
        if isinstance(topics, str):
            raise TypeError("topics must be a list of strings, not a string")
        member = self._members.get(conn_id)
        if member is None:
            return
        wanted: list[str] = []
        acl = member.acl
        for topic in topics:
            if not valid_topic(topic):
                self._log.warning(
                    "dropping subscription to a topic with control characters: %r", topic
                )
                continue
            if acl is not None and not acl.is_allowed(topic):
                continue
            wanted.append(topic)
        limit = self.config.max_subscriptions_per_connection
        if limit:
            held = member.count()
            if held >= limit:
                raise RuntimeError(f"Connection {conn_id} reached max subscriptions ({limit})")
            del wanted[limit - held :]
        conn = member.conn
        if queue_group is None:
            for topic in wanted:
                if topic in member.topics:
                    continue
                member.topics[topic] = None
                if self.on_interest is not None:
                    self.on_interest(topic, True)
                if is_glob(topic):
                    subs = self._globs.get(topic)
                    if subs is None:
                        subs = self._globs[topic] = {}
                        self._globs_changed()
                    subs[conn_id] = conn
                else:
                    self._exact.setdefault(topic, {})[conn_id] = conn
        else:
            for topic in wanted:
                key = (topic, queue_group)
                if key in member.groups:
                    continue
                member.groups[key] = None
                group = self._groups.setdefault(topic, {}).setdefault(queue_group, _Group())
                group.members.append(conn)
        if presence_data is not None and self._presence is not None:
            was_clean = self._clean()
            if self._presence.join(conn, wanted, presence_data):
                self._notify_inbound()
            self._woken(was_clean)

    def unsubscribe(self, conn_id: str, topics: Iterable[str] | None = None) -> None:
        """Leave topics (and every queue group of those topics); ``None`` leaves all (§10.1)."""
        if isinstance(topics, str):
            raise TypeError("topics must be a list of strings, not a string")
        member = self._members.get(conn_id)
        if member is None:
            return
        if topics is None:
            self._drop_topics(member, list(member.topics))
            self._drop_groups(member, list(member.groups))
            self._presence_left(conn_id, None)
            return
        wanted = dict.fromkeys(topics)  # duplicates collapse, order kept
        self._drop_topics(member, [t for t in wanted if t in member.topics])
        self._drop_groups(member, [key for key in member.groups if key[0] in wanted])
        self._presence_left(conn_id, wanted)

    def _presence_left(self, conn_id: str, topics: Iterable[str] | None) -> None:
        """Presence: the connection left ``topics`` (every topic when None), ref §8."""
        if self._presence is not None:
            was_clean = self._clean()
            if self._presence.leave(conn_id, topics):
                self._notify_inbound()
            self._woken(was_clean)

    def _drop_topics(self, member: _Member, topics: list[str]) -> None:
        conn = member.conn
        cid = conn.conn_id
        if topics and conn.pending_bytes:
            self._dirty[cid] = conn  # it may leave a recipient map still waiting in _dirty_maps
        for topic in topics:
            del member.topics[topic]
            if self.on_interest is not None:
                self.on_interest(topic, False)
            index = self._globs if is_glob(topic) else self._exact
            subs = index.get(topic)
            if subs is None:
                continue
            subs.pop(cid, None)
            if not subs:
                del index[topic]
                if index is self._globs:
                    self._globs_changed()

    def _drop_groups(self, member: _Member, keys: list[tuple[str, str]]) -> None:
        conn = member.conn
        for key in keys:
            del member.groups[key]
            topic, name = key
            groups = self._groups.get(topic)
            if groups is None:
                continue
            group = groups.get(name)
            if group is None:
                continue
            group.members.remove(conn)
            if not group.members:
                del groups[name]
                if not groups:
                    del self._groups[topic]

    def set_topic_acl(
        self,
        conn_id: str,
        allow: Iterable[str] | None = None,
        deny: Iterable[str] | None = None,
    ) -> None:
        """Replace the connection's topic ACL, including one from its JWT (§10.2).

        Applies to later ``subscribe`` calls only; existing subscriptions stay.
        """
        member = self._members.get(conn_id)
        if member is None:
            return
        member.acl = TopicACL(tuple(allow or ()), tuple(deny or ()))

    def get_topic_subscriber_count(self, topic: str) -> int:
        """Fan-out subscribers registered under exactly this topic string (pattern
        strings count their own subscribers); queue-group members are not counted."""
        subs = self._globs.get(topic) if is_glob(topic) else self._exact.get(topic)
        return len(subs) if subs else 0

    def get_queue_group_info(self, topic: str) -> dict[str, int]:
        """``{group: member_count}`` for ``topic``."""
        groups = self._groups.get(topic)
        if not groups:
            return {}
        return {name: len(group.members) for name, group in groups.items()}

    # ------------------------------------------------------------------ app API: recovery, presence

    def subscribe_with_recovery(
        self,
        conn_id: str,
        topics: Iterable[str],
        positions: Mapping[str, Position] | None = None,
        *,
        now: float,
    ) -> dict[str, RecoveryOutcome]:
        """Subscribe, then judge each topic on its own ``(epoch, offset)`` and queue the
        replays in the same step, so the live stream follows each replay with no gap and
        no repeat (PROTOCOL §13.3-13.5, F8, F10). Topics without a position only get the
        current one. Raises DecodeError for an invalid position after subscribing (ref
        §7.3). With recovery disabled every topic is not recoverable.
        """
        if isinstance(topics, str):
            raise TypeError("topics must be a list of strings, not a string")
        wanted = list(dict.fromkeys(topics))
        rec = self._recovery
        if rec is not None:
            return rec.subscribe(conn_id, wanted, positions or {}, now)
        self.subscribe(conn_id, wanted)
        hub_recovery.check_positions(positions or {})
        return dict.fromkeys(wanted, NOT_RECOVERABLE)

    def presence(self, topic: str) -> dict[str, dict[str, Any]]:
        """``{user_id: {"data", "connections"}}`` (PROTOCOL §14.3); empty when disabled."""
        return self._presence.state.members(topic) if self._presence is not None else {}

    def presence_stats(self, topic: str) -> dict[str, int]:
        """``{"num_users", "num_connections"}`` in O(1); zeros when disabled or unknown."""
        if self._presence is None:
            return {"num_users": 0, "num_connections": 0}
        return self._presence.state.stats(topic)

    def update_presence(self, conn_id: str, data: Any) -> None:
        """Replace the user's presence data on every topic it joined, one
        ``presence_update`` each (ref §8). LocalProtocolError when the data is too large
        or the connection is unknown; a no-op when presence is disabled."""
        if self._presence is None:
            return
        was_clean = self._clean()
        if self._presence.update(conn_id, data):
            self._notify_inbound()
        self._woken(was_clean)

    def housekeeping(self, now: float) -> None:
        """Periodic work, driven by the facade at :meth:`next_housekeeping`: expire
        idle recovery buffers (``recovery_ttl``) and run the 30 s presence sweep."""
        if self._recovery is not None:
            self._recovery.expire(now)
        if self._presence is not None:
            was_clean = self._clean()
            if self._presence.sweep(now):
                self._notify_inbound()
            self._woken(was_clean)

    def next_housekeeping(self) -> float | None:
        """When :meth:`housekeeping` has work next (None: never)."""
        due: float | None = None
        if self._recovery is not None:
            due = self._recovery.next_deadline()
        if self._presence is not None:
            sweep = self._presence.next_deadline()
            due = sweep if due is None else min(due, sweep)
        return due

    # ------------------------------------------------------------------ app API: lifecycle

    def disconnect(self, conn_id: str) -> None:
        """Close without a status code (K7; the peer sees 1005). Unknown ids: no-op."""
        member = self._members.get(conn_id)
        if member is None:
            return
        was_clean = self._clean()
        member.conn.close(None)
        self._closed_by_app(member.conn)
        self._woken(was_clean)

    def _close_all(self, code: int | None, reason: str) -> None:
        self._draining = True
        self._drain_close = (code, reason)
        was_clean = self._clean()
        for conn in list(self._registered.values()):
            conn.close(code, reason)
            self._closed_by_app(conn)
        self._woken(was_clean)

    def drain(self, close_code: int = 4300, reason: str = "") -> None:
        """Refuse new connections and close every client with ``close_code`` (§10.3)."""
        self._close_all(close_code, reason)

    def shutdown(self) -> None:
        """Close every client with 1001 "server shutting down" (§6.5) and refuse new ones."""
        self._close_all(1001, "server shutting down")

    def get_connection_count(self) -> int:
        return len(self._members)

    def get_connections(self) -> list[str]:
        return list(self._members)

    # ------------------------------------------------------------------ observability

    def _topic_count(self) -> int:
        return len(self._exact.keys() | self._globs.keys() | self._groups.keys())

    def _gauges(self, now: float) -> Gauges:
        config = self.config
        buffers, stored = self._recovery.stats(now) if self._recovery is not None else (0, 0)
        state = self._presence.state if self._presence is not None else None
        return Gauges(
            connections=len(self._members),
            inbound_queue_depth=self._inbound_len,
            uptime_secs=max(0, int(now - self._started)),
            topics=self._topic_count(),
            recovery_enabled=config.recovery_enabled,
            recovery_topic_count=buffers,
            recovery_total_bytes=stored,
            presence_enabled=config.presence_enabled,
            presence_topics=state.topic_count() if state is not None else 0,
            presence_total_users=state.total_users() if state is not None else 0,
        )

    def health_snapshot(self, now: float) -> dict[str, Any]:
        """The original's health dict, same keys in the same order (§10.5)."""
        return health_snapshot(self.metrics, self._gauges(now))

    def prometheus_metrics(self, now: float) -> str:
        """Prometheus text exposition with the original's metric names (§10.5)."""
        return prometheus_text(self.metrics, self._gauges(now))

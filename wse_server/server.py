"""``WSEServer``: the original 2.5.1 server API over wse_proto and a pluggable transport.

Threading model. One :class:`wse_proto.hub.ServerCore` holds every connection and
subscription; one ``threading.Lock`` guards it. The transport (by default asyncio in a
daemon thread) feeds socket bytes into the core under that lock; the methods below take the
same lock, queue output on connections and let the core wake the transport, which writes
all queued frames of a connection at once. Blocking calls (``drain_inbound``) wait on a
condition built on that lock. Callbacks (``set_callbacks``) run on a dedicated dispatcher
thread, never on the I/O loop, so a slow callback never stalls the sockets.

Inbound events are never dropped (decision F6): when the application falls behind, the
transport stops reading until the queue drains below half, and clients slow down.

Recovery (PROTOCOL §13) and presence (§14) live in the core; a housekeeping thread expires
idle recovery buffers and runs the presence sweep. Cluster links (``connect_cluster``)
run on the asyncio/uvloop transport's loop under the same lock (``wse_server.cluster``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any, Literal

from wse_proto import auth
from wse_proto._defaults import monotonic, system_rand, wall_clock_ms
from wse_proto.config import ServerConfig
from wse_proto.errors import DecodeError, LocalProtocolError
from wse_proto.hub import CoreConfig, InboundEvent, ServerCore
from wse_proto.presence import UPDATE_FAILED, PresenceConfig
from wse_proto.recovery import MAX_OFFSET, RecoveryConfig, recovery_result
from wse_proto.ws import encode_close
from wse_server.cluster import ServerCluster, check_cluster_args
from wse_transports._blocking import BlockingTransport
from wse_transports.base import Transport, get_transport
from wse_transports.cluster_aio import AsyncioClusterTransport

__all__ = ["WSEServer"]

log = logging.getLogger("wse_server")

CLUSTER_TRANSPORTS = ("asyncio", "uvloop", "threading", "gevent")
CLUSTER_UNSUPPORTED = "cluster links are not available on this transport"

STOP_GRACE = 2.0
"""Seconds ``stop()`` waits for clients to answer close 1001 (reference §10.3)."""

OnConnect = Callable[[str, str], Any]
OnMessage = Callable[[str, Any], Any]
OnDisconnect = Callable[[str], Any]
OnPresence = Callable[[str, dict[str, Any]], Any]

HOUSEKEEPING_MAX_WAIT = 30.0
"""Longest sleep of the housekeeping thread (the presence sweep period, ref §8)."""


def _position_args(epoch: Any, offset: Any) -> tuple[str, int]:
    """Check a recovery position's types as the original's argument conversion does."""
    if not isinstance(epoch, str):
        raise TypeError(f"epoch must be a str, got {type(epoch).__name__}")
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")
    if offset < 0:
        raise OverflowError(f"offset must be >= 0, got {offset}")
    if offset > MAX_OFFSET:
        raise OverflowError(f"offset must be < 2**64, got {offset}")
    return epoch, offset


def _int_arg(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class WSEServer:
    """A WSE server with the original's constructor, methods and events (reference §10.6).

    Positional parameters, names and defaults are the original's. Keyword-only extras:
    ``transport`` ("asyncio", "uvloop"), ``server_version``, ``jwt_require_claims`` (K6),
    ``jwt_leeway``, ``inbound_overflow`` ("backpressure" | "drop", F6),
    ``slow_consumer_policy`` ("drop" | "disconnect"), ``handshake_timeout``,
    ``recovery_wire_handling`` (answer clients' ``subscription_update`` recovery requests
    in the server, PROTOCOL §13.3; False hands them to the application as before).
    """

    def __init__(
        self,
        host: str,
        port: int,
        max_connections: int = 1000,
        jwt_secret: bytes | str | None = None,
        jwt_issuer: str | None = None,
        jwt_audience: str | None = None,
        jwt_cookie_name: str | None = None,
        jwt_previous_secret: bytes | str | None = None,
        jwt_key_id: str | None = None,
        jwt_algorithm: str | None = None,
        jwt_private_key: bytes | str | None = None,
        max_inbound_queue_size: int = 131072,
        recovery_enabled: bool = False,
        recovery_buffer_size: int = 128,
        recovery_ttl: int = 300,
        recovery_max_messages: int = 500,
        recovery_memory_budget: int = 268435456,
        presence_enabled: bool = False,
        presence_max_data_size: int = 4096,
        presence_max_members: int = 0,
        rate_limit_capacity: float = 100000.0,
        rate_limit_refill: float = 10000.0,
        max_message_size: int = 1048576,
        ping_interval: float = 25,
        idle_timeout: float = 60,
        max_outbound_queue_bytes: int = 16777216,
        max_subscriptions_per_connection: int = 0,
        *,
        transport: str = "asyncio",
        server_version: str = "2.5.1",
        jwt_require_claims: bool = False,
        jwt_leeway: int = 30,
        inbound_overflow: Literal["backpressure", "drop"] = "backpressure",
        slow_consumer_policy: Literal["drop", "disconnect"] = "drop",
        handshake_timeout: float = 10.0,
        recovery_wire_handling: bool = True,
        reuse_port: bool = False,
    ) -> None:
        if not isinstance(host, str):
            raise ValueError("host must be a str")
        self.host = host
        self._port = _int_arg("port", port, 0)
        if self._port > 65535:
            raise ValueError(f"port must be <= 65535, got {port}")
        for name, value, minimum in (
            ("recovery_buffer_size", recovery_buffer_size, 1),
            ("recovery_ttl", recovery_ttl, 0),
            ("recovery_max_messages", recovery_max_messages, 0),
            ("recovery_memory_budget", recovery_memory_budget, 0),
            ("presence_max_data_size", presence_max_data_size, 0),
            ("presence_max_members", presence_max_members, 0),
        ):
            _int_arg(name, value, minimum)

        jwt: auth.JWTConfig | None = None
        if jwt_algorithm is not None and jwt_algorithm not in auth.ALGORITHMS:
            raise ValueError(
                f"Unsupported jwt_algorithm: {jwt_algorithm}. Supported: HS256, RS256, ES256"
            )
        if jwt_secret is not None:
            jwt = auth.JWTConfig(
                jwt_secret,
                jwt_algorithm or "HS256",
                issuer=jwt_issuer,
                audience=jwt_audience,
                cookie_name=jwt_cookie_name or "access_token",
                previous_key=jwt_previous_secret,
                key_id=jwt_key_id,
                leeway=jwt_leeway,
                require_claims=jwt_require_claims,
                private_key=jwt_private_key,
            )
        if recovery_enabled and recovery_ttl == 0:
            raise ValueError("recovery_ttl must be > 0 when recovery is enabled")
        recovery = (
            RecoveryConfig(
                buffer_size=recovery_buffer_size,
                ttl=float(recovery_ttl),
                max_messages=recovery_max_messages,
                memory_budget=recovery_memory_budget,
            )
            if recovery_enabled
            else RecoveryConfig()
        )
        presence = PresenceConfig(
            max_data_size=presence_max_data_size, max_members=presence_max_members
        )
        self._presence_enabled = bool(presence_enabled)
        self._cluster: ServerCluster | None = None
        connection = ServerConfig(
            max_message_size=max_message_size,
            ping_interval=ping_interval,
            idle_timeout=idle_timeout,
            rate_limit_capacity=rate_limit_capacity,
            rate_limit_refill=rate_limit_refill,
            jwt=jwt,
            handshake_timeout=handshake_timeout,
            recovery_enabled=bool(recovery_enabled),
            server_version=server_version,
            cluster_connected=self.cluster_connected,
        )
        self._core_config = CoreConfig(
            max_connections=max_connections,
            max_inbound_queue_size=max_inbound_queue_size,
            max_outbound_queue_bytes=max_outbound_queue_bytes,
            max_subscriptions_per_connection=max_subscriptions_per_connection,
            recovery_enabled=bool(recovery_enabled),
            presence_enabled=self._presence_enabled,
            slow_consumer_policy=slow_consumer_policy,
            inbound_overflow=inbound_overflow,
            connection=connection,
            recovery=recovery,
            presence=presence,
            recovery_wire_handling=bool(recovery_wire_handling),
        )
        self._transport_cls, self._transport_options = get_transport(transport)
        self.transport_name = transport
        if reuse_port:
            # Several processes on one port (``--workers``); the asyncio listener supports it.
            if transport not in ("asyncio", "uvloop"):
                raise ValueError(
                    f"reuse_port needs the asyncio or uvloop transport, not {transport}"
                )
            self._transport_options = {**self._transport_options, "reuse_port": True}

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._core = self._new_core()
        self._transport: Transport | None = None
        self._serving_loop: asyncio.AbstractEventLoop | None = None
        self._mode: Literal["drain", "callbacks"] | None = None
        self._callbacks: tuple[OnConnect | None, OnMessage | None, OnDisconnect | None] = (
            None,
            None,
            None,
        )
        self._dispatcher: threading.Thread | None = None
        self._dispatcher_stop = threading.Event()
        self._drain_waiters = 0
        self._async_waiters: dict[asyncio.Event, tuple[asyncio.AbstractEventLoop, int]] = {}
        self._warned_unconsumed = False
        self._on_presence: OnPresence | None = None
        self._housekeeper: threading.Thread | None = None
        self._housekeeper_stop = threading.Event()
        self._housekeeping_cap = HOUSEKEEPING_MAX_WAIT
        if recovery_enabled:
            self._housekeeping_cap = min(HOUSEKEEPING_MAX_WAIT, float(recovery_ttl))

    # ------------------------------------------------------------------ core plumbing

    def _new_core(self) -> ServerCore:
        core = ServerCore(
            self._core_config, rand=system_rand, wall_ms=wall_clock_ms, now=monotonic()
        )
        core.on_inbound = self._on_inbound
        return core

    def _on_inbound(self) -> None:
        """The core queued events (lock held, I/O thread): wake whoever waits for them."""
        if self._drain_waiters:
            self._cond.notify_all()
        if self._async_waiters:
            me = threading.get_ident()
            for event, (loop, thread_id) in list(self._async_waiters.items()):
                if event.is_set():
                    continue
                if thread_id == me:
                    event.set()
                else:
                    with contextlib.suppress(RuntimeError):  # loop closed
                        loop.call_soon_threadsafe(event.set)
        if (
            self._mode is None
            and not self._warned_unconsumed
            and self._core.inbound_full()
            and not self._async_waiters
        ):
            self._warned_unconsumed = True
            log.warning(
                "the inbound queue is full and nothing consumes it: call "
                "enable_drain_mode() + drain_inbound(), set_callbacks() or iterate events(); "
                "reading from clients is paused until then"
            )

    def _pop(self, max_count: int) -> list[InboundEvent]:
        # Lock held.
        events = self._core.pop_inbound(max_count)
        if events and self._transport is not None:
            self._transport.inbound_consumed()
        return events

    def _live_core(self) -> ServerCore:
        """The core, or RuntimeError("Not running") as the original raises (§10.6)."""
        transport = self._transport
        if transport is None or not transport.running:
            raise RuntimeError("Not running")
        return self._core

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        """The listening port (the ephemeral one chosen when constructed with port 0)."""
        transport = self._transport
        if transport is not None and transport.bound_port:
            return transport.bound_port
        return self._port

    def _make_transport(self) -> Transport:
        if self._transport is not None and self._transport.running:
            raise RuntimeError("Server already running")
        with self._lock:
            if self._core.draining:  # restarted after stop(): a fresh core
                self._core = self._new_core()
            self._warned_unconsumed = False
        return self._transport_cls(
            self._core, self._lock, host=self.host, port=self._port, **self._transport_options
        )

    def start(self) -> None:
        """Bind and serve in the background; returns once listening (bind errors raise)."""
        transport = self._make_transport()
        transport.start()
        self._transport = transport
        self._serving_loop = None
        self._after_start()
        log.info("WSE server listening on %s:%d (%s)", self.host, self.port, self.transport_name)

    def _after_start(self) -> None:
        if self._mode == "callbacks":
            self._start_dispatcher()
        self._start_housekeeping()

    def _start_housekeeping(self) -> None:
        """Recovery TTL expiry and the presence sweep run on their own thread (the
        transports only know per-connection timers)."""
        config = self._core_config
        if not (config.recovery_enabled or config.presence_enabled):
            return
        if self._housekeeper is not None and self._housekeeper.is_alive():
            return
        stop = self._housekeeper_stop = threading.Event()
        thread = threading.Thread(
            target=self._housekeeping_loop, args=(stop,), name="wse-housekeeping", daemon=True
        )
        self._housekeeper = thread
        thread.start()

    def _housekeeping_loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            with self._lock:
                core = self._core
                core.housekeeping(monotonic())
                due = core.next_housekeeping()
            wait = self._housekeeping_cap if due is None else due - monotonic()
            stop.wait(min(self._housekeeping_cap, max(0.01, wait)))

    def _stop_housekeeping(self) -> None:
        thread = self._housekeeper
        if thread is None:
            return
        self._housekeeper_stop.set()
        if thread is not threading.current_thread():
            thread.join(5.0)
        self._housekeeper = None

    def stop(self) -> None:
        """Close every client with 1001 "server shutting down", wait up to 2 s, stop."""
        transport = self._transport
        if transport is None:
            return
        loop = self._serving_loop
        if loop is not None:  # serving inside an application's event loop
            try:
                current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            except RuntimeError:
                current = None
            if current is loop:
                raise RuntimeError("stop() would block the serving loop; use await aclose()")
        cluster, self._cluster = self._cluster, None
        if cluster is not None:
            try:
                cluster.stop()  # SHUTDOWN to peers while the loop still runs (§10.3)
            except Exception:  # the clients must still be closed
                log.exception("stopping the cluster links failed")
        if loop is not None:
            future = asyncio.run_coroutine_threadsafe(transport.stop_async(STOP_GRACE), loop)
            future.result(STOP_GRACE + 5.0)
        else:
            transport.stop(STOP_GRACE)
        self._stopped()

    def _stopped(self) -> None:
        cluster, self._cluster = self._cluster, None
        if cluster is not None:  # the loop is gone: nothing more can be sent
            cluster.detach()
        self._transport = None
        self._serving_loop = None
        self._stop_dispatcher()
        self._stop_housekeeping()
        with self._lock:
            self._cond.notify_all()
            for event, (loop, _) in list(self._async_waiters.items()):
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(event.set)

    def is_running(self) -> bool:
        transport = self._transport
        return transport is not None and transport.running

    def drain(self, close_code: int = 4300, close_reason: str = "", timeout: float = 30) -> None:
        """Refuse new connections, close every client with ``close_code`` (§10.3).

        Does not stop the server; a background thread logs whether every client left
        within ``timeout`` seconds.
        """
        try:
            encode_close(close_code, close_reason)
        except LocalProtocolError as exc:
            raise ValueError(str(exc)) from None
        with self._lock:
            core = self._live_core()
            core.drain(close_code, close_reason)
            if self._cluster is not None:
                self._cluster.drain()  # DRAIN to peers (§10.3)

        def watch() -> None:
            deadline = monotonic() + timeout
            while monotonic() < deadline:
                with self._lock:
                    left = core.get_connection_count()
                if left == 0:
                    log.info("drain complete: every client disconnected")
                    return
                threading.Event().wait(0.1)
            log.warning("drain timeout: %d clients still connected after %ss", left, timeout)

        threading.Thread(target=watch, name="wse-drain-watch", daemon=True).start()

    # ------------------------------------------------------------------ inbound: drain mode

    def enable_drain_mode(self) -> None:
        """Events are taken with :meth:`drain_inbound` (callbacks are not called)."""
        self._mode = "drain"
        self._stop_dispatcher()

    def drain_inbound(self, max_count: int = 256, timeout_ms: int = 50) -> list[InboundEvent]:
        """Wait up to ``timeout_ms`` for the first event, then take up to ``max_count``.

        Returns ``(kind, conn_id, value)`` tuples (reference §10.4).
        """
        core = self._core
        with self._cond:
            if not core.inbound_queue_depth() and timeout_ms > 0:
                self._drain_waiters += 1
                try:
                    self._cond.wait_for(
                        lambda: self._core.inbound_queue_depth() > 0, timeout_ms / 1000.0
                    )
                finally:
                    self._drain_waiters -= 1
            return self._pop(max_count)

    def inbound_dropped_count(self) -> int:
        with self._lock:
            return self._core.inbound_dropped_count()

    def inbound_queue_depth(self) -> int:
        with self._lock:
            return self._core.inbound_queue_depth()

    # ------------------------------------------------------------------ inbound: callbacks

    def set_callbacks(
        self,
        on_connect: OnConnect | None,
        on_message: OnMessage | None,
        on_disconnect: OnDisconnect | None,
        *,
        on_presence: OnPresence | None = None,
    ) -> None:
        """``on_connect(conn_id, cookies)``, ``on_message(conn_id, value)``,
        ``on_disconnect(conn_id)``, called in order on one dispatcher thread.

        ``on_presence(kind, {"topic", "user_id", "data"})`` (an extension) receives the
        presence events that drain mode returns as ``(kind, None, value)``; the tracking
        itself is the same in both modes (F11).
        """
        self._callbacks = (on_connect, on_message, on_disconnect)
        self._on_presence = on_presence
        self._mode = "callbacks"
        if self.is_running():
            self._start_dispatcher()

    def _start_dispatcher(self) -> None:
        if self._dispatcher is not None and self._dispatcher.is_alive():
            return
        self._dispatcher_stop = threading.Event()
        thread = threading.Thread(
            target=self._dispatch_loop,
            args=(self._dispatcher_stop,),
            name="wse-callbacks",
            daemon=True,
        )
        self._dispatcher = thread
        thread.start()

    def _stop_dispatcher(self) -> None:
        thread = self._dispatcher
        if thread is None:
            return
        self._dispatcher_stop.set()
        with self._lock:
            self._cond.notify_all()
        if thread is not threading.current_thread():
            thread.join(5.0)
        self._dispatcher = None

    def _dispatch_loop(self, stop: threading.Event) -> None:
        while True:
            with self._cond:
                self._drain_waiters += 1
                try:
                    self._cond.wait_for(
                        lambda: stop.is_set() or self._core.inbound_queue_depth() > 0, 1.0
                    )
                finally:
                    self._drain_waiters -= 1
                # After stop(), what is left (the final disconnects) is still delivered;
                # after a switch to drain mode, nothing more is taken here.
                batch = self._pop(256) if self._mode == "callbacks" else []
                if not batch and stop.is_set():
                    return
                cookies = self._auth_cookies(batch)
            self._run_callbacks(batch, cookies)

    def _auth_cookies(self, batch: list[InboundEvent]) -> dict[str, str]:
        """Callback mode passes the Cookie header even for JWT connections (§10.4)."""
        found: dict[str, str] = {}
        for kind, conn_id, _ in batch:
            if kind == "auth_connect" and conn_id is not None:
                conn = self._core.get_connection(conn_id)
                found[conn_id] = conn.cookies if conn is not None else ""
        return found

    def _run_callbacks(self, batch: list[InboundEvent], cookies: dict[str, str]) -> None:
        on_connect, on_message, on_disconnect = self._callbacks
        on_presence = self._on_presence
        for kind, conn_id, value in batch:
            if conn_id is None:
                if on_presence is not None:
                    try:
                        on_presence(kind, value)
                    except Exception:
                        log.exception("presence callback failed for %s", kind)
                continue
            try:
                if kind == "connect":
                    if on_connect is not None:
                        on_connect(conn_id, value)
                elif kind == "auth_connect":
                    if on_connect is not None:
                        on_connect(conn_id, cookies.get(conn_id, ""))
                elif kind == "disconnect":
                    if on_disconnect is not None:
                        on_disconnect(conn_id)
                elif on_message is not None:
                    on_message(conn_id, value)
            except Exception:
                log.exception("%s callback failed for connection %s", kind, conn_id)

    # ------------------------------------------------------------------ sending

    def send(self, conn_id: str, data: str) -> None:
        """A verbatim text frame (not rate limited, not encrypted; §6.4)."""
        if not isinstance(data, str):
            raise TypeError("data must be str")
        with self._lock:
            self._live_core().send(conn_id, data)

    def send_bytes(self, conn_id: str, data: bytes) -> None:
        """A verbatim binary frame (not rate limited, not encrypted)."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError("data must be bytes")
        with self._lock:
            self._live_core().send_bytes(conn_id, bytes(data))

    def send_event(
        self, conn_id: str, event: Mapping[str, Any], compression_threshold: int = 1024
    ) -> int:
        """Envelope, encode (JSON, ``C:`` zlib above the threshold, ``M:`` msgpack,
        ``E:`` when encrypted) and send; returns the payload size, 0 when dropped."""
        if not isinstance(event, Mapping):
            raise TypeError("event must be a dict")
        with self._lock:
            return self._live_core().send_event(
                conn_id, event, compression_threshold, now=monotonic()
            )

    def broadcast_all(self, data: str) -> None:
        """Send a text message to every connection."""
        with self._lock:
            self._live_core().broadcast_all(data)

    def broadcast_all_bytes(self, data: bytes) -> None:
        """Send a binary message to every connection."""
        with self._lock:
            self._live_core().broadcast_all_bytes(bytes(data))

    def broadcast_local(self, topic: str, data: str) -> None:
        """Publish to this server's subscribers of ``topic`` (globs included); with
        recovery on, JSON objects are stamped and kept for recovery (PROTOCOL §13.2)."""
        now = monotonic()
        with self._lock:
            self._live_core().broadcast_local(topic, data, now=now)

    def broadcast(self, topic: str, data: str) -> None:
        """Publish to ``topic``: local fan-out, then the same bytes (stamped when the topic
        keeps recovery history) to the cluster peers that want it (CLUSTER §8.3-8.4).

        Like the original, before ``start()`` there is nobody to deliver to and the call
        silently does nothing.
        """
        now = monotonic()
        with self._lock:
            if not self.is_running():
                return
            cluster = self._cluster
            if cluster is not None:
                cluster.glue.publish(topic, data, now)
            else:
                self._core.broadcast_local(topic, data, now=now)

    # ------------------------------------------------------------------ connections

    def get_connection_count(self) -> int:
        with self._lock:
            return self._core.get_connection_count()

    def get_connections(self) -> list[str]:
        with self._lock:
            return self._core.get_connections()

    def disconnect(self, conn_id: str) -> None:
        """Close without a status code (the client sees 1005 and reconnects, K7)."""
        with self._lock:
            self._live_core().disconnect(conn_id)

    # ------------------------------------------------------------------ subscriptions

    def set_topic_acl(
        self, conn_id: str, allow: Iterable[str] | None = None, deny: Iterable[str] | None = None
    ) -> None:
        """Replace the connection's topic ACL (including one from its JWT), §10.2."""
        with self._lock:
            self._core.set_topic_acl(conn_id, allow, deny)

    def subscribe_connection(
        self,
        conn_id: str,
        topics: Iterable[str],
        presence_data: Any = None,
        queue_group: str | None = None,
    ) -> None:
        """Subscribe to topics (exact or ``*``/``?`` globs) or join a queue group (§10.1-2).

        With presence enabled, ``presence_data`` (any JSON value; ``{}`` counts, None
        does not) joins the presence of the topics kept (PROTOCOL §14.1): the topic's
        subscribers get ``presence_join`` for a user's first connection. Data over
        ``presence_max_data_size`` is not tracked (logged), as in the original.
        """
        with self._lock:
            try:
                self._core.subscribe(conn_id, topics, queue_group, presence_data)
            except LocalProtocolError as exc:  # presence data not serialisable as JSON
                raise TypeError(f"presence_data: {exc.message}") from None

    def subscribe_with_recovery(
        self,
        conn_id: str,
        topics: Iterable[str],
        recover: bool = False,
        epoch: str | None = None,
        offset: int | None = None,
        *,
        positions: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Subscribe (live delivery starts), then replay what the client missed on each
        topic, followed by the live stream with no gap and no repeat (ref §7.3, PROTOCOL
        §13.4-13.5, F8).

        Returns ``{"recovered", "topics": {topic: {"epoch", "offset", "recoverable",
        "recovered", "count"}}}``. With ``recover`` true, ``epoch``/``offset`` (the last
        offset the client has) apply to every topic, as in the original; ``positions``
        (an extension, F10) gives each topic its own ``(epoch, offset)`` (or
        ``{"epoch", "offset"}``) instead. A
        non-string epoch is a TypeError and an offset outside ``[0, 2**64 - 1]`` an
        OverflowError, before anything happens (the original's argument conversion); an
        epoch that is not hex raises ``RuntimeError("Invalid epoch hex string: ...")``
        after the live subscription, like the original.
        """
        if isinstance(topics, str):
            raise TypeError("topics must be a list of strings, not a string")
        wanted = list(topics)
        if not all(isinstance(t, str) for t in wanted):
            raise TypeError("topics must be a list of strings")
        requested: dict[str, tuple[str | None, int | None]] = {}
        if recover:
            if positions is not None:
                for topic, pos in positions.items():
                    if isinstance(pos, Mapping):  # the wire form {"epoch", "offset"}
                        requested[topic] = _position_args(pos.get("epoch"), pos.get("offset"))
                    else:
                        t_epoch, t_offset = pos
                        requested[topic] = _position_args(t_epoch, t_offset)
            elif epoch is not None and offset is not None:
                requested = dict.fromkeys(wanted, _position_args(epoch, offset))
        now = monotonic()
        with self._lock:
            try:
                outcomes = self._core.subscribe_with_recovery(conn_id, wanted, requested, now=now)
            except DecodeError as exc:
                raise RuntimeError(exc.message) from None
        return recovery_result(outcomes)

    def unsubscribe_connection(self, conn_id: str, topics: Iterable[str] | None = None) -> None:
        with self._lock:
            self._core.unsubscribe(conn_id, topics)

    def get_topic_subscriber_count(self, topic: str) -> int:
        with self._lock:
            return self._core.get_topic_subscriber_count(topic)

    def get_queue_group_info(self, topic: str) -> dict[str, int]:
        with self._lock:
            return self._core.get_queue_group_info(topic)

    # ------------------------------------------------------------------ presence

    def presence(self, topic: str) -> dict[str, Any]:
        """``{user_id: {"data", "connections"}}`` of ``topic`` (PROTOCOL §14.3); empty
        when presence is disabled (as the original)."""
        with self._lock:
            return self._core.presence(topic)

    def presence_stats(self, topic: str) -> dict[str, int]:
        """``{"num_users", "num_connections"}`` (O(1)); zeros when disabled or unknown."""
        with self._lock:
            return self._core.presence_stats(topic)

    def update_presence(self, conn_id: str, data: Any) -> None:
        """Replace the connection's user's data on every topic it is present on; each
        topic's subscribers get ``presence_update`` (ref §8). Raises the original's
        ``RuntimeError`` when the data is too large or the connection unknown; a no-op
        when presence is disabled."""
        with self._lock:
            try:
                self._core.update_presence(conn_id, data)
            except LocalProtocolError as exc:
                if exc.message == UPDATE_FAILED:
                    raise RuntimeError(UPDATE_FAILED) from None
                raise TypeError(f"presence data: {exc.message}") from None

    # ------------------------------------------------------------------ cluster

    def connect_cluster(
        self,
        peers: list[str],
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_ca: str | None = None,
        cluster_port: int | None = None,
        seeds: list[str] | None = None,
        cluster_addr: str | None = None,
    ) -> None:
        """Join a cluster (spec/CLUSTER.md, reference §10.6): dial ``peers`` (or, with
        ``seeds``, those seeds, announcing ``cluster_addr`` so the rest of the mesh finds
        us), listen on ``0.0.0.0:cluster_port`` when given, mutual TLS when the three
        paths are given. Returns once the listener is bound; links come up in the
        background (``cluster_connected()``, ``cluster_info()``).
        """
        if self.transport_name not in CLUSTER_TRANSPORTS:
            raise NotImplementedError(CLUSTER_UNSUPPORTED)
        if self._cluster is not None:
            raise RuntimeError("Cluster already connected")
        transport = self._transport
        if transport is None or not transport.running:
            raise RuntimeError("Server not started")
        # asyncio/uvloop links run on the server's loop; the blocking transports host them
        # in their own pump (wse_transports/cluster_blocking.py).
        loop = getattr(transport, "loop", None)
        runner: asyncio.AbstractEventLoop | BlockingTransport
        if isinstance(loop, asyncio.AbstractEventLoop):
            runner = loop
        elif isinstance(transport, BlockingTransport):
            runner = transport
        else:
            raise NotImplementedError(CLUSTER_UNSUPPORTED)
        tls = check_cluster_args((tls_cert, tls_key, tls_ca), seeds, cluster_addr)
        cluster = ServerCluster(
            self._core,
            self._lock,
            runner,
            peers=list(seeds) if seeds else list(peers),
            tls=tls,
            cluster_port=cluster_port,
            cluster_addr=cluster_addr,
        )
        cluster.start()
        self._cluster = cluster

    @property
    def cluster_port(self) -> int:
        """The cluster listener's port (the ephemeral one with ``cluster_port=0``), or 0."""
        cluster = self._cluster
        return cluster.transport.bound_port if cluster is not None else 0

    def reload_cluster_tls(self, cert_path: str, key_path: str, ca_path: str) -> None:
        """New certificate, key and CA for later cluster handshakes; links stay up."""
        cluster = self._cluster
        if cluster is None:
            raise RuntimeError("Cluster not connected")
        cluster.transport.reload_tls(cert_path, key_path, ca_path)

    def cluster_connected(self) -> bool:
        """Whether at least one cluster peer is linked (lock-free: read by server_hello)."""
        cluster = self._cluster
        return cluster is not None and cluster.connected

    def cluster_peers_count(self) -> int:
        with self._lock:
            cluster = self._cluster
            return cluster.node.peer_count if cluster is not None else 0

    def cluster_info(self) -> list[dict[str, Any]]:
        """One ``{"address", "instance_id", "capabilities", "connected_at"}`` per peer."""
        with self._lock:
            cluster = self._cluster
            return cluster.info() if cluster is not None else []

    def get_cluster_dlq_entries(self) -> list[dict[str, Any]]:
        """Drain the dead letters: ``{"topic", "payload", "peer_addr", "error"}`` dicts."""
        with self._lock:
            cluster = self._cluster
            return cluster.glue.dead_letters() if cluster is not None else []

    # ------------------------------------------------------------------ observability

    def _refresh_cluster_stats(self) -> None:
        # Lock held.
        if self._cluster is not None:
            self._cluster.glue.refresh_stats()

    def health_snapshot(self) -> dict[str, Any]:
        """The original's health dict, same keys in the same order (§10.5)."""
        with self._lock:
            self._refresh_cluster_stats()
            return self._core.health_snapshot(monotonic())

    def prometheus_metrics(self) -> str:
        """Prometheus text exposition with the original's metric names (§10.5)."""
        with self._lock:
            self._refresh_cluster_stats()
            return self._core.prometheus_metrics(monotonic())

    # ------------------------------------------------------------------ native asyncio API

    async def serve(self) -> None:
        """Serve inside the running event loop until cancelled or :meth:`aclose`.

        For asyncio applications: no extra thread, and :meth:`events` / :meth:`publish`
        work without blocking the loop.
        """
        transport = self._make_transport()
        if not transport.supports_serve:
            raise RuntimeError(f"the {self.transport_name} transport cannot run in an event loop")
        loop = asyncio.get_running_loop()

        def on_ready(exc: BaseException | None) -> None:
            if exc is None:
                self._transport = transport
                self._serving_loop = loop
                self._after_start()

        try:
            await transport.serve(on_ready)
        finally:
            if self._transport is transport:
                self._stopped()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[WSEServer]:
        """``async with server.running():`` serve in this loop for the block's duration."""
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        transport = self._make_transport()
        if not transport.supports_serve:
            raise RuntimeError(f"the {self.transport_name} transport cannot run in an event loop")

        def on_ready(exc: BaseException | None) -> None:
            if exc is None:
                self._transport = transport
                self._serving_loop = loop
                self._after_start()
                if not ready.done():
                    ready.set_result(None)
            elif not ready.done():
                ready.set_exception(exc)

        async def run() -> None:
            try:
                await transport.serve(on_ready)
            finally:
                if self._transport is transport:
                    self._stopped()

        task = asyncio.create_task(run())
        try:
            await ready
        except BaseException:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            raise
        try:
            yield self
        finally:
            await self.aclose()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def aclose(self) -> None:
        """Stop from a coroutine (close 1001, grace period) without blocking the loop."""
        transport = self._transport
        if transport is None:
            return
        if self._serving_loop is asyncio.get_running_loop():
            cluster, self._cluster = self._cluster, None
            if cluster is not None:
                try:
                    # Serving in this loop means the asyncio link transport (a coroutine).
                    if isinstance(cluster.transport, AsyncioClusterTransport):
                        await cluster.transport.stop(grace=STOP_GRACE)
                    else:
                        cluster.transport.stop(grace=STOP_GRACE)
                finally:
                    cluster.detach()
            await transport.stop_async(STOP_GRACE)
            self._stopped()
        else:
            await asyncio.get_running_loop().run_in_executor(None, self.stop)

    async def events(self, max_count: int = 256) -> AsyncIterator[InboundEvent]:
        """Drain tuples as an async iterator; ends once the server stopped and the queue
        is empty. Use it instead of (not together with) drain mode or callbacks."""
        loop = asyncio.get_running_loop()
        wakeup = asyncio.Event()
        with self._lock:
            self._async_waiters[wakeup] = (loop, threading.get_ident())
        try:
            while True:
                with self._lock:
                    batch = self._pop(max_count)
                    if not batch:
                        if not self.is_running():
                            return
                        wakeup.clear()
                if batch:
                    for item in batch:
                        yield item
                    continue
                await wakeup.wait()
        finally:
            with self._lock:
                self._async_waiters.pop(wakeup, None)

    async def publish(self, topic: str, text: str) -> None:
        """``broadcast_local`` for coroutines (never blocks on sockets)."""
        self.broadcast_local(topic, text)

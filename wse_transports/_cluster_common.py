"""What the asyncio and blocking cluster transports share: helpers, settings, bookkeeping.

Both carry out a ``ClusterNode``'s intents the same way (CLUSTER §8.11); only the I/O
differs. The base class here holds the state and logic that does not depend on the
runtime, so the two transports cannot drift apart on it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from wse_proto.cluster.mesh import (
    CloseLink,
    ClusterNode,
    Deliver,
    Dial,
    LinkDown,
    LinkUp,
    PresenceNotify,
    Send,
)
from wse_proto.presence import PresenceEvent

from .cluster_tls import ClusterTLS

log = logging.getLogger("wse_transports.cluster")

CONNECT_TIMEOUT = 5.0
"""TCP connect (name resolution included) of a dial (CLUSTER §8.1)."""

TLS_HANDSHAKE_TIMEOUT = 5.0
"""TLS handshake, both roles (CLUSTER §8.1, §8.7)."""

SOCKET_BUFFER_BYTES = 256 * 1024
KEEPALIVE_IDLE = 10
KEEPALIVE_INTERVAL = 5

CLOSE_FLUSH_TIMEOUT = 5.0
"""A closed link whose peer stops reading is aborted after this many seconds."""

MAX_LINK_BACKLOG = 16 * 1024 * 1024
"""Bytes a link's socket may hold unwritten before its publications are dropped."""

DeliverCallback = Callable[[str, bytes, str], None]
"""``(topic, payload, instance_id)``: fan ``payload`` out as a text frame, unchanged."""
PresenceCallback = Callable[[PresenceEvent], None]
LinkChangeCallback = Callable[[LinkUp | LinkDown], None]


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` -> (host without brackets, port); ValueError if bad."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"not a host:port address: {address!r}")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


def _format_peer(peername: Any) -> str:
    if isinstance(peername, tuple) and len(peername) >= 2:
        host, port = peername[0], peername[1]
        if ":" in str(host):
            return f"[{host}]:{port}"
        return f"{host}:{port}"
    return str(peername)


def _tune(sock: socket.socket | None, *, buffers: bool = True) -> None:
    """Socket options of CLUSTER §8.1 (best effort: not every OS has every option)."""
    if sock is None:
        return
    opts: list[tuple[int, int, int]] = [
        (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    ]
    if hasattr(socket, "TCP_KEEPIDLE"):
        opts.append((socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE))
    elif hasattr(socket, "TCP_KEEPALIVE"):  # macOS spells the idle time this way
        opts.append((socket.IPPROTO_TCP, socket.TCP_KEEPALIVE, KEEPALIVE_IDLE))
    if hasattr(socket, "TCP_KEEPINTVL"):
        opts.append((socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL))
    if buffers:
        opts.append((socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES))
        opts.append((socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES))
    for level, name, value in opts:
        with contextlib.suppress(OSError):
            sock.setsockopt(level, name, value)


_L = TypeVar("_L")
"""A transport's per-socket object."""


class _ClusterTransportBase(Generic[_L]):
    """Settings, counters and intent handling common to both cluster transports.

    Subclasses supply the I/O hooks: :meth:`_queue_send`, :meth:`_write_out`,
    :meth:`_close_link`, :meth:`_start_dial` and :meth:`_arm`.
    """

    def __init__(
        self,
        node: ClusterNode,
        lock: threading.Lock,
        *,
        listen_host: str,
        listen_port: int | None,
        tls: ClusterTLS | None,
        on_deliver: DeliverCallback | None,
        on_presence: PresenceCallback | None,
        on_link_change: LinkChangeCallback | None,
        sock: socket.socket | None,
        backlog: int,
        connect_timeout: float,
        tls_handshake_timeout: float,
        max_link_backlog: int,
    ) -> None:
        self.node = node
        self.lock = lock
        self.listen_host = listen_host
        self.listen_port = listen_port
        self._tls = tls
        self.on_deliver = on_deliver
        self.on_presence = on_presence
        self.on_link_change = on_link_change
        self._sock = sock
        self.backlog = backlog
        self.connect_timeout = connect_timeout
        self.tls_handshake_timeout = tls_handshake_timeout
        self.max_link_backlog = max_link_backlog
        self.max_inbound = node.config.max_inbound
        self._links: dict[int, _L] = {}  # link id -> socket the node knows
        self._instances: dict[int, str] = {}  # link id -> peer instance (between LinkUp/Down)
        self._dirty: dict[_L, None] = {}  # sockets with queued Sends
        self._inbound = 0
        self._running = False
        self._stopping = False
        self._pump_scheduled = False
        self._bound_port = 0
        self._timer_at = math.inf
        # Counters for tests and metrics.
        self.tls_failures = 0
        self.refused_inbound = 0
        self.dial_failures = 0

    # ------------------------------------------------------------------ properties

    @property
    def running(self) -> bool:
        return self._running

    @property
    def bound_port(self) -> int:
        """The cluster port actually listened on (0 without a listener)."""
        return self._bound_port

    @property
    def tls(self) -> ClusterTLS | None:
        return self._tls

    @property
    def inbound_sockets(self) -> int:
        """Accepted sockets currently holding an inbound slot (TLS handshakes included)."""
        return self._inbound

    @property
    def link_count(self) -> int:
        """Sockets the node currently knows (any link state)."""
        return len(self._links)

    def reload_tls(self, cert_path: str, key_path: str, ca_path: str) -> None:
        """Swap the certificate, key and CA for every later handshake (thread-safe).

        Links already up keep their session. A bad file raises and keeps the old
        contexts. Only valid when the transport was created with TLS.
        """
        if self._tls is None:
            raise RuntimeError("cluster TLS is not configured")
        self._tls = ClusterTLS(
            cert_path, key_path, ca_path, check_hostname=self._tls.check_hostname
        )

    # ------------------------------------------------------------------ the pump

    def _pump_scheduled_now(self) -> None:
        """The pump :meth:`wake` scheduled, on the runtime's own thread."""
        with self.lock:
            self._pump_scheduled = False
            if self._running:
                self._pump_locked()

    def _pump_locked(self) -> None:
        """Carry out every intent (lock held), write what was queued, re-arm the timer."""
        node = self.node
        while True:
            intents = node.intents()
            if not intents:
                break
            for intent in intents:
                cls = type(intent)
                if cls is Send:
                    assert isinstance(intent, Send)
                    self._queue_send(intent.link_id, intent.data)
                elif cls is Deliver:
                    assert isinstance(intent, Deliver)
                    cb = self.on_deliver
                    if cb is not None:
                        try:
                            cb(intent.topic, intent.payload, intent.instance_id)
                        except Exception:
                            log.exception("cluster on_deliver callback failed")
                elif cls is CloseLink:
                    assert isinstance(intent, CloseLink)
                    self._close_link(intent.link_id)
                elif cls is Dial:
                    assert isinstance(intent, Dial)
                    self._start_dial(intent.link_id, intent.address)
                elif cls is PresenceNotify:
                    assert isinstance(intent, PresenceNotify)
                    pcb = self.on_presence
                    if pcb is not None:
                        try:
                            pcb(intent.event)
                        except Exception:
                            log.exception("cluster on_presence callback failed")
                elif cls is LinkUp or cls is LinkDown:
                    assert isinstance(intent, LinkUp | LinkDown)
                    if isinstance(intent, LinkUp):
                        self._instances[intent.link_id] = intent.instance_id
                    else:
                        self._instances.pop(intent.link_id, None)
                    lcb = self.on_link_change
                    if lcb is not None:
                        try:
                            lcb(intent)
                        except Exception:
                            log.exception("cluster on_link_change callback failed")
        if self._dirty:
            dirty, self._dirty = self._dirty, {}
            for p in dirty:
                self._write_out(p)
        self._arm()

    def _report_backlog(self, link_id: int, full: bool) -> None:
        """Tell the link's ``PeerLink`` whether its socket is full (lock held).

        CLUSTER §8.7: a full queue drops publications (and counts them).
        """
        instance = self._instances.get(link_id)
        link = self.node.link_of(instance) if instance is not None else None
        if link is not None and link.link_id == link_id:
            link.transport_pending_frames = link.config.max_queued_frames if full else 0

    # ------------------------------------------------------------------ I/O hooks

    def _queue_send(self, link_id: int, data: bytes) -> None:
        """Queue a ``Send`` on its socket (if still open) and mark it dirty."""
        raise NotImplementedError

    def _write_out(self, p: _L) -> None:
        raise NotImplementedError

    def _close_link(self, link_id: int) -> None:
        raise NotImplementedError

    def _start_dial(self, link_id: int, address: str) -> None:
        raise NotImplementedError

    def _arm(self) -> None:
        raise NotImplementedError

"""Events emitted by the connection machines (:mod:`wse_proto.server`, :mod:`wse_proto.client`).

Events are plain data (frozen, slotted dataclasses under one :class:`Event` base) so
tests can compare whole lists with ``==`` and transports can dispatch on the type.
Every connection ends with exactly one :class:`ConnectionClosed`, whatever the cause
(peer close, local close, protocol error, timeout, EOF).

Server-side events map onto the original's drain tuples (reference §10.4):
``Connected`` -> ``connect`` / ``auth_connect``, ``MessageReceived`` -> ``msg``,
``TextReceived`` -> ``raw``, ``BytesReceived`` -> ``bin``, ``ConnectionClosed`` ->
``disconnect`` (only for connections that emitted ``Connected``). The other events are
informational (metrics, logs) and have no drain form.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import WSEError

if TYPE_CHECKING:
    from .topics import TopicACL

__all__ = [
    "AuthRejected",
    "BytesReceived",
    "Connected",
    "ConnectionClosed",
    "DecodeFailed",
    "DecryptFailed",
    "Event",
    "Hello",
    "HelloReceived",
    "KeyExchangeFailed",
    "MessageReceived",
    "PingReceived",
    "PongReceived",
    "RateLimited",
    "Ready",
    "Received",
    "TextReceived",
    "Upgraded",
]


@dataclass(frozen=True, slots=True)
class Event:
    """Base of every machine event."""


# ---------------------------------------------------------------------------
# Shared by both machines
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """Terminal event: the connection is no longer usable for messages.

    ``code`` is the close status that ended the connection (the peer's on a peer
    close, ours on a local close; ``None`` for a status-less close, 1006 when the
    transport saw EOF without a close frame). ``error`` is the WSEError that caused
    it, if any (protocol error, oversize message, failed authentication).
    """

    code: int | None
    reason: str = ""
    error: WSEError | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class DecryptFailed(Event):
    """An ``E:`` frame was dropped (no key, too short, bad tag, bad plaintext).

    The connection stays open (decision K10); this event is the trace the original
    only wrote to its log.
    """

    reason: str


# ---------------------------------------------------------------------------
# Server side (ServerConnection)
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connected(Event):
    """Upgrade (and JWT, when configured) succeeded; the connection is OPEN.

    ``user_id`` is the JWT ``sub`` (``None`` without JWT: drain ``connect`` with the
    raw Cookie header); ``cookies`` is always the raw Cookie header or ``""``.
    """

    user_id: str | None
    cookies: str
    claims: dict[str, Any] | None = field(default=None, compare=False)
    path: str = "/"
    query: str = ""
    acl: TopicACL | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class AuthRejected(Event):
    """JWT authentication failed; an ``error`` frame and close 4401 were queued."""

    error_code: str
    message: str


@dataclass(frozen=True, slots=True)
class MessageReceived(Event):
    """A decoded client message (drain ``msg``): a dict, or any msgpack/JSON value."""

    value: Any


@dataclass(frozen=True, slots=True)
class TextReceived(Event):
    """A text frame that is not JSON (drain ``raw``)."""

    text: str


@dataclass(frozen=True, slots=True)
class BytesReceived(Event):
    """A binary frame delivered as is (drain ``bin``)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class HelloReceived(Event):
    """A ``client_hello`` was answered with ``server_hello`` (consumed, no drain form).

    ``encryption`` is true only when this hello established the connection key.
    """

    protocol_version: int
    encryption: bool


@dataclass(frozen=True, slots=True)
class KeyExchangeFailed(Event):
    """The client's public key was unusable; KEY_EXCHANGE_FAILED was sent."""

    detail: str


@dataclass(frozen=True, slots=True)
class RateLimited(Event):
    """``send_event`` dropped events and a RATE_LIMITED frame was sent (at most 1/s)."""


# ---------------------------------------------------------------------------
# Client side (ClientConnection)
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Upgraded(Event):
    """The server answered the upgrade with 101; WebSocket frames follow."""


@dataclass(frozen=True, slots=True)
class Ready(Event):
    """``server_ready`` arrived (payload ``p``); the client sent its ``client_hello``."""

    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Hello(Event):
    """``server_hello`` arrived; ``encrypted`` tells whether a key is now in force."""

    payload: dict[str, Any]
    encrypted: bool = False


@dataclass(frozen=True, slots=True)
class Received(Event):
    """Any other decoded server message (one envelope; batches are expanded)."""

    envelope: dict[str, Any]


@dataclass(frozen=True, slots=True)
class PingReceived(Event):
    """A server heartbeat ``ping``; the client already queued its PONG."""

    server_time: Any


@dataclass(frozen=True, slots=True)
class PongReceived(Event):
    """A server PONG to one of our pings; ``rtt_ms`` from its ``client_timestamp``."""

    rtt_ms: int
    payload: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True, slots=True)
class DecodeFailed(Event):
    """A server frame no decoder accepted; it was dropped, the connection stays open."""

    reason: str

"""What the server and client connection machines share (private).

The states, the inputs, the single place that changes state, and the plumbing that
is the same on both sides: end of stream, abort, the one terminal
:class:`~wse_proto.events.ConnectionClosed`, and the handshake/close deadlines.
The transition tables stay in :mod:`wse_proto.server`, which re-exports
:class:`ConnectionState` and :class:`Input`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

from .errors import LocalProtocolError, WSEError
from .events import ConnectionClosed, Event

__all__ = ["ConnectionState", "Input"]


def _next_tick(due: float, now: float, interval: float) -> float:
    """The heartbeat after ``due``: when the transport was late, skip, do not burst."""
    due += interval
    if due <= now:
        due += (int((now - due) / interval) + 1) * interval
    return due


class ConnectionState(enum.Enum):
    """Lifecycle of a connection machine (shared by server and client)."""

    HANDSHAKE = "HANDSHAKE"
    OPEN = "OPEN"
    CLOSING = "CLOSING"
    CLOSED = "CLOSED"


class Input(enum.Enum):
    """What can happen to a connection machine (the columns of the tables)."""

    ACCEPT = "accept"  # upgrade done (and JWT accepted, server side)
    REJECT = "reject"  # the upgrade failed (HTTP error answer / bad 101)
    AUTH_FAIL = "auth_fail"  # JWT rejected: error frame + close 4401
    RECV_MESSAGE = "recv_message"  # any inbound frame but Close
    RECV_CLOSE = "recv_close"  # the peer's Close frame
    PEER_ERROR = "peer_error"  # framing error, oversize message, bad close payload
    EOF = "eof"  # the transport saw the socket end
    ABORT = "abort"  # the transport gives up on the socket
    SEND = "send"  # the application queues a message
    CLOSE = "close"  # the application starts the close handshake
    PING_DUE = "ping_due"  # heartbeat timer
    IDLE_TIMEOUT = "idle_timeout"  # no inbound message for idle_timeout
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    CLOSE_TIMEOUT = "close_timeout"  # the peer did not answer our Close


class _ConnectionMachine:
    """The state, the single place that changes it (:meth:`_transition`), and the
    lifecycle plumbing identical on both sides. Subclasses set the other slots here
    in ``__init__`` and provide :meth:`_emit` (where events are queued).
    """

    __slots__ = (
        "_close_deadline",
        "_closed_emitted",
        "_handshake",
        "_handshake_deadline",
        "_next_ping",
        "_now",
        "_session",
        "_table",
        "state",
    )

    _close_deadline: float | None
    _closed_emitted: bool
    _handshake: Any
    _handshake_deadline: float | None
    _next_ping: float | None
    _now: float
    _session: Any

    def __init__(self, table: Mapping[tuple[ConnectionState, Input], ConnectionState]) -> None:
        self._table = table
        self.state = ConnectionState.HANDSHAKE

    def _transition(self, inp: Input) -> ConnectionState:
        try:
            new = self._table[(self.state, inp)]
        except KeyError:
            raise LocalProtocolError(
                f"{inp.value} is not allowed in state {self.state.value}"
            ) from None
        self.state = new
        return new

    @property
    def encrypted(self) -> bool:
        """A key is in force (§4.2): this side sends and expects ``E:`` frames."""
        return self._session is not None

    @property
    def wants_close(self) -> bool:
        """The transport should flush ``data_to_send()`` and close the socket."""
        return self.state is ConnectionState.CLOSED

    def _emit(self, event: Event) -> None:
        raise NotImplementedError

    def _emit_closed(self, code: int | None, reason: str, error: WSEError | None = None) -> None:
        """The one ConnectionClosed of the connection; later calls do nothing."""
        if not self._closed_emitted:
            self._closed_emitted = True
            self._emit(ConnectionClosed(code, reason, error))

    def _enter(self, inp: Input) -> ConnectionState:
        """Transition and drop the timers and handshake state that no longer apply."""
        new = self._transition(inp)
        if new is not ConnectionState.HANDSHAKE:
            self._handshake_deadline = None
        if new is not ConnectionState.OPEN:
            self._next_ping = None
        if new is ConnectionState.CLOSED:
            self._close_deadline = None
            self._handshake = None
        return new

    def receive_eof(self, now: float) -> None:
        """The peer closed its side of the socket."""
        if self.state is ConnectionState.CLOSED:
            return
        self._now = now
        self._enter(Input.EOF)
        self._emit_closed(1006, "connection lost")

    def abort(self) -> None:
        """The transport drops the socket (write error, forced removal)."""
        if self.state is ConnectionState.CLOSED:
            return
        self._enter(Input.ABORT)
        self._emit_closed(1006, "aborted")

    def _close(
        self,
        state: ConnectionState,
        code: int | None,
        reason: str,
        now: float | None,
        timeout: float,
    ) -> None:
        """``close()`` once the caller queued the Close frame (OPEN only, before any
        state change, so a bad code raises with nothing changed).
        """
        self._enter(Input.CLOSE)
        if state is ConnectionState.OPEN:
            if now is not None:
                self._now = now
            self._close_deadline = self._now + timeout
            self._emit_closed(code, reason)
        elif state is ConnectionState.HANDSHAKE:
            self._emit_closed(1006, reason or "closed during the handshake")

    def _end_deadline(self, state: ConnectionState) -> float | None:
        """``next_deadline()`` outside OPEN."""
        if state is ConnectionState.HANDSHAKE:
            return self._handshake_deadline
        if state is ConnectionState.CLOSING:
            return self._close_deadline
        return None

    def _expire(self, state: ConnectionState, now: float) -> None:
        """``handle_timer()`` outside OPEN: the handshake and close timeouts."""
        if state is ConnectionState.HANDSHAKE:
            deadline = self._handshake_deadline
            if deadline is not None and now >= deadline:
                self._enter(Input.HANDSHAKE_TIMEOUT)
                self._emit_closed(1006, "handshake timeout")
        elif state is ConnectionState.CLOSING:
            deadline = self._close_deadline
            if deadline is not None and now >= deadline:
                self._enter(Input.CLOSE_TIMEOUT)

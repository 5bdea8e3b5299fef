"""``ServerConnection``: one client connection as the server sees it (Sans-IO).

Theory of operation
-------------------
The machine has four states (:class:`ConnectionState`) and every change of state
goes through ``_transition`` (in :mod:`wse_proto._machine`, shared with the
client), which looks the pair ``(state, input)`` up in a table (h11/h2 style). A
pair missing from the table is API misuse and raises
:class:`~wse_proto.errors.LocalProtocolError`; the tables are data, so tests and
docs can enumerate them.

- ``HANDSHAKE``: bytes go to the RFC 6455 upgrade parser, then JWT (reference §1.3).
- ``OPEN``: frames are decoded and dispatched (reference §3.2, §4.4); the
  application sends events, text, bytes and broadcasts.
- ``CLOSING``: we sent a Close and wait for the peer's (or ``close_timeout``);
  inbound data is ignored, sends are dropped.
- ``CLOSED``: the transport should flush :meth:`data_to_send` and close the
  socket (``wants_close``); every further input is ignored.

Bad peer input never raises out of the machine: it becomes an event plus a
Close with the right code. Exactly one :class:`~wse_proto.events.ConnectionClosed`
is emitted per connection, at the moment it stops carrying messages (entering
CLOSING or CLOSED, whichever comes first).

Time is an argument (``now``: monotonic seconds); wall-clock milliseconds for
envelopes come from the injected ``wall_ms``; randomness from ``rand``.

Inbound hot path: a text frame starting with ``{`` is parsed straight from its bytes
(orjson checks the UTF-8 itself); only frames that do not parse, legacy prefixes and
non-JSON text take the general route through :func:`wse_proto.codec.decode_client_text`.
Received messages are kept in a compact form (:data:`Pending`) that the hub queues as is,
without an event object per message: a drain tuple ``(kind, conn_id, value)`` (reference
§10.4), or, while the hub's queue is deep (:class:`InboundMode`), the bytes of a JSON text
message: the machine parses it anyway to decide interception (§3.2), drops the result, and
:func:`resolve` parses it again when the application takes it. A parse costs less than
keeping a backlog of parsed objects: bytes are a seventh of the memory and the cyclic
garbage collector never scans them (bench/README.md). :meth:`ServerConnection.events_received`
returns the public events either way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

import orjson

from . import auth, codec, envelope
from ._defaults import RandFn, WallClockMs
from ._machine import ConnectionState, Input, _ConnectionMachine, _next_tick
from .config import ServerConfig
from .crypto import EncryptionSession, server_key_exchange
from .envelope import normalize_keys
from .errors import (
    AuthError,
    DecodeError,
    DecryptionError,
    KeyExchangeError,
    PayloadTooLarge,
    WSEError,
)
from .events import (
    AuthRejected,
    BytesReceived,
    Connected,
    DecryptFailed,
    Event,
    HelloReceived,
    KeyExchangeFailed,
    MessageReceived,
    RateLimited,
    TextReceived,
)
from .ratelimit import TokenBucket
from .topics import TopicACL
from .ws import (
    ACCEPTED,
    BINARY,
    CLOSE,
    PING,
    PONG,
    REJECTED,
    TEXT,
    FrameDecoder,
    ServerHandshake,
    binary_frame,
    decode_text,
    encode_close,
    encode_frame,
    parse_close,
    text_frame,
)

__all__ = [
    "CLIENT_TRANSITIONS",
    "SERVER_TRANSITIONS",
    "ConnectionState",
    "DrainItem",
    "InboundMode",
    "Input",
    "Pending",
    "ServerConfig",
    "ServerConnection",
    "resolve",
]

DrainItem = tuple[str, str, Any]
"""A received message in drain form: ``("msg" | "raw" | "bin", conn_id, value)`` (§10.4)."""

Pending = DrainItem | bytes
"""A received message as the machine queues it: a drain tuple, or the bytes of a text
message known to be a JSON object that is not intercepted (``msg``, parsed by
:func:`resolve`)."""


_S = ConnectionState
_I = Input

_COMMON: Final[dict[tuple[ConnectionState, Input], ConnectionState]] = {
    (_S.HANDSHAKE, _I.ACCEPT): _S.OPEN,
    (_S.HANDSHAKE, _I.REJECT): _S.CLOSED,
    (_S.HANDSHAKE, _I.EOF): _S.CLOSED,
    (_S.HANDSHAKE, _I.ABORT): _S.CLOSED,
    (_S.HANDSHAKE, _I.HANDSHAKE_TIMEOUT): _S.CLOSED,
    (_S.HANDSHAKE, _I.CLOSE): _S.CLOSED,  # nothing to close on the wire yet
    (_S.OPEN, _I.RECV_MESSAGE): _S.OPEN,
    (_S.OPEN, _I.RECV_CLOSE): _S.CLOSED,  # echo the Close, then the socket goes
    (_S.OPEN, _I.PEER_ERROR): _S.CLOSED,  # fail the connection (RFC 6455 §7.1.7)
    (_S.OPEN, _I.EOF): _S.CLOSED,
    (_S.OPEN, _I.ABORT): _S.CLOSED,
    (_S.OPEN, _I.SEND): _S.OPEN,
    (_S.OPEN, _I.CLOSE): _S.CLOSING,
    (_S.OPEN, _I.PING_DUE): _S.OPEN,
    (_S.CLOSING, _I.RECV_MESSAGE): _S.CLOSING,  # ignored after our Close
    (_S.CLOSING, _I.RECV_CLOSE): _S.CLOSED,
    (_S.CLOSING, _I.PEER_ERROR): _S.CLOSED,
    (_S.CLOSING, _I.EOF): _S.CLOSED,
    (_S.CLOSING, _I.ABORT): _S.CLOSED,
    (_S.CLOSING, _I.SEND): _S.CLOSING,  # dropped: the peer may close at any time
    (_S.CLOSING, _I.CLOSE): _S.CLOSING,  # idempotent
    (_S.CLOSING, _I.CLOSE_TIMEOUT): _S.CLOSED,
    (_S.CLOSED, _I.RECV_MESSAGE): _S.CLOSED,  # ignored
    (_S.CLOSED, _I.RECV_CLOSE): _S.CLOSED,
    (_S.CLOSED, _I.PEER_ERROR): _S.CLOSED,
    (_S.CLOSED, _I.EOF): _S.CLOSED,
    (_S.CLOSED, _I.ABORT): _S.CLOSED,
    (_S.CLOSED, _I.SEND): _S.CLOSED,  # dropped
    (_S.CLOSED, _I.CLOSE): _S.CLOSED,
}

SERVER_TRANSITIONS: Final[Mapping[tuple[ConnectionState, Input], ConnectionState]] = {
    **_COMMON,
    (_S.HANDSHAKE, _I.AUTH_FAIL): _S.CLOSED,  # 101, error frame, Close 4401, socket closed
    (_S.OPEN, _I.IDLE_TIMEOUT): _S.CLOSING,  # status-less Close (K7, F2)
}
"""Server machine: ``(state, input) -> next state``. Missing pairs raise LocalProtocolError
(e.g. sending before the handshake completed)."""

CLIENT_TRANSITIONS: Final[Mapping[tuple[ConnectionState, Input], ConnectionState]] = {
    **_COMMON,
}
"""Client machine: same shape; the client has no auth step and no idle close."""


# ---------------------------------------------------------------------------
# Small helpers for the §3.2 control messages
# ---------------------------------------------------------------------------

_U64_LIMIT: Final = 1 << 64
_INTERCEPTED: Final = frozenset({"client_hello", "ping", "pong", "PONG"})
"""Top-level ``t`` values of plain text frames the server answers itself (§3.2)."""
_OPEN_BRACE: Final = 0x7B
_MAX_PROTOCOL_VERSION: Final = 2
_STATUSLESS_CLOSE: Final = encode_close(None)


def _hello_protocol_version(p: object) -> int:
    """§3.1: ``min(client protocol_version, 2)``; 1 when absent or not a u64."""
    version = p.get("protocol_version") if isinstance(p, dict) else None
    if type(version) is int and 0 <= version < _U64_LIMIT:
        return min(version, _MAX_PROTOCOL_VERSION)
    return 1


def _close_reason(error: WSEError) -> str:
    """A Close reason from an error message, within the 123-byte limit."""
    raw = error.message.encode("utf-8")[:123]
    return raw.decode("utf-8", "ignore")


def _as_event(item: Pending) -> Event:
    """The public event for a message kept in compact form."""
    if isinstance(item, bytes):
        return MessageReceived(_parse_object(item))
    kind, _, value = item
    if kind == "msg":
        return MessageReceived(value)
    if kind == "raw":
        return TextReceived(value)
    return BytesReceived(value)


def _parse_object(payload: bytes) -> Any:
    """The ``msg`` value of a JSON object text frame: parsed, keys normalised (§2.8)."""
    obj = orjson.loads(payload)
    if "t" not in obj or "p" not in obj:
        obj = normalize_keys(obj)
    return obj


class InboundMode:
    """Shared by a hub and its connections: how received JSON objects are queued.

    ``deferred`` is set by the hub while its inbound queue is deep; connections then queue
    the text bytes (parsed by :func:`resolve` when taken) instead of the parsed value.
    """

    __slots__ = ("deferred",)

    def __init__(self) -> None:
        self.deferred = False


def resolve(conn_id: str, items: list[Pending]) -> list[DrainItem]:
    """Drain tuples for messages of connection ``conn_id`` in compact form, in order.

    The JSON kept as bytes was checked to parse by the machine, so this cannot fail.
    """
    loads = orjson.loads
    out: list[DrainItem] = []
    add = out.append
    for item in items:
        if type(item) is bytes:
            obj = loads(item)
            if "t" not in obj or "p" not in obj:
                obj = normalize_keys(obj)
            add(("msg", conn_id, obj))
        else:
            add(item)  # type: ignore[arg-type]
    return out


class ServerConnection(_ConnectionMachine):
    """One client connection, server side. See the module docstring.

    Verbs: :meth:`receive_data`, :meth:`receive_eof`, :meth:`events_received`,
    :meth:`data_to_send`, :meth:`next_deadline`, :meth:`handle_timer`; application
    side :meth:`send_event`, :meth:`send_text`, :meth:`send_bytes`,
    :meth:`send_broadcast`, :meth:`close`, :meth:`abort`.
    """

    __slots__ = (
        "_bucket",
        "_decoder",
        "_events",
        "_has_events",
        "_idle_deadline",
        "_last_limited",
        "_last_warning",
        "_mode",
        "_next_seq",
        "_open",
        "_out",
        "_rand",
        "_wall_ms",
        "acl",
        "claims",
        "config",
        "conn_id",
        "cookies",
        "decrypt_failures",
        "msgpack",
        "path",
        "pending_bytes",
        "query",
        "rate_limited_count",
        "transport_backlog",
        "user_id",
    )

    def __init__(
        self,
        config: ServerConfig,
        *,
        conn_id: str,
        now: float,
        rand: RandFn,
        wall_ms: WallClockMs,
        next_seq: Callable[[], int],
        inbound_mode: InboundMode | None = None,
    ) -> None:
        super().__init__(SERVER_TRANSITIONS)
        self.config = config
        self.conn_id = conn_id
        self._rand = rand
        self._wall_ms = wall_ms
        self._next_seq = next_seq
        self._mode = inbound_mode if inbound_mode is not None else InboundMode()
        self._handshake: ServerHandshake | None = ServerHandshake()
        # Text frames are decoded once, in _on_text (decode_text raises the 1007 error).
        self._decoder = FrameDecoder(
            client_side=False, max_message_size=config.max_message_size, validate_utf8=False
        )
        self._now = now
        # Events in order; received messages in compact form (see Pending).
        self._events: list[Event | Pending] = []
        self._has_events = False  # _events holds at least one Event object
        self._out: list[bytes] = []
        self._open = False
        self._closed_emitted = False
        self._session: EncryptionSession | None = None
        self._bucket: TokenBucket | None = None
        self._last_limited: float | None = None
        self._last_warning: float | None = None
        self._handshake_deadline: float | None = now + config.handshake_timeout
        self._next_ping: float | None = None
        self._idle_deadline: float | None = None
        self._close_deadline: float | None = None
        self.user_id: str | None = None
        self.claims: dict[str, Any] | None = None
        self.acl: TopicACL | None = None
        """Topic ACL from the JWT ``wse_topics`` claim (reference §1.3)."""
        self.cookies = ""
        self.path = ""
        self.query = ""
        self.msgpack = False
        self.pending_bytes = 0
        """Bytes queued here and not yet taken by :meth:`data_to_send`."""
        self.transport_backlog = 0
        """Set by the transport: bytes written but still in its (or the OS) buffer."""
        self.rate_limited_count = 0
        """``send_event`` calls dropped by the rate limiter."""
        self.decrypt_failures = 0
        """``E:`` frames dropped (K10)."""

    # ------------------------------------------------------------------ properties

    @property
    def outbound_backlog(self) -> int:
        """Bytes the peer has not received yet (for the hub's slow-consumer policy)."""
        return self.pending_bytes + self.transport_backlog

    # ------------------------------------------------------------------ output plumbing

    def events_received(self) -> list[Event]:
        """Every event since the last call, oldest first."""
        items = self._events
        self._events = []
        self._has_events = False
        return [item if isinstance(item, Event) else _as_event(item) for item in items]

    def take_items(self) -> tuple[list[Event | Pending], bool]:
        """Like :meth:`events_received`, for the hub: messages stay in compact form
        (:data:`Pending`; :func:`resolve` turns them into drain tuples).

        Returns the list (handed over, not copied) and whether it holds any
        :class:`~wse_proto.events.Event` object (False: only messages).
        """
        items = self._events
        if not items:
            return items, False
        has_events = self._has_events
        self._events = []
        self._has_events = False
        return items, has_events

    def _emit(self, event: Event) -> None:
        self._events.append(event)
        self._has_events = True

    def data_to_send(self) -> bytes:
        """Everything queued since the last call, as one buffer (write coalescing)."""
        out = self._out
        if not out:
            return b""
        self._out = []
        self.pending_bytes = 0
        return out[0] if len(out) == 1 else b"".join(out)

    def _write(self, data: bytes) -> None:
        self._out.append(data)
        self.pending_bytes += len(data)

    def _enter(self, inp: Input) -> ConnectionState:
        """Transition and keep the derived flags and timers consistent."""
        new = super()._enter(inp)
        self._open = open_ = new is ConnectionState.OPEN
        if not open_:
            self._idle_deadline = None
        return new

    # ------------------------------------------------------------------ inbound

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> None:
        """Feed bytes read from the socket."""
        state = self.state
        if state is ConnectionState.CLOSED or not data:
            return
        self._now = now
        if state is ConnectionState.HANDSHAKE:
            self._receive_handshake(data, now)
            return
        self._decoder.receive_data(data)
        self._process_frames(now)

    def _receive_handshake(self, data: bytes | bytearray | memoryview, now: float) -> None:
        hs = self._handshake
        assert hs is not None
        hs.receive_data(data)
        if hs.state is REJECTED:
            assert hs.rejection is not None
            self._write(hs.rejection)
            self._enter(Input.REJECT)
            self._emit_closed(1006, f"handshake rejected: {hs.error}")
            return
        if hs.state is not ACCEPTED:
            return
        request = hs.request
        assert request is not None
        self._write(hs.accept())
        self.path = request.path
        self.query = request.query
        self.msgpack = request.wants_msgpack  # §1.1 / §5.2: substring test on the query
        cookie = request.cookie
        self.cookies = cookie or ""
        jwt = self.config.jwt
        if jwt is not None:
            try:
                identity = auth.authenticate(
                    cookie, request.authorization, jwt, self._wall_ms() / 1000.0
                )
            except AuthError as exc:
                self._reject_auth(exc)
                return
            self.user_id = identity.user_id
            self.claims = identity.claims
            self.acl = identity.acl
            # §3.1: server_ready is the first frame, before the app hears of the connection.
            self._write(
                text_frame(
                    envelope.server_ready(
                        conn_id=self.conn_id,
                        user_id=identity.user_id,
                        recovery=self.config.recovery_enabled,
                        wall_ms=self._wall_ms(),
                        rand=self._rand,
                    )
                )
            )
        self._enter(Input.ACCEPT)
        self._idle_deadline = now + self.config.idle_timeout
        self._next_ping = now + self.config.ping_interval
        self._emit(
            Connected(
                user_id=self.user_id,
                cookies=self.cookies,
                claims=self.claims,
                path=self.path,
                query=self.query,
                acl=self.acl,
            )
        )
        trailing = hs.trailing_data
        self._handshake = None
        if trailing:
            self._decoder.receive_data(trailing)
            self._process_frames(now)

    def _reject_auth(self, exc: AuthError) -> None:
        """K4 / §1.3: 101 already queued, then one error frame and Close 4401."""
        code = exc.error_code or "AUTH_FAILED"
        self._emit(AuthRejected(code, exc.message))
        self._write(text_frame(envelope.auth_error(code, exc.message, self._wall_ms())))
        self._write(encode_close(4401, "Authentication failed"))
        self._enter(Input.AUTH_FAIL)
        self._emit_closed(4401, "Authentication failed", exc)

    def _process_frames(self, now: float) -> None:
        decoder = self._decoder
        cid = self.conn_id
        loads = orjson.loads
        while True:
            try:
                batch = decoder.messages()
            except WSEError as exc:
                self._fail(exc)
                return
            if not batch:
                return
            add = self._events.append
            deferred = self._mode.deferred
            active = False  # a data message arrived: the idle clock restarts (§6.3)
            for opcode, payload in batch:
                if opcode == TEXT and self._open:
                    active = True
                    # Fast path: a JSON object parsed from the bytes. Anything orjson
                    # refuses (bad UTF-8 included) takes the general route below.
                    if payload and payload[0] == _OPEN_BRACE:
                        try:
                            obj = loads(payload)
                        except ValueError:
                            pass
                        else:
                            t = obj.get("t")
                            if type(t) is str and t in _INTERCEPTED:
                                self._intercept(t, normalize_keys(obj))
                            elif deferred:
                                add(payload)  # parsed again by resolve(), see above
                            else:
                                if t is None or "p" not in obj:
                                    obj = normalize_keys(obj)
                                add(("msg", cid, obj))
                            continue
                    self._on_text(payload)
                    continue
                if self.state is ConnectionState.CLOSED:
                    return
                if opcode == CLOSE:
                    self._on_close_frame(payload)
                    return
                if not self._open:  # CLOSING: RFC 6455 §5.5.1, data after our Close is dropped
                    continue
                if opcode == BINARY:
                    active = True
                    self._on_binary(payload)
                elif opcode == PING:
                    # F3: exactly one pong, echoing the payload (RFC 6455 §5.5.3).
                    self._write(encode_frame(PONG, payload))
                # PONG control frames: no activity, nothing to do (§6.3).
            if active and self._open:
                self._idle_deadline = now + self.config.idle_timeout

    def _fail(self, exc: WSEError) -> None:
        """Fail the connection on a protocol error from the peer (RFC 6455 §7.1.7)."""
        if self.state is ConnectionState.OPEN:
            # F12: every violation gets its RFC 6455 status (1009 for an oversize message,
            # where the original sent a status-less Close that wse-client takes as final).
            code: int | None = exc.close_code or 1002
            reason = "message too large" if isinstance(exc, PayloadTooLarge) else _close_reason(exc)
            self._write(encode_close(code, reason))
            self._enter(Input.PEER_ERROR)
            self._emit_closed(code, reason, exc)
        else:
            self._enter(Input.PEER_ERROR)
            self._emit_closed(1002, "protocol error", exc)

    def _on_close_frame(self, payload: bytes) -> None:
        code, reason = parse_close(payload)  # the decoder already validated it
        if self.state is ConnectionState.OPEN:
            # RFC 6455 §5.5.1: echo; the original echoes code and reason verbatim.
            self._write(encode_frame(CLOSE, payload))
        self._enter(Input.RECV_CLOSE)
        self._emit_closed(code, reason)

    def _on_text(self, payload: bytes) -> None:
        """The general route for a text frame (the fast path is in _process_frames)."""
        try:
            text = decode_text(payload)
        except DecodeError as exc:  # RFC 6455 §8.1: invalid UTF-8 fails the connection
            self._fail(exc)
            return
        inbound = codec.decode_client_text(text)
        raw_type = inbound.raw_type
        if raw_type is not None and inbound.kind == "msg" and raw_type in _INTERCEPTED:
            self._intercept(raw_type, inbound.value)
            return
        self._deliver(inbound)

    def _intercept(self, t: str, value: Any) -> None:
        """§3.2: client_hello, ping and pong are answered here and never reach the app."""
        if t == "client_hello":
            self._on_client_hello(value)
        elif t == "ping":
            client_ms = envelope.ping_client_timestamp(value)
            self._write(text_frame(envelope.pong(client_ms, self._wall_ms())))
        # "pong" / "PONG": nothing to do.

    def _deliver(self, inbound: codec.Inbound) -> None:
        self._events.append((inbound.kind, self.conn_id, inbound.value))

    def _on_binary(self, payload: bytes) -> None:
        if payload[:2] == b"E:":
            self._on_encrypted(payload)
            return
        self._deliver(codec.decode_client_binary(payload, msgpack=self.msgpack))

    def _on_encrypted(self, payload: bytes) -> None:
        """§4.4: decrypt; any failure drops the frame (K10) with a DecryptFailed event."""
        session = self._session
        if session is None:
            self._decrypt_failed("no key negotiated")
            return
        try:
            plain = session.decrypt(payload)
        except DecryptionError as exc:
            self._decrypt_failed(exc.message)
            return
        # §4.4: UTF-8, prefix rules; JSON that does not parse is dropped, not ``raw``.
        inbound = codec.decode_client_plaintext(plain)
        if inbound is None:
            self._decrypt_failed("plaintext is not UTF-8 or not valid JSON")
            return
        # Encrypted client_hello/ping/pong are not intercepted (§3.2): plain delivery.
        self._deliver(inbound)

    def _decrypt_failed(self, reason: str) -> None:
        self.decrypt_failures += 1
        self._emit(DecryptFailed(reason))

    def _on_client_hello(self, value: Any) -> None:
        """§3.1/§4.2: answer with server_hello; key exchange at most once per connection."""
        p = value.get("p") if isinstance(value, dict) else None
        version = _hello_protocol_version(p)
        public_key: str | None = None
        if self._session is None and isinstance(p, dict):
            features = p.get("features")
            client_key = p.get("encryption_public_key")
            if (
                isinstance(features, dict)
                and features.get("encryption") is True
                and isinstance(client_key, str)
            ):
                try:
                    session, public_key = server_key_exchange(client_key, self._rand)
                except KeyExchangeError as exc:
                    self._emit(KeyExchangeFailed(exc.message))
                    self._write(text_frame(envelope.key_exchange_failed(exc.message)))
                else:
                    self._session = session
        config = self.config
        self._write(
            text_frame(
                envelope.server_hello(
                    conn_id=self.conn_id,
                    encryption_public_key=public_key,
                    cluster=bool(config.cluster_connected()),
                    recovery=config.recovery_enabled,
                    protocol_version=version,
                    max_message_size=config.max_message_size,
                    rate_limit_capacity=config.rate_limit_capacity,
                    rate_limit_refill=config.rate_limit_refill,
                    ping_interval_s=config.ping_interval,
                    wall_ms=self._wall_ms(),
                    server_version=config.server_version,
                )
            )
        )
        self._emit(HelloReceived(version, public_key is not None))

    # ------------------------------------------------------------------ outbound

    def _check_send(self) -> bool:
        """True if the message may be queued; False if it is dropped (closing/closed)."""
        if self._open:
            return True
        self._transition(Input.SEND)  # raises LocalProtocolError during the handshake
        return False

    def send_event(
        self,
        event: Mapping[str, Any],
        *,
        now: float,
        compression_threshold: int = 1024,
    ) -> int:
        """Envelope + encode one application event (§2.3, §2.4); returns the payload size.

        Returns 0 when the rate limiter drops it (§6.2) or the connection is closing.
        Dedup by ``id`` is server-wide and done by the hub before this call.
        """
        if not self._check_send():
            return 0
        self._now = now
        config = self.config
        bucket = self._bucket
        if bucket is None:
            bucket = self._bucket = TokenBucket(
                config.rate_limit_capacity, config.rate_limit_refill, now
            )
        tokens = bucket.refill(now)
        if tokens < 1.0:
            self.rate_limited_count += 1
            last = self._last_limited
            if last is None or now - last >= 1.0:
                self._last_limited = now
                self._write(text_frame(envelope.rate_limited()))
                self._emit(RateLimited())
            return 0
        capacity = bucket.capacity
        if tokens < 0.2 * capacity:
            last = self._last_warning
            if last is None or now - last >= 1.0:
                self._last_warning = now
                self._write(
                    text_frame(
                        envelope.rate_limit_warning(
                            int(capacity - tokens), int(capacity), int(tokens)
                        )
                    )
                )
        bucket.take(1.0)
        # §2.3: the server-wide counter advances only for events without their own seq.
        built = envelope.build_event(
            event,
            wall_ms=self._wall_ms(),
            rand=self._rand,
            seq=self._next_seq() if "seq" not in event else 0,
        )
        session = self._session
        if session is not None:
            # F4: encrypted connections always get JSON plaintext, never compressed.
            plain, _ = codec.encode_event(built, msgpack=False, compression_threshold=0)
            payload = session.encrypt(plain)
            self._write(binary_frame(payload))
            return len(payload)
        payload, is_binary = codec.encode_event(
            built, msgpack=self.msgpack, compression_threshold=compression_threshold
        )
        self._write(binary_frame(payload) if is_binary else text_frame(payload))
        return len(payload)

    def send_text(self, text: str) -> None:
        """A verbatim text frame (never encrypted, reference §2.4)."""
        if self._check_send():
            self._write(text_frame(text.encode("utf-8")))

    def send_bytes(self, data: bytes) -> None:
        """A verbatim binary frame (never encrypted)."""
        if self._check_send():
            self._write(binary_frame(bytes(data)))

    def send_broadcast(self, frame: bytes, payload: bytes) -> None:
        """Fan-out: ``frame`` is the text frame built once for every plain connection;
        encrypted connections get their own ``E:`` frame of ``payload`` (§4.3, F5).
        """
        if not self._open:
            self._check_send()
            return
        session = self._session
        if session is None:
            self._out.append(frame)
            self.pending_bytes += len(frame)
        else:
            data = binary_frame(session.encrypt(payload))
            self._out.append(data)
            self.pending_bytes += len(data)

    def close(self, code: int | None = None, reason: str = "", *, now: float | None = None) -> None:
        """Start the close handshake. ``code=None`` sends a status-less Close (K7).

        ``now`` starts the ``close_timeout`` clock; by default the last time this
        machine was given.
        """
        state = self.state
        if state is ConnectionState.OPEN:
            self._write(encode_close(code, reason))  # LocalProtocolError on a bad code
        self._close(state, code, reason, now, self.config.close_timeout)

    # ------------------------------------------------------------------ timers

    def next_deadline(self) -> float | None:
        """The earliest time :meth:`handle_timer` has work to do, or None."""
        state = self.state
        if state is ConnectionState.OPEN:
            ping = self._next_ping
            idle = self._idle_deadline
            assert ping is not None and idle is not None
            return ping if ping < idle else idle
        return self._end_deadline(state)

    def handle_timer(self, now: float) -> None:
        """Run whatever is due at ``now`` (deadlines are inclusive)."""
        state = self.state
        if state is not ConnectionState.CLOSED:
            self._now = now
        if state is ConnectionState.OPEN:
            idle = self._idle_deadline
            assert idle is not None
            if now >= idle:
                # F2 / K7: an idle connection gets a status-less Close.
                self._write(_STATUSLESS_CLOSE)
                self._enter(Input.IDLE_TIMEOUT)
                self._close_deadline = now + self.config.close_timeout
                self._emit_closed(None, "idle timeout")
                return
            ping = self._next_ping
            assert ping is not None
            if now >= ping:
                self._transition(Input.PING_DUE)
                self._write(text_frame(envelope.server_ping(self._wall_ms())))
                self._next_ping = _next_tick(ping, now, self.config.ping_interval)
        else:
            self._expire(state, now)

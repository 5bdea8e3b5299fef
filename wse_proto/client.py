"""``ClientConnection``: the client side of a WSE connection (Sans-IO).

It mirrors what the published ``wse-client`` 2.5.1 does on the wire, so tests,
benchmarks and the conformance kit can drive a :class:`~wse_proto.server.ServerConnection`
(or any WSE server) the way real clients do:

- the upgrade carries ``Cookie: access_token=<jwt>`` and ``Authorization: Bearer <jwt>``
  and wse-client's query parameters (reference §3.5);
- ``client_hello`` is sent only after ``server_ready`` (reference §1.3, §3.3), with
  an ``encryption_public_key`` when encryption is wanted; the key is derived from
  ``server_hello`` and everything sent afterwards is an ``E:`` binary frame (§4.2);
- text frames whose first 25 characters hold ``"t":"ping"`` / ``"t":"PONG"`` are
  heartbeats (wse-client ``ConnectionManager._handle_raw_message``): a server ping is
  answered with wse-client's PONG form, a PONG yields an RTT sample;
- every other server frame form goes through :func:`wse_proto.codec.decode_server_message`.

States and transitions are those of :mod:`wse_proto.server` (``CLIENT_TRANSITIONS``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import orjson

from . import codec
from ._defaults import RandFn, WallClockMs
from ._machine import ConnectionState, Input, _ConnectionMachine, _next_tick
from .crypto import EncryptionSession, KeyPair, derive_key, generate_keypair
from .errors import DecodeError, LocalProtocolError, PayloadTooLarge, WSEError
from .events import (
    DecodeFailed,
    Event,
    Hello,
    PingReceived,
    PongReceived,
    Ready,
    Received,
    Upgraded,
)
from .server import CLIENT_TRANSITIONS
from .ws import (
    ACCEPTED,
    BINARY,
    CLOSE,
    PING,
    PONG,
    TEXT,
    ClientHandshake,
    FrameDecoder,
    decode_text,
    encode_close,
    encode_frame,
    parse_close,
)

__all__ = ["CLIENT_VERSION", "ClientConnection"]

CLIENT_VERSION: Final = "2.0.7"
"""What wse-client 2.5.1 still reports in ``client_hello`` (reference §3.3)."""
PROTOCOL_VERSION: Final = 1

# wse-client protocol.py: categories of client-sent types (reference §3.3).
_SYSTEM_TYPES: Final = frozenset(
    {
        "client_hello",
        "subscription_update",
        "PING",
        "PONG",
        "health_check_response",
        "sync_response",
        "metrics_response",
        "debug_request",
        "config_request",
        "config_update_request",
        "encryption_request",
        "key_rotation_request",
        "batch",
    }
)
_SYNC_TYPES: Final = frozenset({"sync_request", "request_snapshot", "snapshot_request"})

# wse-client connection.py inspects only this many leading characters of a text frame.
_HEARTBEAT_WINDOW: Final = 25
_PONG_MARKS: Final = ('"t":"PONG"', '"t": "PONG"')
_PING_MARKS: Final = ('"t":"PING"', '"t": "PING"', '"t":"ping"', '"t": "ping"')
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def _uuid4(rand: RandFn) -> str:
    """A random (version 4) UUID string from the injected RNG."""
    b = bytearray(rand(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _iso(wall_ms: int) -> str:
    """wse-client's ``datetime.now(UTC).isoformat()`` form, at millisecond precision."""
    return (_EPOCH + timedelta(milliseconds=wall_ms)).isoformat()


def _compact(obj: Any) -> str:
    """``json.dumps(obj, separators=(",", ":"))``: wse-client's heartbeat/hello form."""
    return json.dumps(obj, separators=(",", ":"))


def _category(t: str) -> str:
    if t in _SYSTEM_TYPES:
        return "WSE"
    if t in _SYNC_TYPES:
        return "S"
    return "U"


class ClientConnection(_ConnectionMachine):
    """One WSE client connection. Same verbs and timer API as the server machine.

    The upgrade request is queued at construction: call :meth:`data_to_send` first.
    """

    __slots__ = (
        "_decoder",
        "_events",
        "_head",
        "_keypair",
        "_out",
        "_rand",
        "_seq",
        "_wall_ms",
        "close_timeout",
        "connection_id",
        "encryption",
        "hello_sent",
        "max_message_size",
        "msgpack",
        "ping_interval",
        "server_features",
    )

    def __init__(
        self,
        *,
        host: str,
        path: str = "/wse",
        token: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
        msgpack: bool = False,
        encryption: bool = False,
        rand: RandFn,
        wall_ms: WallClockMs,
        ping_interval: float = 15.0,
        max_message_size: int = 1_048_576,
        close_timeout: float = 5.0,
        handshake_timeout: float = 10.0,
        query_params: bool = True,
        now: float = 0.0,
    ) -> None:
        super().__init__(CLIENT_TRANSITIONS)
        if not (ping_interval > 0 and close_timeout > 0 and handshake_timeout > 0):
            raise ValueError("ping_interval, close_timeout and handshake_timeout must be > 0")
        self._rand = rand
        self._wall_ms = wall_ms
        self.msgpack = msgpack
        self.encryption = encryption
        self.ping_interval = float(ping_interval)
        self.close_timeout = float(close_timeout)
        self.max_message_size = max_message_size
        all_headers = list(headers)
        # wse-client connection.py: the token goes in a cookie AND a bearer header.
        if token is not None and token != "cookie":
            all_headers.append(("Cookie", f"access_token={token}"))
            all_headers.append(("Authorization", f"Bearer {token}"))
        target = path
        if query_params:
            params = [
                f"client_version={CLIENT_VERSION}",
                f"protocol_version={PROTOCOL_VERSION}",
                "compression=true",
                f"encryption={'true' if encryption else 'false'}",
            ]
            target += ("&" if "?" in path else "?") + "&".join(params)
        if msgpack:
            target += ("&" if "?" in target else "?") + "format=msgpack"
        self._handshake: ClientHandshake | None = ClientHandshake(
            host, target, headers=all_headers, rand=rand
        )
        self._decoder = FrameDecoder(
            client_side=True, max_message_size=max_message_size, validate_utf8=False
        )
        self._events: list[Event] = []
        self._out: list[bytes] = [self._handshake.request_bytes]
        self._closed_emitted = False
        self._session: EncryptionSession | None = None
        self._keypair: KeyPair | None = None
        self._seq = 0
        self._now = now
        # wse-client gives the upgrade CONNECTION_TIMEOUT = 10 s.
        self._handshake_deadline: float | None = now + handshake_timeout
        self._head = b""
        self._next_ping: float | None = None
        self._close_deadline: float | None = None
        self.hello_sent = False
        self.connection_id: str | None = None
        self.server_features: dict[str, Any] = {}

    # ------------------------------------------------------------------ properties

    # ------------------------------------------------------------------ plumbing

    def events_received(self) -> list[Event]:
        events = self._events
        self._events = []
        return events

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        self._out = []
        return out[0] if len(out) == 1 else b"".join(out)

    def _mask(self) -> bytes:
        return self._rand(4)

    def _frame(self, opcode: int, payload: bytes) -> None:
        self._out.append(encode_frame(opcode, payload, mask_key=self._mask()))

    def _emit(self, event: Event) -> None:
        self._events.append(event)

    # ------------------------------------------------------------------ inbound

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> None:
        state = self.state
        if state is ConnectionState.CLOSED or not data:
            return
        self._now = now
        if state is ConnectionState.HANDSHAKE:
            hs = self._handshake
            assert hs is not None
            if len(self._head) < 5:
                # Anything but an HTTP response is refused at once, not after a timeout.
                self._head += bytes(data[: 5 - len(self._head)])
                if not b"HTTP/".startswith(self._head):
                    self._enter(Input.REJECT)
                    self._emit_closed(1006, "the server did not answer with HTTP")
                    return
            try:
                hs.receive_data(data)
            except WSEError as exc:
                self._enter(Input.REJECT)
                self._emit_closed(1006, exc.message, exc)
                return
            if hs.state is not ACCEPTED:
                return
            self._enter(Input.ACCEPT)
            self._next_ping = now + self.ping_interval
            self._events.append(Upgraded())
            trailing = hs.trailing_data
            self._handshake = None
            if not trailing:
                return
            data = trailing
        self._decoder.receive_data(data)
        self._process_frames(now)

    def _process_frames(self, now: float) -> None:
        decoder = self._decoder
        while True:
            try:
                batch = decoder.messages()
            except WSEError as exc:
                self._fail(exc)
                return
            if not batch:
                return
            for opcode, payload in batch:
                if self.state is ConnectionState.CLOSED:
                    return
                if opcode == CLOSE:
                    code, reason = parse_close(payload)
                    if self.state is ConnectionState.OPEN:
                        self._frame(CLOSE, payload)  # echo (RFC 6455 §5.5.1)
                    self._enter(Input.RECV_CLOSE)
                    self._emit_closed(code, reason)
                    return
                if self.state is not ConnectionState.OPEN:
                    continue
                if opcode == TEXT:
                    try:
                        text = decode_text(payload)
                    except DecodeError as exc:
                        self._fail(exc)
                        return
                    self._on_text(text)
                elif opcode == BINARY:
                    self._decode(payload)
                elif opcode == PING:
                    self._frame(PONG, payload)

    def _fail(self, exc: WSEError) -> None:
        if self.state is ConnectionState.OPEN:
            code = 1009 if isinstance(exc, PayloadTooLarge) else (exc.close_code or 1002)
            reason = exc.message.encode("utf-8")[:123].decode("utf-8", "ignore")
            self._out.append(encode_close(code, reason, mask_key=self._mask()))
            self._enter(Input.PEER_ERROR)
            self._emit_closed(code, reason, exc)
        else:
            self._enter(Input.PEER_ERROR)
            self._emit_closed(1002, "protocol error", exc)

    def _on_text(self, text: str) -> None:
        head = text[:_HEARTBEAT_WINDOW]
        if any(mark in head for mark in _PONG_MARKS):
            self._on_pong(text)
            return
        if any(mark in head for mark in _PING_MARKS):
            self._on_ping(text)
            return
        self._decode(text)

    def _on_pong(self, text: str) -> None:
        try:
            parsed = json.loads(text[3:] if text.startswith("WSE") else text)
        except ValueError:
            return
        p = parsed.get("p") if isinstance(parsed, dict) else None
        if not isinstance(p, dict):
            return
        sent = p.get("client_timestamp")
        if type(sent) is int:
            self._events.append(PongReceived(self._wall_ms() - sent, p))

    def _on_ping(self, text: str) -> None:
        """Answer like wse-client ``_respond_ping_json``."""
        now_ms = self._wall_ms()
        try:
            parsed = json.loads(text[3:] if text.startswith("WSE") else text)
            p = parsed.get("p", {})
            server_timestamp = p.get("server_time") or p.get("timestamp") or now_ms
        except Exception:  # wse-client answers even an unparsable ping
            server_timestamp = now_ms
        self._send_text(
            _compact(
                {
                    "c": "WSE",
                    "t": "PONG",
                    "p": {"server_timestamp": server_timestamp, "client_timestamp": now_ms},
                    "v": PROTOCOL_VERSION,
                }
            )
        )
        self._events.append(PingReceived(server_timestamp))

    def _decode(self, data: bytes | str) -> None:
        session = self._session
        try:
            messages = codec.decode_server_message(
                data,
                decrypt=session.decrypt if session is not None else None,
                max_size=self.max_message_size,
            )
        except WSEError as exc:
            self._events.append(DecodeFailed(exc.message or type(exc).__name__))
            return
        for message in messages:
            self._dispatch(message)

    def _dispatch(self, message: dict[str, Any]) -> None:
        t = message.get("t")
        p = message.get("p")
        payload: dict[str, Any] = p if isinstance(p, dict) else {}
        if t == "server_ready":
            details = payload.get("details")
            conn_id = payload.get("connection_id") or (
                details.get("connection_id") if isinstance(details, dict) else None
            )
            if isinstance(conn_id, str):
                self.connection_id = conn_id
            self._events.append(Ready(payload))
            if not self.hello_sent:
                self.send_hello()
        elif t == "server_hello":
            features = payload.get("features")
            self.server_features = features if isinstance(features, dict) else {}
            server_key = payload.get("encryption_public_key")
            keypair = self._keypair
            if (
                keypair is not None
                and self._session is None
                and self.server_features.get("encryption")
                and isinstance(server_key, str)
                and server_key
            ):
                try:
                    self._session = EncryptionSession(derive_key(keypair, server_key), self._rand)
                except WSEError as exc:
                    self._events.append(DecodeFailed(f"key exchange failed: {exc.message}"))
            self._events.append(Hello(payload, self._session is not None))
        else:
            self._events.append(Received(message))

    # ------------------------------------------------------------------ outbound

    def _check_send(self) -> bool:
        if self.state is ConnectionState.OPEN:
            return True
        self._transition(Input.SEND)  # LocalProtocolError before the upgrade
        return False

    def _send_text(self, text: str) -> None:
        """wse-client ``send``: a text frame, or ``E:`` binary once a key is in force."""
        session = self._session
        if session is not None:
            self._frame(BINARY, session.encrypt(text.encode("utf-8")))
        else:
            self._frame(TEXT, text.encode("utf-8"))

    def send_text(self, text: str) -> None:
        """Send ``text`` as wse-client does (encrypted after key exchange)."""
        if self._check_send():
            self._send_text(text)

    def send_bytes(self, data: bytes, *, encrypt: bool = True) -> None:
        """A binary frame; encrypted after key exchange unless ``encrypt=False``.

        Like wse-client, only UTF-8 data can be encrypted (LocalProtocolError otherwise).
        """
        if not self._check_send():
            return
        session = self._session
        if session is not None and encrypt:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                raise LocalProtocolError("only UTF-8 data can be sent encrypted") from None
            self._frame(BINARY, session.encrypt(bytes(data)))
        else:
            self._frame(BINARY, bytes(data))

    def send_message(
        self, t: str, p: Mapping[str, Any] | None = None, **fields: Any
    ) -> dict[str, Any]:
        """Send one envelope like wse-client ``MessageCodec.encode`` (returns it).

        ``fields`` adds or overrides keys (``pri``, ``cid``, ``c``...).
        """
        sendable = self._check_send()
        self._seq += 1
        message: dict[str, Any] = {
            "c": _category(t),
            "t": t,
            "p": dict(p) if p is not None else {},
            "id": _uuid4(self._rand),
            "seq": self._seq,
            "ts": _iso(self._wall_ms()),
            "v": PROTOCOL_VERSION,
        }
        message.update(fields)
        if sendable:
            self._send_text(orjson.dumps(message).decode("utf-8"))
        return message

    def subscribe(
        self,
        topics: Sequence[str],
        recovery: Mapping[str, tuple[str, int] | Mapping[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """§3.3 ``subscription_update`` subscribe, with recovery positions if given."""
        payload: dict[str, Any] = {"action": "subscribe", "topics": list(topics)}
        if recovery:
            positions: dict[str, Any] = {}
            for topic, pos in recovery.items():
                if isinstance(pos, tuple):
                    positions[topic] = {"epoch": pos[0], "offset": pos[1]}
                else:
                    positions[topic] = dict(pos)
            payload["recover"] = True
            payload["recovery"] = positions
        return self.send_message("subscription_update", payload, pri=8)

    def unsubscribe(self, topics: Sequence[str]) -> dict[str, Any]:
        """§3.3 ``subscription_update`` unsubscribe."""
        return self.send_message(
            "subscription_update", {"action": "unsubscribe", "topics": list(topics)}, pri=8
        )

    def send_hello(self) -> None:
        """wse-client ``_send_client_hello`` (sent automatically on ``server_ready``)."""
        if not self._check_send():
            return
        p: dict[str, Any] = {
            "client_version": CLIENT_VERSION,
            "protocol_version": PROTOCOL_VERSION,
            "features": {
                "compression": True,
                "encryption": self.encryption,
                "batching": True,
                "priority_queue": True,
                "circuit_breaker": True,
                "offline_queue": True,
                "message_signing": False,
                "rate_limiting": True,
                "health_check": True,
                "metrics": True,
            },
            "connection_id": self.connection_id,
        }
        if self.encryption:
            # Like wse-client: a fresh key pair per hello (its SecurityManager.reset()).
            self._keypair = generate_keypair(self._rand)
            p["encryption_public_key"] = self._keypair.public_key_b64
        self._send_text(
            _compact(
                {
                    "c": "WSE",
                    "t": "client_hello",
                    "p": p,
                    "id": _uuid4(self._rand),
                    "ts": _iso(self._wall_ms()),
                    "v": PROTOCOL_VERSION,
                    "pri": 10,
                }
            )
        )
        self.hello_sent = True

    def send_ping(self) -> int:
        """A JSON heartbeat ping (wse-client ``_heartbeat_loop``); returns its timestamp."""
        ts = self._wall_ms()
        if self._check_send():
            self._send_text(
                _compact({"c": "WSE", "t": "ping", "p": {"timestamp": ts}, "v": PROTOCOL_VERSION})
            )
        return ts

    def close(self, code: int | None = 1000, reason: str = "", *, now: float | None = None) -> None:
        """Start the close handshake (wse-client closes with 1000)."""
        state = self.state
        if state is ConnectionState.OPEN:
            self._out.append(encode_close(code, reason, mask_key=self._mask()))
        self._close(state, code, reason, now, self.close_timeout)

    # ------------------------------------------------------------------ timers

    def next_deadline(self) -> float | None:
        state = self.state
        if state is ConnectionState.OPEN:
            return self._next_ping
        return self._end_deadline(state)

    def handle_timer(self, now: float) -> None:
        state = self.state
        if state is not ConnectionState.CLOSED:
            self._now = now
        if state is ConnectionState.OPEN:
            due = self._next_ping
            if due is not None and now >= due:
                self._transition(Input.PING_DUE)
                self.send_ping()
                self._next_ping = _next_tick(due, now, self.ping_interval)
        else:
            self._expire(state, now)

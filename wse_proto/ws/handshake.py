"""RFC 6455 §4 opening handshake, server and client side, parsed with h11.

The server reads bytes until the request head is complete (head size capped so a
slow or endless sender cannot grow memory), validates the upgrade and either
accepts with the exact 101 the original sends, or rejects with a small HTTP
error. Bytes after the head (the first frames, if the client did not wait) are
handed back as ``trailing_data`` for the frame decoder.

The 101 is byte-for-byte the original's (reference §1.1, captured): lowercase
``connection``/``upgrade``/``sec-websocket-accept`` and nothing else, so no
subprotocol and no extension is ever agreed; an offered permessage-deflate is
declined by omission.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import h11

from wse_proto._defaults import RandFn
from wse_proto.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "ACCEPTED",
    "DEFAULT_MAX_HEAD_SIZE",
    "NEED_DATA",
    "REJECTED",
    "ClientHandshake",
    "HandshakeRejected",
    "HandshakeRequest",
    "HandshakeState",
    "ServerHandshake",
    "accept_key",
]

_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
DEFAULT_MAX_HEAD_SIZE: Final = 32_768
"""Largest request/response head accepted (h11's own default for incomplete events)."""

_HEAD_END = re.compile(rb"\n\r?\n")
# First byte of a request line must start a method token (RFC 9110 §5.6.2);
# anything else (a TLS ClientHello, binary junk) is refused without waiting.
_TOKEN_START: Final = frozenset(
    b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)
_REASONS: Final = {
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    426: "Upgrade Required",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class HandshakeState(enum.Enum):
    NEED_DATA = "NEED_DATA"
    ACCEPTED = "ACCEPTED"
    REJECTED = "REJECTED"


NEED_DATA: Final = HandshakeState.NEED_DATA
ACCEPTED: Final = HandshakeState.ACCEPTED
REJECTED: Final = HandshakeState.REJECTED


class HandshakeRejected(RemoteProtocolError):
    """The server answered the upgrade with something other than 101."""

    close_code: int | None = None

    def __init__(self, status: int, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(f"handshake rejected with HTTP {status}")
        self.status = status
        self.headers = headers


def accept_key(key: str | bytes) -> str:
    """``Sec-WebSocket-Accept`` for a ``Sec-WebSocket-Key`` (RFC 6455 §4.2.2 step 5.4)."""
    raw = key.encode("ascii") if isinstance(key, str) else key
    return base64.b64encode(hashlib.sha1(raw + _GUID).digest()).decode("ascii")


def _tokens(values: Iterable[str]) -> set[str]:
    """Lowercased comma-separated tokens across every value of a header."""
    return {t.strip().lower() for v in values for t in v.split(",") if t.strip()}


def _valid_key(key: str) -> bool:
    try:
        return len(base64.b64decode(key.encode("ascii"), validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


@dataclass(frozen=True, slots=True)
class HandshakeRequest:
    """The upgrade request as the application sees it.

    Header names are lowercased; values are decoded as latin-1 so every byte
    survives (``value.encode("latin-1")`` gives the wire bytes back).
    """

    method: str
    target: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]

    def get(self, name: str) -> str | None:
        """First value of header ``name`` (case-insensitive), as the original reads it."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def values(self, name: str) -> list[str]:
        """Every value of header ``name`` in arrival order."""
        name = name.lower()
        return [value for key, value in self.headers if key == name]

    @property
    def cookie(self) -> str | None:
        return self.get("cookie")

    @property
    def authorization(self) -> str | None:
        return self.get("authorization")

    @property
    def key(self) -> str:
        return self.get("sec-websocket-key") or ""

    @property
    def wants_msgpack(self) -> bool:
        """Reference §1.1: a plain substring test on the raw query string."""
        return "format=msgpack" in self.query

    @property
    def offered_extensions(self) -> list[str]:
        """Extension offers (all declined), for logging."""
        return [t.strip() for v in self.values("sec-websocket-extensions") for t in v.split(",")]


def _http_response(status: int, body: str, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    payload = (body.rstrip("\n") + "\n").encode("utf-8")
    reason = _REASONS.get(status, "Error")
    lines = [f"HTTP/1.1 {status} {reason}", "connection: close"]
    lines.extend(f"{k}: {v}" for k, v in extra)
    lines.append("content-type: text/plain; charset=utf-8")
    lines.append(f"content-length: {len(payload)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


_VERSION_HEADERS: Final = (("sec-websocket-version", "13"), ("upgrade", "websocket"))


class ServerHandshake:
    """Server side of the opening handshake.

    Feed bytes with :meth:`receive_data` until ``state`` leaves ``NEED_DATA``.
    ``ACCEPTED``: send :meth:`accept`, then decode frames starting with
    ``trailing_data``. ``REJECTED``: send ``rejection`` and close the socket.
    Bad input never raises; only API misuse raises ``LocalProtocolError``.
    """

    __slots__ = (
        "_accept",
        "_buf",
        "_max_head",
        "_scanned",
        "error",
        "rejection",
        "request",
        "state",
        "status",
        "trailing_data",
    )

    def __init__(self, *, max_head_size: int = DEFAULT_MAX_HEAD_SIZE) -> None:
        self._max_head = max_head_size
        self._buf = bytearray()
        self._scanned = 0
        self._accept: bytes | None = None
        self.state: HandshakeState = NEED_DATA
        self.request: HandshakeRequest | None = None
        self.rejection: bytes | None = None
        self.status: int | None = None
        """HTTP status we answer (101, or the rejection's)."""
        self.error: str | None = None
        """Why the request was rejected, for logs."""
        self.trailing_data = b""

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes of the request; parses once the head is complete."""
        if self.state is not NEED_DATA:
            raise LocalProtocolError(f"handshake already {self.state.value}")
        buf = self._buf
        buf += data
        if buf and buf[0] not in _TOKEN_START:
            self._reject(400, "not an HTTP request")
            return
        match = _HEAD_END.search(buf, max(0, self._scanned - 2))
        if match is None:
            self._scanned = len(buf)
            if len(buf) > self._max_head:
                self._reject(431, "request head too large")
            return
        end = match.end()
        if end > self._max_head:
            self._reject(431, "request head too large")
            return
        head = bytes(buf[:end])
        self.trailing_data = bytes(buf[end:])
        self._buf = bytearray()
        self._parse(head)

    def _parse(self, head: bytes) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self._max_head)
        conn.receive_data(head)
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            self._reject(exc.error_status_hint, f"malformed request: {exc}")
            return
        if not isinstance(event, h11.Request):  # pragma: no cover - h11 guarantees it
            self._reject(400, "malformed request")
            return
        headers = tuple(
            (name.decode("latin-1").lower(), value.decode("latin-1"))
            for name, value in event.headers
        )
        target = event.target.decode("ascii")
        path, _, query = target.partition("?")
        self.request = request = HandshakeRequest(
            method=event.method.decode("ascii"),
            target=target,
            path=path,
            query=query,
            headers=headers,
        )
        # RFC 6455 §4.2.1: a request that is not an upgrade to websocket gets
        # 426 (RFC 9110 §15.5.22) naming what we do speak.
        if "websocket" not in _tokens(request.values("upgrade")):
            self._reject(426, "this endpoint only speaks WebSocket", _VERSION_HEADERS)
            return
        if request.method != "GET":
            self._reject(400, "WebSocket upgrade requires GET")
            return
        if event.http_version != b"1.1":
            self._reject(400, "WebSocket upgrade requires HTTP/1.1")
            return
        if "upgrade" not in _tokens(request.values("connection")):
            self._reject(400, "missing 'Connection: Upgrade'")
            return
        versions = request.values("sec-websocket-version")
        if not versions:
            self._reject(400, "missing Sec-WebSocket-Version")
            return
        if versions != ["13"]:
            self._reject(426, "unsupported Sec-WebSocket-Version", _VERSION_HEADERS)
            return
        keys = request.values("sec-websocket-key")
        if len(keys) != 1 or not _valid_key(keys[0]):
            self._reject(400, "missing or invalid Sec-WebSocket-Key")
            return
        if request.values("transfer-encoding") or any(
            v.strip() != "0" for v in request.values("content-length")
        ):
            self._reject(400, "WebSocket upgrade request with a body")
            return
        self._accept = (
            b"HTTP/1.1 101 Switching Protocols\r\nconnection: Upgrade\r\nupgrade: websocket\r\n"
            b"sec-websocket-accept: " + accept_key(keys[0]).encode("ascii") + b"\r\n\r\n"
        )
        self.state = ACCEPTED

    def _reject(self, status: int, why: str, extra: tuple[tuple[str, str], ...] = ()) -> None:
        self.state = REJECTED
        self.status = status
        self.error = why
        self.rejection = _http_response(status, why.split(":")[0], extra)
        self._buf = bytearray()

    def accept(self) -> bytes:
        """The 101 response, byte-identical to the original's (reference §1.1)."""
        if self._accept is None:
            raise LocalProtocolError("accept() needs a valid request (state ACCEPTED)")
        self.status = 101
        return self._accept

    def reject(self, status: int, body: str = "") -> bytes:
        """Refuse a valid request at the application's wish (e.g. 503)."""
        if self.state is not ACCEPTED or self.status == 101:
            raise LocalProtocolError("reject() only applies to a received, unanswered request")
        if not 400 <= status <= 599:
            raise LocalProtocolError("reject() takes a 4xx or 5xx status")
        self._accept = None
        self._reject(status, body or _REASONS.get(status, "Error"))
        assert self.rejection is not None
        return self.rejection


class ClientHandshake:
    """Client side of the opening handshake.

    ``request_bytes`` is the upgrade request (same header order as the
    original's test client and wse-client). Feed the server's answer to
    :meth:`receive_data`; on a valid 101 ``state`` becomes ``ACCEPTED`` and
    ``trailing_data`` holds the first frames. A non-101 final status raises
    :class:`HandshakeRejected`; an invalid 101 raises ``RemoteProtocolError``.
    """

    __slots__ = (
        "_conn",
        "_expected_accept",
        "key",
        "request_bytes",
        "response_headers",
        "state",
        "status",
        "trailing_data",
    )

    def __init__(
        self,
        host: str,
        target: str = "/",
        *,
        headers: Iterable[tuple[str, str]] = (),
        rand: RandFn,
        max_head_size: int = DEFAULT_MAX_HEAD_SIZE,
    ) -> None:
        self.key = base64.b64encode(rand(16)).decode("ascii")
        self._expected_accept = accept_key(self.key)
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_head_size)
        all_headers = [
            ("Host", host),
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", self.key),
            ("Sec-WebSocket-Version", "13"),
            *headers,
        ]
        try:
            request = h11.Request(method="GET", target=target, headers=all_headers)
            self.request_bytes: bytes = self._conn.send(request) or b""
            self._conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            raise LocalProtocolError(f"invalid handshake request: {exc}") from None
        self.state: HandshakeState = NEED_DATA
        self.status: int | None = None
        self.response_headers: tuple[tuple[str, str], ...] = ()
        self.trailing_data = b""

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes of the server's response."""
        if self.state is not NEED_DATA:
            raise LocalProtocolError(f"handshake already {self.state.value}")
        self._conn.receive_data(bytes(data))
        while True:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as exc:
                self.state = REJECTED
                raise RemoteProtocolError(f"malformed handshake response: {exc}") from None
            if event is h11.NEED_DATA:
                return
            if isinstance(event, h11.InformationalResponse | h11.Response):
                headers = tuple(
                    (name.decode("latin-1").lower(), value.decode("latin-1"))
                    for name, value in event.headers
                )
                if event.status_code == 101:
                    self._check_101(headers)
                    return
                if isinstance(event, h11.Response):
                    self.state = REJECTED
                    self.status = event.status_code
                    self.response_headers = headers
                    raise HandshakeRejected(event.status_code, headers)
                continue  # other 1xx (e.g. 100 Continue): wait for the final answer
            self.state = REJECTED  # pragma: no cover - h11 yields only the above here
            raise RemoteProtocolError("unexpected handshake response")  # pragma: no cover

    def _check_101(self, headers: tuple[tuple[str, str], ...]) -> None:
        self.status = 101
        self.response_headers = headers

        def values(name: str) -> list[str]:
            return [v for k, v in headers if k == name]

        problem = None
        if "websocket" not in _tokens(values("upgrade")):
            problem = "101 without 'Upgrade: websocket'"
        elif "upgrade" not in _tokens(values("connection")):
            problem = "101 without 'Connection: Upgrade'"
        elif values("sec-websocket-accept") != [self._expected_accept]:
            problem = "wrong Sec-WebSocket-Accept"
        elif values("sec-websocket-extensions"):
            problem = "server chose an extension we did not offer"
        elif values("sec-websocket-protocol"):
            problem = "server chose a subprotocol we did not offer"
        if problem is not None:
            self.state = REJECTED
            raise RemoteProtocolError(problem, close_code=None)
        self.state = ACCEPTED
        self.trailing_data = self._conn.trailing_data[0]

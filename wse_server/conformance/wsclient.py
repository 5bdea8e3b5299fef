"""The kit's client for server mode: :class:`~wse_proto.client.ClientConnection` over asyncio.

Every byte the server sends goes through a frame decoder of our own first (the "tee"),
which keeps each frame exactly as it arrived, so scenarios can check literal bytes (key
order, the 25-character rule). Each frame is then handed to the machine on its own, so
the machine's events (a decrypted envelope, a PONG it answered) are attached to the frame
that caused them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from wse_proto import codec
from wse_proto._defaults import monotonic, system_rand, wall_clock_ms
from wse_proto.client import ClientConnection
from wse_proto.errors import WSEError
from wse_proto.events import ConnectionClosed, Event, Hello, Ready, Received
from wse_proto.ws import BINARY, CLOSE, TEXT, FrameDecoder, encode_frame, parse_close

from .core import Fail, HeadBuffer, Unsupported, read_until_eof

__all__ = ["CONTROL_RESULT", "CONTROL_TYPE", "KitConnection", "ServerFrame"]

CONTROL_TYPE = "conformance_control"
CONTROL_RESULT = "conformance_control_result"

_SERVER_PING_PREFIX = b'{"c":"WSE","t":"ping"'
T = TypeVar("T")


@dataclass(slots=True)
class ServerFrame:
    """One frame from the server, as received, with the machine events it produced."""

    opcode: int
    payload: bytes
    at: float
    events: list[Event] = field(default_factory=list)
    _messages: list[dict[str, Any]] | None = None

    @property
    def text(self) -> str | None:
        if self.opcode != TEXT:
            return None
        return self.payload.decode("utf-8", "replace")

    @property
    def json(self) -> Any:
        """The text frame parsed as JSON exactly as sent (no normalisation), or None."""
        if self.opcode != TEXT:
            return None
        try:
            return json.loads(self.payload)
        except ValueError:
            return None

    @property
    def encrypted(self) -> bool:
        return self.opcode == BINARY and self.payload[:2] == b"E:"

    @property
    def is_server_ping(self) -> bool:
        return self.opcode == TEXT and self.payload.startswith(_SERVER_PING_PREFIX)

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The envelopes a client decodes from this frame (PROTOCOL §6.5)."""
        if self._messages is None:
            found: list[dict[str, Any]] = []
            if self.opcode == TEXT or (self.opcode == BINARY and not self.encrypted):
                data: bytes | str = self.payload
                if self.opcode == TEXT:
                    data = self.payload.decode("utf-8", "replace")
                try:
                    found = codec.decode_server_message(data, max_size=1 << 26)
                except WSEError:
                    found = []
            elif self.encrypted:
                for ev in self.events:
                    if isinstance(ev, Received):
                        found.append(ev.envelope)
                    elif isinstance(ev, Ready):
                        found.append({"t": "server_ready", "p": ev.payload})
                    elif isinstance(ev, Hello):
                        found.append({"t": "server_hello", "p": ev.payload})
            self._messages = found
        return self._messages


@dataclass(frozen=True, slots=True)
class Target:
    """Where the server under test listens (``ws://host:port/path``)."""

    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, url: str) -> Target:
        if not url.startswith("ws://"):
            raise ValueError("only ws:// URLs are supported (put a TLS proxy's plain side here)")
        rest = url[5:]
        hostport, _, path = rest.partition("/")
        path = "/" + path
        if hostport.startswith("["):
            host, _, port_text = hostport[1:].partition("]")
            port_text = port_text.lstrip(":")
        else:
            host, _, port_text = hostport.rpartition(":")
            if not host:
                host, port_text = hostport, ""
        port = int(port_text) if port_text else 80
        return cls(host, port, path)

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class KitConnection:
    """One WebSocket connection from the kit to the server under test."""

    def __init__(
        self,
        target: Target,
        *,
        path: str | None = None,
        token: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
        encryption: bool = False,
        msgpack: bool = False,
        query_params: bool = True,
        timeout: float = 5.0,
        label: str = "conn",
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.label = label
        self.machine = ClientConnection(
            host=target.host_header,
            path=path if path is not None else target.path,
            token=token,
            headers=list(headers),
            msgpack=msgpack,
            encryption=encryption,
            rand=system_rand,
            wall_ms=wall_clock_ms,
            ping_interval=3600.0,
            handshake_timeout=max(timeout, 1.0),
            query_params=query_params,
            now=monotonic(),
        )
        self.frames: list[ServerFrame] = []
        self.events: list[Event] = []
        self.status: int | None = None
        self.response_headers: list[tuple[str, str]] = []
        self.eof = False
        self.eof_at: float | None = None
        self.violation: str | None = None
        """A framing violation by the server (masked frame, bad UTF-8 text, ...)."""
        self.cursor = 0
        self._head = HeadBuffer()
        self._decoder = FrameDecoder(client_side=True, max_message_size=1 << 26)
        self._decoder_failed = False
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._rid = 0

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """TCP connect and send the upgrade request (the machine queued it)."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.target.host, self.target.port), self.timeout
            )
        except (OSError, TimeoutError) as exc:
            raise Fail(f"cannot connect to {self.target.host_header}: {exc!r}") from None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._reader, self._writer = reader, writer
        self._flush()
        self._task = asyncio.create_task(self._read_loop())

    async def aclose(self) -> None:
        """Drop the connection (after a polite Close if it is still open)."""
        if self._writer is None:
            return
        if self.machine.state.name == "OPEN":
            with contextlib.suppress(Exception):
                self.machine.close(1000, "")
                self._flush()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        writer, self._writer = self._writer, None
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _read_loop(self) -> None:
        reader = self._reader
        assert reader is not None
        await read_until_eof(reader, self._on_bytes)
        self.eof = True
        self.eof_at = monotonic()
        self.machine.receive_eof(monotonic())
        self.events.extend(self.machine.events_received())
        self._wake.set()

    def _on_bytes(self, data: bytes) -> None:
        now = monotonic()
        if not self._head.done:
            split = self._head.feed(data)
            if split is None:
                if self._head.too_long:
                    self.violation = "HTTP response head longer than 64 KiB"
                    self._decoder_failed = True
                    self._head.done = True
                self._wake.set()
                return
            head, data = split
            self._parse_head(head)
            self.machine.receive_data(head, now)
            self.events.extend(self.machine.events_received())
            self._flush()
        if data and not self._decoder_failed:
            self._decoder.receive_data(data)
            self._drain_frames(now)
        self._wake.set()

    def _parse_head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) >= 2 and parts[1].isdigit():
            self.status = int(parts[1])
        for line in lines[1:]:
            if ":" in line:
                name, _, value = line.partition(":")
                self.response_headers.append((name.strip().lower(), value.strip()))

    def _drain_frames(self, now: float) -> None:
        while True:
            try:
                batch = self._decoder.messages()
            except WSEError as exc:
                self.violation = f"server framing violation: {exc.message}"
                self._decoder_failed = True
                return
            if not batch:
                return
            for opcode, payload in batch:
                frame = ServerFrame(opcode, payload, now)
                self.frames.append(frame)
                if self.machine.state.name != "CLOSED":
                    self.machine.receive_data(encode_frame(opcode, payload), now)
                    frame.events = self.machine.events_received()
                    self.events.extend(frame.events)
                self._flush()

    def _flush(self) -> None:
        data = self.machine.data_to_send()
        if data and self._writer is not None and not self._writer.is_closing():
            self._writer.write(data)

    # ------------------------------------------------------------------ sending

    def send_message(self, t: str, p: dict[str, Any] | None = None, **fields: Any) -> None:
        """An envelope through the machine (encrypted once a key is agreed)."""
        self.machine.send_message(t, p, **fields)
        self._flush()

    def send_text(self, text: str) -> None:
        """A text frame through the machine (an ``E:`` frame once a key is agreed)."""
        self.machine.send_text(text)
        self._flush()

    def send_plain_text(self, text: str) -> None:
        """A masked text frame written directly: never encrypted (transport messages)."""
        self.send_frame(TEXT, text.encode("utf-8"))

    def send_frame(self, opcode: int, payload: bytes, *, fin: bool = True) -> None:
        """One masked frame written directly, bypassing the machine."""
        self.send_raw(encode_frame(opcode, payload, mask_key=system_rand(4), fin=fin))

    def send_raw(self, data: bytes) -> None:
        """Bytes written to the socket as they are (malformed frames...)."""
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(data)

    def close(self, code: int | None = 1000, reason: str = "") -> None:
        self.machine.close(code, reason)
        self._flush()

    # ------------------------------------------------------------------ waiting

    async def wait(
        self, predicate: Callable[[], T | None], what: str, timeout: float | None = None
    ) -> T:
        """Wait until ``predicate()`` returns something truthy; Fail after ``timeout``."""
        limit = self.timeout if timeout is None else timeout
        deadline = monotonic() + limit
        while True:
            value = predicate()
            if value:
                return value
            remaining = deadline - monotonic()
            if remaining <= 0:
                raise Fail(f"{self.label}: no {what} within {limit:g} s")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), remaining)

    async def expect(
        self,
        match: Callable[[ServerFrame], bool],
        what: str,
        timeout: float | None = None,
        *,
        since: int | None = None,
    ) -> ServerFrame:
        """The first frame at or after the cursor (or ``since``) that matches; the cursor
        moves past it when searching from the cursor."""
        start = self.cursor if since is None else since

        def find() -> tuple[int, ServerFrame] | None:
            for i in range(start, len(self.frames)):
                if match(self.frames[i]):
                    return i, self.frames[i]
            return None

        index, frame = await self.wait(find, what, timeout)
        if since is None:
            self.cursor = index + 1
        return frame

    async def expect_message(
        self,
        t: str,
        what: str | None = None,
        pred: Callable[[dict[str, Any]], bool] | None = None,
        timeout: float | None = None,
        *,
        since: int | None = None,
    ) -> tuple[ServerFrame, dict[str, Any]]:
        """The first frame carrying an envelope of type ``t`` (and matching ``pred``)."""
        found: list[dict[str, Any]] = []

        def match(frame: ServerFrame) -> bool:
            for msg in frame.messages:
                if msg.get("t") == t and (pred is None or pred(msg)):
                    found.append(msg)
                    return True
            return False

        frame = await self.expect(match, what or f"{t!r} message", timeout, since=since)
        return frame, found[-1]

    async def expect_closed(self, timeout: float | None = None) -> tuple[bool, int | None, str]:
        """Wait for the server's Close frame or EOF: ``(close_frame_seen, code, reason)``."""

        def ended() -> bool:
            return self.eof or any(f.opcode == CLOSE for f in self.frames)

        await self.wait(ended, "Close frame or end of the TCP connection", timeout)
        for frame in self.frames:
            if frame.opcode == CLOSE:
                try:
                    code, reason = parse_close(frame.payload)
                except WSEError:
                    return True, -1, frame.payload.hex()
                return True, code, reason
        return False, None, ""

    async def expect_eof(self, timeout: float | None = None) -> None:
        await self.wait(lambda: self.eof, "end of the TCP connection", timeout)

    async def settle(self, seconds: float) -> None:
        """Let ``seconds`` pass while frames keep arriving."""
        await asyncio.sleep(seconds)

    def data_frames(self, since: int = 0) -> list[ServerFrame]:
        """Text and binary frames from ``since`` on, server heartbeats excluded."""
        return [
            f
            for f in self.frames[since:]
            if f.opcode in (TEXT, BINARY) and not f.is_server_ping and not _is_control_reply(f)
        ]

    @property
    def ready(self) -> dict[str, Any] | None:
        for ev in self.events:
            if isinstance(ev, Ready):
                return ev.payload
        return None

    @property
    def hello(self) -> Hello | None:
        for ev in self.events:
            if isinstance(ev, Hello):
                return ev
        return None

    @property
    def closed_event(self) -> ConnectionClosed | None:
        for ev in self.events:
            if isinstance(ev, ConnectionClosed):
                return ev
        return None

    async def wait_ready(self, *, hello: bool = True) -> None:
        """Wait for ``server_ready`` (and the ``server_hello`` answering our hello)."""

        def ready() -> bool:
            if self.closed_event is not None or self.eof:
                raise Fail(
                    f"{self.label}: connection ended before server_ready ({self.describe_end()})"
                )
            return self.ready is not None and (not hello or self.hello is not None)

        await self.wait(ready, "server_ready" + (" and server_hello" if hello else ""))

    def describe_end(self) -> str:
        closed = self.closed_event
        parts = []
        if self.status is not None and self.status != 101:
            parts.append(f"HTTP {self.status}")
        if closed is not None:
            parts.append(f"close {closed.code} {closed.reason!r}")
        errors = [f.json for f in self.frames if f.json and f.json.get("t") == "error"]
        if errors:
            parts.append(f"error frame {errors[0].get('p')}")
        if self.violation:
            parts.append(self.violation)
        return ", ".join(parts) or "no reason seen"

    # ------------------------------------------------------------------ control protocol

    async def control(
        self, action: str, timeout: float | None = None, **params: Any
    ) -> dict[str, Any]:
        """One request of the conformance control protocol; returns the reply payload.

        Raises Unsupported when the server answers ``error: "unsupported"``.
        """
        self._rid += 1
        rid = f"{self.label}-{self._rid}"
        mark = len(self.frames)
        self.send_message(CONTROL_TYPE, {"id": rid, "action": action, **params})
        _, msg = await self.expect_message(
            CONTROL_RESULT,
            f"control reply to {action!r}",
            lambda m: isinstance(m.get("p"), dict) and m["p"].get("id") == rid,
            timeout,
            since=mark,
        )
        p: dict[str, Any] = msg["p"]
        if not p.get("ok"):
            if p.get("error") == "unsupported":
                raise Unsupported(
                    f"not supported by the server under test: {p.get('message', action)}"
                )
            raise Fail(f"control {action!r} failed: {p.get('error')}: {p.get('message')}")
        return p


def _is_control_reply(frame: ServerFrame) -> bool:
    if frame.opcode != TEXT or b'"conformance_control_result"' not in frame.payload:
        return False
    return any(m.get("t") == CONTROL_RESULT for m in frame.messages)

"""The scripted reference server of client mode: :class:`~wse_proto.server.ServerConnection`
machines over asyncio, one per connection the client under test opens.

The machines do the protocol work (RFC 6455, ``client_hello``/``server_hello`` with the key
exchange, PONG replies, decryption); the scenarios script the rest (when ``server_ready``
goes out, what to send, when to close). As in server mode a frame decoder of our own sees
every client frame first, so scenarios can check the exact form the client used (a text
PONG, an ``E:`` echo), and each frame is fed to the machine alone so its events belong to
that frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from wse_proto import codec, envelope
from wse_proto._defaults import monotonic, system_rand, wall_clock_ms
from wse_proto.config import ServerConfig
from wse_proto.errors import WSEError
from wse_proto.events import (
    DecryptFailed,
    Event,
    HelloReceived,
    KeyExchangeFailed,
    MessageReceived,
)
from wse_proto.server import ServerConnection
from wse_proto.ws import (
    BINARY,
    CLOSE,
    TEXT,
    FrameDecoder,
    HandshakeRequest,
    ServerHandshake,
    encode_close,
    encode_frame,
    text_frame,
)

from .core import Fail, HeadBuffer, read_until_eof

__all__ = ["ClientFrame", "RefServer", "RefSession", "SessionPolicy"]

_ZERO_MASK = b"\x00\x00\x00\x00"
PING_INTERVAL = 10.0


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    """How the reference server treats the next connection it accepts."""

    drop: bool = False  # close the TCP connection at once, no HTTP answer
    ready_delay: float = 0.0  # seconds between the 101 and server_ready
    recovery: bool = True  # server_ready/server_hello features.recovery
    send_ready: bool = True


@dataclass(slots=True)
class ClientFrame:
    """One frame from the client (unmasked), with the machine events it produced."""

    opcode: int
    payload: bytes
    at: float
    events: list[Event] = field(default_factory=list)

    @property
    def encrypted(self) -> bool:
        return self.opcode == BINARY and self.payload[:2] == b"E:"

    @property
    def text(self) -> str | None:
        return self.payload.decode("utf-8", "replace") if self.opcode == TEXT else None

    @property
    def message(self) -> dict[str, Any] | None:
        """The client message this frame carries, decrypted if needed, or None."""
        if self.opcode == TEXT:
            try:
                inbound = codec.decode_client_text(self.payload.decode("utf-8"))
            except (UnicodeDecodeError, WSEError):
                return None
            return (
                inbound.value if inbound.kind == "msg" and isinstance(inbound.value, dict) else None
            )
        if self.encrypted:
            for ev in self.events:
                if isinstance(ev, MessageReceived) and isinstance(ev.value, dict):
                    return ev.value
        return None

    @property
    def decrypt_failed(self) -> bool:
        return any(isinstance(ev, DecryptFailed) for ev in self.events)


class RefSession:
    """One connection of the client under test."""

    def __init__(
        self,
        server: RefServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        policy: SessionPolicy,
        index: int,
    ) -> None:
        self.server = server
        self.policy = policy
        self.index = index
        self._reader = reader
        self._writer = writer
        # Heartbeats like a real server (clients reconnect after ~40 s without one, §11.6).
        config = ServerConfig(
            ping_interval=PING_INTERVAL,
            idle_timeout=7200.0,
            recovery_enabled=policy.recovery,
            close_timeout=3.0,
        )
        self.conn = ServerConnection(
            config,
            conn_id=envelope.uuid7(wall_clock_ms(), system_rand),
            now=monotonic(),
            rand=system_rand,
            wall_ms=wall_clock_ms,
            next_seq=server.next_seq,
        )
        self.accepted_at = monotonic()
        self.request: HandshakeRequest | None = None
        self.upgraded_at: float | None = None
        self.ready_at: float | None = None
        self.frames: list[ClientFrame] = []
        self.events: list[Event] = []
        self.eof = False
        self.eof_at: float | None = None
        self.violation: str | None = None
        self.cursor = 0
        self._head = HeadBuffer()
        self._decoder = FrameDecoder(client_side=False, max_message_size=1 << 24)
        self._decoder_failed = False
        self._timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ properties

    @property
    def conn_id(self) -> str:
        return self.conn.conn_id

    @property
    def open(self) -> bool:
        return self.conn.state.name == "OPEN" and not self.eof

    @property
    def encrypted(self) -> bool:
        return self.conn.encrypted

    @property
    def user_id(self) -> str:
        return self.server.user_id

    def hello_events(self) -> list[HelloReceived]:
        return [ev for ev in self.events if isinstance(ev, HelloReceived)]

    def key_exchange_failures(self) -> list[KeyExchangeFailed]:
        return [ev for ev in self.events if isinstance(ev, KeyExchangeFailed)]

    # ------------------------------------------------------------------ I/O

    async def run(self) -> None:
        try:
            await read_until_eof(self._reader, self._on_bytes)
        finally:
            self.eof = True
            self.eof_at = monotonic()
            self.conn.receive_eof(monotonic())
            self._collect()
            self._close_socket()
            self.server.changed()

    def _on_bytes(self, data: bytes) -> None:
        now = monotonic()
        if not self._head.done:
            split = self._head.feed(data)
            if split is None:
                if self._head.too_long:
                    self.violation = "request head longer than 64 KiB"
                    self._close_socket()
                return
            head, data = split
            probe = ServerHandshake()
            with contextlib.suppress(WSEError):
                probe.receive_data(head)
            self.request = probe.request
            self.conn.receive_data(head, now)
            self._collect()
            if self.conn.state.name == "OPEN":
                self.upgraded_at = now
                if self.policy.send_ready:
                    loop = asyncio.get_running_loop()
                    loop.call_later(self.policy.ready_delay, self._send_ready)
        if data and not self._decoder_failed:
            self._decoder.receive_data(data)
            self._drain(now)
        self.server.changed()

    def _drain(self, now: float) -> None:
        while True:
            try:
                batch = self._decoder.messages()
            except WSEError as exc:
                self.violation = f"client framing violation: {exc.message}"
                self._decoder_failed = True
                with contextlib.suppress(Exception):
                    self._write(encode_close(exc.close_code or 1002, exc.message[:100]))
                self._close_socket()
                return
            if not batch:
                return
            for opcode, payload in batch:
                frame = ClientFrame(opcode, payload, now)
                self.frames.append(frame)
                if self.conn.state.name != "CLOSED":
                    self.conn.receive_data(encode_frame(opcode, payload, mask_key=_ZERO_MASK), now)
                    frame.events = self._collect()

    def _collect(self) -> list[Event]:
        events = self.conn.events_received()
        self.events.extend(events)
        self._flush()
        return events

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self._write(data)
        if self.conn.wants_close:
            self._close_socket()
        else:
            self._arm()

    def _write(self, data: bytes) -> None:
        if not self._writer.is_closing():
            self._writer.write(data)

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.conn.next_deadline()
        if deadline is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(loop.time() + max(0.0, deadline - monotonic()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        self.conn.handle_timer(monotonic())
        self._collect()
        self.server.changed()

    def _close_socket(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._writer.is_closing():
            self._writer.close()

    def _send_ready(self) -> None:
        if not self.open:
            return
        self.conn.send_text(
            envelope.server_ready(
                conn_id=self.conn.conn_id,
                user_id=self.user_id,
                recovery=self.policy.recovery,
                wall_ms=wall_clock_ms(),
                rand=system_rand,
            ).decode("utf-8")
        )
        self.ready_at = monotonic()
        self._collect()
        self.server.changed()

    # ------------------------------------------------------------------ sending

    def send_text(self, text: str) -> None:
        """A verbatim text frame (never encrypted)."""
        if self.open:
            self.conn.send_text(text)
            self._collect()

    def send_bytes(self, data: bytes) -> None:
        """A verbatim binary frame (never encrypted)."""
        if self.open:
            self.conn.send_bytes(data)
            self._collect()

    def send_message(self, text: str) -> None:
        """A message as topic fan-out sends it: a text frame, or ``E:`` once a key is agreed."""
        if self.open:
            payload = text.encode("utf-8")
            self.conn.send_broadcast(text_frame(payload), payload)
            self._collect()

    def send_json(self, obj: dict[str, Any]) -> None:
        self.send_message(json.dumps(obj, separators=(",", ":"), ensure_ascii=False))

    def send_event(self, event: dict[str, Any], compression_threshold: int = 1024) -> None:
        """``send_event`` output (binary JSON, ``C:``, or ``E:`` on an encrypted session)."""
        if self.open:
            self.conn.send_event(
                event, now=monotonic(), compression_threshold=compression_threshold
            )
            self._collect()

    def write_raw(self, data: bytes) -> None:
        """Bytes straight to the socket (malformed frames)."""
        self._write(data)

    def close(self, code: int | None = None, reason: str = "") -> None:
        if self.open:
            self.conn.close(code, reason, now=monotonic())
            self._collect()

    def abort(self) -> None:
        self.conn.abort()
        self._collect()
        self._close_socket()

    # ------------------------------------------------------------------ waiting

    async def wait(self, predicate: Callable[[], Any], what: str, timeout: float) -> Any:
        """Wait for ``predicate()`` to be truthy; Fail on timeout or when the session ends."""
        return await _wait_until(
            predicate,
            what,
            timeout,
            self.server.changed_within,
            label=f"session {self.index}: ",
            ended=lambda: self.eof,
        )

    def messages(self, since: int = 0) -> list[tuple[ClientFrame, dict[str, Any]]]:
        return [(f, m) for f in self.frames[since:] if (m := f.message) is not None]

    async def expect_message(
        self,
        t: str | tuple[str, ...],
        what: str,
        timeout: float,
        pred: Callable[[dict[str, Any]], bool] | None = None,
        since: int | None = None,
    ) -> tuple[ClientFrame, dict[str, Any]]:
        """The first client message of type ``t`` (or one of several) after the cursor
        (or ``since``)."""
        start = self.cursor if since is None else since
        types = (t,) if isinstance(t, str) else t

        def find() -> tuple[int, ClientFrame, dict[str, Any]] | None:
            for i in range(start, len(self.frames)):
                msg = self.frames[i].message
                if msg is not None and msg.get("t") in types and (pred is None or pred(msg)):
                    return i, self.frames[i], msg
            return None

        index, frame, msg = await self.wait(find, what, timeout)
        if since is None:
            self.cursor = index + 1
        return frame, msg

    async def expect_end(self, timeout: float) -> tuple[int | None, bool]:
        """Wait for the client's Close frame or EOF: ``(close code or None, close_seen)``."""

        def ended() -> bool:
            return self.eof or any(f.opcode == CLOSE for f in self.frames)

        await self.wait(ended, "Close frame or end of the TCP connection", timeout)
        for frame in self.frames:
            if frame.opcode == CLOSE:
                code = int.from_bytes(frame.payload[:2], "big") if len(frame.payload) >= 2 else None
                return code, True
        return None, False


class RefServer:
    """Listens for the client under test; applies a :class:`SessionPolicy` per accept."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, *, user_id: str = "conformance-client"
    ) -> None:
        self.host = host
        self.port = port
        self.user_id = user_id
        self.sessions: list[RefSession] = []
        self.accepts: list[tuple[float, str]] = []  # (time, "session" | "dropped")
        self.default_policy = SessionPolicy()
        self._policies: list[SessionPolicy] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._seq = 0

    def next_seq(self) -> int:
        seq = self._seq
        self._seq += 1
        return seq

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_client, self.host, self.port)
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}/wse"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
        for session in self.sessions:
            session.abort()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

    def queue_policies(self, *policies: SessionPolicy) -> None:
        """Policies for the next accepted connections, in order (then the default)."""
        self._policies.extend(policies)

    def changed(self) -> None:
        """Something happened on some connection: wake every waiter to re-check."""
        self._wake.set()

    async def changed_within(self, seconds: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        policy = self._policies.pop(0) if self._policies else self.default_policy
        now = monotonic()
        if policy.drop:
            self.accepts.append((now, "dropped"))
            writer.close()
            self.changed()
            return
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.accepts.append((now, "session"))
        session = RefSession(self, reader, writer, policy, len(self.sessions))
        self.sessions.append(session)
        self.changed()
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await session.run()
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def wait(self, predicate: Callable[[], Any], what: str, timeout: float) -> Any:
        return await _wait_until(predicate, what, timeout, self.changed_within)

    async def next_session(self, after: int, timeout: float) -> RefSession:
        """The first session with index >= ``after`` once it is upgraded."""

        def found() -> RefSession | None:
            for session in self.sessions[after:]:
                if session.upgraded_at is not None:
                    return session
            return None

        session: RefSession = await self.wait(found, "new connection from the client", timeout)
        return session


async def _wait_until(
    predicate: Callable[[], Any],
    what: str,
    timeout: float,
    changed_within: Callable[[float], Awaitable[None]],
    *,
    label: str = "",
    ended: Callable[[], bool] = lambda: False,
) -> Any:
    """Re-check ``predicate()`` whenever the server reports a change; its first truthy value,
    or Fail (``label`` first) when ``ended()`` or ``timeout`` seconds passed."""
    deadline = monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if ended():
            raise Fail(f"{label}the connection ended before {what}")
        remaining = deadline - monotonic()
        if remaining <= 0:
            raise Fail(f"{label}no {what} within {timeout:g} s")
        await changed_within(remaining)


def random_epoch() -> str:
    """An 8-hex-digit recovery epoch (PROTOCOL §13.1)."""
    return os.urandom(4).hex()

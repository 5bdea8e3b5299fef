"""asyncio (and uvloop) transport: a thin pump around one ``ServerCore``.

Per socket: bytes in -> ``core.feed`` -> flush; EOF/loss -> core. Flush writes everything a
dirty connection has queued as one ``write`` (coalescing), reports the transport's write
backlog back to the connection (the core applies the outbound bound, spec §6.4) and closes
the socket when the machine asks for it. One lazily re-armed timer per connection serves
every deadline the machine has (handshake timeout, ping, idle close).

Application threads never touch sockets: their core calls mark connections dirty and the
core calls :meth:`AsyncioTransport.wake`, which schedules one flush on the loop however many
calls arrive before it runs, so a burst of sends becomes one write per connection.

Inbound flow control (decision F6): when the core's inbound queue is full every socket stops
reading (TCP backpressure) until the application has popped enough events; nothing the
server accepted is ever dropped.

Hot paths (numbers in bench/README.md): sockets are read by a buffered protocol into one
32 KiB buffer shared by the loop (no bytes object per read, and batches small enough to
stay in the CPU caches until the application takes them); the application is woken after
the writes of a read, not before them; and the upgrade request, which clients send right
after connecting, is read as soon as the connection is made instead of one loop iteration
later.

The module name shadows the stdlib inside this package only; absolute imports keep
``import asyncio`` pointing at the standard library.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from wse_proto._defaults import monotonic
from wse_proto.server import ConnectionState, ServerConnection

from .base import Transport

if TYPE_CHECKING:
    from wse_proto.hub import ServerCore

__all__ = ["AsyncioTransport"]

log = logging.getLogger("wse_transports.asyncio")

MAX_PENDING_HANDSHAKES = 512
"""Accepted sockets still in the upgrade; beyond this new sockets are dropped (§1.2)."""

PENDING_GRACE = 1.0
"""The cap applies once the oldest pending upgrade has waited this long.

One event loop accepts a whole burst of sockets before it reads any of them, so a burst
of 1,000 honest clients would look like 1,000 stalled upgrades. Dropping only while the
oldest upgrade is older than this keeps the slowloris protection (stalled sockets age)
without refusing a reconnect storm; ``max_connections`` still bounds the total.
"""

SEND_BUFFER_BYTES = 256 * 1024
"""SO_SNDBUF like the original's listener (§1.1)."""

CLOSE_FLUSH_TIMEOUT = 5.0
"""A closing socket whose peer never reads is aborted after this many seconds."""

START_TIMEOUT = 10.0

READ_SIZE = 32 * 1024
"""Bytes read per ``recv``, into one buffer shared by every socket of the loop.

Smaller than asyncio's 256 KiB default on purpose: the messages decoded from one read
are handed to the application as one batch, and a batch that still fits in the CPU
caches when the application takes it is much cheaper (measured in bench/README.md).
"""

_HANDSHAKE = ConnectionState.HANDSHAKE
_readv = getattr(os, "readv", None)  # POSIX only: elsewhere the early read is skipped


class _Conn(asyncio.BufferedProtocol):
    """One socket. Holds no protocol state: it forwards to the pump.

    A buffered protocol: the loop reads into the pump's shared buffer (the machine copies
    what it keeps before the next read), so no bytes object is allocated per ``recv``.
    """

    __slots__ = (
        "closing",
        "conn",
        "lost",
        "pump",
        "timer",
        "timer_at",
        "transport",
    )

    def __init__(self, pump: AsyncioTransport) -> None:
        self.pump = pump
        self.transport: asyncio.Transport | None = None
        self.conn: ServerConnection | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = math.inf
        self.closing = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.pump._made(self, transport)  # type: ignore[arg-type]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.pump._read_view

    def buffer_updated(self, nbytes: int) -> None:
        self.pump._data(self, self.pump._read_view[:nbytes])

    def eof_received(self) -> bool | None:
        self.pump._eof(self)
        return None  # let asyncio close the socket

    def connection_lost(self, exc: Exception | None) -> None:
        self.pump._lost(self)

    def pause_writing(self) -> None:
        # Called from inside transport.write(), with the pump's lock held: the flush
        # records the backlog right after writing, nothing to do here.
        pass

    def resume_writing(self) -> None:
        # The buffer drained below the low-water mark; report it outside this callback
        # (it may run inside a write() that holds the lock).
        loop = self.pump.loop
        if loop is not None:
            loop.call_soon(self.pump._backlog_changed, self)


class AsyncioTransport(Transport):
    """Serve a ``ServerCore`` on an asyncio (or uvloop) event loop.

    ``start()`` runs the loop in a daemon thread; ``serve()`` runs inside the caller's loop.
    """

    name = "asyncio"
    supports_serve = True

    def __init__(
        self,
        core: ServerCore,
        lock: threading.Lock,
        *,
        host: str,
        port: int,
        loop: str = "asyncio",
        max_pending_handshakes: int = MAX_PENDING_HANDSHAKES,
        pending_grace: float = PENDING_GRACE,
        backlog: int = 1024,
        reuse_port: bool = False,
    ) -> None:
        super().__init__(core, lock, host=host, port=port)
        if loop not in ("asyncio", "uvloop"):
            raise ValueError(f"loop must be 'asyncio' or 'uvloop', not {loop!r}")
        self.loop_kind = loop
        self.max_pending_handshakes = max_pending_handshakes
        self.pending_grace = pending_grace
        self.backlog = backlog
        self.reuse_port = reuse_port
        """SO_REUSEPORT on the WebSocket listener, so several processes share one port."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread_id: int | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._stop_event: asyncio.Event | None = None
        self._done: asyncio.Event | None = None
        self._conns: dict[int, _Conn] = {}  # id(machine) -> socket protocol
        self._all: set[_Conn] = set()  # every live socket, registered or not
        self._pending: dict[_Conn, float] = {}  # upgrades in progress -> accept time
        self._flush_scheduled = False
        self._reading_paused = False
        self._running = False
        self._bound_port = 0
        self._grace = 2.0
        self._flush_cb = self._flush_from_loop  # bound once
        self._read_view = memoryview(bytearray(READ_SIZE))

    # ------------------------------------------------------------------ lifecycle

    @property
    def running(self) -> bool:
        return self._running

    @property
    def bound_port(self) -> int:
        return self._bound_port

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop

    def _new_loop(self) -> asyncio.AbstractEventLoop:
        if self.loop_kind == "uvloop":
            try:
                import uvloop
            except ImportError:
                log.warning("uvloop is not installed; using the asyncio event loop")
            else:
                new_loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
                return new_loop
        return asyncio.new_event_loop()

    def start(self) -> None:
        """Run the loop in a daemon thread; return once listening (or raise the bind error)."""
        if self._running:
            raise RuntimeError("transport already running")
        ready = threading.Event()
        failure: list[BaseException] = []

        def on_ready(exc: BaseException | None) -> None:
            if exc is not None:
                failure.append(exc)
            ready.set()

        def main() -> None:
            loop = self._new_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._run(on_ready))
            except BaseException as exc:  # reported to start() when it happens early
                if not ready.is_set():
                    on_ready(exc)
                elif not failure:
                    log.exception("event loop crashed")
            finally:
                with contextlib.suppress(Exception):
                    loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()
                asyncio.set_event_loop(None)

        thread = threading.Thread(target=main, name="wse-asyncio", daemon=True)
        self._thread = thread
        thread.start()
        if not ready.wait(START_TIMEOUT):
            raise RuntimeError("the event loop did not start listening in time")
        if failure:
            thread.join(START_TIMEOUT)
            self._thread = None
            raise failure[0]

    async def serve(self, on_ready: Callable[[BaseException | None], None] | None = None) -> None:
        """Serve inside the running loop until ``stop_async()`` or cancellation."""
        if self._running:
            raise RuntimeError("transport already running")

        def report(exc: BaseException | None) -> None:
            if on_ready is not None:
                on_ready(exc)

        await self._run(report)

    async def _run(self, on_ready: Callable[[BaseException | None], None]) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._loop_thread_id = threading.get_ident()
        self._stop_event = asyncio.Event()
        self._done = asyncio.Event()
        try:
            server = await loop.create_server(
                lambda: _Conn(self),
                self.host,
                self.port,
                backlog=self.backlog,
                reuse_address=True,
                reuse_port=self.reuse_port or None,
            )
        except BaseException as exc:  # bind error: reported, then raised to serve()'s caller
            self._loop = None
            on_ready(exc)
            raise
        self._server = server
        sockets = server.sockets or ()
        self._bound_port = sockets[0].getsockname()[1] if sockets else self.port
        with self.lock:
            self.core.set_wakeup(self.wake)
            self.core.defer_inbound_notice = True  # announced after each flush
        self._running = True
        on_ready(None)
        try:
            await self._stop_event.wait()
        finally:
            await self._shutdown(self._grace)
            self._running = False
            self._done.set()

    def stop(self, grace: float = 2.0) -> None:
        """Send close 1001 to every client, wait up to ``grace`` s, stop the loop and join."""
        loop, thread = self._loop, self._thread
        if loop is None or not self._running:
            return
        self._grace = grace
        if threading.get_ident() == self._loop_thread_id:
            raise RuntimeError("stop() called from the event loop thread; use stop_async()")
        with contextlib.suppress(RuntimeError):  # loop already closed
            loop.call_soon_threadsafe(self._request_stop)
        if thread is not None:
            thread.join(grace + 5.0)
            self._thread = None

    async def stop_async(self, grace: float = 2.0) -> None:
        """Like :meth:`stop` for a transport started with :meth:`serve`."""
        if not self._running or self._done is None:
            return
        self._grace = grace
        self._request_stop()
        await self._done.wait()

    def _request_stop(self) -> None:
        if self._stop_event is not None:
            self._stop_event.set()

    async def _shutdown(self, grace: float) -> None:
        server = self._server
        if server is not None:
            server.close()  # no new accepts
        with self.lock:
            self.core.shutdown()
            self._flush_locked()
            for c in list(self._all):  # nothing to say to sockets still in the upgrade
                if c.transport is not None and (c.conn is None or c.conn.state is _HANDSHAKE):
                    c.transport.abort()
        deadline = monotonic() + grace
        while self._all and monotonic() < deadline:
            await asyncio.sleep(0.02)
        for c in list(self._all):
            if c.transport is not None:
                c.transport.abort()
        for _ in range(3):  # let connection_lost callbacks run
            if not self._all:
                break
            await asyncio.sleep(0)
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        with self.lock:
            self.core.set_wakeup(None)
            self.core.defer_inbound_notice = False
            for c in list(self._all):
                self._forget(c)
        self._server = None

    # ------------------------------------------------------------------ cross-thread

    def submit(self, fn: Callable[[], Any]) -> None:
        loop = self._loop
        if loop is None:
            raise RuntimeError("Not running")
        if threading.get_ident() == self._loop_thread_id:
            loop.call_soon(fn)
        else:
            loop.call_soon_threadsafe(fn)

    def wake(self) -> None:
        # Lock held (called by the core). One pending flush covers every later wake.
        if self._flush_scheduled:
            return
        loop = self._loop
        if loop is None:
            return
        self._flush_scheduled = True
        try:
            if threading.get_ident() == self._loop_thread_id:
                loop.call_soon(self._flush_cb)
            else:
                loop.call_soon_threadsafe(self._flush_cb)
        except RuntimeError:  # loop closed while stopping
            self._flush_scheduled = False

    def inbound_consumed(self) -> None:
        # Lock held (called by the facade after popping events).
        if self._reading_paused and self.core.inbound_resumable():
            self._reading_paused = False
            with contextlib.suppress(RuntimeError):
                self.submit(self._resume_all)

    # ------------------------------------------------------------------ socket events

    def _made(self, c: _Conn, transport: asyncio.Transport) -> None:
        c.transport = transport
        self._all.add(c)
        pending = self._pending
        now = monotonic()
        if (
            len(pending) >= self.max_pending_handshakes
            and now - next(iter(pending.values())) >= self.pending_grace
        ):
            transport.abort()  # §1.2: dropped before any HTTP
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        with self.lock:
            conn = self.core.open_connection(now)
            if conn is None:  # draining or at max_connections: no HTTP answer
                transport.abort()
                return
            c.conn = conn
            self._conns[id(conn)] = c
            pending[c] = now
            self._arm(c)
            if self._reading_paused:
                transport.pause_reading()
                return
        if sock is not None:
            self._early_read(c, sock)

    def _early_read(self, c: _Conn, sock: Any) -> None:
        """Read the upgrade request now if it is already here (it usually is: clients
        send it right after ``connect``), instead of one loop iteration later when the
        transport's own reader would see it. Any error or EOF is left to the transport,
        whose next read meets it again; with nothing to read this costs one syscall.
        """
        if _readv is None:
            return
        view = self._read_view
        try:
            n = _readv(sock.fileno(), (view,))
        except OSError:
            return
        if n:
            self._data(c, view[:n])

    def _data(self, c: _Conn, data: memoryview) -> None:
        conn = c.conn
        if conn is None or c.lost:
            return
        with self.lock:
            core = self.core
            core.feed(conn, data, monotonic())
            if self._pending and conn.state is not _HANDSHAKE:
                self._pending.pop(c, None)
            self._after_input(c)
            core.announce_inbound()  # after the writes: waking the app must not delay them

    def _eof(self, c: _Conn) -> None:
        conn = c.conn
        if conn is None or c.lost:
            return
        with self.lock:
            self.core.eof(conn, monotonic())
            self._after_input(c)
            self.core.announce_inbound()

    def _lost(self, c: _Conn) -> None:
        c.lost = True
        self._all.discard(c)
        conn = c.conn
        if conn is None:
            return
        with self.lock:
            self.core.connection_lost(conn, monotonic())
            self._forget(c)
            self._flush_locked()
            self.core.announce_inbound()

    def _after_input(self, c: _Conn) -> None:
        # Lock held. The core already told the facade about new inbound events.
        self._flush_locked()
        self._settle(c)
        if not self._reading_paused and self.core.inbound_full():
            self._pause_all()

    def _backlog_changed(self, c: _Conn) -> None:
        conn, transport = c.conn, c.transport
        if conn is None or transport is None or c.lost:
            return
        with self.lock:
            conn.transport_backlog = transport.get_write_buffer_size()

    def _forget(self, c: _Conn) -> None:
        # Lock held.
        if c.timer is not None:
            c.timer.cancel()
            c.timer = None
        c.timer_at = math.inf
        self._pending.pop(c, None)
        if c.conn is not None:
            self._conns.pop(id(c.conn), None)

    # ------------------------------------------------------------------ flushing

    def _flush_from_loop(self) -> None:
        with self.lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        self._flush_scheduled = False
        conns = self._conns
        for conn in self.core.take_dirty():
            c = conns.get(id(conn))
            if c is None:
                conn.data_to_send()  # socket already gone: discard
                continue
            self._flush_one(c, conn)

    def _flush_one(self, c: _Conn, conn: ServerConnection) -> None:
        transport = c.transport
        data = self.core.data_to_send(conn)
        if transport is None or c.lost:
            return
        if data and not c.closing:
            transport.write(data)
        conn.transport_backlog = transport.get_write_buffer_size()
        self._settle(c)

    def _settle(self, c: _Conn) -> None:
        """Close the socket if the machine is done with it, else re-arm its timer."""
        # Lock held.
        conn = c.conn
        if c.closing or c.lost or conn is None:
            return
        if conn.wants_close:
            transport = c.transport
            assert transport is not None and self._loop is not None
            if conn.pending_bytes:
                transport.write(self.core.data_to_send(conn))
            c.closing = True
            transport.close()  # flushes what is buffered, then closes
            if c.timer is not None:
                c.timer.cancel()
            c.timer = self._loop.call_later(CLOSE_FLUSH_TIMEOUT, transport.abort)
            c.timer_at = -math.inf  # never re-armed
        else:
            self._arm(c)

    # ------------------------------------------------------------------ timers

    def _arm(self, c: _Conn) -> None:
        # Lock held. Re-arm only when the machine's deadline moved earlier.
        conn = c.conn
        if conn is None:
            return
        deadline = conn.next_deadline()
        if deadline is None or deadline >= c.timer_at:
            return
        if c.timer is not None:
            c.timer.cancel()
        c.timer_at = deadline
        assert self._loop is not None
        c.timer = self._loop.call_later(max(0.0, deadline - monotonic()), self._fire, c)

    def _fire(self, c: _Conn) -> None:
        c.timer = None
        c.timer_at = math.inf
        conn = c.conn
        if conn is None or c.lost or c.closing:
            return
        with self.lock:
            self.core.timer(conn, monotonic())
            transport = c.transport
            if transport is not None:
                conn.transport_backlog = transport.get_write_buffer_size()
            self._flush_locked()
            self._settle(c)
            self.core.announce_inbound()

    # ------------------------------------------------------------------ backpressure

    def _pause_all(self) -> None:
        # Lock held, loop thread.
        self._reading_paused = True
        for c in self._all:
            if c.transport is not None and not c.lost:
                with contextlib.suppress(Exception):
                    c.transport.pause_reading()

    def _resume_all(self) -> None:
        with self.lock:
            if self._reading_paused:
                return  # paused again before this ran
            for c in self._all:
                if c.transport is not None and not c.lost and not c.closing:
                    with contextlib.suppress(Exception):
                        c.transport.resume_reading()

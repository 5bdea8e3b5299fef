"""The blocking pump, written once: the threading and gevent transports differ only in
the :class:`Runtime` they plug in (readiness, spawn, lock and event factories).

Theory of operation
-------------------
One I/O side (a thread; a greenlet in a gevent-patched process) runs a reactor over
non-blocking sockets:

1. wait for readiness (:meth:`Poller.poll`) with a timeout taken from a heap of
   per-connection deadlines (the machine's ``next_deadline()``, re-armed lazily as in the
   asyncio transport: only when it moved earlier);
2. take the core lock **once** for the whole batch: accept, read every ready socket into
   ``core.feed`` (or ``core.eof``), write backlogged sockets that became writable, run the
   due timers, then flush every connection the core marked dirty and settle the touched
   ones (close the socket when the machine ``wants_close``, else re-arm its deadline);
3. run the callables handed to :meth:`BlockingTransport.submit`.

Only the I/O side writes to sockets, so a connection's frames leave in order. A write goes
straight to the kernel; what the kernel does not take waits in a per-connection buffer whose
size is reported as ``conn.transport_backlog`` (the core bounds the sum, spec §6.4).

Application threads never touch sockets: their core calls end in :meth:`wake`, which sets
one flag and interrupts the poll once, so every send made before the I/O side gets the
lock leaves as one write per connection (write coalescing).

Inbound flow control (decision F6): while ``core.inbound_full()`` no socket is polled for
reading (TCP backpressure) until the application popped enough events.

Nothing here decides anything about the protocol: bytes go to the core, bytes come out.
"""

from __future__ import annotations

import _socket  # see _Sock
import contextlib
import errno
import heapq
import itertools
import logging
import math
import socket
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Protocol

from wse_proto._defaults import monotonic
from wse_proto.server import ConnectionState, ServerConnection

from .base import Transport

if TYPE_CHECKING:
    from wse_proto.hub import ServerCore

__all__ = [
    "READ",
    "WRITE",
    "BlockingTransport",
    "HandshakeGate",
    "IOHandler",
    "Poller",
    "Runtime",
    "Task",
]

log = logging.getLogger("wse_transports.blocking")

READ: Final = 1
"""Readiness bits (the same values as ``selectors.EVENT_READ`` / ``EVENT_WRITE``)."""
WRITE: Final = 2

MAX_PENDING_HANDSHAKES: Final = 512
"""Accepted sockets still in the upgrade; beyond this new sockets are dropped (§1.2)."""

PENDING_GRACE: Final = 1.0
"""The cap applies once the oldest pending upgrade has waited this long (see
:class:`HandshakeGate`)."""

SEND_BUFFER_BYTES: Final = 256 * 1024
"""SO_SNDBUF like the original's listener (§1.1)."""

CLOSE_FLUSH_TIMEOUT: Final = 5.0
"""A closing socket whose peer never reads is dropped after this many seconds."""

RECV_SIZE: Final = 32 * 1024
"""Bytes per read, into one buffer the I/O side reuses for every socket (the machine copies
what it keeps). As in the asyncio transport: a batch of messages decoded from one read
still fits in the CPU caches when the application takes it; it also bounds what one read
may add to the inbound queue beyond its limit."""

ACCEPT_BATCH: Final = 128
"""Accepts per readiness report of a listener, so a connect storm cannot starve reads."""

ACCEPT_RETRY: Final = 1.0
"""Seconds accepting pauses after the process ran out of file descriptors."""

START_TIMEOUT: Final = 10.0

_HANDSHAKE: Final = ConnectionState.HANDSHAKE
_RETRY: Final = (BlockingIOError, InterruptedError)
_OUT_OF_FDS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


# ====================================================================== primitives


class Poller(ABC):
    """Level-triggered socket readiness for one I/O side; tokens come back on readiness.

    Every method but :meth:`wakeup` is called on the I/O side only.
    """

    @abstractmethod
    def register(self, fd: int, token: Any, events: int) -> None:
        """Start reporting ``events`` (READ|WRITE, not 0) of ``fd`` with ``token``."""

    @abstractmethod
    def modify(self, fd: int, token: Any, events: int) -> None:
        """Change what a registered ``fd`` reports (``events`` not 0)."""

    @abstractmethod
    def unregister(self, fd: int) -> None:
        """Stop reporting ``fd`` (before it is closed)."""

    @abstractmethod
    def poll(self, timeout: float | None) -> list[tuple[Any, int]]:
        """Wait up to ``timeout`` seconds (None: until something happens) for readiness
        or :meth:`wakeup`; return ``(token, events)`` pairs (empty after a wakeup)."""

    @abstractmethod
    def wakeup(self) -> None:
        """Make the current or next :meth:`poll` return (callable from any thread)."""

    @abstractmethod
    def close(self) -> None:
        """Release the poller (I/O side, after everything was unregistered)."""


class Task(Protocol):
    """What :meth:`Runtime.spawn` returns: something to join."""

    def join(self, timeout: float | None = None) -> Any: ...


class Runtime(ABC):
    """The primitives a blocking transport needs from its concurrency library."""

    name: str = ""

    @abstractmethod
    def new_poller(self) -> Poller:
        """A poller for the I/O side; called on the I/O side once it runs."""

    @abstractmethod
    def spawn(self, fn: Callable[[], None], name: str) -> Task:
        """Run ``fn`` concurrently with the caller (the I/O side, or a helper)."""

    def new_lock(self) -> threading.Lock:
        """A lock shared with application threads (gevent's when the process is patched)."""
        return threading.Lock()

    def new_event(self) -> threading.Event:
        """An event set on one side and waited for on the other."""
        return threading.Event()


class IOHandler(Protocol):
    """A socket served by the pump besides client connections.

    Extension point for cluster links (a later issue): a cluster listener or dialer
    registers its sockets with :meth:`BlockingTransport.watch` (from the I/O side, e.g.
    through :meth:`BlockingTransport.submit`) and gets :meth:`on_io` calls with the core
    lock held, in the same batch as the client sockets; a ``PeerLink`` machine is then fed,
    flushed and timed exactly like a ``ServerConnection`` here.
    """

    def on_io(self, events: int, now: float) -> None: ...


class HandshakeGate:
    """The pending-upgrade cap (§1.2): refuse new sockets while too many stall.

    One event loop accepts a whole burst of sockets before it reads any of them, so a burst
    of 1,000 honest clients would look like 1,000 stalled upgrades. New sockets are refused
    only while ``limit`` upgrades are pending *and* the oldest has waited ``grace`` seconds:
    stalled sockets age (slowloris protection), a reconnect storm passes;
    ``max_connections`` still bounds the total. Not thread-safe (core lock held).
    """

    __slots__ = ("_pending", "grace", "limit")

    def __init__(self, limit: int = MAX_PENDING_HANDSHAKES, grace: float = PENDING_GRACE) -> None:
        self.limit = limit
        self.grace = grace
        self._pending: dict[object, float] = {}  # insertion order = age order

    def __len__(self) -> int:
        return len(self._pending)

    def admit(self, now: float) -> bool:
        """May a new socket be accepted at ``now``?"""
        pending = self._pending
        return len(pending) < self.limit or now - next(iter(pending.values())) < self.grace

    def started(self, key: object, now: float) -> None:
        self._pending[key] = now

    def done(self, key: object) -> None:
        """The upgrade finished, failed, or the socket went away."""
        self._pending.pop(key, None)


# ====================================================================== the pump


class _Sock:
    """One client socket. Holds no protocol state: the machine is ``conn``.

    Sockets are the C type ``_socket.socket``: no Python wrapper layer on the hot path,
    and gevent's monkey-patching never replaces it, so the pump behaves the same in a
    patched process.
    """

    __slots__ = ("closing", "conn", "dead", "eof", "events", "fd", "out", "sock", "timer_at")

    def __init__(self, sock: _socket.socket, conn: ServerConnection) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.conn = conn
        self.out: bytearray | None = None  # what the kernel did not take yet
        self.events = 0  # what the poller reports for this socket
        self.timer_at = math.inf  # deadline of the live heap entry
        self.closing = False  # flushing the last bytes before closing
        self.eof = False
        self.dead = False


class _Listener:
    __slots__ = ("fd", "sock")

    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()


class BlockingTransport(Transport):
    """Serve a ``ServerCore`` from one I/O thread or greenlet over non-blocking sockets.

    Subclasses set :attr:`runtime`. Options: ``max_pending_handshakes`` and
    ``pending_grace`` (:class:`HandshakeGate`), ``backlog`` (listen queue).
    """

    runtime: Runtime

    def __init__(
        self,
        core: ServerCore,
        lock: threading.Lock,
        *,
        host: str,
        port: int,
        max_pending_handshakes: int = MAX_PENDING_HANDSHAKES,
        pending_grace: float = PENDING_GRACE,
        backlog: int = 1024,
    ) -> None:
        super().__init__(core, lock, host=host, port=port)
        self.backlog = backlog
        self._gate = HandshakeGate(max_pending_handshakes, pending_grace)
        self._listeners: list[_Listener] = []
        self._socks: set[_Sock] = set()
        self._by_id: dict[str, _Sock] = {}  # conn_id -> socket
        self._handlers: dict[int, IOHandler] = {}  # fd -> extra handler (watch())
        self._timers: list[tuple[float, int, _Sock]] = []
        self._seq = itertools.count()
        self._touched: list[_Sock] = []  # sockets to settle at the end of a batch
        self._calls: deque[Callable[[], Any]] = deque()
        self._poller: Poller | None = None
        self._task: Task | None = None
        self._ready: threading.Event | None = None
        self._start_error: BaseException | None = None
        self._io_ident: int | None = None
        self._running = False
        self._bound_port = 0
        self._grace = 2.0
        self._stop_requested = False
        self._flush_requested = False
        self._paused = False  # inbound queue full: nobody is polled for reading
        self._resume_pending = False
        self._accept_retry_at = math.inf
        self._read_buf = bytearray(RECV_SIZE)
        self._read_view = memoryview(self._read_buf)

    # ------------------------------------------------------------------ lifecycle

    @property
    def running(self) -> bool:
        return self._running

    @property
    def bound_port(self) -> int:
        return self._bound_port

    def start(self) -> None:
        """Bind in the caller's thread (errors raise here), then start the I/O side."""
        if self._running or self._task is not None:
            raise RuntimeError("transport already running")
        self._listeners = self._bind()
        self._stop_requested = self._flush_requested = False
        self._paused = self._resume_pending = False
        self._accept_retry_at = math.inf
        self._start_error = None
        ready = self._ready = self.runtime.new_event()
        self._task = self.runtime.spawn(self._main, f"wse-{self.name}")
        if not ready.wait(START_TIMEOUT):
            raise RuntimeError(f"the {self.name} I/O loop did not start in time")
        if self._start_error is not None:
            self._task.join(START_TIMEOUT)
            self._task = None
            raise self._start_error

    def _bind(self) -> list[_Listener]:
        infos = socket.getaddrinfo(
            self.host or None, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        listeners: list[_Listener] = []
        port = self.port
        seen: set[tuple[Any, ...]] = set()
        try:
            for family, type_, proto, _, addr in infos:
                if (family, addr) in seen:
                    continue
                seen.add((family, addr))
                sock = _socket.socket(family, type_, proto)
                listeners.append(_Listener(sock))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if port == 0 and len(listeners) > 1:  # one ephemeral port for every address
                    addr = (addr[0], self._bound_port, *addr[2:])
                sock.bind(addr)
                sock.listen(self.backlog)
                sock.setblocking(False)
                if len(listeners) == 1:
                    self._bound_port = sock.getsockname()[1]
        except BaseException:
            for listener in listeners:
                listener.sock.close()
            raise
        if not listeners:
            raise OSError(f"no address to listen on for {self.host!r}")
        return listeners

    def stop(self, grace: float = 2.0) -> None:
        """Send close 1001 to every client, wait up to ``grace`` s for them, then stop."""
        task, poller = self._task, self._poller
        if task is None:
            return
        if threading.get_ident() == self._io_ident:
            raise RuntimeError("stop() called from the I/O side; call it from another thread")
        self._grace = grace
        self._stop_requested = True
        if poller is not None:
            poller.wakeup()
        task.join(grace + 5.0)
        self._task = None

    def _main(self) -> None:
        """The I/O side: set up, loop, always clean up."""
        ready = self._ready
        assert ready is not None
        self._io_ident = threading.get_ident()
        try:
            poller = self.runtime.new_poller()
            for listener in self._listeners:
                poller.register(listener.fd, listener, READ)
        except BaseException as exc:
            self._start_error = exc
            self._close_listeners(None)
            ready.set()
            return
        self._poller = poller
        with self.lock:
            self.core.set_wakeup(self.wake)
        self._running = True
        ready.set()
        try:
            self._loop(poller)
        except BaseException:
            log.exception("the %s I/O loop crashed", self.name)
        finally:
            self._close_listeners(poller)
            with self.lock:
                now = monotonic()
                for s in list(self._socks):
                    self._close(s, now)
                self.core.set_wakeup(None)
                self._timers.clear()
                self._touched.clear()
            for fd in list(self._handlers):
                self.unwatch(fd)
            self._running = False
            self._poller = None
            self._io_ident = None
            poller.close()

    def _close_listeners(self, poller: Poller | None) -> None:
        for listener in self._listeners:
            if poller is not None:
                with contextlib.suppress(Exception):
                    poller.unregister(listener.fd)
            listener.sock.close()
        self._listeners = []

    # ------------------------------------------------------------------ the loop

    def _loop(self, poller: Poller) -> None:
        lock = self.lock
        timers = self._timers
        touched = self._touched
        calls = self._calls
        on_readable = self._on_readable
        stop_at = math.inf
        while True:
            if self._stop_requested and stop_at == math.inf:
                stop_at = self._begin_shutdown(poller)
            if stop_at != math.inf and (not self._socks or monotonic() >= stop_at):
                return
            if self._flush_requested or self._resume_pending or calls:
                timeout: float | None = 0.0
            else:
                wake_at = min(timers[0][0] if timers else math.inf, stop_at, self._accept_retry_at)
                timeout = None if wake_at == math.inf else max(0.0, wake_at - monotonic())
            ready = poller.poll(timeout)
            with lock:
                now = monotonic()
                for token, events in ready:
                    cls = type(token)
                    try:
                        if cls is _Sock:
                            if events & WRITE:
                                self._on_writable(token, now)
                            if events & READ:
                                on_readable(token, now)
                        elif cls is _Listener:
                            self._on_acceptable(token, now)
                        else:
                            token.on_io(events, now)
                    except Exception:
                        log.exception("%s: error serving a socket", self.name)
                        if cls is _Sock:
                            self._close(token, now)
                if timers and timers[0][0] <= now:
                    self._run_timers(now)
                if now >= self._accept_retry_at:
                    self._accept_retry_at = math.inf
                    for listener in self._listeners:
                        poller.register(listener.fd, listener, READ)
                if self._resume_pending:
                    self._resume_pending = False
                    if not self._paused:
                        self._resume_all()
                self._flush_locked(now)
                if touched:
                    settle = self._settle
                    for s in touched:
                        settle(s, now)
                    touched.clear()
            while calls:
                fn = calls.popleft()
                try:
                    fn()
                except Exception:
                    log.exception("%s: submitted callable failed", self.name)

    def _begin_shutdown(self, poller: Poller) -> float:
        """Stop accepting, close every client with 1001; returns the grace deadline."""
        self._close_listeners(poller)
        self._accept_retry_at = math.inf
        with self.lock:
            now = monotonic()
            self.core.shutdown()
            self._flush_locked(now)
            for s in list(self._socks):
                if s.conn.state is _HANDSHAKE:  # nothing to say to sockets in the upgrade
                    self._close(s, now)
        return monotonic() + self._grace

    # ------------------------------------------------------------------ cross-thread

    def submit(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on the I/O side after the current batch (without the core lock)."""
        poller = self._poller
        if poller is None or not self._running:
            raise RuntimeError("Not running")
        self._calls.append(fn)
        if threading.get_ident() != self._io_ident:
            poller.wakeup()

    def wake(self) -> None:
        # Lock held (called by the core). One flag covers every later wake until the flush.
        if self._flush_requested:
            return
        self._flush_requested = True
        if threading.get_ident() != self._io_ident:
            poller = self._poller
            if poller is not None:
                poller.wakeup()

    def inbound_consumed(self) -> None:
        # Lock held (called by the facade after popping events).
        if self._paused and self.core.inbound_resumable():
            self._paused = False
            self._resume_pending = True
            poller = self._poller
            if poller is not None and threading.get_ident() != self._io_ident:
                poller.wakeup()

    def watch(self, fd: int, handler: IOHandler, events: int) -> None:
        """Serve another socket from the I/O side (I/O side only; see :class:`IOHandler`).

        ``events`` 0 stops reporting without forgetting the handler.
        """
        poller = self._poller
        if poller is None or threading.get_ident() != self._io_ident:
            raise RuntimeError("watch() must be called on the I/O side (use submit())")
        known = fd in self._handlers
        self._handlers[fd] = handler
        if known:
            poller.unregister(fd)
        if events:
            poller.register(fd, handler, events)

    def unwatch(self, fd: int) -> None:
        """Forget a :meth:`watch`-ed socket (I/O side only; before closing it)."""
        if self._handlers.pop(fd, None) is not None and self._poller is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._poller.unregister(fd)

    # ------------------------------------------------------------------ sockets

    def _set_events(self, s: _Sock, events: int) -> None:
        old = s.events
        if events == old:
            return
        poller = self._poller
        assert poller is not None
        if not old:
            poller.register(s.fd, s, events)
        elif not events:
            poller.unregister(s.fd)
        else:
            poller.modify(s.fd, s, events)
        s.events = events

    def _on_acceptable(self, listener: _Listener, now: float) -> None:
        if self._accept_retry_at != math.inf:
            return  # out of descriptors earlier in this batch
        lsock = listener.sock
        for _ in range(ACCEPT_BATCH):
            try:
                fd, _addr = lsock._accept()  # type: ignore[attr-defined]  # C method, no stub
            except _RETRY:
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_FDS:
                    log.warning("%s: accept failed (%s); pausing for %.0f s", self.name, exc,
                                ACCEPT_RETRY)  # fmt: skip
                    poller = self._poller
                    assert poller is not None
                    for other in self._listeners:
                        poller.unregister(other.fd)
                    self._accept_retry_at = now + ACCEPT_RETRY
                return  # ECONNABORTED and friends: the peer already left
            self._admit(_socket.socket(lsock.family, lsock.type, lsock.proto, fd), now)

    def _admit(self, sock: _socket.socket, now: float) -> None:
        # Lock held.
        gate = self._gate
        if not gate.admit(now):
            sock.close()  # §1.2: dropped before any HTTP
            return
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        conn = self.core.open_connection(now)
        if conn is None:  # draining or at max_connections: no HTTP answer
            sock.close()
            return
        s = _Sock(sock, conn)
        self._socks.add(s)
        self._by_id[conn.conn_id] = s
        gate.started(s, now)
        if not self._paused:
            self._set_events(s, READ)
        self._arm(s)

    def _on_readable(self, s: _Sock, now: float) -> None:
        # Lock held.
        if self._paused or s.closing or s.eof or s.dead:
            return  # paused earlier in this batch, or closed by an earlier event
        try:
            n = s.sock.recv_into(self._read_buf)
        except _RETRY:
            return
        except OSError:
            self._close(s, now)
            return
        conn = s.conn
        core = self.core
        if n:
            core.feed(conn, self._read_view[:n], now)
            if self._gate and conn.state is not _HANDSHAKE:
                self._gate.done(s)
        else:
            s.eof = True
            self._set_events(s, s.events & WRITE)
            core.eof(conn, now)
        self._touched.append(s)
        if core.inbound_full():
            self._pause_all()

    def _on_writable(self, s: _Sock, now: float) -> None:
        # Lock held.
        out = s.out
        if out is None or s.dead:
            if not s.dead:
                self._set_events(s, s.events & READ)
            return
        try:
            n = s.sock.send(out)
        except _RETRY:
            return
        except OSError:
            self._close(s, now)
            return
        if n < len(out):
            del out[:n]
            s.conn.transport_backlog = len(out)
            return
        s.out = None
        s.conn.transport_backlog = 0
        if s.closing:
            self._close(s, now)
        else:
            self._set_events(s, s.events & READ)
            self._touched.append(s)  # the core may have refused sends while backlogged

    def _send(self, s: _Sock, data: bytes) -> None:
        """Write now what the kernel takes; buffer the rest (lock held)."""
        out = s.out
        if out is not None:
            out += data
        else:
            try:
                n = s.sock.send(data)
            except _RETRY:
                n = 0
            except OSError:
                self._close(s, monotonic())
                return
            if n == len(data):
                return
            s.out = out = bytearray(memoryview(data)[n:])
            self._set_events(s, s.events | WRITE)
        s.conn.transport_backlog = len(out)

    def _close(self, s: _Sock, now: float) -> None:
        """Drop the socket and tell the core (lock held)."""
        if s.dead:
            return
        s.dead = True
        if s.events:
            poller = self._poller
            if poller is not None:
                with contextlib.suppress(KeyError, ValueError, OSError):
                    poller.unregister(s.fd)
            s.events = 0
        with contextlib.suppress(OSError):
            s.sock.close()
        s.out = None
        s.timer_at = math.inf
        self._socks.discard(s)
        self._gate.done(s)
        conn = s.conn
        self._by_id.pop(conn.conn_id, None)
        self.core.connection_lost(conn, now)

    # ------------------------------------------------------------------ flushing

    def _flush_locked(self, now: float) -> None:
        self._flush_requested = False
        core = self.core
        by_id = self._by_id
        for conn in core.take_dirty():
            s = by_id.get(conn.conn_id)
            if s is None:
                conn.data_to_send()  # socket already gone: discard
                continue
            data = core.data_to_send(conn)
            if data and not s.closing:
                self._send(s, data)
            self._settle(s, now)

    def _settle(self, s: _Sock, now: float) -> None:
        """Close the socket once the machine is done with it, else re-arm its deadline."""
        # Lock held.
        if s.closing or s.dead:
            return
        conn = s.conn
        if not (conn.wants_close or s.eof):
            self._arm(s)
            return
        if conn.pending_bytes:
            self._send(s, self.core.data_to_send(conn))
            if s.dead:
                return
        s.closing = True
        if s.out is None:
            self._close(s, now)
            return
        self._set_events(s, WRITE)  # flush what is buffered, then close
        s.timer_at = deadline = now + CLOSE_FLUSH_TIMEOUT
        heapq.heappush(self._timers, (deadline, next(self._seq), s))

    # ------------------------------------------------------------------ timers

    def _arm(self, s: _Sock) -> None:
        # Lock held. Re-arm only when the machine's deadline moved earlier; a timer that
        # fires early finds nothing due and re-arms.
        deadline = s.conn.next_deadline()
        if deadline is None or deadline >= s.timer_at:
            return
        s.timer_at = deadline
        heapq.heappush(self._timers, (deadline, next(self._seq), s))

    def _run_timers(self, now: float) -> None:
        timers = self._timers
        touched = self._touched
        core = self.core
        while timers and timers[0][0] <= now:
            at, _, s = heapq.heappop(timers)
            if s.dead or at != s.timer_at:
                continue  # superseded by an earlier deadline, or gone
            s.timer_at = math.inf
            if s.closing:
                self._close(s, now)  # the peer never read the last bytes
                continue
            core.timer(s.conn, now)
            touched.append(s)

    # ------------------------------------------------------------------ backpressure

    def _pause_all(self) -> None:
        # Lock held, I/O side.
        self._paused = True
        set_events = self._set_events
        for s in self._socks:
            if s.events & READ:
                set_events(s, s.events & WRITE)

    def _resume_all(self) -> None:
        # Lock held, I/O side.
        set_events = self._set_events
        for s in self._socks:
            if not (s.closing or s.eof or s.dead):
                set_events(s, READ | (WRITE if s.out is not None else 0))

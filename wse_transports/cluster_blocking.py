"""Cluster links on the blocking pump (threading and gevent transports).

The same job as :mod:`wse_transports.cluster_aio`, on the I/O side of a
:class:`~wse_transports._blocking.BlockingTransport` instead of an event loop: every
cluster socket is non-blocking and registered with ``watch()``, so its ``on_io`` runs in
the pump's batch with the core lock held (CLUSTER §8.11: node and core change together).

- ``Dial`` -> non-blocking connect (5 s, name resolution included; host names are
  resolved on a helper so the I/O side never blocks), socket options of §8.1, optional
  TLS through ``ssl.SSLObject`` over memory BIOs (5 s), then ``connection_made`` or
  ``connection_failed``.
- the listener: at most ``max_inbound`` (128) inbound sockets, counted from the accept
  (TLS handshakes included); TLS per socket, so :meth:`reload_tls` applies to later
  handshakes only.
- ``Send`` -> queued per link, written once per pump as one buffer; what the kernel
  refuses waits in a per-link buffer. Above ``max_link_backlog`` the link reports a full
  queue to its ``PeerLink`` (publications dropped and counted, §8.7).
- ``CloseLink`` -> those bytes, then close (dropped after 5 s if the peer does not read).
- timers: one helper (thread or greenlet) sleeps until the earliest of
  ``node.next_deadline()`` and the per-socket deadlines, then ``submit()``s a tick.

Callbacks run on the I/O side with the lock held, as in the asyncio transport.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import math
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

from wse_proto._defaults import monotonic
from wse_proto.cluster.mesh import ClusterNode

from ._blocking import READ, WRITE, BlockingTransport
from ._cluster_common import (
    CLOSE_FLUSH_TIMEOUT,
    CONNECT_TIMEOUT,
    MAX_LINK_BACKLOG,
    TLS_HANDSHAKE_TIMEOUT,
    DeliverCallback,
    LinkChangeCallback,
    PresenceCallback,
    _ClusterTransportBase,
    _format_peer,
    _tune,
    split_address,
)
from .cluster_tls import ClusterTLS

__all__ = ["BlockingClusterTransport"]

log = logging.getLogger("wse_transports.cluster")

RECV_SIZE = 64 * 1024
ACCEPT_BATCH = 32
_RETRY = (BlockingIOError, InterruptedError)
_SSL_RETRY = (ssl.SSLWantReadError, ssl.SSLWantWriteError)


class _Link:
    """One cluster socket (dialed or accepted); no protocol state, only bytes."""

    __slots__ = (
        "closing",
        "connecting",
        "counted",
        "dead",
        "deadline",
        "dial_host",
        "dial_rest",
        "early",
        "early_eof",
        "events",
        "fd",
        "handshaking",
        "inbio",
        "inbound",
        "link_id",
        "out",
        "outbio",
        "outq",
        "owner",
        "paused",
        "remote",
        "sock",
        "tls",
    )

    def __init__(
        self, owner: BlockingClusterTransport, sock: socket.socket, *, inbound: bool
    ) -> None:
        self.owner = owner
        self.sock = sock
        self.fd = sock.fileno()
        self.inbound = inbound
        self.link_id: int | None = None
        self.remote = ""
        self.dial_host = ""  # dial: the host part, the name TLS checks
        self.dial_rest: list[Any] = []  # dial: resolved addresses not tried yet
        self.connecting = False
        self.handshaking = False
        self.tls: ssl.SSLObject | None = None
        self.inbio: ssl.MemoryBIO | None = None
        self.outbio: ssl.MemoryBIO | None = None
        self.out: bytearray | None = None  # raw bytes the kernel did not take yet
        self.outq: list[bytes] = []
        self.early: list[bytes] = []
        self.early_eof = False
        self.events = 0
        self.deadline = math.inf
        self.closing = False
        self.dead = False
        self.counted = False
        self.paused = False

    def on_io(self, events: int, now: float) -> None:
        self.owner._on_io(self, events, now)


class _Listener:
    __slots__ = ("owner", "sock")

    def __init__(self, owner: BlockingClusterTransport, sock: socket.socket) -> None:
        self.owner = owner
        self.sock = sock

    def on_io(self, events: int, now: float) -> None:
        self.owner._on_accept(now)


class BlockingClusterTransport(_ClusterTransportBase[_Link]):
    """Run a ``ClusterNode``'s links on a running :class:`BlockingTransport`'s I/O side.

    ``lock`` is the core lock (the pump's). ``listen_port=None`` and no ``sock``: dial
    only. :meth:`start` and :meth:`stop` block and must not run on the I/O side;
    :meth:`wake` and :meth:`reload_tls` may be called from anywhere.
    """

    def __init__(
        self,
        node: ClusterNode,
        lock: threading.Lock,
        host: BlockingTransport,
        *,
        listen_host: str = "0.0.0.0",
        listen_port: int | None = None,
        tls: ClusterTLS | None = None,
        on_deliver: DeliverCallback | None = None,
        on_presence: PresenceCallback | None = None,
        on_link_change: LinkChangeCallback | None = None,
        sock: socket.socket | None = None,
        backlog: int = 128,
        connect_timeout: float = CONNECT_TIMEOUT,
        tls_handshake_timeout: float = TLS_HANDSHAKE_TIMEOUT,
        max_link_backlog: int = MAX_LINK_BACKLOG,
    ) -> None:
        super().__init__(
            node,
            lock,
            listen_host=listen_host,
            listen_port=listen_port,
            tls=tls,
            on_deliver=on_deliver,
            on_presence=on_presence,
            on_link_change=on_link_change,
            sock=sock,
            backlog=backlog,
            connect_timeout=connect_timeout,
            tls_handshake_timeout=tls_handshake_timeout,
            max_link_backlog=max_link_backlog,
        )
        self.host = host
        self._listener: _Listener | None = None
        self._dialing: dict[int, _Link | None] = {}  # None while a name is resolved
        self._socks: set[_Link] = set()
        self._timer_event = host.runtime.new_event()
        self._timer_task: Any = None

    # ------------------------------------------------------------------ lifecycle

    def _not_io_side(self, what: str) -> None:
        if threading.get_ident() == self.host._io_ident:
            raise RuntimeError(f"{what} would block the I/O side; call it from another thread")

    def start(self) -> None:
        """Bind (errors raise here), register with the pump and start dialing."""
        if self._running or self._stopping:
            raise RuntimeError("cluster transport already started")
        self._not_io_side("start()")
        lsock = self._sock
        if lsock is None and self.listen_port is not None:
            lsock = socket.create_server(
                (self.listen_host, self.listen_port), backlog=self.backlog, reuse_port=False
            )
        if lsock is not None:
            lsock.setblocking(False)
            self._bound_port = lsock.getsockname()[1]
            self._listener = _Listener(self, lsock)
        done = self.host.runtime.new_event()
        errors: list[BaseException] = []

        def begin() -> None:
            try:
                if self._listener is not None:
                    self.host.watch(self._listener.sock.fileno(), self._listener, READ)
                with self.lock:
                    self._running = True
                    self.node.handle_timer(monotonic())
                    self._pump_locked()
            except BaseException as exc:
                errors.append(exc)
                self._close_listener()
            finally:
                done.set()

        try:
            self.host.submit(begin)
            if not done.wait(10.0):
                raise RuntimeError("the I/O side did not start the cluster links in time")
            if errors:
                raise errors[0]
        except BaseException:
            if self._listener is not None:
                self._listener.sock.close()
                self._listener = None
            raise
        self._timer_task = self.host.runtime.spawn(self._timer_main, "wse-cluster-timer")

    def stop(self, send_shutdown: bool = True, *, grace: float = 2.0) -> None:
        """SHUTDOWN to every peer (written within ``grace`` s) then close, or abort all."""
        if not self._running:
            return
        self._not_io_side("stop()")
        self._stopping = True
        done = self.host.runtime.new_event()

        def begin() -> None:
            try:
                with self.lock:
                    self._close_listener()
                    if send_shutdown and not self.node.stopped:
                        self.node.shutdown(monotonic())
                        self._pump_locked()
                    self._running = False
                    for link_id in list(self._dialing):
                        self._cancel_dial(link_id)
                    for lk in list(self._socks):
                        if not send_shutdown or lk.link_id is None or not lk.closing:
                            self._drop(lk)
            finally:
                done.set()

        if self._submit(begin):
            done.wait(5.0)
        deadline = monotonic() + grace
        pause = self.host.runtime.new_event()
        while self._socks and monotonic() < deadline and self.host.running:
            pause.wait(0.01)
        finished = self.host.runtime.new_event()

        def finish() -> None:
            try:
                with self.lock:
                    for lk in list(self._socks):
                        self._drop(lk)
            finally:
                finished.set()

        if self._submit(finish):
            finished.wait(5.0)
        self._running = False
        self._timer_event.set()
        task = self._timer_task
        if task is not None:
            task.join(2.0)
            self._timer_task = None

    # ------------------------------------------------------------------ cross-thread

    def _submit(self, fn: Callable[[], Any]) -> bool:
        try:
            self.host.submit(fn)
        except RuntimeError:  # the client transport stopped first
            return False
        return True

    def wake(self) -> None:
        """Schedule one pump of the node's intents (lock held, any thread)."""
        if self._pump_scheduled or not self._running:
            return
        self._pump_scheduled = True
        if not self._submit(self._pump_scheduled_now):
            self._pump_scheduled = False

    # ------------------------------------------------------------------ the pump

    def _queue_send(self, link_id: int, data: bytes) -> None:
        lk = self._links.get(link_id)
        if lk is not None and not lk.closing and not lk.dead:
            lk.outq.append(data)
            self._dirty[lk] = None

    def _write_out(self, lk: _Link) -> None:
        queue = lk.outq
        if not queue or lk.dead:
            lk.outq = []
            return
        lk.outq = []
        self._send(lk, queue[0] if len(queue) == 1 else b"".join(queue))

    def _close_link(self, link_id: int) -> None:
        if link_id in self._dialing:  # a dial the node gave up
            self._cancel_dial(link_id)
            return
        lk = self._links.get(link_id)
        if lk is None or lk.closing or lk.dead:
            return
        self._dirty.pop(lk, None)
        self._write_out(lk)  # the Sends queued before the close go first
        lk.closing = True
        if lk.out is None:
            self._drop(lk)
        else:
            lk.deadline = monotonic() + CLOSE_FLUSH_TIMEOUT

    # ------------------------------------------------------------------ timers

    def _arm(self) -> None:
        """Wake the timer helper when the earliest deadline moved earlier (lock held)."""
        at = self.node.next_deadline()
        target = math.inf if at is None else at
        for lk in self._socks:
            if lk.deadline < target:
                target = lk.deadline
        if target < self._timer_at:
            self._timer_at = target
            self._timer_event.set()

    def _timer_main(self) -> None:
        event = self._timer_event
        while self._running:
            event.clear()
            at = self._timer_at
            now = monotonic()
            if at <= now:
                self._timer_at = math.inf
                if not self._submit(self._tick):
                    return
                continue
            # A millisecond late rather than early: clocks may round.
            event.wait(None if at == math.inf else at - now + 0.001)

    def _tick(self) -> None:
        with self.lock:
            if not self._running:
                return
            now = monotonic()
            for lk in list(self._socks):
                if lk.deadline <= now:
                    lk.deadline = math.inf
                    if lk.closing:
                        self._drop(lk)  # the peer never read the last bytes
                    else:  # connect or TLS handshake took too long
                        self._fail(lk, TimeoutError("cluster connect/TLS timeout"))
            self.node.handle_timer(now)
            self._pump_locked()

    # ------------------------------------------------------------------ sockets

    def _set_events(self, lk: _Link, events: int) -> None:
        if lk.dead or events == lk.events:
            return
        lk.events = events
        self.host.watch(lk.fd, lk, events)

    def _drop(self, lk: _Link) -> None:
        """Close the socket; no node call (lock held, I/O side)."""
        if lk.dead:
            return
        lk.dead = True
        lk.closing = True
        lk.out = None
        lk.outq = []
        self._socks.discard(lk)
        self._dirty.pop(lk, None)
        self.host.unwatch(lk.fd)
        with contextlib.suppress(OSError):
            lk.sock.close()
        if lk.counted:
            lk.counted = False
            self._inbound -= 1
        if lk.link_id is not None and self._links.get(lk.link_id) is lk:
            del self._links[lk.link_id]

    def _lost(self, lk: _Link) -> None:
        """The socket failed or the peer went away: tell the node (lock held)."""
        known = lk.link_id is not None and not lk.closing and self._running
        self._drop(lk)
        if known:
            assert lk.link_id is not None
            self.node.connection_lost(lk.link_id, monotonic())
            self._pump_locked()

    def _fail(self, lk: _Link, exc: BaseException) -> None:
        """A dial or TLS accept that did not finish."""
        if isinstance(exc, ssl.SSLError):
            self.tls_failures += 1
        if lk.inbound:
            log.debug("cluster accept from %s failed: %r", lk.remote, exc)
            self._drop(lk)
            return
        log.debug("cluster dial %s failed: %r", lk.remote, exc)
        self._drop(lk)
        link_id = next((k for k, v in self._dialing.items() if v is lk), None)
        if link_id is not None:
            del self._dialing[link_id]
            self.dial_failures += 1
            if self._running:
                self.node.connection_failed(link_id, monotonic())
                self._pump_locked()

    def _send(self, lk: _Link, data: bytes) -> None:
        """Encrypt if needed, write what the kernel takes, buffer the rest (lock held)."""
        tls = lk.tls
        if tls is not None:
            assert lk.outbio is not None
            if data:
                try:
                    tls.write(data)
                except ssl.SSLError as exc:
                    self._lost_or_fail(lk, exc)
                    return
            data = lk.outbio.read()
        if not data:
            return
        if lk.out is not None:
            lk.out += data
        else:
            try:
                n = lk.sock.send(data)
            except _RETRY:
                n = 0
            except OSError as exc:
                self._lost_or_fail(lk, exc)
                return
            if n == len(data):
                return
            lk.out = bytearray(memoryview(data)[n:])
            self._set_events(lk, READ | WRITE)
        self._backlog_check(lk)

    def _lost_or_fail(self, lk: _Link, exc: BaseException) -> None:
        if lk.link_id is None:
            self._fail(lk, exc)
        else:
            self._lost(lk)

    def _backlog_check(self, lk: _Link) -> None:
        full = lk.out is not None and len(lk.out) > self.max_link_backlog
        if full == lk.paused:
            return
        if not full and lk.out is not None and len(lk.out) > self.max_link_backlog // 4:
            return
        lk.paused = full
        if lk.link_id is not None:
            self._report_backlog(lk.link_id, full)

    # ------------------------------------------------------------------ readiness

    def _on_io(self, lk: _Link, events: int, now: float) -> None:
        # Lock held, I/O side.
        if lk.dead:
            return
        if lk.connecting:
            if events & (WRITE | READ):
                self._connected(lk)
            return
        if events & WRITE:
            out = lk.out
            if out is not None:
                try:
                    n = lk.sock.send(out)
                except _RETRY:
                    n = 0
                except OSError as exc:
                    self._lost_or_fail(lk, exc)
                    return
                del out[:n]
                if not out:
                    lk.out = None
                    if lk.closing:
                        self._drop(lk)
                        return
                    self._set_events(lk, READ)
                self._backlog_check(lk)
            elif not lk.closing:
                self._set_events(lk, READ)
        if events & READ and not lk.dead:
            self._on_readable(lk)

    def _on_readable(self, lk: _Link) -> None:
        try:
            data = lk.sock.recv(RECV_SIZE)
        except _RETRY:
            return
        except OSError as exc:
            self._lost_or_fail(lk, exc)
            return
        if lk.closing:
            if not data:
                self._drop(lk)
            return
        eof = not data
        tls = lk.tls
        if tls is not None:
            assert lk.inbio is not None
            if data:
                lk.inbio.write(data)
            else:
                lk.inbio.write_eof()
            if lk.handshaking and not self._handshake(lk):
                if eof and not lk.dead:
                    self._fail(lk, ConnectionError("EOF during the TLS handshake"))
                return
            chunks: list[bytes] = []
            while True:
                try:
                    chunk = tls.read(RECV_SIZE)
                except _SSL_RETRY:
                    break
                except ssl.SSLZeroReturnError:
                    eof = True
                    break
                except ssl.SSLError as exc:
                    if eof:
                        break  # unclean EOF: treated as EOF
                    self._lost_or_fail(lk, exc)
                    return
                if not chunk:
                    eof = True
                    break
                chunks.append(chunk)
            data = b"".join(chunks)
        self._deliver_bytes(lk, data, eof)

    def _deliver_bytes(self, lk: _Link, data: bytes, eof: bool) -> None:
        link_id = lk.link_id
        if link_id is None:
            if data:
                lk.early.append(data)
            if eof:
                lk.early_eof = True
                self._set_events(lk, 0)
            return
        now = monotonic()
        if data:
            self.node.receive_data(link_id, data, now)
        if eof and not lk.dead:
            self.node.receive_eof(link_id, now)
            self._pump_locked()
            self._lost(lk)  # as asyncio does after EOF: the socket is gone
            return
        self._pump_locked()

    def _handshake(self, lk: _Link) -> bool:
        """One step of the TLS handshake; True once done and the link registered."""
        tls = lk.tls
        assert tls is not None
        try:
            tls.do_handshake()
        except _SSL_RETRY:
            self._send(lk, b"")
            return False
        except (ssl.SSLError, OSError) as exc:
            self._send(lk, b"")  # the alert, best effort
            self._fail(lk, exc)
            return False
        self._send(lk, b"")
        if lk.dead:
            return False
        lk.handshaking = False
        lk.deadline = math.inf
        self._ready(lk)
        return not lk.dead

    def _ready(self, lk: _Link) -> None:
        """TCP (and TLS) done: hand the socket to the node."""
        now = monotonic()
        if lk.inbound:
            link_id = self.node.accept(lk.remote, now) if self._running else None
            if link_id is None:
                self.refused_inbound += 1
                self._drop(lk)
                return
        else:
            found = next((k for k, v in self._dialing.items() if v is lk), None)
            if found is None or not self._running:
                self._drop(lk)
                return
            del self._dialing[found]
            link_id = found
        lk.link_id = link_id
        self._links[link_id] = lk
        if not lk.inbound:
            self.node.connection_made(link_id, now)
        early, lk.early = lk.early, []
        for data in early:
            self.node.receive_data(link_id, data, now)
        if lk.early_eof:
            self.node.receive_eof(link_id, now)
            self._pump_locked()
            self._lost(lk)
            return
        self._pump_locked()

    def _start_tls(self, lk: _Link, context: ssl.SSLContext, hostname: str | None) -> None:
        lk.inbio = ssl.MemoryBIO()
        lk.outbio = ssl.MemoryBIO()
        lk.tls = context.wrap_bio(
            lk.inbio, lk.outbio, server_side=lk.inbound, server_hostname=hostname
        )
        lk.handshaking = True
        lk.deadline = monotonic() + self.tls_handshake_timeout
        self._handshake(lk)

    # ------------------------------------------------------------------ accepting

    def _close_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            self.host.unwatch(listener.sock.fileno())
            listener.sock.close()

    def _on_accept(self, now: float) -> None:
        listener = self._listener
        if listener is None:
            return
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = listener.sock.accept()
            except _RETRY:
                return
            except OSError as exc:
                log.warning("cluster accept failed: %s", exc)
                return
            if not self._running or self._inbound >= self.max_inbound:
                self.refused_inbound += 1
                sock.close()
                continue
            sock.setblocking(False)
            _tune(sock)
            lk = _Link(self, sock, inbound=True)
            lk.remote = _format_peer(addr)
            lk.counted = True
            self._inbound += 1
            self._socks.add(lk)
            self._set_events(lk, READ)
            tls = self._tls
            if tls is not None:
                self._start_tls(lk, tls.server_context, None)
            else:
                self._ready(lk)
        self._arm()

    # ------------------------------------------------------------------ dialing

    def _start_dial(self, link_id: int, address: str) -> None:
        if not self._running:
            return
        try:
            host, port = split_address(address)
        except ValueError as exc:
            log.debug("cluster dial %s failed: %r", address, exc)
            self.dial_failures += 1
            self.node.connection_failed(link_id, monotonic())
            return
        self._dialing[link_id] = None
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:  # a host name: resolve off the I/O side (getaddrinfo blocks)
            self.host.runtime.spawn(
                lambda: self._resolve(link_id, address, host, port), "wse-cluster-resolve"
            )
            return
        # An IP literal needs no resolver (gevent's would switch greenlets here).
        if ip.version == 4:
            infos: list[Any] = [(socket.AF_INET, socket.SOCK_STREAM, 0, "", (host, port))]
        else:
            infos = [(socket.AF_INET6, socket.SOCK_STREAM, 0, "", (host, port, 0, 0))]
        self._connect(link_id, address, host, infos)

    def _resolve(self, link_id: int, address: str, host: str, port: int) -> None:
        try:
            infos: list[Any] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            infos = []

        def go() -> None:
            with self.lock:
                if self._dialing.get(link_id, 0) is not None or not self._running:
                    return  # given up meanwhile
                self._connect(link_id, address, host, infos)
                self._pump_locked()

        self._submit(go)

    def _connect(
        self,
        link_id: int,
        address: str,
        host: str,
        infos: list[Any],
        deadline: float | None = None,
    ) -> None:
        # Lock held, I/O side; the node expects an answer for link_id in every case.
        if deadline is None:
            deadline = monotonic() + self.connect_timeout
        for i, (family, stype, proto, _, addr) in enumerate(infos):
            sock = socket.socket(family, stype, proto)
            sock.setblocking(False)
            _tune(sock)  # buffers before connecting, so the window scale fits
            code = sock.connect_ex(addr)
            if code not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
                sock.close()
                continue
            lk = _Link(self, sock, inbound=False)
            lk.remote = address
            lk.dial_host = host
            lk.dial_rest = infos[i + 1 :]
            lk.connecting = True
            lk.deadline = deadline
            self._dialing[link_id] = lk
            self._socks.add(lk)
            self._set_events(lk, WRITE)
            return
        del self._dialing[link_id]
        self.dial_failures += 1
        self.node.connection_failed(link_id, monotonic())

    def _connected(self, lk: _Link) -> None:
        err = lk.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            link_id = next((k for k, v in self._dialing.items() if v is lk), None)
            if lk.dial_rest and link_id is not None:  # the next resolved address
                self._drop(lk)
                self._dialing[link_id] = None
                self._connect(link_id, lk.remote, lk.dial_host, lk.dial_rest, lk.deadline)
                return
            self._fail(lk, OSError(err, "connect failed"))
            return
        lk.connecting = False
        lk.deadline = math.inf
        self._set_events(lk, READ)
        tls = self._tls
        if tls is not None:
            self._start_tls(lk, tls.client_context, ClusterTLS.server_hostname(lk.dial_host))
        else:
            self._ready(lk)

    def _cancel_dial(self, link_id: int) -> None:
        lk = self._dialing.pop(link_id, None)
        if lk is not None:
            self._drop(lk)

"""asyncio cluster links: the listener and dialer that carry out a ``ClusterNode``'s intents.

The node (``wse_proto.cluster.mesh``) decides everything: whom to dial and when, what to
send, which link to close. This module only moves bytes, on the event loop the client
transport already runs, under the same lock as the server core (CLUSTER §8.11):

- ``Dial`` -> a task: resolve, TCP connect (5 s), socket options (TCP_NODELAY,
  keepalive 10 s idle / 5 s interval where the OS has them, 256 KiB buffers), optional
  TLS (5 s; the dialed host part is the checked name and the SNI), then
  ``connection_made`` or ``connection_failed``.
- the listener: at most ``max_inbound`` (128) inbound sockets at a time, counted from the
  TCP accept so a flood of silent TLS clients is bounded too; TLS accept timeout 5 s;
  then ``node.accept``. TLS is started per socket with ``loop.start_tls``, so
  :meth:`AsyncioClusterTransport.reload_tls` applies to every later handshake.
- ``Send`` -> queued per link and written once per pump, in writes of about 64 KiB
  (CLUSTER §2: writers may coalesce frames); ``CloseLink`` -> those writes, then close
  (aborted if the peer does not read within 5 s).
- one timer for the node at ``node.next_deadline()``.
- ``Deliver`` / ``PresenceNotify`` / ``LinkUp`` / ``LinkDown`` -> the callbacks, called on
  the loop thread **with the lock held** (they may call into the server core directly,
  and must not take the lock again).

Server code that changes the node from elsewhere (``publish``, ``subscribe``, ``drain``,
...) holds the lock and then calls :meth:`AsyncioClusterTransport.wake`, which schedules
one pump on the loop however many calls come before it runs.

A link whose socket cannot keep up (write buffer above ``max_link_backlog``) reports a
full queue to its ``PeerLink``, so further publications to it are dropped and counted as
the original drops them (CLUSTER §8.7) instead of growing memory without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import ssl
import threading

from wse_proto._defaults import monotonic
from wse_proto.cluster.mesh import ClusterNode

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

__all__ = [
    "CONNECT_TIMEOUT",
    "TLS_HANDSHAKE_TIMEOUT",
    "AsyncioClusterTransport",
    "DeliverCallback",
    "LinkChangeCallback",
    "PresenceCallback",
    "split_address",
]

log = logging.getLogger("wse_transports.cluster")

WRITE_CHUNK = 64 * 1024
"""Queued frames are joined into writes of about this size (the original's batches)."""


class _LinkProto(asyncio.Protocol):
    """One cluster socket. No protocol state: it forwards to the transport.

    Until the node knows the socket (``link_id`` None: TLS handshake or dial still
    finishing), what arrives is kept and fed in order once it is registered.
    """

    __slots__ = (
        "abort_timer",
        "closing",
        "counted",
        "early",
        "early_eof",
        "inbound",
        "link_id",
        "lost",
        "outq",
        "owner",
        "paused",
        "remote",
        "transport",
    )

    def __init__(self, owner: AsyncioClusterTransport, *, inbound: bool) -> None:
        self.owner = owner
        self.inbound = inbound
        self.link_id: int | None = None
        self.transport: asyncio.Transport | None = None
        self.remote = ""
        self.early: list[bytes] = []
        self.early_eof = False
        self.outq: list[bytes] = []
        self.closing = False
        self.lost = False
        self.counted = False  # holds one of the max_inbound slots
        self.paused = False  # the socket holds more than max_link_backlog unwritten
        self.abort_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.owner._made(self, transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        if self.link_id is None:
            if not self.lost:
                self.early.append(data)
            return
        self.owner._data(self, data)

    def eof_received(self) -> bool | None:
        if self.link_id is None:
            self.early_eof = True
        else:
            self.owner._eof(self)
        return None  # asyncio closes the socket

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._lost(self, exc)

    def pause_writing(self) -> None:
        self.paused = True
        self.owner._backlog_soon(self)

    def resume_writing(self) -> None:
        self.paused = False
        self.owner._backlog_soon(self)


class AsyncioClusterTransport(_ClusterTransportBase[_LinkProto]):
    """Run a :class:`~wse_proto.cluster.mesh.ClusterNode`'s links on an asyncio loop.

    ``listen_port=None`` (and no ``sock``) runs without a listener (dial only);
    ``sock`` is an already bound TCP socket to listen on (tests bind port 0 first to
    learn the address the node announces). ``lock`` is the server core's lock.
    Everything but :meth:`wake` and :meth:`reload_tls` must run on the loop thread.
    """

    def __init__(
        self,
        node: ClusterNode,
        lock: threading.Lock,
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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._server: asyncio.base_events.Server | None = None
        self._protos: set[_LinkProto] = set()  # every live socket
        self._dialing: dict[int, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # TLS accepts in progress
        self._timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Bind the listener (if any) and start dialing. Raises the bind error."""
        if self._running or self._stopping:
            raise RuntimeError("cluster transport already started")
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._loop_thread = threading.get_ident()
        if self._sock is not None or self.listen_port is not None:
            factory = self._inbound_factory
            if self._sock is not None:
                server = await loop.create_server(factory, sock=self._sock, backlog=self.backlog)
            else:
                server = await loop.create_server(
                    factory,
                    self.listen_host,
                    self.listen_port,
                    backlog=self.backlog,
                    reuse_address=True,
                )
            self._server = server
            sockets = server.sockets or ()
            self._bound_port = sockets[0].getsockname()[1] if sockets else 0
        self._running = True
        with self.lock:
            self.node.handle_timer(monotonic())  # starts the dials that are due
            self._pump_locked()

    async def stop(self, send_shutdown: bool = True, *, grace: float = 2.0) -> None:
        """Stop the links and the listener.

        ``send_shutdown``: SHUTDOWN on every open link (``node.shutdown``), written before
        the sockets close, waiting up to ``grace`` seconds; otherwise every socket is
        aborted at once, as a crash would (the node is left as it was).
        """
        if not self._running:
            return
        self._stopping = True
        server = self._server
        if server is not None:
            server.close()
        with self.lock:
            if send_shutdown and not self.node.stopped:
                self.node.shutdown(monotonic())
                self._pump_locked()
            self._running = False
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._timer_at = math.inf
            cancelled = [*self._dialing.values(), *self._tasks]
            for task in cancelled:
                task.cancel()
            self._dialing.clear()
            for p in list(self._protos):
                if not send_shutdown or p.link_id is None or not p.closing:
                    self._abort(p)
        if cancelled:
            await asyncio.wait(cancelled, timeout=1.0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self._protos and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for p in list(self._protos):
            self._abort(p)
        for _ in range(5):  # let connection_lost callbacks run
            if not self._protos:
                break
            await asyncio.sleep(0)
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        self._server = None

    # ------------------------------------------------------------------ cross-thread

    def wake(self) -> None:
        """Schedule one pump of the node's intents (call with the lock held, any thread)."""
        if self._pump_scheduled or not self._running:
            return
        loop = self._loop
        if loop is None:
            return
        self._pump_scheduled = True
        try:
            if threading.get_ident() == self._loop_thread:
                loop.call_soon(self._pump_scheduled_now)
            else:
                loop.call_soon_threadsafe(self._pump_scheduled_now)
        except RuntimeError:  # loop closed
            self._pump_scheduled = False

    # ------------------------------------------------------------------ the pump

    def _queue_send(self, link_id: int, data: bytes) -> None:
        p = self._links.get(link_id)
        if p is not None and not p.closing and not p.lost:
            p.outq.append(data)
            self._dirty[p] = None

    def _write_out(self, p: _LinkProto) -> None:
        """Write a link's queued frames, joined into writes of about WRITE_CHUNK bytes."""
        queue = p.outq
        if not queue:
            return
        p.outq = []
        transport = p.transport
        if transport is None or p.lost or transport.is_closing():
            return
        if len(queue) == 1:
            transport.write(queue[0])
            return
        batch: list[bytes] = []
        size = 0
        for chunk in queue:
            if size and size + len(chunk) > WRITE_CHUNK:
                transport.write(batch[0] if len(batch) == 1 else b"".join(batch))
                batch = []
                size = 0
            batch.append(chunk)
            size += len(chunk)
        if batch:
            transport.write(batch[0] if len(batch) == 1 else b"".join(batch))

    def _close_link(self, link_id: int) -> None:
        task = self._dialing.pop(link_id, None)
        if task is not None:  # a dial given up by the node (timeout, shutdown)
            task.cancel()
            return
        p = self._links.get(link_id)
        if p is None or p.closing:
            return
        self._dirty.pop(p, None)
        self._write_out(p)  # the Sends queued before the close go first
        p.closing = True
        transport = p.transport
        if transport is None or p.lost:
            return
        transport.close()
        if self._loop is not None:
            p.abort_timer = self._loop.call_later(CLOSE_FLUSH_TIMEOUT, transport.abort)

    def _abort(self, p: _LinkProto) -> None:
        p.closing = True
        p.outq = []
        if p.transport is not None and not p.lost:
            p.transport.abort()

    # ------------------------------------------------------------------ timers

    def _arm(self) -> None:
        """Re-arm the node's timer when its deadline moved earlier (lock held)."""
        if not self._running:
            return
        deadline = self.node.next_deadline()
        if deadline is None or deadline >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        assert self._loop is not None
        # A millisecond late rather than early: loop clocks may round.
        delay = max(0.0, deadline - monotonic()) + 0.001
        self._timer = self._loop.call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        with self.lock:
            if not self._running:
                return
            self.node.handle_timer(monotonic())
            self._pump_locked()

    # ------------------------------------------------------------------ dialing

    def _start_dial(self, link_id: int, address: str) -> None:
        if not self._running or self._loop is None:
            return
        task = self._loop.create_task(self._dial(link_id, address))
        self._dialing[link_id] = task

    async def _dial(self, link_id: int, address: str) -> None:
        loop = asyncio.get_running_loop()
        transport: asyncio.Transport | None = None
        proto: _LinkProto | None = None
        sock: socket.socket | None = None
        try:
            host, port = split_address(address)
            async with asyncio.timeout(self.connect_timeout):
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                last: BaseException | None = None
                for family, stype, sproto, _, addr in infos:
                    sock = socket.socket(family, stype, sproto)
                    sock.setblocking(False)
                    _tune(sock)  # buffers before connecting, so the window scale fits
                    try:
                        await loop.sock_connect(sock, addr)
                        break
                    except OSError as exc:
                        last = exc
                        sock.close()
                        sock = None
                if sock is None:
                    raise last if last is not None else OSError(f"cannot resolve {host!r}")
            transport, proto = await loop.create_connection(
                lambda: _LinkProto(self, inbound=False), sock=sock
            )
            sock = None  # owned by the transport now
            tls = self._tls
            if tls is not None:
                tls_transport = await loop.start_tls(
                    transport,
                    proto,
                    tls.client_context,
                    server_hostname=ClusterTLS.server_hostname(host),
                    ssl_handshake_timeout=self.tls_handshake_timeout,
                )
                if tls_transport is None:
                    raise ConnectionError("TLS upgrade returned no transport")
                transport = tls_transport
                proto.transport = transport
        except asyncio.CancelledError:
            self._dial_cleanup(sock, transport, proto)
            raise
        except (OSError, ValueError, ssl.SSLError, TimeoutError) as exc:
            self._dial_cleanup(sock, transport, proto)
            log.debug("cluster dial %s failed: %r", address, exc)
            with self.lock:
                if self._dialing.pop(link_id, None) is None:
                    return  # cancelled or given up meanwhile
                self.dial_failures += 1
                if isinstance(exc, ssl.SSLError):
                    self.tls_failures += 1
                self.node.connection_failed(link_id, monotonic())
                self._pump_locked()
            return
        with self.lock:
            wanted = self._dialing.pop(link_id, None) is not None
            if not wanted or proto.lost or not self._running:
                self._abort(proto)
                if wanted and self._running:  # lost during TLS: an ordinary failed dial
                    self.dial_failures += 1
                    self.node.connection_failed(link_id, monotonic())
                    self._pump_locked()
                return
            self._register(proto, link_id)
            self.node.connection_made(link_id, monotonic())
            self._feed_early(proto)
            self._pump_locked()

    def _dial_cleanup(
        self,
        sock: socket.socket | None,
        transport: asyncio.Transport | None,
        proto: _LinkProto | None,
    ) -> None:
        if sock is not None:
            sock.close()
        if transport is not None:
            transport.abort()
        if proto is not None:
            self._lost(proto, None)  # never registered: only the bookkeeping

    # ------------------------------------------------------------------ accepting

    def _inbound_factory(self) -> _LinkProto:
        return _LinkProto(self, inbound=True)

    def _made(self, p: _LinkProto, transport: asyncio.Transport) -> None:
        p.transport = transport
        self._protos.add(p)
        if not p.inbound:
            return  # a dial: registered by _dial once TLS is done
        p.remote = _format_peer(transport.get_extra_info("peername"))
        if not self._running or self._inbound >= self.max_inbound:
            self.refused_inbound += 1
            self._abort(p)
            return
        self._inbound += 1
        p.counted = True
        _tune(transport.get_extra_info("socket"))
        tls = self._tls
        if tls is None:
            with self.lock:
                self._accept(p)
            return
        assert self._loop is not None
        task = self._loop.create_task(self._tls_accept(p, transport, tls.server_context))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _tls_accept(
        self, p: _LinkProto, raw: asyncio.Transport, context: ssl.SSLContext
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            tls_transport = await loop.start_tls(
                raw,
                p,
                context,
                server_side=True,
                ssl_handshake_timeout=self.tls_handshake_timeout,
            )
        except asyncio.CancelledError:
            raw.abort()
            self._lost(p, None)
            raise
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            log.debug("cluster TLS accept from %s failed: %r", p.remote, exc)
            self.tls_failures += 1
            raw.abort()
            self._lost(p, exc)  # frees the inbound slot even if asyncio stays silent
            return
        if tls_transport is None:
            raw.abort()
            self._lost(p, None)
            return
        p.transport = tls_transport
        if p.lost:
            return
        with self.lock:
            self._accept(p)

    def _accept(self, p: _LinkProto) -> None:
        # Lock held.
        link_id = self.node.accept(p.remote, monotonic()) if self._running else None
        if link_id is None:
            self.refused_inbound += 1
            self._abort(p)
            return
        self._register(p, link_id)
        self._feed_early(p)
        self._pump_locked()

    def adopt(self, transport: asyncio.Transport, initial: bytes = b"") -> bool:
        """Take over a socket accepted elsewhere whose first bytes looked like a cluster
        frame (CLUSTER §8.9, the main WebSocket port). Loop thread, lock held.

        ``initial`` are the bytes already read from it. The socket then behaves like one
        accepted on the cluster port. False (and the socket aborted) when refused: with
        cluster TLS configured such plain-text links are never taken (as the original),
        nor beyond the inbound limit or when not running.
        """
        p = _LinkProto(self, inbound=True)
        p.transport = transport
        p.remote = _format_peer(transport.get_extra_info("peername"))
        self._protos.add(p)
        transport.set_protocol(p)
        if not self._running or self._tls is not None or self._inbound >= self.max_inbound:
            self.refused_inbound += 1
            self._abort(p)
            return False
        self._inbound += 1
        p.counted = True
        if initial:
            p.early.append(bytes(initial))
        self._accept(p)
        return p.link_id is not None

    # ------------------------------------------------------------------ socket events

    def _register(self, p: _LinkProto, link_id: int) -> None:
        p.link_id = link_id
        self._links[link_id] = p
        transport = p.transport
        if transport is not None:
            # pause_writing() then means "more than max_link_backlog unwritten".
            high = self.max_link_backlog
            transport.set_write_buffer_limits(high=high, low=high // 4)

    def _feed_early(self, p: _LinkProto) -> None:
        # Lock held; the socket was just registered with the node.
        link_id = p.link_id
        assert link_id is not None
        now = monotonic()
        early, p.early = p.early, []
        for data in early:
            self.node.receive_data(link_id, data, now)
        if p.early_eof:
            self.node.receive_eof(link_id, now)

    def _data(self, p: _LinkProto, data: bytes) -> None:
        if p.closing or p.lost or not self._running:
            return
        link_id = p.link_id
        assert link_id is not None
        with self.lock:
            self.node.receive_data(link_id, data, monotonic())
            self._pump_locked()

    def _eof(self, p: _LinkProto) -> None:
        if p.closing or p.lost or not self._running:
            return
        link_id = p.link_id
        assert link_id is not None
        with self.lock:
            self.node.receive_eof(link_id, monotonic())
            self._pump_locked()

    def _lost(self, p: _LinkProto, exc: Exception | None) -> None:
        if p.lost:
            return
        p.lost = True
        self._protos.discard(p)
        if p.abort_timer is not None:
            p.abort_timer.cancel()
            p.abort_timer = None
        if p.counted:
            p.counted = False
            self._inbound -= 1
        link_id = p.link_id
        if link_id is None:
            return  # TLS or dial still finishing: they see the loss themselves
        if self._links.get(link_id) is p:
            del self._links[link_id]
        self._dirty.pop(p, None)
        if p.closing or not self._running:
            return
        with self.lock:
            self.node.connection_lost(link_id, monotonic())
            self._pump_locked()

    # ------------------------------------------------------------------ backpressure

    def _backlog_soon(self, p: _LinkProto) -> None:
        # May run inside transport.write() with the lock held: look again from the loop.
        loop = self._loop
        if loop is not None and not p.lost:
            loop.call_soon(self._backlog_check, p)

    def _backlog_check(self, p: _LinkProto) -> None:
        transport, link_id = p.transport, p.link_id
        if transport is None or link_id is None or p.lost or p.closing:
            return
        with self.lock:
            self._report_backlog(link_id, p.paused)

"""What only the threading transport (and the blocking pump under it) must show.

The behaviour every transport shares is in ``tests/integration`` (run on each transport);
here: thousands of idle connections on a bounded number of threads, the close-flush
timeout, the cluster extension point (``watch``/``submit``), the handshake gate, the
command line, and that importing it never imports gevent.
"""

from __future__ import annotations

import asyncio
import os
import selectors
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from _cli import check_cli_sigterm
from integration.rawws import TEXT, RawWS, server_frame, upgrade_request

from wse_proto._defaults import monotonic, system_rand, wall_clock_ms
from wse_proto.hub import CoreConfig, ServerCore
from wse_server import WSEServer
from wse_transports import _blocking
from wse_transports._blocking import READ, HandshakeGate
from wse_transports.base import get_transport
from wse_transports.threading import ThreadingTransport

pytestmark = pytest.mark.loopback

ROOT = Path(__file__).resolve().parent.parent


def _open_idle(port: int, n: int) -> list[socket.socket]:
    """``n`` upgraded, silent connections (requests sent first, answers read after)."""
    request = upgrade_request(f"127.0.0.1:{port}")
    socks = []
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(request)
        socks.append(sock)
    for sock in socks:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk, "closed during the upgrade"
            head += chunk
        assert head.startswith(b"HTTP/1.1 101")
    return socks


def _read_all(socks: list[socket.socket], expected: bytes, timeout: float = 20.0) -> int:
    """Read from every socket until each got ``expected``; returns how many did."""
    sel = selectors.DefaultSelector()
    got: dict[socket.socket, bytes] = {}
    for sock in socks:
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ)
        got[sock] = b""
    done = 0
    deadline = time.monotonic() + timeout
    while done < len(socks) and time.monotonic() < deadline:
        for key, _ in sel.select(0.5):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            got[sock] += sock.recv(65536)
            if len(got[sock]) >= len(expected):
                assert got[sock][: len(expected)] == expected
                sel.unregister(sock)
                done += 1
    sel.close()
    return done


def test_2000_idle_connections_on_a_bounded_number_of_threads() -> None:
    n = 2000
    threads_before = threading.active_count()
    server = WSEServer(
        "127.0.0.1", 0, max_connections=n + 10, transport="threading", ping_interval=300,
        idle_timeout=600,
    )  # fmt: skip
    server.enable_drain_mode()
    server.start()
    socks: list[socket.socket] = []
    try:
        socks = _open_idle(server.port, n)
        seen = 0
        deadline = time.monotonic() + 20
        while seen < n and time.monotonic() < deadline:
            for kind, cid, _ in server.drain_inbound(4096, 50):
                if kind == "connect":
                    server.subscribe_connection(cid, ["all"])
                    seen += 1
        assert seen == n and server.get_connection_count() == n
        # One I/O thread serves them all (drain mode: no callback dispatcher).
        assert threading.active_count() - threads_before == 1
        text = '{"t":"hello","p":{"n":1}}'
        server.broadcast_local("all", text)
        frame = server_frame(TEXT, b'{"c":"U","t":"hello","p":{"n":1}}')
        assert _read_all(socks, frame) == n
        assert f"wse_messages_sent_total {n}" in server.prometheus_metrics()
    finally:
        server.stop()
        for sock in socks:
            sock.close()
    assert threading.active_count() == threads_before


def test_closing_socket_whose_peer_never_reads_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_blocking, "CLOSE_FLUSH_TIMEOUT", 0.5)
    server = WSEServer("127.0.0.1", 0, transport="threading")
    server.enable_drain_mode()
    server.start()
    stuck = RawWS(server.port, rcvbuf=4096)  # never reads again
    try:
        cid = None
        while cid is None:
            for kind, conn_id, _ in server.drain_inbound(16, 1000):
                cid = conn_id if kind == "connect" else cid
        transport = server._transport
        assert isinstance(transport, ThreadingTransport)
        blob = b"x" * 65536
        deadline = time.monotonic() + 10
        while True:  # fill the kernel buffers until the transport holds a backlog
            server.send_bytes(cid, blob)
            time.sleep(0.01)
            with server._lock:
                conn = server._core.get_connection(cid)
                assert conn is not None
                backlog = conn.transport_backlog
            if backlog > 0:
                break
            assert time.monotonic() < deadline, "the transport never reported a backlog"
        stuck.sock.shutdown(socket.SHUT_WR)  # EOF: the server closes after flushing
        deadline = time.monotonic() + 5
        while not all(s.closing for s in transport._socks):
            assert time.monotonic() < deadline, "EOF did not start the close"
            time.sleep(0.02)
        started = time.monotonic()
        assert len(transport._socks) == 1  # still trying to flush the backlog
        while transport._socks:
            assert time.monotonic() < deadline, "the stuck socket was never dropped"
            time.sleep(0.05)
        assert time.monotonic() - started >= 0.4  # not before the flush timeout
        with server._lock:
            assert not server._core._open  # the core heard connection_lost
    finally:
        stuck.close()
        server.stop()


class _Probe:
    """An extra listener served through the extension point (what a cluster one will be)."""

    def __init__(self, transport: ThreadingTransport, lock: Any) -> None:
        self.transport = transport
        self.lock = lock
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.accepted = threading.Event()
        self.lock_held: bool | None = None
        self.on_io_side: bool | None = None

    def on_io(self, events: int, now: float) -> None:
        self.lock_held = self.lock.locked()
        self.on_io_side = threading.get_ident() == self.transport._io_ident
        peer, _ = self.sock.accept()
        peer.sendall(b"hi")
        peer.close()
        self.transport.unwatch(self.sock.fileno())
        self.accepted.set()


def test_watch_serves_extra_sockets_on_the_io_side() -> None:
    lock = threading.Lock()
    core = ServerCore(CoreConfig(), rand=system_rand, wall_ms=wall_clock_ms, now=monotonic())
    transport = ThreadingTransport(core, lock, host="127.0.0.1", port=0)
    transport.start()
    probe = _Probe(transport, lock)
    try:
        with pytest.raises(RuntimeError, match="I/O side"):
            transport.watch(probe.sock.fileno(), probe, READ)
        transport.submit(lambda: transport.watch(probe.sock.fileno(), probe, READ))
        with socket.create_connection(probe.sock.getsockname(), timeout=5) as client:
            assert client.recv(16) == b"hi"
        assert probe.accepted.wait(5)
        assert probe.lock_held is True and probe.on_io_side is True
        assert probe.sock.fileno() not in transport._handlers
    finally:
        transport.stop(0.5)
        probe.sock.close()
    assert not transport.running
    with pytest.raises(RuntimeError, match="Not running"):
        transport.submit(lambda: None)


def test_handshake_gate_refuses_only_while_old_upgrades_pile_up() -> None:
    gate = HandshakeGate(limit=2, grace=1.0)
    assert gate.admit(0.0)
    gate.started("a", 0.0)
    gate.started("b", 0.5)
    assert len(gate) == 2
    assert gate.admit(0.9)  # at the limit, but the oldest is younger than the grace
    assert not gate.admit(1.0)  # ... now it aged
    gate.done("a")
    assert gate.admit(1.0)  # below the limit again
    gate.started("c", 1.0)
    assert not gate.admit(1.5)  # "b" is the oldest now, 1.0 s old
    gate.done("b")
    gate.done("zzz")  # unknown keys are ignored
    assert gate.admit(1.5) and len(gate) == 1


def test_threading_transport_cannot_serve_inside_an_event_loop() -> None:
    assert get_transport("threading")[0] is ThreadingTransport
    server = WSEServer("127.0.0.1", 0, transport="threading")

    async def scenario() -> None:
        with pytest.raises(RuntimeError, match="cannot run in an event loop"):
            await server.serve()

    asyncio.run(asyncio.wait_for(scenario(), 10))
    assert not server.is_running()


def test_importing_threading_never_imports_gevent() -> None:
    code = (
        "import sys; from wse_server import WSEServer; "
        "s = WSEServer('127.0.0.1', 0, transport='threading'); s.start(); s.stop(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'gevent'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_cli_transport_threading() -> None:
    check_cli_sigterm(
        [sys.executable, "-m", "wse_server", "--transport", "threading", "--port", "0"],
        {k: v for k, v in os.environ.items() if k != "WSE_JWT_SECRET"},
        "threading",
    )


def test_accept_pauses_when_out_of_descriptors_and_resumes() -> None:
    code = textwrap.dedent(
        """
        import os, resource, sys, time
        from wse_server import WSEServer
        server = WSEServer("127.0.0.1", 0, transport="threading")
        server.start()
        in_use = len(os.listdir("/proc/self/fd"))
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 8, hard))  # room for ~8 sockets
        print(server.port, flush=True)
        sys.stdin.read()
        server.stop()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    socks: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        request = upgrade_request(f"127.0.0.1:{port}")
        for _ in range(16):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(request)
            socks.append(sock)

        def upgraded(sock: socket.socket, timeout: float) -> bool:
            sock.settimeout(timeout)
            try:
                return sock.recv(4096).startswith(b"HTTP/1.1 101")
            except TimeoutError:
                return False

        served = [s for s in socks if upgraded(s, 0.3)]
        waiting = [s for s in socks if s not in served]
        assert 1 <= len(served) <= 10 and len(waiting) >= 6  # the rest wait in the backlog
        for sock in served:
            sock.close()  # frees descriptors in the server
        assert all(upgraded(s, 5.0) for s in waiting[:6])  # accepting resumed
        assert proc.poll() is None
    finally:
        for sock in socks:
            sock.close()
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    assert proc.stderr is not None
    assert "accept failed" in proc.stderr.read()

"""Load and flow control over loopback: fan-out to 1,000 connections, slow consumers,
inbound backpressure, the pending-handshake cap; on every transport."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable

import pytest

from wse_proto.envelope import inject_category
from wse_proto.server import ConnectionState

from .conftest import AnyServer, conn_info, drain_until, wait_for
from .rawws import TEXT, RawWS, server_frame, upgrade_request
from .test_raw_protocol import assert_dropped_without_http

pytestmark = pytest.mark.loopback


def test_1000_connections_receive_1000_broadcasts_in_order(
    server_factory: Callable[..., AnyServer],
) -> None:
    n_conns, n_msgs = 1000, 1000  # the full size on every transport
    server = server_factory(
        jwt_secret=None, max_connections=n_conns + 10, ping_interval=300, idle_timeout=600
    )
    port = server.port
    texts = [f'{{"t":"tick","p":{{"i":{i}}}}}' for i in range(n_msgs)]
    # What every subscriber must read after the 101 response: each broadcast, framed, in order.
    expected = b"".join(server_frame(TEXT, inject_category(t).encode()) for t in texts)
    request = upgrade_request(f"127.0.0.1:{port}")
    results: dict[str, object] = {}
    connected = threading.Event()
    open_count = 0

    async def one_client() -> bool:
        nonlocal open_count
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101")
            open_count += 1
            if open_count == n_conns:
                connected.set()
            pos = 0
            while pos < len(expected):
                chunk = await reader.read(65536)
                if not chunk or expected[pos : pos + len(chunk)] != chunk:
                    return False
                pos += len(chunk)
            return True
        finally:
            writer.close()

    async def all_clients() -> None:
        outcome = await asyncio.wait_for(
            asyncio.gather(*(one_client() for _ in range(n_conns))), 60
        )
        results["ok"] = sum(outcome)

    def client_thread() -> None:
        try:
            asyncio.run(all_clients())
        except BaseException as exc:  # reported by the assertion below
            results["error"] = exc
            connected.set()

    thread = threading.Thread(target=client_thread, name="load-clients")
    thread.start()
    subscribed = 0
    deadline = time.monotonic() + 30
    while subscribed < n_conns and time.monotonic() < deadline:
        for kind, cid, _ in server.drain_inbound(1024, 50):
            if kind == "connect":
                server.subscribe_connection(cid, ["ticks"])
                subscribed += 1
    assert subscribed == n_conns
    assert connected.wait(30) and "error" not in results
    assert server.get_topic_subscriber_count("ticks") == n_conns
    for text in texts:
        server.broadcast_local("ticks", text)
    thread.join(60)
    assert not thread.is_alive()
    assert results.get("error") is None
    assert results["ok"] == n_conns
    assert f"wse_messages_sent_total {n_conns * n_msgs}" in server.prometheus_metrics()
    assert "wse_slow_consumer_drops_total 0" in server.prometheus_metrics()


class _Reader(threading.Thread):
    """Reads frames from a RawWS as fast as it can, counting text frames."""

    def __init__(self, ws: RawWS) -> None:
        super().__init__(daemon=True)
        self.ws = ws
        self.count = 0
        self.stop = False

    def run(self) -> None:
        while not self.stop:
            try:
                op, _ = self.ws.recv_frame(timeout=0.2)
            except TimeoutError:
                continue
            except (ConnectionError, OSError):
                return
            if op == TEXT:
                self.count += 1


@pytest.mark.parametrize("policy", ["drop", "disconnect"])
def test_slow_consumer_backlog_stays_bounded(
    server_factory: Callable[..., AnyServer], policy: str
) -> None:
    limit = 256 * 1024
    server = server_factory(
        jwt_secret=None, max_outbound_queue_bytes=limit, slow_consumer_policy=policy
    )
    slow = RawWS(server.port, rcvbuf=4096)  # never reads again
    fast = RawWS(server.port)
    ids = [drain_until(server, lambda e: e[0] == "connect")[1] for _ in range(2)]
    for cid in ids:
        server.subscribe_connection(cid, ["flood"])
    slow_id = ids[0]  # its upgrade completed before the fast client connected
    reader = _Reader(fast)
    reader.start()
    payload = '{"t":"flood","p":{"blob":"' + "x" * 4000 + '"}}'
    frame_size = len(server_frame(TEXT, inject_category(payload).encode()))
    sent = 0
    max_backlog = 0
    try:
        for _ in range(60):  # 60 x 32 x 4 KB = 7.5 MB offered to each subscriber
            for _ in range(32):
                server.broadcast_local("flood", payload)
            sent += 32
            target = sent
            wait_for(lambda: reader.count >= target, timeout=10)  # noqa: B023
            conn = conn_info(server, slow_id)
            if conn is None:
                break
            max_backlog = max(max_backlog, conn.pending_bytes + conn.transport_backlog)
        metrics = server.prometheus_metrics()
        assert "wse_slow_consumer_drops_total 0" not in metrics
        # what the server holds for the stuck client never exceeds the bound by more
        # than one flush worth of frames
        assert max_backlog <= limit + 32 * frame_size
        assert reader.count == sent  # the healthy subscriber lost nothing
        conn = conn_info(server, slow_id)
        if policy == "drop":
            assert conn is not None and conn.state is ConnectionState.OPEN
        else:  # closed (status-less Close queued), gone once close_timeout expires
            assert conn is None or conn.state is not ConnectionState.OPEN
    finally:
        reader.stop = True
        reader.join(2)
        slow.close()
        fast.close()


def test_inbound_backpressure_never_drops(server_factory: Callable[..., AnyServer]) -> None:
    queue_max = 64
    server = server_factory(jwt_secret=None, max_inbound_queue_size=queue_max)
    ws = RawWS(server.port)
    _, cid, _ = drain_until(server, lambda e: e[0] == "connect")
    total = 3000
    filler = "y" * 1000
    sender_done = threading.Event()

    def sender() -> None:
        for i in range(total):
            ws.send_text(f'{{"t":"m","p":{{"i":{i},"f":"{filler}"}}}}')
        sender_done.set()

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    got: list[int] = []
    max_depth = 0
    deadline = time.monotonic() + 30
    try:
        while len(got) < total and time.monotonic() < deadline:
            max_depth = max(max_depth, server.inbound_queue_depth())
            for kind, ecid, value in server.drain_inbound(16, 100):
                assert (kind, ecid) == ("msg", cid)
                got.append(value["p"]["i"])
            time.sleep(0.002)  # an application slower than the socket
        assert got == list(range(total))
        assert server.inbound_dropped_count() == 0
        assert "wse_inbound_dropped_total 0" in server.prometheus_metrics()
        # Reading paused: the queue held at most one socket read beyond its bound
        # (<= 256 KiB, i.e. ~250 of these messages), never the whole burst.
        assert queue_max <= max_depth < queue_max + 400
        assert sender_done.wait(5)
    finally:
        ws.close()


def test_pending_handshake_cap_drops_extra_sockets(
    server_factory: Callable[..., AnyServer],
) -> None:
    server = server_factory(
        jwt_secret=None, transport_options={"max_pending_handshakes": 3, "pending_grace": 0.1}
    )
    socks: list[socket.socket] = []
    try:
        port = server.port
        socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
        time.sleep(0.3)  # accepted, and older than the grace period: now the cap applies
        assert_dropped_without_http(port, send_request=False)
        # finishing one upgrade frees a slot
        socks[0].sendall(upgrade_request(f"127.0.0.1:{port}"))
        assert socks[0].recv(4096).startswith(b"HTTP/1.1 101")
        extra = RawWS(port)
        assert extra.status_line.startswith("HTTP/1.1 101")
        extra.close()
    finally:
        for s in socks:
            s.close()
        server.stop()
    assert not server.is_running()

"""Pure in-memory fan-out: ``ServerCore.broadcast_local`` against a bare list-append loop.

N plain (unencrypted) connections complete a real upgrade and subscribe to one topic;
each publication is category-injected, framed once and queued on every connection.
The baseline appends the same bytes object to N lists, the floor of any fan-out in
Python. Output (``data_to_send``) is drained between timed rounds, outside the timing,
so both sides work on warm, short lists. Reported: deliveries/s and the per-delivery
cost ratio (core / baseline); the target is within about 3x.
"""

from __future__ import annotations

import base64
import random
import time

from wse_proto.hub import CoreConfig, ServerCore
from wse_proto.server import ServerConnection

MESSAGE = '{"t":"price","p":{"sym":"ES","px":5234.75}}'
ROUNDS = 30
PER_ROUND = 50


def _upgrade_request(rng: random.Random) -> bytes:
    key = base64.b64encode(rng.randbytes(16))
    return (
        b"GET /wse HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )


def _core_with_subscribers(n: int) -> ServerCore:
    rng = random.Random(n)
    core = ServerCore(
        CoreConfig(max_connections=n + 1),
        rand=rng.randbytes,
        wall_ms=lambda: 1_795_000_000_000,
    )
    conns: list[ServerConnection] = []
    for _ in range(n):
        conn = core.open_connection(0.0)
        assert conn is not None
        core.feed(conn, _upgrade_request(rng), 0.0)
        conns.append(conn)
    core.pop_inbound(n)
    for conn in core.take_dirty():
        core.data_to_send(conn)
    for conn in conns:
        core.subscribe(conn.conn_id, ["prices"])
    return core


def _time_core(n: int) -> float:
    """Best seconds per delivery over ROUNDS rounds of PER_ROUND publications."""
    core = _core_with_subscribers(n)
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(PER_ROUND):
            core.broadcast_local("prices", MESSAGE)
        elapsed = time.perf_counter() - start
        best = min(best, elapsed)
        for conn in core.take_dirty():
            conn.data_to_send()
    assert core.metrics.messages_sent == n * ROUNDS * PER_ROUND
    return best / (n * PER_ROUND)


def _time_baseline(n: int) -> float:
    """Best seconds per append of one shared bytes object to N lists."""
    frame = MESSAGE.encode()
    lists: list[list[bytes]] = [[] for _ in range(n)]
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(PER_ROUND):
            for out in lists:
                out.append(frame)
        elapsed = time.perf_counter() - start
        best = min(best, elapsed)
        for out in lists:
            out.clear()
    return best / (n * PER_ROUND)


def main() -> None:
    print(f"{'subscribers':>11} {'core deliveries/s':>18} {'baseline appends/s':>19} {'ratio':>6}")
    for n in (100, 1_000):
        base = _time_baseline(n)
        core = _time_core(n)
        print(f"{n:>11} {1 / core:>18,.0f} {1 / base:>19,.0f} {core / base:>6.2f}")


if __name__ == "__main__":
    main()

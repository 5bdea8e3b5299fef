"""Recovery costs: publish with history on vs off, memory per stored message, replay.

1. Publish. "off" is ``ServerCore.broadcast_local`` to N subscribers (the hub's whole
   publication path: category injection, framing, fan-out); "on" adds
   ``RecoveryStore.publish`` for the same payload in the same loop, which is the work
   recovery adds to a publication. Target: on costs at most 15% more at 100
   subscribers (the fixed ~0.6 us weighs more on a single-subscriber publication, about
   +20%). Shown too: ``publish`` alone against a plain ``deque.append`` of the
   payload (the floor of keeping any history), for reference.
2. Memory. tracemalloc over 40,000 stored messages: bytes allocated per message beyond
   the stored (stamped) payload, and beyond the publisher's payload (so including the
   stamp itself). Target: <= 100 bytes beyond the payload.
3. Replay of 500 missed messages: one-step ``recover`` and a paced seam in batches of
   64, time and bytes allocated (the stored objects are handed out, never copied).
"""

from __future__ import annotations

import base64
import random
import time
import tracemalloc
from collections import deque
from collections.abc import Callable

from wse_proto.hub import CoreConfig, ServerCore
from wse_proto.recovery import RecoveryConfig, RecoveryStore

MESSAGE = '{"t":"price","p":{"sym":"ES","px":5234.75}}'
PAYLOAD = MESSAGE.encode()
TARGET_RATIO = 1.15
TARGET_BYTES = 100


def _best(fns: list[Callable[[], None]], number: int, repeat: int = 7) -> list[float]:
    """Best seconds per call for each function, timed in alternation (load hits all alike)."""
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            for _ in range(number):
                fn()
            best[i] = min(best[i], (time.perf_counter() - start) / number)
    return best


def _core(n: int) -> ServerCore:
    rng = random.Random(n)
    core = ServerCore(
        CoreConfig(max_connections=n + 1), rand=rng.randbytes, wall_ms=lambda: 1_795_000_000_000
    )
    conns = []
    for _ in range(n):
        conn = core.open_connection(0.0)
        assert conn is not None
        key = base64.b64encode(rng.randbytes(16))
        core.feed(
            conn,
            b"GET /wse HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n",
            0.0,
        )
        conns.append(conn)
    core.pop_inbound(n)
    for conn in conns:
        core.subscribe(conn.conn_id, ["prices"])
    return core


def _publish_rows() -> list[tuple[str, float, float]]:
    rows = []
    for n in (1, 10, 100):
        core = _core(n)
        store = RecoveryStore(RecoveryConfig(), rand=random.Random(1).randbytes)
        per_round = 200

        def off(core: ServerCore = core) -> None:
            core.broadcast_local("prices", MESSAGE)

        def on(core: ServerCore = core, store: RecoveryStore = store) -> None:
            store.publish("prices", PAYLOAD, 1.0)
            core.broadcast_local("prices", MESSAGE)

        def drain(core: ServerCore = core) -> None:
            for conn in core.take_dirty():
                core.data_to_send(conn)

        best_off = best_on = float("inf")
        for _ in range(15):
            t_off, t_on = _best([off, on], per_round, repeat=1)
            drain()
            best_off, best_on = min(best_off, t_off), min(best_on, t_on)
        rows.append((f"{n} subscriber(s)", best_off, best_on))
    store = RecoveryStore(RecoveryConfig(), rand=random.Random(2).randbytes)
    history: deque[bytes] = deque(maxlen=128)
    t_append, t_publish = _best(
        [lambda: history.append(PAYLOAD), lambda: store.publish("prices", PAYLOAD, 1.0)], 20000
    )
    rows.append(("publish vs deque.append", t_append, t_publish))
    return rows


def _memory_row() -> tuple[float, float, int]:
    topics, per_topic = 40, 1000
    store = RecoveryStore(
        RecoveryConfig(buffer_size=per_topic, memory_budget=1 << 40),
        rand=random.Random(3).randbytes,
    )
    payloads = [
        b'{"t":"tick","p":{"n":' + str(i).encode() + b',"pad":"' + b"x" * (i % 50) + b'"}}'
        for i in range(64)
    ]
    names = [f"market.{i}" for i in range(topics)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    stored = published = 0
    for i in range(per_topic):
        for name in names:
            payload = payloads[i % 64]
            res = store.publish(name, payload, 1.0)
            assert res is not None
            stored += len(res[0])
            published += len(payload)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    count = topics * per_topic
    assert store.stats()[1] == stored
    used = after - before
    return (used - stored) / count, (used - published) / count, count


def _replay_rows() -> list[tuple[str, float, int, int]]:
    store = RecoveryStore(RecoveryConfig(buffer_size=1024), rand=random.Random(4).randbytes)
    for i in range(600):
        store.publish("room", b'{"t":"chat","p":{"n":%d,"text":"hello there"}}' % i, 1.0)
    epoch, last = store.position("room")  # type: ignore[misc]
    since = last - 500
    payload_bytes = sum(len(m) for m in store.recover("room", epoch, since, 1.0).messages)

    def one_step() -> None:
        out = store.recover("room", epoch, since, 1.0)
        assert out.count == 500

    def paced() -> None:
        _, seam = store.begin_replay("room", epoch, since, 1.0)
        assert seam is not None
        n = 0
        while seam.pending:
            n += len(seam.pull(max_count=64))
        assert n == 500

    rows = []
    for name, fn in (("recover() one step", one_step), ("seam, batches of 64", paced)):
        (t,) = _best([fn], 200)
        tracemalloc.start()
        fn()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rows.append((name, t, peak, payload_bytes))
    return rows


def main() -> None:
    print("publish (per publication)")
    print(f"{'path':>26} {'off/base us':>12} {'on us':>9} {'ratio':>6}")
    for name, t_off, t_on in _publish_rows():
        print(f"{name:>26} {t_off * 1e6:>12.2f} {t_on * 1e6:>9.2f} {t_on / t_off:>6.2f}")
    print(f"  target: ratio <= {TARGET_RATIO} at 100 subscribers")
    beyond_stored, beyond_published, count = _memory_row()
    print(f"memory over {count:,} stored messages (tracemalloc)")
    print(
        f"  beyond the stored payload:    {beyond_stored:6.1f} B/message (target <= {TARGET_BYTES})"
    )
    print(f"  beyond the publisher payload: {beyond_published:6.1f} B/message (incl. the stamp)")
    print("replay of 500 missed messages")
    for name, t, peak, payload_bytes in _replay_rows():
        print(
            f"  {name:<22} {t * 1e6:8.1f} us  peak alloc {peak:>7,} B "
            f"(payloads: {payload_bytes:,} B, not copied)"
        )


if __name__ == "__main__":
    main()

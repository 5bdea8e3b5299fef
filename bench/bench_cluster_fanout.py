"""Cross-process fan-out: subscribers split over 2 clustered server processes vs 1 process.

``python -m bench cluster_fanout [--quick]`` (or ``WSE_BENCH_QUICK=1``). Both setups run in
the same run with the same subscribers, payload and loadgen workers (``bench/loadgen.py``):

- **one process**: one ``WSEServer`` (asyncio) holds every subscriber and publishes with
  ``broadcast`` (no cluster: local fan-out only);
- **two processes**: two ``WSEServer`` processes joined by a loopback cluster link, half of
  the subscribers on each; process A publishes with ``broadcast``, which fans out to its
  half and forwards each publication once to B, which fans out to the other half. This is
  what ``python -m wse_server --workers 2`` does, with a deterministic split instead of
  SO_REUSEPORT's hash.

Rate = deliveries counted by the workers / (last delivery - first publish). Target: two
processes >= 1.6x one process. On a 2-core machine the loadgen workers compete with the
servers for the same cores, so the result says how much a second process helps *here*.
``python -m bench.bench_cluster_fanout --serve [--cluster-port P --peers host:port,...]`` is
a server process (the control protocol of ``bench.bench_server.WseApp``, plus
``wait_cluster n``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from bench.bench_server import (
    MAX_CONNECTIONS,
    ROOT,
    SECRET_ENV,
    TOPIC,
    WseApp,
    auth_headers,
    child_env,
    emit,
    make_token,
    publish_text,
    spawn_server,
)
from bench.loadgen import Child, ChildError, raise_nofile, spawn_worker

TARGET = 1.6
SUBSCRIBERS = 1000


# =============================================================================== server side


class ClusterApp(WseApp):
    """:class:`WseApp` whose ``publish`` goes through ``broadcast`` (cluster-wide)."""

    def command(self, msg: dict[str, Any]) -> bool:
        server = self.server
        cmd = msg.get("cmd")
        if cmd == "publish":
            text = msg["text"]
            publish = server.broadcast
            t0 = time.monotonic()
            for _ in range(int(msg["count"])):
                publish(TOPIC, text)
            t1 = time.monotonic()
            emit(event="published", t0=t0, t1=t1, subs=server.get_topic_subscriber_count(TOPIC))
            return True
        if cmd == "wait_cluster":
            n = int(msg["n"])
            deadline = time.monotonic() + float(msg.get("timeout", 15.0))
            while server.cluster_peers_count() < n and time.monotonic() < deadline:
                time.sleep(0.01)
            emit(event="cluster", n=server.cluster_peers_count())
            return True
        return super().command(msg)


def serve(argv: Sequence[str]) -> int:
    from wse_server import WSEServer

    raise_nofile(MAX_CONNECTIONS + 256)
    server = WSEServer(
        "127.0.0.1",
        0,
        max_connections=MAX_CONNECTIONS,
        jwt_secret=os.environ[SECRET_ENV].encode(),
        ping_interval=3600,
        idle_timeout=7200,
        transport="asyncio",
    )
    server.enable_drain_mode()
    server.start()
    if "--cluster-port" in argv:
        port = int(argv[argv.index("--cluster-port") + 1])
        peers = argv[argv.index("--peers") + 1].split(",") if "--peers" in argv else []
        server.connect_cluster([p for p in peers if p], cluster_port=port)
    app = ClusterApp(server)
    app.thread.start()
    emit(event="ready", port=server.port, pid=os.getpid(), cluster_port=server.cluster_port)
    try:
        for line in sys.stdin:
            if line.strip() and not app.command(json.loads(line)):
                break
    finally:
        app.stopping.set()
        server.stop()
        app.thread.join(2.0)
    return 0


# =============================================================================== harness


def _free_port() -> int:
    from wse_server.workers import free_port

    return free_port()


def _start_servers(count: int, secret: bytes) -> list[tuple[Child, int]]:
    """``count`` server processes (a full mesh when 2 or more); (child, ws port) each."""
    argv = [sys.executable, "-m", "bench.bench_cluster_fanout", "--serve"]
    started: list[tuple[Child, int]] = []
    try:
        if count == 1:
            child, ready = spawn_server("single", argv, secret)
            return [(child, int(ready["port"]))]
        ports = [_free_port() for _ in range(count)]
        for i, port in enumerate(ports):
            peers = ",".join(f"127.0.0.1:{p}" for j, p in enumerate(ports) if j < i)
            extra = ["--cluster-port", str(port), "--peers", peers]
            child, ready = spawn_server(f"node{i}", argv + extra, secret)
            started.append((child, int(ready["port"])))
        for child, _ in started:
            child.send(cmd="wait_cluster", n=count - 1)
            got = child.expect("cluster", 20.0)
            if int(got["n"]) < count - 1:
                raise ChildError(f"{child.name}: cluster link not up ({got})")
    except BaseException:
        for child, _ in started:
            child.stop(2.0, {"cmd": "stop"})
        raise
    return started


def _workers(servers: Sequence[tuple[Child, int]], subs: int, token: str) -> list[Child]:
    """Two loadgen workers; with two servers, one per server."""
    env = child_env()
    workers: list[Child] = []
    try:
        for i in range(2):
            port = servers[i % len(servers)][1]
            job = {"mode": "fanout", "port": port, "conns": subs // 2}
            job["headers"] = auth_headers(token)
            workers.append(spawn_worker(job, name=f"fanout-{i}", cwd=str(ROOT), env=env))
        for w in workers:
            ready = w.expect("ready", 60.0)
            if ready["errors"]:
                raise ChildError(f"{w.name}: {ready['errors']} failed opens")
        for child, _ in servers:
            child.send(cmd="wait_subs", n=subs // len(servers), timeout=20.0)
            child.expect("subs", 25.0)
    except BaseException:
        for w in workers:
            w.stop(1.0)
        raise
    return workers


def _run(publisher: Child, workers: Sequence[Child], subs: int, count: int) -> dict[str, Any]:
    seconds = 30.0
    for w in workers:
        w.send(cmd="go", expect=count, seconds=seconds)
    for w in workers:
        w.expect("counting", 10.0)
    publisher.send(cmd="publish", count=count, text=publish_text())
    published = publisher.expect("published", seconds + 10.0)
    counted = [w.expect("counted", seconds + 15.0) for w in workers]
    delivered = sum(int(c["messages"]) for c in counted)
    elapsed = max(float(c["t_last"]) for c in counted) - float(published["t0"])
    return {
        "rate": delivered / elapsed if elapsed > 0 else 0.0,
        "lost": subs * count - delivered,
        "elapsed": elapsed,
    }


def measure(processes: int, secret: bytes, token: str, quick: bool) -> dict[str, Any]:
    """Best deliveries/s over the measured runs, after a calibrating warm-up."""
    subs = SUBSCRIBERS
    target = 0.75 if quick else 1.5
    servers = _start_servers(processes, secret)
    workers: list[Child] = []
    try:
        workers = _workers(servers, subs, token)
        publisher = servers[0][0]
        count = 20
        lost = 0
        for _ in range(6):  # warm-ups: grow until a run lasts a third of the target
            r = _run(publisher, workers, subs, count)
            lost += r["lost"]
            if r["elapsed"] >= target / 3:
                break
            count = min(20000, count * 3)
        count = max(count, int(r["rate"] * target / subs))
        best: dict[str, Any] = r
        for _ in range(2 if quick else 3):
            r = _run(publisher, workers, subs, count)
            lost += r["lost"]
            if r["rate"] > best["rate"]:
                best = r
        return {"rate": best["rate"], "lost": lost, "count": count}
    finally:
        for w in workers:
            with contextlib.suppress(ChildError):
                w.send(cmd="close")
            w.stop(5.0)
        for child, _ in servers:
            child.stop(5.0, {"cmd": "stop"})


def main() -> None:
    quick = "--quick" in sys.argv[1:] or os.environ.get("WSE_BENCH_QUICK", "") not in ("", "0")
    secret = os.urandom(32).hex().encode()
    token = make_token(secret)
    t0 = time.monotonic()
    one = measure(1, secret, token, quick)
    two = measure(2, secret, token, quick)
    ratio = two["rate"] / one["rate"] if one["rate"] else 0.0
    size = len(publish_text())
    print(f"fan-out to {SUBSCRIBERS} subscribers, {size}-byte event, {os.cpu_count()} cores")
    print(f"{'setup':<34}{'deliveries/s':>14}{'lost':>8}")
    print(f"{'1 process (all subscribers)':<34}{one['rate']:>14,.0f}{one['lost']:>8}")
    print(f"{'2 processes (cluster, half each)':<34}{two['rate']:>14,.0f}{two['lost']:>8}")
    met = "met" if ratio >= TARGET else "NOT met"
    print(f"ratio 2/1: {ratio:.2f}x (target >= {TARGET}x: {met}); {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    if "--serve" in sys.argv:
        sys.exit(serve(sys.argv))
    main()

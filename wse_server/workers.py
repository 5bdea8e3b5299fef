"""``python -m wse_server --workers N``: N server processes on one port, one cluster (Linux).

One Python process runs one event loop and, with the GIL, uses about one core. To use more,
the supervisor (:func:`supervise`) starts N copies of the same command line, each with the
hidden ``--worker-index i``. Every worker binds the same WebSocket port with SO_REUSEPORT,
so the kernel spreads new connections over them, and the workers join one cluster mesh on
loopback (spec/CLUSTER.md), so ``broadcast()`` reaches the subscribers of every worker.

The supervisor forwards SIGINT/SIGTERM to the workers by PID and waits for them. When a
worker dies on its own, the supervisor logs it and stops the others: no restart loop (a
process manager such as systemd is better placed to restart the whole group).

SO_REUSEPORT: each worker is a ``WSEServer(..., reuse_port=True)``. The workers' cluster
listeners bind 0.0.0.0 (``connect_cluster`` has no listen host yet): firewall them or use
cluster TLS (the certificates must then name 127.0.0.1, the dialled host).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .demo import DemoApp

if TYPE_CHECKING:
    from .server import WSEServer

__all__ = [
    "ClusterDemoApp",
    "free_port",
    "supervise",
    "worker_argv",
]

log = logging.getLogger("wse_server.workers")

WORKER_TRANSPORTS = ("asyncio", "uvloop")
STOP_GRACE = 10.0
"""Seconds the supervisor waits for the workers after SIGTERM before it kills them."""


class ClusterDemoApp(DemoApp):
    """The demo for a worker: ticks go through ``broadcast`` (the whole cluster), and only
    the publishing worker ticks, so each client gets every tick once."""

    def __init__(self, server: WSEServer, *, publisher: bool, interval: float = 1.0) -> None:
        super().__init__(server, interval=interval)
        self.publisher = publisher

    def _tick_loop(self) -> None:
        if not self.publisher:
            return
        while not self._stop.wait(self.interval):
            self.ticks += 1
            text = json.dumps({"t": "demo_tick", "p": {"n": self.ticks}}, separators=(",", ":"))
            try:
                self.server.broadcast(self.topic, text)
            except RuntimeError:  # stopped underneath us
                return


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now (bound to 0 and released; another process may take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def worker_argv(
    argv: Sequence[str], index: int, port: int, cluster_ports: Sequence[int]
) -> list[str]:
    """The command line of worker ``index``: the user's options, then the overrides (argparse
    keeps the last value of a repeated option)."""
    peers = ",".join(f"127.0.0.1:{p}" for j, p in enumerate(cluster_ports) if j != index)
    return [
        sys.executable,
        "-m",
        "wse_server",
        *argv,
        "--worker-index",
        str(index),
        "--port",
        str(port),
        "--cluster-port",
        str(cluster_ports[index]),
        "--cluster-peers",
        peers,
        "--cluster-addr",
        f"127.0.0.1:{cluster_ports[index]}",
    ]


def supervise(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run ``args.workers`` workers until a signal (exit 0) or a worker's death (exit 1)."""
    n = int(args.workers)
    if not sys.platform.startswith("linux"):
        print("error: --workers needs Linux (SO_REUSEPORT load balancing)", file=sys.stderr)
        return 2
    if args.transport not in WORKER_TRANSPORTS:
        print("error: --workers needs --transport asyncio or uvloop", file=sys.stderr)
        return 2
    if args.cluster_peers or args.cluster_seeds or args.cluster_addr:
        print(
            "error: --workers builds its own loopback cluster; "
            "--cluster-peers/--cluster-seeds/--cluster-addr are not supported with it",
            file=sys.stderr,
        )
        return 2
    port = args.port or free_port(args.host if args.host != "0.0.0.0" else "127.0.0.1")
    if args.cluster_port:
        cluster_ports = [args.cluster_port + i for i in range(n)]
    else:
        cluster_ports = [free_port() for _ in range(n)]

    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("supervisor: received %s, stopping the workers", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    procs: list[subprocess.Popen[bytes]] = []
    failed = False
    try:
        for i in range(n):
            procs.append(subprocess.Popen(worker_argv(argv, i, port, cluster_ports)))
        pids = [p.pid for p in procs]
        print(
            f"wse-py supervisor (pid {os.getpid()}): {n} workers {pids} on "
            f"ws://{args.host}:{port}/wse, cluster ports {cluster_ports}",
            flush=True,
        )
        while not stop.wait(0.2):
            dead = [(i, p) for i, p in enumerate(procs) if p.poll() is not None]
            if dead:
                for i, p in dead:
                    log.error("worker %d (pid %d) exited with %s", i, p.pid, p.returncode)
                failed = True
                break
    finally:
        _stop_all(procs)
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 1 if failed else 0


def _stop_all(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every live worker by PID, wait up to STOP_GRACE, then SIGKILL."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("worker pid %d did not stop in %.0f s; killing it", p.pid, STOP_GRACE)
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
            p.wait(5)

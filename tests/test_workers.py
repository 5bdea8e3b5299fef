"""``python -m wse_server --workers 2``: one port, two processes, one cluster (Linux only)."""

from __future__ import annotations

import asyncio
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jwt
import pytest
from wse_client import AsyncWSEClient, ReconnectConfig

from wse_server.__main__ import DEV_SECRET, main
from wse_server.workers import free_port, worker_argv

pytestmark = [pytest.mark.loopback, pytest.mark.interop]

ROOT = Path(__file__).resolve().parent.parent
MAX_CLIENTS = 16
TICKS = 3


class Lines:
    """Lines of one pipe, collected by a thread."""

    def __init__(self, stream: object) -> None:
        self.queue: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self.queue.put(line.rstrip("\n"))

    def collect(self) -> list[str]:
        while True:
            try:
                self.seen.append(self.queue.get_nowait())
            except queue.Empty:
                return self.seen

    def wait(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            for line in self.collect():
                match = re.search(pattern, line)
                if match:
                    self.seen.remove(line)
                    return match
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no line matching {pattern!r}")
            try:
                self.seen.append(self.queue.get(timeout=min(left, 0.2)))
            except queue.Empty:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_worker_argv_overrides_come_last() -> None:
    argv = worker_argv(["--demo", "--port", "1"], 1, 5000, [7000, 7001, 7002])
    tail = argv[argv.index("--demo") + 3 :]
    assert tail == [
        "--worker-index",
        "1",
        "--port",
        "5000",
        "--cluster-port",
        "7001",
        "--cluster-peers",
        "127.0.0.1:7000,127.0.0.1:7002",
        "--cluster-addr",
        "127.0.0.1:7001",
    ]


def test_cli_option_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--workers", "2", "--transport", "threading"]) == 2
    assert "asyncio or uvloop" in capsys.readouterr().err
    assert main(["--workers", "2", "--cluster-peers", "127.0.0.1:1"]) == 2
    assert "loopback cluster" in capsys.readouterr().err
    assert main(["--cluster-port", "0", "--cluster-tls-cert", "c.pem"]) == 2
    assert "all or none" in capsys.readouterr().err


def test_two_workers_share_port_and_demo_ticks() -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "WSE_JWT_SECRET"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "wse_server",
            "--workers",
            "2",
            "--demo",
            "--dev",
            "--port",
            str(port),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = Lines(proc.stdout), Lines(proc.stderr)
        pids = {int(out.wait(rf"worker {i} \(pid (\d+)\) listening", 15).group(1)) for i in (0, 1)}
        assert len(pids) == 2
        token = jwt.encode({"sub": "w", "exp": int(time.time()) + 600}, DEV_SECRET)
        url = f"ws://127.0.0.1:{port}/wse"

        def workers_seen() -> set[str]:
            return {
                m.group(1)
                for line in err.collect()
                if (m := re.search(r" (w\d) .*auth_connect", line))
            }

        async def run() -> list[list[int]]:
            clients: list[AsyncWSEClient] = []
            try:
                # SO_REUSEPORT hashes each connection to one worker: connect until both have one.
                while len(clients) < 4 or (len(workers_seen()) < 2 and len(clients) < MAX_CLIENTS):
                    c = AsyncWSEClient(url, token=token, reconnect=ReconnectConfig(max_attempts=0))
                    await c.connect()
                    clients.append(c)
                    await asyncio.sleep(0.05)

                async def ticks(c: AsyncWSEClient) -> list[int]:
                    got: list[int] = []
                    deadline = time.monotonic() + 10
                    while len(got) < TICKS and time.monotonic() < deadline:
                        try:
                            ev = await c.recv(timeout=max(0.01, deadline - time.monotonic()))
                        except TimeoutError:
                            break
                        if ev.type == "demo_tick":
                            got.append(ev.payload["n"])
                    return got

                return list(await asyncio.gather(*(ticks(c) for c in clients)))
            finally:
                for c in clients:
                    await c.close()

        results = asyncio.run(asyncio.wait_for(run(), 18))
        assert workers_seen() == {"w0", "w1"}, "every connection landed on one worker"
        for got in results:
            # Every client, on either worker, gets each tick of worker 0 exactly once.
            assert len(got) == TICKS and got == list(range(got[0], got[0] + TICKS)), results
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        for pid in pids:
            assert not _alive(pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_dead_worker_stops_the_others() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "wse_server", "--workers", "2", "--port", str(free_port())],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = Lines(proc.stdout), Lines(proc.stderr)
        pids = [int(out.wait(rf"worker {i} \(pid (\d+)\) listening", 15).group(1)) for i in (0, 1)]
        os.kill(pids[1], signal.SIGKILL)
        assert proc.wait(15) == 1  # no restart loop: the group stops and reports failure
        assert not _alive(pids[0]) and not _alive(pids[1])
        assert err.wait(rf"worker 1 \(pid {pids[1]}\) exited with -9", 5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)

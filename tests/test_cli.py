"""``python -m wse_server`` as a user runs it: a real subprocess on an ephemeral port."""

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
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from wse_client import AsyncWSEClient, ReconnectConfig

from wse_server.__main__ import DEV_SECRET, build_parser

pytestmark = [pytest.mark.loopback, pytest.mark.interop]

ROOT = Path(__file__).resolve().parent.parent


class ServerProcess:
    """A CLI server subprocess whose stdout lines are collected by a thread."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        full_env = {k: v for k, v in os.environ.items() if k != "WSE_JWT_SECRET"}
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wse_server", "--host", "127.0.0.1", "--port", "0", *args],
            cwd=ROOT,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.stdout: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_line(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no stdout line matching {pattern!r}; got {self.stdout}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            self.stdout.append(line)
            match = re.search(pattern, line)
            if match:
                return match

    def terminate(self, timeout: float = 10.0) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise
        assert self.proc.stderr is not None
        return code, self.proc.stderr.read()


@pytest.fixture
def spawn() -> Iterator[list[ServerProcess]]:
    procs: list[ServerProcess] = []
    yield procs
    for p in procs:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait(5)


def test_dev_demo_end_to_end(spawn: list[ServerProcess]) -> None:
    server = ServerProcess("--demo", "--dev")
    spawn.append(server)
    url = server.wait_line(r"listening on (ws://127\.0\.0\.1:\d+/wse)").group(1)
    secret = server.wait_line(r"JWT secret \(HS256, embedded\): (\S+)").group(1)
    assert secret.encode() == DEV_SECRET
    token = server.wait_line(r"Token \(sub=dev-user, valid 24 h\): (\S+)").group(1)
    claims = jwt.decode(token, DEV_SECRET, algorithms=["HS256"])
    assert claims["sub"] == "dev-user"
    assert 23 * 3600 < claims["exp"] - time.time() <= 24 * 3600
    snippet = server.wait_line(r"^python -c .*SyncWSEClient.*").group(0)
    assert url in snippet and token in snippet

    async def client() -> tuple[list[int], dict[str, object]]:
        ticks: list[int] = []
        async with AsyncWSEClient(url, token=token, reconnect=ReconnectConfig(max_attempts=0)) as c:
            await c.send("hello_demo", {"greeting": "hi", "n": 3})
            echo: dict[str, object] = {}
            deadline = time.monotonic() + 6
            while (len(ticks) < 2 or not echo) and time.monotonic() < deadline:
                ev = await c.recv(timeout=max(0.01, deadline - time.monotonic()))
                if ev.type == "demo_tick":
                    ticks.append(ev.payload["n"])
                elif ev.type == "echo":
                    echo = ev.payload
            return ticks, echo

    ticks, echo = asyncio.run(asyncio.wait_for(client(), 20))
    assert echo == {"greeting": "hi", "n": 3}
    assert len(ticks) >= 2 and ticks == sorted(ticks) and ticks[-1] == ticks[0] + len(ticks) - 1
    code, stderr = server.terminate()
    assert code == 0, stderr
    assert "SIGTERM" in stderr and "auth_connect" in stderr


def test_secret_from_key_file_and_env_never_argv(
    spawn: list[ServerProcess], tmp_path: Path
) -> None:
    secret = b"cli-test-secret-from-a-file-0123456789"
    key_file = tmp_path / "secret.key"
    key_file.write_bytes(secret + b"\n")  # the trailing newline is not part of the secret
    for args, env in (
        (("--jwt-key-file", str(key_file)), None),
        ((), {"WSE_JWT_SECRET": secret.decode()}),
    ):
        server = ServerProcess(*args, "--jwt-issuer", "me", env=env)
        spawn.append(server)
        url = server.wait_line(r"listening on (ws://\S+)").group(1)
        good = jwt.encode({"sub": "k", "exp": int(time.time()) + 60, "iss": "me"}, secret)
        bad_iss = jwt.encode({"sub": "k", "exp": int(time.time()) + 60, "iss": "x"}, secret)

        async def outcome(token: str, url: str = url) -> bool:
            c = AsyncWSEClient(url, token=token, reconnect=ReconnectConfig(max_attempts=0))
            connecting = asyncio.create_task(c.connect())
            deadline = time.monotonic() + 5
            try:
                while time.monotonic() < deadline:
                    if c.is_ready:
                        return True
                    if c.state.value == "error":
                        return False
                    await asyncio.sleep(0.02)
                raise TimeoutError("neither ready nor rejected")
            finally:
                connecting.cancel()
                await asyncio.gather(connecting, return_exceptions=True)
                await c.disconnect()

        assert asyncio.run(outcome(good)) is True
        assert asyncio.run(outcome(bad_iss)) is False
        code, _ = server.terminate()
        assert code == 0


def test_parser_has_no_secret_option_and_lists_transports() -> None:
    parser = build_parser()
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--jwt-secret", "x"])
    assert exc.value.code == 2
    args = parser.parse_args([])
    assert (args.host, args.port, args.transport, args.max_connections) == (
        "127.0.0.1",
        5006,
        "asyncio",
        1000,
    )
    assert parser.parse_args(["--transport", "uvloop"]).transport == "uvloop"
    with pytest.raises(SystemExit):
        parser.parse_args(["--transport", "nope"])


def test_bind_failure_exits_2(spawn: list[ServerProcess]) -> None:
    first = ServerProcess()
    spawn.append(first)
    port = first.wait_line(r"listening on ws://127\.0\.0\.1:(\d+)").group(1)
    second = subprocess.run(
        [sys.executable, "-m", "wse_server", "--host", "127.0.0.1", "--port", port],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 2
    assert "error:" in second.stderr
    code, _ = first.terminate()
    assert code == 0

"""Fixtures: our server with the reference app, and runners for both kit modes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from wse_server import WSEServer
from wse_server.conformance import (
    CLIENT_SCENARIOS,
    SERVER_SCENARIOS,
    ClientModeContext,
    ReferenceApp,
    Result,
    ServerModeContext,
    run_suite,
    select,
)

SECRET = b"conformance-kit-test-secret-0123456789abcdef"
FIXTURES = Path(__file__).parent / "fixtures"
HARNESS = [sys.executable, str(FIXTURES / "wse_client_harness.py"), "{url}", "--token", "{token}"]
BROKEN_CLIENT = [sys.executable, str(FIXTURES / "broken_client.py")]


def reference_server_kwargs() -> dict[str, Any]:
    """How the tests (and `serve-reference-app`) configure WSEServer for the kit."""
    return {
        "jwt_secret": SECRET,
        "rate_limit_capacity": 100,
        "rate_limit_refill": 10,
        "ping_interval": 1.0,
        "idle_timeout": 30,
        "recovery_enabled": True,
        "presence_enabled": True,
    }


TRANSPORTS = ("asyncio", "uvloop", "threading", "gevent")

# gevent runs in its own monkey-patched process so the pytest process never imports it.
_GEVENT_HOST = (
    "from gevent import monkey; monkey.patch_all()\n"
    "import sys\n"
    "from wse_server.conformance.__main__ import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


class RemoteReference:
    """The reference app in a subprocess; only its port is needed by the tests."""

    def __init__(self, transport: str) -> None:
        kw = reference_server_kwargs()
        argv = [
            "serve-reference-app",
            "--port", "0",
            "--jwt-secret", SECRET.decode(),
            "--rate-limit-capacity", str(kw["rate_limit_capacity"]),
            "--rate-limit-refill", str(kw["rate_limit_refill"]),
            "--ping-interval", str(kw["ping_interval"]),
            "--idle-timeout", str(kw["idle_timeout"]),
            "--transport", transport,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _GEVENT_HOST, *argv],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # blocks until the app is listening (or exits)
        if "listening on" not in line:
            self.close()
            raise RuntimeError(f"reference app did not start: {line!r}")
        self.port = int(line.rsplit(":", 1)[1].split("/", 1)[0])

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="session", params=TRANSPORTS)
def reference_server(request: pytest.FixtureRequest) -> Iterator[Any]:
    """Our server running the reference app, once per transport."""
    if request.param == "gevent":
        remote = RemoteReference("gevent")
        yield remote
        remote.close()
        return
    server = WSEServer("127.0.0.1", 0, transport=request.param, **reference_server_kwargs())
    app = ReferenceApp(server, presence_enabled=True)
    server.start()
    app.start()
    yield server
    app.stop()
    server.stop()


def url_of(port: int) -> str:
    return f"ws://127.0.0.1:{port}/wse"


async def server_kit(
    url: str, *, only: Sequence[str] = (), skip: Sequence[str] = (), **kwargs: Any
) -> dict[str, Result]:
    kwargs.setdefault("jwt_secret", SECRET)
    ctx = ServerModeContext(url, **kwargs)
    await ctx.setup()
    results = await run_suite(select(SERVER_SCENARIOS, only, skip), ctx)
    return {r.scenario.id: r for r in results}


def run_server_kit(url: str, **kwargs: Any) -> dict[str, Result]:
    return asyncio.run(server_kit(url, **kwargs))


def run_client_kit(
    command: Sequence[str],
    *,
    only: Sequence[str] = (),
    skip: Sequence[str] = (),
    timeout: float = 5.0,
) -> tuple[dict[str, Result], str]:
    """Start ``command`` ({url}/{token} substituted) against the reference server and run
    the client scenarios; returns the results and the client's stderr."""

    async def go(log: Any) -> dict[str, Result]:
        ctx = ClientModeContext(timeout=timeout, reconnect_timeout=10.0)
        await ctx.start()
        argv = [part.format(url=ctx.url, token=ctx.token) for part in command]
        proc = subprocess.Popen(argv, stdout=log, stderr=log)
        try:
            await ctx.wait_first(30.0)
            results = await run_suite(select(CLIENT_SCENARIOS, only, skip), ctx)
        finally:
            await ctx.finish()
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        return {r.scenario.id: r for r in results}

    with tempfile.TemporaryFile() as log:
        results = asyncio.run(go(log))
        log.seek(0)
        return results, log.read().decode("utf-8", "replace")


def outcomes(results: dict[str, Result]) -> dict[str, str]:
    return {sid: r.outcome.value for sid, r in results.items()}


def explain(results: dict[str, Result]) -> str:
    return "\n".join(
        f"{sid}: {r.outcome.value}: {r.details}"
        for sid, r in results.items()
        if r.outcome.value != "pass"
    )

"""Server mode against wse-py's own server: it passes every scenario it supports."""

from __future__ import annotations

import asyncio
import time

import pytest

from wse_proto.auth import encode_token
from wse_server import WSEServer
from wse_server.conformance import SERVER_SCENARIOS, Outcome, Result

from .conftest import SECRET, explain, outcomes, run_server_kit, server_kit, url_of
from .fixtures.broken_server import BreakingProxy

pytestmark = [pytest.mark.loopback]

FEATURE_SCENARIOS = {
    "recovery-stamps",
    "recovery-replay",
    "recovery-outcomes",
    "presence-join-leave",
    "presence-update-query",
}
"""Recovery and presence scenarios: the reference server enables both, so they must pass."""

KNOWN_WARNINGS: dict[str, str] = {}
"""Scenarios our server may pass with a recorded warning (none at present)."""


def test_every_supported_scenario_passes(reference_server: WSEServer) -> None:
    results = run_server_kit(url_of(reference_server.port))
    assert set(results) == {s.id for s in SERVER_SCENARIOS}
    assert set(results) >= FEATURE_SCENARIOS  # present, and below: each one passes
    for sid, result in results.items():
        if sid in KNOWN_WARNINGS:
            assert result.outcome in (Outcome.PASS, Outcome.WARN), explain(results)
            if result.outcome is Outcome.WARN:
                assert KNOWN_WARNINGS[sid] in " ".join(result.details)
        else:
            assert result.outcome is Outcome.PASS, explain(results)


def test_token_only_and_no_control(reference_server: WSEServer) -> None:
    """Without a secret the token-minting scenarios skip; --no-control skips the app ones."""
    good = encode_token({"sub": "conformance-token-user", "exp": int(time.time()) + 600}, SECRET)
    results = run_server_kit(
        url_of(reference_server.port),
        token=good,
        jwt_secret=None,
        control=False,
        skip=["server-ping", "malformed-frames", "oversized-message"],
    )
    needs = {s.id: s.needs for s in SERVER_SCENARIOS}
    for sid, result in results.items():
        if "jwt-secret" in needs[sid] or "control" in needs[sid]:
            assert result.outcome is Outcome.SKIP, explain(results)
        else:
            assert result.outcome is Outcome.PASS, explain(results)
    assert "needs --jwt-secret" in results["auth-missing-sub"].details[0]


def test_server_without_control_protocol() -> None:
    """A server whose application ignores control messages: those scenarios are unsupported."""
    server = WSEServer("127.0.0.1", 0, jwt_secret=SECRET)
    server.enable_drain_mode()  # nobody drains: control requests are never answered
    server.start()
    try:
        results = run_server_kit(
            url_of(server.port),
            only=["server-hello", "send-event-dedup", "recovery-stamps"],
            timeout=1.0,
        )
    finally:
        server.stop()
    assert outcomes(results) == {
        "server-hello": "pass",
        "send-event-dedup": "unsupported",
        "recovery-stamps": "unsupported",
    }
    assert "control protocol" in results["send-event-dedup"].details[0]


BROKEN = [
    ("sorted-pong", "ping-pong-literal", "not the literal form"),
    ("pong-no-timestamps", "ping-pong-literal", "not the literal form"),
    ("auth-close-1008", "auth-required", "Close status 1008, expected 4401"),
    ("no-category", "broadcast-category", 'expected \'{"c":"U"'),
]


@pytest.mark.parametrize(("mode", "scenario", "message"), BROKEN)
def test_broken_server_is_caught(
    reference_server: WSEServer, mode: str, scenario: str, message: str
) -> None:
    async def go() -> tuple[dict[str, Result], dict[str, Result]]:
        results = {}
        for m in ("passthrough", mode):
            proxy = BreakingProxy(("127.0.0.1", reference_server.port), m)
            await proxy.start()
            try:
                results[m] = await server_kit(url_of(proxy.port), only=[scenario])
            finally:
                await proxy.stop()
        return results["passthrough"], results[mode]

    clean, broken = asyncio.run(go())
    assert clean[scenario].outcome is Outcome.PASS, clean[scenario].details
    result = broken[scenario]
    assert result.outcome is Outcome.FAIL, result.details
    assert message in result.details[0], result.details

"""The recovery and presence scenarios against a small server that implements them.

WSEServer passes them too (test_server_mode.py); this checks the scenarios themselves:
they pass against an independent spec-following server and fail against defects.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from wse_proto.auth import encode_token
from wse_server.conformance import Outcome, Result

from .conftest import SECRET, explain, server_kit, url_of
from .fixtures.feature_server import FeatureServer

pytestmark = [pytest.mark.loopback]

FEATURES = [
    "recovery-stamps",
    "recovery-replay",
    "recovery-outcomes",
    "presence-join-leave",
    "presence-update-query",
]


def run(defect: str | None = None, **kwargs: object) -> dict[str, Result]:
    async def go() -> dict[str, Result]:
        server = FeatureServer(SECRET, defect=defect)
        await server.start()
        try:
            return await server_kit(url_of(server.port), only=FEATURES, **kwargs)  # type: ignore[arg-type]
        finally:
            await server.stop()

    return asyncio.run(go())


def test_feature_scenarios_pass_against_a_conforming_server() -> None:
    results = run()
    assert {sid: r.outcome for sid, r in results.items()} == dict.fromkeys(
        FEATURES, Outcome.PASS
    ), explain(results)


def test_single_token_presence_path() -> None:
    token = encode_token({"sub": "only-user", "exp": int(time.time()) + 600}, SECRET)
    results = run(token=token, jwt_secret=None)
    assert results["presence-join-leave"].outcome is Outcome.PASS, explain(results)
    assert "one token only" in " ".join(results["presence-join-leave"].details)


@pytest.mark.parametrize(
    ("defect", "scenario", "message"),
    [
        ("no-replay", "recovery-replay", "no replayed and live frames"),
        ("presence-no-leave", "presence-join-leave", "no presence_leave"),
    ],
)
def test_feature_defects_are_caught(defect: str, scenario: str, message: str) -> None:
    results = run(defect, timeout=1.0)
    assert results[scenario].outcome is Outcome.FAIL, explain(results)
    assert message in results[scenario].details[0], results[scenario].details

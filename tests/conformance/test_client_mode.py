"""Client mode against the published wse-client 2.5.1 (through the echo harness) and
against deliberately broken variants of it.

The published client's failures are findings, recorded in spec/CONFORMANCE.md; the test
pins the recorded result so any change (in the client, the kit or the spec) is noticed.
"""

from __future__ import annotations

import pytest

from wse_server.conformance import CLIENT_SCENARIOS, Outcome

from .conftest import BROKEN_CLIENT, HARNESS, explain, outcomes, run_client_kit

pytestmark = [pytest.mark.loopback, pytest.mark.interop]

WSE_CLIENT_2_5_1 = {
    "handshake-upgrade": "pass",
    "auth-token-sent": "pass",
    "waits-for-server-ready": "pass",
    "client-hello-fields": "pass",
    "pong-reply": "pass",
    "decode-text": "pass",
    "decode-binary-json": "pass",
    "decode-zlib": "pass",
    "decode-msgpack": "pass",
    "decode-batch": "pass",
    # A truncated M: frame and a C: frame whose content is not UTF-8 raise inside its
    # receive loop: it abandons the connection (without closing it) and reconnects.
    "decode-robustness": "fail",
    "encryption-key-exchange": "pass",
    "encryption-decrypt": "pass",
    "encryption-client-frames": "pass",
    "recovery-dedup": "pass",
    "recovery-gap": "pass",
    # retry_after is only logged: the next message goes out at once (a SHOULD).
    "rate-limited-retry-after": "warn",
    "recovery-resubscribe": "pass",
    "reconnect-backoff": "pass",
    # websockets accepts a non-minimal length encoding (PROTOCOL §2.6 rejects it; a SHOULD).
    "malformed-server-frames": "warn",
    # websockets reports a status-less Close (1005) as a normal closure, and wse-client
    # does not reconnect after one, although PROTOCOL §12 lists 1005 as "reconnect".
    "reconnect-after-statusless-close": "fail",
}


def test_published_client_recorded_results() -> None:
    results, log = run_client_kit([*HARNESS, "--encryption"])
    assert set(results) == {s.id for s in CLIENT_SCENARIOS}
    assert outcomes(results) == WSE_CLIENT_2_5_1, explain(results) + "\n" + log[-3000:]
    robustness = " ".join(results["decode-robustness"].details)
    assert "server-msg-m-truncated: the client abandoned the connection" in robustness
    assert "server-msg-c-not-utf8: the client abandoned the connection" in robustness
    assert "decode-non-minimal-length" in " ".join(results["malformed-server-frames"].details)
    assert "after RATE_LIMITED" in results["rate-limited-retry-after"].details[0]


def test_unencrypted_client_encryption_unsupported() -> None:
    results, log = run_client_kit(HARNESS, only=["encryption-*", "pong-reply"])
    assert outcomes(results) == {
        "pong-reply": "pass",
        "encryption-key-exchange": "unsupported",
        "encryption-decrypt": "unsupported",
        "encryption-client-frames": "unsupported",
    }, explain(results) + log[-2000:]
    assert "did not ask for encryption" in results["encryption-decrypt"].details[0]


@pytest.mark.parametrize(
    ("mode", "caught", "message"),
    [
        ("hkdf", ["encryption-decrypt", "encryption-client-frames"], "failed authentication"),
        ("no-dedup", ["recovery-dedup", "recovery-gap"], "delivered"),
        ("no-pong", ["pong-reply"], "no PONG"),
    ],
)
def test_broken_client_is_caught(mode: str, caught: list[str], message: str) -> None:
    command = [*BROKEN_CLIENT, "--break", mode, *HARNESS[2:], "--encryption"]
    results, log = run_client_kit(command, only=caught, timeout=1.5)
    for sid in caught:
        assert results[sid].outcome is Outcome.FAIL, explain(results) + log[-2000:]
    assert message in results[caught[0]].details[0], results[caught[0]].details

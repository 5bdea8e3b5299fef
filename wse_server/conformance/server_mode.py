"""Server mode: the kit is the client and checks a server under test (``server URL``).

Scenarios are listed in :data:`SERVER_SCENARIOS` in run order. Those that need the
application to act use the control protocol (:mod:`.control`) and are skipped with
``--no-control`` or reported ``unsupported`` when the server does not answer it.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import time
import zlib
from collections.abc import Iterable
from typing import Any

from wse_proto import auth
from wse_proto.envelope import message_category
from wse_proto.ws import BINARY, CONTINUATION, PING, PONG, TEXT

from . import vectors
from .checks import (
    TS_RE,
    UUID7_RE,
    describe,
    is_sorted_compact,
    is_std_b64_point,
    json_equal,
    strip_stamp,
    token_subject,
)
from .core import Fail, Outcome, Scenario, ScenarioContext, Skip, Unsupported, scenario_decorator
from .wsclient import KitConnection, ServerFrame, Target

__all__ = ["SERVER_SCENARIOS", "ServerModeContext"]

SERVER_SCENARIOS: list[Scenario] = []

PONG_RE = re.compile(
    r'^\{"c":"WSE","t":"PONG","p":\{"client_timestamp":(-?\d+),'
    r'"server_timestamp":(-?\d+),"latency":(\d+)\},"v":1\}$'
)
SERVER_PING_RE = re.compile(r'^\{"c":"WSE","t":"ping","p":\{"server_time":"([^"]*)"\}\}$')
KEX_FAILED_RE = re.compile(
    r'^\{"c":"WSE","t":"error","p":\{"code":"KEY_EXCHANGE_FAILED",'
    r'"message":"ECDH key exchange failed: (.*)","recoverable":true\}\}$'
)
WARNING_RE = re.compile(
    r'^\{"c":"WSE","t":"rate_limit_warning","p":\{"current_rate":(\d+),"limit":(\d+),'
    r'"remaining":(\d+),"retry_after":1\.0\},"v":1\}$'
)
READY_FEATURES = (
    "batching",
    "circuit_breaker",
    "compression",
    "encryption",
    "priority_queue",
    "recovery",
    "rust_jwt",
    "rust_transport",
)
HELLO_FEATURES = (
    "batching",
    "cluster",
    "compression",
    "encryption",
    "msgpack",
    "priority_queue",
    "recovery",
)
MAX_RATE_CAPACITY = 5000
MAX_MESSAGE_PROBE = 16 * 1024 * 1024


scenario = scenario_decorator(SERVER_SCENARIOS, default_timeout=30.0)


def _tamper(token: str) -> str:
    """The same token with one signature character changed (signature no longer valid)."""
    head, _, sig = token.rpartition(".")
    if len(sig) < 4:
        return token + "x"
    i = len(sig) // 2
    swapped = "A" if sig[i] != "A" else "B"
    return f"{head}.{sig[:i]}{swapped}{sig[i + 1 :]}"


class ServerModeContext(ScenarioContext):
    """Connections to the server under test, tokens, and what the control probe found."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        jwt_secret: bytes | str | None = None,
        jwt_algorithm: str = "HS256",
        control: bool = True,
        timeout: float = 5.0,
        max_wait: float = 10.0,
    ) -> None:
        super().__init__()
        if token is None and jwt_secret is None:
            raise ValueError("give a token or a JWT secret")
        self.url = url
        self.target = Target.parse(url)
        self.jwt_secret = jwt_secret
        self.jwt_algorithm = jwt_algorithm
        self.timeout = timeout
        self.max_wait = max_wait
        self.control_enabled = control
        self._token = token
        self._tokens: dict[str, str] = {}
        self._conns: list[KitConnection] = []
        self._serial = 0
        self.run_id = os.urandom(3).hex()
        # What the probe connection learned (set by setup()).
        self.control_available = False
        self.control_problem = "the control probe did not run"
        self.app_features: dict[str, Any] = {}
        self.ready_payload: dict[str, Any] = {}
        self.hello_payload: dict[str, Any] = {}

    # ------------------------------------------------------------------ identities

    def token(self, user: str = "alice") -> str:
        """A valid token for ``user`` (minted with the secret) or the one given."""
        if self.jwt_secret is None:
            assert self._token is not None
            return self._token
        if user not in self._tokens:
            claims = {"sub": f"conformance-{user}", "exp": int(time.time()) + 3600}
            self._tokens[user] = auth.encode_token(claims, self.jwt_secret, self.jwt_algorithm)
        return self._tokens[user]

    def user_id(self, user: str = "alice") -> str | None:
        """The ``sub`` the server should report for ``user``'s token."""
        return token_subject(self.token(user))

    def mint(self, claims: dict[str, Any]) -> str:
        if self.jwt_secret is None:
            raise Skip("needs --jwt-secret to mint tokens")
        return auth.encode_token(claims, self.jwt_secret, self.jwt_algorithm)

    @property
    def distinct_users(self) -> bool:
        return self.jwt_secret is not None

    def topic(self, name: str) -> str:
        """A topic name unique to this run (servers may keep history between runs)."""
        return f"conformance.{self.run_id}.{name}"

    # ------------------------------------------------------------------ connections

    async def connect(
        self,
        *,
        user: str = "alice",
        token: str | bool | None = True,
        headers: Iterable[tuple[str, str]] = (),
        encryption: bool = False,
        msgpack: bool = False,
        path: str | None = None,
        query_params: bool = True,
        ready: bool = True,
        hello: bool = True,
    ) -> KitConnection:
        """Open a connection; by default authenticated and past server_ready/server_hello.

        ``token=True`` uses ``user``'s token as cookie and bearer header (like wse-client);
        ``token=None``/``False`` sends none; a string sends that token.
        """
        self._serial += 1
        tok: str | None
        if token is True:
            tok = self.token(user)
        elif isinstance(token, str):
            tok = token
        else:
            tok = None
        conn = KitConnection(
            self.target,
            path=path,
            token=tok,
            headers=headers,
            encryption=encryption,
            msgpack=msgpack,
            query_params=query_params,
            timeout=self.timeout,
            label=f"conn{self._serial}",
        )
        self._conns.append(conn)
        await conn.open()
        if ready:
            await conn.wait_ready(hello=hello)
        return conn

    async def setup(self) -> None:
        """Learn the server's features and whether it speaks the control protocol."""
        conn = await self.connect()
        self.ready_payload = conn.ready or {}
        hello = conn.hello
        self.hello_payload = hello.payload if hello is not None else {}
        if self.control_enabled:
            try:
                reply = await conn.control("hello", timeout=min(self.timeout, 3.0))
            except (Fail, Unsupported) as exc:
                self.control_problem = (
                    "not supported by the server under test: no answer to the control "
                    f"protocol ({exc})"
                )
            else:
                self.control_available = True
                features = reply.get("features")
                self.app_features = features if isinstance(features, dict) else {}
        await self._close_all()

    @property
    def server_recovery(self) -> bool:
        details = self.ready_payload.get("details")
        features = details.get("features") if isinstance(details, dict) else None
        return bool(isinstance(features, dict) and features.get("recovery") is True)

    def precheck(self, scenario: Scenario) -> tuple[Outcome, str] | None:
        needs = scenario.needs
        if "jwt-secret" in needs and self.jwt_secret is None:
            return Outcome.SKIP, "needs --jwt-secret (the kit must mint special tokens)"
        if "control" in needs:
            if not self.control_enabled:
                return Outcome.SKIP, "needs the control protocol (--no-control given)"
            if not self.control_available:
                return Outcome.UNSUPPORTED, self.control_problem
        if "recovery" in needs:
            if not self.server_recovery:
                return Outcome.UNSUPPORTED, (
                    "not supported by the server under test: server_ready announces "
                    "features.recovery:false"
                )
            if not self.app_features.get("recovery"):
                return Outcome.UNSUPPORTED, (
                    "not supported by the server under test: its control application "
                    "cannot request recovery"
                )
        if "presence" in needs and not self.app_features.get("presence"):
            return Outcome.UNSUPPORTED, (
                "not supported by the server under test: presence is not enabled or not built"
            )
        return None

    async def end(self, scenario: Scenario) -> list[str]:
        problems = [f"{c.label}: {c.violation}" for c in self._conns if c.violation]
        await self._close_all()
        return problems

    async def _close_all(self) -> None:
        conns, self._conns = self._conns, []
        for conn in conns:
            await conn.aclose()

    # ------------------------------------------------------------------ helpers

    def limits(self) -> dict[str, Any]:
        limits = self.hello_payload.get("limits")
        return limits if isinstance(limits, dict) else {}

    async def auth_outcome(
        self, *, token: str | bool | None = None, headers: Iterable[tuple[str, str]] = ()
    ) -> tuple[KitConnection, dict[str, Any] | None]:
        """Connect and return the connection and its ``error`` frame (None when ready)."""
        conn = await self.connect(token=token, headers=headers, ready=False)

        def decided() -> bool:
            return conn.ready is not None or conn.eof or conn.closed_event is not None

        await conn.wait(decided, "server_ready or an error and Close")
        if conn.ready is not None:
            return conn, None
        errors = [f.json for f in conn.frames if f.opcode == TEXT and isinstance(f.json, dict)]
        return conn, errors[0] if errors else {}


# ======================================================================================
# Handshake and authentication (PROTOCOL §2, §3)
# ======================================================================================


@scenario(
    "handshake-101",
    "§2.4",
    "the upgrade is answered 101 with a valid accept key, declining offered extensions",
)
async def handshake_101(ctx: ServerModeContext) -> None:
    conn = await ctx.connect(
        headers=[
            ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits"),
            ("Sec-WebSocket-Protocol", "wse"),
        ]
    )
    ctx.must(conn.status == 101, f"expected HTTP 101, got {conn.status}")
    names = [name for name, _ in conn.response_headers]
    ctx.must("sec-websocket-extensions" not in names, "the server selected an extension")
    ctx.must("sec-websocket-protocol" not in names, "the server selected a subprotocol")
    ctx.should(
        names == ["connection", "upgrade", "sec-websocket-accept"],
        f"the 101 carries exactly connection, upgrade, sec-websocket-accept (got {names})",
    )


@scenario("handshake-any-path", "§2.3", "every request path upgrades; the path is not checked")
async def handshake_any_path(ctx: ServerModeContext) -> None:
    for path in ("/", "/x/y", "/wse?unrelated=1&client_version=9"):
        conn = await ctx.connect(path=path, query_params=False)
        ctx.must(conn.ready is not None, f"no server_ready on path {path!r}")


async def _expect_auth_error(
    ctx: ServerModeContext,
    conn: KitConnection,
    error: dict[str, Any] | None,
    code: str,
    message: str,
) -> None:
    """PROTOCOL §3.5 / K4: 101, one error frame, Close 4401, TCP closed."""
    ctx.must(error is not None, f"expected {code}, but the connection became ready")
    assert error is not None
    ctx.must(conn.status == 101, f"authentication failures come after 101 (got HTTP {conn.status})")
    closed, close_code, reason = await conn.expect_closed()
    ctx.must(closed, "no Close frame after the error frame")
    texts = [f for f in conn.frames if f.opcode in (TEXT, BINARY)]
    ctx.must(len(texts) == 1, f"exactly one data frame before Close, got {len(texts)}")
    frame = texts[0]
    ctx.must(frame.opcode == TEXT, "the error frame is a text frame")
    raw_p = error.get("p")
    p: dict[str, Any] = raw_p if isinstance(raw_p, dict) else {}
    ctx.must(
        error.get("t") == "error" and error.get("c") == "WSE",
        f"not an error envelope: {describe(error)}",
    )
    ctx.must(p.get("code") == code, f"p.code {p.get('code')!r}, expected {code!r}")
    ctx.must(p.get("message") == message, f"p.message {p.get('message')!r}, expected {message!r}")
    ctx.must(
        isinstance(p.get("timestamp"), str) and TS_RE.match(p["timestamp"]),
        "p.timestamp in ts format",
    )
    ctx.must(not {"id", "seq", "ts"} & error.keys(), "the auth error envelope has no id, seq or ts")
    ctx.must(error.get("v") == 1, "v is 1")
    ctx.must(is_sorted_compact(frame.text or ""), f"keys sorted, compact (K1): {frame.text}")
    # The captured frames in envelope.json, with this frame's timestamp.
    for case in vectors.cases("envelope", "frame"):
        args = case["input"]["args"]
        if case["input"]["builder"] == "auth_error" and args["message"] == message:
            expected = json.loads(case["expected"]["text"])
            expected["p"]["timestamp"] = p.get("timestamp")
            ctx.must(json_equal(expected, error), f"differs from vector {case['id']}")
            break
    ctx.must(close_code == 4401, f"Close status {close_code}, expected 4401")
    ctx.must(reason == "Authentication failed", f"Close reason {reason!r}")
    await conn.expect_eof()


@scenario(
    "auth-required",
    "§3.5",
    "no token: 101, AUTH_REQUIRED error frame, Close 4401, TCP closed",
    vectors=("envelope:frame",),
)
async def auth_required(ctx: ServerModeContext) -> None:
    conn, error = await ctx.auth_outcome(token=None)
    await _expect_auth_error(
        ctx, conn, error, "AUTH_REQUIRED", "No JWT cookie or Authorization header"
    )


@scenario(
    "auth-failed",
    "§3.3, §3.5",
    "an invalid token (bad signature, garbage) gets AUTH_FAILED and Close 4401",
    vectors=("envelope:frame",),
)
async def auth_failed(ctx: ServerModeContext) -> None:
    for label, token in (("tampered signature", _tamper(ctx.token())), ("garbage", "not-a-jwt")):
        conn, error = await ctx.auth_outcome(token=token)
        try:
            await _expect_auth_error(ctx, conn, error, "AUTH_FAILED", "Authentication failed")
        except Fail as exc:
            raise Fail(f"{label}: {exc}") from None


@scenario(
    "auth-failed-claims",
    "§3.3",
    "expired, wrongly signed and alg-none tokens fail; leeway is 30 s",
    needs=("jwt-secret",),
)
async def auth_failed_claims(ctx: ServerModeContext) -> None:
    now = int(time.time())
    other = base64.b64encode(os.urandom(33)).decode()
    cases = [
        ("expired 120 s ago", ctx.mint({"sub": "conformance-x", "exp": now - 120}), False),
        (
            "expired 5 s ago (within the 30 s leeway)",
            ctx.mint({"sub": "conformance-x", "exp": now - 5}),
            True,
        ),
        (
            "not before in 120 s",
            ctx.mint({"sub": "conformance-x", "exp": now + 600, "nbf": now + 120}),
            False,
        ),
        ("without exp", ctx.mint({"sub": "conformance-x"}), False),
        (
            "signed with another key",
            auth.encode_token({"sub": "x", "exp": now + 600}, other),
            False,
        ),
    ]
    head = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    body = (
        base64.urlsafe_b64encode(json.dumps({"sub": "x", "exp": now + 600}).encode())
        .rstrip(b"=")
        .decode()
    )
    cases.append(("alg none", f"{head}.{body}.", False))
    for label, token, accepted in cases:
        conn, error = await ctx.auth_outcome(token=token)
        if accepted:
            ctx.must(error is None, f"{label}: refused ({conn.describe_end()})")
            continue
        try:
            await _expect_auth_error(ctx, conn, error, "AUTH_FAILED", "Authentication failed")
        except Fail as exc:
            raise Fail(f"{label}: {exc}") from None


@scenario(
    "auth-missing-sub",
    "§3.3, §3.5",
    "a valid token without sub gets AUTH_FAILED 'Token missing user ID'",
    needs=("jwt-secret",),
    vectors=("envelope:frame",),
)
async def auth_missing_sub(ctx: ServerModeContext) -> None:
    for claims in ({}, {"sub": ""}, {"sub": 5}):
        token = ctx.mint({"exp": int(time.time()) + 600, **claims})
        conn, error = await ctx.auth_outcome(token=token)
        try:
            await _expect_auth_error(ctx, conn, error, "AUTH_FAILED", "Token missing user ID")
        except Fail as exc:
            raise Fail(f"claims {claims}: {exc}") from None


@scenario(
    "auth-token-sources",
    "§3.2",
    "token from cookie or bearer header; the cookie wins; 'null' cookies are skipped",
)
async def auth_token_sources(ctx: ServerModeContext) -> None:
    good, bad = ctx.token(), _tamper(ctx.token())

    def both(cookie: str, authorization: str) -> list[tuple[str, str]]:
        return [("Cookie", cookie), ("Authorization", authorization)]

    cases: list[tuple[str, list[tuple[str, str]], str | None]] = [
        ("cookie only", [("Cookie", f"access_token={good}")], None),
        ("cookie among others", [("Cookie", f"theme=dark; access_token={good} ; x=1")], None),
        ("bearer header only", [("Authorization", f"Bearer {good}")], None),
        ("lowercase bearer", [("Authorization", f"bearer {good}")], None),
        ("valid cookie, bad bearer", both(f"access_token={good}", f"Bearer {bad}"), None),
        ("bad cookie wins", both(f"access_token={bad}", f"Bearer {good}"), "AUTH_FAILED"),
        ("cookie 'null' skipped", both("access_token=null", f"Bearer {good}"), None),
        ("other cookie, 'Token'", both(f"my_token={good}", f"Token {good}"), "AUTH_REQUIRED"),
    ]
    for label, headers, expected in cases:
        conn, error = await ctx.auth_outcome(token=None, headers=headers)
        if expected is None:
            ctx.must(error is None, f"{label}: refused ({conn.describe_end()})")
        else:
            p = (error or {}).get("p") or {}
            ctx.must(
                error is not None and p.get("code") == expected,
                f"{label}: expected {expected}, got {describe(error)}",
            )


# ======================================================================================
# Transport frames (PROTOCOL §7)
# ======================================================================================


def _first_data_frame(conn: KitConnection) -> ServerFrame | None:
    for frame in conn.frames:
        if frame.opcode in (TEXT, BINARY):
            return frame
    return None


def _same_shape(expected: Any, actual: Any) -> bool:
    """Same keys at every object level (values free)."""
    if isinstance(expected, dict):
        return (
            isinstance(actual, dict)
            and expected.keys() == actual.keys()
            and all(_same_shape(expected[k], actual[k]) for k in expected)
        )
    return True


def _frame_vector(builder: str, case_id: str | None = None) -> dict[str, Any]:
    for case in vectors.cases("envelope", "frame"):
        if case["input"]["builder"] == builder and (case_id is None or case["id"] == case_id):
            return case
    raise Fail(f"no {builder} vector in envelope.json")


@scenario(
    "server-ready",
    "§7.2, §4.2, §4.3",
    "server_ready is the first frame: sorted compact JSON with the captured fields",
    vectors=("envelope:frame",),
)
async def server_ready(ctx: ServerModeContext) -> None:
    conn = await ctx.connect()
    frame = _first_data_frame(conn)
    ctx.must(frame is not None and frame.opcode == TEXT, "the first frame is a text frame")
    assert frame is not None
    msg = frame.json
    ctx.must(isinstance(msg, dict) and msg.get("t") == "server_ready", f"first frame: {frame.text}")
    ctx.must(is_sorted_compact(frame.text or ""), "keys sorted, compact (K1)")
    captured = json.loads(
        _frame_vector("server_ready", "frame-server-ready-capture-2")["expected"]["text"]
    )
    ctx.must(_same_shape(captured, msg), "same members at every level as the captured frame")
    ctx.must(msg["c"] == "WSE" and msg["seq"] == 1 and msg["v"] == 1, "c WSE, seq 1, v 1")
    ctx.must(
        isinstance(msg["id"], str) and UUID7_RE.match(msg["id"]), f"id is a UUIDv7: {msg['id']!r}"
    )
    ctx.must(isinstance(msg["ts"], str) and TS_RE.match(msg["ts"]), f"ts format: {msg['ts']!r}")
    details = msg["p"]["details"]
    ctx.must(details["server_time"] == msg["ts"], "details.server_time equals ts")
    cid = details["connection_id"]
    ctx.must(isinstance(cid, str) and cid, "details.connection_id is a string")
    ctx.should(UUID7_RE.match(cid), f"connection_id is a UUIDv7: {cid!r}")
    features = details["features"]
    ctx.must(
        all(type(features[k]) is bool for k in READY_FEATURES), f"boolean features: {features}"
    )
    ctx.must(features["encryption"] is False, "features.encryption is false in server_ready")
    expected_user = ctx.user_id()
    if expected_user is not None:
        ctx.must(
            details["user_id"] == expected_user,
            f"user_id {details['user_id']!r}, expected {expected_user!r}",
        )
    ctx.should(details["version"] == 1, "details.version is 1")
    ctx.should(
        msg["p"]["message"] == captured["p"]["message"]
        and features["rust_jwt"]
        and features["rust_transport"],
        "compatibility fields as captured (K5)",
    )


@scenario(
    "server-hello",
    "§7.3",
    "client_hello is answered with server_hello: features, limits, no id/ts/seq",
    vectors=("envelope:frame",),
)
async def server_hello(ctx: ServerModeContext) -> None:
    conn = await ctx.connect()
    frame, _ = await conn.expect_message("server_hello")
    ctx.must(frame.opcode == TEXT, "server_hello is a text frame")
    msg = frame.json
    ctx.must(isinstance(msg, dict), "server_hello is JSON")
    ctx.must(is_sorted_compact(frame.text or ""), "keys sorted, compact (K1)")
    captured = json.loads(
        _frame_vector("server_hello", "frame-server-hello-capture-4")["expected"]["text"]
    )
    ctx.must(_same_shape(captured, msg), f"same members as the captured frame: {frame.text}")
    p = msg["p"]
    ready = conn.ready or {}
    ctx.must(
        p["connection_id"] == ready.get("details", {}).get("connection_id"),
        "connection_id as in server_ready",
    )
    ctx.must(
        p["protocol_version"] == 1, f"protocol_version {p['protocol_version']} for a client at 1"
    )
    features = p["features"]
    ctx.must(
        all(type(features[k]) is bool for k in HELLO_FEATURES), f"boolean features: {features}"
    )
    ctx.must(
        all(features[k] for k in ("batching", "compression", "msgpack", "priority_queue")),
        "msgpack, compression, batching, priority_queue are true",
    )
    ctx.must(
        features["encryption"] is False and "encryption_public_key" not in p,
        "no encryption unless asked",
    )
    ready_recovery = ready.get("details", {}).get("features", {}).get("recovery")
    ctx.must(features["recovery"] == ready_recovery, "features.recovery as in server_ready")
    ctx.must(
        all(type(v) is int and v >= 0 for v in p["limits"].values()),
        f"integer limits: {p['limits']}",
    )
    ctx.must(
        type(p["ping_interval"]) is int and p["ping_interval"] > 0, "ping_interval in ms (integer)"
    )
    ctx.must(
        isinstance(p["server_time"], str) and TS_RE.match(p["server_time"]), "server_time format"
    )
    ctx.must(isinstance(p["server_version"], str) and p["server_version"], "server_version string")


@scenario(
    "server-hello-protocol-version",
    "§7.3",
    "server_hello.protocol_version is min(client's, 2), 1 when absent or invalid",
)
async def server_hello_version(ctx: ServerModeContext) -> None:
    conn = await ctx.connect()
    await conn.expect_message("server_hello")
    cases: list[tuple[str, Any, int]] = [
        ("5", 5, 2), ("2", 2, 2), ("0", 0, 0), ("absent", None, 1),
        ('"2"', "2", 1), ("-1", -1, 1), ("1.0", 1.0, 1),
    ]  # fmt: skip
    for label, version, expected in cases:
        p: dict[str, Any] = {"client_version": "conformance"}
        if version is not None:
            p["protocol_version"] = version
        conn.send_plain_text(json.dumps({"c": "WSE", "t": "client_hello", "p": p}))
        _, msg = await conn.expect_message(
            "server_hello", f"server_hello for protocol_version {label}"
        )
        got = msg["p"].get("protocol_version")
        ctx.must(got == expected, f"protocol_version {label} gave {got!r}, expected {expected}")


@scenario(
    "ping-pong-literal",
    "§7.4, §7.7, K2",
    'a JSON ping gets the literal PONG ({c,t,p,v} order, \'"t":"PONG"\' in the first 25 chars)',
    vectors=("envelope:ping_client_timestamp", "envelope:frame"),
)
async def ping_pong_literal(ctx: ServerModeContext) -> None:
    conn = await ctx.connect()
    sample = _frame_vector("pong", "frame-pong-capture-6")["expected"]["text"]
    ctx.must(PONG_RE.match(sample), "kit self-check: the PONG pattern matches the vector")
    cases = vectors.cases("envelope", "ping_client_timestamp")
    own = {"c": "WSE", "t": "ping", "p": {"timestamp": int(time.time() * 1000)}, "v": 1}
    cases.insert(0, {"id": "wse-client-form", "input": {"msg": own}, "expected": None})
    for case in cases:
        msg = case["input"]["msg"]
        expected_ts = (
            msg["p"]["timestamp"] if case["expected"] is None else case["expected"]["timestamp"]
        )
        conn.send_plain_text(json.dumps(msg, separators=(",", ":")))
        frame = await conn.expect(
            lambda f: f.opcode == TEXT and b'"PONG"' in f.payload, f"PONG for {case['id']}"
        )
        text = frame.text or ""
        m = PONG_RE.match(text)
        ctx.must(m, f"{case['id']}: PONG is not the literal form: {text}")
        assert m is not None
        ctx.must(
            '"t":"PONG"' in text[:25], f'{case["id"]}: \'"t":"PONG"\' not within 25 characters'
        )
        client_ts, server_ts, latency = (int(g) for g in m.groups())
        ctx.must(
            client_ts == expected_ts,
            f"{case['id']}: client_timestamp {client_ts}, expected {expected_ts}",
        )
        ctx.must(
            latency == max(0, server_ts - client_ts),
            f"{case['id']}: latency {latency} != max(0, server - client)",
        )
        ctx.should(
            abs(server_ts - time.time() * 1000) < 300_000,
            f"server_timestamp {server_ts} is wall-clock ms",
        )
    await conn.settle(0.2)
    pongs = [f for f in conn.frames if f.opcode == TEXT and b'"t":"PONG"' in f.payload]
    ctx.must(len(pongs) == len(cases), f"{len(cases)} pings answered by {len(pongs)} PONGs")


@scenario(
    "client-heartbeats-consumed",
    "§7.7",
    "client PONG/pong heartbeats are consumed silently (no reply, no error)",
)
async def client_heartbeats_consumed(ctx: ServerModeContext) -> None:
    conn = await ctx.connect()
    mark = len(conn.frames)
    now_ms = int(time.time() * 1000)
    for text in (
        json.dumps(
            {
                "c": "WSE",
                "t": "PONG",
                "p": {"server_timestamp": "x", "client_timestamp": now_ms},
                "v": 1,
            }
        ),
        json.dumps({"t": "pong"}),
    ):
        conn.send_plain_text(text)
    conn.send_plain_text(json.dumps({"t": "ping", "p": {"timestamp": 7}}))
    await conn.expect(
        lambda f: f.opcode == TEXT and b'"client_timestamp":7,' in f.payload,
        "PONG to the marker ping",
    )
    replies = [f.text for f in conn.data_frames(mark) if b'"client_timestamp":7,' not in f.payload]
    ctx.must(not replies, f"the server answered a client PONG/pong: {replies}")


@scenario(
    "server-ping",
    "§7.4, §11.6",
    "the server sends the literal ping every ping_interval (observed if short enough)",
)
async def server_ping(ctx: ServerModeContext) -> None:
    interval_ms = ctx.hello_payload.get("ping_interval")
    if type(interval_ms) is not int or interval_ms <= 0:
        raise Fail(f"server_hello.ping_interval is {interval_ms!r}")
    wait = interval_ms / 1000 * 1.5 + 1.0
    if wait > ctx.max_wait:
        raise Skip(
            f"ping_interval {interval_ms} ms is too long to observe (--max-wait {ctx.max_wait:g} s)"
        )
    conn = await ctx.connect()
    frame = await conn.expect(lambda f: f.is_server_ping, "server ping", timeout=wait)
    m = SERVER_PING_RE.match(frame.text or "")
    ctx.must(m, f"not the literal server ping: {frame.text}")
    assert m is not None
    ctx.must(TS_RE.match(m.group(1)), f"server_time format: {m.group(1)!r}")
    ctx.must(
        '"t":"ping"' in (frame.text or "")[:25], '\'"t":"ping"\' within the first 25 characters'
    )
    await conn.expect(lambda f: f.is_server_ping, "second server ping", timeout=wait)


@scenario("ws-ping", "§2.6, F3", "a WebSocket Ping is answered with a Pong echoing its payload")
async def ws_ping(ctx: ServerModeContext) -> None:
    conn = await ctx.connect()
    mark = len(conn.frames)
    conn.send_frame(PING, b"conformance-ping")
    frame = await conn.expect(lambda f: f.opcode == PONG, "Pong")
    ctx.must(frame.payload == b"conformance-ping", f"Pong payload {frame.payload!r}")
    conn.send_plain_text('{"t":"ping","p":{"timestamp":1}}')
    await conn.expect(lambda f: f.opcode == TEXT and b'"PONG"' in f.payload, "PONG after the Pong")
    pongs = [f for f in conn.frames[mark:] if f.opcode == PONG]
    ctx.should(len(pongs) == 1, f"exactly one Pong per Ping (F3), got {len(pongs)}")


@scenario("close-echo", "§2.6", "a client Close is echoed (code and reason), then TCP is closed")
async def close_echo(ctx: ServerModeContext) -> None:
    for code, reason in ((1000, "conformance"), (None, "")):
        conn = await ctx.connect()
        conn.close(code, reason)
        closed, got_code, got_reason = await conn.expect_closed()
        ctx.must(closed, f"no Close echo for {code}")
        ctx.must(
            (got_code, got_reason) == (code, reason),
            f"echo {got_code} {got_reason!r} for {code} {reason!r}",
        )
        await conn.expect_eof()


async def _expect_failed(
    ctx: ServerModeContext, conn: KitConnection, label: str, code: int
) -> None:
    closed, got, _ = await conn.expect_closed()
    ctx.should(
        closed and got == code,
        f"{label}: Close {code} (F12), got {'Close ' + str(got) if closed else 'no Close'}",
    )
    await conn.expect_eof()


@scenario(
    "malformed-frames",
    "§2.6, F12",
    "framing violations (unmasked, reserved bits/opcodes, bad control frames, bad UTF-8) "
    "close the connection",
    vectors=("websocket:decode_frames",),
)
async def malformed_frames(ctx: ServerModeContext) -> None:
    for case in vectors.cases("websocket", "decode_frames"):
        inp, expected = case["input"], case["expected"]
        if (
            "error" not in expected
            or "max_message_size" in inp
            or case["id"] == "decode-masked-to-client"
        ):
            continue
        data = bytes.fromhex(inp["data_hex"])
        if inp["client_side"]:
            data = vectors.mask_frames(data)  # the same violation, sent by a client
        conn = await ctx.connect()
        conn.send_raw(data)
        try:
            await _expect_failed(ctx, conn, case["id"], expected["close_code"])
        except Fail as exc:
            raise Fail(f"{case['id']}: {exc}") from None


@scenario(
    "oversized-message",
    "§11.2, §2.6, F12",
    "a message of max_message_size bytes passes; one byte more ends the connection",
)
async def oversized_message(ctx: ServerModeContext) -> None:
    limit = ctx.limits().get("max_message_size")
    if type(limit) is not int or limit <= 0:
        raise Fail(f"server_hello.limits.max_message_size is {limit!r}")
    if limit > MAX_MESSAGE_PROBE:
        raise Skip(f"max_message_size {limit} is larger than the kit sends ({MAX_MESSAGE_PROBE})")
    conn = await ctx.connect()
    conn.send_frame(TEXT, b"a" * limit)
    conn.send_plain_text('{"t":"ping","p":{"timestamp":2}}')
    await conn.expect(
        lambda f: b'"client_timestamp":2,' in f.payload, "PONG after a message at the limit"
    )
    conn = await ctx.connect()
    conn.send_frame(TEXT, b"a" * (limit + 1))
    await _expect_failed(ctx, conn, "oversized message", 1009)


@scenario(
    "fragmented-message",
    "§2.6",
    "fragmented messages are reassembled, with a Ping between fragments answered at once",
)
async def fragmented_message(ctx: ServerModeContext) -> None:
    conn = await ctx.connect()
    text = b'{"c":"WSE","t":"ping","p":{"timestamp":3}}'
    conn.send_frame(TEXT, text[:10], fin=False)
    conn.send_frame(PING, b"between")
    conn.send_frame(CONTINUATION, text[10:20], fin=False)
    conn.send_frame(CONTINUATION, text[20:], fin=True)
    await conn.expect(
        lambda f: f.opcode == PONG and f.payload == b"between", "Pong between fragments"
    )
    await conn.expect(
        lambda f: b'"client_timestamp":3,' in f.payload, "PONG to the reassembled ping"
    )


# ======================================================================================
# Encryption (PROTOCOL §8)
# ======================================================================================


@scenario(
    "key-exchange",
    "§8.1, §8.2, §8.3, K10",
    "client_hello with a key gets the server's key; transport frames stay plain; "
    "bad E: frames are dropped",
)
async def key_exchange(ctx: ServerModeContext) -> None:
    conn = await ctx.connect(encryption=True)
    hello = conn.hello
    assert hello is not None
    p = hello.payload
    ctx.must(
        p.get("features", {}).get("encryption") is True, "server_hello features.encryption true"
    )
    ctx.must(
        is_std_b64_point(p.get("encryption_public_key")),
        f"encryption_public_key: {p.get('encryption_public_key')!r}",
    )
    ctx.must(
        hello.encrypted,
        "the kit derived the session key (HKDF-SHA256, no salt, info wse-encryption/aes-gcm-key)",
    )
    frame, _ = await conn.expect_message("server_hello", since=0)
    ctx.must(
        frame.opcode == TEXT and is_sorted_compact(frame.text or ""),
        "server_hello is plain sorted JSON",
    )
    conn.send_plain_text('{"t":"ping","p":{"timestamp":4}}')
    pong = await conn.expect(lambda f: b'"client_timestamp":4,' in f.payload, "plaintext PONG")
    ctx.must(pong.opcode == TEXT, "PONG is never encrypted")
    conn.send_frame(BINARY, b"E:" + os.urandom(40))  # fails GCM authentication
    conn.send_frame(BINARY, b"E:short")
    conn.send_plain_text('{"t":"ping","p":{"timestamp":5}}')
    await conn.expect(
        lambda f: b'"client_timestamp":5,' in f.payload, "PONG after undecryptable E: frames (K10)"
    )
    ctx.must(not conn.eof, "the connection stays open after bad E: frames")


def _kex_hello(key: Any, encryption: Any = True) -> str:
    p = {
        "client_version": "conformance",
        "protocol_version": 1,
        "features": {"encryption": encryption},
    }
    if key is not None:
        p["encryption_public_key"] = key
    return json.dumps({"c": "WSE", "t": "client_hello", "p": p})


@scenario(
    "key-exchange-invalid",
    "§8.2, §7.5, F15",
    "unusable public keys get KEY_EXCHANGE_FAILED (literal form), then server_hello "
    "without encryption",
    vectors=("crypto:decode_public_key",),
)
async def key_exchange_invalid(ctx: ServerModeContext) -> None:
    conn = await ctx.connect()
    await conn.expect_message("server_hello")
    for case in vectors.cases("crypto", "decode_public_key"):
        if "error" not in case["expected"]:
            continue
        conn.send_plain_text(_kex_hello(case["input"]["public_b64"]))
        frame = await conn.expect(
            lambda f: f.opcode == TEXT and b"KEY_EXCHANGE_FAILED" in f.payload,
            f"KEY_EXCHANGE_FAILED for {case['id']}",
        )
        ctx.must(
            KEX_FAILED_RE.match(frame.text or ""),
            f"{case['id']}: not the literal form: {frame.text}",
        )
        _, hello = await conn.expect_message("server_hello", f"server_hello after {case['id']}")
        ctx.must(
            hello["p"]["features"]["encryption"] is False
            and "encryption_public_key" not in hello["p"],
            f"{case['id']}: encryption stays off",
        )
    valid = next(
        c for c in vectors.cases("crypto", "decode_public_key") if "error" not in c["expected"]
    )
    for label, text in (
        ('encryption "true" (a string)', _kex_hello(valid["input"]["public_b64"], "true")),
        ("encryption true without a key", _kex_hello(None)),
    ):
        mark = len(conn.frames)
        conn.send_plain_text(text)
        _, hello = await conn.expect_message("server_hello", f"server_hello for {label}")
        ctx.must(hello["p"]["features"]["encryption"] is False, f"{label}: no exchange")
        ctx.must(
            not any(b"KEY_EXCHANGE_FAILED" in f.payload for f in conn.frames[mark:]),
            f"{label}: no error frame",
        )


@scenario(
    "key-exchange-once",
    "§8.2, K9",
    "a second client_hello cannot re-key: encryption:false, the first key stays",
)
async def key_exchange_once(ctx: ServerModeContext) -> None:
    conn = await ctx.connect(encryption=True)
    ctx.must(conn.hello is not None and conn.hello.encrypted, "first exchange")
    valid = next(
        c for c in vectors.cases("crypto", "decode_public_key") if "error" not in c["expected"]
    )
    mark = len(conn.frames)
    conn.send_plain_text(_kex_hello(valid["input"]["public_b64"]))
    _, hello = await conn.expect_message(
        "server_hello", "server_hello to the second client_hello", since=mark
    )
    ctx.must(hello["p"]["features"]["encryption"] is False, "second hello: encryption false")
    ctx.must("encryption_public_key" not in hello["p"], "second hello: no server key")
    ctx.must(
        not any(b"KEY_EXCHANGE_FAILED" in f.payload for f in conn.frames[mark:]), "no error frame"
    )
    if ctx.control_available:
        reply = await conn.control("send_event", event={"t": "conformance_after_rekey", "p": {}})
        ctx.must(reply["results"][0] > 0, "send_event after the second hello")
        frame, _ = await conn.expect_message(
            "conformance_after_rekey", "event encrypted with the first key"
        )
        ctx.must(frame.encrypted, "the event is an E: frame under the first key")


@scenario(
    "encrypted-round-trip",
    "§8.3, §8.4, F4",
    "after key exchange send_event and topic fan-out are E: frames of JSON; encrypted "
    "requests are decrypted",
    needs=("control",),
)
async def encrypted_round_trip(ctx: ServerModeContext) -> None:
    conn = await ctx.connect(encryption=True)
    topic = ctx.topic("enc")
    await conn.control("subscribe", topics=[topic])  # sent encrypted: proves §8.4
    reply = await conn.control(
        "send_event",
        events=[
            {"t": "conformance_enc", "p": {"n": 1}},
            {"t": "conformance_enc_big", "p": {"s": "x" * 3000}},
        ],
    )
    ctx.must(all(n > 0 for n in reply["results"]), f"send_event results {reply['results']}")
    small, msg = await conn.expect_message("conformance_enc", since=0)
    ctx.must(
        small.encrypted,
        f"send_event on an encrypted connection is an E: frame (opcode {small.opcode})",
    )
    ctx.must(msg.get("p") == {"n": 1}, f"decrypted payload {describe(msg.get('p'))}")
    big, msg = await conn.expect_message("conformance_enc_big", since=0)
    ctx.must(big.encrypted, "a payload over the compression threshold is still an E: frame")
    ctx.must(msg["p"].get("s") == "x" * 3000, "its plaintext is the JSON envelope (never C:)")
    text = json.dumps({"t": "conformance_enc_pub", "p": {"k": 2}}, separators=(",", ":"))
    await conn.control("publish", topic=topic, text=text)
    pub, msg = await conn.expect_message("conformance_enc_pub", since=0)
    ctx.must(pub.encrypted, "topic fan-out to an encrypted connection is an E: frame")
    ctx.must(
        msg.get("c") == "U" and msg.get("p") == {"k": 2},
        f"published text after category injection: {describe(msg)}",
    )
    ivs = [f.payload[2:14] for f in conn.frames if f.encrypted]
    ctx.should(len(set(ivs)) == len(ivs), "a fresh IV per E: frame")


# ======================================================================================
# Application-driven frames (control protocol)
# ======================================================================================


def _event_from_envelope(envelope: dict[str, Any]) -> dict[str, Any] | None:
    """send_event input reproducing an encode_event vector exactly, or None."""
    if not {"c", "t", "id", "seq", "ts", "v"} <= envelope.keys():
        return None
    if "$float" in json.dumps(envelope) or envelope["c"] != message_category(envelope["t"]):
        return None
    return envelope


@scenario(
    "send-event-forms",
    "§6.1, §4.3, §10.1",
    "send_event payloads: sorted compact JSON in a binary frame, C: + zlib above the threshold",
    needs=("control",),
    vectors=("frames:encode_event",),
)
async def send_event_forms(ctx: ServerModeContext) -> None:
    used = 0
    for case in vectors.cases("frames", "encode_event"):
        inp, expected = case["input"], case["expected"]
        event = _event_from_envelope(inp["envelope"])
        if inp["msgpack"] or event is None:
            continue
        used += 1
        # A fresh connection per case: the vectors share an id, and ids are deduplicated
        # per connection (§4.5 step 1).
        conn = await ctx.connect()
        mark = len(conn.frames)
        await conn.control(
            "send_event", event=event, compression_threshold=inp["compression_threshold"]
        )
        frames = conn.data_frames(mark)
        ctx.must(len(frames) == 1, f"{case['id']}: expected one event frame, got {len(frames)}")
        frame = frames[0]
        ctx.must(frame.opcode == BINARY, f"{case['id']}: send_event output is a binary frame (K3)")
        if "payload_text" in expected:
            ctx.must(
                frame.payload == expected["payload_text"].encode(),
                f"{case['id']}: {describe(frame.payload)}",
            )
        else:
            ctx.must(
                frame.payload[:2] == b"C:",
                f"{case['id']}: expected C: prefix, got {describe(frame.payload[:8])}",
            )
            ctx.should(
                frame.payload[2:4].hex() == expected["zlib_header_hex"],
                f"{case['id']}: zlib level 1 header 7801",
            )
            ctx.must(
                zlib.decompress(frame.payload[2:]) == expected["decompressed_text"].encode(),
                f"{case['id']}: decompressed text",
            )
    ctx.note(f"{used} encode_event vectors sent")


@scenario(
    "send-event-envelope",
    "§4.5, §5.1, §4.2",
    "send_event fills c (from t), id (UUIDv7), seq, ts, v; c follows message_category",
    needs=("control",),
    vectors=("envelope:message_category",),
)
async def send_event_envelope(ctx: ServerModeContext) -> None:
    conn = await ctx.connect()
    cases = vectors.cases("envelope", "message_category")
    mark = len(conn.frames)
    events = [{"t": c["input"]["t"], "p": {"case": c["id"]}} for c in cases]
    reply = await conn.control("send_event", events=events)
    ctx.must(all(n > 0 for n in reply["results"]), f"send_event results {reply['results']}")
    frames = conn.data_frames(mark)
    ctx.must(len(frames) == len(cases), f"{len(cases)} events sent, {len(frames)} frames seen")
    for case, frame in zip(cases, frames):
        msg = json.loads(frame.payload)
        ctx.must(
            msg.get("c") == case["expected"]["c"],
            f"{case['id']}: c {msg.get('c')!r}, expected {case['expected']['c']!r}",
        )
        if case["input"]["t"] == "":
            ctx.must("t" not in msg, f"{case['id']}: an empty t is not copied (§4.5 step 4)")
    msg = json.loads(frames[0].payload)
    ctx.must(is_sorted_compact(frames[0].payload.decode()), "keys sorted, compact (K1)")
    ctx.must(UUID7_RE.match(msg.get("id", "")), f"id is a UUIDv7: {msg.get('id')!r}")
    ctx.must(
        type(msg.get("seq")) is int and TS_RE.match(msg.get("ts", "")) and msg.get("v") == 1,
        "seq, ts, v",
    )
    seqs = [json.loads(f.payload)["seq"] for f in frames]
    ctx.should(all(b > a for a, b in itertools.pairwise(seqs)), f"seq increases: {seqs[:5]}...")


@scenario(
    "send-event-dedup",
    "§4.5, §11.5",
    "a repeated string id is not sent twice to the same connection",
    needs=("control",),
)
async def send_event_dedup(ctx: ServerModeContext) -> None:
    conn = await ctx.connect()
    event = {"t": "conformance_dedup", "id": f"conformance-{os.urandom(6).hex()}", "p": {}}
    mark = len(conn.frames)
    reply = await conn.control("send_event", event=event, repeat=2)
    ctx.must(
        reply["results"][0] > 0 and reply["results"][1] == 0,
        f"results {reply['results']}, expected [n, 0]",
    )
    frames = [
        f for f in conn.data_frames(mark) if any(m.get("id") == event["id"] for m in f.messages)
    ]
    ctx.must(len(frames) == 1, f"{len(frames)} frames with the id")


@scenario(
    "msgpack-connection",
    "§10.2, §2.3, K12",
    "?format=msgpack (as a substring) gives M: + msgpack send_event frames; broadcasts "
    "stay JSON text",
    needs=("control",),
    vectors=("frames:encode_event",),
)
async def msgpack_connection(ctx: ServerModeContext) -> None:
    used = 0
    for case in vectors.cases("frames", "encode_event"):
        inp = case["input"]
        event = _event_from_envelope(inp["envelope"])
        if not inp["msgpack"] or event is None:
            continue
        used += 1
        conn = await ctx.connect(msgpack=True)  # fresh: the vectors share an id (§4.5)
        mark = len(conn.frames)
        await conn.control(
            "send_event", event=event, compression_threshold=inp["compression_threshold"]
        )
        frames = conn.data_frames(mark)
        ctx.must(len(frames) == 1 and frames[0].opcode == BINARY, f"{case['id']}: one binary frame")
        expected = bytes.fromhex(case["expected"]["payload_hex"])
        ctx.must(frames[0].payload == expected, f"{case['id']}: {describe(frames[0].payload)}")
    ctx.note(f"{used} msgpack encode_event vectors sent")
    conn = await ctx.connect(msgpack=True)
    topic = ctx.topic("mp")
    await conn.control("subscribe", topics=[topic])
    await conn.control("publish", topic=topic, text='{"t":"conformance_mp_pub","p":{}}')
    frame, _ = await conn.expect_message("conformance_mp_pub", since=0)
    ctx.must(frame.opcode == TEXT, "a broadcast to a msgpack connection is a JSON text frame")
    odd = await ctx.connect(path=ctx.target.path + "?xformat=msgpackz", query_params=False)
    await odd.control("send_event", event={"t": "conformance_mp", "p": {}})
    frame, _ = await odd.expect_message("conformance_mp", since=0)
    ctx.must(
        frame.payload[:2] == b"M:", "'xformat=msgpackz' contains format=msgpack: msgpack mode (K12)"
    )


def _inbound_matches(expected: dict[str, Any], got: dict[str, Any]) -> bool:
    kind = expected["kind"]
    if got.get("kind") != kind:
        return False
    if kind == "msg":
        return json_equal(expected["value"], got.get("value"))
    if kind == "raw":
        return bool(got.get("text") == expected["value_text"])
    return bool(got.get("hex") == expected["value_hex"])


@scenario(
    "inbound-decoding",
    "§6.3, §6.4, §7.7, §10.3",
    "client text/binary frames reach the application as msg/raw/bin exactly as specified",
    needs=("control",),
    vectors=("frames:decode_client_text", "frames:decode_client_binary"),
)
async def inbound_decoding(ctx: ServerModeContext) -> None:
    plain = await ctx.connect()
    packed = await ctx.connect(msgpack=True)
    await plain.control("inbound")
    await packed.control("inbound")
    consumed = {"client_hello", "ping", "pong", "PONG"}
    cases = [(c, TEXT) for c in vectors.cases("frames", "decode_client_text")]
    cases += [(c, BINARY) for c in vectors.cases("frames", "decode_client_binary")]
    for case, opcode in cases:
        inp, expected = case["input"], case["expected"]
        if opcode == TEXT:
            conn, payload = plain, inp["text"].encode("utf-8")
        else:
            payload = bytes.fromhex(inp["data_hex"])
            if payload[:2] == b"E:":
                continue  # an E: frame belongs to the connection's key (§8.4), not to this op
            conn = packed if inp["msgpack"] else plain
        conn.send_frame(opcode, payload)
        events = (await conn.control("inbound"))["events"]
        if expected["kind"] == "msg" and expected.get("raw_type") in consumed and opcode == TEXT:
            ctx.must(
                not events,
                f"{case['id']}: consumed by the transport, but the app got {describe(events)}",
            )
            continue
        ctx.must(
            len(events) == 1,
            f"{case['id']}: expected one {expected['kind']} event, got {describe(events)}",
        )
        ctx.must(_inbound_matches(expected, events[0]), f"{case['id']}: got {describe(events[0])}")


@scenario(
    "rate-limit-feedback",
    "§11.1, §7.5",
    "exhausting send_event's bucket: rate_limit_warning, then one literal RATE_LIMITED; "
    "the connection stays",
    needs=("control",),
    vectors=("envelope:frame",),
)
async def rate_limit_feedback(ctx: ServerModeContext) -> None:
    capacity = ctx.limits().get("rate_limit_capacity")
    refill = ctx.limits().get("rate_limit_refill", 0)
    if type(capacity) is not int or capacity <= 0:
        raise Fail(f"server_hello.limits.rate_limit_capacity is {capacity!r}")
    if capacity > MAX_RATE_CAPACITY:
        raise Skip(
            f"rate_limit_capacity {capacity} is too large to exhaust; "
            f"run the server with ≤ {MAX_RATE_CAPACITY}"
        )
    conn = await ctx.connect()
    mark = len(conn.frames)
    repeat = capacity + 2 + int(refill if isinstance(refill, int) else 0)
    reply = await conn.control(
        "send_event",
        event={"t": "conformance_rl", "p": {}},
        repeat=repeat,
        timeout=max(ctx.timeout, 10.0),
    )
    results = reply["results"]
    ctx.must(0 in results, f"no send_event call was rate limited in {repeat} calls")
    limited_text = _frame_vector("rate_limited")["expected"]["text"].encode()
    frames = conn.frames[mark:]
    limited = [i for i, f in enumerate(frames) if f.opcode == TEXT and b"RATE_LIMITED" in f.payload]
    ctx.must(limited, "no RATE_LIMITED frame")
    ctx.must(
        frames[limited[0]].payload == limited_text,
        f"RATE_LIMITED is not the literal form: {frames[limited[0]].text}",
    )
    ctx.should(len(limited) == 1, f"at most one RATE_LIMITED per second, got {len(limited)}")
    warnings = [
        i for i, f in enumerate(frames) if f.opcode == TEXT and b"rate_limit_warning" in f.payload
    ]
    ctx.must(warnings and warnings[0] < limited[0], "a rate_limit_warning precedes RATE_LIMITED")
    m = WARNING_RE.match(frames[warnings[0]].text or "")
    ctx.must(m, f"rate_limit_warning is not the literal form: {frames[warnings[0]].text}")
    assert m is not None
    current, limit, remaining = (int(g) for g in m.groups())
    ctx.must(limit == capacity, f"warning limit {limit}, capacity {capacity}")
    ctx.should(
        capacity - 1 <= current + remaining <= capacity,
        f"current_rate {current} + remaining {remaining} ≈ capacity",
    )
    delivered = sum(
        1
        for f in conn.data_frames(mark)
        if any(m_.get("t") == "conformance_rl" for m_ in f.messages)
    )
    ctx.must(
        delivered == sum(1 for n in results if n > 0),
        f"{delivered} events delivered, {sum(1 for n in results if n > 0)} accepted",
    )
    conn.send_plain_text('{"t":"ping","p":{"timestamp":6}}')
    await conn.expect(
        lambda f: b'"client_timestamp":6,' in f.payload,
        "PONG after rate limiting (the connection stays)",
    )


@scenario(
    "broadcast-category",
    "§5.3, §6.1, F1",
    "topic fan-out is a text frame with the category injected exactly as the vectors say",
    needs=("control",),
    vectors=("envelope:inject_category",),
)
async def broadcast_category(ctx: ServerModeContext) -> None:
    conn = await ctx.connect()
    topic = ctx.topic("cat")
    await conn.control("subscribe", topics=[topic])
    for case in vectors.cases("envelope", "inject_category"):
        mark = len(conn.frames)
        await conn.control("publish", topic=topic, text=case["input"]["text"])
        frames = conn.data_frames(mark)
        ctx.must(len(frames) == 1, f"{case['id']}: expected one broadcast frame, got {len(frames)}")
        ctx.must(frames[0].opcode == TEXT, f"{case['id']}: broadcasts are text frames (K3)")
        text, stamped = strip_stamp(frames[0].payload.decode("utf-8"))
        expected = case["expected"]["text"]
        if stamped:  # §13.2: the stamp replaces the opening brace, whitespace before it goes
            expected = expected.lstrip(" \t\r\n")
        ctx.must(text == expected, f"{case['id']}: {text!r}, expected {expected!r}")


@scenario(
    "subscription-glob",
    "§3.4",
    "glob subscriptions match byte-wise (* and ?); unsubscribe stops delivery",
    needs=("control",),
    vectors=("topics:glob_match",),
)
async def subscription_glob(ctx: ServerModeContext) -> None:
    conn = await ctx.connect()
    for case in vectors.cases("topics", "glob_match"):
        pattern, topic = case["input"]["pattern"], case["input"]["topic"]
        await conn.control("subscribe", topics=[pattern])
        mark = len(conn.frames)
        await conn.control(
            "publish",
            topic=topic,
            text=json.dumps({"t": "conformance_glob", "p": {"case": case["id"]}}),
        )
        got = [
            f
            for f in conn.data_frames(mark)
            if any(m.get("p", {}).get("case") == case["id"] for m in f.messages)
        ]
        if case["expected"]["match"]:
            ctx.must(
                len(got) == 1,
                f"{case['id']}: pattern {pattern!r} should receive topic {topic[:40]!r}",
            )
        else:
            ctx.must(
                not got, f"{case['id']}: pattern {pattern!r} must not receive topic {topic[:40]!r}"
            )
        await conn.control("unsubscribe", topics=[pattern])
    topic = ctx.topic("unsub")
    await conn.control("subscribe", topics=[topic])
    await conn.control("unsubscribe", topics=[topic])
    mark = len(conn.frames)
    await conn.control("publish", topic=topic, text='{"t":"conformance_unsub","p":{}}')
    ctx.must(not conn.data_frames(mark), "a message after unsubscribe was delivered")


@scenario(
    "disconnect-statusless",
    "§12, K7",
    "the application's disconnect sends a Close without status, then TCP is closed",
    needs=("control",),
)
async def disconnect_statusless(ctx: ServerModeContext) -> None:
    conn = await ctx.connect()
    await conn.control("disconnect")
    closed, code, reason = await conn.expect_closed()
    ctx.must(closed, "no Close frame")
    ctx.must(
        code is None and reason == "",
        f"Close {code} {reason!r}, expected no status (peer sees 1005)",
    )
    await conn.expect_eof(timeout=ctx.timeout + 5.0)


# ======================================================================================
# Recovery (PROTOCOL §13)
# ======================================================================================

STAMP_RE = re.compile(r'^\{"tp":("(?:[^"\\]|\\.)*"),"e":"([0-9a-f]{8})","o":(\d+)(,|\})')


def _stamps(frames: list[ServerFrame], topic: str) -> list[tuple[str, int, str]]:
    """(epoch, offset, text) of the stamped text frames for ``topic``."""
    out = []
    for frame in frames:
        if frame.opcode != TEXT:
            continue
        text = frame.payload.decode("utf-8", "replace")
        m = STAMP_RE.match(text)
        if m and json.loads(m.group(1)) == topic:
            out.append((m.group(2), int(m.group(3)), text))
    return out


async def _publish_objects(conn: KitConnection, topic: str, count: int, start: int = 0) -> None:
    for n in range(start, start + count):
        await conn.control(
            "publish",
            topic=topic,
            text=json.dumps({"t": "conformance_rec", "p": {"n": n}}, separators=(",", ":")),
        )


@scenario(
    "recovery-stamps",
    "§13.2, F7",
    "publications are stamped {tp,e,o,...} with contiguous offsets; non-objects are not stamped",
    needs=("control", "recovery"),
)
async def recovery_stamps(ctx: ServerModeContext) -> None:
    conn = await ctx.connect()
    topic = ctx.topic("stamps")
    await conn.control("subscribe", topics=[topic])
    mark = len(conn.frames)
    await _publish_objects(conn, topic, 2)
    await conn.control("publish", topic=topic, text="not json")
    await conn.control("publish", topic=topic, text="{}")
    await _publish_objects(conn, topic, 1, start=2)
    frames = conn.data_frames(mark)
    stamps = _stamps(frames, topic)
    ctx.must(
        len(stamps) == 4,
        f"4 object publications, {len(stamps)} stamped frames: {[f.text for f in frames]}",
    )
    epochs = {e for e, _, _ in stamps}
    ctx.must(len(epochs) == 1, f"one epoch per buffer, got {epochs}")
    offsets = [o for _, o, _ in stamps]
    ctx.must(offsets[:2] == [offsets[0], offsets[0] + 1], f"contiguous offsets {offsets}")
    ctx.should(
        offsets == list(range(offsets[0], offsets[0] + 4)),
        f"non-objects take no offset (F7): {offsets}",
    )
    ctx.must(
        any(f.payload == b"not json" for f in frames),
        "the non-object publication is delivered unstamped",
    )
    empty = stamps[2][2]
    ctx.must(
        re.fullmatch(r'\{"tp":"[^"]*","e":"[0-9a-f]{8}","o":\d+\}', empty),
        f"stamped empty object: {empty}",
    )
    ctx.must(
        stamps[0][2].endswith(',"c":"U","t":"conformance_rec","p":{"n":0}}'),
        f"stamp spliced before the members: {stamps[0][2]}",
    )


async def _recover(
    ctx: ServerModeContext, conn: KitConnection, topic: str, epoch: str | None, offset: int
) -> dict[str, Any]:
    reply = await conn.control(
        "subscribe",
        topics=[topic],
        recover=True,
        positions={topic: {"epoch": epoch, "offset": offset}},
    )
    entry = (reply.get("recovery") or {}).get("topics", {}).get(topic)
    if not isinstance(entry, dict):
        raise Fail(f"no per-topic recovery outcome in {describe(reply)}")
    return entry


@scenario(
    "recovery-replay",
    "§13.3, §13.4, §13.5, F8",
    "a recovery subscribe replays offset+1..head-1 in order, then live messages without repeats",
    needs=("control", "recovery"),
)
async def recovery_replay(ctx: ServerModeContext) -> None:
    pub = await ctx.connect()
    topic = ctx.topic("replay")
    await pub.control("subscribe", topics=[topic])
    mark = len(pub.frames)
    await _publish_objects(pub, topic, 5)
    stamps = _stamps(pub.frames[mark:], topic)
    ctx.must(len(stamps) == 5, f"5 stamped frames expected, got {len(stamps)}")
    epoch, first = stamps[0][0], stamps[0][1]
    late = await ctx.connect(user="bob")
    entry = await _recover(ctx, late, topic, epoch, first + 1)
    ctx.must(
        entry.get("recovered") is True and entry.get("count") == 3, f"outcome {describe(entry)}"
    )
    ctx.must(
        entry.get("epoch") == epoch and entry.get("offset") == first + 4,
        f"position {describe(entry)}",
    )
    await _publish_objects(pub, topic, 1, start=5)
    await late.wait(lambda: len(_stamps(late.frames, topic)) >= 4, "replayed and live frames")
    offsets = [o for _, o, _ in _stamps(late.frames, topic)]
    ctx.must(offsets[:3] == [first + 2, first + 3, first + 4], f"replay in offset order: {offsets}")
    await late.settle(0.2)
    offsets = [o for _, o, _ in _stamps(late.frames, topic)]
    ctx.should(
        offsets == [first + 2, first + 3, first + 4, first + 5],
        f"each offset once, increasing (F8): {offsets}",
    )


@scenario(
    "recovery-outcomes",
    "§13.4",
    "epoch mismatch and unknown topics are reported recovered:false with the right position",
    needs=("control", "recovery"),
)
async def recovery_outcomes(ctx: ServerModeContext) -> None:
    pub = await ctx.connect()
    topic = ctx.topic("outcomes")
    await pub.control("subscribe", topics=[topic])
    mark = len(pub.frames)
    await _publish_objects(pub, topic, 3)
    stamps = _stamps(pub.frames[mark:], topic)
    ctx.must(len(stamps) == 3, f"3 stamped frames expected, got {len(stamps)}")
    epoch, last = stamps[-1][0], stamps[-1][1]
    other = "00000001" if epoch != "00000001" else "00000002"
    conn = await ctx.connect(user="bob")
    mark = len(conn.frames)
    entry = await _recover(ctx, conn, topic, other, 0)
    ctx.must(
        entry.get("recovered") is False and entry.get("count") == 0,
        f"epoch mismatch: {describe(entry)}",
    )
    ctx.must(
        entry.get("epoch") == epoch and entry.get("offset") == last,
        f"epoch mismatch position: {describe(entry)}",
    )
    ctx.must(not _stamps(conn.frames[mark:], topic), "nothing replayed on an epoch mismatch")
    entry = await _recover(ctx, conn, ctx.topic("never-published"), epoch, 0)
    ctx.must(
        entry.get("recovered") is False and entry.get("epoch") is None and entry.get("offset") == 0,
        f"no buffer: {describe(entry)}",
    )


# ======================================================================================
# Presence (PROTOCOL §14)
# ======================================================================================

PRESENCE_RE = re.compile(
    r'^\{"c":"WSE","p":\{"data":.*,"user_id":".*"\},"t":"presence_(join|leave|update)"\}$'
)


async def _presence_events(
    conn: KitConnection, kind: str, user: str | None, mark: int, what: str
) -> ServerFrame:
    def match(frame: ServerFrame) -> bool:
        msg = frame.json
        return (
            isinstance(msg, dict)
            and msg.get("t") == f"presence_{kind}"
            and (user is None or msg.get("p", {}).get("user_id") == user)
        )

    return await conn.expect(match, what, since=mark)


@scenario(
    "presence-join-leave",
    "§14.1, §14.2",
    "presence_join on a user's first connection, presence_leave on its last (sorted keys, no v)",
    needs=("control", "presence"),
)
async def presence_join_leave(ctx: ServerModeContext) -> None:
    topic = ctx.topic("presence")
    a = await ctx.connect()
    mark = len(a.frames)
    await a.control("subscribe", topics=[topic], presence_data={"status": "online", "z": 1})
    frame = await _presence_events(
        a, "join", ctx.user_id(), mark, "presence_join for the joining connection"
    )
    ctx.must(
        PRESENCE_RE.match(frame.text or "") and is_sorted_compact(frame.text or ""),
        f"presence form: {frame.text}",
    )
    ctx.must(frame.json["p"]["data"] == {"status": "online", "z": 1}, "presence data as given")
    if ctx.distinct_users:
        b = await ctx.connect(user="bob")
        mark = len(a.frames)
        await b.control("subscribe", topics=[topic], presence_data={"status": "away"})
        await _presence_events(
            a, "join", ctx.user_id("bob"), mark, "presence_join for a second user"
        )
        mark = len(a.frames)
        await b.control("unsubscribe", topics=[topic])
        frame = await _presence_events(a, "leave", ctx.user_id("bob"), mark, "presence_leave")
        ctx.must(frame.json["p"]["data"] == {"status": "away"}, "leave carries the entry's data")
    else:
        tab = await ctx.connect()
        mark = len(a.frames)
        await tab.control("subscribe", topics=[topic], presence_data={"status": "online"})
        await tab.control("unsubscribe", topics=[topic])
        await a.control("presence", topic=topic)
        extra = [f.text for f in a.frames[mark:] if f.opcode == TEXT and b"presence_" in f.payload]
        ctx.must(not extra, f"a second tab of the same user produced presence events: {extra}")
        ctx.note("one token only: checked that a user's second connection produces no events")


@scenario(
    "presence-update-query",
    "§14.2, §14.3",
    "update_presence sends presence_update; presence() lists members",
    needs=("control", "presence"),
)
async def presence_update_query(ctx: ServerModeContext) -> None:
    topic = ctx.topic("presence-upd")
    a = await ctx.connect()
    await a.control("subscribe", topics=[topic], presence_data={"v": 1})
    mark = len(a.frames)
    await a.control("update_presence", data={"v": 2})
    frame = await _presence_events(a, "update", ctx.user_id(), mark, "presence_update")
    ctx.must(frame.json["p"]["data"] == {"v": 2}, f"updated data: {frame.text}")
    reply = await a.control("presence", topic=topic)
    members = reply.get("members", {})
    user = ctx.user_id()
    ctx.must(isinstance(members, dict) and user in members, f"members {describe(members)}")
    ctx.must(
        members[user].get("data") == {"v": 2} and members[user].get("connections") == 1,
        f"entry {describe(members[user])}",
    )
    ctx.must(
        reply.get("stats") == {"num_users": 1, "num_connections": 1},
        f"stats {describe(reply.get('stats'))}",
    )

"""Client mode: the kit is a scripted reference server and checks a client under test.

The client under test connects to ``ws://HOST:PORT/wse`` with a token and runs a small
application that follows the echo convention (spec/CONFORMANCE.md):

- every message the client delivers to its application is sent back as
  ``{"t":"conformance_echo","p":{"t","p","c","id","tp","e","o"}}`` (what it decoded);
- a ``conformance_command`` message is executed instead: ``{"action":"subscribe",
  "topics":[...]}`` calls the client's subscribe API, ``{"action":"send","t":..,"p":..}``
  its send API.

Scenarios send frames in every form and compare the echoes with what the spec (and the
vectors) say a client decodes.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from wse_proto import auth, envelope
from wse_proto._defaults import monotonic, wall_clock_ms
from wse_proto.crypto import EncryptionSession
from wse_proto.ws import BINARY, CLOSE, TEXT

from . import vectors
from .checks import describe, is_std_b64_point, json_equal, token_subject
from .core import Fail, Outcome, Scenario, ScenarioContext, Unsupported, scenario_decorator
from .refserver import RefServer, RefSession, SessionPolicy, random_epoch

__all__ = [
    "CLIENT_SCENARIOS",
    "COMMAND_TYPE",
    "ECHO_TYPE",
    "SYNC_TYPE",
    "ClientModeContext",
]

ECHO_TYPE = "conformance_echo"
COMMAND_TYPE = "conformance_command"
SYNC_TYPE = "conformance_sync"
READY_DELAY = 0.5
"""The first connection gets server_ready this long after the 101 (§3.7 check)."""

SYSTEM_TYPES = frozenset(
    {
        "server_ready", "server_hello", "ping", "PING", "pong", "PONG", "error",
        "subscription_update", "health_check", "config_update", "sync_request",
        "metrics_request", "priority_message", "heartbeat", "rate_limit_warning",
    }
)  # fmt: skip
"""Types clients handle themselves; frames of these types are not used as echo probes."""

DRAIN_CODE = 4300
"""The default drain close code; every client reconnects after it (§12)."""
STATUSLESS_WAIT = 4.0

SHOULD_FRAME_CASES = frozenset({"decode-non-minimal-length"})
"""RFC 6455 lets a receiver accept these; PROTOCOL §2.6 rejects them (wse-py)."""

CLIENT_SCENARIOS: list[Scenario] = []


scenario = scenario_decorator(CLIENT_SCENARIOS, default_timeout=60.0)


def make_token() -> str:
    """An HS256 JWT for the client to present (the reference server does not verify it)."""
    secret = os.urandom(32)
    claims = {"sub": "conformance-client", "exp": int(time.time()) + 24 * 3600}
    return auth.encode_token(claims, secret)


class ClientModeContext(ScenarioContext):
    """The reference server, the sessions the client opened, and the echo helpers."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        token: str | None = None,
        timeout: float = 5.0,
        reconnect_timeout: float = 15.0,
    ) -> None:
        super().__init__()
        self.token = token if token is not None else make_token()
        self.timeout = timeout
        self.reconnect_timeout = reconnect_timeout
        self.server = RefServer(
            host, port, user_id=token_subject(self.token) or "conformance-client"
        )
        self.first: RefSession | None = None
        self.current: RefSession | None = None
        self.run_id = os.urandom(3).hex()
        self._sync = 0
        self._hello_missing = False

    @property
    def url(self) -> str:
        return self.server.url

    async def start(self) -> None:
        self.server.queue_policies(SessionPolicy(ready_delay=READY_DELAY))
        await self.server.start()

    async def wait_first(self, timeout: float) -> None:
        """Wait for the client under test to connect the first time."""
        self.first = await self.server.next_session(0, timeout)
        self.current = self.first
        await self._settle(self.first)

    async def finish(self) -> None:
        """Close the last session with 1000 (the client should not reconnect) and stop."""
        if self.current is not None and self.current.open:
            self.current.close(1000, "conformance run finished")
            try:
                await self.current.expect_end(2.0)
            except Fail:
                pass
        await self.server.stop()

    def precheck(self, scenario: Scenario) -> tuple[Outcome, str] | None:
        if self.first is None:
            return Outcome.ERROR, "the client under test never connected"
        return None

    def topic(self, name: str) -> str:
        return f"conformance.{self.run_id}.{name}"

    # ------------------------------------------------------------------ sessions

    async def _settle(self, session: RefSession) -> None:
        """Wait until the session had its server_ready and the client's hello."""
        await session.wait(
            lambda: session.ready_at is not None or session.eof, "server_ready", self.timeout + 1
        )
        if self._hello_missing:
            return
        try:
            await session.wait(lambda: session.hello_events(), "client_hello", self.timeout)
        except Fail:
            self._hello_missing = True

    def newer_session(self, session: RefSession) -> RefSession | None:
        """A later upgraded session: the client moved to a new connection."""
        for other in self.server.sessions[session.index + 1 :]:
            if other.upgraded_at is not None:
                return other
        return None

    async def session(self) -> RefSession:
        """The live session, or the next one the client opens (after a reconnect).

        A client that opened a newer connection has abandoned the current one, even if
        it never closed it; the old one is dropped.
        """
        current = self.current
        if current is not None:
            newer = self.newer_session(current)
            while newer is not None:
                current.abort()
                current = newer
                newer = self.newer_session(current)
            if current is not self.current:
                self.current = current
                await self._settle(current)
            if current.open:
                return current
        start = 0 if current is None else current.index + 1
        session = await self.server.next_session(start, self.reconnect_timeout)
        self.current = session
        await self._settle(session)
        return session

    # ------------------------------------------------------------------ echo convention

    def command(self, session: RefSession, action: str, **params: Any) -> None:
        session.send_json(
            {
                "c": "U",
                "t": COMMAND_TYPE,
                "p": {"action": action, **params},
                "id": os.urandom(16).hex(),
            }
        )

    async def sync(self, session: RefSession, timeout: float | None = None) -> int:
        """Send a sync message and wait for its echo; returns the frame index after it.

        Clients handle frames in order, so every echo for frames sent before the sync
        arrived before its echo.
        """
        self._sync += 1
        n = self._sync
        mark = len(session.frames)
        session.send_json({"c": "U", "t": SYNC_TYPE, "p": {"n": n}, "id": os.urandom(16).hex()})

        def echoed() -> int | None:
            if session.eof:
                raise Fail(f"the client closed the connection ({self.describe_end(session)})")
            if self.newer_session(session) is not None:
                raise Fail("the client abandoned the connection and opened a new one")
            for i in range(mark, len(session.frames)):
                msg = session.frames[i].message
                if msg is not None and msg.get("t") == ECHO_TYPE:
                    p = msg.get("p")
                    if (
                        isinstance(p, dict)
                        and p.get("t") == SYNC_TYPE
                        and (p.get("p") or {}).get("n") == n
                    ):
                        return i + 1
            return None

        try:
            index: int = await session.wait(
                echoed, "echo of the sync message", self.timeout if timeout is None else timeout
            )
        except Fail as exc:
            failed = sum(1 for f in session.frames if f.decrypt_failed)
            if failed:
                raise Fail(
                    f"{exc} ({failed} of the client's E: frames failed authentication)"
                ) from None
            raise
        return index

    @staticmethod
    def echoes(session: RefSession, start: int, end: int | None = None) -> list[dict[str, Any]]:
        """Echo payloads in frames[start:end], sync echoes excluded."""
        out = []
        for frame in session.frames[start:end]:
            msg = frame.message
            if (
                msg is not None
                and msg.get("t") == ECHO_TYPE
                and isinstance(msg.get("p"), dict)
                and msg["p"].get("t") != SYNC_TYPE
            ):
                out.append(msg["p"])
        return out

    @staticmethod
    def describe_end(session: RefSession) -> str:
        for frame in session.frames:
            if frame.opcode == CLOSE:
                code = int.from_bytes(frame.payload[:2], "big") if len(frame.payload) >= 2 else None
                return f"Close {code} {frame.payload[2:].decode('utf-8', 'replace')!r}"
        if session.violation:
            return session.violation
        return "TCP closed without a Close frame"

    async def subscribe(self, session: RefSession, topic: str) -> None:
        """Command a subscription and answer the client's subscription_update (§7.8, §7.9)."""
        mark = len(session.frames)
        self.command(session, "subscribe", topics=[topic])
        _, msg = await session.expect_message(
            "subscription_update",
            f"subscription_update for {topic!r} after a subscribe command",
            self.timeout,
            pred=lambda m: topic in ((m.get("p") or {}).get("topics") or []),
            since=mark,
        )
        p = msg.get("p") or {}
        self.must(p.get("action") == "subscribe", f"subscription_update action {p.get('action')!r}")
        self.reply_subscription(session, {topic: (None, 0, False, 0)})

    @staticmethod
    def reply_subscription(
        session: RefSession, outcomes: dict[str, tuple[str | None, int, bool, int]]
    ) -> None:
        """A §7.9 subscription_update reply: per topic (epoch, offset, recovered, count)."""
        recovery = {
            topic: {"epoch": e, "offset": o, "recovered": r, "count": n}
            for topic, (e, o, r, n) in outcomes.items()
        }
        session.send_event(
            {
                "t": "subscription_update",
                "p": {
                    "action": "subscribe",
                    "success": True,
                    "success_topics": list(outcomes),
                    "failed_topics": [],
                    "recoverable": True,
                    "recovered": all(v[2] for v in outcomes.values()),
                    "recovery": recovery,
                },
            }
        )

    @staticmethod
    def send_stamped(session: RefSession, topic: str, epoch: str, offset: int) -> None:
        """A stamped topic message as a recovery-enabled server sends it (§13.2)."""
        session.send_json(
            {
                "tp": topic,
                "e": epoch,
                "o": offset,
                "c": "U",
                "t": "conformance_stamped",
                "p": {"o": offset},
            }
        )

    def offsets(
        self, session: RefSession, topic: str, start: int, end: int | None = None
    ) -> list[Any]:
        return [e.get("o") for e in self.echoes(session, start, end) if e.get("tp") == topic]


# ======================================================================================
# Connection setup (PROTOCOL §2, §3, §7)
# ======================================================================================


def _first(ctx: ClientModeContext) -> RefSession:
    assert ctx.first is not None
    return ctx.first


def _hello_frame(session: RefSession) -> tuple[int, Any] | None:
    for i, frame in enumerate(session.frames):
        msg = frame.message
        if msg is not None and msg.get("t") == "client_hello":
            return i, frame
    return None


@scenario(
    "handshake-upgrade",
    "§2.3, §2.4",
    "the upgrade request is a valid RFC 6455 handshake and works without extensions",
)
async def handshake_upgrade(ctx: ClientModeContext) -> None:
    first = _first(ctx)
    ctx.must(
        first.request is not None and first.upgraded_at is not None,
        "the request was not a valid upgrade",
    )
    assert first.request is not None
    ctx.note(f"path {first.request.path!r}, query {first.request.query!r}")
    offered = first.request.offered_extensions
    if offered:
        ctx.note(f"offered extensions {offered} (declined, as servers do)")
    ctx.must(not first.violation, f"framing violation: {first.violation}")


@scenario(
    "auth-token-sent",
    "§3.2, §7.10",
    "the token is sent as 'access_token' cookie and/or 'Bearer' header",
)
async def auth_token_sent(ctx: ClientModeContext) -> None:
    request = _first(ctx).request
    assert request is not None
    found = auth.extract_token(request.cookie, request.authorization)
    ctx.must(
        found is not None,
        f"no token: Cookie {request.cookie!r}, Authorization {request.authorization!r}",
    )
    assert found is not None
    ctx.must(
        found.token == ctx.token, f"the {found.source} token is not the one given to the client"
    )
    sources = []
    if request.cookie and f"access_token={ctx.token}" in request.cookie:
        sources.append("cookie")
    if request.authorization and request.authorization[7:] == ctx.token:
        sources.append("bearer")
    ctx.note("token sent as " + " and ".join(sources))


@scenario(
    "waits-for-server-ready",
    "§3.7, §7.10",
    "client_hello is sent only after server_ready (delayed 0.5 s on the first connection)",
)
async def waits_for_server_ready(ctx: ClientModeContext) -> None:
    first = _first(ctx)
    await first.wait(lambda: _hello_frame(first), "client_hello", ctx.timeout + READY_DELAY)
    found = _hello_frame(first)
    assert found is not None and first.ready_at is not None
    index, frame = found
    ctx.must(
        frame.at >= first.ready_at,
        f"client_hello came {first.ready_at - frame.at:.3f} s before server_ready",
    )
    early = [
        f for f in first.frames[:index] if f.opcode in (TEXT, BINARY) and f.at < first.ready_at
    ]
    ctx.should(not early, f"{len(early)} data frames before server_ready")
    ctx.note(f"client_hello {frame.at - first.ready_at:.3f} s after server_ready")


@scenario(
    "client-hello-fields",
    "§7.7, §7.8, §8.1",
    "client_hello is a plaintext JSON text frame with the documented fields",
)
async def client_hello_fields(ctx: ClientModeContext) -> None:
    first = _first(ctx)
    found = await first.wait(lambda: _hello_frame(first), "client_hello", ctx.timeout)
    frame = found[1]
    ctx.must(
        frame.opcode == TEXT,
        "client_hello must be a plaintext text frame (the transport only intercepts those)",
    )
    msg = frame.message
    p = msg.get("p")
    ctx.must(isinstance(p, dict), f"client_hello p is an object: {describe(msg)}")
    ctx.should(msg.get("c") == "WSE", f"c is 'WSE' (got {msg.get('c')!r})")
    version = p.get("protocol_version")
    ctx.should(
        type(version) is int and version >= 1,
        f"p.protocol_version is an integer >= 1 ({version!r})",
    )
    features = p.get("features")
    ctx.should(isinstance(features, dict), "p.features is an object")
    encryption = features.get("encryption") if isinstance(features, dict) else None
    key = p.get("encryption_public_key")
    if key is not None or encryption is True:
        ctx.must(
            encryption is True,
            "an encryption_public_key needs features.encryption true (JSON boolean)",
        )
        ctx.must(
            is_std_b64_point(key),
            f"encryption_public_key is canonical base64 of a 65-byte point: {key!r}",
        )
    else:
        ctx.should(encryption is False, f"features.encryption is a boolean ({encryption!r})")
    ctx.should(
        p.get("connection_id") == first.conn_id,
        "p.connection_id echoes server_ready's connection id",
    )
    ctx.note(f"client_version {p.get('client_version')!r}, encryption {encryption!r}")


@scenario(
    "pong-reply",
    "§7.4, §7.8, §11.6",
    "a server ping is answered with a PONG carrying the timestamps",
)
async def pong_reply(ctx: ClientModeContext) -> None:
    session = await ctx.session()
    mark = len(session.frames)
    wall = wall_clock_ms()
    server_time = envelope.format_ts(wall)
    session.send_text(envelope.server_ping(wall).decode())
    frame, msg = await session.expect_message(
        ("PONG", "pong"), "PONG answering the server ping", ctx.timeout, since=mark
    )
    ctx.must(
        frame.opcode == TEXT or frame.encrypted,
        "the PONG is a text frame (or E: after key exchange)",
    )
    raw_p = msg.get("p")
    p: dict[str, Any] = raw_p if isinstance(raw_p, dict) else {}
    ctx.should(msg.get("c") == "WSE", f"PONG c is 'WSE' ({msg.get('c')!r})")
    ctx.should(
        p.get("server_timestamp") == server_time,
        f"p.server_timestamp echoes server_time ({p.get('server_timestamp')!r})",
    )
    client_ts = p.get("client_timestamp")
    ctx.should(
        type(client_ts) is int and abs(client_ts - time.time() * 1000) < 300_000,
        f"p.client_timestamp is wall-clock ms ({client_ts!r})",
    )
    await asyncio.sleep(0.2)
    pongs = [
        m
        for _, m in session.messages(mark)
        if m.get("t") in ("PONG", "pong")
        and (m.get("p") or {}).get("server_timestamp") == server_time
    ]
    ctx.should(len(pongs) == 1, f"one PONG per ping, got {len(pongs)}")


# ======================================================================================
# Frame forms (PROTOCOL §6.5), data-driven from frames.json decode_server_message
# ======================================================================================


def _decode_group(case: dict[str, Any]) -> str | None:
    inp, expected = case["input"], case["expected"]
    if "max_size" in inp:
        return None  # the client cap is fixed at 1 MiB; these cases use smaller caps
    data_hex = inp.get("data_hex", "")
    if "error" in expected:
        return None if data_hex.startswith("453a") else "robustness"
    if any(e.get("t") in SYSTEM_TYPES for e in expected["events"]):
        return None
    if data_hex.startswith("453a"):
        return "encrypted"
    raw = inp.get("text") or bytes.fromhex(data_hex).decode("latin-1")
    if '"batch"' in raw:
        return "batch"
    if "text" in inp:
        return "text"
    if data_hex.startswith("433a") or data_hex.startswith("78"):
        return "zlib"
    if data_hex.startswith("7b"):
        return "binary-json"
    return "msgpack"


def decode_cases(group: str) -> list[dict[str, Any]]:
    return [
        c for c in vectors.cases("frames", "decode_server_message") if _decode_group(c) == group
    ]


def _echo_matches(expected: dict[str, Any], echo: dict[str, Any]) -> str | None:
    """Why ``echo`` does not show the client decoded ``expected`` (None when it does)."""
    if echo.get("t") != expected["t"]:
        return f"t {echo.get('t')!r}, expected {expected['t']!r}"
    if not json_equal(expected["p"], echo.get("p")):
        return f"p {describe(echo.get('p'))}, expected {describe(expected['p'])}"
    for key in ("c", "id", "tp", "e", "o"):
        if key in expected and echo.get(key) != expected[key]:
            return f"{key} {echo.get(key)!r}, expected {expected[key]!r}"
    return None


def _send_case(session: RefSession, case: dict[str, Any]) -> None:
    inp = case["input"]
    if "text" in inp:
        session.send_text(inp["text"])
        return
    data = bytes.fromhex(inp["data_hex"])
    if data[:2] == b"E:":
        # Re-seal the vector's plaintext under this session's key (§8.3).
        plain = EncryptionSession(bytes.fromhex(inp["key_hex"]), os.urandom).decrypt(data)
        session.send_message(plain.decode("utf-8"))
        return
    session.send_bytes(data)


async def _replay(
    ctx: ClientModeContext, cases: list[dict[str, Any]], problems: list[str]
) -> AsyncIterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Send each case's frames on a fresh session and yield what the client echoed back;
    a case whose sync fails is noted in ``problems`` and skipped."""
    for case in cases:
        session = await ctx.session()
        mark = len(session.frames)
        _send_case(session, case)
        try:
            end = await ctx.sync(session)
        except Fail as exc:
            problems.append(f"{case['id']}: {exc}")
            continue
        yield case, ctx.echoes(session, mark, end)


async def _run_decode(ctx: ClientModeContext, group: str) -> None:
    cases = decode_cases(group)
    ctx.must(cases, f"kit error: no vectors in group {group!r}")
    problems: list[str] = []
    async for case, echoes in _replay(ctx, cases, problems):
        expected = case["expected"]["events"]
        if len(echoes) != len(expected):
            problems.append(
                f"{case['id']}: {len(expected)} messages expected, "
                f"{len(echoes)} delivered {describe(echoes)}"
            )
            continue
        for exp, echo in zip(expected, echoes):
            why = _echo_matches(exp, echo)
            if why:
                problems.append(f"{case['id']}: {why}")
                break
    ctx.note(f"{len(cases)} vectors: " + ", ".join(c["id"] for c in cases))
    ctx.must(not problems, "; ".join(problems))


_DECODE_SCENARIOS = (
    # (id, vector group, section, description)
    (
        "decode-text",
        "text",
        "§6.5, §6.2, §4.6",
        "text frames: JSON, legacy prefixes (category), t/p fallbacks, stamps",
    ),
    (
        "decode-binary-json",
        "binary-json",
        "§6.5, §6.1",
        "send_event output: JSON in a binary frame",
    ),
    (
        "decode-zlib",
        "zlib",
        "§6.5, §10.1",
        "C: + zlib (any level, raw deflate, trailing bytes) and raw zlib frames",
    ),
    ("decode-msgpack", "msgpack", "§6.5, §10.2", "M: + msgpack and raw msgpack binary frames"),
    (
        "decode-batch",
        "batch",
        "§4.7, §6.5",
        "batches are expanded into their messages (prefix category inherited)",
    ),
)


def _decode_scenario(id: str, group: str, section: str, description: str) -> None:
    """Register the scenario that replays one group of decode vectors."""

    async def run(ctx: ClientModeContext) -> None:
        await _run_decode(ctx, group)

    scenario(id, section, description, vectors=("frames:decode_server_message",))(run)


for _row in _DECODE_SCENARIOS:
    _decode_scenario(*_row)


@scenario(
    "decode-robustness",
    "§6.5",
    "undecodable frames are dropped: the connection stays up and later frames decode",
    vectors=("frames:decode_server_message",),
)
async def decode_robustness(ctx: ClientModeContext) -> None:
    problems: list[str] = []
    extra = []
    cases = decode_cases("robustness")
    async for case, echoes in _replay(ctx, cases, problems):
        if echoes:
            extra.append(f"{case['id']} delivered {describe(echoes, 80)}")
    ctx.note(f"{len(cases)} undecodable frames sent")
    ctx.should(not extra, "frames wse-py's decoder refuses were delivered: " + "; ".join(extra))
    ctx.must(not problems, "; ".join(problems))


# ======================================================================================
# Encryption (PROTOCOL §8)
# ======================================================================================


async def _encrypted_session(ctx: ClientModeContext) -> RefSession:
    session = await ctx.session()
    hellos = session.hello_events()
    if any(h.encryption for h in hellos):
        return session
    failures = session.key_exchange_failures()
    if failures:
        raise Fail(f"the client's public key was refused: {failures[0].detail}")
    found = _hello_frame(session)
    if found is not None:
        p = (found[1].message or {}).get("p") or {}
        if (p.get("features") or {}).get("encryption") is True:
            raise Fail("client_hello asked for encryption but no key was agreed")
    raise Unsupported("not supported by the client under test: it did not ask for encryption")


@scenario(
    "encryption-key-exchange",
    "§8.1, §8.2",
    "client_hello carries a valid P-256 key and the exchange completes",
    needs=("encryption",),
)
async def encryption_key_exchange(ctx: ClientModeContext) -> None:
    session = await _encrypted_session(ctx)
    found = _hello_frame(session)
    assert found is not None
    key = ((found[1].message or {}).get("p") or {}).get("encryption_public_key")
    ctx.must(is_std_b64_point(key), f"client key {key!r}")


@scenario(
    "encryption-decrypt",
    "§8.1, §8.3, §6.5",
    "E: frames (send_event, fan-out, vectors re-sealed) are decrypted with the derived key",
    needs=("encryption",),
    vectors=("frames:decode_server_message",),
)
async def encryption_decrypt(ctx: ClientModeContext) -> None:
    session = await _encrypted_session(ctx)
    mark = len(session.frames)
    session.send_event({"t": "conformance_enc_event", "p": {"n": 1}})
    session.send_json(
        {"c": "U", "t": "conformance_enc_fanout", "p": {"n": 2}, "id": os.urandom(8).hex()}
    )
    session.send_text(json.dumps({"c": "U", "t": "conformance_plain_after_kex", "p": {"n": 3}}))
    end = await ctx.sync(session)
    echoes = ctx.echoes(session, mark, end)
    types = [e.get("t") for e in echoes]
    wanted = ["conformance_enc_event", "conformance_enc_fanout", "conformance_plain_after_kex"]
    ctx.must(
        types == wanted,
        f"delivered {types} (plaintext frames must still be accepted after the exchange, §8.3)",
    )
    await _run_decode(ctx, "encrypted")


@scenario(
    "encryption-client-frames",
    "§8.2, §7.10",
    "after the exchange the client's messages are E: frames the server decrypts",
    needs=("encryption",),
)
async def encryption_client_frames(ctx: ClientModeContext) -> None:
    session = await _encrypted_session(ctx)
    mark = len(session.frames)
    end = await ctx.sync(session)
    frames = [f for f in session.frames[mark:end] if f.opcode in (TEXT, BINARY)]
    echo_frames = [f for f in frames if (f.message or {}).get("t") == ECHO_TYPE]
    ctx.must(
        echo_frames and all(f.encrypted for f in echo_frames), "the client's messages are E: frames"
    )
    bad = [f for f in session.frames if f.decrypt_failed]
    ctx.must(
        not bad,
        f"{len(bad)} E: frames from the client failed authentication (wrong key derivation?)",
    )


# ======================================================================================
# Recovery (PROTOCOL §13.6)
# ======================================================================================


@scenario("recovery-dedup", "§13.6", "a replayed duplicate (same topic, epoch, offset) is dropped")
async def recovery_dedup(ctx: ClientModeContext) -> None:
    session = await ctx.session()
    topic, epoch = ctx.topic("dedup"), random_epoch()
    await ctx.subscribe(session, topic)
    mark = len(session.frames)
    for offset in (0, 1, 1, 2, 0):
        ctx.send_stamped(session, topic, epoch, offset)
    end = await ctx.sync(session)
    offsets = ctx.offsets(session, topic, mark, end)
    ctx.must(offsets == [0, 1, 2], f"delivered offsets {offsets}, expected [0, 1, 2]")


@scenario(
    "recovery-gap",
    "§13.6",
    "a gap is not delivered; recovery is requested from the last offset; the replay fills it",
)
async def recovery_gap(ctx: ClientModeContext) -> None:
    session = await ctx.session()
    topic, epoch = ctx.topic("gap"), random_epoch()
    await ctx.subscribe(session, topic)
    mark = len(session.frames)
    ctx.send_stamped(session, topic, epoch, 0)
    ctx.send_stamped(session, topic, epoch, 1)
    await ctx.sync(session)
    gap_mark = len(session.frames)
    ctx.send_stamped(session, topic, epoch, 3)
    _, msg = await session.expect_message(
        "subscription_update",
        "recovery request after a gap",
        ctx.timeout,
        pred=lambda m: topic in ((m.get("p") or {}).get("topics") or []),
        since=gap_mark,
    )
    p = msg.get("p") or {}
    position = (p.get("recovery") or {}).get(topic) or {}
    ctx.must(p.get("recover") is True, f"recover is true: {describe(p)}")
    ctx.must(
        str(position.get("epoch", "")).lower() == epoch and position.get("offset") == 1,
        f"recovery position {describe(position)}, expected epoch {epoch} offset 1",
    )
    end = await ctx.sync(session)
    ctx.must(
        3 not in ctx.offsets(session, topic, gap_mark, end),
        "the message after the gap was delivered before the replay",
    )
    ctx.send_stamped(session, topic, epoch, 2)
    ctx.send_stamped(session, topic, epoch, 3)
    ctx.reply_subscription(session, {topic: (epoch, 3, True, 2)})
    end = await ctx.sync(session)
    offsets = ctx.offsets(session, topic, mark, end)
    ctx.must(offsets == [0, 1, 2, 3], f"delivered offsets {offsets}, expected [0, 1, 2, 3]")


@scenario(
    "rate-limited-retry-after",
    "§7.5, §11.1",
    "after RATE_LIMITED (retry_after 1.0) application sends are held back, not lost (SHOULD)",
)
async def rate_limited_retry_after(ctx: ClientModeContext) -> None:
    session = await ctx.session()
    mark = len(session.frames)
    retry_after = 1.0
    sent_at = monotonic()
    session.send_text(envelope.rate_limited().decode())
    ctx.command(session, "send", t="conformance_probe", p={"after": "RATE_LIMITED"})
    try:
        frame, _ = await session.expect_message(
            "conformance_probe", "the probe message", retry_after + ctx.timeout, since=mark
        )
    except Fail:
        ctx.should(False, "a message sent during retry_after was lost")
        return
    delay = frame.at - sent_at
    ctx.should(
        delay >= 0.9 * retry_after,
        f"the client sent an application message {delay:.2f} s after RATE_LIMITED "
        f"(retry_after {retry_after} s)",
    )
    ctx.note(f"probe arrived {delay:.2f} s after RATE_LIMITED")


# ======================================================================================
# Reconnection (PROTOCOL §12, §13.6) and malformed frames (§2.6); these end sessions
# ======================================================================================


@scenario(
    "recovery-resubscribe",
    "§13.6, §12",
    "after a drain close (4300) the client reconnects and resubscribes with recover:true "
    "and its positions",
)
async def recovery_resubscribe(ctx: ClientModeContext) -> None:
    session = await ctx.session()
    ctx.must(session.policy.recovery, "kit error: the session did not announce recovery")
    topic, epoch = ctx.topic("resub"), random_epoch()
    await ctx.subscribe(session, topic)
    mark = len(session.frames)
    for offset in range(3):
        ctx.send_stamped(session, topic, epoch, offset)
    end = await ctx.sync(session)
    ctx.must(
        ctx.offsets(session, topic, mark, end) == [0, 1, 2],
        "stamped messages 0..2 were not delivered",
    )
    index = len(ctx.server.sessions)
    session.close(DRAIN_CODE)  # a drain: every client reconnects (§12)
    new = await ctx.server.next_session(index, ctx.reconnect_timeout)
    ctx.current = new
    _, msg = await new.expect_message(
        "subscription_update",
        "resubscription after reconnecting",
        ctx.reconnect_timeout,
        pred=lambda m: topic in ((m.get("p") or {}).get("topics") or []),
        since=0,
    )
    p = msg.get("p") or {}
    ctx.must(
        p.get("action") == "subscribe" and p.get("recover") is True,
        f"resubscribe with recover:true: {describe(p)}",
    )
    position = (p.get("recovery") or {}).get(topic) or {}
    ctx.must(
        str(position.get("epoch", "")).lower() == epoch and position.get("offset") == 2,
        f"position {describe(position)}, expected epoch {epoch} offset 2",
    )
    outcomes = {}
    for t, pos in (p.get("recovery") or {}).items():
        if isinstance(pos, dict) and isinstance(pos.get("offset"), int):
            outcomes[t] = (pos.get("epoch"), pos["offset"], True, 0)
    ctx.reply_subscription(new, outcomes)
    await ctx._settle(new)


@scenario(
    "reconnect-backoff",
    "§12",
    "after a drain close (4300) the client answers it, then reconnects with growing delays",
)
async def reconnect_backoff(ctx: ClientModeContext) -> None:
    session = await ctx.session()
    server = ctx.server
    accepts = len(server.accepts)
    server.queue_policies(SessionPolicy(drop=True), SessionPolicy(drop=True))
    closed_at = monotonic()
    session.close(DRAIN_CODE)
    code, seen = await session.expect_end(ctx.timeout)
    ctx.must(seen, "the client did not answer the Close frame (RFC 6455 §5.5.1)")
    ctx.should(code == DRAIN_CODE, f"the Close echo carries {DRAIN_CODE} (got {code})")
    await server.wait(
        lambda: len(server.accepts) >= accepts + 3, "three reconnection attempts", 25.0
    )
    times = [t for t, _ in server.accepts[accepts : accepts + 3]]
    d1, d2, d3 = times[0] - closed_at, times[1] - times[0], times[2] - times[1]
    ctx.note(f"delays {d1:.2f} s, {d2:.2f} s, {d3:.2f} s")
    ctx.must(d1 >= 0.25, f"reconnected {d1:.2f} s after the close: no backoff")
    ctx.should(0.8 <= d1 <= 2.0, f"first retry after about 1 s (got {d1:.2f} s)")
    ctx.must(
        d2 > d1, f"the delay does not grow after a failed attempt ({d1:.2f} s, then {d2:.2f} s)"
    )
    ctx.should(d3 > d2, f"the delay keeps growing ({d2:.2f} s, then {d3:.2f} s)")
    new = await server.next_session(session.index + 1, ctx.reconnect_timeout)
    ctx.current = new
    await ctx._settle(new)


@scenario(
    "malformed-server-frames",
    "§2.6",
    "the client fails the connection on framing violations (masked, reserved opcodes, "
    "bad control frames)",
    vectors=("websocket:decode_frames",),
    timeout=120.0,
)
async def malformed_server_frames(ctx: ClientModeContext) -> None:
    problems = []
    for case in vectors.cases("websocket", "decode_frames"):
        inp, expected = case["input"], case["expected"]
        if not inp["client_side"] or "error" not in expected or "max_message_size" in inp:
            continue
        try:
            session = await ctx.session()
        except Fail as exc:
            problems.append(f"{case['id']}: no connection to test on ({exc})")
            break
        session.write_raw(bytes.fromhex(inp["data_hex"]))
        try:
            code, seen = await session.expect_end(3.0)
        except Fail:
            message = f"{case['id']}: the connection stayed open"
            if case["id"] in SHOULD_FRAME_CASES:
                ctx.should(False, message)
            else:
                problems.append(message)
            continue
        ctx.should(
            seen and code == expected["close_code"],
            f"{case['id']}: Close {expected['close_code']} (got {code if seen else 'no Close'})",
        )
        session.abort()
    ctx.must(not problems, "; ".join(problems))


@scenario(
    "reconnect-after-statusless-close",
    "§12, K7",
    "a Close without status (disconnect, idle timeout) is followed by a reconnect; run last",
)
async def reconnect_after_statusless_close(ctx: ClientModeContext) -> None:
    session = await ctx.session()
    index = len(ctx.server.sessions)
    session.close(None)
    _, seen = await session.expect_end(ctx.timeout)
    ctx.must(seen, "the client did not answer the Close frame (RFC 6455 §5.5.1)")
    wait = min(ctx.reconnect_timeout, STATUSLESS_WAIT)
    try:
        new = await ctx.server.next_session(index, wait)
    except Fail:
        raise Fail(
            f"no reconnection within {wait:g} s after a status-less Close (peer sees 1005)"
        ) from None
    ctx.current = new
    await ctx._settle(new)

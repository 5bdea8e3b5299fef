"""Wire behaviour over raw loopback sockets: auth failures, limits, malformed input, timers."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable

import jwt
import pytest

from .conftest import OTHER_SECRET, SECRET, AnyServer, drain_until, make_token
from .rawws import BINARY, CLOSE, PING, PONG, TEXT, RawWS, upgrade_request

pytestmark = pytest.mark.loopback


def assert_dropped_without_http(port: int, *, send_request: bool = True) -> None:
    """The server closes the TCP connection without writing a single byte (§1.2)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        if send_request:
            try:
                sock.sendall(upgrade_request(f"127.0.0.1:{port}"))
            except OSError:
                return  # already reset
        try:
            data = sock.recv(4096)
        except ConnectionResetError:
            return
        assert data == b""


def _auth_failure(port: int, headers: dict[str, str]) -> tuple[dict[str, object], int | None, str]:
    ws = RawWS(port, headers=headers)
    try:
        assert ws.status_line.startswith("HTTP/1.1 101")
        code, reason, before = ws.recv_close()
        assert len(before) == 1 and before[0][0] == TEXT
        ws.expect_eof()
        return json.loads(before[0][1]), code, reason
    finally:
        ws.close()


def none_alg_token() -> str:
    header = {"alg": "none", "typ": "JWT"}
    body = {"sub": "mallory", "exp": int(time.time()) + 600}

    def b64(obj: object) -> str:
        import base64

        raw = json.dumps(obj, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return f"{b64(header)}.{b64(body)}."


@pytest.mark.parametrize(
    ("case", "headers", "code", "message"),
    [
        ("missing", {}, "AUTH_REQUIRED", "No JWT cookie or Authorization header"),
        (
            "expired",
            {"Cookie": f"access_token={make_token(exp_in=-3600)}"},
            "AUTH_FAILED",
            "Authentication failed",
        ),
        (
            "wrong-key",
            {"Authorization": f"Bearer {make_token(key=OTHER_SECRET)}"},
            "AUTH_FAILED",
            "Authentication failed",
        ),
        (
            "wrong-kid",
            {"Cookie": f"access_token={make_token(headers={'kid': 'k2'})}"},
            "AUTH_FAILED",
            "Authentication failed",
        ),
        (
            "no-kid",
            {"Cookie": f"access_token={make_token()}"},
            "AUTH_FAILED",
            "Authentication failed",
        ),
        ("alg-none", {"Cookie": f"access_token={none_alg_token()}"}, "AUTH_FAILED", None),
        (
            "no-sub",
            {"Cookie": f"access_token={make_token(sub=None, headers={'kid': 'k1'})}"},
            "AUTH_FAILED",
            "Token missing user ID",
        ),
    ],
)
def test_auth_failures_get_error_frame_and_4401(
    server_factory: Callable[..., AnyServer],
    case: str,
    headers: dict[str, str],
    code: str,
    message: str | None,
) -> None:
    server = server_factory(jwt_key_id="k1")
    frame, close_code, reason = _auth_failure(server.port, headers)
    assert frame["t"] == "error" and frame["c"] == "WSE"
    p = frame["p"]
    assert isinstance(p, dict)
    assert p["code"] == code
    assert p["message"] == (message or "Authentication failed")
    assert (close_code, reason) == (4401, "Authentication failed")
    assert server.get_connection_count() == 0
    assert server.drain_inbound(256, 0) == []  # the app never hears of it
    assert "wse_auth_failures_total 1" in server.prometheus_metrics()


def test_valid_kid_accepted_and_server_ready_first(
    server_factory: Callable[..., AnyServer],
) -> None:
    server = server_factory(jwt_key_id="k1")
    ws = RawWS(server.port, token=make_token("kim", headers={"kid": "k1"}))
    try:
        ready = ws.recv_json()
        assert ready["t"] == "server_ready"
        assert ready["p"]["details"]["user_id"] == "kim"
        assert ready["p"]["message"] == "Connection established (Rust transport)"
        _, cid, user = drain_until(server, lambda e: e[0] == "auth_connect")
        assert (cid, user) == (ready["p"]["details"]["connection_id"], "kim")
        ws.send_json({"c": "WSE", "t": "client_hello", "p": {"protocol_version": 5}})
        hello = ws.recv_json()
        assert hello["t"] == "server_hello" and hello["p"]["protocol_version"] == 2
    finally:
        ws.close()


def test_no_jwt_connect_event_with_cookie_and_no_server_ready(
    server_factory: Callable[..., AnyServer],
) -> None:
    server = server_factory(jwt_secret=None)
    ws = RawWS(server.port, headers={"Cookie": "session=abc; theme=dark"})
    try:
        _, cid, cookies = drain_until(server, lambda e: e[0] == "connect")
        assert cookies == "session=abc; theme=dark"
        ws.send_json({"t": "hi", "payload": {"x": 1}})
        _, mcid, value = drain_until(server, lambda e: e[0] == "msg")
        assert mcid == cid and value == {"t": "hi", "p": {"x": 1}}  # keys normalised
        with pytest.raises(TimeoutError):
            ws.recv_frame(timeout=0.2)  # nothing unsolicited, no server_ready
    finally:
        ws.close()


def test_ping_pong_forms_and_single_control_pong(server: AnyServer) -> None:
    ws = RawWS(server.port, token=make_token())
    try:
        assert ws.recv_json()["t"] == "server_ready"
        ws.send_json({"c": "WSE", "t": "ping", "p": {"timestamp": 123}})
        op, payload = ws.recv_frame()
        assert op == TEXT
        assert payload.startswith(b'{"c":"WSE","t":"PONG","p":{"client_timestamp":123,')
        ws.send(PING, b"abc")
        assert ws.recv_frame() == (PONG, b"abc")
        with pytest.raises(TimeoutError):
            ws.recv_frame(timeout=0.3)  # F3: exactly one pong
    finally:
        ws.close()


def test_inbound_kinds_and_client_close_echo(server: AnyServer) -> None:
    ws = RawWS(server.port, token=make_token())
    try:
        ws.recv_json()
        ws.send_text("hello, not json")
        ws.send(BINARY, b"\x00\x01\x02\xff")
        ws.send_text('{"t":"echo","p":{"a":1}}')
        events = []
        drain_until(server, lambda e: e[0] == "msg", sink=events)
        kinds = [(k, v) for k, _, v in events if k != "auth_connect"]
        assert kinds == [
            ("raw", "hello, not json"),
            ("bin", b"\x00\x01\x02\xff"),
            ("msg", {"t": "echo", "p": {"a": 1}}),
        ]
        ws.send(CLOSE, b"\x03\xe8bye")
        assert ws.recv_frame() == (CLOSE, b"\x03\xe8bye")
        ws.expect_eof()
        drain_until(server, lambda e: e[0] == "disconnect")
    finally:
        ws.close()


def test_oversized_message_close_1009(server_factory: Callable[..., AnyServer]) -> None:
    server = server_factory(max_message_size=1024)
    for fragments in (False, True):
        ws = RawWS(server.port, token=make_token())
        try:
            ws.recv_json()
            if fragments:  # two fragments, each under the limit, 1200 bytes together
                ws.send(TEXT, b"x" * 600, fin=False)
                ws.send(0, b"y" * 600)
            else:
                ws.send_text("z" * 2000)
            code, reason, _ = ws.recv_close()
            assert (code, reason) == (1009, "message too large")  # F12
            ws.expect_eof()
        finally:
            ws.close()
    # exactly at the limit is accepted
    ws = RawWS(server.port, token=make_token())
    try:
        ws.recv_json()
        ws.send_text("a" * 1024)
        _, _, value = drain_until(server, lambda e: e[0] == "raw")
        assert value == "a" * 1024
    finally:
        ws.close()


@pytest.mark.parametrize(
    ("name", "raw", "code"),
    [
        ("unmasked", bytes([0x81, 0x02]) + b"hi", 1002),
        ("rsv-bits", bytes([0xC1, 0x82, 0, 0, 0, 0]) + b"hi", 1002),
        ("bad-opcode", bytes([0x83, 0x80, 0, 0, 0, 0]), 1002),
        ("bad-utf8", bytes([0x81, 0x82, 0, 0, 0, 0]) + b"\xc3\x28", 1007),
        ("fragmented-ping", bytes([0x09, 0x80, 0, 0, 0, 0]), 1002),
    ],
)
def test_malformed_frames_fail_the_connection(
    server: AnyServer, name: str, raw: bytes, code: int
) -> None:
    ws = RawWS(server.port, token=make_token())
    try:
        ws.recv_json()
        drain_until(server, lambda e: e[0] == "auth_connect")
        ws.sock.sendall(raw)
        got, _, _ = ws.recv_close()
        assert got == code, name
        ws.expect_eof()
        drain_until(server, lambda e: e[0] == "disconnect")
        assert server.get_connection_count() == 0
    finally:
        ws.close()


def test_bad_http_request_gets_400(server: AnyServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    assert data.split(b"\r\n", 1)[0] in (
        b"HTTP/1.1 400 Bad Request",
        b"HTTP/1.1 426 Upgrade Required",
    )


def test_idle_connection_gets_statusless_close_and_pings_first(
    server_factory: Callable[..., AnyServer],
) -> None:
    server = server_factory(ping_interval=0.2, idle_timeout=0.7)
    ws = RawWS(server.port, token=make_token())
    try:
        assert ws.recv_json()["t"] == "server_ready"
        started = time.monotonic()
        code, reason, before = ws.recv_close(timeout=5)
        elapsed = time.monotonic() - started
        pings = [json.loads(p) for op, p in before if op == TEXT]
        assert len(pings) >= 2 and all(m["t"] == "ping" for m in pings)
        assert (code, reason) == (None, "")
        assert 0.5 < elapsed < 3.0
        ws.send(CLOSE, b"")  # answer the close handshake; the server then drops TCP
        ws.expect_eof()
        drain_until(server, lambda e: e[0] == "disconnect")
    finally:
        ws.close()


def test_active_connection_is_not_idle_closed(server_factory: Callable[..., AnyServer]) -> None:
    server = server_factory(ping_interval=0.2, idle_timeout=0.5)
    ws = RawWS(server.port, token=make_token())
    try:
        ws.recv_json()
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            ws.send_json({"c": "WSE", "t": "PONG", "p": {}})
            time.sleep(0.1)
        assert server.get_connection_count() == 1
    finally:
        ws.close()


def test_handshake_timeout_drops_silent_socket(server_factory: Callable[..., AnyServer]) -> None:
    server = server_factory(handshake_timeout=0.3)
    started = time.monotonic()
    assert_dropped_without_http(server.port, send_request=False)
    assert time.monotonic() - started < 3.0


def test_max_connections_drops_extra_socket(server_factory: Callable[..., AnyServer]) -> None:
    server = server_factory(max_connections=2)
    a = RawWS(server.port, token=make_token("a"))
    b = RawWS(server.port, token=make_token("b"))
    try:
        assert_dropped_without_http(server.port)
        assert "wse_connections_rejected_total 1" in server.prometheus_metrics()
    finally:
        a.close()
        b.close()
    drain_until(server, lambda e: e[0] == "disconnect")
    drain_until(server, lambda e: e[0] == "disconnect")
    c = RawWS(server.port, token=make_token("c"))  # room again
    try:
        assert c.recv_json()["t"] == "server_ready"
    finally:
        c.close()


def test_pyjwt_rs256_token_with_public_key(server_factory: Callable[..., AnyServer]) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    server = server_factory(jwt_secret=public_pem, jwt_algorithm="RS256")
    token = jwt.encode({"sub": "rsa", "exp": int(time.time()) + 60}, private, algorithm="RS256")
    ws = RawWS(server.port, token=token)
    try:
        assert ws.recv_json()["p"]["details"]["user_id"] == "rsa"
    finally:
        ws.close()
    hs_token = make_token("x", key=SECRET)  # an HS256 token is refused by an RS256 server
    _, code, _ = _auth_failure(server.port, {"Cookie": f"access_token={hs_token}"})
    assert code == 4401

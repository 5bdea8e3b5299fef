"""Opening handshake (RFC 6455 §4): captured bytes, validation, rejections, client side."""

from __future__ import annotations

import base64
import hashlib
import json
import pathlib
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wse_proto.errors import LocalProtocolError, RemoteProtocolError
from wse_proto.ws import (
    ACCEPTED,
    NEED_DATA,
    REJECTED,
    TEXT,
    ClientHandshake,
    FrameDecoder,
    HandshakeRejected,
    ServerHandshake,
    accept_key,
    encode_frame,
)

RECORDS = json.loads(
    (pathlib.Path(__file__).parent / "data" / "client-protocol.json").read_text("utf-8")
)["records"]
CAPTURED_REQUEST = RECORDS[0]["data"].encode("latin-1")
CAPTURED_101 = RECORDS[1]["data"].encode("latin-1")
KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 §1.3 example


def request(
    target: str = "/wse",
    *,
    key: str = KEY,
    drop: tuple[str, ...] = (),
    extra: tuple[tuple[str, str], ...] = (),
    method: str = "GET",
    version: str = "HTTP/1.1",
    replace: dict[str, str] | None = None,
) -> bytes:
    headers = {
        "Host": "example.test",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": key,
        "Sec-WebSocket-Version": "13",
    }
    headers.update(replace or {})
    lines = [f"{method} {target} {version}"]
    lines += [f"{k}: {v}" for k, v in headers.items() if k not in drop]
    lines += [f"{k}: {v}" for k, v in extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def feed(data: bytes, **kw: int) -> ServerHandshake:
    hs = ServerHandshake(**kw)
    hs.receive_data(data)
    return hs


def fixed_rand(key_b64: str) -> Callable[[int], bytes]:
    raw = base64.b64decode(key_b64)

    def rand(n: int) -> bytes:
        assert n == 16
        return raw

    return rand


# ------------------------------------------------------------ captures


def test_accept_key_rfc_example_and_capture() -> None:
    assert accept_key(KEY) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert accept_key(b"goDO3MzHCE0d77y2Dkxikg==") == "B1hC9D9WOCWxbPUez5QGKr4NOJ8="
    guid = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
    expected = base64.b64encode(hashlib.sha1(KEY.encode() + guid).digest()).decode()
    assert accept_key(KEY) == expected


def test_captured_request_gives_the_captured_101_bytes() -> None:
    hs = feed(CAPTURED_REQUEST)
    assert hs.state is ACCEPTED
    assert hs.accept() == CAPTURED_101
    assert hs.status == 101
    assert hs.trailing_data == b""
    req = hs.request
    assert req is not None
    assert (req.method, req.path, req.query, req.target) == ("GET", "/wse", "", "/wse")
    assert req.cookie is not None and req.cookie.startswith("access_token=eyJ")
    assert req.authorization is not None and req.authorization.startswith("Bearer eyJ")
    assert req.cookie.split("=", 1)[1] == req.authorization.split(" ", 1)[1]
    assert req.get("HOST") == "127.0.0.1:18100"
    assert [name for name, _ in req.headers] == [
        "host",
        "upgrade",
        "connection",
        "sec-websocket-key",
        "sec-websocket-version",
        "cookie",
        "authorization",
    ]
    assert not req.wants_msgpack


def test_captured_request_one_byte_at_a_time_with_trailing_frames() -> None:
    first_frame = encode_frame(TEXT, b'{"t":"ping"}', mask_key=b"abcd")
    data = CAPTURED_REQUEST + first_frame
    hs = ServerHandshake()
    for i in range(len(data)):
        if hs.state is not NEED_DATA:
            break
        hs.receive_data(data[i : i + 1])
    assert hs.state is ACCEPTED
    assert hs.accept() == CAPTURED_101
    # The head ended exactly at the byte that completed it; the rest follows.
    rest = hs.trailing_data + data[len(CAPTURED_REQUEST) + len(hs.trailing_data) :]
    dec = FrameDecoder(client_side=False)
    dec.receive_data(rest)
    assert dec.messages() == [(TEXT, b'{"t":"ping"}')]


def test_client_handshake_reproduces_the_captured_request() -> None:
    server = feed(CAPTURED_REQUEST)
    assert server.request is not None
    client = ClientHandshake(
        "127.0.0.1:18100",
        "/wse",
        headers=[
            ("Cookie", server.request.cookie or ""),
            ("Authorization", server.request.authorization or ""),
        ],
        rand=fixed_rand("goDO3MzHCE0d77y2Dkxikg=="),
    )
    assert client.request_bytes == CAPTURED_REQUEST
    client.receive_data(CAPTURED_101 + b"\x81\x02hi")
    assert client.state is ACCEPTED
    assert client.status == 101
    assert client.trailing_data == b"\x81\x02hi"
    assert ("upgrade", "websocket") in client.response_headers


# ------------------------------------------------------------ request view


def test_query_is_kept_raw_and_msgpack_is_a_substring_test() -> None:
    hs = feed(request("/any/path?format=msgpack&client_version=2.5.1&topics=a%2Cb"))
    assert hs.state is ACCEPTED
    req = hs.request
    assert req is not None
    assert req.path == "/any/path"
    assert req.query == "format=msgpack&client_version=2.5.1&topics=a%2Cb"
    assert req.wants_msgpack
    # Reference §1.1: a plain substring test, so these match too.
    for query in ("xformat=msgpackz", "a=1&format=msgpack"):
        r = feed(request(f"/?{query}")).request
        assert r is not None and r.wants_msgpack
    for query in ("format=json", "format=MSGPACK", "format%3Dmsgpack"):
        r = feed(request(f"/?{query}")).request
        assert r is not None and not r.wants_msgpack


def test_header_helpers_and_latin1_values() -> None:
    hs = feed(
        request(
            extra=(
                ("Cookie", "a=1"),
                ("cookie", "b=2"),
                ("X-Bytes", "caf\xe9"),
                ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits"),
                ("Sec-WebSocket-Protocol", "chat, superchat"),
                ("Origin", "http://evil.example"),
            )
        )
    )
    assert hs.state is ACCEPTED
    req = hs.request
    assert req is not None
    assert req.cookie == "a=1"  # the first one, as the original reads it
    assert req.values("COOKIE") == ["a=1", "b=2"]
    assert req.authorization is None
    assert req.get("x-bytes") == "caf\xe9"
    assert req.values("x-bytes")[0].encode("latin-1") == b"caf\xe9"  # wire bytes come back
    assert req.offered_extensions == ["permessage-deflate; client_max_window_bits"]
    assert req.key == KEY
    # Offers are declined by omission: the 101 never names an extension or subprotocol.
    response = hs.accept()
    assert b"extensions" not in response.lower()
    assert b"protocol:" not in response.lower()
    assert response == (
        b"HTTP/1.1 101 Switching Protocols\r\nconnection: Upgrade\r\nupgrade: websocket\r\n"
        b"sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
    )


@pytest.mark.parametrize(
    "replace",
    [
        {"Upgrade": "WebSocket"},
        {"Upgrade": "h2c, websocket"},
        {"Connection": "keep-alive, Upgrade"},
        {"Connection": "UPGRADE"},
        {"Sec-WebSocket-Key": " " + KEY + " "},
    ],
)
def test_lenient_but_valid_header_forms_are_accepted(replace: dict[str, str]) -> None:
    hs = feed(request(replace=replace))
    assert hs.state is ACCEPTED
    assert accept_key(KEY).encode() in hs.accept()


def test_bare_lf_line_endings_are_accepted() -> None:
    hs = feed(request().replace(b"\r\n", b"\n") + b"\x81")
    assert hs.state is ACCEPTED
    assert hs.trailing_data == b"\x81"


# ------------------------------------------------------------ rejections


def _status(hs: ServerHandshake) -> int:
    assert hs.state is REJECTED
    assert hs.rejection is not None
    head, _, body = hs.rejection.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    assert status == hs.status
    assert lines[0].startswith(b"HTTP/1.1 ")
    assert b"connection: close" in lines
    assert f"content-length: {len(body)}".encode() in lines
    assert 0 < len(body) < 200
    return status


REJECTIONS = [
    ("plain HTTP GET", request(drop=("Upgrade", "Connection")), 426),
    ("upgrade to h2c", request(replace={"Upgrade": "h2c"}), 426),
    ("POST without upgrade", request(method="POST", drop=("Upgrade",)), 426),
    ("POST upgrade", request(method="POST"), 400),
    ("HTTP/1.0", request(version="HTTP/1.0"), 400),
    ("no Connection upgrade", request(replace={"Connection": "keep-alive"}), 400),
    ("no version", request(drop=("Sec-WebSocket-Version",)), 400),
    ("version 8", request(replace={"Sec-WebSocket-Version": "8"}), 426),
    ("two versions", request(extra=(("Sec-WebSocket-Version", "8"),)), 426),
    ("no key", request(drop=("Sec-WebSocket-Key",)), 400),
    ("key not base64", request(key="not base64 at all!!!!!!="), 400),
    ("key of 15 bytes", request(key=base64.b64encode(b"x" * 15).decode()), 400),
    ("key of 17 bytes", request(key=base64.b64encode(b"x" * 17).decode()), 400),
    ("two keys", request(extra=(("Sec-WebSocket-Key", KEY),)), 400),
    ("body", request(extra=(("Content-Length", "5"),)), 400),
    ("chunked body", request(extra=(("Transfer-Encoding", "chunked"),)), 400),
    ("no Host", request(drop=("Host",)), 400),
    ("garbage request line", b"GET\r\n\r\n", 400),
    ("bad header line", request().replace(b"Host:", b"Host :"), 400),
    ("TLS ClientHello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),
    ("leading blank line", b"\r\n" + request(), 400),
]


@pytest.mark.parametrize(
    ("data", "status"), [r[1:] for r in REJECTIONS], ids=[r[0] for r in REJECTIONS]
)
def test_invalid_requests_are_rejected(data: bytes, status: int) -> None:
    hs = feed(data)
    assert _status(hs) == status
    assert hs.error
    if status == 426:
        assert hs.rejection is not None
        assert b"sec-websocket-version: 13\r\n" in hs.rejection
        assert b"upgrade: websocket\r\n" in hs.rejection
    with pytest.raises(LocalProtocolError):
        hs.accept()
    with pytest.raises(LocalProtocolError):
        hs.receive_data(b"more")


def test_head_size_is_capped_even_byte_by_byte() -> None:
    hs = ServerHandshake(max_head_size=1024)
    line = b"X-Slow: " + b"a" * 50 + b"\r\n"
    hs.receive_data(b"GET / HTTP/1.1\r\n")
    fed = 16
    while hs.state is NEED_DATA:
        for i in range(len(line)):
            hs.receive_data(line[i : i + 1])
            fed += 1
            if hs.state is not NEED_DATA:
                break
    assert _status(hs) == 431
    assert fed == 1025  # refused at the first byte past the cap


def test_complete_but_oversized_head_is_refused() -> None:
    big = request(extra=(("X-Big", "b" * 40_000),))
    assert _status(feed(big)) == 431
    assert feed(big, max_head_size=65_536).state is ACCEPTED


def test_default_cap_fits_a_max_size_token_sent_twice() -> None:
    # wse-client sends the token as a cookie and as a bearer header; tokens may be 8 KiB.
    token = "t" * 8192
    req = request(extra=(("Cookie", f"access_token={token}"), ("Authorization", f"Bearer {token}")))
    assert feed(req).state is ACCEPTED
    # The cap is on the head only: trailing frame bytes do not count.
    hs = feed(request() + b"\x00" * 50_000, max_head_size=1024)
    assert hs.state is ACCEPTED
    assert len(hs.trailing_data) == 50_000


def test_application_reject_of_a_valid_request() -> None:
    hs = feed(request())
    assert hs.state is ACCEPTED
    with pytest.raises(LocalProtocolError):
        hs.reject(200)
    response = hs.reject(503, "draining")
    assert response.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert response.endswith(b"\r\n\r\ndraining\n")
    assert _status(hs) == 503
    with pytest.raises(LocalProtocolError):
        hs.accept()
    accepted = feed(request())
    accepted.accept()
    with pytest.raises(LocalProtocolError):
        accepted.reject(503)


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.integers(0, 2000), max_size=8),
    st.binary(max_size=40),
    st.sampled_from(["/wse", "/x?format=msgpack", "/?a=%20b"]),
)
def test_server_handshake_split_invariance(cuts: list[int], tail: bytes, target: str) -> None:
    data = request(target, extra=(("Cookie", "access_token=abc"),)) + tail
    whole = feed(data)
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]
    hs = ServerHandshake()
    consumed = 0
    for piece in pieces:
        if hs.state is not NEED_DATA:
            break
        hs.receive_data(piece)
        consumed += len(piece)
    assert hs.state is whole.state is ACCEPTED
    assert hs.request == whole.request
    assert hs.accept() == whole.accept()
    assert hs.trailing_data + data[consumed:] == whole.trailing_data == tail


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    hs = feed(data)
    if hs.state is REJECTED:
        assert hs.rejection is not None and hs.rejection.startswith(b"HTTP/1.1 4")
    elif hs.state is ACCEPTED:
        assert hs.accept().startswith(b"HTTP/1.1 101 ")


# ------------------------------------------------------------ client side


def _client() -> ClientHandshake:
    return ClientHandshake("h.test:80", "/wse?format=msgpack", rand=fixed_rand(KEY))


def test_client_request_shape_and_injected_key() -> None:
    client = ClientHandshake(
        "h.test", "/p?q=1", headers=[("Authorization", "Bearer t")], rand=fixed_rand(KEY)
    )
    assert client.key == KEY
    assert client.request_bytes.startswith(b"GET /p?q=1 HTTP/1.1\r\nHost: h.test\r\n")
    assert client.request_bytes.endswith(b"Authorization: Bearer t\r\n\r\n")
    server = feed(client.request_bytes)
    assert server.state is ACCEPTED
    client.receive_data(server.accept())
    assert client.state is ACCEPTED
    with pytest.raises(LocalProtocolError):
        client.receive_data(b"x")
    with pytest.raises(LocalProtocolError):
        ClientHandshake("h", "/", headers=[("X", "a\r\nInjected: 1")], rand=fixed_rand(KEY))


def test_client_accepts_a_101_split_byte_by_byte() -> None:
    client = _client()
    response = feed(client.request_bytes).accept() + b"\x82\x00"
    for i in range(len(response)):
        if client.state is ACCEPTED:
            break
        client.receive_data(response[i : i + 1])
    assert client.state is ACCEPTED


@pytest.mark.parametrize("status", [400, 401, 403, 426, 503])
def test_client_rejects_other_statuses_with_the_status(status: int) -> None:
    client = _client()
    with pytest.raises(HandshakeRejected) as info:
        client.receive_data(
            f"HTTP/1.1 {status} Nope\r\nContent-Length: 0\r\nX-Why: test\r\n\r\n".encode()
        )
    assert info.value.status == status
    assert ("x-why", "test") in info.value.headers
    assert isinstance(info.value, RemoteProtocolError)
    assert client.state is REJECTED
    assert client.status == status


def test_client_waits_through_100_continue() -> None:
    client = _client()
    client.receive_data(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert client.state is NEED_DATA
    client.receive_data(feed(client.request_bytes).accept())
    assert client.state is ACCEPTED


GOOD_ACCEPT = accept_key(KEY)
BAD_101 = [
    ("wrong accept", {"sec-websocket-accept": accept_key("x" * 24)}),
    ("no accept", {"sec-websocket-accept": None}),
    ("no upgrade", {"upgrade": None}),
    ("upgrade h2c", {"upgrade": "h2c"}),
    ("no connection", {"connection": None}),
    ("extension not offered", {"sec-websocket-extensions": "permessage-deflate"}),
    ("subprotocol not offered", {"sec-websocket-protocol": "chat"}),
]


@pytest.mark.parametrize("changes", [c[1] for c in BAD_101], ids=[c[0] for c in BAD_101])
def test_client_refuses_an_invalid_101(changes: dict[str, str | None]) -> None:
    headers: dict[str, str | None] = {
        "connection": "Upgrade",
        "upgrade": "websocket",
        "sec-websocket-accept": GOOD_ACCEPT,
    }
    headers.update(changes)
    lines = ["HTTP/1.1 101 Switching Protocols"]
    lines += [f"{k}: {v}" for k, v in headers.items() if v is not None]
    client = _client()
    with pytest.raises(RemoteProtocolError) as info:
        client.receive_data(("\r\n".join(lines) + "\r\n\r\n").encode())
    assert not isinstance(info.value, HandshakeRejected)
    assert client.state is REJECTED


def test_client_refuses_garbage_and_oversized_heads() -> None:
    with pytest.raises(RemoteProtocolError):
        _client().receive_data(b"SSH-2.0-OpenSSH\r\n\r\n")
    client = ClientHandshake("h", "/", rand=fixed_rand(KEY), max_head_size=256)
    with pytest.raises(RemoteProtocolError):
        client.receive_data(b"HTTP/1.1 101 Switching Protocols\r\n" + b"X: y\r\n" * 100)

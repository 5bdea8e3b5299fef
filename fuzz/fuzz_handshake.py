"""Fuzz the opening-handshake parsers (server request side, client response side).

Byte 0: bit 0 picks the role, bits 1-7 the read size. The server must never
raise on peer bytes and must give the same verdict however the bytes are split;
the client may raise only WSEError subclasses.
"""

from __future__ import annotations

import base64

from wse_proto.ws import (
    ACCEPTED,
    NEED_DATA,
    REJECTED,
    ClientHandshake,
    ServerHandshake,
    accept_key,
)

_KEY_RAW = b"0123456789abcdef"


def _server(data: bytes, step: int) -> tuple[object, ...]:
    hs = ServerHandshake(max_head_size=2048)
    fed = 0
    for i in range(0, len(data), step):
        if hs.state is not NEED_DATA:
            break
        hs.receive_data(data[i : i + step])
        fed = min(i + step, len(data))
    if hs.state is ACCEPTED:
        response = hs.accept()
        assert response.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
        assert hs.request is not None
        return (hs.state, hs.request, response, hs.trailing_data + data[fed:])
    if hs.state is REJECTED:
        assert hs.rejection is not None and hs.rejection.startswith(b"HTTP/1.1 4")
        return (hs.state, hs.status)
    return (hs.state,)


def target(data: bytes) -> None:
    if not data:
        return
    sel, body = data[0], data[1:]
    step = (sel >> 1) + 1
    if not sel & 1:
        whole = _server(body, max(len(body), 1))
        split = _server(body, step)
        if whole[0] is REJECTED and split[0] is REJECTED:
            return  # the reason may be found earlier when bytes trickle in
        assert whole == split, (whole, split)
        return
    client = ClientHandshake("h.test", "/wse", rand=lambda n: _KEY_RAW[:n], max_head_size=2048)
    for i in range(0, len(body), step):
        client.receive_data(body[i : i + step])
        if client.state is not NEED_DATA:
            break
    if client.state is ACCEPTED:
        assert client.status == 101


_ACCEPT = accept_key(base64.b64encode(_KEY_RAW)).encode()
SEEDS: list[bytes] = [
    b"\x00GET /wse?format=msgpack HTTP/1.1\r\nHost: 127.0.0.1:18100\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: goDO3MzHCE0d77y2Dkxikg==\r\n"
    b"Sec-WebSocket-Version: 13\r\nCookie: access_token=x\r\n\r\n\x81\x82abcd\x00\x00",
    b"\x06GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive\r\n\r\n",
    b"\x01HTTP/1.1 101 Switching Protocols\r\nconnection: Upgrade\r\nupgrade: websocket\r\n"
    b"sec-websocket-accept: " + _ACCEPT + b"\r\n\r\n\x81\x00",
    b"\x03HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n",
]

"""Binary frame decoders on arbitrary bytes: client binary frames on JSON and msgpack
connections (server side), every server frame form (client side, with and without a key),
zlib with a cap and msgpack.

``decode_client_binary`` must never raise; the others may raise only WSEError. msgpack
results are cross-checked between the C-extension fast path and the pure-Python decoder.
"""

from __future__ import annotations

import base64
import json
import pathlib
import zlib

import msgpack
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from wse_proto import codec
from wse_proto.errors import DecodeError, WSEError

_CAPTURE = (
    pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" / "client-protocol.json"
)
_KEY = bytes(range(32))
_AEAD = AESGCM(_KEY)
_IV = bytes(12)


def _eframe(plaintext: bytes) -> bytes:
    return b"E:" + _IV + _AEAD.encrypt(_IV, plaintext, None)


def _seeds() -> list[bytes]:
    body = b'{"c":"U","id":"x","p":{"k":"' + b"v" * 300 + b'"},"seq":1,"t":"echo","v":1}'
    seeds = [
        body,
        b"C:" + zlib.compress(body, 1),
        zlib.compress(body, 9),
        b"M:" + msgpack.packb({"t": "x", "p": {"a": [1, 2.5, None, b"\x00"]}}),
        msgpack.packb({"type": "x", 1: True, b"k": msgpack.ExtType(3, b"ab")}),
        b"\x91" * 64 + b"\x90",
        b"\x81\xa1t\xd6\xff\x00\x00\x00\x01",
        _eframe(b'{"t":"x","p":{}}'),
        _eframe(b'WSE{"t":"batch","p":{"messages":[{"t":"a"}]}}'),
        b"\xc1",
        b"",
    ]
    records = json.loads(_CAPTURE.read_text(encoding="utf-8"))["records"]
    for record in records:
        if record["opcode_name"] == "binary" and record["encoding"] == "base64":
            seeds.append(base64.b64decode(record["data"]))
    return seeds


SEEDS: list[bytes] = _seeds()


def _decrypt(frame: bytes) -> bytes:
    return _AEAD.decrypt(frame[2:14], frame[14:], None)


def target(data: bytes) -> None:
    for mp in (False, True):
        try:
            inbound = codec.decode_client_binary(data, msgpack=mp)
        except Exception as exc:
            raise AssertionError("decode_client_binary raised") from exc
        if inbound.kind == "bin":
            assert inbound.value == data
        else:
            assert mp and inbound.kind == "msg"

    try:
        fast = codec.msgpack_loads(data, allow_trailing=True)
    except DecodeError:
        fast = DecodeError
    try:
        slow = codec._py_value(data, 0, 0, codec.MSGPACK_MAX_DEPTH, False)[0]
    except DecodeError:
        slow = DecodeError
    assert fast == slow, "C fast path and pure-Python decoder disagree"

    for kwargs in ({}, {"decrypt": _decrypt}, {"max_size": 64}):
        try:
            events = codec.decode_server_message(data, **kwargs)  # type: ignore[arg-type]
        except WSEError:
            continue
        for event in events:
            assert type(event) is dict and type(event["p"]) is dict

    try:
        out = codec.zlib_decompress(data, 4096)
    except WSEError:
        return
    assert len(out) <= 4096

"""Fuzz E: frame decryption and public-key parsing (key exchange).

Input layout: the first byte's low bit picks the target, the rest is the frame
(bit 0 clear) or the client's public-key text (bit 1 set; decoded as UTF-8 with
surrogateescape so every byte string maps to some text, lone surrogates included).
"""

from __future__ import annotations

import base64

from wse_proto import crypto
from wse_proto.errors import DecryptionError, KeyExchangeError


def _fixed_rand(n: int) -> bytes:
    return b"\x07" * n  # a valid P-256 scalar and a fixed IV: reproducible runs


_KEY = bytes(range(32))
SESSION = crypto.EncryptionSession(_KEY, _fixed_rand)
_CLIENT = "BKl6hy9fslP7N9VL/BkEpApNKIIlHwsY1b1hXBBEKBboyl/ppz2jQuMmOzWdfPZPMnj5g1ZpalNiieZWUHP7vwU="

SEEDS: list[bytes] = [
    b"\x00" + SESSION.encrypt(b'{"c":"U","p":{"px":1},"t":"price"}'),
    b"\x00" + SESSION.encrypt(b""),
    b"\x00E:" + bytes(27),
    b"\x00E:",
    b"\x01" + _CLIENT.encode(),
    b"\x01" + _CLIENT.replace("/", "_").encode(),
    b"\x01" + _CLIENT.rstrip("=").encode(),
    b"\x01bm90IGEga2V5",
    b"\x01" + base64.b64encode(b"\x02" + bytes(32)),
    b"\x01!",
]


def target(data: bytes) -> None:
    if not data:
        return
    body = data[1:]
    if data[0] & 1 == 0:
        try:
            plaintext = SESSION.decrypt(body)
        except DecryptionError:
            pass
        else:
            # Only a genuine frame opens, and it re-seals to the same bytes (fixed IV).
            assert body[2:14] == b"\x07" * 12
            assert SESSION.encrypt(plaintext) == body
        try:
            SESSION.decrypt_payload(body)
        except DecryptionError:
            pass
        return
    text = body.decode("utf-8", "surrogateescape")
    try:
        session, server_public = crypto.server_key_exchange(text, _fixed_rand)
    except KeyExchangeError as exc:
        assert exc.message
        raise
    # Accepted keys are exactly the canonical wire form of a P-256 point.
    assert crypto.encode_public_key(crypto.decode_public_key(text)) == text
    assert len(session.key) == crypto.KEY_LEN and len(server_public) == 88

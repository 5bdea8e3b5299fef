"""Interop with the published wse-client 2.5.1 (SecurityManager, MessageCodec) and the
frames captured from the original server (tests/data/client-protocol.json).

The capture holds no private key (the client's scalar was not recorded), so its E:
frames cannot be opened; we check their structure against the '(decrypted)' records and
that its public keys and KEY_EXCHANGE_FAILED detail match our parser.
"""

from __future__ import annotations

import base64
import json
import pathlib
from typing import Any

import orjson
import pytest
from wse_client.compression import CompressionHandler
from wse_client.protocol import MessageCodec
from wse_client.security import SecurityManager

from wse_proto import crypto, signing
from wse_proto._defaults import system_rand
from wse_proto.errors import DecryptionError, KeyExchangeError

pytestmark = pytest.mark.interop

CAPTURE = pathlib.Path(__file__).resolve().parent / "data" / "client-protocol.json"


def _client_manager() -> tuple[SecurityManager, str]:
    sm = SecurityManager()
    public = base64.b64encode(sm.generate_keypair()).decode("ascii")  # as connection.py does
    return sm, public


def _handshake() -> tuple[SecurityManager, crypto.EncryptionSession]:
    """wse-client hello -> our server_key_exchange -> wse-client derives (client.py flow)."""
    sm, client_public = _client_manager()
    session, server_public = crypto.server_key_exchange(client_public, system_rand)
    sm.derive_shared_secret(base64.b64decode(server_public))
    return sm, session


def test_same_key_with_us_as_server() -> None:
    sm, session = _handshake()
    assert sm.is_enabled
    assert sm._aes_key == session.key


def test_same_key_with_us_as_client() -> None:
    # ECDH is symmetric: our key pair against SecurityManager's gives the key it derives.
    sm, client_public = _client_manager()
    ours = crypto.generate_keypair(system_rand)
    sm.derive_shared_secret(ours.public_bytes)
    assert crypto.derive_key(ours, client_public) == sm._aes_key


def test_our_frames_open_in_security_manager() -> None:
    sm, session = _handshake()
    text = '{"c":"U","p":{"msg":"h\u00e9llo \u2603"},"t":"chat"}'
    frame = session.encrypt(text.encode())
    # SecurityManager.decrypt takes the frame without its E: prefix.
    assert sm.decrypt(frame[2:]) == text


def test_security_manager_frames_open_with_us() -> None:
    sm, session = _handshake()
    for text in ("", '{"t":"echo","p":{"k":"v"}}', "x" * 5000):
        # connection.py sends b"E:" + SecurityManager.encrypt(text).
        frame = b"E:" + sm.encrypt(text)
        assert session.decrypt(frame).decode() == text
        assert session.decrypt_payload(frame[2:]).decode() == text


def test_tampered_frames_rejected_by_both() -> None:
    sm, session = _handshake()
    frame = bytearray(session.encrypt(b'{"t":"x"}'))
    frame[-1] ^= 1
    with pytest.raises(DecryptionError):
        session.decrypt(bytes(frame))
    with pytest.raises(Exception, match="Decryption failed"):
        sm.decrypt(bytes(frame[2:]))


def test_message_codec_decodes_our_e_frame() -> None:
    sm, session = _handshake()
    codec = MessageCodec(CompressionHandler(), security=sm)
    envelope = b'{"c":"U","id":"01a2","p":{"px":1},"seq":3,"t":"price","ts":"t","v":1}'
    event = codec.decode(session.encrypt(envelope))
    assert event is not None and not isinstance(event, list)
    assert (event.type, event.payload, event.category, event.sequence) == (
        "price",
        {"px": 1},
        "U",
        3,
    )
    # A frame under another key is dropped by the codec (returns None), as by the server.
    stranger = crypto.EncryptionSession(bytes(32), system_rand)
    assert codec.decode(stranger.encrypt(envelope)) is None


def test_client_signature_matches_message_codec() -> None:
    sm, _session = _handshake()
    sm.enable_signing()
    codec = MessageCodec(CompressionHandler(), security=sm)
    text = codec.encode("chat", {"text": "h\u00e9llo", "n": 1.25}, priority=8, correlation_id="c1")
    envelope: dict[str, Any] = orjson.loads(text)
    key = sm._signing_key
    assert signing.client_signature(envelope, key) == envelope["sig"]
    assert signing.verify_client_signature(envelope, key)
    assert sm.verify(signing.client_signed_bytes(envelope).decode(), envelope["sig"])
    # Without the client's private signing key nobody can verify it.
    assert not signing.verify_client_signature(envelope, bytes(32))


# ---------------------------------------------------------------- captured frames


def _records() -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = json.loads(CAPTURE.read_text(encoding="utf-8"))["records"]
    return records


def _e_frames() -> list[tuple[dict[str, Any], bytes]]:
    out = []
    for rec in _records():
        if rec.get("encoding") == "base64":
            raw = base64.b64decode(rec["data"])
            if raw[:2] == b"E:":
                out.append((rec, raw))
    return out


def test_captured_server_frames_match_decrypted_records() -> None:
    records = _records()
    checked = 0
    for i, rec in enumerate(records):
        if not rec.get("description", "").startswith("(decrypted)"):
            continue
        frame_rec = records[i - 1]
        assert frame_rec["direction"] == "server->client" and frame_rec["opcode"] == 2
        frame = base64.b64decode(frame_rec["data"])
        plaintext = rec["data"].encode("utf-8")
        assert frame[:2] == crypto.PREFIX
        assert len(frame) == 2 + crypto.IV_LEN + len(plaintext) + crypto.TAG_LEN
        assert frame[2:14].hex() == rec["iv_hex"]
        assert frame[-16:].hex() == rec["tag_hex"]
        checked += 1
    assert checked == 4


def test_captured_frames_do_not_open_without_the_key() -> None:
    frames = _e_frames()
    assert len(frames) == 6
    session = crypto.EncryptionSession(bytes(32), system_rand)
    for rec, raw in frames:
        assert len(raw) == rec["length"] and len(raw) - 2 >= crypto.MIN_PAYLOAD_LEN
        with pytest.raises(DecryptionError):
            session.decrypt(raw)


def test_captured_public_keys_parse_and_agree() -> None:
    records = _records()
    pairs = []
    for i, rec in enumerate(records):
        if '"t":"server_hello"' not in rec.get("data", ""):
            continue
        p = json.loads(rec["data"])["p"]
        if p["features"]["encryption"] is not True:
            continue
        hello = next(r for r in reversed(records[:i]) if r["direction"] == "client->server")
        pairs.append(
            (json.loads(hello["data"])["p"]["encryption_public_key"], p["encryption_public_key"])
        )
    assert len(pairs) == 1
    for public in pairs[0]:
        raw = base64.b64decode(public)
        assert len(raw) == crypto.PUBLIC_KEY_LEN and raw[0] == 4
        assert crypto.encode_public_key(crypto.decode_public_key(public)) == public
        session, _ = crypto.server_key_exchange(public, system_rand)
        assert len(session.key) == 32


def test_captured_key_exchange_failed_detail() -> None:
    records = _records()
    hello = next(r for r in records if "bm90IGEga2V5" in r.get("data", ""))
    reply = records[records.index(hello) + 1]
    message = json.loads(reply["data"])["p"]["message"]
    prefix = "ECDH key exchange failed: "
    assert message.startswith(prefix)
    bad_key = json.loads(hello["data"])["p"]["encryption_public_key"]
    with pytest.raises(KeyExchangeError) as info:
        crypto.server_key_exchange(bad_key, system_rand)
    assert info.value.message == message[len(prefix) :]

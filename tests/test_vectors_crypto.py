"""Runs every case of spec/vectors/crypto.json and spec/vectors/signing.json through our API.

The expected values were computed once with the raw primitives (cryptography, hashlib,
hmac, orjson), cross-checked against published known answers where they exist; here
everything is recomputed through wse_proto.crypto / wse_proto.signing and compared.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import pytest
from _vectors import check_case, load

from wse_proto import crypto, signing

CRYPTO = load("crypto")
SIGNING = load("signing")


class ScriptedRand:
    """rand() that returns the given chunks in order (the last one again once exhausted)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.calls = 0

    def __call__(self, n: int) -> bytes:
        if not self.chunks:
            raise AssertionError("rand must not be called")
        chunk = self.chunks[min(self.calls, len(self.chunks) - 1)]
        self.calls += 1
        return chunk


def _h(value: str) -> bytes:
    return bytes.fromhex(value)


def op_keypair_from_rand(inp: dict[str, Any]) -> dict[str, Any]:
    rand = ScriptedRand([_h(d) for d in inp["draws_hex"]])
    pair = crypto.generate_keypair(rand)
    assert rand.calls == len(inp["draws_hex"]), "the first in-range draw must be the one used"
    scalar = pair.private_key.private_numbers().private_value
    assert base64.b64decode(pair.public_key_b64) == pair.public_bytes
    return {"private_hex": scalar.to_bytes(32, "big").hex(), "public_b64": pair.public_key_b64}


def op_ecdh(inp: dict[str, Any]) -> dict[str, Any]:
    client = crypto.keypair_from_scalar(int(inp["client_private_hex"], 16))
    server = crypto.keypair_from_scalar(int(inp["server_private_hex"], 16))
    secret = crypto.shared_secret(client, server.public_key_b64)
    assert crypto.shared_secret(server, client.public_key_b64) == secret
    key = crypto.derive_key(client, server.public_key_b64)
    assert crypto.derive_key(server, client.public_key_b64) == key
    assert crypto.hkdf_key(secret) == key
    legacy = crypto.hkdf_key(secret, salt=crypto.LEGACY_HKDF_SALT, info=crypto.LEGACY_HKDF_INFO)
    return {
        "client_public_b64": client.public_key_b64,
        "server_public_b64": server.public_key_b64,
        "shared_secret_hex": secret.hex(),
        "key_hex": key.hex(),
        "legacy_key_hex": legacy.hex(),
    }


def op_hkdf(inp: dict[str, Any]) -> dict[str, Any]:
    salt = None if inp["salt_hex"] is None else _h(inp["salt_hex"])
    key = crypto.hkdf_key(_h(inp["secret_hex"]), salt=salt, info=_h(inp["info_hex"]))
    return {"key_hex": key.hex()}


def op_encrypt(inp: dict[str, Any]) -> dict[str, Any]:
    iv = _h(inp["iv_hex"])
    session = crypto.EncryptionSession(_h(inp["key_hex"]), ScriptedRand([iv]))
    frame = session.encrypt(_h(inp["plaintext_hex"]))
    return {"frame_hex": frame.hex()}


def op_decrypt(inp: dict[str, Any]) -> dict[str, Any]:
    session = crypto.EncryptionSession(_h(inp["key_hex"]), ScriptedRand([]))
    frame = _h(inp["frame_hex"])
    plaintext = session.decrypt(frame)
    # The prefix-less form gives the same answer for a well-formed frame.
    assert session.decrypt_payload(frame[2:]) == plaintext
    return {"plaintext_hex": plaintext.hex()}


def op_server_key_exchange(inp: dict[str, Any]) -> dict[str, Any]:
    rand = ScriptedRand([_h(c) for c in inp["rand_hex"]])
    session, server_public = crypto.server_key_exchange(inp["client_public_b64"], rand)
    frame = session.encrypt(_h(inp["plaintext_hex"]))
    assert rand.calls == len(inp["rand_hex"])
    return {
        "server_public_b64": server_public,
        "key_hex": session.key.hex(),
        "frame_hex": frame.hex(),
    }


def op_decode_public_key(inp: dict[str, Any]) -> dict[str, Any]:
    key = crypto.decode_public_key(inp["public_b64"])
    assert crypto.encode_public_key(key) == inp["public_b64"]
    return {"public_hex": base64.b64decode(inp["public_b64"]).hex()}


def op_hmac_sha256(inp: dict[str, Any]) -> dict[str, Any]:
    return {"mac_hex": signing.hmac_sha256(_h(inp["key_hex"]), _h(inp["data_hex"])).hex()}


def op_sha256_hex(inp: dict[str, Any]) -> dict[str, Any]:
    data: bytes | str = inp["data_text"] if "data_text" in inp else _h(inp["data_hex"])
    return {"digest_text": signing.sha256_hex(data)}


def op_sign_message(inp: dict[str, Any]) -> dict[str, Any]:
    return {"signature_text": signing.sign_message(inp["payload_text"], _h(inp["secret_hex"]))}


def op_client_signature(inp: dict[str, Any]) -> dict[str, Any]:
    env = inp["envelope"]
    return {
        "signed_text": signing.client_signed_bytes(env).decode("utf-8"),
        "signature_text": signing.client_signature(env, _h(inp["key_hex"])),
    }


def op_verify_client_signature(inp: dict[str, Any]) -> dict[str, Any]:
    return {"valid": signing.verify_client_signature(inp["envelope"], _h(inp["key_hex"]))}


OPS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "keypair_from_rand": op_keypair_from_rand,
    "ecdh": op_ecdh,
    "hkdf": op_hkdf,
    "encrypt": op_encrypt,
    "decrypt": op_decrypt,
    "server_key_exchange": op_server_key_exchange,
    "decode_public_key": op_decode_public_key,
    "hmac_sha256": op_hmac_sha256,
    "sha256_hex": op_sha256_hex,
    "sign_message": op_sign_message,
    "client_signature": op_client_signature,
    "verify_client_signature": op_verify_client_signature,
}

CASES = [(doc["name"], case) for doc in (CRYPTO, SIGNING) for case in doc["cases"]]


@pytest.mark.parametrize("doc", [CRYPTO, SIGNING], ids=["crypto", "signing"])
def test_vector_file_header(doc: dict[str, Any]) -> None:
    assert doc["format"] == "wse-test-vectors"
    assert doc["version"] == 1
    ids = [c["id"] for c in doc["cases"]]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    assert {c["op"] for c in doc["cases"]} <= OPS.keys()


@pytest.mark.parametrize(("name", "case"), CASES, ids=[f"{n}:{c['id']}" for n, c in CASES])
def test_vector(name: str, case: dict[str, Any]) -> None:
    run = OPS[case["op"]]
    expected = case["expected"]
    error = check_case(lambda: run(case["input"]), expected)
    if error is not None and "message_text" in expected:
        assert error.message == expected["message_text"]

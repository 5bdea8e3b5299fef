"""Runs every case of spec/vectors/jwt.json through wse_proto.auth.

The tokens are fixed strings made once with the file's TEST-ONLY keys; each case carries the
wall-clock ``now`` it was made for. The expectations were checked against the original
server (wse-server 2.5.1) with the same cases re-timed to the real clock.
"""

from __future__ import annotations

import base64
from typing import Any

import jwt as pyjwt
import pytest
from _vectors import case_ids, check_header, load
from cryptography.hazmat.primitives import serialization

from wse_proto import auth, errors

DOC = load("jwt")
CASES: list[dict[str, Any]] = DOC["cases"]
KEYS: dict[str, str] = next(c for c in CASES if c["op"] == "test_keys")["input"]["keys_text"]


def _key(spec: dict[str, Any], name: str) -> str | None:
    """A key named by id, or the literal ``key_text_inline`` secret."""
    if name == "key" and "key_text_inline" in spec:
        text: str = spec["key_text_inline"]
        return text
    ref = spec.get(name)
    return None if ref is None else KEYS[ref]


def _config(cfg: dict[str, Any]) -> auth.JWTConfig:
    key = _key(cfg, "key")
    assert key is not None
    return auth.JWTConfig(
        key.encode(),
        cfg.get("algorithm", "HS256"),
        issuer=cfg.get("issuer"),
        audience=cfg.get("audience"),
        cookie_name=cfg.get("cookie_name", "access_token"),
        previous_key=None if cfg.get("previous_key") is None else KEYS[cfg["previous_key"]],
        key_id=cfg.get("key_id"),
        require_claims=cfg.get("require_claims", False),
        private_key=_key(cfg, "private_key"),
    )


def _b64_text(segment: str) -> str:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)).decode()


def _run_test_keys(inp: dict[str, Any], exp: dict[str, Any]) -> None:
    keys = inp["keys_text"]
    for private_name, public_name in exp["pairs"]:
        private = serialization.load_pem_private_key(keys[private_name].encode(), None)
        derived = private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        assert derived.decode() == keys[public_name]
    for name, text in keys.items():
        if name.startswith("hs_"):
            assert len(text.encode()) >= auth.MIN_HS256_SECRET


def _run_authenticate(inp: dict[str, Any], exp: dict[str, Any]) -> None:
    config = _config(inp["config"])
    if "error" in exp:
        with pytest.raises(errors.AuthError) as info:
            auth.authenticate(inp["cookie"], inp["authorization"], config, inp["now"])
        assert type(info.value) is getattr(errors, exp["error"])
        assert info.value.message == exp["message"]
        if exp["error"] == "AuthFailed":
            assert auth.failure_reason(info.value)  # the precise cause is kept for logs
        return
    identity = auth.authenticate(inp["cookie"], inp["authorization"], config, inp["now"])
    assert identity.user_id == exp["user_id"]
    assert identity.source == exp["source"]
    assert identity.claims["sub"] == exp["user_id"]
    if "claims" in exp:
        assert identity.claims == exp["claims"]
        for k, v in exp["claims"].items():
            assert type(identity.claims[k]) is type(v), k
    if "acl" in exp:
        if exp["acl"] is None:
            assert identity.acl is None
        else:
            assert identity.acl is not None
            assert list(identity.acl.allow) == exp["acl"]["allow"]
            assert list(identity.acl.deny) == exp["acl"]["deny"]


def _run_extract_token(inp: dict[str, Any], exp: dict[str, Any]) -> None:
    found = auth.extract_token(inp["cookie"], inp["authorization"], inp["cookie_name"])
    if exp["token"] is None:
        assert found is None
    else:
        assert found == auth.ExtractedToken(exp["token"], exp["source"])


def _run_decode_token(inp: dict[str, Any], exp: dict[str, Any]) -> None:
    key = _key(inp, "key")
    assert key is not None
    previous = _key(inp, "previous_key")
    claims = auth.decode_token(
        inp["token"],
        key.encode(),
        inp.get("algorithm", "HS256"),
        inp.get("issuer"),
        inp.get("audience"),
        None if previous is None else previous.encode(),
        inp.get("key_id"),
        now=inp["now"],
    )
    assert claims == exp["claims"]


def _run_encode_token(inp: dict[str, Any], exp: dict[str, Any]) -> None:
    key = _key(inp, "key")
    assert key is not None
    if "raises" in exp:
        with pytest.raises(ValueError):
            auth.encode_token(inp["claims"], key.encode(), inp["algorithm"], inp["key_id"])
        return
    token = auth.encode_token(inp["claims"], key.encode(), inp["algorithm"], inp["key_id"])
    if "token" in exp:
        assert token == exp["token"]
        return
    header, payload, _ = token.split(".")
    assert _b64_text(header) == exp["header_text"]
    assert _b64_text(payload) == exp["payload_text"]
    # Independent check of the randomised signature with pyjwt itself.
    decoded = pyjwt.decode(
        token, KEYS[exp["verify_key"]], algorithms=[inp["algorithm"]], options={"require": []}
    )
    assert decoded == inp["claims"]


RUNNERS = {
    "test_keys": _run_test_keys,
    "authenticate": _run_authenticate,
    "extract_token": _run_extract_token,
    "decode_token": _run_decode_token,
    "encode_token": _run_encode_token,
}


def test_vector_file_header() -> None:
    check_header(DOC, "jwt", RUNNERS)


@pytest.mark.parametrize("case", CASES, ids=case_ids(DOC))
def test_vector(case: dict[str, Any]) -> None:
    RUNNERS[case["op"]](case["input"], case["expected"])

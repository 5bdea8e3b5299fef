"""wse_proto.auth: configuration checks, extraction, validation rules and properties.

Real keys and real tokens throughout; tokens are built here with pyjwt / cryptography /
hmac directly (not with our encoder) unless the encoder itself is under test.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import hmac
import json
import math
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from wse_proto import auth, errors

NOW = 1_795_000_000
SECRET = b"unit-test-secret-not-for-production!"
PREVIOUS = b"unit-test-previous-secret-not-for-prod"

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
EC384_KEY = ec.generate_private_key(ec.SECP384R1())


def _pem_private(key: Any) -> bytes:
    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _pem_public(key: Any, fmt: Any = serialization.PublicFormat.SubjectPublicKeyInfo) -> bytes:
    return bytes(key.public_key().public_bytes(serialization.Encoding.PEM, fmt))


RSA_PRIVATE, RSA_PUBLIC = _pem_private(RSA_KEY), _pem_public(RSA_KEY)
EC_PRIVATE, EC_PUBLIC = _pem_private(EC_KEY), _pem_public(EC_KEY)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs_token(header: str, payload: str, key: bytes = SECRET) -> str:
    signing_input = b64(header.encode()) + "." + b64(payload.encode())
    sig = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(sig)


def token(key: bytes = SECRET, headers: dict[str, Any] | None = None, **claims: Any) -> str:
    body: dict[str, Any] = {"sub": "alice", "exp": NOW + 3600}
    body.update(claims)
    return pyjwt.encode({k: v for k, v in body.items() if v is not ...}, key, "HS256", headers)


CONFIG = auth.JWTConfig(SECRET)


def reject_reason(tok: str, config: auth.JWTConfig = CONFIG, now: float = NOW) -> str:
    with pytest.raises(errors.AuthFailed) as info:
        auth.authenticate("access_token=" + tok, None, config, now)
    assert info.value.message == auth.AUTH_FAILED_MESSAGE
    reason = auth.failure_reason(info.value)
    assert reason is not None
    return reason


# ---------------------------------------------------------------------------
# JWTConfig
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["HS384", "hs256", "none", "", "PS256", None, 1])
def test_config_rejects_unsupported_algorithms(algorithm: Any) -> None:
    with pytest.raises(ValueError, match="Unsupported jwt_algorithm"):
        auth.JWTConfig(SECRET, algorithm)


def test_config_hs256_secret_lengths() -> None:
    auth.JWTConfig(b"k" * 32)
    assert auth.JWTConfig("k" * 32) == auth.JWTConfig(bytearray(b"k" * 32))
    assert auth.JWTConfig("k" * 32).key == b"k" * 32
    with pytest.raises(ValueError, match="at least 32 bytes"):
        auth.JWTConfig(b"k" * 31)
    with pytest.raises(ValueError, match="jwt_previous_secret must be at least 32 bytes"):
        auth.JWTConfig(SECRET, previous_key=b"p" * 31)


def test_config_asymmetric_keys() -> None:
    auth.JWTConfig(RSA_PUBLIC, "RS256")
    auth.JWTConfig(_pem_public(RSA_KEY, serialization.PublicFormat.PKCS1), "RS256")
    auth.JWTConfig(EC_PUBLIC.decode(), "ES256", previous_key=EC_PUBLIC)
    bad = [
        (b"not a pem", "RS256"),
        (b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "RS256"),
        (EC_PUBLIC, "RS256"),
        (RSA_PUBLIC, "ES256"),
        (_pem_public(EC384_KEY), "ES256"),  # ES256 means P-256
        (RSA_PRIVATE, "RS256"),  # a private key is not the verification key
        (EC_PRIVATE, "ES256"),
    ]
    for key, alg in bad:
        with pytest.raises(ValueError, match=f"Invalid {alg}"):
            auth.JWTConfig(key, alg)
    with pytest.raises(ValueError, match="jwt_previous_secret"):
        auth.JWTConfig(RSA_PUBLIC, "RS256", previous_key=SECRET)


def test_config_private_key_is_checked_then_dropped() -> None:
    cfg = auth.JWTConfig(RSA_PUBLIC, "RS256", private_key=RSA_PRIVATE)
    assert "private_key" not in {f.name for f in dataclasses.fields(cfg)}
    assert getattr(cfg, "private_key", None) is None
    assert "PRIVATE" not in repr(cfg)
    with pytest.raises(ValueError, match="jwt_private_key"):
        auth.JWTConfig(RSA_PUBLIC, "RS256", private_key=b"zzz")
    with pytest.raises(ValueError, match="jwt_private_key"):
        auth.JWTConfig(RSA_PUBLIC, "RS256", private_key=EC_PRIVATE)
    with pytest.raises(ValueError, match="jwt_private_key"):
        auth.JWTConfig(EC_PUBLIC, "ES256", private_key=RSA_PRIVATE)
    # The original ignores jwt_private_key with HS256.
    auth.JWTConfig(SECRET, private_key=b"zzz")


def test_config_repr_hides_secrets_and_checks_types() -> None:
    text = repr(auth.JWTConfig(SECRET, previous_key=PREVIOUS))
    assert SECRET.decode() not in text
    assert PREVIOUS.decode() not in text
    for kwargs in ({"leeway": -1}, {"leeway": True}, {"max_token_bytes": 1.5}, {"issuer": 5}):
        with pytest.raises(ValueError):
            auth.JWTConfig(SECRET, **kwargs)
    with pytest.raises(ValueError):
        auth.JWTConfig(12345)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------

ANY_TEXT = st.text(st.characters() | st.characters(categories=["Cs"]) | st.sampled_from(";= \t"))
HEADERS = (
    st.none()
    | ANY_TEXT
    | st.builds(
        lambda a, b: a + b,
        st.sampled_from(["access_token=", "Bearer ", "bearer ", "x=1; access_token="]),
        ANY_TEXT,
    )
)


@settings(max_examples=400)
@given(HEADERS, HEADERS, st.sampled_from(["access_token", "jwt", ""]))
def test_extract_token_never_raises(
    cookie: str | None, authorization: str | None, name: str
) -> None:
    found = auth.extract_token(cookie, authorization, name)
    if found is None:
        return
    assert found.token
    if found.source == "cookie":
        assert cookie is not None
        assert found.token in cookie
        assert found.token not in ("undefined", "null")
        assert found.token == found.token.strip(" \t")
    else:
        assert authorization is not None
        assert authorization[:7].lower() == "bearer "
        assert found.token == authorization[7:]
        # Only used when the cookie offers nothing usable.
        assert auth.extract_token(cookie, None, name) is None


@settings(max_examples=200)
@given(ANY_TEXT.filter(lambda s: s and all(c not in s for c in ";\t ")))
def test_cookie_token_wins_over_bearer(value: str) -> None:
    found = auth.extract_token(f"access_token={value}", "Bearer other", "access_token")
    readable = all(c == "\t" or " " <= c <= "~" for c in value)
    if readable and value not in ("undefined", "null"):
        assert found == auth.ExtractedToken(value, "cookie")
    else:
        # Placeholder, or a header the original cannot read: the bearer token is used.
        assert found == auth.ExtractedToken("other", "authorization")


def test_invalid_cookie_token_means_header_not_tried() -> None:
    bad = token(key=b"x" * 32)
    good = token()
    assert auth.extract_token("access_token=" + bad, "Bearer " + good, "access_token") == (
        auth.ExtractedToken(bad, "cookie")
    )
    with pytest.raises(errors.AuthFailed) as info:
        auth.authenticate("access_token=" + bad, "Bearer " + good, CONFIG, NOW)
    assert auth.failure_reason(info.value) == "invalid signature"
    identity = auth.authenticate("access_token=undefined", "Bearer " + good, CONFIG, NOW)
    assert identity.source == "authorization"
    assert identity.user_id == "alice"


# ---------------------------------------------------------------------------
# Validation rules
# ---------------------------------------------------------------------------


def test_no_token_is_auth_required() -> None:
    with pytest.raises(errors.AuthRequired) as info:
        auth.authenticate(None, None, CONFIG, NOW)
    assert info.value.message == "No JWT cookie or Authorization header"
    assert info.value.error_code == "AUTH_REQUIRED"
    assert info.value.close_code == 4401


def test_identity_fields() -> None:
    tok = token(role="admin", wse_topics={"allow": ["chat.*"]})
    identity = auth.authenticate(None, "Bearer " + tok, CONFIG, NOW)
    assert identity.user_id == "alice"
    assert identity.claims["role"] == "admin"
    assert identity.source == "authorization"
    assert identity.acl is not None
    assert identity.acl.is_allowed("chat.x")
    assert not identity.acl.is_allowed("news")


@settings(max_examples=150, deadline=None)
@given(st.integers(-120, 120), st.sampled_from([0, 10, 30, 90]), st.floats(0, 0.999))
def test_exp_boundary_follows_leeway(offset: int, leeway: int, fraction: float) -> None:
    config = auth.JWTConfig(SECRET, leeway=leeway)
    tok = token(exp=NOW + offset)
    now = NOW + fraction  # fractions of the current second do not count
    if offset >= -leeway:
        assert auth.authenticate("access_token=" + tok, None, config, now).user_id == "alice"
    else:
        assert reject_reason(tok, config, now).startswith("token expired")


@settings(max_examples=150, deadline=None)
@given(st.integers(-120, 120), st.sampled_from([0, 30, 60]))
def test_nbf_boundary_follows_leeway(offset: int, leeway: int) -> None:
    config = auth.JWTConfig(SECRET, leeway=leeway)
    tok = token(nbf=NOW + offset)
    if offset <= leeway:
        assert auth.authenticate("access_token=" + tok, None, config, NOW).user_id == "alice"
    else:
        assert reject_reason(tok, config).startswith("token not yet valid")


@settings(max_examples=150, deadline=None)
@given(st.floats(-40.0, -20.0))
def test_float_exp_rounds_half_away_from_zero(offset: float) -> None:
    exp = NOW + offset
    # Exact decimal value of the float, rounded half away from zero (Rust's f64::round).
    rounded = int(Decimal(exp).quantize(Decimal(1), rounding=ROUND_HALF_UP))
    tok = token(exp=exp)
    accepted = rounded >= NOW - 30
    if accepted:
        assert auth.authenticate("access_token=" + tok, None, CONFIG, NOW).claims["exp"] == exp
    else:
        assert reject_reason(tok).startswith("token expired")


def test_failure_reasons_are_precise() -> None:
    assert reject_reason(token(exp=...)) == "claim 'exp' missing"
    assert reject_reason(token(key=b"y" * 32)) == "invalid signature"
    assert "not the configured HS256" in reject_reason(hs_token('{"alg":"none"}', "{}"))
    assert reject_reason("a.b") == "malformed token: 2 segments, expected 3"
    assert "too large" in reject_reason(token(pad="x" * 9000))
    kid_cfg = auth.JWTConfig(SECRET, key_id="k1")
    assert "kid None" in reject_reason(token(), kid_cfg)
    rot = auth.JWTConfig(SECRET, key_id="k1", previous_key=PREVIOUS)
    both = reject_reason(token(key=b"z" * 32, headers={"kid": "k1"}), rot)
    assert both == "invalid signature; with the previous key: invalid signature"
    issuer_cfg = auth.JWTConfig(SECRET, issuer="me")
    assert (
        reject_reason(token(iss="you"), issuer_cfg)
        == "claim 'iss' does not match the configured value"
    )


def test_rotation_only_after_signature_or_kid_failure() -> None:
    # Same secret as current and previous: a kid failure is rescued by the kid-less retry,
    # an expiry is not retried (and would fail again anyway).
    same = auth.JWTConfig(SECRET, key_id="k1", previous_key=SECRET)
    assert auth.authenticate("access_token=" + token(headers={"kid": "zz"}), None, same, NOW)
    assert reject_reason(token(headers={"kid": "k1"}, exp=NOW - 100), same).startswith(
        "token expired"
    )
    rot = auth.JWTConfig(SECRET, previous_key=PREVIOUS)
    assert auth.authenticate("access_token=" + token(key=PREVIOUS), None, rot, NOW)
    assert "with the previous key: token expired" in reject_reason(
        token(key=PREVIOUS, exp=NOW - 100), rot
    )


def test_require_claims_extension() -> None:
    strict = auth.JWTConfig(SECRET, issuer="me", audience="app", require_claims=True)
    assert "'iss' missing" in reject_reason(token(aud="app"), strict)
    assert "'aud' missing" in reject_reason(token(iss="me", aud=5), strict)
    assert auth.authenticate("access_token=" + token(iss="me", aud="app"), None, strict, NOW)
    lenient = auth.JWTConfig(SECRET, issuer="me", audience="app")
    assert auth.authenticate("access_token=" + token(), None, lenient, NOW)


def test_max_token_bytes_is_configurable() -> None:
    tok = token()
    small = auth.JWTConfig(SECRET, max_token_bytes=len(tok) - 1)
    assert "too large" in reject_reason(tok, small)
    exact = auth.JWTConfig(SECRET, max_token_bytes=len(tok))
    assert auth.authenticate("access_token=" + tok, None, exact, NOW).user_id == "alice"


def test_asymmetric_round_trips_through_pyjwt() -> None:
    claims = {"sub": "carol", "exp": NOW + 60}
    rs = pyjwt.encode(claims, RSA_PRIVATE, "RS256")
    es = pyjwt.encode(claims, EC_PRIVATE, "ES256")
    rs_cfg = auth.JWTConfig(RSA_PUBLIC, "RS256")
    es_cfg = auth.JWTConfig(EC_PUBLIC, "ES256")
    assert auth.authenticate("access_token=" + rs, None, rs_cfg, NOW).user_id == "carol"
    assert auth.authenticate("access_token=" + es, None, es_cfg, NOW).user_id == "carol"
    assert reject_reason(rs, es_cfg).startswith("header alg 'RS256'")
    # A DER-encoded ECDSA signature is not the JWS form (raw r||s).
    header, payload, _ = es.split(".")
    der = EC_KEY.sign(f"{header}.{payload}".encode(), ec.ECDSA(hashes.SHA256()))
    assert reject_reason(f"{header}.{payload}.{b64(der)}", es_cfg) == "invalid signature"


def test_now_must_be_finite() -> None:
    for bad in (math.nan, math.inf):
        with pytest.raises(errors.LocalProtocolError):
            auth.authenticate("access_token=" + token(), None, CONFIG, bad)


@settings(max_examples=300, deadline=None)
@given(HEADERS, HEADERS)
def test_authenticate_only_raises_auth_errors(
    cookie: str | None, authorization: str | None
) -> None:
    try:
        identity = auth.authenticate(cookie, authorization, CONFIG, NOW)
    except errors.AuthError as exc:
        assert isinstance(exc, errors.AuthRequired | errors.AuthFailed)
        assert exc.close_code == 4401
    else:  # pragma: no cover - random text is never a valid token
        assert identity.user_id


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.binary(max_size=300))
def test_signed_garbage_payloads_only_raise_auth_errors(header: bytes, payload: bytes) -> None:
    """Valid HMAC over arbitrary header/payload bytes reaches the strict JSON rules."""
    signing_input = b64(header) + "." + b64(payload)
    sig = hmac.new(SECRET, signing_input.encode(), hashlib.sha256).digest()
    tok = signing_input + "." + b64(sig)
    try:
        auth.authenticate("access_token=" + tok, None, CONFIG, NOW)
    except errors.AuthError:
        pass


# ---------------------------------------------------------------------------
# encode_token / decode_token
# ---------------------------------------------------------------------------

claim_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=15,
)


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(
        st.text(max_size=8).filter(
            lambda k: k not in ("sub", "exp", "nbf", "iss", "aud", "iat", "jti")
        ),
        claim_values,
        max_size=6,
    ),
    st.text(min_size=1, max_size=20),
    st.sampled_from([None, "k1"]),
)
def test_encode_then_authenticate_round_trip(
    extra: dict[str, Any], sub: str, key_id: str | None
) -> None:
    claims = dict(extra, sub=sub, exp=NOW + 100)
    tok = auth.encode_token(claims, SECRET, key_id=key_id)
    config = auth.JWTConfig(SECRET, key_id=key_id)
    identity = auth.authenticate("access_token=" + tok, None, config, NOW)
    assert identity.user_id == sub
    assert identity.claims == json.loads(json.dumps(claims))
    assert pyjwt.decode(tok, SECRET, ["HS256"], options={"verify_exp": False}) == identity.claims


def test_encode_token_conversions_like_the_original() -> None:
    class Thing:
        def __str__(self) -> str:
            return "THING"

    claims = {
        "t": (1, 2),
        "big": 2**63,
        "nan": math.nan,
        "inf": -math.inf,
        "when": datetime.datetime(2020, 1, 2, 3, 4, 5),
        "obj": Thing(),
        "bytes": b"ab",
        1: "one",
        None: "none",
        "f": 1e16,
        "small": 1e-7,
        "s": "é\u2028\x00",
    }
    tok = auth.encode_token(claims, SECRET)
    header, payload, _ = tok.split(".")
    assert base64.urlsafe_b64decode(header + "==") == b'{"typ":"JWT","alg":"HS256"}'
    assert (
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        == (
            '{"1":"one","None":"none","big":"9223372036854775808","bytes":"b\'ab\'",'
            '"f":1e+16,"inf":"-inf","nan":"nan","obj":"THING","s":"é\u2028\\u0000",'
            '"small":1e-7,"t":"(1, 2)","when":"2020-01-02T03:04:05"}'
        ).encode()
    )


def test_encode_token_kid_is_json_escaped() -> None:
    tok = auth.encode_token({"sub": "a"}, SECRET, key_id='k"1')
    header = base64.urlsafe_b64decode(tok.split(".")[0] + "==")
    assert header == b'{"typ":"JWT","alg":"HS256","kid":"k\\"1"}'


def test_encode_token_errors() -> None:
    with pytest.raises(ValueError, match="Unsupported algorithm"):
        auth.encode_token({}, SECRET, "HS512")
    with pytest.raises(ValueError, match="too short"):
        auth.encode_token({}, b"short")
    with pytest.raises(ValueError, match="Invalid RS256"):
        auth.encode_token({}, RSA_PUBLIC, "RS256")  # a public key cannot sign
    with pytest.raises(TypeError):
        auth.encode_token([("sub", "a")], SECRET)  # type: ignore[arg-type]


def test_encode_token_asymmetric() -> None:
    rs = auth.encode_token({"sub": "a", "exp": NOW + 5}, RSA_PRIVATE, "RS256")
    assert rs == auth.encode_token({"exp": NOW + 5, "sub": "a"}, RSA_PRIVATE.decode(), "RS256")
    es = auth.encode_token({"sub": "a", "exp": NOW + 5}, EC_PRIVATE, "ES256", key_id="e")
    assert pyjwt.get_unverified_header(es) == {"typ": "JWT", "alg": "ES256", "kid": "e"}
    assert auth.decode_token(rs, RSA_PUBLIC, "RS256", now=NOW) == {"sub": "a", "exp": NOW + 5}
    assert auth.decode_token(es, EC_PUBLIC, "ES256", now=NOW) == {"sub": "a", "exp": NOW + 5}


def test_decode_token_returns_none_on_any_failure() -> None:
    tok = token()
    assert auth.decode_token(tok, SECRET, now=NOW) == {"sub": "alice", "exp": NOW + 3600}
    assert auth.decode_token(tok, SECRET.decode(), now=NOW) is not None
    assert auth.decode_token(tok, b"short", now=NOW) is None
    assert auth.decode_token(tok, SECRET, "HS512", now=NOW) is None
    assert auth.decode_token(tok, b"not a pem", "RS256", now=NOW) is None
    assert auth.decode_token(tok, SECRET, now=NOW + 3700) is None
    assert auth.decode_token(123, SECRET, now=NOW) is None  # type: ignore[arg-type]
    # The original's decode does not look at sub.
    assert auth.decode_token(token(sub=...), SECRET, now=NOW) == {"exp": NOW + 3600}


@settings(max_examples=300, deadline=None)
@given(ANY_TEXT)
def test_decode_token_never_raises(text: str) -> None:
    assert auth.decode_token(text, SECRET, now=NOW) is None

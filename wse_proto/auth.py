"""JWT authentication at the WebSocket upgrade, as the original server performs it (§1.3).

Two layers:

* :func:`extract_token` finds the token (Cookie first, then ``Authorization: Bearer``);
* :func:`authenticate` validates it and returns an :class:`Identity`, or raises
  :class:`~wse_proto.errors.AuthRequired` / :class:`~wse_proto.errors.AuthFailed`.

The original validates with the Rust crate ``jsonwebtoken`` 10 and serde_json; the exact
acceptance rules below were established by running the 2.5.1 binary against crafted tokens.
Signatures are checked by pyjwt's algorithm objects with the algorithm pinned by the
configuration (never taken from the token). Everything pyjwt would otherwise do by itself
(reading the clock, lenient base64, last-wins duplicate keys, NaN) is done here instead, so
that exactly the tokens the original accepts are accepted: strict unpadded base64url,
serde_json's number and nesting rules, duplicated registered claims refused, ``exp`` required,
``nbf`` checked when present, both against the injected wall clock with a 30 s leeway.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping
from dataclasses import InitVar, dataclass, field
from functools import lru_cache
from typing import Any, Literal

import orjson
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, HMACAlgorithm, RSAAlgorithm

from .errors import AuthFailed, AuthRequired, LocalProtocolError
from .topics import TopicACL

__all__ = [
    "ALGORITHMS",
    "AUTH_FAILED_MESSAGE",
    "AUTH_REQUIRED_MESSAGE",
    "MISSING_USER_MESSAGE",
    "ExtractedToken",
    "Identity",
    "JWTConfig",
    "TokenSource",
    "authenticate",
    "decode_token",
    "encode_token",
    "extract_token",
    "failure_reason",
    "validate_token",
]

ALGORITHMS = ("HS256", "RS256", "ES256")
MIN_HS256_SECRET = 32  # RFC 7518 §3.2; the original refuses shorter secrets
AUTH_REQUIRED_MESSAGE = "No JWT cookie or Authorization header"
AUTH_FAILED_MESSAGE = "Authentication failed"
MISSING_USER_MESSAGE = "Token missing user ID"

TokenSource = Literal["cookie", "authorization"]

# ---------------------------------------------------------------------------
# Token extraction (§1.3 "Token source")
# ---------------------------------------------------------------------------

# The original reads headers with http's HeaderValue::to_str(), which fails for anything but
# visible ASCII and tab; such a header then counts as absent (verified against 2.5.1).
_NOT_VISIBLE_ASCII = re.compile(r"[^\t\x20-\x7e]")
# Rust's str::trim() strips Unicode White_Space, which differs from Python's str.strip()
# (Python also strips U+001C..U+001F).
_RUST_WHITESPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
    "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
_BEARER = "bearer "
_PLACEHOLDERS = ("undefined", "null")  # what front-ends write when they have no token


@dataclass(frozen=True, slots=True)
class ExtractedToken:
    """The token and where it came from. The first token found is the only one tried: a
    bad cookie token is not rescued by a good Authorization header (§1.3)."""

    token: str
    source: TokenSource


def _header_text(value: str | None) -> str | None:
    if not value or _NOT_VISIBLE_ASCII.search(value) is not None:
        return None
    return value


def extract_token(
    cookie_header: str | None,
    authorization: str | None,
    cookie_name: str = "access_token",
) -> ExtractedToken | None:
    """Find the token like the original (§1.3); never raises.

    Cookie: parts split on ``;`` and trimmed; the first part starting with ``<name>=``
    whose trimmed value is non-empty and not ``undefined``/``null`` wins. No URL-decoding
    and no quote stripping. Otherwise ``Authorization``: its first 7 characters compared
    case-insensitively with ``bearer `` and the rest, untrimmed and non-empty, is the token.
    """
    cookies = _header_text(cookie_header)
    if cookies is not None:
        prefix = cookie_name + "="
        for part in cookies.split(";"):
            part = part.strip(_RUST_WHITESPACE)
            if part.startswith(prefix):
                value = part[len(prefix) :].strip(_RUST_WHITESPACE)
                if value and value not in _PLACEHOLDERS:
                    return ExtractedToken(value, "cookie")
    auth = _header_text(authorization)
    if auth is not None and len(auth) > len(_BEARER) and auth[:7].lower() == _BEARER:
        return ExtractedToken(auth[7:], "authorization")
    return None


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


def _as_bytes(value: bytes | bytearray | memoryview | str, name: str) -> bytes:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise ValueError(f"{name} must be bytes or str, got {type(value).__name__}")


def _load_public(algorithm: str, pem: bytes, name: str) -> Any:
    """A PEM public key of the family the algorithm needs (SPKI, or PKCS#1 for RSA)."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"Invalid {algorithm} {name} PEM: {exc}") from None
    if algorithm == "RS256" and isinstance(key, rsa.RSAPublicKey):
        return key
    if (
        algorithm == "ES256"
        and isinstance(key, ec.EllipticCurvePublicKey)
        and isinstance(key.curve, ec.SECP256R1)
    ):
        return key
    raise ValueError(f"Invalid {algorithm} {name} PEM: wrong key type for {algorithm}")


def _load_private(algorithm: str, pem: bytes, name: str) -> Any:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"Invalid {algorithm} {name} PEM: {exc}") from None
    if algorithm == "RS256" and isinstance(key, rsa.RSAPrivateKey):
        return key
    if (
        algorithm == "ES256"
        and isinstance(key, ec.EllipticCurvePrivateKey)
        and isinstance(key.curve, ec.SECP256R1)
    ):
        return key
    raise ValueError(f"Invalid {algorithm} {name} PEM: wrong key type for {algorithm}")


_HMAC = HMACAlgorithm(HMACAlgorithm.SHA256)
_RSA = RSAAlgorithm(RSAAlgorithm.SHA256)
_EC = ECAlgorithm(ECAlgorithm.SHA256)
_VERIFIERS: dict[str, HMACAlgorithm | RSAAlgorithm | ECAlgorithm] = {
    "HS256": _HMAC,
    "RS256": _RSA,
    "ES256": _EC,
}


def _check_algorithm(algorithm: object) -> str:
    if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:
        raise ValueError(f"Unsupported jwt_algorithm: {algorithm}. Supported: HS256, RS256, ES256")
    return algorithm


def _verification_key(algorithm: str, raw: bytes, name: str) -> Any:
    if algorithm == "HS256":
        if len(raw) < MIN_HS256_SECRET:
            raise ValueError(f"{name} must be at least 32 bytes (RFC 7518 HS256 minimum)")
        return raw
    return _load_public(algorithm, raw, name)


@dataclass(frozen=True, slots=True)
class JWTConfig:
    """JWT settings, validated at construction like the original's constructor (§10.6).

    ``key`` is the HS256 secret (>= 32 bytes) or, for RS256/ES256, the PEM public key;
    ``previous_key`` likewise (accepted during key rotation). ``private_key`` is only
    checked (the original validates ``jwt_private_key`` and then discards it). Invalid
    settings raise ``ValueError``.

    ``require_claims`` is our extension (decision K6): when true, a configured issuer or
    audience must be present in the token; by default, like the original, they are only
    compared when the token carries them.
    """

    key: bytes | str = field(repr=False)
    algorithm: str = "HS256"
    issuer: str | None = None
    audience: str | None = None
    cookie_name: str = "access_token"
    previous_key: bytes | str | None = field(default=None, repr=False)
    key_id: str | None = None
    leeway: int = 30
    max_token_bytes: int = 8192
    require_claims: bool = False
    private_key: InitVar[bytes | str | None] = None
    _key: Any = field(init=False, repr=False, compare=False)
    _previous: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self, private_key: bytes | str | None) -> None:
        alg = _check_algorithm(self.algorithm)
        current = _as_bytes(self.key, "key")
        object.__setattr__(self, "key", current)  # one canonical form: bytes
        object.__setattr__(self, "_key", _verification_key(alg, current, "jwt_secret"))
        previous = None
        if self.previous_key is not None:
            raw = _as_bytes(self.previous_key, "previous_key")
            object.__setattr__(self, "previous_key", raw)
            previous = _verification_key(alg, raw, "jwt_previous_secret")
        object.__setattr__(self, "_previous", previous)
        if private_key is not None and alg != "HS256":
            _load_private(alg, _as_bytes(private_key, "private_key"), "jwt_private_key")
        for name in ("issuer", "audience", "key_id"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a str or None")
        if not isinstance(self.cookie_name, str):
            raise ValueError("cookie_name must be a str")
        for name in ("leeway", "max_token_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int")


# ---------------------------------------------------------------------------
# Results and failures
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated connection: ``sub``, every claim, the ``wse_topics`` ACL if any."""

    user_id: str
    claims: dict[str, Any]
    acl: TopicACL | None = None
    source: TokenSource | None = None


class _Reject(Exception):
    """Internal: why a token was refused, and whether the previous key may be tried."""

    def __init__(self, reason: str, *, rotatable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.rotatable = rotatable


_REASON_PREFIX = "reason: "


def _auth_failed(message: str, reason: str) -> AuthFailed:
    err = AuthFailed(message)
    # The wire only ever says the generic message; the precise cause goes to server logs.
    err.add_note(_REASON_PREFIX + reason)
    return err


def failure_reason(err: BaseException) -> str | None:
    """The precise cause of an :class:`AuthFailed` raised here (for logs), else None."""
    for note in getattr(err, "__notes__", ()):
        if isinstance(note, str) and note.startswith(_REASON_PREFIX):
            return note[len(_REASON_PREFIX) :]
    return None


# ---------------------------------------------------------------------------
# Strict decoding (the serde_json / base64 rules of the original)
# ---------------------------------------------------------------------------

_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_B64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_B64_INDEX = {c: i for i, c in enumerate(_B64_ALPHABET)}
_MAX_DEPTH = 127  # serde_json's recursion limit (128) leaves 127 nested containers
_U64_LIMIT = 2**64  # exp/nbf must be < u64::MAX as f64 (== 2**64)
_I64_MIN = -(2**63)
_I64_MAX = 2**63 - 1
_WIDE_INT = re.compile(r"[0-9]{19}")  # a cheap hint that some integer may exceed i64
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)

# Header fields jsonwebtoken 10 deserialises with a type (anything else is ignored).
_HEADER_STR_FIELDS = (
    "typ",
    "cty",
    "jku",
    "kid",
    "x5u",
    "x5t",
    "x5t#S256",
    "enc",
    "zip",
    "url",
    "nonce",
)
_HEADER_TYPED = frozenset((*_HEADER_STR_FIELDS, "alg", "jwk", "x5c", "crit"))
# Registered claims jsonwebtoken reads itself: a duplicate of these fails the token.
_CLAIMS_TYPED = frozenset(("exp", "nbf", "sub", "iss", "aud"))


def _b64decode(segment: str, what: str) -> bytes:
    """Unpadded base64url with canonical trailing bits, nothing else (base64 crate rules)."""
    rem = len(segment) % 4
    if rem == 1 or _B64URL.fullmatch(segment) is None:
        raise _Reject(f"invalid base64url in {what}")
    if rem:
        # Bits past the last whole byte must be zero.
        spare = _B64_INDEX[segment[-1]] & (0x0F if rem == 2 else 0x03)
        if spare:
            raise _Reject(f"non-canonical base64url in {what}")
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):  # pragma: no cover - excluded by the checks above
        raise _Reject(f"invalid base64url in {what}") from None


def _utf8(raw: bytes, what: str) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise _Reject(f"{what} is not valid UTF-8") from None


def _json_int(text: str) -> int | float:
    """serde_json integers: u64 / i64 stay integers, ``-0`` and anything wider become f64.

    Integers above i64 still count as u64 for ``exp``/``nbf``; :func:`_as_python` turns
    them into floats afterwards, as the original hands them to Python.
    """
    if text == "-0":
        return -0.0
    if len(text) <= 21:
        value = int(text)
        if _I64_MIN <= value < _U64_LIMIT:
            return value
    number = float(text)
    if math.isinf(number):
        raise ValueError("number out of range")
    return number


def _json_float(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        raise ValueError("number out of range")
    return number


def _json_constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


def _as_python(value: Any) -> Any:
    """Claims as the original returns them: integers beyond i64 become floats."""
    if type(value) is int:
        return float(value) if value > _I64_MAX else value
    if isinstance(value, dict):
        return {k: _as_python(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_python(v) for v in value]
    return value


def _too_deep(text: str) -> bool:
    if text.count("[") + text.count("{") <= _MAX_DEPTH:
        return False  # cheap bound: cannot nest deeper than there are openers
    depth = 0
    for ch in _JSON_STRING.sub("", text):
        if ch == "[" or ch == "{":
            depth += 1
            if depth > _MAX_DEPTH:
                return True
        elif ch == "]" or ch == "}":
            depth -= 1
    return False


# Escapes in order: a surrogate pair, a lone surrogate (group 1), or any other escape,
# consumed whole so that an escaped backslash followed by "ud800" is not misread.
_ESCAPES = re.compile(
    r"\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}"
    r"|(\\u[dD][89a-fA-F][0-9a-fA-F]{2})"
    r"|\\."
)
_SURROGATE_HINT = re.compile(r"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(text: str) -> bool:
    """serde_json refuses a lone surrogate escape anywhere, even in a value that a later
    duplicate key replaces, so this looks at the text rather than at the parsed value."""
    if _SURROGATE_HINT.search(text) is None:
        return False
    return any(m.group(1) is not None for m in _ESCAPES.finditer(text))


def _strict_object(text: str, what: str, typed: frozenset[str]) -> dict[str, Any]:
    """Parse a JSON object exactly as serde_json would accept it for jsonwebtoken.

    Differences from ``json.loads`` handled here: invalid UTF-8, lone surrogate escapes,
    NaN/Infinity, numbers out of f64 range and nesting beyond 127 are refused; a key of
    ``typed`` appearing twice in the top-level object is refused (serde's duplicate-field
    error); other duplicates keep the last value.
    """
    if _too_deep(text):
        raise _Reject(f"{what} nests deeper than {_MAX_DEPTH}")
    last_dups: list[frozenset[str]] = [frozenset()]

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        dups: set[str] = set()
        if len(obj) != len(pairs):
            seen: set[str] = set()
            for k, _ in pairs:
                if k in seen:
                    dups.add(k)
                seen.add(k)
        last_dups[0] = frozenset(dups)
        return obj

    try:
        value = json.loads(
            text,
            object_pairs_hook=pairs_hook,
            parse_int=_json_int,
            parse_float=_json_float,
            parse_constant=_json_constant,
        )
    except (ValueError, RecursionError) as exc:
        raise _Reject(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise _Reject(f"{what} is not a JSON object")
    if what == "payload" and isinstance(value.get("sub"), list | dict):
        # jsonwebtoken reads sub as an optional string; serde_json leaves an array or
        # object unconsumed on that type error, which then fails the whole payload.
        raise _Reject("claim 'sub' is an array or object")
    # The top-level object completes last, so its duplicates are the ones recorded last.
    dup = last_dups[0] & typed
    if dup:
        raise _Reject(f"duplicate {what} field {sorted(dup)[0]!r}")
    if _has_lone_surrogate(text):
        raise _Reject(f"{what} holds a lone surrogate escape")
    return value


def _alg_is_escaped(text: str) -> bool:
    """Whether the top-level ``alg`` value is written with escapes (jsonwebtoken refuses it).

    Only called when the header holds a backslash; walks the string literals, tracking
    the nesting depth in the text between them.
    """
    depth = 0
    pos = 0
    want_value = False
    for m in _JSON_STRING.finditer(text):
        gap = text[pos : m.start()]
        depth += gap.count("{") + gap.count("[") - gap.count("}") - gap.count("]")
        pos = m.end()
        if depth != 1:
            continue
        literal = m.group()
        if want_value:
            return "\\" in literal
        rest = text[pos : pos + 64].lstrip(" \t\n\r")
        if rest.startswith(":"):
            try:
                want_value = json.loads(literal) == "alg"
            except ValueError:  # pragma: no cover - the header already parsed
                return False
    return False


def _check_header(header: dict[str, Any], text: str, algorithm: str) -> None:
    for name in _HEADER_STR_FIELDS:
        value = header.get(name)
        if value is not None and not isinstance(value, str):
            raise _Reject(f"header field {name!r} is not a string")
    for name in ("x5c", "crit"):
        value = header.get(name)
        if value is not None and not (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        ):
            raise _Reject(f"header field {name!r} is not a list of strings")
    jwk = header.get("jwk")
    if jwk is not None and not isinstance(jwk, dict):
        raise _Reject("header field 'jwk' is not an object")
    alg = header.get("alg")
    if alg != algorithm:
        raise _Reject(f"header alg {alg!r} is not the configured {algorithm}")
    if "\\" in text and _alg_is_escaped(text):
        raise _Reject("header alg is written with escapes")


def _numeric_date(claims: dict[str, Any], name: str) -> int | None:
    """``exp``/``nbf`` as jsonwebtoken reads them: u64, or a finite float in [0, 2**64)
    rounded half away from zero. None when absent; anything else refuses the token."""
    if name not in claims:
        return None
    value = claims[name]
    if type(value) is int:
        if 0 <= value < _U64_LIMIT:
            return value
    elif type(value) is float and 0.0 <= value < _U64_LIMIT:  # NaN/inf never parse
        whole = math.floor(value)
        return whole + 1 if value - whole >= 0.5 else whole
    raise _Reject(f"claim {name!r} is not a non-negative number")


def _string_set(value: Any) -> set[str] | str | None:
    """iss/aud as jsonwebtoken parses them: a string, a list of strings, else unusable."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return set(value)
    return None


def _check_claim(claims: dict[str, Any], name: str, expected: str | None, required: bool) -> None:
    if expected is None:
        return
    parsed = _string_set(claims.get(name))
    if parsed is None:
        # Absent, null or of another type: the original skips the comparison (K6).
        if required:
            raise _Reject(f"claim {name!r} missing (required by configuration)")
        return
    ok = parsed == expected if isinstance(parsed, str) else expected in parsed
    if not ok:
        raise _Reject(f"claim {name!r} does not match the configured value")


def _verify_with(
    parts: list[str],
    header: dict[str, Any],
    key: Any,
    config: JWTConfig,
    now_s: int,
) -> dict[str, Any]:
    """Signature then claims with one key (jsonwebtoken's decode order)."""
    verifier = _VERIFIERS[config.algorithm]
    signature = _b64decode(parts[2], "signature")
    signing_input = f"{parts[0]}.{parts[1]}".encode()
    try:
        valid = verifier.verify(signing_input, key, signature)
    except (ValueError, TypeError):
        valid = False
    if not valid:
        raise _Reject("invalid signature", rotatable=True)
    payload = _utf8(_b64decode(parts[1], "payload"), "payload")
    claims = _strict_object(payload, "payload", _CLAIMS_TYPED)
    exp = _numeric_date(claims, "exp")
    nbf = _numeric_date(claims, "nbf")
    if exp is None:
        raise _Reject("claim 'exp' missing")
    if exp < now_s - config.leeway:
        raise _Reject(f"token expired (exp {exp}, now {now_s}, leeway {config.leeway})")
    if nbf is not None and nbf > now_s + config.leeway:
        raise _Reject(f"token not yet valid (nbf {nbf}, now {now_s}, leeway {config.leeway})")
    _check_claim(claims, "iss", config.issuer, config.require_claims)
    _check_claim(claims, "aud", config.audience, config.require_claims)
    if _WIDE_INT.search(payload) is not None:
        converted: dict[str, Any] = _as_python(claims)
        return converted
    return claims


def _validate(token: str, config: JWTConfig, now: float) -> dict[str, Any]:
    if not math.isfinite(now):
        raise LocalProtocolError("now must be a finite wall-clock time in seconds")
    size = len(token) if token.isascii() else len(token.encode("utf-8", "surrogatepass"))
    if size > config.max_token_bytes:
        raise _Reject(f"token too large ({size} > {config.max_token_bytes} bytes)")
    parts = token.split(".")
    if len(parts) != 3:
        raise _Reject(f"malformed token: {len(parts)} segments, expected 3")
    header_text = _utf8(_b64decode(parts[0], "header"), "header")
    header = _strict_object(header_text, "header", _HEADER_TYPED)
    _check_header(header, header_text, config.algorithm)
    now_s = math.floor(now)  # jsonwebtoken compares whole seconds
    try:
        # The key id is compared before the signature (§1.3).
        if config.key_id is not None and header.get("kid") != config.key_id:
            raise _Reject(
                f"kid {header.get('kid')!r} is not the configured {config.key_id!r}",
                rotatable=True,
            )
        return _verify_with(parts, header, config._key, config, now_s)
    except _Reject as first:
        # Rotation (§1.3): after a signature or kid failure only, the previous key gets one
        # try, without the kid check. The header alg already matched the configuration.
        if not first.rotatable or config._previous is None:
            raise
        try:
            return _verify_with(parts, header, config._previous, config, now_s)
        except _Reject as second:
            raise _Reject(f"{first.reason}; with the previous key: {second.reason}") from None


# ---------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------


def validate_token(token: str, config: JWTConfig, now: float) -> dict[str, Any]:
    """Verify ``token`` and return its claims (``sub`` is not checked here).

    Raises AuthFailed("Authentication failed") with the precise cause available through
    :func:`failure_reason`. ``now`` is wall-clock Unix seconds.
    """
    try:
        return _validate(token, config, now)
    except _Reject as exc:
        raise _auth_failed(AUTH_FAILED_MESSAGE, exc.reason) from None


def authenticate(
    cookie_header: str | None,
    authorization: str | None,
    config: JWTConfig,
    now: float,
) -> Identity:
    """The upgrade-time check of the original (§1.3); ``now`` is wall-clock Unix seconds.

    No token: AuthRequired. Invalid token: AuthFailed("Authentication failed"). Valid token
    whose ``sub`` is not a non-empty string: AuthFailed("Token missing user ID").
    """
    found = extract_token(cookie_header, authorization, config.cookie_name)
    if found is None:
        raise AuthRequired(AUTH_REQUIRED_MESSAGE)
    claims = validate_token(found.token, config, now)
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise _auth_failed(MISSING_USER_MESSAGE, f"sub is {sub!r}, not a non-empty string")
    return Identity(sub, claims, TopicACL.from_claim(claims.get("wse_topics")), found.source)


@lru_cache(maxsize=32)
def _cached_config(
    key: bytes,
    algorithm: str,
    issuer: str | None,
    audience: str | None,
    previous_key: bytes | None,
    key_id: str | None,
) -> JWTConfig:
    return JWTConfig(
        key,
        algorithm,
        issuer=issuer,
        audience=audience,
        previous_key=previous_key,
        key_id=key_id,
    )


def decode_token(
    token: str,
    key: bytes | str,
    algorithm: str = "HS256",
    issuer: str | None = None,
    audience: str | None = None,
    previous_key: bytes | str | None = None,
    key_id: str | None = None,
    *,
    now: float,
) -> dict[str, Any] | None:
    """``rust_jwt_decode``: the claims of a valid token, else None (any failure, including
    an unusable key or algorithm, as the original returns None for those too)."""
    try:
        config = _cached_config(
            _as_bytes(key, "key"),
            algorithm,
            issuer,
            audience,
            None if previous_key is None else _as_bytes(previous_key, "previous_key"),
            key_id,
        )
    except (ValueError, TypeError):
        return None
    if not isinstance(token, str):
        return None
    try:
        return _validate(token, config, now)
    except _Reject:
        return None


# ---------------------------------------------------------------------------
# Encoding (rust_jwt_encode)
# ---------------------------------------------------------------------------


def _claim_value(value: Any) -> Any:
    """Python -> JSON like rust_jwt_encode: i64 ints and finite floats as numbers; wider
    ints, NaN/inf, tuples and unknown objects as ``str()``, or ``isoformat()`` if it works."""
    if value is None or value is True or value is False:
        return value
    if isinstance(value, int) and _I64_MIN <= value <= _I64_MAX:
        return int(value)
    if isinstance(value, float) and math.isfinite(value):
        return float(value)
    if isinstance(value, str):
        return value[:]  # a plain str even for subclasses
    if isinstance(value, dict):
        return {k if isinstance(k, str) else str(k): _claim_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_claim_value(v) for v in value]
    isoformat = getattr(value, "isoformat", None)
    if callable(isoformat):
        try:
            result = isoformat()
        except Exception:
            result = None
        if isinstance(result, str):
            return result
    return str(value)


def encode_token(
    claims: Mapping[str, Any],
    key: bytes | str,
    algorithm: str = "HS256",
    key_id: str | None = None,
) -> str:
    """``rust_jwt_encode``: header ``{"typ":"JWT","alg":...[,"kid":...]}``, claims with
    sorted keys, compact. ``key`` is the HS256 secret (>= 32 bytes) or a PEM private key.
    Raises ValueError for an unsupported algorithm or an unusable key."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"Unsupported algorithm: {algorithm}. Supported: HS256, RS256, ES256")
    if not isinstance(claims, Mapping):
        raise TypeError("claims must be a mapping")
    raw_key = _as_bytes(key, "key")
    signing_key: Any
    if algorithm == "HS256":
        if len(raw_key) < MIN_HS256_SECRET:
            raise ValueError("Secret key too short (minimum 32 bytes for HS256)")
        signing_key = raw_key
    else:
        signing_key = _load_private(algorithm, raw_key, "private key")
    header = b'{"typ":"JWT","alg":"' + algorithm.encode() + b'"'
    if key_id is not None:
        header += b',"kid":' + orjson.dumps(key_id)
    header += b"}"
    body = orjson.dumps(_claim_value(dict(claims)), option=orjson.OPT_SORT_KEYS)
    signing_input = _b64(header) + b"." + _b64(body)
    signature = _VERIFIERS[algorithm].sign(signing_input, signing_key)
    return (signing_input + b"." + _b64(signature)).decode()


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")

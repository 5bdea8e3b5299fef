"""HMAC-SHA256 helpers, as the original and wse-client use them (wire facts §4.6, §10.6).

Two unrelated signatures exist:

- :func:`sign_message` is the original server's utility ``rust_sign_message``:
  lowercase hex of ``HMAC-SHA256(secret, hex(SHA-256(payload_json)))``. Nothing on the
  wire uses it; applications may.
- :func:`client_signature` is the ``sig`` field wse-client 2.5.1 adds to outgoing
  envelopes after ``enable_signing()``: base64 of ``HMAC-SHA256(key, compact JSON of the
  envelope without sig)``. The client draws that key at random and never sends it, so
  only whoever holds the key (in practice: nobody but the client itself) can verify a
  ``sig``. The server neither produces nor checks it; it is forwarded like any other key.
  There is no replay protection either.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

import orjson

from .errors import LocalProtocolError

__all__ = [
    "client_signature",
    "client_signed_bytes",
    "hmac_sha256",
    "sha256_hex",
    "sign_message",
    "verify_client_signature",
]


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    """The 32-byte HMAC-SHA256 (``rust_hmac_sha256``)."""
    return hmac.digest(key, data, "sha256")


def sha256_hex(data: bytes | str) -> str:
    """Lowercase hex SHA-256 (``rust_sha256``); text is hashed as UTF-8."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def sign_message(payload_json: str, secret: bytes) -> str:
    """``rust_sign_message``: the MAC covers the hex digest text, not the payload itself."""
    digest_hex = sha256_hex(payload_json).encode("ascii")
    return hmac.digest(secret, digest_hex, "sha256").hex()


def client_signed_bytes(envelope: Mapping[str, Any]) -> bytes:
    """The exact bytes wse-client signs: the envelope minus ``sig``, as ``orjson.dumps``.

    That means compact separators, keys in insertion order, non-ASCII text as raw
    UTF-8. (wse-client without orjson would use ``json.dumps``, which escapes
    non-ASCII; both are the same for ASCII-only envelopes without floats.)
    """
    body = {k: v for k, v in envelope.items() if k != "sig"}
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError as exc:
        raise LocalProtocolError(f"envelope is not JSON-serialisable: {exc}") from None


def client_signature(envelope: Mapping[str, Any], key: bytes) -> str:
    """The ``sig`` value wse-client computes for ``envelope`` with signing key ``key``."""
    mac = hmac.digest(key, client_signed_bytes(envelope), "sha256")
    return base64.b64encode(mac).decode("ascii")


def verify_client_signature(envelope: Mapping[str, Any], key: bytes) -> bool:
    """True if ``envelope["sig"]`` is the wse-client signature under ``key``.

    Only useful to a holder of the client's private signing key (see module docs);
    a missing, non-string or wrong ``sig`` and unserialisable envelopes give False.
    """
    sig = envelope.get("sig")
    if not isinstance(sig, str):
        return False
    try:
        expected = client_signature(envelope, key)
    except LocalProtocolError:
        return False
    return hmac.compare_digest(expected.encode("ascii"), sig.encode("utf-8", "surrogatepass"))

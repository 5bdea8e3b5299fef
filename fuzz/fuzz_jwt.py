"""Fuzz token extraction and JWT validation.

Input layout: the first byte picks the mode.

* even: the rest is split at the first NUL into a Cookie and an Authorization header
  (decoded as UTF-8 with surrogateescape, so any bytes give some text), then
  ``authenticate`` runs on them;
* odd: the rest is split at the first NUL into raw header and payload JSON bytes that the
  harness signs with the configured secret, so mutations reach the strict JSON and claim
  rules behind the signature check.

Only AuthRequired / AuthFailed may escape; a success must carry a non-empty string sub.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from wse_proto import auth
from wse_proto.errors import AuthError

NOW = 1_795_000_000
SECRET = b"fuzz-secret-not-for-production-0001"
PREVIOUS = b"fuzz-previous-secret-not-for-prod-2"
CONFIG = auth.JWTConfig(SECRET, issuer="iss", audience="aud", key_id="k1", previous_key=PREVIOUS)


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _sign(header: bytes, payload: bytes, key: bytes = SECRET) -> bytes:
    signing_input = _b64(header) + b"." + _b64(payload)
    return signing_input + b"." + _b64(hmac.new(key, signing_input, hashlib.sha256).digest())


_HEADER = b'{"alg":"HS256","typ":"JWT","kid":"k1"}'
_PAYLOAD = b'{"sub":"alice","exp":%d,"iss":"iss","aud":["aud"],"wse_topics":{"allow":["a*"]}}' % (
    NOW + 60
)
_TOKEN = _sign(_HEADER, _PAYLOAD)

SEEDS: list[bytes] = [
    b"\x00access_token=" + _TOKEN + b"\x00",
    b"\x00\x00Bearer " + _TOKEN,
    b"\x00access_token=undefined; access_token=" + _TOKEN + b"\x00bearer x",
    b"\x00a=1;  access_token=  " + _TOKEN + b"  ;b\x00Basic x",
    b"\x00access_token=" + _sign(b'{"alg":"HS256","kid":"old"}', _PAYLOAD, PREVIOUS) + b"\x00",
    b"\x01" + _HEADER + b"\x00" + _PAYLOAD,
    b'\x01{"alg":"HS256","kid":"k1","crit":["x"],"jwk":{}}\x00{"sub":"a","exp":1e19,"nbf":-0}',
    b'\x01{"alg":"HS256","kid":"k1"}\x00{"sub":"a","exp":%d,"x":[[[["\\ud83d\\ude00"]]]]}'
    % (NOW + 60),
    b'\x01{"alg":"HS\\u0032256","kid":"k1"}\x00{"sub":5,"exp":%d}' % (NOW - 29),
]


def target(data: bytes) -> None:
    if not data:
        return
    first, _, second = data[1:].partition(b"\x00")
    if data[0] & 1 == 0:
        cookie = first.decode("utf-8", "surrogateescape") if first else None
        authorization = second.decode("utf-8", "surrogateescape") if second else None
        found = auth.extract_token(cookie, authorization, CONFIG.cookie_name)
        if found is not None:
            assert found.token
    else:
        cookie = "access_token=" + _sign(first, second).decode()
        authorization = None
    try:
        identity = auth.authenticate(cookie, authorization, CONFIG, NOW)
    except AuthError as exc:
        assert exc.close_code == 4401
        return
    assert isinstance(identity.user_id, str)
    assert identity.user_id
    assert identity.claims["sub"] == identity.user_id

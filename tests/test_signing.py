"""wse_proto.signing: rust_sign_message form and the wse-client ``sig`` field (properties)."""

from __future__ import annotations

import base64
import re
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wse_proto import signing
from wse_proto.errors import LocalProtocolError

PROPS = settings(max_examples=100, deadline=None)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
envelopes = st.dictionaries(
    st.text(max_size=6).filter(lambda k: k != "sig"), json_values, min_size=1, max_size=6
)
keys = st.binary(min_size=1, max_size=64)


@PROPS
@given(envelopes, keys)
def test_signature_round_trip(env: dict[str, Any], key: bytes) -> None:
    sig = signing.client_signature(env, key)
    assert len(base64.b64decode(sig, validate=True)) == 32
    signed = {**env, "sig": sig}
    assert signing.verify_client_signature(signed, key)
    # The signed bytes are the envelope itself, in order, without sig.
    assert list(orjson.loads(signing.client_signed_bytes(signed)).items()) == list(env.items())
    assert signing.client_signature(signed, key) == sig


@PROPS
@given(envelopes, keys, keys)
def test_other_key_does_not_verify(env: dict[str, Any], key: bytes, other: bytes) -> None:
    signed = {**env, "sig": signing.client_signature(env, key)}
    # HMAC pads short keys with zeros, so only compare keys that differ after padding.
    if key.ljust(64, b"\0") != other.ljust(64, b"\0"):
        assert not signing.verify_client_signature(signed, other)


@PROPS
@given(envelopes, keys, st.data())
def test_changed_value_does_not_verify(
    env: dict[str, Any], key: bytes, data: st.DataObject
) -> None:
    signed = {**env, "sig": signing.client_signature(env, key)}
    name = data.draw(st.sampled_from(sorted(env)))
    new = data.draw(json_values)
    if orjson.dumps(new) == orjson.dumps(env[name]):
        return
    signed[name] = new
    assert not signing.verify_client_signature(signed, key)


def test_sig_values_that_never_verify() -> None:
    env = {"t": "x", "p": {}}
    good = signing.client_signature(env, b"k")
    assert signing.verify_client_signature({**env, "sig": good}, b"k")
    for bad in (None, 5, good.lower(), good + "=", "", "\ud800"):
        assert not signing.verify_client_signature({**env, "sig": bad}, b"k")
    assert not signing.verify_client_signature(env, b"k")


def test_unserialisable_envelope() -> None:
    env: dict[Any, Any] = {"t": "x", "p": object()}
    with pytest.raises(LocalProtocolError):
        signing.client_signature(env, b"k")
    assert not signing.verify_client_signature({**env, "sig": "AAAA"}, b"k")
    with pytest.raises(LocalProtocolError):
        signing.client_signed_bytes({1: "non-string key"})  # type: ignore[dict-item]


def test_signed_bytes_are_compact_raw_utf8_in_insertion_order() -> None:
    env = {"t": "chat", "c": "U", "p": {"s": "h\u00e9", "f": 1.5}, "sig": "x"}
    assert (
        signing.client_signed_bytes(env)
        == '{"t":"chat","c":"U","p":{"s":"h\u00e9","f":1.5}}'.encode()
    )


@PROPS
@given(st.text(max_size=200), keys)
def test_sign_message_shape(payload: str, secret: bytes) -> None:
    sig = signing.sign_message(payload, secret)
    assert re.fullmatch("[0-9a-f]{64}", sig)
    # It is the MAC of the digest text, which is not the MAC of the payload itself.
    digest = signing.sha256_hex(payload)
    assert sig == signing.hmac_sha256(secret, digest.encode()).hex()
    assert sig != signing.hmac_sha256(secret, payload.encode()).hex()


@PROPS
@given(st.text(max_size=100))
def test_sha256_hex_text_is_utf8(text: str) -> None:
    raw = text.encode("utf-8")
    digest = signing.sha256_hex(text)
    assert digest == signing.sha256_hex(raw)
    assert re.fullmatch("[0-9a-f]{64}", digest)

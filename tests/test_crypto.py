"""wse_proto.crypto: key pairs, public-key parsing, key derivation, E: frames (properties)."""

from __future__ import annotations

import base64
import binascii
import os

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wse_proto import crypto
from wse_proto._defaults import system_rand
from wse_proto.errors import (
    DecryptionError,
    KeyExchangeError,
    LocalProtocolError,
    WSEError,
)

N = crypto.P256_ORDER
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEY = bytes(range(32))


class StreamRand:
    """rand() serving the given chunks in order, then all-zero chunks."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)
        self.calls = 0

    def __call__(self, n: int) -> bytes:
        self.calls += 1
        return self.chunks.pop(0) if self.chunks else bytes(n)


def _session() -> crypto.EncryptionSession:
    return crypto.EncryptionSession(KEY, system_rand)


# ---------------------------------------------------------------- key pairs

scalar_bytes = st.one_of(
    st.binary(min_size=32, max_size=32),
    st.sampled_from(
        [
            bytes(32),
            N.to_bytes(32, "big"),
            (N + 1).to_bytes(32, "big"),
            b"\xff" * 32,
            (1).to_bytes(32, "big"),
            (N - 1).to_bytes(32, "big"),
        ]
    ),
)


@FAST
@given(st.lists(scalar_bytes, min_size=0, max_size=20))
def test_keypair_from_arbitrary_rand_stream(draws: list[bytes]) -> None:
    valid = [d for d in draws[:16] if 0 < int.from_bytes(d, "big") < N]
    rand = StreamRand(draws)
    if not valid:
        # Only out-of-range draws (or the all-zero tail) within the retry budget.
        with pytest.raises(LocalProtocolError):
            crypto.generate_keypair(rand)
        return
    pair = crypto.generate_keypair(rand)
    assert pair.private_key.private_numbers().private_value == int.from_bytes(valid[0], "big")
    assert rand.calls == draws.index(valid[0]) + 1
    raw = base64.b64decode(pair.public_key_b64, validate=True)
    assert raw == pair.public_bytes and len(raw) == 65 and raw[0] == 4
    # The public key is a real curve point that our own parser accepts.
    assert crypto.encode_public_key(crypto.decode_public_key(pair.public_key_b64)) == (
        pair.public_key_b64
    )


@pytest.mark.parametrize("size", [0, 31, 33])
def test_keypair_rand_wrong_length(size: int) -> None:
    with pytest.raises(LocalProtocolError):
        crypto.generate_keypair(lambda n: bytes(size))


@pytest.mark.parametrize("scalar", [0, N, N + 5, -1])
def test_keypair_from_scalar_out_of_range(scalar: int) -> None:
    with pytest.raises(LocalProtocolError):
        crypto.keypair_from_scalar(scalar)


def test_system_rand_keypairs_are_fresh() -> None:
    a, b = crypto.generate_keypair(system_rand), crypto.generate_keypair(system_rand)
    assert a.public_key_b64 != b.public_key_b64
    assert len(a.public_key_b64) == 88 and a.public_key_b64.endswith("=")


# ---------------------------------------------------------------- base64 / public keys


@FAST
@given(st.binary(max_size=100))
def test_b64_round_trip(data: bytes) -> None:
    assert crypto.decode_b64(base64.b64encode(data).decode()) == data


def _stdlib_canonical(text: str) -> bytes | None:
    """Independent acceptance rule: strict stdlib decoding that re-encodes identically."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return None
    return raw if base64.b64encode(raw).decode() == text else None


b64ish = st.text(alphabet="ABCDabcd0189+/=-_ !\n\u00e9", max_size=24)


@settings(max_examples=300, deadline=None)
@given(st.one_of(b64ish, st.text(max_size=24)))
def test_b64_accepts_exactly_canonical_standard_base64(text: str) -> None:
    expected = _stdlib_canonical(text)
    if expected is None:
        with pytest.raises(KeyExchangeError) as info:
            crypto.decode_b64(text)
        assert info.value.message.startswith("Invalid base64: ")
    else:
        assert crypto.decode_b64(text) == expected


@FAST
@given(st.binary(min_size=3, max_size=60))
def test_url_safe_alphabet_is_rejected_at_the_first_url_symbol(data: bytes) -> None:
    std = base64.b64encode(data).decode()
    url = base64.urlsafe_b64encode(data).decode()
    if std == url:
        return
    offset = next(i for i, (a, b) in enumerate(zip(std, url)) if a != b)
    with pytest.raises(KeyExchangeError) as info:
        crypto.decode_b64(url)
    assert (
        info.value.message == f"Invalid base64: Invalid symbol {ord(url[offset])}, offset {offset}."
    )


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.text(max_size=100),
        b64ish,
        st.binary(max_size=70).map(lambda b: base64.b64encode(b).decode()),
    )
)
def test_decode_public_key_only_raises_key_exchange_error(text: str) -> None:
    try:
        key = crypto.decode_public_key(text)
    except KeyExchangeError as exc:
        assert exc.error_code == "KEY_EXCHANGE_FAILED"
        assert exc.close_code is None  # the original keeps the connection open
        assert exc.message
    else:
        assert isinstance(key, ec.EllipticCurvePublicKey)


@pytest.mark.parametrize("value", [None, 5, b"BAAA", ["x"]])
def test_decode_public_key_non_string(value: object) -> None:
    with pytest.raises(KeyExchangeError):
        crypto.decode_public_key(value)  # type: ignore[arg-type]


def test_lone_surrogate_is_an_invalid_symbol() -> None:
    with pytest.raises(KeyExchangeError) as info:
        crypto.decode_public_key("AA\ud800A")
    assert info.value.message == "Invalid base64: Invalid symbol 237, offset 2."


# ---------------------------------------------------------------- key agreement


@FAST
@given(st.integers(1, N - 1), st.integers(1, N - 1))
def test_ecdh_is_symmetric(a: int, b: int) -> None:
    pa, pb = crypto.keypair_from_scalar(a), crypto.keypair_from_scalar(b)
    key = crypto.derive_key(pa, pb.public_key_b64)
    assert key == crypto.derive_key(pb, pa.public_key_b64)
    assert len(key) == 32
    legacy = crypto.hkdf_key(
        crypto.shared_secret(pa, pb.public_key_b64),
        salt=crypto.LEGACY_HKDF_SALT,
        info=crypto.LEGACY_HKDF_INFO,
    )
    assert legacy != key


def test_server_key_exchange_matches_client_derivation() -> None:
    client = crypto.generate_keypair(system_rand)
    session, server_public = crypto.server_key_exchange(client.public_key_b64, system_rand)
    assert crypto.derive_key(client, server_public) == session.key
    peer = crypto.EncryptionSession(crypto.derive_key(client, server_public), system_rand)
    assert peer.decrypt(session.encrypt(b'{"t":"x"}')) == b'{"t":"x"}'
    assert session.decrypt(peer.encrypt(b"up")) == b"up"


def test_server_key_exchange_bad_key_draws_nothing() -> None:
    rand = StreamRand([])
    with pytest.raises(KeyExchangeError) as info:
        crypto.server_key_exchange("!abc", rand)
    assert info.value.message == "Invalid base64: Invalid symbol 33, offset 0."
    assert rand.calls == 0


def test_legacy_key_cannot_open_current_frames() -> None:
    a, b = crypto.generate_keypair(system_rand), crypto.generate_keypair(system_rand)
    secret = crypto.shared_secret(a, b.public_key_b64)
    current = crypto.EncryptionSession(crypto.hkdf_key(secret), system_rand)
    legacy = crypto.EncryptionSession(
        crypto.hkdf_key(secret, salt=crypto.LEGACY_HKDF_SALT, info=crypto.LEGACY_HKDF_INFO),
        system_rand,
    )
    with pytest.raises(DecryptionError):
        legacy.decrypt(current.encrypt(b"hello"))
    with pytest.raises(DecryptionError):
        current.decrypt(legacy.encrypt(b"hello"))


# ---------------------------------------------------------------- E: frames


@FAST
@given(st.binary(max_size=2048), st.binary(min_size=12, max_size=12))
def test_encrypt_decrypt_round_trip(plaintext: bytes, iv: bytes) -> None:
    session = crypto.EncryptionSession(KEY, lambda n: iv)
    frame = session.encrypt(plaintext)
    assert frame[:2] == b"E:" and frame[2:14] == iv
    assert len(frame) == 2 + 12 + len(plaintext) + 16
    assert session.decrypt(frame) == plaintext
    assert session.decrypt_payload(frame[2:]) == plaintext
    assert session.decrypt(memoryview(frame)) == plaintext  # type: ignore[arg-type]


@FAST
@given(st.binary(max_size=200), st.data())
def test_any_single_bit_flip_fails(plaintext: bytes, data: st.DataObject) -> None:
    session = _session()
    frame = bytearray(session.encrypt(plaintext))
    bit = data.draw(st.integers(0, len(frame) * 8 - 1))
    frame[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(DecryptionError):
        session.decrypt(bytes(frame))


@FAST
@given(st.binary(max_size=100), st.data())
def test_any_truncation_or_extension_fails(plaintext: bytes, data: st.DataObject) -> None:
    session = _session()
    frame = session.encrypt(plaintext)
    cut = data.draw(st.integers(0, len(frame) - 1))
    with pytest.raises(DecryptionError):
        session.decrypt(frame[:cut])
    extra = data.draw(st.binary(min_size=1, max_size=8))
    with pytest.raises(DecryptionError):
        session.decrypt(frame + extra)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=80), st.binary(max_size=80).map(lambda b: b"E:" + b)))
def test_decrypt_arbitrary_bytes_only_raises_wse_error(data: bytes) -> None:
    session = _session()
    for fn in (session.decrypt, session.decrypt_payload):
        try:
            fn(data)
        except DecryptionError as exc:
            assert isinstance(exc, WSEError) and exc.close_code is None
        else:
            raise AssertionError("random bytes must not authenticate")


def test_short_frame_messages() -> None:
    session = _session()
    with pytest.raises(DecryptionError, match="minimum 28"):
        session.decrypt(b"E:" + bytes(27))
    with pytest.raises(DecryptionError, match="not an E: frame"):
        session.decrypt(b"C:" + bytes(40))
    with pytest.raises(DecryptionError, match="authentication failed"):
        session.decrypt(b"E:" + bytes(28))
    with pytest.raises(DecryptionError, match="too short"):
        session.decrypt_payload(bytes(27))


def test_empty_plaintext_is_the_minimum_frame() -> None:
    session = _session()
    frame = session.encrypt(b"")
    assert len(frame) == 30
    assert session.decrypt(frame) == b""


def test_fresh_iv_per_frame() -> None:
    session = _session()
    frames = [session.encrypt(b"same") for _ in range(50)]
    assert len({f[2:14] for f in frames}) == 50
    assert len(set(frames)) == 50


def test_other_key_fails() -> None:
    frame = _session().encrypt(b"secret")
    with pytest.raises(DecryptionError):
        crypto.EncryptionSession(os.urandom(32), system_rand).decrypt(frame)


@pytest.mark.parametrize("size", [0, 16, 24, 31, 33])
def test_session_key_length(size: int) -> None:
    with pytest.raises(LocalProtocolError):
        crypto.EncryptionSession(bytes(size), system_rand)


def test_session_rejects_short_iv_from_rand() -> None:
    session = crypto.EncryptionSession(KEY, lambda n: bytes(n - 1))
    with pytest.raises(LocalProtocolError):
        session.encrypt(b"x")

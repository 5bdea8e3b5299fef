"""End-to-end encryption: ECDH P-256 key exchange, HKDF-SHA256, AES-256-GCM ``E:`` frames.

Wire rules (spec/PROTOCOL.md, encryption section; reference wire facts §4.1-§4.4):

- public keys travel as 65-byte uncompressed SEC1 points (``04 || X || Y``) in
  standard base64 with padding;
- the AES key is HKDF-SHA256 over the 32-byte ECDH x-coordinate, with no salt and
  info ``wse-encryption/aes-gcm-key`` (the pre-2.3.2 salt/info pair gives a different
  key, kept here only so tests can prove it fails);
- a frame is ``b"E:" + IV(12) + ciphertext + tag(16)``, no associated data, at least
  28 bytes after the prefix.

Randomness (private scalars, IVs) comes from the injected ``rand`` so tests can be
deterministic; nothing here reads the OS RNG.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ._defaults import RandFn
from .errors import DecryptionError, KeyExchangeError, LocalProtocolError

__all__ = [
    "HKDF_INFO",
    "HKDF_SALT",
    "IV_LEN",
    "KEY_LEN",
    "LEGACY_HKDF_INFO",
    "LEGACY_HKDF_SALT",
    "MIN_PAYLOAD_LEN",
    "P256_ORDER",
    "PREFIX",
    "PUBLIC_KEY_LEN",
    "TAG_LEN",
    "EncryptionSession",
    "KeyPair",
    "decode_b64",
    "decode_public_key",
    "derive_key",
    "encode_public_key",
    "generate_keypair",
    "hkdf_key",
    "keypair_from_scalar",
    "server_key_exchange",
    "shared_secret",
]

PREFIX = b"E:"
IV_LEN = 12
TAG_LEN = 16
KEY_LEN = 32
PUBLIC_KEY_LEN = 65
MIN_PAYLOAD_LEN = IV_LEN + TAG_LEN  # §4.1: shorter frames are dropped
HKDF_SALT: bytes | None = None  # RFC 5869 zero salt (WebCrypto's empty salt is the same)
HKDF_INFO = b"wse-encryption/aes-gcm-key"
LEGACY_HKDF_SALT = b"wse-encryption"  # up to 2.3.1 (wire facts §11 item 1); never used
LEGACY_HKDF_INFO = b"aes-gcm-key"
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551

_CURVE = ec.SECP256R1()
_ECDH = ec.ECDH()
_SHA256 = SHA256()
_SCALAR_LEN = 32
_MAX_SCALAR_DRAWS = 16  # a sound RNG needs a redraw with probability ~2**-32
_PREFIX_LEN = len(PREFIX)
_IV_END = _PREFIX_LEN + IV_LEN
_MIN_FRAME_LEN = _PREFIX_LEN + MIN_PAYLOAD_LEN
_VIEW_ABOVE = 16384  # past this a memoryview beats copying the ciphertext slice

# The original reports public-key failures with the Display text of Rust errors;
# KeyExchangeError.message carries that detail, the server wraps it as
# "ECDH key exchange failed: <detail>" (wire facts §3.1).
_POINT_ERROR = "Invalid ECDH public key: crypto error"
_COMPRESSED_ERROR = "Invalid ECDH public key: compressed point, expected 65-byte uncompressed SEC1"

_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_VALUE = {c: i for i, c in enumerate(_B64_ALPHABET)}
_PAD = 0x3D  # "="


@dataclass(frozen=True, slots=True)
class KeyPair:
    """An ECDH P-256 key pair; ``public_key_b64`` is what goes on the wire."""

    private_key: ec.EllipticCurvePrivateKey
    public_bytes: bytes  # 65-byte uncompressed SEC1
    public_key_b64: str


def keypair_from_scalar(scalar: int) -> KeyPair:
    """Build the key pair of a known private scalar (1 <= scalar < curve order)."""
    if not 0 < scalar < P256_ORDER:
        raise LocalProtocolError("P-256 private scalar out of range")
    private = ec.derive_private_key(scalar, _CURVE)
    public = private.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    return KeyPair(private, public, base64.b64encode(public).decode("ascii"))


def generate_keypair(rand: RandFn) -> KeyPair:
    """Draw a fresh key pair: the scalar is ``rand(32)`` read big-endian.

    Out-of-range draws (0 or >= the curve order) are rejected and drawn again, so the
    scalar is uniform. An RNG that keeps failing is a local bug (LocalProtocolError),
    not something to loop on forever.
    """
    for _ in range(_MAX_SCALAR_DRAWS):
        raw = rand(_SCALAR_LEN)
        if len(raw) != _SCALAR_LEN:
            raise LocalProtocolError(f"rand({_SCALAR_LEN}) returned {len(raw)} bytes")
        scalar = int.from_bytes(raw, "big")
        if 0 < scalar < P256_ORDER:
            return keypair_from_scalar(scalar)
    raise LocalProtocolError(f"rand gave no valid P-256 scalar in {_MAX_SCALAR_DRAWS} draws")


def _b64_error(data: bytes) -> str:
    """Reproduce the original's base64 error text for input that failed to decode.

    Best effort: it follows the checks (and their order) of the Rust ``base64`` 0.22
    STANDARD engine the original uses, whose Display forms are
    ``Invalid symbol <byte>, offset <i>.``, ``Invalid input length: <n>``,
    ``Invalid last symbol <byte>, offset <i>.`` and ``Invalid padding``.
    """
    n = len(data)
    rem = n % 4
    if rem == 1 and data[-1] != _PAD and data[-1] not in _B64_VALUE:
        return f"Invalid symbol {data[-1]}, offset {n - 1}."
    # Every complete quad but the last is decoded strictly; "=" is invalid there.
    body = max(0, n - rem - (4 if rem == 0 else 0))
    for i in range(body):
        if data[i] not in _B64_VALUE:
            return f"Invalid symbol {data[i]}, offset {i}."
    morsels: list[int] = []
    pads = 0
    first_pad = 0
    last_symbol = 0
    for k, b in enumerate(data[body:]):
        if b == _PAD:
            if k < 2:
                return f"Invalid symbol {b}, offset {body + k}."
            if pads == 0:
                first_pad = k
            pads += 1
            continue
        if pads:
            return f"Invalid symbol {_PAD}, offset {body + first_pad}."
        last_symbol = b
        value = _B64_VALUE.get(b)
        if value is None:
            return f"Invalid symbol {b}, offset {body + k}."
        morsels.append(value)
    if n and len(morsels) < 2:
        return f"Invalid input length: {body + len(morsels)}"
    if (pads + len(morsels)) % 4:
        return "Invalid padding"
    packed = 0
    for i, value in enumerate(morsels):
        packed |= value << (26 - 6 * i)
    if packed & (0xFFFFFFFF >> (len(morsels) * 6 // 8 * 8)):
        return f"Invalid last symbol {last_symbol}, offset {body + len(morsels) - 1}."
    return "Invalid padding"  # not reached for input binascii rejected


def decode_b64(text: str) -> bytes:
    """Strict standard base64 with canonical padding, as the original accepts it.

    Rejects the url-safe alphabet, whitespace, missing or extra padding and
    non-zero trailing bits, with the original's error wording (KeyExchangeError).
    """
    raw = text.encode("utf-8", "surrogatepass")
    try:
        decoded = binascii.a2b_base64(raw, strict_mode=True)
    except binascii.Error:
        pass
    else:
        # strict_mode still accepts non-zero trailing bits; canonical means it re-encodes.
        if binascii.b2a_base64(decoded, newline=False) == raw:
            return decoded
    raise KeyExchangeError(f"Invalid base64: {_b64_error(raw)}")


def decode_public_key(public_b64: str) -> ec.EllipticCurvePublicKey:
    """Parse a peer public key from the wire; KeyExchangeError says why it is unusable."""
    if not isinstance(public_b64, str):
        raise KeyExchangeError("Invalid base64: public key is not a string")
    raw = decode_b64(public_b64)
    if len(raw) == PUBLIC_KEY_LEN and raw[0] == 0x04:
        try:
            return ec.EllipticCurvePublicKey.from_encoded_point(_CURVE, raw)
        except ValueError:
            raise KeyExchangeError(_POINT_ERROR) from None
    if len(raw) == 33 and raw[0] in (0x02, 0x03):
        try:
            ec.EllipticCurvePublicKey.from_encoded_point(_CURVE, raw)
        except ValueError:
            pass
        else:
            # A valid point, but the wire form is the uncompressed one (§4.1).
            raise KeyExchangeError(_COMPRESSED_ERROR)
    raise KeyExchangeError(_POINT_ERROR)


def encode_public_key(public_key: ec.EllipticCurvePublicKey) -> str:
    """The wire form of a public key: uncompressed SEC1, standard base64."""
    raw = public_key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    return base64.b64encode(raw).decode("ascii")


def shared_secret(private: KeyPair, peer_public_b64: str) -> bytes:
    """The raw 32-byte ECDH x-coordinate (HKDF input)."""
    return private.private_key.exchange(_ECDH, decode_public_key(peer_public_b64))


def hkdf_key(secret: bytes, *, salt: bytes | None = HKDF_SALT, info: bytes = HKDF_INFO) -> bytes:
    """HKDF-SHA256 to a 32-byte AES key; the defaults are the current wire parameters."""
    return HKDF(algorithm=_SHA256, length=KEY_LEN, salt=salt, info=info).derive(secret)


def derive_key(private: KeyPair, peer_public_b64: str) -> bytes:
    """The AES-256 key both sides derive from their key pair and the peer's public key."""
    return hkdf_key(shared_secret(private, peer_public_b64))


class EncryptionSession:
    """AES-256-GCM for one connection: seals and opens ``E:`` frames.

    Each frame gets a fresh random IV from ``rand``. With random 96-bit IVs a key
    should not seal more than about 2**32 frames (NIST SP 800-38D); connections
    never come near that, and there is no re-keying on the wire (§4.5).
    """

    __slots__ = ("_aead", "_rand", "key")

    def __init__(self, key: bytes, rand: RandFn) -> None:
        if len(key) != KEY_LEN:
            raise LocalProtocolError(f"AES-256 key must be {KEY_LEN} bytes, got {len(key)}")
        self.key = bytes(key)
        self._aead = AESGCM(self.key)
        self._rand = rand

    def encrypt(self, plaintext: bytes) -> bytes:
        """``b"E:" + IV + ciphertext + tag``; the plaintext is the frame's usual payload."""
        iv = self._rand(IV_LEN)
        if len(iv) != IV_LEN:
            raise LocalProtocolError(f"rand({IV_LEN}) returned {len(iv)} bytes")
        return PREFIX + iv + self._aead.encrypt(iv, plaintext, None)

    def decrypt(self, frame: bytes) -> bytes:
        """Open a whole ``E:`` frame (prefix included); DecryptionError if it does not verify."""
        size = len(frame)
        if size < _MIN_FRAME_LEN or frame[:_PREFIX_LEN] != PREFIX:
            raise DecryptionError(_short_or_unprefixed(frame))
        body = frame[_IV_END:] if size <= _VIEW_ABOVE else memoryview(frame)[_IV_END:]
        try:
            return self._aead.decrypt(frame[_PREFIX_LEN:_IV_END], body, None)
        except InvalidTag:
            raise DecryptionError("AES-GCM authentication failed") from None

    def decrypt_payload(self, payload: bytes) -> bytes:
        """Open ``IV + ciphertext + tag`` (the frame without ``E:``, as wse-client handles it)."""
        if len(payload) < MIN_PAYLOAD_LEN:
            raise DecryptionError(
                f"encrypted payload too short: {len(payload)} bytes (minimum {MIN_PAYLOAD_LEN})"
            )
        try:
            return self._aead.decrypt(payload[:IV_LEN], payload[IV_LEN:], None)
        except InvalidTag:
            raise DecryptionError("AES-GCM authentication failed") from None


def _short_or_unprefixed(frame: bytes) -> str:
    if frame[:_PREFIX_LEN] != PREFIX:
        return "not an E: frame"
    return (
        f"E: frame too short: {len(frame) - _PREFIX_LEN} bytes after the prefix "
        f"(minimum {MIN_PAYLOAD_LEN})"
    )


def server_key_exchange(client_public_b64: str, rand: RandFn) -> tuple[EncryptionSession, str]:
    """The server half of §4.2: new key pair, derived session, public key for server_hello.

    The client's key is checked before anything is drawn from ``rand``. Raises
    KeyExchangeError (its ``message`` is the detail for KEY_EXCHANGE_FAILED). The
    once-per-connection rule belongs to the connection machine.
    """
    peer = decode_public_key(client_public_b64)
    pair = generate_keypair(rand)
    key = hkdf_key(pair.private_key.exchange(_ECDH, peer))
    return EncryptionSession(key, rand), pair.public_key_b64

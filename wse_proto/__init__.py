"""wse_proto: the pure (Sans-IO) core of the WSE protocol.

Bytes and events go in, bytes and events come out. Nothing here opens a socket,
starts a thread, reads the clock or the RNG: time and randomness are passed in
(defaults live in :mod:`wse_proto._defaults`).
"""

from __future__ import annotations

from .errors import (
    AuthError,
    AuthFailed,
    AuthRequired,
    ClusterFrameError,
    CryptoError,
    DecodeError,
    DecryptionError,
    KeyExchangeError,
    LocalProtocolError,
    PayloadTooLarge,
    RemoteProtocolError,
    WSEError,
)

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "AuthFailed",
    "AuthRequired",
    "ClusterFrameError",
    "CryptoError",
    "DecodeError",
    "DecryptionError",
    "KeyExchangeError",
    "LocalProtocolError",
    "PayloadTooLarge",
    "RemoteProtocolError",
    "WSEError",
    "__version__",
]

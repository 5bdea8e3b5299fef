"""The one error tree of wse_proto.

Every error a decoder or machine can raise derives from :class:`WSEError`, so
callers (and the fuzz harnesses) can rely on a single ``except WSEError``.
Each error carries the hint a server needs to react on the wire: the WebSocket
close code to send (``close_code``) and, where the protocol has one, the WSE
error code for an ``error`` frame (``error_code``).
"""

from __future__ import annotations

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
]


class WSEError(Exception):
    """Root of every error raised by wse_proto."""

    close_code: int | None = None
    error_code: str | None = None

    def __init__(
        self,
        message: str = "",
        *,
        close_code: int | None = None,
        error_code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if close_code is not None:
            self.close_code = close_code
        if error_code is not None:
            self.error_code = error_code


class LocalProtocolError(WSEError):
    """The caller used the API in a way the protocol forbids (a bug on our side)."""


class RemoteProtocolError(WSEError):
    """The peer sent something the protocol forbids."""

    # 1002 protocol error is the generic RFC 6455 answer to a misbehaving peer.
    close_code: int | None = 1002


class DecodeError(RemoteProtocolError):
    """Bytes or text that cannot be decoded into a WSE message or frame."""


class PayloadTooLarge(DecodeError):
    """A message, frame or decompressed payload exceeds a configured cap."""

    close_code: int | None = 1009


class CryptoError(RemoteProtocolError):
    """Base of the E2E encryption errors."""


class KeyExchangeError(CryptoError):
    """The peer's public key is unusable (bad base64, not a P-256 point, ...)."""

    error_code: str | None = "KEY_EXCHANGE_FAILED"
    close_code: int | None = None  # the original keeps the connection open


class DecryptionError(CryptoError):
    """An ``E:`` frame failed: too short, no key yet, or the GCM tag did not verify."""

    close_code: int | None = None  # dropped with a log line, connection stays open


class AuthError(RemoteProtocolError):
    """JWT authentication failed; the server answers with an error frame and 4401."""

    close_code: int | None = 4401
    error_code: str | None = "AUTH_FAILED"


class AuthRequired(AuthError):
    """No token was presented at all."""

    error_code: str | None = "AUTH_REQUIRED"


class AuthFailed(AuthError):
    """A token was presented but is invalid (signature, expiry, claims, size...)."""

    error_code: str | None = "AUTH_FAILED"


class ClusterFrameError(DecodeError):
    """A malformed cluster frame; the peer link must be dropped."""

"""The original package's names, so code written for wse-server 2.5.1 runs unchanged.

``from wse_server import RustWSEServer, rust_jwt_encode, rust_jwt_decode`` keeps working:
``RustWSEServer`` is :class:`wse_server.WSEServer`, the JWT helpers map onto
:mod:`wse_proto.auth` with the original's signatures and results (reference §10.6).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from wse_proto import auth

from .server import WSEServer

__all__ = ["RustWSEServer", "rust_jwt_decode", "rust_jwt_encode"]

RustWSEServer = WSEServer
"""The original class name."""


def rust_jwt_encode(
    claims: Mapping[str, Any],
    secret: bytes | str,
    algorithm: str = "HS256",
    key_id: str | None = None,
) -> str:
    """Sign ``claims``; ``secret`` is the HS256 secret or a PEM private key (RS256/ES256)."""
    return auth.encode_token(claims, secret, algorithm, key_id)


def rust_jwt_decode(
    token: str,
    secret: bytes | str,
    algorithm: str = "HS256",
    issuer: str | None = None,
    audience: str | None = None,
    previous_secret: bytes | str | None = None,
    key_id: str | None = None,
) -> dict[str, Any] | None:
    """The claims of a valid token, or None, validated exactly like the server does."""
    return auth.decode_token(
        token,
        secret,
        algorithm,
        issuer,
        audience,
        previous_secret,
        key_id,
        now=time.time(),
    )

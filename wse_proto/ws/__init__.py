"""RFC 6455 for wse-py: the opening handshake (h11) and a fast frame codec.

Everything lives in two modules; import from here (``from wse_proto.ws import ...``).
"""

from __future__ import annotations

from .frames import (
    BINARY,
    CLOSE,
    CONTINUATION,
    DEFAULT_MAX_MESSAGE_SIZE,
    PING,
    PONG,
    TEXT,
    FrameDecoder,
    apply_mask,
    binary_frame,
    decode_text,
    encode_close,
    encode_frame,
    frame_header,
    is_valid_close_code,
    parse_close,
    text_frame,
)
from .handshake import (
    ACCEPTED,
    DEFAULT_MAX_HEAD_SIZE,
    NEED_DATA,
    REJECTED,
    ClientHandshake,
    HandshakeRejected,
    HandshakeRequest,
    HandshakeState,
    ServerHandshake,
    accept_key,
)

__all__ = [
    "ACCEPTED",
    "BINARY",
    "CLOSE",
    "CONTINUATION",
    "DEFAULT_MAX_HEAD_SIZE",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "NEED_DATA",
    "PING",
    "PONG",
    "REJECTED",
    "TEXT",
    "ClientHandshake",
    "FrameDecoder",
    "HandshakeRejected",
    "HandshakeRequest",
    "HandshakeState",
    "ServerHandshake",
    "accept_key",
    "apply_mask",
    "binary_frame",
    "decode_text",
    "encode_close",
    "encode_frame",
    "frame_header",
    "is_valid_close_code",
    "parse_close",
    "text_frame",
]

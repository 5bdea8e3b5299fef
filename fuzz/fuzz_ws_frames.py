"""Fuzz the RFC 6455 frame decoder on both sides.

Byte 0 picks the side (bit 0), the message cap (bit 1) and the read size used
to split the rest (bits 2-7). Beyond "only WSEError escapes", the harness checks
that splitting the input changes nothing and that decoded messages re-encode
and decode to themselves.
"""

from __future__ import annotations

from wse_proto.errors import DecodeError
from wse_proto.ws import BINARY, CLOSE, PING, PONG, TEXT, FrameDecoder, encode_frame

_MASK = b"\x11\x22\x33\x44"


def _run(
    data: bytes, client_side: bool, cap: int, step: int
) -> tuple[list[tuple[int, bytes]], int | None]:
    dec = FrameDecoder(client_side=client_side, max_message_size=cap)
    out: list[tuple[int, bytes]] = []
    try:
        for i in range(0, len(data), step):
            dec.receive_data(data[i : i + step])
            while batch := dec.messages():
                out.extend(batch)
    except DecodeError as exc:
        return out, exc.close_code
    return out, None


def target(data: bytes) -> None:
    if not data:
        return
    sel, body = data[0], data[1:]
    client_side = bool(sel & 1)
    cap = 64 if sel & 2 else 1 << 20
    step = (sel >> 2) + 1
    split = _run(body, client_side, cap, step)
    whole = _run(body, client_side, cap, max(len(body), 1))
    assert split == whole, (split, whole)
    messages, _ = whole
    mask = None if client_side else _MASK
    again = b"".join(encode_frame(op, payload, mask_key=mask) for op, payload in messages)
    assert _run(again, client_side, cap, 7) == (messages, None)
    for op, payload in messages:
        assert op in (TEXT, BINARY, CLOSE, PING, PONG)
        assert op >= CLOSE or len(payload) <= cap


def _seed(client_side: bool, frames: bytes, sel: int = 0) -> bytes:
    return bytes([(sel & ~1) | int(client_side)]) + frames


SEEDS: list[bytes] = [
    _seed(False, encode_frame(TEXT, b'{"t":"ping","p":{"timestamp":1}}', mask_key=_MASK)),
    _seed(
        False,
        encode_frame(TEXT, b"frag", fin=False, mask_key=_MASK)
        + encode_frame(PING, b"abc", mask_key=_MASK)
        + encode_frame(0, b"ment", mask_key=_MASK)
        + encode_frame(CLOSE, b"\x03\xe8bye", mask_key=_MASK),
        sel=0x40,
    ),
    _seed(True, encode_frame(BINARY, b"C:" + b"x" * 300) + encode_frame(CLOSE, b"\x11\x31Auth")),
    _seed(True, encode_frame(BINARY, b"y" * 70), sel=0x02),
    _seed(True, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00" + b"z" * 16),
]

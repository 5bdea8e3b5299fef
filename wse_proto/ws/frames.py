"""RFC 6455 framing: a fast frame decoder with message reassembly, and encoders.

Theory of operation. ``FrameDecoder.receive_data`` only queues the chunk (no
copy for ``bytes``) and counts bytes. ``messages`` joins what is queued once,
walks every complete frame by offset, and keeps only the unfinished tail. While
a frame is incomplete the decoder remembers how many bytes it needs, so a large
frame arriving in many reads is joined once, not once per read.

Server side, a run of complete, unfragmented, masked text/binary frames (what a
busy client sends) takes a fast path: the walk only reads headers and collects
each frame's mask key repeated over its payload into one "mask stream" aligned
with the buffer; one big-integer XOR of the whole run then unmasks every payload
at once, and the payloads are sliced out of the result. Everything else (control
frames, fragments, 64-bit lengths, any frame that breaks a rule) goes through the
general walk, which raises the precise error.

Wire rules (RFC 6455 §5): the server side requires masked frames and the client
side unmasked ones; reserved bits are refused because wse-py never negotiates an
extension (spec/PROTOCOL.md §handshake: permessage-deflate is declined); control
frames carry at most 125 bytes and are never fragmented; payload lengths must use
the minimal encoding; the message-size cap applies to the running total of a
fragmented message (reference §6.4) and is checked as soon as a header is seen.
"""

from __future__ import annotations

import codecs
import struct
from typing import Final

from wse_proto.errors import DecodeError, LocalProtocolError, PayloadTooLarge

__all__ = [
    "BINARY",
    "CLOSE",
    "CONTINUATION",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "PING",
    "PONG",
    "TEXT",
    "FrameDecoder",
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

CONTINUATION: Final = 0x0
TEXT: Final = 0x1
BINARY: Final = 0x2
CLOSE: Final = 0x8
PING: Final = 0x9
PONG: Final = 0xA

DEFAULT_MAX_MESSAGE_SIZE: Final = 1_048_576
"""The original's default ``max_message_size`` (reference §6.1/§6.4)."""

_MAX_CONTROL_PAYLOAD: Final = 125
_MAX_REASON_BYTES: Final = 123

_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")
_HDR16 = struct.Struct("!BBH")
_HDR64 = struct.Struct("!BBQ")

# Close codes a peer may put on the wire: what tungstenite (the original's
# WebSocket layer) and wsproto accept. 1004/1005/1006/1015 are reserved or
# local-only (RFC 6455 §7.4.1); 1016-2999 are unassigned.
_ALLOWED_CLOSE_CODES: Final = frozenset(
    {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013}
)


def is_valid_close_code(code: int) -> bool:
    """True if ``code`` may appear in a Close frame (RFC 6455 §7.4)."""
    return code in _ALLOWED_CLOSE_CODES or 3000 <= code <= 4999


# _REPUNIT[k] has k 32-bit words set to 1: ``mask32 * _REPUNIT[k]`` is the mask
# repeated k times as one integer, without building the repeated bytes (~20% faster
# for small payloads). Kept to 512-byte payloads (~33 KB of table).
_REPUNIT_WORDS: Final = 128
_REPUNIT: Final = [(1 << (32 * k)) // 0xFFFFFFFF for k in range(_REPUNIT_WORDS + 1)]
_U32LE = struct.Struct("<I")

# Tables of the fast path (masked client frames, 7- and 16-bit lengths), indexed by
# the second header byte or by a 7-bit payload length:
# - _MASKED_LEN: payload length for a masked frame (126/127: extended forms follow);
#   255 for an unmasked one, which the general walk refuses.
# - _WORDS: 4-byte words that cover a payload; _OVERSHOOT: how far the repeated key
#   passes the payload's end (into the next header, whose bytes nobody reads).
# - _GAP6 / _GAP8: zero bytes covering a 6- / 8-byte header minus that overshoot.
_MASKED_LEN: Final = tuple(b - 0x80 if b & 0x80 else 255 for b in range(256))
_WORDS: Final = tuple((n + 3) >> 2 for n in range(126))
_OVERSHOOT: Final = tuple(-n & 3 for n in range(126))
_GAP6: Final = tuple(bytes(6 - k) for k in range(4))
_GAP8: Final = tuple(bytes(8 - k) for k in range(4))
_FAST_MIN_CAP: Final = 125
"""Below this max_message_size the fast path is off (small frames need the cap check)."""
_FAST_MAX_LENGTH: Final = 65535
"""Largest payload on the fast path: 7- and 16-bit length forms only."""


def apply_mask(data: bytes | bytearray | memoryview, mask: bytes | bytearray) -> bytes:
    """XOR ``data`` with the 4-byte ``mask`` repeated (RFC 6455 §5.3).

    One big-integer XOR: linear, done in C, and ~20x faster than a byte loop.
    """
    n = len(data)
    if not n:
        return b""
    words = (n + 3) >> 2
    if words <= _REPUNIT_WORDS:
        mask32: int = _U32LE.unpack(mask)[0]
        value = int.from_bytes(data, "little") ^ mask32 * _REPUNIT[words]
        return value.to_bytes(words << 2, "little")[:n]
    rep = bytes(mask) * (n >> 2) + bytes(mask[: n & 3])
    return (int.from_bytes(data, "little") ^ int.from_bytes(rep, "little")).to_bytes(n, "little")


def _bad(message: str, close_code: int = 1002) -> DecodeError:
    return DecodeError(message, close_code=close_code)


def decode_text(payload: bytes) -> str:
    """Decode a text message; invalid UTF-8 is a 1007 error (RFC 6455 §8.1)."""
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad("invalid UTF-8 in a text message", 1007) from None


_Utf8Decoder: Final = codecs.getincrementaldecoder("utf-8")


def _feed_utf8(decoder: codecs.IncrementalDecoder, part: bytes, final: bool) -> None:
    """Check one fragment of a text message as it arrives (fail fast, RFC 6455 §8.1)."""
    try:
        decoder.decode(part, final)
    except UnicodeDecodeError:
        raise _bad("invalid UTF-8 in a text message", 1007) from None


def parse_close(payload: bytes) -> tuple[int | None, str]:
    """Split a Close payload into ``(code, reason)``; empty payload -> ``(None, "")``.

    RFC 6455 §5.5.1/§7.4: a 1-byte body or a code that may not be sent is a
    protocol error (1002); a reason that is not UTF-8 is 1007.
    """
    if not payload:
        return None, ""
    if len(payload) < 2:
        raise _bad("close frame with a 1-byte payload")
    if len(payload) > _MAX_CONTROL_PAYLOAD:
        raise _bad("close payload longer than 125 bytes")
    code = (payload[0] << 8) | payload[1]
    if not is_valid_close_code(code):
        raise _bad(f"close frame with invalid code {code}")
    try:
        reason = bytes(payload[2:]).decode("utf-8")
    except UnicodeDecodeError:
        raise _bad("close reason is not UTF-8", 1007) from None
    return code, reason


class FrameDecoder:
    """Turns a byte stream into complete messages ``(opcode, payload)``.

    ``client_side=True`` decodes what a server sends (unmasked frames);
    ``False`` decodes what a client sends (masked frames, RFC 6455 §5.1).
    Continuation frames are joined; PING/PONG/CLOSE come out as they arrive,
    also between fragments. After a CLOSE the rest of the stream is ignored.

    Text payloads are returned as bytes. With ``validate_utf8=True`` (default)
    they are checked (fragmented ones fragment by fragment, so a bad prefix fails
    at once) and a bad one raises ``DecodeError`` with close code 1007;
    a caller that decodes anyway can pass ``False`` and use :func:`decode_text`,
    which raises the same error, so the text is decoded only once.

    Errors: ``messages`` raises ``DecodeError`` (1002 framing, 1007 UTF-8) or
    ``PayloadTooLarge`` (1009). Messages completed before the bad frame are
    returned first; the error is then raised by the next call, so drive it as
    ``while batch := dec.messages(): ...`` or call it again after a non-empty
    batch. Once failed, the decoder stays failed.
    """

    __slots__ = (
        "_buffered",
        "_chunks",
        "_closed",
        "_error",
        "_fast_max",
        "_frag_op",
        "_frag_parts",
        "_frag_size",
        "_mask_bit",
        "_max",
        "_need",
        "_utf8",
        "_validate",
    )

    def __init__(
        self,
        *,
        client_side: bool,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        validate_utf8: bool = True,
    ) -> None:
        if max_message_size < 0:
            raise LocalProtocolError("max_message_size must be >= 0")
        self._mask_bit = 0 if client_side else 0x80
        self._max = max_message_size
        # Payload lengths the fast path may take without the general checks (0: never).
        self._fast_max = (
            0
            if client_side or max_message_size < _FAST_MIN_CAP
            else min(max_message_size, _FAST_MAX_LENGTH)
        )
        self._validate = validate_utf8
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._need = 2
        self._frag_op = 0
        self._frag_parts: list[bytes] = []
        self._frag_size = 0
        self._utf8: codecs.IncrementalDecoder | None = None
        self._error: DecodeError | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        """A CLOSE frame was decoded; later bytes are discarded."""
        return self._closed

    @property
    def error(self) -> DecodeError | None:
        """The protocol error that stopped the decoder, if any."""
        return self._error

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return self._buffered

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Queue bytes; nothing is parsed until :meth:`messages`."""
        if not data or self._closed or self._error is not None:
            return
        self._chunks.append(data if type(data) is bytes else bytes(data))
        self._buffered += len(data)

    def messages(self) -> list[tuple[int, bytes]]:
        """Every message completed by the data received so far."""
        if self._error is not None:
            raise self._error
        if self._buffered < self._need or self._closed:
            return []
        chunks = self._chunks
        buf = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        n = len(buf)
        pos = 0
        need = 2
        out: list[tuple[int, bytes]] = []
        mask_bit = self._mask_bit
        fast = self._fast_max != 0
        try:
            while True:
                if fast and not self._frag_op:
                    pos = self._masked_run(buf, pos, out)
                avail = n - pos
                if avail < 2:
                    need = 2
                    break
                b0 = buf[pos]
                b1 = buf[pos + 1]
                opcode = b0 & 0x0F
                # RFC 6455 §5.2: no extension was negotiated, so RSV1-3 must be 0.
                if b0 & 0x70:
                    raise _bad("reserved bits set")
                if opcode >= 8:
                    if opcode > PONG:
                        raise _bad(f"unknown opcode {opcode:#x}")
                    if not b0 & 0x80:
                        raise _bad("fragmented control frame")
                    if b1 & 0x7F > _MAX_CONTROL_PAYLOAD:
                        raise _bad("control frame payload longer than 125 bytes")
                elif opcode > BINARY:
                    raise _bad(f"unknown opcode {opcode:#x}")
                elif opcode == CONTINUATION:
                    if not self._frag_op:
                        raise _bad("continuation frame without a message to continue")
                elif self._frag_op:
                    raise _bad("new data frame inside a fragmented message")
                if b1 & 0x80 != mask_bit:
                    raise _bad("unmasked client frame" if mask_bit else "masked server frame")
                length = b1 & 0x7F
                start = pos + 2
                if length >= 126:
                    if length == 126:
                        if avail < 4:
                            need = 4
                            break
                        length = _U16.unpack_from(buf, start)[0]
                        start += 2
                        if length < 126:
                            raise _bad("payload length not minimally encoded")
                    else:
                        if avail < 10:
                            need = 10
                            break
                        length = _U64.unpack_from(buf, start)[0]
                        start += 8
                        if length < 65536:
                            raise _bad("payload length not minimally encoded")
                        if length >> 63:
                            raise _bad("64-bit payload length with the top bit set")
                # The cap covers the whole message, checked before buffering its payload.
                if opcode < 8 and self._frag_size + length > self._max:
                    raise PayloadTooLarge("message exceeds max_message_size")
                if mask_bit:
                    end = start + 4 + length
                    if end > n:
                        need = end - pos
                        break
                    words = (length + 3) >> 2
                    if words <= _REPUNIT_WORDS:  # apply_mask, inlined for small frames
                        payload = (
                            (
                                int.from_bytes(buf[start + 4 : end], "little")
                                ^ _U32LE.unpack_from(buf, start)[0] * _REPUNIT[words]
                            ).to_bytes(words << 2, "little")[:length]
                            if length
                            else b""
                        )
                    else:
                        payload = apply_mask(buf[start + 4 : end], buf[start : start + 4])
                else:
                    end = start + length
                    if end > n:
                        need = end - pos
                        break
                    payload = buf[start:end]
                pos = end

                if opcode >= 8:
                    if opcode == CLOSE:
                        parse_close(payload)
                        out.append((CLOSE, payload))
                        self._closed = True
                        break
                    out.append((opcode, payload))
                elif b0 & 0x80:
                    if opcode == CONTINUATION:
                        if self._utf8 is not None:
                            _feed_utf8(self._utf8, payload, True)
                            self._utf8 = None
                        self._frag_parts.append(payload)
                        payload = b"".join(self._frag_parts)
                        opcode = self._frag_op
                        self._frag_op = 0
                        self._frag_parts = []
                        self._frag_size = 0
                    elif opcode == TEXT and self._validate and not payload.isascii():
                        decode_text(payload)
                    out.append((opcode, payload))
                elif opcode == CONTINUATION:
                    if self._utf8 is not None:
                        _feed_utf8(self._utf8, payload, False)
                    self._frag_parts.append(payload)
                    self._frag_size += length
                else:
                    self._frag_op = opcode
                    self._frag_parts = [payload]
                    self._frag_size = length
                    if opcode == TEXT and self._validate:
                        self._utf8 = _Utf8Decoder()
                        _feed_utf8(self._utf8, payload, False)
        except DecodeError as exc:
            self._error = exc
            self._chunks = []
            self._buffered = 0
            self._frag_parts = []
            if out:
                return out
            raise
        if self._closed or pos == n:
            self._chunks = []
            self._buffered = 0
            self._need = 2
        else:
            rest = buf[pos:] if pos else buf
            self._chunks = [rest]
            self._buffered = n - pos
            self._need = need
        return out

    def _masked_run(self, buf: bytes, pos: int, out: list[tuple[int, bytes]]) -> int:
        """Decode the run of fast-path frames at ``pos`` into ``out``; return the new offset.

        A frame qualifies when it is complete, FIN, masked, of the run's opcode (TEXT or
        BINARY, set by the first frame), no longer than ``_fast_max`` and minimally
        encoded with a 7- or 16-bit length: every rule the general walk checks holds for
        it, so it cannot raise a framing error. The first frame that does not qualify
        ends the run and is left to the caller's loop.
        """
        n = len(buf)
        if n - pos < 6:
            return pos
        b0 = buf[pos]
        if b0 != 0x81 and b0 != 0x82:  # FIN, no RSV bits, TEXT or BINARY
            return pos
        start = pos
        limit = self._fast_max
        masked_len = _MASKED_LEN
        words = _WORDS
        overshoot = _OVERSHOOT
        gap6 = _GAP6
        parts: list[bytes] = []  # the mask stream, aligned with buf[start:pos]
        spans: list[int] = []  # payload start, payload end (offsets into buf)
        add_part = parts.append
        add_span = spans.append
        carry = 0  # bytes the previous repeated key overshot into this header
        while n - pos >= 6 and buf[pos] == b0:
            length = masked_len[buf[pos + 1]]
            if length < 126:
                body = pos + 6
                end = body + length
                if end > n:
                    break
                add_part(gap6[carry])
                add_part(buf[pos + 2 : body] * words[length])
                carry = overshoot[length]
            elif length == 126 and n - pos >= 8:
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                body = pos + 8
                end = body + length
                if length < 126 or length > limit or end > n:
                    break
                add_part(_GAP8[carry])
                add_part(buf[pos + 4 : body] * ((length + 3) >> 2))
                carry = -length & 3
            else:
                break
            add_span(body)
            add_span(end)
            pos = end
        if not spans:
            return pos
        # RFC 6455 §5.3: XOR every payload with its key in one pass. The mask stream is
        # ``carry`` bytes longer than the run; those high bytes are never sliced.
        plain = (
            int.from_bytes(buf[start:pos] if start else buf[:pos], "little")
            ^ int.from_bytes(b"".join(parts), "little")
        ).to_bytes(pos - start + carry, "little")
        op = b0 & 0x0F
        it = iter(spans)
        if not self._validate or op != TEXT:
            if start:  # offsets into plain are relative to the run
                out += [(op, plain[a - start : b - start]) for a, b in zip(it, it)]
            else:
                out += [(op, plain[a:b]) for a, b in zip(it, it)]
            return pos
        for a, b in zip(it, it):
            payload = plain[a - start : b - start]
            if not payload.isascii():
                decode_text(payload)  # RFC 6455 §8.1: raises the 1007 error
            out.append((op, payload))
        return pos


# Pre-built 2-byte headers for small unmasked FIN frames: the broadcast hot path.
_TEXT_HEADERS: Final = tuple(bytes((0x80 | TEXT, i)) for i in range(126))
_BINARY_HEADERS: Final = tuple(bytes((0x80 | BINARY, i)) for i in range(126))
_OPCODES: Final = frozenset({CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG})


def text_frame(payload: bytes) -> bytes:
    """An unmasked FIN text frame, built once and shared by every recipient."""
    n = len(payload)
    if n < 126:
        return _TEXT_HEADERS[n] + payload
    if n < 65536:
        return _HDR16.pack(0x81, 126, n) + payload
    return _HDR64.pack(0x81, 127, n) + payload


def binary_frame(payload: bytes) -> bytes:
    """An unmasked FIN binary frame (server to client)."""
    n = len(payload)
    if n < 126:
        return _BINARY_HEADERS[n] + payload
    if n < 65536:
        return _HDR16.pack(0x82, 126, n) + payload
    return _HDR64.pack(0x82, 127, n) + payload


def frame_header(opcode: int, length: int, *, fin: bool = True) -> bytes:
    """The header of an unmasked frame, for callers that write header and payload apart."""
    b0 = (0x80 if fin else 0) | opcode
    if length < 126:
        return bytes((b0, length))
    if length < 65536:
        return _HDR16.pack(b0, 126, length)
    return _HDR64.pack(b0, 127, length)


def encode_frame(
    opcode: int,
    payload: bytes | bytearray | memoryview,
    *,
    mask_key: bytes | None = None,
    fin: bool = True,
) -> bytes:
    """One frame with the minimal length encoding; masked when ``mask_key`` is given.

    Clients pass a fresh 4-byte ``mask_key`` from their injected RNG (RFC 6455 §5.3);
    servers pass none.
    """
    if opcode not in _OPCODES:
        raise LocalProtocolError(f"unknown opcode {opcode:#x}")
    n = len(payload)
    if opcode >= 8 and (n > _MAX_CONTROL_PAYLOAD or not fin):
        raise LocalProtocolError("control frames carry <= 125 bytes and cannot be fragmented")
    b0 = (0x80 if fin else 0) | opcode
    if mask_key is None:
        if n < 126:
            return bytes((b0, n)) + payload
        if n < 65536:
            return _HDR16.pack(b0, 126, n) + payload
        return _HDR64.pack(b0, 127, n) + payload
    if len(mask_key) != 4:
        raise LocalProtocolError("mask_key must be 4 bytes")
    if n < 126:
        header = bytes((b0, 0x80 | n))
    elif n < 65536:
        header = _HDR16.pack(b0, 0xFE, n)
    else:
        header = _HDR64.pack(b0, 0xFF, n)
    return header + mask_key + apply_mask(payload, mask_key)


def encode_close(code: int | None, reason: str = "", *, mask_key: bytes | None = None) -> bytes:
    """A Close frame. ``code=None`` gives the empty, status-less Close the original
    sends on disconnect, idle timeout and oversize messages (peer sees 1005, reference §6.5).
    """
    if code is None:
        if reason:
            raise LocalProtocolError("a close reason needs a status code")
        return encode_frame(CLOSE, b"", mask_key=mask_key)
    if not is_valid_close_code(code):
        raise LocalProtocolError(f"close code {code} may not be sent")
    raw = reason.encode("utf-8")
    if len(raw) > _MAX_REASON_BYTES:
        raise LocalProtocolError("close reason longer than 123 UTF-8 bytes")
    return encode_frame(CLOSE, _U16.pack(code) + raw, mask_key=mask_key)

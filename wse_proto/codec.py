"""Frame forms of the WSE protocol.

Server side: inbound text/binary decoding (``msg`` / ``raw`` / ``bin``) and the outbound
``send_event`` forms (JSON, ``C:`` + zlib, ``M:`` + msgpack). Client side: decoding of
every form a server may send (text prefixes, ``C:``, ``M:``, ``E:``, raw zlib, JSON in a
binary frame, raw msgpack, batches). Decoders raise only :mod:`wse_proto.errors` classes
(``DecodeError``, ``PayloadTooLarge``; ``DecryptionError`` for ``E:`` frames).
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final, Literal, NamedTuple

import msgpack as _msgpack
import orjson

from .envelope import dumps_server, normalize_keys, strip_legacy_prefix
from .errors import DecodeError, DecryptionError, LocalProtocolError, PayloadTooLarge, WSEError

__all__ = [
    "MAX_MESSAGE_SIZE",
    "MSGPACK_MAX_DEPTH",
    "Inbound",
    "decode_client_binary",
    "decode_client_plaintext",
    "decode_client_text",
    "decode_server_message",
    "encode_event",
    "msgpack_loads",
    "zlib_decompress",
]

MAX_MESSAGE_SIZE: Final = 1_048_576
"""Clients drop frames (and decompressed payloads) above 1 MiB (ref §2.7)."""

MSGPACK_MAX_DEPTH: Final = 64
"""Inbound msgpack nesting limit of the original's pre-scan (ref §5.2)."""

_ZLIB_SECOND_BYTES: Final = frozenset({0x01, 0x5E, 0x9C, 0xDA})


@dataclass(frozen=True, slots=True, init=False)
class Inbound:
    """One decoded client frame, as the server hands it to the application (ref §3.3).

    ``msg``: ``value`` is the parsed (key-normalised) JSON/msgpack value; ``raw``: the text
    exactly as received; ``bin``: the bytes as received. ``raw_type`` is the top-level
    ``t`` before normalisation, set only for plain text frames, because only those may be
    intercepted as ``client_hello`` / ``ping`` / ``pong`` (ref §3.2).
    """

    kind: Literal["msg", "raw", "bin"]
    value: Any
    raw_type: str | None

    def __init__(
        self, kind: Literal["msg", "raw", "bin"], value: Any, raw_type: str | None = None
    ) -> None:
        # Set through the slot descriptors: the frozen __setattr__ path costs twice as
        # much, and one Inbound is made per received message.
        _set_kind(self, kind)
        _set_value(self, value)
        _set_raw_type(self, raw_type)


_set_kind = getattr(Inbound, "kind").__set__  # noqa: B009
_set_value = getattr(Inbound, "value").__set__  # noqa: B009
_set_raw_type = getattr(Inbound, "raw_type").__set__  # noqa: B009


# --------------------------------------------------------------------------------------
# Server side: inbound (ref §2.6, §2.8, §4.4, §5.2)


def decode_client_text(text: str) -> Inbound:
    """Decode a client text frame; never raises.

    ``WSE{`` / ``S{`` / ``U{`` prefixes are stripped, text starting with ``{`` is parsed;
    anything else, and JSON that fails to parse, is ``raw`` with the original text.
    """
    if text.startswith("{"):
        body = text
    elif text.startswith("WSE{"):
        body = text[3:]
    elif text.startswith(("S{", "U{")):
        body = text[1:]
    else:
        return Inbound("raw", text)
    try:
        obj = orjson.loads(body)
    except ValueError:
        return Inbound("raw", text)
    t = obj.get("t")  # body starts with "{", so obj is a dict
    return Inbound("msg", normalize_keys(obj), t if type(t) is str else None)


def decode_client_plaintext(plaintext: bytes) -> Inbound | None:
    """Decode the plaintext of a client ``E:`` frame (ref §4.4).

    Same prefix rules as text frames, but: invalid UTF-8 and JSON that fails to parse are
    dropped (``None``), and nothing is intercepted (``raw_type`` stays ``None``), so an
    encrypted ``ping`` reaches the application as a ``msg`` (ref §3.2).
    """
    try:
        text = bytes(plaintext).decode("utf-8")
    except UnicodeDecodeError:
        return None
    inbound = decode_client_text(text)
    if inbound.kind == "msg":
        return Inbound("msg", inbound.value)
    if strip_legacy_prefix(text)[1].startswith("{"):
        return None  # looked like JSON but did not parse
    return inbound


def decode_client_binary(data: bytes, *, msgpack: bool) -> Inbound:
    """Decode a client binary frame; never raises.

    On a JSON connection every binary frame is ``bin`` (K8). On a ``format=msgpack``
    connection the frame is raw msgpack: the first complete value is the message
    (trailing bytes ignored); values nested deeper than 64, truncated values and the
    reserved ``0xc1`` marker make the frame ``bin`` instead (ref §5.2).
    """
    data = bytes(data)
    if not msgpack:
        return Inbound("bin", data)
    try:
        value = msgpack_loads(data, allow_trailing=True)
    except DecodeError:
        return Inbound("bin", data)
    if type(value) is dict:
        value = normalize_keys(value)
    return Inbound("msg", value)


# --------------------------------------------------------------------------------------
# Server side: outbound send_event forms (ref §2.4, §5.1, §5.2)


def encode_event(
    envelope: dict[str, Any], *, msgpack: bool, compression_threshold: int
) -> tuple[bytes, bool]:
    """The payload of a ``send_event`` frame and whether it is binary (always, ref §2.4).

    JSON (server byte form) when its length is <= ``compression_threshold`` or the
    threshold is <= 0; ``b"C:"`` + zlib level 1 (header ``78 01``) when strictly longer;
    on msgpack connections ``b"M:"`` + msgpack of the same key-sorted value, never
    compressed. Encrypted connections must pass ``msgpack=False`` and threshold 0: their
    plaintext is always JSON (F4, ref §5.1).
    """
    body = dumps_server(envelope)
    if msgpack:
        # Re-parsing the sorted JSON gives dicts in sorted order at every level (orjson
        # keeps document order), which is the map order the original writes.
        return b"M:" + _msgpack.packb(orjson.loads(body), use_bin_type=True), True
    if 0 < compression_threshold < len(body):
        return b"C:" + zlib.compress(body, 1), True
    return body, True


# --------------------------------------------------------------------------------------
# Client side: every server frame form (ref §2.7, §2.8)


def decode_server_message(
    data: bytes | str,
    *,
    decrypt: Callable[[bytes], bytes] | None = None,
    max_size: int = MAX_MESSAGE_SIZE,
) -> list[dict[str, Any]]:
    """Decode one server frame into events, in the order wse-client 2.5.1 tries forms.

    ``str`` is a text frame: legacy prefix, then JSON. ``bytes`` is a binary frame:
    ``C:`` zlib, ``M:`` msgpack, ``E:`` (``decrypt`` gets the whole frame and returns the
    plaintext, which follows the text rules), raw zlib (``78 01|5e|9c|da``), UTF-8 JSON,
    else raw msgpack. A batch expands to its inner messages. Each event has ``t`` (``t``
    or ``type`` or ``"unknown"``) and a dict ``p`` (``p`` or ``payload`` or ``{}``;
    non-objects wrapped as ``{"data": x}``); a legacy prefix sets ``c``.
    Frames or decompressed payloads above ``max_size`` raise PayloadTooLarge.
    """
    if type(data) is not bytes:
        if isinstance(data, str):
            if len(data) > max_size:
                raise PayloadTooLarge(f"text frame of {len(data)} characters")
            return _decode_text_frame(data)
        data = bytes(data)
    if len(data) > max_size:
        raise PayloadTooLarge(f"binary frame of {len(data)} bytes")
    if data[:1] == b"{":
        # Hot path (send_event output): JSON in a binary frame. orjson checks the UTF-8;
        # anything it rejects takes the full order below, so the result is the same.
        try:
            parsed = orjson.loads(data)
        except ValueError:
            pass
        else:
            return _events(parsed, None)
    head = data[:2]
    if head == b"C:":
        return _decode_text_frame(_utf8(zlib_decompress(data[2:], max_size)))
    if head == b"M:":
        return _events(msgpack_loads(data[2:]), None)
    if head == b"E:":
        return _decode_text_frame(_decrypt(data, decrypt))
    if len(data) >= 2 and data[0] == 0x78 and data[1] in _ZLIB_SECOND_BYTES:
        return _decode_text_frame(_utf8(zlib_decompress(data, max_size)))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return _events(msgpack_loads(data), None)
    return _decode_text_frame(text)


def _utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"payload is not UTF-8: {exc}") from None


def _decrypt(frame: bytes, decrypt: Callable[[bytes], bytes] | None) -> str:
    if decrypt is None:
        raise DecryptionError("E: frame received but no key was negotiated")
    try:
        plaintext: bytes | str = decrypt(frame)
    except WSEError:
        raise
    except Exception as exc:  # a foreign decrypt callable: keep the single error root
        raise DecryptionError(f"decryption failed: {exc!r}") from exc
    return plaintext if isinstance(plaintext, str) else _utf8(bytes(plaintext))


def _decode_text_frame(text: str) -> list[dict[str, Any]]:
    if text[:1] == "{":
        category, body = None, text
    else:
        category, body = strip_legacy_prefix(text)
    try:
        parsed = orjson.loads(body)
    except ValueError as exc:
        raise DecodeError(f"text frame is not JSON: {exc}") from None
    return _events(parsed, category)


def _events(parsed: Any, category: str | None) -> list[dict[str, Any]]:
    if type(parsed) is not dict:
        raise DecodeError(f"message is a JSON {type(parsed).__name__}, not an object")
    t = parsed.get("t") or parsed.get("type", "unknown")
    p = parsed.get("p") or parsed.get("payload") or {}
    if t == "batch" and type(p) is dict and "messages" in p:
        inner = p["messages"]
        if type(inner) is not list:
            raise DecodeError("batch messages is not an array")
        out: list[dict[str, Any]] = []
        for item in inner:
            # Non-objects and nested batches are skipped, as wse-client 2.5.1 does.
            if type(item) is dict:
                it = item.get("t") or item.get("type", "unknown")
                ip = item.get("p") or item.get("payload") or {}
                if not (it == "batch" and type(ip) is dict and "messages" in ip):
                    out.append(_event(item, it, ip, category))
        return out
    return [_event(parsed, t, p, category)]


def _event(parsed: dict[str, Any], t: Any, p: Any, category: str | None) -> dict[str, Any]:
    """Normalise in place (the dict was just decoded, nobody else holds it)."""
    if "type" in parsed and not parsed.get("t"):
        del parsed["type"]
    if "payload" in parsed and not parsed.get("p"):
        del parsed["payload"]
    parsed["t"] = t
    parsed["p"] = p if type(p) is dict else {"data": p}
    if category is not None:
        parsed["c"] = category
    return parsed


# --------------------------------------------------------------------------------------
# zlib with a real output cap (ref §5.1)


def zlib_decompress(data: bytes, max_size: int) -> bytes:
    """Inflate a zlib stream (raw deflate accepted too, like wse-client), producing at
    most ``max_size`` bytes: a larger output raises PayloadTooLarge as soon as the cap is
    crossed, so a decompression bomb costs at most ``max_size + 1`` bytes of memory.
    Bytes after the end of the stream are ignored; a truncated stream is a DecodeError.
    """
    if max_size < 0:
        raise LocalProtocolError("max_size must be >= 0")
    try:
        return _inflate(data, max_size, zlib.MAX_WBITS)
    except PayloadTooLarge:
        raise
    except DecodeError:
        return _inflate(data, max_size, -zlib.MAX_WBITS)


def _inflate(data: bytes, max_size: int, wbits: int) -> bytes:
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(data, max_size + 1)
    except zlib.error as exc:
        raise DecodeError(f"bad zlib data: {exc}") from None
    if len(out) > max_size:
        raise PayloadTooLarge(f"decompressed payload exceeds {max_size} bytes")
    if not inflater.eof:
        raise DecodeError("truncated zlib stream")
    return out


# --------------------------------------------------------------------------------------
# msgpack -> JSON values (ref §5.2)


class _Ext(NamedTuple):
    code: int
    data: bytes


class _RawMap(list[tuple[Any, Any]]):
    """A map decoded as key material (pairs kept, nothing merged)."""


class _BadStr:
    """A msgpack str whose bytes are not UTF-8, seen as key material."""


_BAD_STR: Final = _BadStr()


def _byte_classes() -> bytes:
    """Translation table sorting bytes into the markers the fast path cares about:
    ``C`` container header, ``X`` bin/ext header, ``F`` float header, ``N`` a byte that
    starts an all-ones exponent after a float header (NaN/inf), ``.`` anything else."""
    table = bytearray(b"." * 256)
    for b in [*range(0x80, 0xA0), 0xDC, 0xDD, 0xDE, 0xDF]:
        table[b] = ord("C")
    for b in [*range(0xC4, 0xCA), *range(0xD4, 0xD9)]:
        table[b] = ord("X")
    table[0xCA] = table[0xCB] = ord("F")
    table[0x7F] = table[0xFF] = ord("N")
    return bytes(table)


_CLASSES: Final = _byte_classes()


class _NeedSlowPath(Exception):
    pass


def msgpack_loads(
    data: bytes, *, max_depth: int = MSGPACK_MAX_DEPTH, allow_trailing: bool = False
) -> Any:
    """Decode one msgpack value into JSON data, the way the original maps it (ref §5.2).

    nil -> None, ints as is, floats as is (NaN/inf -> None), str -> str (invalid UTF-8 ->
    ``""``), bin and ext -> lowercase hex of the data, non-string map keys -> their display
    form (``1``, ``true``, ``nil``, ``[1, 2]``...). Raises DecodeError for truncated input,
    the reserved ``0xc1`` marker, nesting deeper than ``max_depth`` containers, and bytes
    after the value unless ``allow_trailing``.

    The C extension does the work when it can; inputs it cannot map exactly (non-string
    keys, invalid UTF-8, timestamps, errors) go through a pure-Python decoder.
    """
    if type(data) is not bytes:
        data = bytes(data)
    n = len(data)
    # One pass over the bytes tells whether the C result may need fixing. Every container
    # starts with a "C" byte: with no more of them than the limit (the usual case) the
    # depth cannot be exceeded. Without "X" (bin/ext) and "FN" (float that may be NaN or
    # inf) nothing needs mapping. Bytes inside strings only cause a needless walk.
    classes = data.translate(_CLASSES)
    deep = classes.count(b"C") > max_depth
    try:
        try:
            value = _msgpack.unpackb(data, ext_hook=_Ext, strict_map_key=True)
        except _msgpack.ExtraData as extra:
            if not allow_trailing:
                raise DecodeError("bytes after the msgpack value") from None
            value = extra.unpacked
        if b"X" in classes or b"FN" in classes:
            return _fix(value, 0, max_depth)
        if deep and (type(value) is list or type(value) is dict):
            _check_depth(value, 0, max_depth)
        return value
    except DecodeError:
        raise
    except (_NeedSlowPath, ValueError, TypeError, _msgpack.UnpackException):
        pass
    except RecursionError:
        raise DecodeError("msgpack value nested too deeply") from None
    try:
        value, end = _py_value(data, 0, 0, max_depth, False)
    except RecursionError:
        raise DecodeError("msgpack value nested too deeply") from None
    if end != n and not allow_trailing:
        raise DecodeError("bytes after the msgpack value")
    return value


def _fix(value: Any, depth: int, max_depth: int) -> Any:
    """Map a C-decoded value to JSON data, checking the depth on the way."""
    t = type(value)
    if t is dict:
        if depth >= max_depth:
            raise DecodeError(f"msgpack nested deeper than {max_depth}")
        return {
            (k if type(k) is str else _display(k)): _fix(v, depth + 1, max_depth)
            for k, v in value.items()
        }
    if t is list:
        if depth >= max_depth:
            raise DecodeError(f"msgpack nested deeper than {max_depth}")
        return [_fix(v, depth + 1, max_depth) for v in value]
    if t is bytes:
        return value.hex()
    if t is float:
        return value if math.isfinite(value) else None
    if t is _Ext:
        return value.data.hex()
    if t is _msgpack.Timestamp:
        raise _NeedSlowPath  # the C extension hides a timestamp's original bytes
    return value


def _check_depth(value: Any, depth: int, max_depth: int) -> None:
    children = value.values() if type(value) is dict else value
    if depth >= max_depth:
        raise DecodeError(f"msgpack nested deeper than {max_depth}")
    for child in children:
        if type(child) is list or type(child) is dict:
            _check_depth(child, depth + 1, max_depth)


_U16 = struct.Struct(">H").unpack_from
_U32 = struct.Struct(">I").unpack_from
_U64 = struct.Struct(">Q").unpack_from
_I8 = struct.Struct(">b").unpack_from
_I16 = struct.Struct(">h").unpack_from
_I32 = struct.Struct(">i").unpack_from
_I64 = struct.Struct(">q").unpack_from
_F32 = struct.Struct(">f").unpack_from
_F64 = struct.Struct(">d").unpack_from
_FIXEXT_SIZES: Final = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}


def _need(buf: bytes, pos: int, size: int) -> None:
    if pos + size > len(buf):
        raise DecodeError("truncated msgpack value")


def _py_value(buf: bytes, pos: int, depth: int, max_depth: int, raw: bool) -> tuple[Any, int]:
    """Decode the value at ``pos``; ``raw`` keeps key material (bytes, ext, pairs)."""
    _need(buf, pos, 1)
    b = buf[pos]
    pos += 1
    if b < 0x80:
        return b, pos
    if b >= 0xE0:
        return b - 0x100, pos
    if b < 0x90:
        return _py_map(buf, pos, b & 0x0F, depth, max_depth, raw)
    if b < 0xA0:
        return _py_array(buf, pos, b & 0x0F, depth, max_depth, raw)
    if b < 0xC0:
        return _py_str(buf, pos, b & 0x1F, raw)
    if b == 0xC0:
        return None, pos
    if b == 0xC2:
        return False, pos
    if b == 0xC3:
        return True, pos
    if 0xCC <= b <= 0xD3:
        size = 1 << ((b - 0xCC) & 3)
        _need(buf, pos, size)
        if b == 0xCC:
            return buf[pos], pos + 1
        reader = (_U16, _U32, _U64, _I8, _I16, _I32, _I64)[b - 0xCD]
        return reader(buf, pos)[0], pos + size
    if b == 0xCA or b == 0xCB:
        size = 4 if b == 0xCA else 8
        _need(buf, pos, size)
        f: float = (_F32 if b == 0xCA else _F64)(buf, pos)[0]
        if not raw and not math.isfinite(f):
            return None, pos + size
        return f, pos + size
    if 0xD9 <= b <= 0xDB:
        size, pos = _py_len(buf, pos, b - 0xD9)
        return _py_str(buf, pos, size, raw)
    if 0xC4 <= b <= 0xC6:
        size, pos = _py_len(buf, pos, b - 0xC4)
        _need(buf, pos, size)
        data = buf[pos : pos + size]
        return (data if raw else data.hex()), pos + size
    if 0xC7 <= b <= 0xC9 or 0xD4 <= b <= 0xD8:
        if b <= 0xC9:
            size, pos = _py_len(buf, pos, b - 0xC7)
        else:
            size = _FIXEXT_SIZES[b]
        _need(buf, pos, 1 + size)
        code = _I8(buf, pos)[0]
        data = buf[pos + 1 : pos + 1 + size]
        return (_Ext(code, data) if raw else data.hex()), pos + 1 + size
    if b == 0xDC or b == 0xDD:
        size, pos = _py_len(buf, pos, b - 0xDB)
        return _py_array(buf, pos, size, depth, max_depth, raw)
    if b == 0xDE or b == 0xDF:
        size, pos = _py_len(buf, pos, b - 0xDD)
        return _py_map(buf, pos, size, depth, max_depth, raw)
    raise DecodeError("reserved msgpack marker 0xc1")


def _py_len(buf: bytes, pos: int, width_index: int) -> tuple[int, int]:
    """Length field of width 1, 2 or 4 bytes (index 0, 1, 2)."""
    size = 1 << width_index
    _need(buf, pos, size)
    if size == 1:
        return buf[pos], pos + 1
    return (_U16 if size == 2 else _U32)(buf, pos)[0], pos + size


def _py_str(buf: bytes, pos: int, size: int, raw: bool) -> tuple[Any, int]:
    _need(buf, pos, size)
    try:
        return buf[pos : pos + size].decode("utf-8"), pos + size
    except UnicodeDecodeError:
        return (_BAD_STR if raw else ""), pos + size


def _py_array(
    buf: bytes, pos: int, size: int, depth: int, max_depth: int, raw: bool
) -> tuple[Any, int]:
    if depth >= max_depth:
        raise DecodeError(f"msgpack nested deeper than {max_depth}")
    if size > len(buf) - pos:  # every element takes at least one byte
        raise DecodeError("truncated msgpack array")
    out = []
    for _ in range(size):
        item, pos = _py_value(buf, pos, depth + 1, max_depth, raw)
        out.append(item)
    return out, pos


def _py_map(
    buf: bytes, pos: int, size: int, depth: int, max_depth: int, raw: bool
) -> tuple[Any, int]:
    if depth >= max_depth:
        raise DecodeError(f"msgpack nested deeper than {max_depth}")
    if 2 * size > len(buf) - pos:
        raise DecodeError("truncated msgpack map")
    if raw:
        pairs = _RawMap()
        for _ in range(size):
            key, pos = _py_value(buf, pos, depth + 1, max_depth, True)
            item, pos = _py_value(buf, pos, depth + 1, max_depth, True)
            pairs.append((key, item))
        return pairs, pos
    out: dict[str, Any] = {}
    for _ in range(size):
        key, pos = _py_value(buf, pos, depth + 1, max_depth, True)
        item, pos = _py_value(buf, pos, depth + 1, max_depth, False)
        out[key if type(key) is str else _display(key)] = item
    return out, pos


def _display(value: Any, nested: bool = False) -> str:
    """Text form of a non-string map key (modelled on rmpv's ``Display``)."""
    if value is None:
        return "nil"
    if value is True:
        return "true"
    if value is False:
        return "false"
    t = type(value)
    if t is int:
        return str(value)
    if t is float:
        return _float_display(value)
    if t is str:
        return f'"{value}"' if nested else value
    if t is bytes:
        return "[" + ", ".join(map(str, value)) + "]"
    if t is _Ext:
        return f"[{value.code}, [" + ", ".join(map(str, value.data)) + "]]"
    if t is _RawMap:
        inner = (f"{_display(k, True)}: {_display(v, True)}" for k, v in value)
        return "{" + ", ".join(inner) + "}"
    if t is list:
        return "[" + ", ".join(_display(v, True) for v in value) + "]"
    return '""' if nested else ""  # _BAD_STR


def _float_display(f: float) -> str:
    """Shortest round-trip digits without exponent, no ``.0`` (Rust's ``Display``)."""
    if math.isnan(f):
        return "NaN"
    if math.isinf(f):
        return "inf" if f > 0 else "-inf"
    text = format(Decimal(repr(f)), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text

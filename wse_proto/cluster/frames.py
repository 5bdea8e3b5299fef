"""Cluster frame codec: the node-to-node wire format of wse-server 2.5.1 (spec/CLUSTER.md).

Pure bytes in, frames out. Every frame on a peer stream is a 4-byte big-endian length
followed by an 8-byte little-endian header (type, flags, topic_len, payload_len), the
topic, the payload and, for MSG with flag bit1, a 12-byte recovery trailer (CLUSTER §2).
Links and the mesh live elsewhere; this module only encodes and decodes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar, Final, TypeAlias

import orjson
import zstandard

from wse_proto.errors import ClusterFrameError, LocalProtocolError

__all__ = [
    "CAP_INTEREST",
    "CAP_PRESENCE",
    "CAP_RECOVERY",
    "CAP_ZSTD",
    "FLAG_CONTINUATION",
    "FLAG_TRAILER",
    "FLAG_ZSTD",
    "HEADER",
    "HEADER_SIZE",
    "HELLO_MAGIC",
    "MAX_DECOMPRESSED",
    "MAX_FRAME",
    "MAX_INSTANCE_ID",
    "MAX_PEER_LIST",
    "OUR_CAPABILITIES",
    "PREFIX",
    "PRESENCE_CHUNK_MAX",
    "PRESENCE_JOIN",
    "PRESENCE_LEAVE",
    "PRESENCE_UPDATE",
    "PROTOCOL_VERSION",
    "TRAILER_SIZE",
    "ZSTD_LEVEL",
    "ZSTD_THRESHOLD",
    "Drain",
    "Frame",
    "FrameReader",
    "FrameType",
    "Hello",
    "Msg",
    "PeerAnnounce",
    "PeerList",
    "Ping",
    "Pong",
    "PresenceFull",
    "PresenceUpdate",
    "Resync",
    "Shutdown",
    "Sub",
    "Unknown",
    "Unsub",
    "ZstdContext",
    "decode_frame",
    "encode",
    "encode_msg",
    "parse_presence_full",
    "presence_full_frames",
    "resync_frames",
]


class FrameType(IntEnum):
    """Frame type byte (CLUSTER §3)."""

    MSG = 0x01
    PING = 0x02
    PONG = 0x03
    HELLO = 0x04
    SHUTDOWN = 0x05
    SUB = 0x06
    UNSUB = 0x07
    RESYNC = 0x08
    PEER_ANNOUNCE = 0x09
    PEER_LIST = 0x0A
    PRESENCE_UPDATE = 0x0B
    PRESENCE_FULL = 0x0C
    DRAIN = 0x0D


# Plain ints for the hot paths (IntEnum comparisons and hashing are slower).
_MSG: Final = 0x01
_PING: Final = 0x02
_PONG: Final = 0x03
_HELLO: Final = 0x04
_SHUTDOWN: Final = 0x05
_SUB: Final = 0x06
_UNSUB: Final = 0x07
_RESYNC: Final = 0x08
_PEER_ANNOUNCE: Final = 0x09
_PEER_LIST: Final = 0x0A
_PRESENCE_UPDATE: Final = 0x0B
_PRESENCE_FULL: Final = 0x0C
_DRAIN: Final = 0x0D

FLAG_ZSTD: Final = 0x01
"""MSG: the payload is one zstd frame (CLUSTER §4)."""
FLAG_TRAILER: Final = 0x02
"""MSG: a 12-byte recovery trailer follows the payload (CLUSTER §3.3)."""
FLAG_CONTINUATION: Final = 0x01
"""RESYNC: extend the peer's interest set instead of replacing it (CLUSTER §3.8)."""

CAP_INTEREST: Final = 0x01
CAP_ZSTD: Final = 0x02
CAP_PRESENCE: Final = 0x04
CAP_RECOVERY: Final = 0x08
OUR_CAPABILITIES: Final = CAP_INTEREST | CAP_ZSTD | CAP_PRESENCE | CAP_RECOVERY

PRESENCE_JOIN: Final = 0
PRESENCE_LEAVE: Final = 1
PRESENCE_UPDATE: Final = 2

HELLO_MAGIC: Final = b"WSE\x00"
PROTOCOL_VERSION: Final = 1
MAX_FRAME: Final = 1_048_576
"""Largest frame body (header included, prefix excluded) either side accepts."""
MAX_DECOMPRESSED: Final = 1_048_576
MAX_INSTANCE_ID: Final = 256
MAX_PEER_LIST: Final = 256
ZSTD_THRESHOLD: Final = 256
ZSTD_LEVEL: Final = 1
PRESENCE_CHUNK_MAX: Final = MAX_FRAME - 1024
"""Largest PRESENCE_FULL JSON text per chunk (CLUSTER §3.12)."""
HEADER_SIZE: Final = 8
TRAILER_SIZE: Final = 12

PREFIX: Final = struct.Struct(">I")
HEADER: Final = struct.Struct("<BBHI")
_TRAILER: Final = struct.Struct("<IQ")
_HELLO_HEAD: Final = struct.Struct("<4sHH")
_U16: Final = struct.Struct("<H")
_U32: Final = struct.Struct("<I")
_PRESENCE_HEAD: Final = struct.Struct("<BQH")

_PREFIX_PACK: Final = PREFIX.pack
_HEADER_PACK: Final = HEADER.pack

_U16_MAX: Final = 0xFFFF
_U32_MAX: Final = 0xFFFF_FFFF
_U64_MAX: Final = 0xFFFF_FFFF_FFFF_FFFF


# --------------------------------------------------------------------------- frames


@dataclass(frozen=True, slots=True)
class Msg:
    """A publication. ``epoch``/``offset`` (both or neither) become the recovery trailer.

    Compression is not a field: the encoder decides (``zstd=True``), the decoder undoes it.
    """

    TYPE: ClassVar[int] = _MSG
    topic: str
    payload: bytes
    epoch: int | None = None
    offset: int | None = None


@dataclass(frozen=True, slots=True)
class Ping:
    TYPE: ClassVar[int] = _PING


@dataclass(frozen=True, slots=True)
class Pong:
    TYPE: ClassVar[int] = _PONG


@dataclass(frozen=True, slots=True)
class Hello:
    """First frame of each side; ``instance_id`` is the node's UUIDv7 text."""

    TYPE: ClassVar[int] = _HELLO
    version: int
    instance_id: str
    capabilities: int


@dataclass(frozen=True, slots=True)
class Shutdown:
    TYPE: ClassVar[int] = _SHUTDOWN


@dataclass(frozen=True, slots=True)
class Sub:
    """The sender gained local interest in ``topic`` (an exact topic or a glob)."""

    TYPE: ClassVar[int] = _SUB
    topic: str


@dataclass(frozen=True, slots=True)
class Unsub:
    TYPE: ClassVar[int] = _UNSUB
    topic: str


@dataclass(frozen=True, slots=True)
class Resync:
    """The sender's whole interest set (``continuation=False``) or more of it (``True``)."""

    TYPE: ClassVar[int] = _RESYNC
    topics: tuple[str, ...]
    continuation: bool = False


@dataclass(frozen=True, slots=True)
class PeerAnnounce:
    TYPE: ClassVar[int] = _PEER_ANNOUNCE
    address: str


@dataclass(frozen=True, slots=True)
class PeerList:
    TYPE: ClassVar[int] = _PEER_LIST
    addresses: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PresenceUpdate:
    """One presence change; ``data`` is the compact JSON text of the user's presence data."""

    TYPE: ClassVar[int] = _PRESENCE_UPDATE
    topic: str
    action: int
    updated_at: int
    user_id: str
    data: bytes


@dataclass(frozen=True, slots=True)
class PresenceFull:
    """One chunk of a presence snapshot as raw JSON; see :func:`parse_presence_full`."""

    TYPE: ClassVar[int] = _PRESENCE_FULL
    data: bytes


@dataclass(frozen=True, slots=True)
class Drain:
    TYPE: ClassVar[int] = _DRAIN


@dataclass(frozen=True, slots=True)
class Unknown:
    """A frame type this codec does not know; the link counts it and skips it."""

    type: int
    flags: int
    topic: bytes
    payload: bytes


Frame: TypeAlias = (
    Msg
    | Ping
    | Pong
    | Hello
    | Shutdown
    | Sub
    | Unsub
    | Resync
    | PeerAnnounce
    | PeerList
    | PresenceUpdate
    | PresenceFull
    | Drain
    | Unknown
)

_PING_FRAME: Final = Ping()
_PONG_FRAME: Final = Pong()
_SHUTDOWN_FRAME: Final = Shutdown()
_DRAIN_FRAME: Final = Drain()


# --------------------------------------------------------------------------- zstd


_ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"


class ZstdContext:
    """zstd state for one user at a time (libzstd contexts are not thread safe).

    The module keeps one default instance; a caller encoding or decoding from several
    threads at once gives each thread (or link) its own.
    """

    __slots__ = ("_cctx", "_dctx")

    def __init__(self) -> None:
        self._cctx: zstandard.ZstdCompressor | None = None
        self._dctx: zstandard.ZstdDecompressor | None = None

    def compress(self, data: bytes) -> bytes | None:
        """The zstd frame for ``data`` when CLUSTER §4 says to use it, else ``None``."""
        if len(data) < ZSTD_THRESHOLD:
            return None
        cctx = self._cctx
        if cctx is None:
            # Same frame as the original's one-shot ZSTD_compress: content size, no checksum.
            cctx = self._cctx = zstandard.ZstdCompressor(
                level=ZSTD_LEVEL, write_content_size=True, write_checksum=False
            )
        out = cctx.compress(data)
        return out if len(out) < len(data) else None

    def decompress(self, data: bytes) -> bytes:
        """One zstd frame, at most ``MAX_DECOMPRESSED`` bytes out; else ClusterFrameError."""
        dctx = self._dctx
        if dctx is None:
            dctx = self._dctx = zstandard.ZstdDecompressor()
        if data[:4] != _ZSTD_MAGIC:
            # Skippable frames included: libzstd would size its output from their header.
            raise ClusterFrameError("MSG payload is not a zstd frame")
        try:
            # A declared size is allocated up front by libzstd: check it first.
            declared = zstandard.frame_content_size(data)
            if declared > MAX_DECOMPRESSED:
                raise ClusterFrameError("zstd payload larger than 1 MiB")
            return dctx.decompress(data, max_output_size=MAX_DECOMPRESSED, allow_extra_data=False)
        except zstandard.ZstdError as exc:
            raise ClusterFrameError(f"bad zstd payload: {exc}") from None


_ZSTD: Final = ZstdContext()


# --------------------------------------------------------------------------- encoding


def _utf8(text: str, what: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise LocalProtocolError(f"{what} is not encodable as UTF-8") from None


def _pack(ftype: int, flags: int, topic: bytes, payload: bytes) -> bytes:
    """Prefix + header + fields of a non-MSG frame, refusing what a peer would drop (§5)."""
    tl = len(topic)
    if tl > _U16_MAX:
        raise LocalProtocolError("topic longer than 65535 bytes")
    size = HEADER_SIZE + tl + len(payload)
    if size > MAX_FRAME:
        raise LocalProtocolError(f"cluster frame of {size} bytes exceeds {MAX_FRAME}")
    return b"".join(
        (_PREFIX_PACK(size), _HEADER_PACK(ftype, flags, tl, len(payload)), topic, payload)
    )


def encode_msg(
    topic: str,
    payload: bytes,
    *,
    epoch: int | None = None,
    offset: int | None = None,
    zstd: bool = False,
    context: ZstdContext | None = None,
) -> bytes:
    """A MSG frame (CLUSTER §3.3); ``zstd=True`` (CAP_ZSTD negotiated) compresses only when
    it helps (§4). This is the per-publication path, hence written out inline."""
    try:
        raw_topic = topic.encode("utf-8")
    except UnicodeEncodeError:
        raise LocalProtocolError("topic is not encodable as UTF-8") from None
    size = len(payload)
    if size > MAX_DECOMPRESSED:
        # Too big plain, and compressed it would exceed the receiver's decompression cap.
        raise LocalProtocolError(f"MSG payload of {size} bytes exceeds 1 MiB")
    flags = 0
    if zstd and size >= ZSTD_THRESHOLD:
        packed = (context or _ZSTD).compress(payload)
        if packed is not None:
            payload = packed
            size = len(packed)
            flags = FLAG_ZSTD
    tl = len(raw_topic)
    if tl > _U16_MAX:
        raise LocalProtocolError("topic longer than 65535 bytes")
    body = HEADER_SIZE + tl + size
    if epoch is None and offset is None:
        if body > MAX_FRAME:
            raise LocalProtocolError(f"cluster frame of {body} bytes exceeds {MAX_FRAME}")
        # Plain concatenation beats join for small frames; the payload is copied once.
        return _PREFIX_PACK(body) + _HEADER_PACK(_MSG, flags, tl, size) + raw_topic + payload
    if epoch is None or offset is None:
        raise LocalProtocolError("MSG trailer needs both epoch and offset")
    if not (0 <= epoch <= _U32_MAX and 0 <= offset <= _U64_MAX):
        raise LocalProtocolError("MSG trailer epoch must be u32 and offset u64")
    body += TRAILER_SIZE
    if body > MAX_FRAME:
        raise LocalProtocolError(f"cluster frame of {body} bytes exceeds {MAX_FRAME}")
    return b"".join(
        (
            _PREFIX_PACK(body),
            _HEADER_PACK(_MSG, flags | FLAG_TRAILER, tl, size),
            raw_topic,
            payload,
            _TRAILER.pack(epoch, offset),
        )
    )


def _enc_msg(f: Msg, zstd: bool, ctx: ZstdContext | None) -> bytes:
    return encode_msg(f.topic, f.payload, epoch=f.epoch, offset=f.offset, zstd=zstd, context=ctx)


def _enc_empty(ftype: int) -> Callable[[Any, bool, ZstdContext | None], bytes]:
    frame = _pack(ftype, 0, b"", b"")
    return lambda f, zstd, ctx: frame


def _enc_hello(f: Hello, zstd: bool, ctx: ZstdContext | None) -> bytes:
    ident = _utf8(f.instance_id, "instance id")
    if len(ident) > MAX_INSTANCE_ID:
        raise LocalProtocolError("instance id longer than 256 bytes")
    if not (0 <= f.version <= _U16_MAX and 0 <= f.capabilities <= _U32_MAX):
        raise LocalProtocolError("HELLO version must be u16 and capabilities u32")
    payload = b"".join(
        (_HELLO_HEAD.pack(HELLO_MAGIC, f.version, len(ident)), ident, _U32.pack(f.capabilities))
    )
    return _pack(_HELLO, 0, b"", payload)


def _enc_sub(f: Sub, zstd: bool, ctx: ZstdContext | None) -> bytes:
    return _pack(_SUB, 0, _utf8(f.topic, "topic"), b"")


def _enc_unsub(f: Unsub, zstd: bool, ctx: ZstdContext | None) -> bytes:
    return _pack(_UNSUB, 0, _utf8(f.topic, "topic"), b"")


def _resync_topic(topic: str) -> bytes:
    raw = _utf8(topic, "topic")
    if not raw or b"\n" in raw:
        # The receiver splits on \n and drops empty lines: such a topic cannot travel.
        raise LocalProtocolError(f"topic {topic!r} cannot be sent in RESYNC")
    return raw


def _enc_resync(f: Resync, zstd: bool, ctx: ZstdContext | None) -> bytes:
    payload = b"\n".join([_resync_topic(t) for t in f.topics])
    return _pack(_RESYNC, FLAG_CONTINUATION if f.continuation else 0, b"", payload)


def _enc_announce(f: PeerAnnounce, zstd: bool, ctx: ZstdContext | None) -> bytes:
    return _pack(_PEER_ANNOUNCE, 0, _utf8(f.address, "address"), b"")


def _enc_peer_list(f: PeerList, zstd: bool, ctx: ZstdContext | None) -> bytes:
    if len(f.addresses) > MAX_PEER_LIST:
        raise LocalProtocolError("PEER_LIST carries at most 256 addresses")
    parts = [_U16.pack(len(f.addresses))]
    for address in f.addresses:
        raw = _utf8(address, "address")
        if len(raw) > _U16_MAX:
            raise LocalProtocolError("address longer than 65535 bytes")
        parts.append(_U16.pack(len(raw)))
        parts.append(raw)
    return _pack(_PEER_LIST, 0, b"", b"".join(parts))


def _enc_presence_update(f: PresenceUpdate, zstd: bool, ctx: ZstdContext | None) -> bytes:
    user = _utf8(f.user_id, "user id")
    if len(user) > _U16_MAX:
        raise LocalProtocolError("user id longer than 65535 bytes")
    if not (0 <= f.action <= 0xFF and 0 <= f.updated_at <= _U64_MAX):
        raise LocalProtocolError("PRESENCE_UPDATE action must be u8 and updated_at u64")
    payload = b"".join((_PRESENCE_HEAD.pack(f.action, f.updated_at, len(user)), user, f.data))
    return _pack(_PRESENCE_UPDATE, 0, _utf8(f.topic, "topic"), payload)


def _enc_presence_full(f: PresenceFull, zstd: bool, ctx: ZstdContext | None) -> bytes:
    return _pack(_PRESENCE_FULL, 0, b"", f.data)


def _enc_unknown(f: Unknown, zstd: bool, ctx: ZstdContext | None) -> bytes:
    if not (0 <= f.type <= 0xFF and 0 <= f.flags <= 0xFF):
        raise LocalProtocolError("frame type and flags are single bytes")
    return _pack(f.type, f.flags, f.topic, f.payload)


_ENCODERS: Final[dict[type, Callable[[Any, bool, ZstdContext | None], bytes]]] = {
    Msg: _enc_msg,
    Ping: _enc_empty(_PING),
    Pong: _enc_empty(_PONG),
    Hello: _enc_hello,
    Shutdown: _enc_empty(_SHUTDOWN),
    Sub: _enc_sub,
    Unsub: _enc_unsub,
    Resync: _enc_resync,
    PeerAnnounce: _enc_announce,
    PeerList: _enc_peer_list,
    PresenceUpdate: _enc_presence_update,
    PresenceFull: _enc_presence_full,
    Drain: _enc_empty(_DRAIN),
    Unknown: _enc_unknown,
}


def encode(frame: Frame, *, zstd: bool = False, context: ZstdContext | None = None) -> bytes:
    """Length prefix + header + body of one frame, ready to write on a peer stream.

    ``zstd`` only affects MSG (CLUSTER §4). Raises ``LocalProtocolError`` for a frame the
    peer would refuse (too large, out-of-range numbers, untransportable strings).
    """
    encoder = _ENCODERS.get(type(frame))
    if encoder is None:
        raise LocalProtocolError(f"not a cluster frame: {frame!r}")
    return encoder(frame, zstd, context)


def resync_frames(topics: Iterable[str], *, max_frame: int = MAX_FRAME) -> list[Resync]:
    """Split an interest set into RESYNC frames of at most ``max_frame`` bytes each.

    The first frame replaces the peer's set, the others extend it (CLUSTER §3.8). An empty
    set gives one empty replacing frame, which clears the peer's view.
    """
    budget = max_frame - HEADER_SIZE
    frames: list[Resync] = []
    current: list[str] = []
    used = -1  # no separator before the first topic of a frame
    for topic in topics:
        cost = len(_resync_topic(topic)) + 1
        if cost - 1 > budget:
            raise LocalProtocolError(f"topic of {cost - 1} bytes cannot fit a RESYNC frame")
        if current and used + cost > budget:
            frames.append(Resync(tuple(current), continuation=bool(frames)))
            current = []
            used = -1
        current.append(topic)
        used += cost
    if current or not frames:
        frames.append(Resync(tuple(current), continuation=bool(frames)))
    return frames


def _json(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    try:
        return orjson.dumps(value)
    except TypeError as exc:  # orjson.JSONEncodeError derives from TypeError
        raise LocalProtocolError(f"presence snapshot is not JSON serialisable: {exc}") from None


def presence_full_frames(
    entries: Mapping[str, Mapping[str, tuple[Any, int]]],
    *,
    max_json: int = PRESENCE_CHUNK_MAX,
) -> list[PresenceFull]:
    """A presence snapshot ``{topic: {user: (data, updated_at)}}`` as PRESENCE_FULL chunks.

    ``data`` is a JSON-serialisable value or already encoded JSON ``bytes``. Each chunk is
    ``{"<topic>":{"<user>":{"data":...,"updated_at":<ms>}}}`` of at most ``max_json`` bytes
    (CLUSTER §3.12); a topic may continue in the next chunk. No entries → one ``{}`` chunk.
    """
    chunks: list[PresenceFull] = []
    groups: list[bytes] = []  # finished "topic":{...} groups of the current chunk
    size = 2  # "{}"
    for topic, users in entries.items():
        key = _json(topic)
        members: list[bytes] = []
        for user, (data, updated_at) in users.items():
            if not (isinstance(updated_at, int) and 0 <= updated_at <= _U64_MAX):
                raise LocalProtocolError("presence updated_at must be a u64 of milliseconds")
            member = b"".join(
                (
                    _json(user),
                    b':{"data":',
                    _json(data),
                    b',"updated_at":',
                    str(updated_at).encode(),
                    b"}",
                )
            )
            # Joining the open topic group costs ",member"; opening one costs
            # [","]"topic":{member} (the closing brace included).
            cost = 1 + len(member) if members else int(bool(groups)) + len(key) + 3 + len(member)
            if size + cost > max_json:
                if groups or members:
                    if members:
                        groups.append(key + b":{" + b",".join(members) + b"}")
                    chunks.append(PresenceFull(b"{" + b",".join(groups) + b"}"))
                    groups, members, size = [], [], 2
                cost = len(key) + 3 + len(member)
                if size + cost > max_json:
                    raise LocalProtocolError("one presence entry exceeds the chunk size")
            members.append(member)
            size += cost
        if members:
            groups.append(key + b":{" + b",".join(members) + b"}")
    if groups or not chunks:
        chunks.append(PresenceFull(b"{" + b",".join(groups) + b"}"))
    return chunks


def parse_presence_full(data: bytes) -> dict[str, dict[str, tuple[Any, int]]] | None:
    """``{topic: {user: (data, updated_at)}}`` from a PRESENCE_FULL chunk, or ``None``.

    Not a link error: invalid JSON or a non-object top level is ignored (``None``) as the
    original does; non-object topic or user entries are skipped; a missing or non-u64
    ``updated_at`` counts as 0 and a missing ``data`` as ``null`` (CLUSTER §3.12).
    """
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    out: dict[str, dict[str, tuple[Any, int]]] = {}
    for topic, users in doc.items():
        if not isinstance(users, dict):
            continue
        parsed: dict[str, tuple[Any, int]] = {}
        for user, entry in users.items():
            if not isinstance(entry, dict):
                continue
            ts = entry.get("updated_at", 0)
            if type(ts) is not int or not 0 <= ts <= _U64_MAX:
                ts = 0
            parsed[user] = (entry.get("data"), ts)
        out[topic] = parsed
    return out


# --------------------------------------------------------------------------- decoding
#
# Decoders work on the reader's bytes object with offsets (no memoryview, no copy of the
# body): ``base`` is where the body starts, ``end`` where it ends; ``ts`` = base + 8 is the
# topic start, ``ps`` = ts + topic_len the payload start, ``pe`` = ps + payload_len.

_Decoder = Callable[[bytes, int, int, int, int, ZstdContext], Frame]

_MSG_NEW = object.__new__
# Frozen dataclass __init__ goes through object.__setattr__ per field; the slot descriptors
# are cheaper, which matters for MSG, the one frame decoded per publication.
_MSG_SET = tuple(getattr(Msg, name).__set__ for name in ("topic", "payload", "epoch", "offset"))


def _make_msg(topic: str, payload: bytes, epoch: int | None, offset: int | None) -> Msg:
    msg: Msg = _MSG_NEW(Msg)
    set_topic, set_payload, set_epoch, set_offset = _MSG_SET
    set_topic(msg, topic)
    set_payload(msg, payload)
    set_epoch(msg, epoch)
    set_offset(msg, offset)
    return msg


def _text(data: bytes, start: int, stop: int, what: str) -> str:
    try:
        return data[start:stop].decode("utf-8")
    except UnicodeDecodeError:
        raise ClusterFrameError(f"{what} is not valid UTF-8") from None


def _dec_msg(data: bytes, flags: int, ts: int, ps: int, pe: int, ctx: ZstdContext) -> Frame:
    try:
        topic = data[ts:ps].decode("utf-8")
    except UnicodeDecodeError:
        raise ClusterFrameError("MSG topic is not valid UTF-8") from None
    epoch = offset = None
    if flags & FLAG_TRAILER:  # presence inside the frame was checked by _decode
        epoch, offset = _TRAILER.unpack_from(data, pe)
    payload = data[ps:pe]
    if flags & FLAG_ZSTD:
        payload = ctx.decompress(payload)
    return _make_msg(topic, payload, epoch, offset)


def _dec_hello(data: bytes, flags: int, ts: int, ps: int, pe: int, ctx: ZstdContext) -> Frame:
    if pe - ps < 12:
        raise ClusterFrameError("HELLO payload shorter than 12 bytes")
    magic, version, id_len = _HELLO_HEAD.unpack_from(data, ps)
    if magic != HELLO_MAGIC:
        raise ClusterFrameError("HELLO magic is not WSE\\0")
    if id_len > MAX_INSTANCE_ID:
        raise ClusterFrameError("HELLO instance id longer than 256 bytes")
    if 12 + id_len > pe - ps:
        raise ClusterFrameError("HELLO payload too short for its instance id")
    ident = _text(data, ps + 8, ps + 8 + id_len, "HELLO instance id")
    (caps,) = _U32.unpack_from(data, ps + 8 + id_len)
    return Hello(version, ident, caps)


def _dec_sub(data: bytes, flags: int, ts: int, ps: int, pe: int, ctx: ZstdContext) -> Frame:
    return Sub(_text(data, ts, ps, "SUB topic"))


def _dec_unsub(data: bytes, flags: int, ts: int, ps: int, pe: int, ctx: ZstdContext) -> Frame:
    return Unsub(_text(data, ts, ps, "UNSUB topic"))


def _dec_resync(data: bytes, flags: int, ts: int, ps: int, pe: int, ctx: ZstdContext) -> Frame:
    topics = []
    for line in data[ps:pe].split(b"\n"):
        if line:
            try:
                topics.append(line.decode("utf-8"))
            except UnicodeDecodeError:
                continue  # dropped, as the original does (CLUSTER §3.8)
    return Resync(tuple(topics), bool(flags & FLAG_CONTINUATION))


def _dec_announce(data: bytes, flags: int, ts: int, ps: int, pe: int, ctx: ZstdContext) -> Frame:
    return PeerAnnounce(_text(data, ts, ps, "PEER_ANNOUNCE address"))


def _dec_peer_list(data: bytes, flags: int, ts: int, ps: int, pe: int, ctx: ZstdContext) -> Frame:
    if pe - ps < 2:
        raise ClusterFrameError("PEER_LIST payload shorter than its count")
    (count,) = _U16.unpack_from(data, ps)
    pos = ps + 2
    addresses = []
    for _ in range(min(count, MAX_PEER_LIST)):  # CLUSTER §3.10: at most 256 are read
        if pos + 2 > pe:
            raise ClusterFrameError("PEER_LIST truncated")
        (n,) = _U16.unpack_from(data, pos)
        pos += 2
        if pos + n > pe:
            raise ClusterFrameError("PEER_LIST truncated")
        addresses.append(_text(data, pos, pos + n, "PEER_LIST address"))
        pos += n
    return PeerList(tuple(addresses))


def _dec_presence_update(
    data: bytes, flags: int, ts: int, ps: int, pe: int, ctx: ZstdContext
) -> Frame:
    topic = _text(data, ts, ps, "PRESENCE_UPDATE topic")
    if pe - ps < _PRESENCE_HEAD.size:
        raise ClusterFrameError("PRESENCE_UPDATE payload shorter than 11 bytes")
    action, updated_at, ulen = _PRESENCE_HEAD.unpack_from(data, ps)
    pos = ps + _PRESENCE_HEAD.size
    if pos + ulen > pe:
        raise ClusterFrameError("PRESENCE_UPDATE user id beyond the payload")
    user = _text(data, pos, pos + ulen, "PRESENCE_UPDATE user id")
    return PresenceUpdate(topic, action, updated_at, user, data[pos + ulen : pe])


def _dec_presence_full(
    data: bytes, flags: int, ts: int, ps: int, pe: int, ctx: ZstdContext
) -> Frame:
    return PresenceFull(data[ps:pe])


def _fixed(frame: Frame) -> _Decoder:
    return lambda data, flags, ts, ps, pe, ctx: frame


_DECODERS: Final[list[_Decoder | None]] = [None] * 256
for _t, _d in (
    (_MSG, _dec_msg),
    (_PING, _fixed(_PING_FRAME)),
    (_PONG, _fixed(_PONG_FRAME)),
    (_HELLO, _dec_hello),
    (_SHUTDOWN, _fixed(_SHUTDOWN_FRAME)),
    (_SUB, _dec_sub),
    (_UNSUB, _dec_unsub),
    (_RESYNC, _dec_resync),
    (_PEER_ANNOUNCE, _dec_announce),
    (_PEER_LIST, _dec_peer_list),
    (_PRESENCE_UPDATE, _dec_presence_update),
    (_PRESENCE_FULL, _dec_presence_full),
    (_DRAIN, _fixed(_DRAIN_FRAME)),
):
    _DECODERS[_t] = _d
del _t, _d


def _decode(data: bytes, base: int, end: int, ctx: ZstdContext) -> Frame:
    """The frame whose body is ``data[base:end]``; checks in CLUSTER §6 order."""
    if end - base < HEADER_SIZE:
        raise ClusterFrameError("cluster frame shorter than its 8-byte header")
    ftype: int
    ftype, flags, tl, pl = HEADER.unpack_from(data, base)
    ts = base + HEADER_SIZE
    ps = ts + tl
    pe = ps + pl
    if pe > end:
        raise ClusterFrameError("topic_len/payload_len run beyond the frame")
    if ftype == _MSG and flags & FLAG_TRAILER and pe + TRAILER_SIZE > end:
        raise ClusterFrameError("MSG flags a recovery trailer that is missing")
    decoder = _DECODERS[ftype]
    if decoder is None:
        return Unknown(ftype, flags, data[ts:ps], data[ps:pe])
    return decoder(data, flags, ts, ps, pe, ctx)


def decode_frame(
    body: bytes | bytearray | memoryview, *, context: ZstdContext | None = None
) -> Frame:
    """One frame from its body (the bytes after the length prefix); ClusterFrameError if bad."""
    data = body if type(body) is bytes else bytes(body)
    if len(data) > MAX_FRAME:
        raise ClusterFrameError(f"cluster frame longer than {MAX_FRAME} bytes")
    return _decode(data, 0, len(data), context or _ZSTD)


class FrameReader:
    """Splits a peer byte stream into frames (CLUSTER §2), however the bytes arrive.

    ``frames()`` returns every complete frame. On a malformed frame (``ClusterFrameError``,
    CLUSTER §6: the link must be dropped) the frames decoded before it are returned first
    and the error is raised by the next call, so drive it as ``while b := r.frames(): ...``.
    Once failed, the reader stays failed and ignores further data.

    Buffering is linear: chunks are joined only once the next frame is known to be
    complete, and only the unconsumed tail is kept.
    """

    __slots__ = ("_chunks", "_ctx", "_error", "_need", "_size")

    def __init__(self, *, context: ZstdContext | None = None) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self._need = 4  # bytes that must be buffered before parsing can progress
        self._error: ClusterFrameError | None = None
        self._ctx = context or ZstdContext()

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a returned frame."""
        return self._size

    @property
    def error(self) -> ClusterFrameError | None:
        """The error that stopped the reader, if any."""
        return self._error

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Queue bytes; nothing is parsed until :meth:`frames`."""
        if not data or self._error is not None:
            return
        self._chunks.append(data if type(data) is bytes else bytes(data))
        self._size += len(data)

    def frames(self) -> list[Frame]:
        """Every frame completed by the data received so far."""
        if self._error is not None:
            raise self._error
        if self._size < self._need:
            return []
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        n = len(data)
        out: list[Frame] = []
        append = out.append
        pos = 0
        need = 4
        ctx = self._ctx
        unpack_prefix = PREFIX.unpack_from
        unpack_header = HEADER.unpack_from
        try:
            while n - pos >= 4:
                (length,) = unpack_prefix(data, pos)
                if length == 0 or length > MAX_FRAME:
                    raise ClusterFrameError(f"cluster frame length {length} outside 1..{MAX_FRAME}")
                base = pos + 4
                end = base + length
                if end > n:
                    need = 4 + length
                    break
                if length >= HEADER_SIZE:
                    ftype, flags, tl, pl = unpack_header(data, base)
                    if ftype == _MSG and not flags & (FLAG_ZSTD | FLAG_TRAILER):
                        # Fast path for the common frame: a plain MSG.
                        ts = base + HEADER_SIZE
                        ps = ts + tl
                        pe = ps + pl
                        if pe > end:
                            raise ClusterFrameError("topic_len/payload_len run beyond the frame")
                        try:
                            topic = data[ts:ps].decode("utf-8")
                        except UnicodeDecodeError:
                            raise ClusterFrameError("MSG topic is not valid UTF-8") from None
                        append(_make_msg(topic, data[ps:pe], None, None))
                        pos = end
                        continue
                append(_decode(data, base, end, ctx))
                pos = end
        except ClusterFrameError as exc:
            self._error = exc
            self._chunks = []
            self._size = 0
            if out:
                return out
            raise
        rest = n - pos
        self._chunks = [data[pos:] if pos else data] if rest else []
        self._size = rest
        self._need = need
        return out

"""Cluster traffic recorded between two original nodes (tests/data/cluster.json).

Every recorded frame must decode to the fields the recorder noted, and our encoder must
give back the exact bytes. The recorder kept only the first 600 bytes of large frames in
``raw_hex``; those are rebuilt from the recorded header, topic, payload text and trailer and
checked against the kept prefix.
"""

from __future__ import annotations

import json
import pathlib
import struct
from typing import Any

import pytest

from wse_proto.cluster import frames as cf

DATA: dict[str, Any] = json.loads(
    (pathlib.Path(__file__).resolve().parent / "data" / "cluster.json").read_text("utf-8")
)
CONNECTIONS: dict[str, list[dict[str, Any]]] = DATA["frames"]
RECORDS = [(name, i, rec) for name, recs in CONNECTIONS.items() for i, rec in enumerate(recs)]

_CLASSES: dict[str, type] = {
    "MSG": cf.Msg,
    "PING": cf.Ping,
    "PONG": cf.Pong,
    "HELLO": cf.Hello,
    "SHUTDOWN": cf.Shutdown,
    "SUB": cf.Sub,
    "UNSUB": cf.Unsub,
    "RESYNC": cf.Resync,
    "PEER_ANNOUNCE": cf.PeerAnnounce,
    "PEER_LIST": cf.PeerList,
    "PRESENCE_UPDATE": cf.PresenceUpdate,
    "PRESENCE_FULL": cf.PresenceFull,
    "DRAIN": cf.Drain,
}


def full_bytes(rec: dict[str, Any]) -> bytes:
    """The complete frame, prefix included."""
    raw = bytes.fromhex(rec["raw_hex"])
    if len(raw) == 4 + rec["length_prefix"]:
        return raw
    # Truncated by the recorder: rebuild from the recorded parts.
    payload = rec["payload_text"].encode("utf-8")
    rebuilt = b"".join(
        (
            bytes.fromhex(rec["prefix_hex"]),
            bytes.fromhex(rec["header_hex"]),
            rec["topic"].encode("utf-8"),
            payload,
            bytes.fromhex(rec["trailer_hex"]),
        )
    )
    assert rebuilt.startswith(raw)
    assert len(rebuilt) == 4 + rec["length_prefix"]
    return rebuilt


def peer_list_addresses(payload: bytes) -> list[str]:
    """Independent reading of a PEER_LIST payload, straight from the layout."""
    (count,) = struct.unpack_from("<H", payload)
    pos, out = 2, []
    for _ in range(count):
        (n,) = struct.unpack_from("<H", payload, pos)
        out.append(payload[pos + 2 : pos + 2 + n].decode("utf-8"))
        pos += 2 + n
    return out


def check_fields(frame: cf.Frame, rec: dict[str, Any]) -> None:
    assert type(frame) is _CLASSES[rec["type"]]
    if isinstance(frame, cf.Msg):
        assert frame.topic == rec["topic"]
        assert frame.payload.decode("utf-8") == rec["payload_text"]
        assert len(frame.payload) == rec["payload_len"]
        assert rec["compressed_zstd"] == bool(rec["flags"] & cf.FLAG_ZSTD)
        if rec["has_recovery_trailer"]:
            epoch, offset = struct.unpack("<IQ", bytes.fromhex(rec["trailer_hex"]))
            assert (frame.epoch, frame.offset) == (epoch, offset)
        else:
            assert frame.epoch is None and frame.offset is None
    elif isinstance(frame, cf.Hello):
        assert rec["magic"] == "WSE\\0"
        assert frame.version == rec["protocol_version"]
        assert frame.instance_id == rec["instance_id"]
        assert frame.capabilities == rec["capabilities"]
        assert frame.instance_id == DATA["instance_ids"][rec["node"]]
    elif isinstance(frame, cf.Sub | cf.Unsub):
        assert frame.topic == rec["topic"]
    elif isinstance(frame, cf.PeerAnnounce):
        assert frame.address == rec["topic"]
    elif isinstance(frame, cf.Resync):
        assert list(frame.topics) == rec["topics"]
        assert frame.continuation is False
    elif isinstance(frame, cf.PeerList):
        assert list(frame.addresses) == peer_list_addresses(rec["payload_text"].encode("utf-8"))
    else:
        assert rec["topic_len"] == 0 and rec["payload_len"] == 0


@pytest.mark.parametrize("name,index,rec", RECORDS, ids=[f"{n}:{i}" for n, i, _ in RECORDS])
def test_record_decodes_and_reencodes(name: str, index: int, rec: dict[str, Any]) -> None:
    wire = full_bytes(rec)
    assert wire[:4].hex() == rec["prefix_hex"]
    assert wire[4:12].hex() == rec["header_hex"]
    ftype, flags, tl, pl = cf.HEADER.unpack_from(wire, 4)
    assert cf.FrameType(ftype).name == rec["type"]
    assert (flags, tl, pl) == (rec["flags"], rec["topic_len"], rec["payload_len"])

    frame = cf.decode_frame(wire[4:])
    check_fields(frame, rec)
    assert cf.encode(frame) == wire
    # Our peers negotiate zstd like the original did; with no recovery buffer the
    # original still sent these uncompressed, but compressing them must round-trip too.
    assert cf.decode_frame(cf.encode(frame, zstd=True)[4:]) == frame


@pytest.mark.parametrize("name", list(CONNECTIONS))
def test_connection_stream_any_split(name: str) -> None:
    records = CONNECTIONS[name]
    stream = b"".join(full_bytes(r) for r in records)
    expected = [cf.decode_frame(full_bytes(r)[4:]) for r in records]
    for step in (len(stream), 1, 7, 600):
        reader = cf.FrameReader()
        got: list[cf.Frame] = []
        for i in range(0, len(stream), step):
            reader.receive_data(stream[i : i + step])
            got.extend(reader.frames())
        assert got == expected
        assert reader.buffered == 0


@pytest.mark.parametrize("kind", list(DATA["first_of_each_type"]))
def test_annotated_first_frames(kind: str) -> None:
    """The recorder's byte-by-byte annotations agree with what we decode."""
    entry = DATA["first_of_each_type"][kind]
    wire = bytes.fromhex(entry["hex"])
    frame = cf.decode_frame(wire[4:])
    assert type(frame) is _CLASSES[kind]
    assert cf.encode(frame) == wire
    for offset, hexval, desc, value in entry["fields"]:
        chunk = bytes.fromhex(hexval)
        assert wire[offset : offset + len(chunk)] == chunk
        if desc.startswith("instance_id length"):
            assert isinstance(frame, cf.Hello) and len(frame.instance_id.encode()) == value
        elif desc.startswith("instance_id"):
            assert isinstance(frame, cf.Hello) and frame.instance_id == value
        elif desc.startswith("capabilities"):
            assert isinstance(frame, cf.Hello) and frame.capabilities == value
        elif desc.startswith("protocol version"):
            assert isinstance(frame, cf.Hello) and frame.version == value
        elif desc.startswith("payload (newline-separated"):
            assert isinstance(frame, cf.Resync) and "\n".join(frame.topics) == value
        elif desc == "address":
            assert isinstance(frame, cf.PeerList) and frame.addresses == (value,)
        elif desc.startswith("peer count"):
            assert isinstance(frame, cf.PeerList) and len(frame.addresses) == value
        elif desc.startswith("topic (UTF-8)"):
            assert isinstance(frame, cf.Sub | cf.Unsub | cf.PeerAnnounce | cf.Msg)
            text = frame.address if isinstance(frame, cf.PeerAnnounce) else frame.topic
            assert text == value
        elif desc == "payload":
            assert isinstance(frame, cf.Msg) and frame.payload.decode() == value
        elif desc == "type":
            assert cf.FrameType(wire[4]).name == value
        elif desc.startswith("frame length"):
            assert len(wire) - 4 == value


def test_capture_shows_the_documented_behaviour() -> None:
    """Facts CLUSTER.md §7/§8 rely on, as the two original nodes showed them."""
    ids = DATA["instance_ids"]
    msgs = [r for recs in CONNECTIONS.values() for r in recs if r["type"] == "MSG"]
    # Both advertised 0x0F, recovery was off: large MSGs went uncompressed, no trailer (§7).
    assert any(r["payload_len"] >= cf.ZSTD_THRESHOLD for r in msgs)
    assert all(r["flags"] == 0 for r in msgs)
    # No interest in 'nobody' on B, so no MSG for it crossed the link (§8.3).
    assert all(r["topic"] == "bench" for r in msgs)
    # B (higher id) dialing A: A closed each attempt after B's HELLO without answering (§8.2).
    assert ids["B"] > ids["A"]
    refused = [recs for name, recs in CONNECTIONS.items() if name.startswith("proxy to A")]
    assert refused and all([r["type"] for r in recs] == ["HELLO"] for recs in refused)
    # A (lower id) dialing B formed the link; setup order RESYNC, PEER_ANNOUNCE, PEER_LIST (§8.1).
    from_b = next(
        recs for name, recs in CONNECTIONS.items() if name.startswith("proxy to B #1 from")
    )
    assert [r["type"] for r in from_b[:4]] == ["HELLO", "RESYNC", "PEER_ANNOUNCE", "PEER_LIST"]

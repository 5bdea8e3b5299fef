"""Runs every case of spec/vectors/cluster_frames.json through wse_proto.cluster.frames.

The expected bytes were built with struct and the system libzstd (see the file's
description), not with wse_proto. Encode cases are also decoded back; decode cases are fed
whole and one byte at a time (the result must not depend on the split).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from _vectors import check_header, load

from wse_proto import errors
from wse_proto.cluster import frames as cf

DOC = load("cluster_frames")

_FIXED: dict[str, cf.Frame] = {
    "PING": cf.Ping(),
    "PONG": cf.Pong(),
    "SHUTDOWN": cf.Shutdown(),
    "DRAIN": cf.Drain(),
}


def _bytes(spec: dict[str, Any], name: str) -> bytes:
    """A binary field given as <name>_text, <name>_hex, <name>_repeat or <name>_repeat_hex."""
    if f"{name}_text" in spec:
        return str(spec[f"{name}_text"]).encode("utf-8")
    if f"{name}_hex" in spec:
        return bytes.fromhex(spec[f"{name}_hex"])
    if f"{name}_repeat" in spec:
        text, count = spec[f"{name}_repeat"]
        return str(text).encode("utf-8") * int(count)
    byte_hex, count = spec[f"{name}_repeat_hex"]
    return bytes.fromhex(byte_hex) * int(count)


def _topic(spec: dict[str, Any]) -> str:
    if "topic_repeat" in spec:
        text, count = spec["topic_repeat"]
        return str(text) * int(count)
    return str(spec["topic"])


def frame_from_json(spec: dict[str, Any]) -> cf.Frame:
    kind = spec["type"]
    if kind in _FIXED:
        return _FIXED[kind]
    if kind == "MSG":
        return cf.Msg(_topic(spec), _bytes(spec, "payload"), spec.get("epoch"), spec.get("offset"))
    if kind == "HELLO":
        return cf.Hello(spec["version"], spec["instance_id"], spec["capabilities"])
    if kind == "SUB":
        return cf.Sub(_topic(spec))
    if kind == "UNSUB":
        return cf.Unsub(_topic(spec))
    if kind == "RESYNC":
        return cf.Resync(tuple(spec["topics"]), spec["continuation"])
    if kind == "PEER_ANNOUNCE":
        return cf.PeerAnnounce(spec["address"])
    if kind == "PEER_LIST":
        return cf.PeerList(tuple(spec["addresses"]))
    if kind == "PRESENCE_UPDATE":
        return cf.PresenceUpdate(
            spec["topic"], spec["action"], spec["updated_at"], spec["user_id"], _bytes(spec, "data")
        )
    if kind == "PRESENCE_FULL":
        return cf.PresenceFull(_bytes(spec, "data"))
    assert kind == "UNKNOWN", kind
    return cf.Unknown(
        spec["type_byte"], spec["flags"], _bytes(spec, "topic"), _bytes(spec, "payload")
    )


def _stream(inp: dict[str, Any]) -> bytes:
    if "stream_hex" in inp:
        return bytes.fromhex(inp["stream_hex"])
    parts = []
    for part in inp["stream_parts"]:
        if isinstance(part, str):
            parts.append(bytes.fromhex(part))
        else:
            parts.append(bytes.fromhex(part[0]) * part[1])
    return b"".join(parts)


def _read(data: bytes, step: int) -> tuple[list[cf.Frame], str | None]:
    reader = cf.FrameReader()
    out: list[cf.Frame] = []
    try:
        for i in range(0, len(data), step):
            reader.receive_data(data[i : i + step])
            while batch := reader.frames():
                out.extend(batch)
    except errors.WSEError as exc:
        return out, type(exc).__name__
    return out, None


def op_encode(inp: dict[str, Any], exp: dict[str, Any]) -> None:
    frame = frame_from_json(inp["frame"])
    zstd = bool(inp.get("zstd", False))
    if "error" in exp:
        with pytest.raises(errors.WSEError) as info:
            cf.encode(frame, zstd=zstd)
        assert type(info.value).__name__ == exp["error"]
        return
    wire = cf.encode(frame, zstd=zstd)
    assert wire.hex() == exp["frame_hex"]
    # And back: the expected bytes decode to the frame we started from.
    assert cf.decode_frame(bytes.fromhex(exp["frame_hex"])[4:]) == frame


def op_decode(inp: dict[str, Any], exp: dict[str, Any]) -> None:
    data = _stream(inp)
    wanted = [frame_from_json(f) for f in exp["frames"]]
    error = exp.get("error")
    # Byte-at-a-time splitting only for small streams, to keep the file fast.
    steps = [len(data) or 1, 1] if len(data) <= 4096 else [len(data), 65536]
    for step in steps:
        got, err = _read(data, step)
        assert got == wanted, step
        assert err == error, step


def op_resync_frames(inp: dict[str, Any], exp: dict[str, Any]) -> None:
    if "topics_pattern" in inp:
        pattern, count = inp["topics_pattern"]
        topics = [pattern.format(i=i) for i in range(count)]
    else:
        topics = inp["topics"]
    kwargs = {"max_frame": inp["max_frame"]} if "max_frame" in inp else {}
    if "error" in exp:
        with pytest.raises(errors.LocalProtocolError):
            cf.resync_frames(topics, **kwargs)
        return
    result = cf.resync_frames(topics, **kwargs)
    wires = [cf.encode(f) for f in result]
    if "frames_hex" in exp:
        assert [w.hex() for w in wires] == exp["frames_hex"]
    else:
        assert len(wires) == exp["frame_count"]
        assert [len(w) - 4 for w in wires] == exp["frame_lengths"]
        assert [f.continuation for f in result] == exp["continuation"]
    # Nothing lost or reordered across the chunks.
    assert [t for f in result for t in f.topics] == list(topics)


def op_presence_full_frames(inp: dict[str, Any], exp: dict[str, Any]) -> None:
    entries = {
        topic: {user: (pair[0], pair[1]) for user, pair in users.items()}
        for topic, users in inp["entries"].items()
    }
    kwargs = {"max_json": inp["max_json"]} if "max_json" in inp else {}
    if "error" in exp:
        with pytest.raises(errors.LocalProtocolError):
            cf.presence_full_frames(entries, **kwargs)
        return
    chunks = cf.presence_full_frames(entries, **kwargs)
    assert [c.data.decode("utf-8") for c in chunks] == exp["chunks_text"]
    assert [cf.encode(c).hex() for c in chunks] == exp["frames_hex"]


def op_parse_presence_full(inp: dict[str, Any], exp: dict[str, Any]) -> None:
    parsed = cf.parse_presence_full(inp["data_text"].encode("utf-8"))
    if exp["entries"] is None:
        assert parsed is None
        return
    assert parsed is not None
    as_json = {t: {u: [d, ts] for u, (d, ts) in users.items()} for t, users in parsed.items()}
    assert as_json == exp["entries"]


OPS: dict[str, Callable[[dict[str, Any], dict[str, Any]], None]] = {
    "encode": op_encode,
    "decode": op_decode,
    "resync_frames": op_resync_frames,
    "presence_full_frames": op_presence_full_frames,
    "parse_presence_full": op_parse_presence_full,
}


def test_vector_file_header() -> None:
    check_header(DOC, "cluster_frames", OPS)


def test_every_frame_type_has_an_encode_vector() -> None:
    encoded = {
        c["input"]["frame"]["type"]
        for c in DOC["cases"]
        if c["op"] == "encode" and "error" not in c["expected"]
    }
    assert {t.name for t in cf.FrameType} <= encoded


@pytest.mark.parametrize("case", DOC["cases"], ids=[c["id"] for c in DOC["cases"]])
def test_vector(case: dict[str, Any]) -> None:
    OPS[case["op"]](case["input"], case["expected"])

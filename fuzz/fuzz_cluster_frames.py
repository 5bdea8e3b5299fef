"""Fuzz the cluster frame reader (spec/CLUSTER.md §2-§6).

Byte 0 picks the read size used to split the rest (1-256). Beyond "only WSEError escapes",
the harness checks that splitting the input changes nothing, that the only decode error is
``ClusterFrameError``, that every decoded frame re-encodes and decodes to itself, and that
PRESENCE_FULL payloads never make ``parse_presence_full`` raise.
"""

from __future__ import annotations

import json
import pathlib

from wse_proto.cluster import frames as cf
from wse_proto.errors import ClusterFrameError, LocalProtocolError, WSEError


def _run(data: bytes, step: int) -> tuple[list[cf.Frame], bool]:
    reader = cf.FrameReader()
    out: list[cf.Frame] = []
    try:
        for i in range(0, len(data), step):
            reader.receive_data(data[i : i + step])
            while batch := reader.frames():
                out.extend(batch)
    except WSEError as exc:
        assert type(exc) is ClusterFrameError, exc
        return out, True
    return out, False


def target(data: bytes) -> None:
    if not data:
        return
    step, body = data[0] + 1, data[1:]
    split = _run(body, step)
    whole = _run(body, max(len(body), 1))
    assert split == whole, (split, whole)
    for frame in whole[0]:
        if isinstance(frame, cf.PresenceFull):
            cf.parse_presence_full(frame.data)
        for zstd in (False, True):
            try:
                wire = cf.encode(frame, zstd=zstd)
            except LocalProtocolError:
                # Only a decompressed MSG can be too big to send again as it came.
                assert isinstance(frame, cf.Msg) and len(frame.payload) > cf.MAX_FRAME - 8 - 12
                continue
            assert cf.decode_frame(wire[4:]) == frame


def _seeds() -> list[bytes]:
    seeds = [
        cf.encode(cf.Hello(1, "01a20492-c71a-73d3-97ab-a5d91ed28f29", 15))
        + cf.encode(cf.Resync(("room", "chat.*")))
        + cf.encode(cf.PeerList(("127.0.0.1:18311",))),
        cf.encode(cf.Msg("room", b'{"c":"U","t":"x","p":"' + b"a" * 400 + b'"}', 7, 2), zstd=True),
        cf.encode(cf.PresenceUpdate("room", 0, 1795373060424, "alice", b'{"s":1}'))
        + cf.encode(cf.PresenceFull(b'{"room":{"alice":{"data":{"s":1},"updated_at":5}}}')),
        cf.encode(cf.Sub("news"))
        + cf.encode(cf.Unknown(0x0E, 1, b"t", b"p"))
        + cf.encode(cf.Drain()),
    ]
    out = [bytes([i * 37 % 256]) + s for i, s in enumerate(seeds)]
    captures = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" / "cluster.json"
    if captures.exists():
        doc = json.loads(captures.read_text("utf-8"))
        for entry in doc["first_of_each_type"].values():
            out.append(b"\x03" + bytes.fromhex(entry["hex"]))
    return out


SEEDS: list[bytes] = _seeds()

"""Cluster frame codec: ours vs a bare struct.pack/unpack of the header.

Workload: MSG frames of small JSON publications (40-400 B, what a cluster mostly carries)
plus a few control frames. ``baseline`` is the floor in plain Python: for encoding, two
precompiled ``struct.pack`` calls and a join; for decoding, a loop of ``unpack_from`` over
prefix and header that slices topic and payload with no validation or frame objects.
Times are the best of several timeit runs, per frame.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable

from bench._timing import best, json_payloads
from wse_proto.cluster import frames as cf

FRAMES = 1000
REPEAT = 5
PREFIX = struct.Struct(">I")
HEADER = struct.Struct("<BBHI")


def _payloads(rng: random.Random) -> list[bytes]:
    return json_payloads(rng, FRAMES, b'{"c":"U","t":"price","p":{"i":%d,"pad":"')


def _best(fn: Callable[[], object], number: int) -> float:
    """Seconds per call, best of REPEAT runs."""
    return best(fn, number, REPEAT)


def main() -> None:
    rng = random.Random(0)
    payloads = _payloads(rng)
    topics = [rng.choice(("prices", "chat.room.1", "orders")) for _ in payloads]
    pairs = [(t.encode(), p) for t, p in zip(topics, payloads)]
    msgs = [cf.Msg(t, p) for t, p in zip(topics, payloads)]

    def encode_baseline() -> list[bytes]:
        return [
            b"".join((PREFIX.pack(8 + len(t) + len(p)), HEADER.pack(1, 0, len(t), len(p)), t, p))
            for t, p in pairs
        ]

    def encode_msg() -> list[bytes]:
        return [cf.encode_msg(t, p) for t, p in zip(topics, payloads)]

    def encode_generic() -> list[bytes]:
        return [cf.encode(m) for m in msgs]

    def encode_trailer() -> list[bytes]:
        return [
            cf.encode_msg(t, p, epoch=7, offset=i) for i, (t, p) in enumerate(zip(topics, payloads))
        ]

    stream = b"".join(encode_baseline())
    chunks = [stream[i : i + 65536] for i in range(0, len(stream), 65536)]

    def decode_baseline() -> list[tuple[bytes, bytes]]:
        out = []
        pos = 0
        n = len(stream)
        while pos < n:
            (length,) = PREFIX.unpack_from(stream, pos)
            _, _, tl, pl = HEADER.unpack_from(stream, pos + 4)
            start = pos + 12
            out.append((stream[start : start + tl], stream[start + tl : start + tl + pl]))
            pos += 4 + length
        return out

    def decode_ours() -> list[cf.Frame]:
        reader = cf.FrameReader()
        out: list[cf.Frame] = []
        for chunk in chunks:
            reader.receive_data(chunk)
            out.extend(reader.frames())
        return out

    assert encode_msg() == encode_generic() == encode_baseline()
    assert decode_ours() == msgs
    assert [(t, p) for t, p in decode_baseline()] == pairs

    big = [p * 8 for p in payloads[:200]]  # 320 B - 3 KiB: zstd territory
    zstd_stream = b"".join(cf.encode_msg("z", p, zstd=True) for p in big)

    def encode_zstd() -> list[bytes]:
        return [cf.encode_msg("z", p, zstd=True) for p in big]

    def decode_zstd() -> list[cf.Frame]:
        reader = cf.FrameReader()
        reader.receive_data(zstd_stream)
        return reader.frames()

    n = FRAMES
    rows = [
        ("encode", "baseline (2x struct.pack + join)", _best(encode_baseline, 50) / n),
        ("encode", "cf.encode_msg", _best(encode_msg, 50) / n),
        ("encode", "cf.encode(Msg)", _best(encode_generic, 50) / n),
        ("encode", "cf.encode_msg + trailer", _best(encode_trailer, 50) / n),
        ("decode", "baseline (unpack_from + slices)", _best(decode_baseline, 50) / n),
        ("decode", "cf.FrameReader", _best(decode_ours, 50) / n),
    ]
    base = {"encode": rows[0][2], "decode": rows[4][2]}
    print(f"{FRAMES} MSG frames (40-400 B JSON), best of {REPEAT}")
    print(f"{'op':7} {'implementation':34} {'ns/frame':>9} {'x baseline':>11}")
    for op, name, t in rows:
        print(f"{op:7} {name:34} {t * 1e9:9.0f} {t / base[op]:11.2f}")
    ze = _best(encode_zstd, 5) / len(big)
    zd = _best(decode_zstd, 5) / len(big)
    print(
        f"zstd MSG (320 B - 3 KiB): encode {ze * 1e9:.0f} ns/frame, decode {zd * 1e9:.0f} ns/frame"
    )


if __name__ == "__main__":
    main()

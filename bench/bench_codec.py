"""Envelope/frame codec: ours vs the bare serializer doing the same work.

Workload: a typical send_event envelope with a ~100-byte payload. ``baseline`` is the bare
library call on the same dict or bytes (orjson.dumps/loads for JSON, msgpack.packb/unpackb
for msgpack, orjson.dumps + zlib.compress(level 1) for C:). Our calls add what the protocol
needs on top (sorted keys, prefixes, normalisation, caps, the Inbound result). Times are
the best of several timeit runs, per call; the target is a ratio <= 3 for the JSON rows.
"""

from __future__ import annotations

import timeit
import zlib
from collections.abc import Callable

import msgpack
import orjson

from wse_proto import codec, envelope

REPEAT = 7
NUMBER = 20_000


def _best(fn: Callable[[], object], number: int = NUMBER) -> float:
    """Microseconds per call, best of REPEAT runs."""
    return min(timeit.repeat(fn, number=number, repeat=REPEAT)) / number * 1e6


def _pair(
    base: Callable[[], object], ours: Callable[[], object], number: int = NUMBER
) -> tuple[float, float]:
    """Best-of-REPEAT microseconds for both, runs interleaved so load spikes hit both."""
    best_base = best_ours = float("inf")
    for _ in range(REPEAT):
        best_base = min(best_base, timeit.timeit(base, number=number))
        best_ours = min(best_ours, timeit.timeit(ours, number=number))
    return best_base / number * 1e6, best_ours / number * 1e6


def main() -> None:
    event = {
        "t": "price_update",
        "p": {
            "symbol": "ES",
            "price": 5234.75,
            "size": 3,
            "venue": "CME",
            "note": "x" * 40,
            "tags": ["fut", "index"],
        },
    }
    env = envelope.build_event(event, wall_ms=1_795_373_022_884, rand=bytes, seq=42)
    body = envelope.dumps_server(env)
    text = body.decode()
    packed = msgpack.packb(env)
    big = envelope.build_event(
        {"t": "blob", "p": {"s": "abcdefghij" * 150}}, wall_ms=1, rand=bytes, seq=1
    )
    big_zframe, _ = codec.encode_event(big, msgpack=False, compression_threshold=1024)
    payload_size = len(orjson.dumps(env["p"]))

    rows: list[tuple[str, tuple[float, float]]] = [
        (
            "encode_event JSON",
            _pair(
                lambda: orjson.dumps(env),
                lambda: codec.encode_event(env, msgpack=False, compression_threshold=1024),
            ),
        ),
        (
            "decode_server_message JSON",
            _pair(
                lambda: orjson.loads(body),
                lambda: codec.decode_server_message(body),
            ),
        ),
        (
            "decode_client_text",
            _pair(
                lambda: orjson.loads(text),
                lambda: codec.decode_client_text(text),
            ),
        ),
        (
            "encode_event M: (msgpack)",
            _pair(
                lambda: msgpack.packb(env),
                lambda: codec.encode_event(env, msgpack=True, compression_threshold=1024),
            ),
        ),
        (
            "decode_server_message M:",
            _pair(
                lambda: msgpack.unpackb(packed),
                lambda: codec.decode_server_message(b"M:" + packed),
            ),
        ),
        (
            "decode_client_binary msgpack",
            _pair(
                lambda: msgpack.unpackb(packed),
                lambda: codec.decode_client_binary(packed, msgpack=True),
            ),
        ),
        (
            "encode_event C: (1.5 kB)",
            _pair(
                lambda: zlib.compress(orjson.dumps(big), 1),
                lambda: codec.encode_event(big, msgpack=False, compression_threshold=1024),
                2_000,
            ),
        ),
        (
            "decode_server_message C:",
            _pair(
                lambda: orjson.loads(zlib.decompress(big_zframe[2:])),
                lambda: codec.decode_server_message(big_zframe),
                2_000,
            ),
        ),
    ]
    print(
        f"envelope {len(body)} B, payload {payload_size} B; microseconds per call, best of {REPEAT}"
    )
    print(f"{'operation':32} {'baseline':>9} {'ours':>9} {'ratio':>6}")
    for name, (base, ours) in rows:
        print(f"{name:32} {base:9.2f} {ours:9.2f} {ours / base:6.2f}")
    print("absolute (no baseline):")
    for name, fn in (
        (
            "build_event",
            lambda: envelope.build_event(event, wall_ms=1_795_373_022_884, rand=bytes, seq=42),
        ),
        ("inject_category", lambda: envelope.inject_category('{"t":"price_update","p":{"px":1}}')),
        ("server_ping", lambda: envelope.server_ping(1_795_373_022_884)),
    ):
        print(f"{name:32} {'':9} {_best(fn):9.2f}")


if __name__ == "__main__":
    main()

"""WebSocket frame codec: ours vs wsproto, and vs the cheapest possible bytes work.

Workload: WSE traffic is small JSON envelopes, so we decode a batch of small
masked client frames (what a server reads) and encode small unmasked server
frames (what a broadcast writes). Times are the best of several timeit runs,
per frame. ``baseline`` is the floor in plain Python: for encoding, one
``header + payload`` concatenation with a pre-built header; for decoding,
slicing each payload at known offsets and unmasking it (``apply_mask``), no parsing.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from wsproto.frame_protocol import Frame, FrameProtocol

from bench._timing import best, json_payloads
from wse_proto.ws import TEXT, FrameDecoder, apply_mask, encode_frame, text_frame

FRAMES = 1000
REPEAT = 5


def _payloads(rng: random.Random) -> list[bytes]:
    return json_payloads(rng, FRAMES, b'{"t":"price","p":{"sym":"ES","i":%d,"pad":"')


def _best(fn: Callable[[], object], number: int) -> float:
    """Seconds per call, best of REPEAT runs."""
    return best(fn, number, REPEAT)


def main() -> None:
    rng = random.Random(0)
    payloads = _payloads(rng)
    masks = [rng.randbytes(4) for _ in payloads]
    stream = b"".join(encode_frame(TEXT, p, mask_key=m) for p, m in zip(payloads, masks))
    chunks = [stream[i : i + 4096] for i in range(0, len(stream), 4096)]

    # Offsets for the baseline: where each masked payload starts and ends.
    spans = []
    pos = 0
    for p in payloads:
        hdr = 2 + (2 if len(p) >= 126 else 0)
        spans.append((pos + hdr, pos + hdr + 4, pos + hdr + 4 + len(p)))
        pos += hdr + 4 + len(p)

    def decode_ours() -> list[tuple[int, bytes]]:
        dec = FrameDecoder(client_side=False)
        out: list[tuple[int, bytes]] = []
        for chunk in chunks:
            dec.receive_data(chunk)
            out.extend(dec.messages())
        assert len(out) == FRAMES
        return out

    def decode_wsproto() -> list[Frame]:
        proto = FrameProtocol(client=False, extensions=[])
        out: list[Frame] = []
        for chunk in chunks:
            proto.receive_bytes(chunk)
            out.extend(f for f in proto.received_frames() if f.message_finished)
        assert len(out) == FRAMES  # frames split across reads come out in parts
        return out

    def decode_baseline() -> list[bytes]:
        buf = stream
        return [apply_mask(buf[p0:end], buf[m0:p0]) for m0, p0, end in spans]

    headers = [bytes((0x81, len(p))) if len(p) < 126 else None for p in payloads]
    small = [(h, p) for h, p in zip(headers, payloads) if h is not None]

    def encode_ours() -> list[bytes]:
        return [text_frame(p) for _, p in small]

    def encode_generic() -> list[bytes]:
        return [encode_frame(TEXT, p) for _, p in small]

    server = FrameProtocol(client=False, extensions=[])

    def encode_wsproto() -> list[bytearray]:
        return [server.send_data(p.decode()) for _, p in small]

    def encode_baseline() -> list[bytes]:
        return [h + p for h, p in small]

    assert encode_ours() == encode_baseline() == [bytes(f) for f in encode_wsproto()]
    assert [p for _, p in decode_ours()] == decode_baseline()

    n_dec = FRAMES
    n_enc = len(small)
    rows = [
        ("decode", "baseline (slice+xor)", _best(decode_baseline, 20) / n_dec),
        ("decode", "wse_proto FrameDecoder", _best(decode_ours, 20) / n_dec),
        ("decode", "wsproto FrameProtocol", _best(decode_wsproto, 5) / n_dec),
        ("encode", "baseline (hdr + payload)", _best(encode_baseline, 50) / n_enc),
        ("encode", "wse_proto text_frame", _best(encode_ours, 50) / n_enc),
        ("encode", "wse_proto encode_frame", _best(encode_generic, 50) / n_enc),
        ("encode", "wsproto send_data", _best(encode_wsproto, 10) / n_enc),
    ]
    base = {"decode": rows[0][2], "encode": rows[3][2]}
    ours = {"decode": rows[1][2], "encode": rows[4][2]}
    print(f"{FRAMES} small frames (40-400 B), best of {REPEAT}")
    print(f"{'op':7} {'implementation':26} {'ns/frame':>9} {'x baseline':>11} {'x ours':>8}")
    for op, name, t in rows:
        print(f"{op:7} {name:26} {t * 1e9:9.0f} {t / base[op]:11.2f} {t / ours[op]:8.2f}")
    print(
        f"wsproto/ours: decode {rows[2][2] / ours['decode']:.1f}x, "
        f"encode {rows[6][2] / ours['encode']:.1f}x"
    )


if __name__ == "__main__":
    main()

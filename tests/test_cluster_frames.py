"""Cluster frame codec (spec/CLUSTER.md §2-§6): unit tests and hypothesis properties."""

from __future__ import annotations

import struct
from typing import Any

import orjson
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wse_proto import errors
from wse_proto.cluster import frames as cf

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------- strategies

text = st.text(st.characters(codec="utf-8"), max_size=40)
topic = text
line_topic = st.text(st.characters(codec="utf-8", exclude_characters="\n"), min_size=1, max_size=30)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
compressible = st.builds(
    lambda word, n: (word * n).encode("utf-8"), st.text(min_size=1, max_size=5), st.integers(0, 400)
)
payload = st.one_of(st.binary(max_size=600), compressible)


@st.composite
def msgs(draw: st.DrawFn) -> cf.Msg:
    trailer = draw(st.booleans())
    return cf.Msg(
        draw(topic),
        draw(payload),
        draw(u32) if trailer else None,
        draw(u64) if trailer else None,
    )


frames_st: st.SearchStrategy[cf.Frame] = st.one_of(
    msgs(),
    st.just(cf.Ping()),
    st.just(cf.Pong()),
    st.builds(
        cf.Hello,
        st.integers(0, 0xFFFF),
        st.text(st.characters(codec="utf-8"), max_size=64),
        u32,
    ),
    st.just(cf.Shutdown()),
    st.builds(cf.Sub, topic),
    st.builds(cf.Unsub, topic),
    st.builds(cf.Resync, st.lists(line_topic, max_size=8).map(tuple), st.booleans()),
    st.builds(cf.PeerAnnounce, text),
    st.builds(cf.PeerList, st.lists(text, max_size=8).map(tuple)),
    st.builds(cf.PresenceUpdate, topic, st.integers(0, 255), u64, text, st.binary(max_size=80)),
    st.builds(cf.PresenceFull, st.binary(max_size=200)),
    st.just(cf.Drain()),
    st.builds(
        cf.Unknown,
        st.sampled_from([0, *range(0x0E, 0x100)]),
        st.integers(0, 255),
        st.binary(max_size=20),
        st.binary(max_size=40),
    ),
)


def read_all(data: bytes, step: int) -> tuple[list[cf.Frame], BaseException | None]:
    reader = cf.FrameReader()
    out: list[cf.Frame] = []
    try:
        for i in range(0, len(data), max(step, 1)):
            reader.receive_data(data[i : i + step])
            while batch := reader.frames():
                out.extend(batch)
    except errors.WSEError as exc:
        return out, exc
    return out, None


# ---------------------------------------------------------------------- properties


@SETTINGS
@given(frames_st, st.booleans())
def test_round_trip_every_type(frame: cf.Frame, zstd: bool) -> None:
    wire = cf.encode(frame, zstd=zstd)
    (length,) = struct.unpack_from(">I", wire)
    assert length == len(wire) - 4
    assert cf.decode_frame(wire[4:]) == frame
    got, err = read_all(wire, len(wire))
    assert (got, err) == ([frame], None)


@SETTINGS
@given(st.lists(frames_st, max_size=12), st.lists(st.integers(1, 200), min_size=1, max_size=30))
def test_any_split_gives_the_same_frames(frames: list[cf.Frame], cuts: list[int]) -> None:
    stream = b"".join(cf.encode(f, zstd=True) for f in frames)
    reader = cf.FrameReader()
    got: list[cf.Frame] = []
    pos = 0
    i = 0
    while pos < len(stream):
        size = cuts[i % len(cuts)]
        reader.receive_data(stream[pos : pos + size])
        got.extend(reader.frames())
        pos += size
        i += 1
    assert got == frames
    assert reader.buffered == 0


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600), st.integers(1, 64))
def test_arbitrary_bytes_raise_only_cluster_frame_error(data: bytes, step: int) -> None:
    whole = read_all(data, len(data) or 1)
    split = read_all(data, step)
    for _, err in (whole, split):
        assert err is None or type(err) is errors.ClusterFrameError
    assert whole[0] == split[0]
    assert type(whole[1]) is type(split[1])


@settings(max_examples=300, deadline=None)
@given(st.lists(frames_st, min_size=1, max_size=6), st.data())
def test_corrupted_streams_raise_only_cluster_frame_error(
    frames: list[cf.Frame], data: st.DataObject
) -> None:
    """Valid streams with a few bytes changed reach deeper than random bytes."""
    stream = bytearray(b"".join(cf.encode(f, zstd=True) for f in frames))
    for _ in range(data.draw(st.integers(1, 3))):
        stream[data.draw(st.integers(0, len(stream) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(stream)))
    corrupted = bytes(stream[:cut] if data.draw(st.booleans()) else stream)
    whole = read_all(corrupted, len(corrupted) or 1)
    split = read_all(corrupted, data.draw(st.integers(1, 50)))
    for _, err in (whole, split):
        assert err is None or type(err) is errors.ClusterFrameError
    assert whole[0] == split[0]
    assert type(whole[1]) is type(split[1])


@SETTINGS
@given(payload, st.booleans())
def test_zstd_only_when_it_helps(body: bytes, trailer: bool) -> None:
    frame = cf.Msg("t", body, 7 if trailer else None, 9 if trailer else None)
    wire = cf.encode(frame, zstd=True)
    _, flags, tl, pl = cf.HEADER.unpack_from(wire, 4)
    sent = wire[12 + tl : 12 + tl + pl]
    plain = zstandard.ZstdCompressor(
        level=1, write_content_size=True, write_checksum=False
    ).compress(body)
    helps = len(body) >= cf.ZSTD_THRESHOLD and len(plain) < len(body)
    assert bool(flags & cf.FLAG_ZSTD) == helps
    assert bool(flags & cf.FLAG_TRAILER) == trailer
    if helps:
        assert sent == plain
        params = zstandard.get_frame_parameters(sent)
        assert params.content_size == len(body) and not params.has_checksum
    else:
        assert sent == body
    # Without zstd negotiated nothing is ever compressed.
    assert cf.HEADER.unpack_from(cf.encode(frame), 4)[1] & cf.FLAG_ZSTD == 0


@SETTINGS
@given(st.lists(line_topic, max_size=60), st.integers(8 + 4 * 30, 600))
def test_resync_chunks_fit_and_keep_order(topics: list[str], max_frame: int) -> None:
    chunks = cf.resync_frames(topics, max_frame=max_frame)
    assert [t for c in chunks for t in c.topics] == topics
    assert [c.continuation for c in chunks] == [False] + [True] * (len(chunks) - 1)
    for i, chunk in enumerate(chunks):
        wire = cf.encode(chunk)
        assert len(wire) - 4 <= max_frame
        assert cf.decode_frame(wire[4:]) == chunk
        if i + 1 < len(chunks):  # greedy: the next topic did not fit
            nxt = len(chunks[i + 1].topics[0].encode())
            assert len(wire) - 4 + 1 + nxt > max_frame


json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=6,
)


@SETTINGS
@given(
    st.dictionaries(
        text,
        st.dictionaries(text, st.tuples(json_value, u64), min_size=1, max_size=6),
        max_size=6,
    ),
    st.integers(300, 2000),
)
def test_presence_full_chunks_round_trip(
    entries: dict[str, dict[str, tuple[Any, int]]], max_json: int
) -> None:
    try:
        chunks = cf.presence_full_frames(entries, max_json=max_json)
    except errors.LocalProtocolError:
        # Only when one entry alone cannot fit.
        assert any(
            len(orjson.dumps({t: {u: {"data": d, "updated_at": ts}}})) > max_json
            for t, users in entries.items()
            for u, (d, ts) in users.items()
        )
        return
    merged: dict[str, dict[str, tuple[Any, int]]] = {}
    for chunk in chunks:
        assert len(chunk.data) <= max_json
        assert orjson.loads(chunk.data) is not None
        parsed = cf.parse_presence_full(chunk.data)
        assert parsed is not None
        for t, users in parsed.items():
            for u, entry in users.items():
                assert u not in merged.get(t, {})  # each user sent once
                merged.setdefault(t, {})[u] = entry
    expected = {t: dict(users) for t, users in entries.items() if users}
    assert merged == expected


# ---------------------------------------------------------------------- reader behaviour


def test_bad_length_prefix_fails_before_the_body() -> None:
    reader = cf.FrameReader()
    reader.receive_data(b"\x00\x10\x00")
    assert reader.frames() == []
    reader.receive_data(b"\x01")  # 1,048,577: no body needed to refuse it
    with pytest.raises(errors.ClusterFrameError):
        reader.frames()


def test_error_is_sticky_and_good_frames_come_first() -> None:
    reader = cf.FrameReader()
    reader.receive_data(cf.encode(cf.Ping()) + b"\x00\x00\x00\x00" + cf.encode(cf.Pong()))
    assert reader.frames() == [cf.Ping()]
    with pytest.raises(errors.ClusterFrameError) as first:
        reader.frames()
    assert reader.error is first.value
    reader.receive_data(cf.encode(cf.Pong()))
    with pytest.raises(errors.ClusterFrameError):
        reader.frames()


def test_cluster_frame_error_is_a_decode_error() -> None:
    with pytest.raises(errors.DecodeError):
        cf.decode_frame(b"\x01\x00")


def test_partial_frame_is_buffered() -> None:
    wire = cf.encode(cf.Msg("room", b'{"x":1}'))
    reader = cf.FrameReader()
    reader.receive_data(wire[:-1])
    assert reader.frames() == []
    assert reader.buffered == len(wire) - 1
    reader.receive_data(memoryview(wire)[-1:])
    assert reader.frames() == [cf.Msg("room", b'{"x":1}')]
    assert reader.buffered == 0


def test_largest_frame_in_small_reads() -> None:
    """A 1 MiB frame trickling in 64-byte reads: linear work, one frame at the end."""
    body = b"z" * (cf.MAX_FRAME - 8 - 1)
    wire = cf.encode(cf.Msg("t", body))
    assert len(wire) == 4 + cf.MAX_FRAME
    reader = cf.FrameReader()
    out: list[cf.Frame] = []
    for i in range(0, len(wire), 64):
        reader.receive_data(wire[i : i + 64])
        out.extend(reader.frames())
    assert out == [cf.Msg("t", body)]


def test_decode_frame_refuses_oversized_body() -> None:
    with pytest.raises(errors.ClusterFrameError):
        cf.decode_frame(b"\x02" + b"\x00" * cf.MAX_FRAME)


def test_zstd_declared_size_checked_before_allocating() -> None:
    # A tiny zstd frame claiming 4 GiB of content: refused from its header alone.
    header = bytes.fromhex("28b52ffd") + bytes([0x80]) + struct.pack("<I", 2**32 - 1)
    body = header + bytes.fromhex("010000")  # one empty raw last block
    wire = struct.pack(">I", 8 + 1 + len(body)) + struct.pack("<BBHI", 1, 1, 1, len(body))
    with pytest.raises(errors.ClusterFrameError):
        cf.decode_frame((wire + b"t" + body)[4:])


def test_decoded_empty_frames_are_shared() -> None:
    a = cf.decode_frame(cf.encode(cf.Ping())[4:])
    b = cf.decode_frame(cf.encode(cf.Ping())[4:])
    assert a is b and a == cf.Ping()


# ---------------------------------------------------------------------- encoder


@pytest.mark.parametrize(
    "frame",
    [
        cf.Msg("t", b"x", epoch=1),
        cf.Msg("t", b"x", offset=1),
        cf.Msg("t", b"x", -1, 0),
        cf.Msg("t", b"x", 0, 2**64),
        cf.Msg("\ud800", b"x"),
        cf.Hello(1, "x" * 257, 15),
        cf.Hello(2**16, "x", 15),
        cf.Hello(1, "x", 2**32),
        cf.Sub("t" * 65536),
        cf.Resync(("ok", "")),
        cf.Resync(("a\nb",)),
        cf.PeerList(tuple(f"a{i}" for i in range(257))),
        cf.PeerList(("a" * 65536,)),
        cf.PresenceUpdate("t", 256, 0, "u", b""),
        cf.PresenceUpdate("t", 0, 2**64, "u", b""),
        cf.PresenceUpdate("t", 0, 0, "u" * 65536, b""),
        cf.PresenceFull(b"x" * cf.MAX_FRAME),
        cf.Unknown(256, 0, b"", b""),
    ],
    ids=repr,
)
def test_encoder_refuses_what_peers_would_reject(frame: cf.Frame) -> None:
    with pytest.raises(errors.LocalProtocolError):
        cf.encode(frame)


def test_encode_rejects_non_frames() -> None:
    with pytest.raises(errors.LocalProtocolError):
        cf.encode("PING")  # type: ignore[arg-type]


def test_encode_msg_matches_encode() -> None:
    body = b'{"c":"U","t":"x","p":"' + b"a" * 500 + b'"}'
    assert cf.encode_msg("x", body, epoch=3, offset=4, zstd=True) == cf.encode(
        cf.Msg("x", body, 3, 4), zstd=True
    )


def test_separate_zstd_contexts_agree() -> None:
    body = b"abc" * 200
    ctx = cf.ZstdContext()
    wire = cf.encode(cf.Msg("t", body), zstd=True, context=ctx)
    assert wire == cf.encode(cf.Msg("t", body), zstd=True)
    assert cf.decode_frame(wire[4:], context=cf.ZstdContext()) == cf.Msg("t", body)


def test_resync_refuses_oversized_topic() -> None:
    with pytest.raises(errors.LocalProtocolError):
        cf.resync_frames(["x" * 100], max_frame=50)


def test_presence_full_accepts_pre_encoded_json_and_checks_timestamps() -> None:
    chunks = cf.presence_full_frames({"r": {"u": (b'{"a":1}', 5)}})
    assert chunks == [cf.PresenceFull(b'{"r":{"u":{"data":{"a":1},"updated_at":5}}}')]
    with pytest.raises(errors.LocalProtocolError):
        cf.presence_full_frames({"r": {"u": ({}, -1)}})
    with pytest.raises(errors.LocalProtocolError):
        cf.presence_full_frames({"r": {"u": (object(), 1)}})


def test_constants_match_the_spec() -> None:
    assert [t.value for t in cf.FrameType] == list(range(1, 14))
    assert cf.OUR_CAPABILITIES == 0x0F
    assert (cf.CAP_INTEREST, cf.CAP_ZSTD, cf.CAP_PRESENCE, cf.CAP_RECOVERY) == (1, 2, 4, 8)
    assert cf.MAX_FRAME == cf.MAX_DECOMPRESSED == 1_048_576
    assert cf.PRESENCE_CHUNK_MAX == 1_048_576 - 1024
    assert (cf.ZSTD_THRESHOLD, cf.ZSTD_LEVEL) == (256, 1)
    assert cf.HELLO_MAGIC == b"WSE\x00"


def test_presence_full_refuses_unencodable_keys() -> None:
    with pytest.raises(errors.LocalProtocolError):
        cf.presence_full_frames({"\ud800": {"u": (1, 1)}})
    with pytest.raises(errors.LocalProtocolError):
        cf.presence_full_frames({"t": {"\udfff": (1, 1)}})

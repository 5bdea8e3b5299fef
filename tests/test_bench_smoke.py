"""Smoke test of the server benchmark harness: it must count exactly, against both servers.

The frame counter is checked against frames built here and split at arbitrary points; the
client frames against wsproto (an independent decoder); then a few hundred real messages
go through the real processes (server subprocess + load generator workers) for the
websockets baseline and the wse-py asyncio server. Counts are asserted, never speed.
"""

from __future__ import annotations

import base64
import os
import struct
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.frame_protocol import FrameProtocol, Opcode

from bench import bench_server as bs
from bench.loadgen import Child, ChildError, FrameCounter, client_frame, mask, upgrade_request


def server_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """An unmasked server frame, built independently of the code under test."""
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        return bytes((first, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", first, 126, n) + payload
    return struct.pack("!BBQ", first, 127, n) + payload


# A message is (opcode, payload, fragment sizes); controls interleave between messages.
_payloads = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"x" * 100, b"y" * 125, b"z" * 126, b"w" * 300, b"v" * 70000]),
)
_items = st.lists(
    st.one_of(
        st.tuples(st.just("msg"), st.sampled_from([1, 2]), _payloads, st.integers(1, 3)),
        st.tuples(st.just("ctl"), st.sampled_from([9, 10]), st.binary(max_size=20), st.just(1)),
        st.tuples(st.just("run"), st.sampled_from([1, 2]), _payloads, st.integers(2, 60)),
    ),
    max_size=25,
)


def _encode(items: list[tuple[str, int, bytes, int]]) -> tuple[bytes, list[bytes]]:
    """Wire bytes and the expected message payloads, in order."""
    wire = []
    expected = []
    for kind, opcode, payload, n in items:
        if kind == "ctl":
            wire.append(server_frame(opcode, payload))
        elif kind == "run":  # identical frames in a row: the counter's fast path
            wire.append(server_frame(opcode, payload) * n)
            expected.extend([payload] * n)
        else:
            cuts = sorted({len(payload) * i // n for i in range(1, n)})
            parts = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)])]
            for i, part in enumerate(parts):
                op = opcode if i == 0 else 0
                wire.append(server_frame(op, part, fin=i == len(parts) - 1))
            expected.append(payload)
    return b"".join(wire), expected


@settings(max_examples=150, deadline=None)
@given(_items, st.lists(st.integers(1, 5000), max_size=30), st.booleans())
def test_frame_counter_counts_every_message_however_split(items, cuts, keep):
    wire, expected = _encode(items)
    wire += server_frame(8, struct.pack("!H", 1000)) + server_frame(1, b"after close")
    counter = FrameCounter(keep=keep)
    pos = 0
    total = 0
    for size in [*cuts, len(wire)]:
        total += counter.feed(wire[pos : pos + size])
        pos += size
    assert total == counter.frames == len(expected)
    assert counter.closed and counter.close_code == 1000
    assert counter.kept == (expected if keep else [])


def test_frame_counter_rejects_masked_server_frames():
    with pytest.raises(ValueError):
        FrameCounter().feed(client_frame(1, b"hello"))


_client_messages = st.one_of(
    st.tuples(st.just(1), st.text(max_size=3000).map(str.encode)),
    st.tuples(st.just(2), st.one_of(st.binary(max_size=300), st.just(bytes(range(256)) * 300))),
)


@settings(max_examples=100, deadline=None)
@given(_client_messages, st.binary(min_size=4, max_size=4))
def test_client_frames_decode_with_wsproto(message, key):
    opcode, payload = message
    assert mask(mask(payload, key), key) == payload
    proto = FrameProtocol(client=False, extensions=[])
    proto.receive_bytes(client_frame(opcode, payload, key))
    frames = list(proto.received_frames())
    data = b"".join(
        f.payload if isinstance(f.payload, bytes) else f.payload.encode() for f in frames
    )
    assert frames[0].opcode == Opcode(opcode)
    assert frames[-1].message_finished
    assert data == payload


def test_upgrade_request_carries_key_and_headers():
    request, accept = upgrade_request(1234, "/echo", [["Authorization", "Bearer t"]])
    head = request.decode()
    assert head.startswith("GET /echo HTTP/1.1\r\n") and head.endswith("\r\n\r\n")
    assert "Authorization: Bearer t\r\n" in head and "Sec-WebSocket-Version: 13" in head
    key = next(ln.split(": ")[1] for ln in head.split("\r\n") if ln.startswith("Sec-WebSocket-Key"))
    assert len(base64.b64decode(key)) == 16 and len(base64.b64decode(accept)) == 20


def test_table_ratios_and_targets():
    res = bs.Results()
    for kind, fan, ping in (("websockets", 100.0, 0.0002), ("asyncio", 2000.0, 0.0001)):
        res.put("fanout100", kind, fan)
        res.put("ping_p50", kind, ping)
        res.put("loss1", kind, 0)
    res.put("fanout100", "uvloop", 1000.0)
    res.put("loss1", "uvloop", 3)
    figs = [
        bs.Figure("fanout100", "fan-out", "deliveries/s", True, 15.0),
        bs.Figure("ping_p50", "ping", "ms", False, 0.9, 1000.0, "{:.3f}"),
        bs.Figure("loss1", "loss", "msgs", False, None),
    ]
    lines: list[str] = []
    bs.print_table(figs, res, lines.append)
    rows = {ln.split("|")[0].strip(): [c.strip() for c in ln.split("|")] for ln in lines[2:]}
    assert rows["fan-out (deliveries/s)"][4:] == ["20.00x", "10.00x", ">= 15x", "yes", "NO"]
    assert rows["ping (ms)"][1:4] == ["0.200", "0.100", "n/a"]
    assert rows["ping (ms)"][4:] == ["0.50x", "n/a", "<= 0.9x", "yes", "-"]
    assert rows["loss (msgs)"][6:] == ["yes", "NO"]


@pytest.fixture(scope="module")
def servers():
    """The websockets baseline and the wse-py asyncio server, as the benchmark runs them."""
    secret = base64.b64encode(os.urandom(33))
    token = bs.make_token(secret)
    started = {}
    try:
        for kind in ("websockets", "asyncio"):
            started[kind] = bs.start_server(kind, secret, token)
        yield started
    finally:
        for server in started.values():
            server.child.stop(5.0, command={"cmd": "stop"})
        assert not any(server.child.alive() for server in started.values())


@pytest.mark.loopback
@pytest.mark.parametrize("kind", ["websockets", "asyncio"])
def test_harness_counts_fanout_and_inbound_exactly(servers, kind):
    server = servers[kind]
    # Fan-out: 10 subscribers x 30 publications = 300 deliveries, every one counted.
    workers = bs._workers(server, "fanout", 10, concurrency=10)
    try:
        server.child.send(cmd="wait_subs", n=10, timeout=20.0)
        assert server.child.expect("subs", 30.0)["n"] == 10
        for count in (30, 7):
            run = bs.fanout_run(server, workers, 10, count)
            assert run["delivered"] == run["expected"] == 10 * count
            assert run["excess"] == 0 and run["lost"] == 0
    finally:
        bs._stop_workers(server, workers)

    # Inbound: 2 connections x 150 messages, all handled by the application, none lost.
    workers = bs._workers(server, "inbound", 2, payload=bs.INBOUND_PAYLOAD)
    try:
        server.child.send(cmd="wait_subs", n=2, timeout=20.0)
        server.child.expect("subs", 30.0)
        run = bs.inbound_run(server, workers, 2, 150)
        assert run["sent"] == run["handled"] == run["expected"] == 300
        assert run["lost"] == 0
    finally:
        bs._stop_workers(server, workers)
    server.child.send(cmd="count")
    assert server.child.expect("count", 10.0) == {"event": "count", "n": 300, "dropped": 0}


@pytest.mark.loopback
def test_latency_jobs_alternate_and_sample_every_server(servers):
    both = [servers["websockets"], servers["asyncio"]]
    ping = bs._sampled(both, {"mode": "ping", "path": None, "count": 25, "warmup": 5})
    connect = bs._sampled(both, {"mode": "connect", "path": "/", "count": 12, "warmup": 3})
    assert [len(s) for s in ping] == [25, 25]
    assert [len(s) for s in connect] == [12, 12]
    assert all(x > 0 for s in ping + connect for x in s)


def test_failed_server_start_is_reported():
    """A server process that dies before ``ready`` surfaces as ChildError, not a hang."""
    child = Child([sys.executable, "-c", "import sys; sys.exit('boom')"], name="dies")
    with pytest.raises(ChildError, match="boom"):
        child.expect("ready", 20.0)
    child.stop(1.0)

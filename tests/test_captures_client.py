"""Ground truth: every text/binary frame captured from wse-server 2.5.1 against a socket
client (tests/data/client-protocol.json) decodes with our codec, and the deterministic
server frames are rebuilt byte for byte from the captured inputs.

The capture's E: frames cannot be decrypted here (the client's private key is not in the
file); their plaintexts are given as "(decrypted)" records, so for them we check the frame
layout and run the E: path with a decrypt callable that returns the captured plaintext.
"""

from __future__ import annotations

import base64
import datetime
import json
import pathlib
import re
import zlib
from typing import Any

import pytest

from wse_proto import codec, envelope
from wse_proto.errors import DecodeError

DATA = pathlib.Path(__file__).resolve().parent / "data" / "client-protocol.json"
RECORDS: list[dict[str, Any]] = json.loads(DATA.read_text(encoding="utf-8"))["records"]
MESSAGES = [(i, r) for i, r in enumerate(RECORDS) if r["opcode_name"] in ("text", "binary")]


def payload(record: dict[str, Any]) -> bytes:
    if record["encoding"] == "base64":
        return base64.b64decode(record["data"])
    placeholder = re.fullmatch(r"<(\d+) bytes of '(.)'>", record["data"])
    if placeholder:  # the oversized frame is stored as a description
        return placeholder.group(2).encode() * int(placeholder.group(1))
    data: bytes = record["data"].encode("utf-8")
    return data


def wall_ms(ts: str) -> int:
    d = datetime.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ")
    return (d - datetime.datetime(1970, 1, 1)) // datetime.timedelta(milliseconds=1)


def rand_for(uuid_text: str) -> Any:
    """The rand() bytes from which our uuid7 rebuilds a captured id (its random bits)."""
    v = int(uuid_text.replace("-", ""), 16)
    chunk = ((v >> 64) & 0xFFF).to_bytes(2, "big") + (v & ((1 << 62) - 1)).to_bytes(8, "big")

    def rand(n: int) -> bytes:
        assert n == 10
        return chunk

    return rand


def is_derived(record: dict[str, Any]) -> bool:
    """Records that are not wire frames but the plaintext/decoded body of the previous one."""
    return record["description"].startswith(("(decrypted)", "(decoded)"))


def test_capture_has_the_expected_shape() -> None:
    kinds = {(r["direction"], r["opcode_name"]) for _, r in MESSAGES}
    assert kinds == {
        ("client->server", "text"),
        ("client->server", "binary"),
        ("server->client", "text"),
        ("server->client", "binary"),
    }
    assert len(MESSAGES) == 56


# ----------------------------------------------------------------- decoding


CLIENT_RAW = {24, 26, 54}  # non-JSON, truncated JSON, 1 MiB of 'x'


@pytest.mark.parametrize(
    ("index", "record"),
    [(i, r) for i, r in MESSAGES if r["direction"] == "client->server"],
    ids=lambda v: str(v) if isinstance(v, int) else "",
)
def test_client_frames_decode(index: int, record: dict[str, Any]) -> None:
    data = payload(record)
    if record["opcode_name"] == "binary":
        # JSON connection: binary frames are delivered as bytes (K8), E: ones included.
        assert codec.decode_client_binary(data, msgpack=False) == codec.Inbound("bin", data)
        if data[:2] == b"E:":
            assert len(data) >= 2 + 12 + 16, "prefix, IV and tag"
        return
    text = data.decode("utf-8")
    inbound = codec.decode_client_text(text)
    if index in CLIENT_RAW:
        assert inbound == codec.Inbound("raw", text)
        return
    body = json.loads(envelope.strip_legacy_prefix(text)[1])
    assert inbound == codec.Inbound("msg", envelope.normalize_keys(body), body.get("t"))


def test_client_interception_types() -> None:
    types = {
        i: codec.decode_client_text(payload(r).decode()).raw_type
        for i, r in MESSAGES
        if r["direction"] == "client->server" and r["opcode_name"] == "text"
    }
    assert {i for i, t in types.items() if t == "client_hello"} == {3, 32, 57}
    assert {i for i, t in types.items() if t == "ping"} == {5, 7, 59}
    assert types[9] == "PING", "upper-case PING is not the fast path"


@pytest.mark.parametrize(
    ("index", "record"),
    [(i, r) for i, r in MESSAGES if r["direction"] == "server->client" and not is_derived(r)],
    ids=lambda v: str(v) if isinstance(v, int) else "",
)
def test_server_frames_decode(index: int, record: dict[str, Any]) -> None:
    data = payload(record)
    header = bytes.fromhex(record["frame_header_hex"])
    assert header[0] == (0x81 if record["opcode_name"] == "text" else 0x82)
    frame: str | bytes = data.decode("utf-8") if record["opcode_name"] == "text" else data
    if index == 18:  # broadcast of a non-JSON string: no event (wse-client drops it too)
        with pytest.raises(DecodeError):
            codec.decode_server_message(frame)
        return
    following = RECORDS[index + 1] if index + 1 < len(RECORDS) else None
    decrypt = None
    if data[:2] == b"E:":
        assert following is not None and following["description"].startswith("(decrypted)")
        plaintext = payload(following)
        assert len(data) == 2 + 12 + len(plaintext) + 16
        assert data[2:14].hex() == following["iv_hex"]
        assert data[-16:].hex() == following["tag_hex"]

        def decrypt(frame: bytes) -> bytes:
            assert frame == data
            return plaintext

    events = codec.decode_server_message(frame, decrypt=decrypt)
    if following is not None and is_derived(following):
        expected = json.loads(payload(following))
    else:
        expected = json.loads(data)
    assert events == [expected]


@pytest.mark.parametrize(
    ("index", "record"),
    [(i, r) for i, r in MESSAGES if is_derived(r)],
    ids=lambda v: str(v) if isinstance(v, int) else "",
)
def test_derived_bodies_decode(index: int, record: dict[str, Any]) -> None:
    # Decrypted/decoded bodies are themselves valid binary JSON frames.
    body = payload(record)
    assert codec.decode_server_message(body) == [json.loads(body)]


# ------------------------------------------------------- byte-for-byte rebuilds


def server_text(index: int) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(RECORDS[index]["data"])
    return obj


def indices_of(t: str) -> list[int]:
    return [
        i
        for i, r in MESSAGES
        if r["direction"] == "server->client"
        and r["opcode_name"] == "text"
        and r["data"].startswith("{")
        and server_text(i).get("t") == t
    ]


def test_server_ready_rebuilt() -> None:
    found = indices_of("server_ready")
    assert found == [2, 51, 53, 56, 72, 77]
    for i in found:
        d = server_text(i)
        details = d["p"]["details"]
        kwargs: dict[str, Any] = dict(
            conn_id=details["connection_id"],
            user_id=details["user_id"],
            recovery=details["features"]["recovery"],
            wall_ms=wall_ms(d["ts"]),
        )
        assert envelope.server_ready(**kwargs, rand=rand_for(d["id"])) == payload(RECORDS[i])

        def no_rand(n: int) -> bytes:
            raise AssertionError("msg_id given: no rand")

        assert envelope.server_ready(**kwargs, rand=no_rand, msg_id=d["id"]) == payload(RECORDS[i])


def test_server_hello_rebuilt() -> None:
    found = indices_of("server_hello")
    assert found == [4, 34, 58]
    for i in found:
        p = server_text(i)["p"]
        rebuilt = envelope.server_hello(
            conn_id=p["connection_id"],
            encryption_public_key=p.get("encryption_public_key"),
            cluster=False,
            recovery=False,
            protocol_version=1,
            max_message_size=1_048_576,
            rate_limit_capacity=100_000.0,
            rate_limit_refill=10_000.0,
            ping_interval_s=25,
            wall_ms=wall_ms(p["server_time"]),
        )
        assert rebuilt == payload(RECORDS[i])


def test_pongs_rebuilt_from_the_preceding_ping() -> None:
    found = indices_of("PONG")
    assert found == [6, 8, 60]
    for i in found:
        ping_index = max(
            j
            for j, r in MESSAGES
            if j < i
            and r["direction"] == "client->server"
            and r["opcode_name"] == "text"
            and codec.decode_client_text(r["data"]).raw_type == "ping"
        )
        ping = codec.decode_client_text(RECORDS[ping_index]["data"])
        server_ms = server_text(i)["p"]["server_timestamp"]
        rebuilt = envelope.pong(envelope.ping_client_timestamp(ping.value), server_ms)
        assert rebuilt == payload(RECORDS[i])


def test_server_pings_rebuilt() -> None:
    found = indices_of("ping")
    assert found == [78, 79, 80]
    for i in found:
        ts = server_text(i)["p"]["server_time"]
        assert envelope.server_ping(wall_ms(ts)) == payload(RECORDS[i])


def test_errors_rebuilt() -> None:
    found = indices_of("error")
    assert found == [33, 39, 42, 45, 48]
    for i in found:
        p = server_text(i)["p"]
        if p["code"] == "KEY_EXCHANGE_FAILED":
            detail = p["message"].removeprefix("ECDH key exchange failed: ")
            rebuilt = envelope.key_exchange_failed(detail)
        else:
            rebuilt = envelope.auth_error(p["code"], p["message"], wall_ms(p["timestamp"]))
        assert rebuilt == payload(RECORDS[i])


# Broadcast inputs: the app published the text without "c" (the description says the
# server injected it), or already with "c" / not JSON (sent unchanged).
BROADCASTS = {15: True, 16: True, 17: False, 18: False, 62: True, 76: True}


@pytest.mark.parametrize(("index", "injected"), BROADCASTS.items())
def test_broadcast_category_injection(index: int, injected: bool) -> None:
    out = payload(RECORDS[index]).decode()
    published = re.sub(r'^\{"c":"(?:U|S|WSE)",', "{", out) if injected else out
    assert (published != out) is injected
    assert envelope.inject_category(published) == out


# send_event reply -> the echo request it answered (None: the request was encrypted).
REPLIES = {20: 19, 23: 21, 65: 63, 68: None, 71: 69, 75: 73}


@pytest.mark.parametrize(("reply_index", "request_index"), REPLIES.items())
def test_send_event_replies_rebuilt(reply_index: int, request_index: int | None) -> None:
    captured = json.loads(payload(RECORDS[reply_index]))
    p = captured["p"] if request_index is None else json.loads(RECORDS[request_index]["data"])["p"]
    env = envelope.build_event(
        {"t": "echo", "p": p},
        wall_ms=wall_ms(captured["ts"]),
        rand=rand_for(captured["id"]),
        seq=captured["seq"],
    )
    assert env == captured
    if reply_index == 20:  # plain JSON connection, under the threshold
        assert codec.encode_event(env, msgpack=False, compression_threshold=1024) == (
            payload(RECORDS[20]),
            True,
        )
    elif reply_index == 23:  # over the threshold: C: + zlib, compare the inflated bytes
        frame, binary = codec.encode_event(env, msgpack=False, compression_threshold=1024)
        original = payload(RECORDS[22])
        assert binary and frame[:4] == original[:4] == b"C:\x78\x01"
        assert zlib.decompress(frame[2:]) == zlib.decompress(original[2:]) == payload(RECORDS[23])
    elif reply_index == 75:  # msgpack connection
        assert codec.encode_event(env, msgpack=True, compression_threshold=1024) == (
            payload(RECORDS[74]),
            True,
        )
    else:  # encrypted connection: the plaintext is JSON, never compressed (record 71 > 1 KiB)
        plaintext, _ = codec.encode_event(env, msgpack=False, compression_threshold=0)
        assert plaintext == payload(RECORDS[reply_index])

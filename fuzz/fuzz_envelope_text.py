"""Text decoders on arbitrary input: client text frames (server side), broadcast category
injection, legacy prefixes and client-side decoding of text frames.

``decode_client_text`` and ``inject_category`` must never raise at all; the client-side
decoder may raise only WSEError. Invariants are asserted, so a wrong result is a failure.
"""

from __future__ import annotations

import json
import pathlib
import re

from wse_proto import codec, envelope
from wse_proto.errors import WSEError

_CAPTURE = (
    pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" / "client-protocol.json"
)
_INSERTED = re.compile(r'"c":"(?:WSE|S|U)",')


def _seeds() -> list[bytes]:
    seeds = [
        b'{"t":"ping","p":{"timestamp":1}}',
        b'WSE{"t":"client_hello","p":{"protocol_version":1}}',
        b'S{"t":"sync_request"}',
        b'U{"type":"x","payload":{"a":[1,2.5,null]}}',
        b'{"t": "user_snapshot", "p": {}}',
        b'{ "c" :1,"t":"x"}',
        b'{"t":"snap\\u005fsnapshot","t":"x"}',
        b'{"c":"WSE","t":"batch","p":{"messages":[{"t":"a"},{"t":"batch"}],"count":2}}',
        b"PONG:123",
        b"",
    ]
    records = json.loads(_CAPTURE.read_text(encoding="utf-8"))["records"]
    for record in records:
        if (
            record["opcode_name"] == "text"
            and record["encoding"] == "text"
            and len(record["data"]) < 2000
        ):
            seeds.append(record["data"].encode("utf-8"))
    return seeds


SEEDS: list[bytes] = _seeds()


def target(data: bytes) -> None:
    text = data.decode("utf-8", "surrogateescape")  # lone surrogates are possible in str

    try:
        inbound = codec.decode_client_text(text)
    except Exception as exc:  # must never raise, not even WSEError
        raise AssertionError("decode_client_text raised") from exc
    if inbound.kind == "raw":
        assert inbound.value == text and inbound.raw_type is None
    else:
        assert inbound.kind == "msg" and type(inbound.value) is dict
        assert inbound.raw_type is None or isinstance(inbound.raw_type, str)

    try:
        out = envelope.inject_category(text)
    except Exception as exc:
        raise AssertionError("inject_category raised") from exc
    if out != text:
        brace = text.index("{")
        assert out[: brace + 1] == text[: brace + 1] and out[brace + 1 :].endswith(
            text[brace + 1 :]
        )
        assert _INSERTED.fullmatch(out[brace + 1 : brace + 1 + len(out) - len(text)])
    assert envelope.inject_category(out) == out, "not idempotent"

    prefix, body = envelope.strip_legacy_prefix(text)
    assert (prefix or "") + body == text
    assert prefix is None or body.startswith("{")

    try:
        events = codec.decode_server_message(text)
    except WSEError:
        return
    for event in events:
        assert type(event) is dict and "t" in event and type(event["p"]) is dict

"""Runs every case of spec/vectors/frames.json through wse_proto.codec.

Inputs were built with zlib, msgpack and cryptography; the expected values are literal or
taken from the captures. E: frames are decrypted with real AES-256-GCM.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import pytest
from _vectors import case_ids, check_case, check_header, load
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from wse_proto import codec

DOC = load("frames")


def from_tagged(value: Any) -> Any:
    """The one tag frames.json uses: {"$float": "nan"}."""
    if isinstance(value, list):
        return [from_tagged(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"$float"}:
            return float(value["$float"])
        return {k: from_tagged(v) for k, v in value.items()}
    return value


def inbound_dict(inbound: codec.Inbound) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": inbound.kind, "raw_type": inbound.raw_type}
    if inbound.kind == "msg":
        out["value"] = inbound.value
    elif inbound.kind == "raw":
        assert isinstance(inbound.value, str)
        out["value_text"] = inbound.value
    else:
        assert isinstance(inbound.value, bytes)
        out["value_hex"] = inbound.value.hex()
    return out


def op_decode_client_text(inp: dict[str, Any]) -> dict[str, Any]:
    return inbound_dict(codec.decode_client_text(inp["text"]))


def op_decode_client_binary(inp: dict[str, Any]) -> dict[str, Any]:
    data = bytes.fromhex(inp["data_hex"])
    return inbound_dict(codec.decode_client_binary(data, msgpack=inp["msgpack"]))


def op_encode_event(inp: dict[str, Any]) -> dict[str, Any]:
    payload, binary = codec.encode_event(
        from_tagged(inp["envelope"]),
        msgpack=inp["msgpack"],
        compression_threshold=inp["compression_threshold"],
    )
    if payload.startswith(b"C:"):
        return {
            "prefix": "C:",
            "zlib_header_hex": payload[2:4].hex(),
            "decompressed_text": zlib.decompress(payload[2:]).decode("utf-8"),
            "binary": binary,
        }
    if inp["msgpack"]:
        return {"payload_hex": payload.hex(), "binary": binary}
    return {"payload_text": payload.decode("utf-8"), "binary": binary}


def op_decode_server_message(inp: dict[str, Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if "max_size" in inp:
        kwargs["max_size"] = inp["max_size"]
    if inp.get("key_hex"):
        aead = AESGCM(bytes.fromhex(inp["key_hex"]))

        def decrypt(frame: bytes) -> bytes:
            assert frame[:2] == b"E:"
            return aead.decrypt(frame[2:14], frame[14:], None)

        kwargs["decrypt"] = decrypt
    data: str | bytes = inp["text"] if "text" in inp else bytes.fromhex(inp["data_hex"])
    return {"events": codec.decode_server_message(data, **kwargs)}


def op_zlib_decompress(inp: dict[str, Any]) -> dict[str, Any]:
    return {
        "data_hex": codec.zlib_decompress(bytes.fromhex(inp["data_hex"]), inp["max_size"]).hex()
    }


def op_msgpack_loads(inp: dict[str, Any]) -> dict[str, Any]:
    kwargs = {k: inp[k] for k in ("max_depth", "allow_trailing") if k in inp}
    return {"value": codec.msgpack_loads(bytes.fromhex(inp["data_hex"]), **kwargs)}


OPS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    name[3:]: fn for name, fn in globals().items() if name.startswith("op_")
}


def test_header() -> None:
    check_header(DOC, "frames", OPS)


@pytest.mark.parametrize("case", DOC["cases"], ids=case_ids(DOC))
def test_vector(case: dict[str, Any]) -> None:
    run = OPS[case["op"]]
    check_case(lambda: run(case["input"]), case["expected"])

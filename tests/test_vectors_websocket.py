"""Runs every case of spec/vectors/websocket.json through wse_proto.ws.

Ops: accept_key, server_handshake, encode_frame, text_frame, encode_close,
parse_close, decode_frames. Payloads may be given as ``payload_hex`` repeated
``repeat`` times; long frames may be checked by ``header_hex`` and ``length``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from _vectors import case_ids, check_case, check_header, load

from wse_proto import errors, ws

DOC = load("websocket")


def _payload(inp: dict[str, Any]) -> bytes:
    return bytes.fromhex(inp["payload_hex"]) * int(inp.get("repeat", 1))


def _mask(inp: dict[str, Any]) -> bytes | None:
    return bytes.fromhex(inp["mask_key_hex"]) if "mask_key_hex" in inp else None


def _frame_result(frame: bytes, expected: dict[str, Any]) -> dict[str, Any]:
    if "frame_hex" in expected:
        return {"frame_hex": frame.hex()}
    header = bytes.fromhex(expected["header_hex"])
    return {"header_hex": frame[: len(header)].hex(), "length": len(frame)}


def op_accept_key(inp: dict[str, Any], _exp: dict[str, Any]) -> dict[str, Any]:
    return {"accept_text": ws.accept_key(inp["key_text"])}


def op_server_handshake(inp: dict[str, Any], _exp: dict[str, Any]) -> dict[str, Any]:
    hs = ws.ServerHandshake()
    hs.receive_data(inp["request_text"].encode("latin-1"))
    if hs.state is not ws.ACCEPTED:
        assert hs.state is ws.REJECTED and hs.rejection is not None
        assert hs.rejection.startswith(f"HTTP/1.1 {hs.status} ".encode())
        return {"status": hs.status}
    req = hs.request
    assert req is not None
    return {
        "status": 101,
        "response_text": hs.accept().decode("latin-1"),
        "path": req.path,
        "query": req.query,
        "wants_msgpack": req.wants_msgpack,
        "trailing_hex": hs.trailing_data.hex(),
    }


def op_encode_frame(inp: dict[str, Any], exp: dict[str, Any]) -> dict[str, Any]:
    frame = ws.encode_frame(
        inp["opcode"], _payload(inp), mask_key=_mask(inp), fin=inp.get("fin", True)
    )
    return _frame_result(frame, exp)


def op_text_frame(inp: dict[str, Any], exp: dict[str, Any]) -> dict[str, Any]:
    return _frame_result(ws.text_frame(_payload(inp)), exp)


def op_encode_close(inp: dict[str, Any], exp: dict[str, Any]) -> dict[str, Any]:
    frame = ws.encode_close(inp["code"], inp["reason_text"], mask_key=_mask(inp))
    return _frame_result(frame, exp)


def op_parse_close(inp: dict[str, Any], _exp: dict[str, Any]) -> dict[str, Any]:
    code, reason = ws.parse_close(bytes.fromhex(inp["payload_hex"]))
    return {"code": code, "reason_text": reason}


def op_decode_frames(inp: dict[str, Any], _exp: dict[str, Any]) -> dict[str, Any]:
    data = bytes.fromhex(inp["data_hex"])
    kwargs = {"max_message_size": inp["max_message_size"]} if "max_message_size" in inp else {}
    results = []
    # Whole, and byte by byte: the verdict must not depend on how bytes arrive.
    for step in (len(data) or 1, 1):
        dec = ws.FrameDecoder(client_side=inp["client_side"], **kwargs)
        messages: list[tuple[int, bytes]] = []
        error: errors.WSEError | None = None
        try:
            for i in range(0, len(data), step):
                dec.receive_data(data[i : i + step])
                while batch := dec.messages():
                    messages.extend(batch)
        except errors.WSEError as exc:
            error = exc
        results.append((messages, type(error), error and error.close_code))
    assert results[0] == results[1]
    if error is not None:
        raise error
    return {"messages": [{"opcode": op, "payload_hex": p.hex()} for op, p in messages]}


OPS: dict[str, Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]] = {
    "accept_key": op_accept_key,
    "server_handshake": op_server_handshake,
    "encode_frame": op_encode_frame,
    "text_frame": op_text_frame,
    "encode_close": op_encode_close,
    "parse_close": op_parse_close,
    "decode_frames": op_decode_frames,
}


def test_vector_file_header() -> None:
    check_header(DOC, "websocket", OPS)


@pytest.mark.parametrize("case", DOC["cases"], ids=case_ids(DOC))
def test_vector(case: dict[str, Any]) -> None:
    run = OPS[case["op"]]
    expected = case["expected"]
    error = check_case(lambda: run(case["input"], expected), expected)
    if error is not None and "close_code" in expected:
        assert error.close_code == expected["close_code"]

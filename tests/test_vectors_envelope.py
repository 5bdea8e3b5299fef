"""Runs every case of spec/vectors/envelope.json through wse_proto.envelope.

The expected values were written from the reference notes and the captures (or computed
with stdlib primitives), never with wse_proto; here each one is recomputed and compared.
"""

from __future__ import annotations

import datetime
import decimal
import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from _vectors import case_ids, check_case, check_header, load

from wse_proto import envelope

DOC = load("envelope")


def from_tagged(value: Any) -> Any:
    """Python objects from the vector file's tagged JSON (see the file's description)."""
    if isinstance(value, list):
        return [from_tagged(v) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((tag, arg),) = value.items()
        if tag == "$bytes_hex":
            return bytes.fromhex(arg)
        if tag == "$float":
            return float(arg)
        if tag == "$tuple":
            return tuple(from_tagged(arg))
        if tag == "$dict_items":
            return {from_tagged(k): from_tagged(v) for k, v in arg}
        if tag == "$datetime":
            return datetime.datetime.fromisoformat(arg)
        if tag == "$date":
            return datetime.date.fromisoformat(arg)
        if tag == "$uuid":
            return uuid.UUID(arg)
        if tag == "$decimal":
            return decimal.Decimal(arg)
        if tag == "$set":
            return set(from_tagged(arg))
    return {k: from_tagged(v) for k, v in value.items()}


class ScriptedRand:
    """rand() returning one fixed chunk; ``None`` means rand must not be called."""

    def __init__(self, chunk_hex: str | None) -> None:
        self.chunk = None if chunk_hex is None else bytes.fromhex(chunk_hex)
        self.calls = 0

    def __call__(self, n: int) -> bytes:
        if self.chunk is None:
            raise AssertionError("rand must not be called")
        assert n == len(self.chunk)
        self.calls += 1
        return self.chunk


def op_message_category(inp: dict[str, Any]) -> dict[str, Any]:
    return {"c": envelope.message_category(inp["t"])}


def op_normalize_keys(inp: dict[str, Any]) -> dict[str, Any]:
    original = json.dumps(inp["obj"])
    out = envelope.normalize_keys(inp["obj"])
    assert json.dumps(inp["obj"]) == original, "the argument must not be modified"
    return {"obj": out}


def op_strip_legacy_prefix(inp: dict[str, Any]) -> dict[str, Any]:
    prefix, body = envelope.strip_legacy_prefix(inp["text"])
    return {"prefix": prefix, "json_text": body}


def op_inject_category(inp: dict[str, Any]) -> dict[str, Any]:
    out = envelope.inject_category(inp["text"])
    assert envelope.inject_category(out) == out, "injection must be idempotent"
    return {"text": out}


def op_format_ts(inp: dict[str, Any]) -> dict[str, Any]:
    return {"ts": envelope.format_ts(inp["wall_ms"])}


def op_uuid7(inp: dict[str, Any]) -> dict[str, Any]:
    value = envelope.uuid7(inp["wall_ms"], ScriptedRand(inp["rand_hex"]))
    parsed = uuid.UUID(value)
    assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
    return {"uuid": value}


def op_dumps_server(inp: dict[str, Any]) -> dict[str, Any]:
    return {"text": envelope.dumps_server(from_tagged(inp["value"])).decode("utf-8")}


def op_to_json_value(inp: dict[str, Any]) -> dict[str, Any]:
    return {"value": envelope.to_json_value(from_tagged(inp["value"]))}


def op_build_event(inp: dict[str, Any]) -> dict[str, Any]:
    rand = ScriptedRand(inp["rand_hex"])
    env = envelope.build_event(
        from_tagged(inp["event"]), wall_ms=inp["wall_ms"], rand=rand, seq=inp["seq"]
    )
    return {"envelope": env, "text": envelope.dumps_server(env).decode("utf-8")}


def op_frame(inp: dict[str, Any]) -> dict[str, Any]:
    args = dict(inp["args"])
    if "rand_hex" in args:
        args["rand"] = ScriptedRand(args.pop("rand_hex"))
    builder: Callable[..., bytes] = getattr(envelope, inp["builder"])
    out = builder(**args)
    assert isinstance(out, bytes)
    return {"text": out.decode("utf-8")}


def op_ping_client_timestamp(inp: dict[str, Any]) -> dict[str, Any]:
    return {"timestamp": envelope.ping_client_timestamp(inp["msg"])}


OPS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    name[3:]: fn for name, fn in globals().items() if name.startswith("op_")
}


def test_header() -> None:
    check_header(DOC, "envelope", OPS)


@pytest.mark.parametrize("case", DOC["cases"], ids=case_ids(DOC))
def test_vector(case: dict[str, Any]) -> None:
    run = OPS[case["op"]]
    check_case(lambda: run(case["input"]), case["expected"])

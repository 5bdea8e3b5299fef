"""The kit's own machinery: runner outcomes, selection, reports, and its helpers."""

from __future__ import annotations

import asyncio
import io
import json
import xml.etree.ElementTree as ET
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wse_proto.envelope import inject_category
from wse_proto.errors import WSEError
from wse_proto.ws import FrameDecoder, encode_frame
from wse_server.conformance import CLIENT_SCENARIOS, SERVER_SCENARIOS, vectors
from wse_server.conformance.checks import is_sorted_compact, json_equal, strip_stamp
from wse_server.conformance.core import (
    Outcome,
    Scenario,
    ScenarioContext,
    Skip,
    Unsupported,
    exit_code,
    run_suite,
    select,
)
from wse_server.conformance.report import to_json, to_junit, write_list, write_table
from wse_server.conformance.wsclient import Target


class _Ctx(ScenarioContext):
    def __init__(self, late: list[str] | None = None) -> None:
        super().__init__()
        self.late = late or []
        self.ended: list[str] = []

    async def end(self, scenario: Scenario) -> list[str]:
        self.ended.append(scenario.id)
        return self.late if scenario.id == "late" else []


def _sc(sid: str, run: Any, timeout: float = 5.0) -> Scenario:
    return Scenario(sid, f"{sid} scenario", "§1", run, timeout=timeout)


async def _pass(ctx: _Ctx) -> None:
    ctx.must(True, "fine")
    ctx.note("evidence")


async def _warn(ctx: _Ctx) -> None:
    ctx.should(False, "a SHOULD")


async def _fail(ctx: _Ctx) -> None:
    ctx.should(False, "earlier SHOULD")
    ctx.must(1 == 2, "a MUST")


async def _unsupported(ctx: _Ctx) -> None:
    raise Unsupported("not supported by the peer under test")


async def _skip(ctx: _Ctx) -> None:
    raise Skip("needs an option")


async def _error(ctx: _Ctx) -> None:
    raise KeyError("kit bug")


async def _slow(ctx: _Ctx) -> None:
    await asyncio.sleep(5)


def test_runner_outcomes() -> None:
    ctx = _Ctx(late=["peer sent a masked frame"])
    scenarios = [
        _sc("pass", _pass),
        _sc("warn", _warn),
        _sc("fail", _fail),
        _sc("unsupported", _unsupported),
        _sc("skip", _skip),
        _sc("error", _error),
        _sc("slow", _slow, timeout=0.05),
        _sc("late", _pass),
    ]
    seen: list[str] = []
    results = asyncio.run(run_suite(scenarios, ctx, on_result=lambda r: seen.append(r.scenario.id)))
    got = {r.scenario.id: r for r in results}
    assert {k: r.outcome for k, r in got.items()} == {
        "pass": Outcome.PASS,
        "warn": Outcome.WARN,
        "fail": Outcome.FAIL,
        "unsupported": Outcome.UNSUPPORTED,
        "skip": Outcome.SKIP,
        "error": Outcome.ERROR,
        "slow": Outcome.FAIL,
        "late": Outcome.FAIL,
    }
    assert seen == [s.id for s in scenarios] == ctx.ended
    assert got["pass"].details == ["evidence"]
    assert got["warn"].details == ["SHOULD: a SHOULD"]
    assert got["fail"].details == ["a MUST", "SHOULD: earlier SHOULD"]
    assert "KeyError" in got["error"].details[0]
    assert "did not finish within 0.05 s" in got["slow"].details[0]
    assert got["late"].details[0] == "peer sent a masked frame"
    assert exit_code(results) == 1
    assert exit_code([got["pass"], got["warn"], got["skip"], got["unsupported"]]) == 0
    assert exit_code([got["warn"]], strict=True) == 1

    doc = to_json(results, mode="server", target="ws://x")
    assert doc["summary"] == {
        "pass": 1, "warn": 1, "fail": 3, "error": 1, "unsupported": 1, "skip": 1,
    }  # fmt: skip
    assert json.loads(json.dumps(doc))["results"][2]["outcome"] == "fail"
    suite = ET.fromstring(to_junit(results, mode="server", target="ws://x"))
    counts = [suite.get(k) for k in ("tests", "failures", "errors", "skipped")]
    assert counts == ["8", "3", "1", "2"]
    table = io.StringIO()
    write_table(results, table)
    lines = table.getvalue().splitlines()
    assert lines[0].split()[:2] == ["PASS", "pass"]
    assert any(line.strip() == "- SHOULD: earlier SHOULD" for line in lines)
    assert lines[-1] == "1 pass, 1 warn, 3 fail, 1 error, 1 unsupported, 1 skip (8 scenarios)"
    listing = io.StringIO()
    write_list(scenarios, listing)
    assert [line.split()[0] for line in listing.getvalue().splitlines()] == [
        s.id for s in scenarios
    ]
    kinds = [[child.tag for child in case] for case in suite.findall("testcase")]
    assert kinds == [["system-out"], ["system-out"], ["failure"], ["skipped"], ["skipped"],
                     ["error"], ["failure"], ["failure"]]  # fmt: skip


def test_select_keeps_order_and_globs() -> None:
    ids = [s.id for s in select(SERVER_SCENARIOS, ["key-exchange*,auth-required"], ["*-once"])]
    assert ids == ["auth-required", "key-exchange", "key-exchange-invalid"]
    assert select(CLIENT_SCENARIOS, [], ["*"]) == []


def test_scenario_registries() -> None:
    for pool in (SERVER_SCENARIOS, CLIENT_SCENARIOS):
        ids = [s.id for s in pool]
        assert len(ids) == len(set(ids))
        for sc in pool:
            assert sc.section.startswith("§"), sc.id
            assert sc.description and len(sc.description) < 120, sc.id
            for ref in sc.vectors:
                name, _, op = ref.partition(":")
                assert vectors.cases(name, op), ref


def test_target_parse() -> None:
    assert Target.parse("ws://127.0.0.1:5006/wse") == Target("127.0.0.1", 5006, "/wse")
    assert Target.parse("ws://example.org") == Target("example.org", 80, "/")
    assert Target.parse("ws://[::1]:81/a?b=1") == Target("::1", 81, "/a?b=1")
    assert Target("::1", 81, "/").host_header == "[::1]:81"
    with pytest.raises(ValueError):
        Target.parse("wss://example.org/")


def test_json_equal_tells_types_apart() -> None:
    assert json_equal({"a": [1, 1.5, None, "x"]}, {"a": [1, 1.5, None, "x"]})
    assert not json_equal(1, 1.0)
    assert not json_equal(True, 1)
    assert not json_equal({"a": 1}, {"a": 1, "b": 2})
    assert not json_equal([1], [1, 2])


def test_strip_stamp_and_sorted_form() -> None:
    for case in vectors.cases("envelope", "inject_category"):
        text = inject_category(case["input"]["text"])
        if text.startswith("{") and not text.startswith('{"tp"'):
            stamped = '{"tp":"a\\"b","e":"0a1b2c3d","o":17,' + text[1:]
            if text == "{}":
                stamped = '{"tp":"a\\"b","e":"0a1b2c3d","o":17}'
            assert strip_stamp(stamped) == (text, True), case["id"]
        assert strip_stamp(text)[1] is False
    assert is_sorted_compact('{"a":1,"b":[1.0,{"c":"é"}]}')
    assert not is_sorted_compact('{"b":1,"a":1}')
    assert not is_sorted_compact('{"a": 1}')


def test_mask_frames_vectors() -> None:
    """A client-direction vector, masked, decodes as a server decodes client frames."""
    for case in vectors.cases("websocket", "decode_frames"):
        inp = case["input"]
        if not inp["client_side"] or "max_message_size" in inp:
            continue
        data = bytes.fromhex(inp["data_hex"])
        if case["id"] == "decode-masked-to-client":
            assert vectors.mask_frames(data) == data  # already masked: copied
            continue
        assert _decode(data, client_side=True) == _decode(
            vectors.mask_frames(data), client_side=False
        )


def _decode(data: bytes, *, client_side: bool) -> object:
    decoder = FrameDecoder(client_side=client_side)
    decoder.receive_data(data)
    out: list[tuple[int, bytes]] = []
    try:
        while batch := decoder.messages():
            out.extend(batch)
    except WSEError as exc:
        return out, type(exc).__name__, exc.close_code
    return out


frames = st.lists(
    st.tuples(st.sampled_from([1, 2, 9, 10]), st.binary(max_size=300), st.booleans()),
    max_size=5,
)


@settings(max_examples=60, deadline=None)
@given(frames=frames, key=st.binary(min_size=4, max_size=4))
def test_mask_frames_property(frames: list[tuple[int, bytes, bool]], key: bytes) -> None:
    """Masking any unmasked frame sequence gives the same messages to a server decoder."""
    stream = b"".join(
        encode_frame(op, payload[:125] if op >= 8 else payload) for op, payload, _ in frames
    )
    masked = vectors.mask_frames(stream, key)
    assert len(masked) == len(stream) + 4 * len(frames)
    assert _decode(stream, client_side=True) == _decode(masked, client_side=False)

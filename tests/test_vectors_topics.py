"""Runs every case of spec/vectors/topics.json through wse_proto.topics."""

from __future__ import annotations

from typing import Any

import pytest
from _vectors import case_ids, check_header, load

from wse_proto import topics

DOC = load("topics")
CASES: list[dict[str, Any]] = DOC["cases"]


def _glob_match(inp: dict[str, Any], exp: dict[str, Any]) -> None:
    assert topics.glob_match(inp["pattern"], inp["topic"]) is exp["match"]
    # The compiled form and the pre-encoded entry point agree with the plain call.
    compiled = topics.compile_glob(inp["pattern"])
    assert compiled.match(inp["topic"]) is exp["match"]
    assert compiled.match_bytes(inp["topic"].encode()) is exp["match"]


def _is_glob(inp: dict[str, Any], exp: dict[str, Any]) -> None:
    assert topics.is_glob(inp["topic"]) is exp["glob"]


def _acl_is_allowed(inp: dict[str, Any], exp: dict[str, Any]) -> None:
    acl = topics.TopicACL(inp["allow"], inp["deny"])
    assert [acl.is_allowed(t) for t in inp["topics"]] == exp["allowed"]


def _acl_from_claim(inp: dict[str, Any], exp: dict[str, Any]) -> None:
    acl = topics.TopicACL.from_claim(inp["claim"])
    if exp["acl"] is None:
        assert acl is None
    else:
        assert acl == topics.TopicACL(tuple(exp["acl"]["allow"]), tuple(exp["acl"]["deny"]))


def _valid_topic(inp: dict[str, Any], exp: dict[str, Any]) -> None:
    assert topics.valid_topic(inp["topic"]) is exp["valid"]


RUNNERS = {
    "glob_match": _glob_match,
    "is_glob": _is_glob,
    "acl_is_allowed": _acl_is_allowed,
    "acl_from_claim": _acl_from_claim,
    "valid_topic": _valid_topic,
}


def test_vector_file_header() -> None:
    check_header(DOC, "topics", RUNNERS)


@pytest.mark.parametrize("case", CASES, ids=case_ids(DOC))
def test_vector(case: dict[str, Any]) -> None:
    RUNNERS[case["op"]](case["input"], case["expected"])

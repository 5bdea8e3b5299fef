"""Shared loading and checking of spec/vectors/*.json (format in docs/DESIGN.md, "Vector files").

Every tests/test_vectors_*.py reads its file, checks the header the same way and, where
cases may expect an error, runs them through :func:`check_case`.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Iterable
from typing import Any

import pytest

from wse_proto import errors

VECTORS = pathlib.Path(__file__).resolve().parent.parent / "spec" / "vectors"


def load(name: str) -> dict[str, Any]:
    """The parsed vector file ``spec/vectors/<name>.json``."""
    doc: dict[str, Any] = json.loads((VECTORS / f"{name}.json").read_text(encoding="utf-8"))
    return doc


def case_ids(doc: dict[str, Any]) -> list[str]:
    """Test ids for ``pytest.mark.parametrize``: the cases' own ids."""
    return [c["id"] for c in doc["cases"]]


def check_header(doc: dict[str, Any], name: str, ops: Iterable[str]) -> None:
    """Format, version and name are right, ids are unique, and every op has cases and a runner."""
    assert doc["format"] == "wse-test-vectors"
    assert doc["version"] == 1
    assert doc["name"] == name
    ids = case_ids(doc)
    assert len(ids) == len(set(ids)), "case ids must be unique"
    assert {c["op"] for c in doc["cases"]} == set(ops), "every op has cases and a runner"


def check_case(call: Callable[[], object], expected: dict[str, Any]) -> errors.WSEError | None:
    """Run one case: an ``{"error": name}`` expectation must raise exactly that class
    (returned, for further checks); anything else must equal what ``call`` returns.
    """
    if "error" in expected:
        cls: type[errors.WSEError] = getattr(errors, expected["error"])
        with pytest.raises(cls) as info:
            call()
        assert type(info.value) is cls, "the most specific class"
        return info.value
    assert call() == expected
    return None

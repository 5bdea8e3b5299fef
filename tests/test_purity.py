"""wse_proto must stay Sans-IO: no I/O, clock or randomness imports outside _defaults."""

from __future__ import annotations

import ast
import pathlib

import pytest

FORBIDDEN = {
    "socket",
    "asyncio",
    "threading",
    "gevent",
    "selectors",
    "ssl",
    "time",
    "random",
    "secrets",
    "uuid",
    "multiprocessing",
    "subprocess",
}
ALLOWED_FILES = {"_defaults.py"}
ROOT = pathlib.Path(__file__).resolve().parent.parent / "wse_proto"


def _imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


SOURCES = sorted(p for p in ROOT.rglob("*.py") if p.name not in ALLOWED_FILES)


def test_there_are_sources_to_check() -> None:
    assert len(SOURCES) >= 2


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_io_clock_or_random_imports(path: pathlib.Path) -> None:
    bad = _imported_modules(path) & FORBIDDEN
    assert not bad, f"{path.name} imports {sorted(bad)}; inject them via wse_proto._defaults"


def test_detector_catches_a_forbidden_import(tmp_path: pathlib.Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import os\nfrom time import monotonic\nimport asyncio.events\n")
    assert _imported_modules(sample) & FORBIDDEN == {"time", "asyncio"}

"""Reporters: a human table, JSON and JUnit XML."""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from typing import Any, TextIO

from .core import KIT_VERSION, Outcome, Result, Scenario

__all__ = [
    "summary",
    "to_json",
    "to_junit",
    "write_json",
    "write_junit",
    "write_list",
    "write_row",
    "write_summary",
    "write_table",
]

_MARK = {
    Outcome.PASS: "PASS",
    Outcome.WARN: "WARN",
    Outcome.FAIL: "FAIL",
    Outcome.ERROR: "ERROR",
    Outcome.UNSUPPORTED: "UNSUPPORTED",
    Outcome.SKIP: "SKIP",
}


def summary(results: Sequence[Result]) -> dict[str, int]:
    counts = Counter(r.outcome.value for r in results)
    return {o.value: counts.get(o.value, 0) for o in Outcome}


def write_row(
    r: Result, out: TextIO, *, width: int = 32, section_width: int = 18, verbose: bool = False
) -> None:
    """One scenario: outcome, id, section, time, first detail; then the other details
    (for anything that did not plainly pass, or always with ``verbose``)."""
    first = r.details[0] if r.details else ""
    if len(first) > 110 and not verbose:
        first = first[:107] + "..."
    sc = r.scenario
    out.write(
        f"{_MARK[r.outcome]:<12}{sc.id:<{width + 2}}{sc.section:<{section_width + 2}}"
        f"{r.duration:6.2f}s  {first}\n"
    )
    more = r.details[1:] if (verbose or r.outcome is not Outcome.PASS) else []
    for line in more:
        out.write(f"{'':<12}- {line}\n")


def write_summary(results: Sequence[Result], out: TextIO) -> None:
    counts = summary(results)
    parts = ", ".join(f"{n} {name}" for name, n in counts.items() if n)
    out.write(f"\n{parts} ({len(results)} scenarios)\n")


def write_table(results: Sequence[Result], out: TextIO, *, verbose: bool = False) -> None:
    width = max((len(r.scenario.id) for r in results), default=10)
    sections = max((len(r.scenario.section) for r in results), default=10)
    for r in results:
        write_row(r, out, width=width, section_width=sections, verbose=verbose)
    write_summary(results, out)


def write_list(scenarios: Sequence[Scenario], out: TextIO) -> None:
    width = max((len(s.id) for s in scenarios), default=10)
    sections = max((len(s.section) for s in scenarios), default=10)
    for sc in scenarios:
        needs = f" [needs {', '.join(sorted(sc.needs))}]" if sc.needs else ""
        out.write(f"{sc.id:<{width + 2}}{sc.section:<{sections + 2}}{sc.description}{needs}\n")


def to_json(results: Sequence[Result], *, mode: str, target: str) -> dict[str, Any]:
    return {
        "kit": "wse-py conformance",
        "kit_version": KIT_VERSION,
        "mode": mode,
        "target": target,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "summary": summary(results),
        "results": [r.to_json() for r in results],
    }


def write_json(results: Sequence[Result], path: str, *, mode: str, target: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(to_json(results, mode=mode, target=target), fh, indent=2, ensure_ascii=False)
        fh.write("\n")


def to_junit(results: Sequence[Result], *, mode: str, target: str) -> bytes:
    """JUnit XML: fail/error as failures/errors, skip/unsupported as skipped, warn passes
    with its SHOULD findings in system-out."""
    counts = summary(results)
    suite = ET.Element(
        "testsuite",
        name=f"wse-conformance-{mode}",
        tests=str(len(results)),
        failures=str(counts["fail"]),
        errors=str(counts["error"]),
        skipped=str(counts["skip"] + counts["unsupported"]),
        time=f"{sum(r.duration for r in results):.3f}",
    )
    props = ET.SubElement(suite, "properties")
    ET.SubElement(props, "property", name="target", value=target)
    ET.SubElement(props, "property", name="kit_version", value=KIT_VERSION)
    for r in results:
        case = ET.SubElement(
            suite,
            "testcase",
            classname=f"wse.conformance.{mode}",
            name=f"{r.scenario.id} ({r.scenario.section})",
            time=f"{r.duration:.3f}",
        )
        text = "\n".join(r.details)
        first = r.details[0] if r.details else r.outcome.value
        if r.outcome is Outcome.FAIL:
            ET.SubElement(case, "failure", message=first).text = text
        elif r.outcome is Outcome.ERROR:
            ET.SubElement(case, "error", message=first).text = text
        elif r.outcome in (Outcome.SKIP, Outcome.UNSUPPORTED):
            ET.SubElement(case, "skipped", message=f"{r.outcome.value}: {first}")
        elif text:
            ET.SubElement(case, "system-out").text = f"{r.outcome.value}\n{text}"
    data: bytes = ET.tostring(suite, encoding="utf-8", xml_declaration=True)
    return data


def write_junit(results: Sequence[Result], path: str, *, mode: str, target: str) -> None:
    with open(path, "wb") as fh:
        fh.write(to_junit(results, mode=mode, target=target))

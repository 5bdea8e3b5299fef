"""The scenario model shared by both modes: outcomes, the registry and the runner.

A scenario is a coroutine run against a mode-specific context. Inside it, ``ctx.must`` and
``ctx.should`` record checks: a failed MUST ends the scenario as ``fail``; failed SHOULDs
let it run on and end it as ``warn``. ``Unsupported`` (the peer lacks an optional feature
the scenario needs) and ``Skip`` (the operator excluded it, or the kit lacks an input such
as a JWT secret) are outcomes of their own, never a pass.
"""

from __future__ import annotations

import asyncio
import enum
import fnmatch
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = [
    "KIT_VERSION",
    "Fail",
    "Outcome",
    "Result",
    "Scenario",
    "ScenarioContext",
    "Skip",
    "Unsupported",
    "exit_code",
    "run_suite",
    "select",
]

KIT_VERSION = "1.0"
"""Version of the kit's scenarios and conventions (spec/CONFORMANCE.md)."""


class Outcome(enum.Enum):
    """How one scenario ended."""

    PASS = "pass"
    WARN = "warn"  # every MUST held, at least one SHOULD did not
    FAIL = "fail"  # a MUST did not hold
    ERROR = "error"  # the kit itself broke (or the peer made it crash)
    UNSUPPORTED = "unsupported"  # the peer under test lacks an optional feature
    SKIP = "skip"  # excluded by options (--no-control, missing --jwt-secret, ...)


FAILING = frozenset({Outcome.FAIL, Outcome.ERROR})


class Fail(Exception):
    """A MUST-level check failed; the message says what was expected and what came."""


class Unsupported(Exception):
    """The peer under test does not support what the scenario needs (a distinct outcome)."""


class Skip(Exception):
    """The scenario cannot run with the options given; the message says which one."""


@dataclass(frozen=True, slots=True)
class Scenario:
    """One conformance check: id, a one-line description, the spec section it proves.

    ``needs`` names optional capabilities (``control``, ``recovery``, ``presence``,
    ``jwt-secret``, ``encryption``...) the context checks before running it; ``vectors``
    names the vector files (``file`` or ``file:op``) that drive it.
    """

    id: str
    description: str
    section: str
    run: Callable[[Any], Awaitable[None]]
    needs: frozenset[str] = frozenset()
    vectors: tuple[str, ...] = ()
    timeout: float = 30.0


async def read_until_eof(reader: asyncio.StreamReader, on_bytes: Callable[[bytes], None]) -> None:
    """Feed everything ``reader`` yields to ``on_bytes``; a reset or socket error ends it
    like EOF does (the kit's peers may misbehave on purpose)."""
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                return
            on_bytes(data)
    except (ConnectionError, OSError):
        pass


MAX_HEAD = 65536
"""Longest HTTP head the kit's peers accept before calling it a violation."""


class HeadBuffer:
    """Collects an HTTP head across reads; the kit's peers split it off the bytes themselves
    so they can judge the raw head before the frames after it."""

    __slots__ = ("_data", "done")

    def __init__(self) -> None:
        self._data = b""
        self.done = False

    def feed(self, data: bytes) -> tuple[bytes, bytes] | None:
        """``(head with its blank line, what follows)`` once complete (then ``done``), else None."""
        self._data += data
        end = self._data.find(b"\r\n\r\n")
        if end < 0:
            return None
        self.done = True
        return self._data[: end + 4], self._data[end + 4 :]

    @property
    def too_long(self) -> bool:
        return len(self._data) > MAX_HEAD


_Run = TypeVar("_Run", bound=Callable[..., Any])


def scenario_decorator(
    registry: list[Scenario], default_timeout: float
) -> Callable[..., Callable[[_Run], _Run]]:
    """The ``@scenario(id, section, description, ...)`` decorator of one mode: it appends
    each decorated coroutine function, in definition order, to ``registry``."""

    def scenario(
        id: str,
        section: str,
        description: str,
        *,
        needs: Iterable[str] = (),
        vectors: Iterable[str] = (),
        timeout: float = default_timeout,
    ) -> Callable[[_Run], _Run]:
        def register(fn: _Run) -> _Run:
            registry.append(
                Scenario(id, description, section, fn, frozenset(needs), tuple(vectors), timeout)
            )
            return fn

        return register

    return scenario


@dataclass(slots=True)
class Result:
    """The outcome of one scenario with its evidence (``details``)."""

    scenario: Scenario
    outcome: Outcome
    details: list[str] = field(default_factory=list)
    duration: float = 0.0

    def to_json(self) -> dict[str, Any]:
        sc = self.scenario
        return {
            "id": sc.id,
            "description": sc.description,
            "section": sc.section,
            "outcome": self.outcome.value,
            "details": self.details,
            "duration_s": round(self.duration, 3),
            "needs": sorted(sc.needs),
            "vectors": list(sc.vectors),
        }


class ScenarioContext:
    """Base of the two mode contexts: check recording and per-scenario setup/teardown."""

    def __init__(self) -> None:
        self.warnings: list[str] = []
        self.notes: list[str] = []

    # -- checks ------------------------------------------------------------------

    def must(self, condition: object, message: str) -> None:
        """A MUST of the spec: the scenario fails here if ``condition`` is false."""
        if not condition:
            raise Fail(message)

    def should(self, condition: object, message: str) -> bool:
        """A SHOULD: recorded, the scenario goes on and ends as ``warn``."""
        if not condition:
            self.warnings.append(message)
        return bool(condition)

    def note(self, message: str) -> None:
        """Evidence worth showing in the report even when the scenario passes."""
        self.notes.append(message)

    # -- lifecycle, overridden by the modes ---------------------------------------

    def precheck(self, scenario: Scenario) -> tuple[Outcome, str] | None:
        """Decide before running whether the scenario can run at all."""
        return None

    async def begin(self, scenario: Scenario) -> None:
        self.warnings = []
        self.notes = []

    async def end(self, scenario: Scenario) -> list[str]:
        """Release what the scenario opened; returns violations seen only now (a peer
        that broke framing while the scenario looked elsewhere): they fail it."""
        return []


def select(
    scenarios: Sequence[Scenario], only: Iterable[str] = (), skip: Iterable[str] = ()
) -> list[Scenario]:
    """Filter by id patterns (``fnmatch``; comma-separated lists allowed), keeping order."""

    def patterns(values: Iterable[str]) -> list[str]:
        return [p.strip() for v in values for p in v.split(",") if p.strip()]

    only_p, skip_p = patterns(only), patterns(skip)
    chosen = []
    for sc in scenarios:
        if only_p and not any(fnmatch.fnmatchcase(sc.id, p) for p in only_p):
            continue
        if any(fnmatch.fnmatchcase(sc.id, p) for p in skip_p):
            continue
        chosen.append(sc)
    return chosen


async def run_suite(
    scenarios: Sequence[Scenario],
    ctx: ScenarioContext,
    *,
    on_result: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Run ``scenarios`` in order, each bounded by its own timeout."""
    results: list[Result] = []
    for sc in scenarios:
        result = await _run_one(sc, ctx)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


async def _run_one(sc: Scenario, ctx: ScenarioContext) -> Result:
    decided = ctx.precheck(sc)
    if decided is not None:
        return Result(sc, decided[0], [decided[1]])
    started = time.monotonic()
    outcome = Outcome.PASS
    details: list[str] = []
    await ctx.begin(sc)
    try:
        await asyncio.wait_for(sc.run(ctx), sc.timeout)
    except Fail as exc:
        outcome, details = Outcome.FAIL, [str(exc)]
    except Unsupported as exc:
        outcome, details = Outcome.UNSUPPORTED, [str(exc)]
    except Skip as exc:
        outcome, details = Outcome.SKIP, [str(exc)]
    except TimeoutError:
        outcome, details = Outcome.FAIL, [f"scenario did not finish within {sc.timeout:g} s"]
    except Exception as exc:  # the kit must report, never crash on a bad peer
        where = traceback.extract_tb(exc.__traceback__)[-1]
        outcome = Outcome.ERROR
        details = [f"{type(exc).__name__}: {exc} (at {where.filename}:{where.lineno})"]
    try:
        late = await ctx.end(sc)
    except Exception as exc:
        late = [f"teardown failed: {type(exc).__name__}: {exc}"]
    if late and outcome in (Outcome.PASS, Outcome.WARN):
        outcome, details = Outcome.FAIL, list(late)
    else:
        details.extend(late)
    if outcome is Outcome.PASS and ctx.warnings:
        outcome = Outcome.WARN
    if outcome in (Outcome.PASS, Outcome.WARN, Outcome.FAIL):
        details.extend(f"SHOULD: {w}" for w in ctx.warnings)
    details.extend(ctx.notes)
    return Result(sc, outcome, details, time.monotonic() - started)


def exit_code(results: Iterable[Result], *, strict: bool = False) -> int:
    """0 when nothing failed; 1 otherwise (``strict`` also counts ``warn``)."""
    bad = FAILING | {Outcome.WARN} if strict else FAILING
    return 1 if any(r.outcome in bad for r in results) else 0

"""Shared pieces of the micro-benchmarks: a small-JSON workload and best-of timing."""

from __future__ import annotations

import random
import timeit
from collections.abc import Callable

SIZES = (40, 60, 90, 120, 200, 400)


def json_payloads(rng: random.Random, count: int, head: bytes) -> list[bytes]:
    """``count`` small JSON bodies of 40-400 B, the traffic WSE mostly carries.

    ``head`` is the opening of each body with one ``%d`` for the index; it is padded
    with ``x`` to a size drawn from ``SIZES`` and closed with ``"}}``.
    """
    out = []
    for i in range(count):
        size = rng.choice(SIZES)
        body = head % i
        out.append(body + b"x" * max(0, size - len(body) - 3) + b'"}}')
    return out


def best(fn: Callable[[], object], number: int, repeat: int) -> float:
    """Seconds per call, the best of ``repeat`` timeit runs (the least disturbed one)."""
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number

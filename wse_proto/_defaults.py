"""The only module of wse_proto allowed to touch the clock and the OS RNG.

Machines and codecs never call these themselves: callers (transports, the
server, tests) pass them in, so a test can inject a fake clock or a seeded RNG.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

__all__ = ["RandFn", "WallClockMs", "monotonic", "system_rand", "wall_clock_ms"]

RandFn = Callable[[int], bytes]
"""Returns ``n`` random bytes. Injected wherever wse_proto needs randomness."""

WallClockMs = Callable[[], int]
"""Returns Unix time in integer milliseconds. Injected for envelope timestamps."""


def system_rand(n: int) -> bytes:
    """Cryptographically strong random bytes from the OS."""
    return os.urandom(n)


def wall_clock_ms() -> int:
    """Unix time in milliseconds."""
    return time.time_ns() // 1_000_000


def monotonic() -> float:
    """Seconds on a clock that never goes backwards (for timers and deadlines)."""
    return time.monotonic()

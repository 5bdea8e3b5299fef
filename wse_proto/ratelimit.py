"""Token bucket (outbound ``send_event`` limiter) and the message-id dedup window.

Both are pure and clock-free: the caller passes ``now`` (monotonic seconds).

Reference §6.2: the bucket is per connection, created full on the first
``send_event``, refilled continuously at ``refill_rate`` tokens per second up to
``capacity``; each event costs one token. Reference §2.3/§6.4: dedup keys
(``conn_id + "\\0" + id``) live in one server-wide FIFO window of 50,000 keys.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable

__all__ = ["DEDUP_WINDOW_SIZE", "DedupWindow", "TokenBucket"]

DEDUP_WINDOW_SIZE = 50_000
"""The original's global dedup window (reference §6.4)."""


class TokenBucket:
    """Continuous-refill token bucket.

    ``tokens`` is only brought up to date by :meth:`refill` (or the methods that
    call it), so reading it right after a refill gives the level at that instant,
    which is what the rate-limit warning reports.
    """

    __slots__ = ("_updated", "capacity", "refill_rate", "tokens")

    def __init__(
        self,
        capacity: float,
        refill_rate: float,
        now: float,
        tokens: float | None = None,
    ) -> None:
        if not capacity > 0 or math.isinf(capacity):
            raise ValueError(f"capacity must be a positive finite number, got {capacity!r}")
        if not refill_rate >= 0 or math.isinf(refill_rate):
            raise ValueError(f"refill_rate must be finite and >= 0, got {refill_rate!r}")
        self.capacity = float(capacity)
        self.refill_rate = float(refill_rate)
        self.tokens = self.capacity if tokens is None else min(float(tokens), self.capacity)
        self._updated = now

    def refill(self, now: float) -> float:
        """Add the tokens earned since the last update; returns the new level.

        A clock that goes backwards earns nothing (and does not move the reference).
        """
        elapsed = now - self._updated
        if elapsed > 0:
            self._updated = now
            if self.tokens < self.capacity:
                self.tokens = min(self.capacity, self.tokens + elapsed * self.refill_rate)
        return self.tokens

    def take(self, cost: float = 1.0) -> None:
        """Remove ``cost`` tokens without a check (the caller already decided)."""
        self.tokens -= cost

    def try_acquire(self, now: float, cost: float = 1.0) -> bool:
        """Refill, then take ``cost`` tokens if that many are available."""
        if self.refill(now) < cost:
            return False
        self.tokens -= cost
        return True

    def time_until(self, now: float, cost: float = 1.0) -> float:
        """Seconds from ``now`` until ``cost`` tokens are available (inf if never)."""
        missing = cost - self.refill(now)
        if missing <= 0:
            return 0.0
        if self.refill_rate == 0 or cost > self.capacity:
            return math.inf
        return missing / self.refill_rate


class DedupWindow:
    """Remembers the last ``max_size`` distinct keys, oldest evicted first (FIFO).

    A duplicate does not refresh its key's position: the window is by insertion
    order, like the original's. Memory is bounded by ``max_size`` keys.
    """

    __slots__ = ("_order", "_seen", "max_size")

    def __init__(self, max_size: int = DEDUP_WINDOW_SIZE) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size!r}")
        self.max_size = max_size
        self._seen: set[Hashable] = set()
        self._order: deque[Hashable] = deque()

    def add(self, key: Hashable) -> bool:
        """Record ``key``; returns False if it was already in the window (a duplicate)."""
        seen = self._seen
        if key in seen:
            return False
        seen.add(key)
        order = self._order
        order.append(key)
        if len(order) > self.max_size:
            seen.discard(order.popleft())
        return True

    def __contains__(self, key: object) -> bool:
        return key in self._seen

    def __len__(self) -> int:
        return len(self._order)

    def clear(self) -> None:
        self._seen.clear()
        self._order.clear()

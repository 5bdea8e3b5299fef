"""Per-server settings shared by every :class:`~wse_proto.server.ServerConnection`.

Defaults are the original's constructor defaults (reference §6.1, §1.2).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .auth import JWTConfig

__all__ = ["ServerConfig"]


def _no_cluster() -> bool:
    return False


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Immutable connection settings; validated like the original's constructor.

    ``cluster_connected`` is asked when a ``server_hello`` is built (its
    ``features.cluster`` flag): the hub passes a callable that reads its live
    cluster state, so one frozen config serves the whole server lifetime.
    """

    max_message_size: int = 1_048_576
    ping_interval: float = 25.0
    idle_timeout: float = 60.0
    rate_limit_capacity: float = 100_000.0
    rate_limit_refill: float = 10_000.0
    jwt: JWTConfig | None = None
    handshake_timeout: float = 10.0
    close_timeout: float = 5.0
    recovery_enabled: bool = False
    server_version: str = "2.5.1"
    cluster_connected: Callable[[], bool] = _no_cluster

    def __post_init__(self) -> None:
        if isinstance(self.max_message_size, bool) or not isinstance(self.max_message_size, int):
            raise ValueError("max_message_size must be an int")
        if self.max_message_size < 1:
            raise ValueError("max_message_size must be >= 1")
        for name in ("ping_interval", "idle_timeout", "handshake_timeout", "close_timeout"):
            value = getattr(self, name)
            if not _positive(value):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        # Reference §6.1: the original refuses idle_timeout <= ping_interval.
        if not self.idle_timeout > self.ping_interval:
            raise ValueError(
                f"idle_timeout ({self.idle_timeout}) must be greater than "
                f"ping_interval ({self.ping_interval})"
            )
        if not _positive(self.rate_limit_capacity):
            raise ValueError("rate_limit_capacity must be a positive finite number")
        if not (_positive(self.rate_limit_refill) or self.rate_limit_refill == 0):
            raise ValueError("rate_limit_refill must be a finite number >= 0")
        if not callable(self.cluster_connected):
            raise ValueError("cluster_connected must be a callable returning bool")


def _positive(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and value > 0
        and math.isfinite(value)
    )

"""The small interface every transport implements, and the registry that names them.

A transport owns sockets, a loop (or threads) and timers; it never decides anything about
the protocol. It drives one :class:`wse_proto.hub.ServerCore` under one ``threading.Lock``
that it shares with the application facade (:class:`wse_server.WSEServer`): every call into
the core, from the I/O side or from application threads, happens with that lock held.

Contract with the facade:

- ``start()`` binds and returns once listening (bind errors are raised in the caller's
  thread); ``stop()`` sends the shutdown closes, waits for a short grace period and tears
  the loop down.
- ``wake()`` is called by the core (through ``core.set_wakeup``) with the lock held when an
  application call left output queued; the transport schedules one flush, however many
  wakes arrive before it runs (write coalescing).
- ``inbound_consumed()`` is called by the facade, with the lock held, after it popped
  inbound events, so a transport that paused reading (inbound queue full) can resume.
- ``submit(fn)`` runs ``fn`` on the I/O side soon (thread-safe).
- New inbound events are announced by the core itself (``core.on_inbound``, set by the
  facade), from inside the transport's calls into the core.

Transports are looked up by name with :func:`get_transport`; importing the registry never
imports a transport's library (gevent stays optional).
"""

from __future__ import annotations

import importlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wse_proto.hub import ServerCore

__all__ = ["TRANSPORTS", "Transport", "available_transports", "get_transport"]


class Transport(ABC):
    """Base class of the socket pumps that drive a ``ServerCore``."""

    #: registry name of the transport ("asyncio", "uvloop", ...)
    name: str = ""

    def __init__(
        self,
        core: ServerCore,
        lock: threading.Lock,
        *,
        host: str,
        port: int,
    ) -> None:
        self.core = core
        self.lock = lock
        self.host = host
        self.port = port

    @property
    @abstractmethod
    def bound_port(self) -> int:
        """The TCP port actually listened on (useful with ``port=0``)."""

    @abstractmethod
    def start(self) -> None:
        """Start serving in the background; return once listening."""

    @abstractmethod
    def stop(self, grace: float = 2.0) -> None:
        """Close every connection (1001), wait up to ``grace`` seconds, release resources."""

    @abstractmethod
    def submit(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on the I/O side as soon as possible (callable from any thread)."""

    @abstractmethod
    def wake(self) -> None:
        """Schedule one flush of the connections the core marked dirty (lock held)."""

    @abstractmethod
    def inbound_consumed(self) -> None:
        """The application popped inbound events (lock held): resume reading if paused."""

    @property
    @abstractmethod
    def running(self) -> bool:
        """True between a successful ``start()`` and ``stop()``."""

    #: True when :meth:`serve` can run the transport inside the caller's asyncio loop.
    supports_serve: bool = False

    async def serve(self, on_ready: Callable[[BaseException | None], None] | None = None) -> None:
        """Serve inside the running asyncio loop until :meth:`stop_async` or cancellation.

        ``on_ready`` is called once listening (``None``) or with the bind error.
        """
        raise NotImplementedError(f"the {self.name} transport cannot run inside an event loop")

    async def stop_async(self, grace: float = 2.0) -> None:
        """:meth:`stop` for a transport running under :meth:`serve`."""
        raise NotImplementedError(f"the {self.name} transport cannot run inside an event loop")


# name -> "module:Class[:option=value]"; resolved lazily so optional libraries stay optional.
TRANSPORTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "asyncio": ("wse_transports.asyncio", "AsyncioTransport", {"loop": "asyncio"}),
    "uvloop": ("wse_transports.asyncio", "AsyncioTransport", {"loop": "uvloop"}),
    "threading": ("wse_transports.threading", "ThreadingTransport", {}),
    "gevent": ("wse_transports.gevent", "GeventTransport", {}),
}


def available_transports() -> list[str]:
    """Names accepted by :func:`get_transport`, in registry order."""
    return list(TRANSPORTS)


def get_transport(name: str) -> tuple[type[Transport], dict[str, Any]]:
    """Resolve a transport name to its class and the fixed options that name implies."""
    try:
        module_name, class_name, options = TRANSPORTS[name]
    except KeyError:
        raise ValueError(
            f"unknown transport {name!r}; available: {', '.join(available_transports())}"
        ) from None
    module = importlib.import_module(module_name)
    cls: type[Transport] = getattr(module, class_name)
    return cls, dict(options)

"""threading transport: the blocking pump on OS threads, with ``selectors`` readiness.

One I/O thread serves every socket through one selector (epoll on Linux), so thousands of
idle connections cost a registration each, not a thread each. Application threads call
the core under the shared lock and wake the I/O thread through a socketpair.

The module name shadows the stdlib inside this package only; absolute imports keep
``import threading`` pointing at the standard library. Importing this module never imports
gevent.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from collections.abc import Callable
from typing import Any

from ._blocking import READ, WRITE, BlockingTransport, Poller, Runtime

__all__ = ["SelectorPoller", "ThreadingRuntime", "ThreadingTransport"]

assert (READ, WRITE) == (selectors.EVENT_READ, selectors.EVENT_WRITE)


class SelectorPoller(Poller):
    """``selectors.DefaultSelector`` plus a socketpair that :meth:`wakeup` writes to."""

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._rx, self._tx = socket.socketpair()
        self._rx.setblocking(False)
        self._tx.setblocking(False)
        self._sel.register(self._rx, selectors.EVENT_READ, None)
        self._woken = False  # a byte is (or is about to be) in the pipe

    def register(self, fd: int, token: Any, events: int) -> None:
        self._sel.register(fd, events, token)

    def modify(self, fd: int, token: Any, events: int) -> None:
        self._sel.modify(fd, events, token)

    def unregister(self, fd: int) -> None:
        self._sel.unregister(fd)

    def poll(self, timeout: float | None) -> list[tuple[Any, int]]:
        ready = self._sel.select(timeout)
        out: list[tuple[Any, int]] = []
        for key, events in ready:
            token = key.data
            if token is None:
                # Clear the flag before draining: a wakeup racing with the drain then
                # writes a new byte, and the next poll returns at once.
                self._woken = False
                with contextlib.suppress(OSError):
                    while self._rx.recv(4096):
                        pass
            else:
                out.append((token, events))
        return out

    def wakeup(self) -> None:
        if self._woken:
            return
        self._woken = True
        with contextlib.suppress(OSError):  # full pipe: a wakeup is pending anyway
            self._tx.send(b"\0")

    def close(self) -> None:
        self._sel.close()
        self._rx.close()
        self._tx.close()


class _Thread:
    """A daemon thread as a :class:`~wse_transports._blocking.Task`."""

    __slots__ = ("thread",)

    def __init__(self, fn: Callable[[], None], name: str) -> None:
        self.thread = threading.Thread(target=fn, name=name, daemon=True)
        self.thread.start()

    def join(self, timeout: float | None = None) -> None:
        if self.thread is not threading.current_thread():
            self.thread.join(timeout)


class ThreadingRuntime(Runtime):
    name = "threading"

    def new_poller(self) -> Poller:
        return SelectorPoller()

    def spawn(self, fn: Callable[[], None], name: str) -> _Thread:
        return _Thread(fn, name)


class ThreadingTransport(BlockingTransport):
    """Serve a ``ServerCore`` from one I/O thread (any number of idle connections)."""

    name = "threading"
    runtime = ThreadingRuntime()

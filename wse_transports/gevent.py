"""gevent transport: the blocking pump on a gevent hub (libev/libuv readiness watchers).

Monkey-patching is the application's choice, and it must happen before ``wse_server`` is
imported (``from gevent import monkey; monkey.patch_all()`` first thing in ``__main__``):

- patched (``threading`` is gevent's): the I/O side is a greenlet in the caller's hub,
  the core lock and the facade's conditions are gevent's, and application greenlets
  cooperate with the server;
- not patched: the I/O side runs its own hub in a dedicated OS thread, and application
  threads use it exactly like the threading transport.

Readiness: one io watcher per socket and direction; its callback (run by the hub) only
records the token and resumes the I/O greenlet, which does the work under the core lock.
Wakeups from other greenlets or threads go through one ``async`` watcher (thread-safe).

Importing this module imports gevent, never the asyncio or threading transports.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import gevent
import gevent.monkey
from gevent.hub import Waiter

from ._blocking import READ, WRITE, BlockingTransport, Poller, Runtime

__all__ = ["GeventPoller", "GeventRuntime", "GeventTransport", "process_is_patched"]


def process_is_patched() -> bool:
    """True when ``threading`` is gevent's: application threads are greenlets."""
    return bool(gevent.monkey.is_module_patched("threading"))


class _Watch:
    """The watchers of one fd; ``token`` goes back to the pump on readiness."""

    __slots__ = ("read", "token", "write")

    def __init__(self, token: Any) -> None:
        self.token = token
        self.read: Any = None
        self.write: Any = None


class GeventPoller(Poller):
    """Readiness from the current thread's hub; must be created on the I/O side."""

    def __init__(self) -> None:
        hub = gevent.get_hub()
        self._hub = hub
        self._loop = hub.loop
        self._ready: list[tuple[Any, int]] = []
        self._waiter: Waiter | None = None  # the I/O greenlet, while it waits in poll()
        self._watches: dict[int, _Watch] = {}
        self._async = self._loop.async_()
        self._async.start(self._resume)

    def _resume(self) -> None:
        # Hub callback: wake the I/O greenlet if it is waiting (once).
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            waiter.switch(None)

    def _fire(self, token: Any, events: int) -> None:
        self._ready.append((token, events))
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            waiter.switch(None)

    def _set(self, w: _Watch, fd: int, events: int) -> None:
        loop = self._loop
        if events & READ:
            if w.read is None:
                w.read = loop.io(fd, 1)
                w.read.start(self._fire, w.token, READ)
        elif w.read is not None:
            w.read.stop()
            w.read.close()
            w.read = None
        if events & WRITE:
            if w.write is None:
                w.write = loop.io(fd, 2)
                w.write.start(self._fire, w.token, WRITE)
        elif w.write is not None:
            w.write.stop()
            w.write.close()
            w.write = None

    def register(self, fd: int, token: Any, events: int) -> None:
        if fd in self._watches:
            raise KeyError(f"fd {fd} is already registered")
        w = self._watches[fd] = _Watch(token)
        self._set(w, fd, events)

    def modify(self, fd: int, token: Any, events: int) -> None:
        w = self._watches[fd]
        if w.token is not token:  # new token: new callbacks
            self._set(w, fd, 0)
            w.token = token
        self._set(w, fd, events)

    def unregister(self, fd: int) -> None:
        w = self._watches.pop(fd)
        self._set(w, fd, 0)
        # A report already queued for this fd must not reach the pump after this.
        token = w.token
        if self._ready:
            self._ready = [item for item in self._ready if item[0] is not token]

    def poll(self, timeout: float | None) -> list[tuple[Any, int]]:
        if not self._ready:
            waiter = Waiter()
            self._waiter = waiter
            timer = None
            if timeout is not None:
                timer = self._loop.timer(max(0.0, timeout))
                timer.start(self._resume)
            try:
                waiter.get()
            finally:
                self._waiter = None
                if timer is not None:
                    timer.stop()
                    timer.close()
        ready = self._ready
        self._ready = []
        return ready

    def wakeup(self) -> None:
        self._async.send()

    def close(self) -> None:
        for fd in list(self._watches):
            self.unregister(fd)
        self._async.stop()
        self._async.close()


class _Greenlet:
    __slots__ = ("glet",)

    def __init__(self, fn: Callable[[], None]) -> None:
        self.glet = gevent.spawn(fn)

    def join(self, timeout: float | None = None) -> None:
        if self.glet is not gevent.getcurrent():
            self.glet.join(timeout)


class _HubThread:
    """An OS thread running its own hub (unpatched processes)."""

    __slots__ = ("thread",)

    def __init__(self, fn: Callable[[], None], name: str) -> None:
        def run() -> None:
            try:
                fn()
            finally:
                hub = gevent.get_hub()
                hub.destroy(destroy_loop=True)

        self.thread = threading.Thread(target=run, name=name, daemon=True)
        self.thread.start()

    def join(self, timeout: float | None = None) -> None:
        if self.thread is not threading.current_thread():
            self.thread.join(timeout)


class GeventRuntime(Runtime):
    name = "gevent"

    def new_poller(self) -> Poller:
        return GeventPoller()

    def spawn(self, fn: Callable[[], None], name: str) -> _Greenlet | _HubThread:
        if process_is_patched():
            return _Greenlet(fn)
        return _HubThread(fn, name)


class GeventTransport(BlockingTransport):
    """Serve a ``ServerCore`` from a gevent hub (a greenlet when the process is patched)."""

    name = "gevent"
    runtime = GeventRuntime()

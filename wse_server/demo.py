"""The ``--demo`` application: something visible for a newcomer within seconds.

Every connection is subscribed to topic ``demo``; a ``demo_tick`` event ``{"n": <counter>}``
is published there every second; every ``msg`` a client sends is answered with a
``send_event`` of type ``echo`` whose payload is the message's ``p``.

It uses only the public ``WSEServer`` drain API, so it doubles as an example of an
application loop.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .server import WSEServer

__all__ = ["DEMO_TOPIC", "DemoApp"]

DEMO_TOPIC = "demo"
log = logging.getLogger("wse_server.demo")


class DemoApp:
    """Drain loop + ticker threads over a running :class:`WSEServer`."""

    def __init__(self, server: WSEServer, *, topic: str = DEMO_TOPIC, interval: float = 1.0):
        self.server = server
        self.topic = topic
        self.interval = interval
        self.ticks = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self.server.enable_drain_mode()
        for target, name in (
            (self._drain_loop, "wse-demo-drain"),
            (self._tick_loop, "wse-demo-tick"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(2.0)
        self._threads.clear()

    def _tick_loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.ticks += 1
            text = json.dumps({"t": "demo_tick", "p": {"n": self.ticks}}, separators=(",", ":"))
            try:
                self.server.broadcast_local(self.topic, text)
            except RuntimeError:  # stopped underneath us
                return

    def _drain_loop(self) -> None:
        server = self.server
        while not self._stop.is_set():
            try:
                events = server.drain_inbound(256, 100)
            except RuntimeError:
                return
            for kind, conn_id, value in events:
                try:
                    self._handle(kind, conn_id, value)
                except RuntimeError:
                    return
                except Exception:  # keep the demo alive whatever a client sends
                    log.exception("demo handler failed for %s event", kind)

    def _handle(self, kind: str, conn_id: str | None, value: Any) -> None:
        if conn_id is None:
            return
        if kind in ("connect", "auth_connect"):
            log.info("%s %s (%s)", kind, conn_id, value or "-")
            self.server.subscribe_connection(conn_id, [self.topic])
        elif kind == "msg":
            payload = value.get("p") if isinstance(value, dict) else value
            self.server.send_event(conn_id, {"t": "echo", "p": payload})
        elif kind == "raw":
            self.server.send_event(conn_id, {"t": "echo", "p": value})
        elif kind == "disconnect":
            log.info("disconnect %s", conn_id)

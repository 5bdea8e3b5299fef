"""The conformance control protocol and its implementation for wse-py's ``WSEServer``.

Some server scenarios need the *application* to act (subscribe the connection, publish,
call ``send_event``, report what it received). A server opts in by letting its application
answer control messages (spec/CONFORMANCE.md, "Control protocol"):

    client -> server  {"t":"conformance_control","p":{"id":"<req>","action":"<name>",...}}
    server -> client  {"t":"conformance_control_result","p":{"id":"<req>","ok":true,...}}

:class:`ReferenceApp` is that application for ``WSEServer`` (drain mode). The replies go
out with the verbatim ``send`` (PROTOCOL §6.1): not rate limited, so a rate-limit scenario
can exhaust ``send_event`` and still get its answer.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from .wsclient import CONTROL_RESULT, CONTROL_TYPE

if TYPE_CHECKING:
    from wse_server import WSEServer

__all__ = ["ACTIONS", "CONTROL_RESULT", "CONTROL_TYPE", "PROTOCOL_VERSION", "ReferenceApp"]

PROTOCOL_VERSION = 1
ACTIONS = (
    "hello",
    "subscribe",
    "unsubscribe",
    "publish",
    "send_event",
    "inbound",
    "disconnect",
    "update_presence",
    "presence",
)
MAX_REPEAT = 20_000
INBOUND_LOG = 1000

log = logging.getLogger("wse_server.conformance")


class _Unsupported(Exception):
    pass


class _BadRequest(Exception):
    pass


class ReferenceApp:
    """Drain-mode application implementing every control action on a ``WSEServer``.

    ``presence_enabled`` must say whether the server was built with presence on (the
    server API has no getter for it).
    """

    def __init__(self, server: WSEServer, *, presence_enabled: bool = False) -> None:
        self.server = server
        self.presence_enabled = presence_enabled
        self._inbound: dict[str, deque[dict[str, Any]]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handlers: dict[str, Callable[[str, dict[str, Any]], dict[str, Any]]] = {
            "hello": self._hello,
            "subscribe": self._subscribe,
            "unsubscribe": self._unsubscribe,
            "publish": self._publish,
            "send_event": self._send_event,
            "inbound": self._inbound_report,
            "disconnect": self._disconnect,
            "update_presence": self._update_presence,
            "presence": self._presence,
        }

    def start(self) -> None:
        self.server.enable_drain_mode()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="wse-conformance-app", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
            self._thread = None

    # ------------------------------------------------------------------ event loop

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                events = self.server.drain_inbound(256, 50)
            except RuntimeError:  # the server stopped
                return
            for kind, conn_id, value in events:
                if conn_id is None:
                    continue
                try:
                    self._on_event(kind, conn_id, value)
                except RuntimeError:
                    return
                except Exception:  # one bad request must not stop the app
                    log.exception("conformance app failed on a %s event", kind)

    def _on_event(self, kind: str, conn_id: str, value: Any) -> None:
        if kind in ("connect", "auth_connect"):
            self._inbound[conn_id] = deque(maxlen=INBOUND_LOG)
        elif kind == "disconnect":
            self._inbound.pop(conn_id, None)
        elif kind == "msg" and isinstance(value, dict) and value.get("t") == CONTROL_TYPE:
            p = value.get("p")
            self._control(conn_id, p if isinstance(p, dict) else {})
        else:
            log_ = self._inbound.setdefault(conn_id, deque(maxlen=INBOUND_LOG))
            if kind == "msg":
                log_.append({"kind": "msg", "value": value})
            elif kind == "raw":
                log_.append({"kind": "raw", "text": value})
            elif kind == "bin":
                log_.append({"kind": "bin", "hex": bytes(value).hex()})

    def _control(self, conn_id: str, p: dict[str, Any]) -> None:
        rid = p.get("id")
        action = p.get("action")
        handler = self._handlers.get(action) if isinstance(action, str) else None
        reply: dict[str, Any]
        if handler is None:
            reply = {"ok": False, "error": "unsupported", "message": f"unknown action {action!r}"}
        else:
            try:
                reply = {"ok": True, **handler(conn_id, p)}
            except _Unsupported as exc:
                reply = {"ok": False, "error": "unsupported", "message": str(exc)}
            except NotImplementedError as exc:
                reply = {"ok": False, "error": "unsupported", "message": str(exc)}
            except (_BadRequest, TypeError, ValueError) as exc:
                reply = {"ok": False, "error": "bad_request", "message": str(exc)}
        reply["id"] = rid
        try:
            text = orjson.dumps({"t": CONTROL_RESULT, "p": reply}).decode("utf-8")
        except TypeError as exc:
            text = orjson.dumps(
                {"t": CONTROL_RESULT, "p": {"id": rid, "ok": False, "error": "bad_request",
                                           "message": f"unserialisable reply: {exc}"}}
            ).decode("utf-8")  # fmt: skip
        self.server.send(conn_id, text)
        if reply.get("ok") and action == "disconnect":
            self.server.disconnect(conn_id)

    # ------------------------------------------------------------------ actions

    def _recovery_available(self, conn_id: str) -> bool:
        try:
            self.server.subscribe_with_recovery(conn_id, [], recover=False)
        except NotImplementedError:
            return False
        except Exception:
            return False
        return True

    def _presence_available(self) -> bool:
        if not self.presence_enabled:
            return False
        try:
            self.server.presence_stats("conformance.probe")
        except NotImplementedError:
            return False
        return True

    def _hello(self, conn_id: str, p: dict[str, Any]) -> dict[str, Any]:
        return {
            "version": PROTOCOL_VERSION,
            "actions": list(ACTIONS),
            "features": {
                "recovery": self._recovery_available(conn_id),
                "presence": self._presence_available(),
            },
            "server": "wse-py reference app",
        }

    @staticmethod
    def _topics(p: dict[str, Any]) -> list[str]:
        topics = p.get("topics")
        if not isinstance(topics, list) or not all(isinstance(t, str) for t in topics):
            raise _BadRequest("topics must be a list of strings")
        return topics

    def _subscribe(self, conn_id: str, p: dict[str, Any]) -> dict[str, Any]:
        topics = self._topics(p)
        if p.get("recover"):
            return {"recovery": self._subscribe_recover(conn_id, topics, p.get("positions"))}
        presence_data = p.get("presence_data")
        if presence_data is not None:
            if not self._presence_available():
                raise _Unsupported("presence is not enabled on this server")
            self.server.subscribe_connection(conn_id, topics, presence_data=presence_data)
        else:
            self.server.subscribe_connection(conn_id, topics)
        return {}

    def _subscribe_recover(self, conn_id: str, topics: list[str], positions: Any) -> dict[str, Any]:
        if not isinstance(positions, dict):
            positions = {}
        merged: dict[str, Any] = {}
        all_recovered = True
        # One call per topic: each topic is judged with its own position (F10).
        for topic in topics:
            pos = positions.get(topic)
            if isinstance(pos, dict):
                result = self.server.subscribe_with_recovery(
                    conn_id, [topic], recover=True, epoch=pos.get("epoch"), offset=pos.get("offset")
                )
            else:
                result = self.server.subscribe_with_recovery(conn_id, [topic], recover=False)
            entry = (result.get("topics") or {}).get(topic, {})
            merged[topic] = entry
            all_recovered = all_recovered and bool(entry.get("recovered"))
        return {"recovered": all_recovered, "topics": merged}

    def _unsubscribe(self, conn_id: str, p: dict[str, Any]) -> dict[str, Any]:
        self.server.unsubscribe_connection(conn_id, self._topics(p))
        return {}

    def _publish(self, conn_id: str, p: dict[str, Any]) -> dict[str, Any]:
        topic, text = p.get("topic"), p.get("text")
        if not isinstance(text, str):
            raise _BadRequest("text must be a string")
        if topic is None:
            self.server.broadcast_all(text)
        elif isinstance(topic, str):
            self.server.broadcast(topic, text)
        else:
            raise _BadRequest("topic must be a string")
        return {}

    def _send_event(self, conn_id: str, p: dict[str, Any]) -> dict[str, Any]:
        events = p.get("events")
        if events is None:
            events = [p.get("event")]
        if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
            raise _BadRequest("event must be an object (or events a list of objects)")
        threshold = p.get("compression_threshold", 1024)
        repeat = p.get("repeat", 1)
        if type(threshold) is not int or type(repeat) is not int or not 1 <= repeat <= MAX_REPEAT:
            raise _BadRequest(f"compression_threshold must be an int, repeat 1..{MAX_REPEAT}")
        results = [
            self.server.send_event(conn_id, event, threshold)
            for _ in range(repeat)
            for event in events
        ]
        return {"results": results}

    def _inbound_report(self, conn_id: str, p: dict[str, Any]) -> dict[str, Any]:
        log_ = self._inbound.get(conn_id)
        events = list(log_) if log_ else []
        if log_:
            log_.clear()
        return {"events": events}

    def _disconnect(self, conn_id: str, p: dict[str, Any]) -> dict[str, Any]:
        return {}  # the disconnect itself follows the reply (see _control)

    def _update_presence(self, conn_id: str, p: dict[str, Any]) -> dict[str, Any]:
        if not self._presence_available():
            raise _Unsupported("presence is not enabled on this server")
        self.server.update_presence(conn_id, p.get("data"))
        return {}

    def _presence(self, conn_id: str, p: dict[str, Any]) -> dict[str, Any]:
        if not self._presence_available():
            raise _Unsupported("presence is not enabled on this server")
        topic = p.get("topic")
        if not isinstance(topic, str):
            raise _BadRequest("topic must be a string")
        return {"members": self.server.presence(topic), "stats": self.server.presence_stats(topic)}


def close_quietly(app: ReferenceApp | None, server: WSEServer | None) -> None:
    """Stop the app, then the server, ignoring errors (for shutdown paths)."""
    if app is not None:
        app.stop()
    if server is not None:
        with contextlib.suppress(Exception):
            server.stop()

"""Recovery inside the hub: stamped publications, recovery subscribes, the wire request.

:class:`ServerCore` owns one :class:`HubRecovery` when recovery is enabled and calls it
in a few places; this module holds the logic so the hub stays small. It is a friend of
``hub.py``: it reads the core's member table and queues output on its connections the
way the core itself does (under the same lock, which the caller holds).

- :meth:`HubRecovery.produce` makes the payload of a ``broadcast_local`` publication:
  category injected, and for a JSON object stamped and stored (PROTOCOL §13.2, F7). The
  returned bytes are the stored object: the fan-out frames and sends that very object.
- :meth:`HubRecovery.subscribe` is ``subscribe_with_recovery``: subscribe for live
  delivery, judge each topic on its own position (F10), queue the replays. It runs in
  one critical section with publications, so a replay (offsets up to head - 1) is
  followed directly by live messages from head on: each offset once, in order (F8,
  spec/RECOVERY_PRESENCE.md §1.5, "one-step replay").
- :meth:`HubRecovery.take_requests` answers a client's ``subscription_update`` with
  ``action: "subscribe"`` and ``recover: true`` itself (PROTOCOL §13.3) and takes it out
  of the application's inbound queue.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import orjson

from . import envelope
from ._defaults import RandFn
from .errors import DecodeError
from .recovery import (
    NOT_RECOVERABLE,
    RecoveryConfig,
    RecoveryOutcome,
    RecoveryStore,
    parse_epoch,
    parse_offset,
    parse_recovery_request,
    subscription_reply,
)
from .server import ConnectionState, Pending, ServerConnection
from .ws import binary_frame, text_frame

if TYPE_CHECKING:
    from .hub import ServerCore, _Member

__all__ = [
    "REQUEST_TYPE",
    "HubRecovery",
    "Position",
    "check_positions",
    "framed_size",
    "request_payload",
    "split_requests",
]

Position = tuple[str | None, int | None]
"""A client's ``(epoch, offset)`` for one topic; ``(None, None)``: not requested."""

REQUEST_TYPE: Final = "subscription_update"
_MARK: Final = REQUEST_TYPE.encode("ascii")
_OPEN: Final = ConnectionState.OPEN
_E_OVERHEAD: Final = 30
"""An ``E:`` frame adds the prefix, a 12-byte IV and a 16-byte tag to the plaintext."""

log = logging.getLogger("wse_proto.hub")


def framed_size(n: int, encrypted: bool) -> int:
    """Bytes that a replayed payload of ``n`` bytes adds to a connection's backlog: the
    WebSocket header, and for an encrypted connection the ``E:`` overhead (PROTOCOL §8)."""
    if encrypted:
        n += _E_OVERHEAD
    return n + (2 if n < 126 else 4 if n < 65536 else 10)


def _is_object(payload: bytes) -> bool:
    try:
        return type(orjson.loads(payload)) is dict
    except orjson.JSONDecodeError:
        return False


def check_positions(positions: Mapping[str, Position]) -> None:
    """Validate every requested position (DecodeError, nothing changed): an epoch is a hex
    u32 string, an offset an int in ``[0, 2**64 - 1]`` (spec/RECOVERY_PRESENCE.md §1.3)."""
    for epoch, offset in positions.values():
        if epoch is not None and offset is not None:
            parse_epoch(epoch)
            parse_offset(offset)


def request_payload(item: Pending) -> dict[str, Any] | None:
    """The ``p`` of a client's recovery request (``subscription_update`` with
    ``action: "subscribe"`` and ``recover: true``), or None for any other message."""
    obj: Any
    if type(item) is bytes:
        if _MARK not in item:
            return None
        try:
            obj = orjson.loads(item)
        except orjson.JSONDecodeError:  # pragma: no cover - the machine checked it parses
            return None
        if type(obj) is not dict:
            return None
        if "t" not in obj or "p" not in obj:
            obj = envelope.normalize_keys(obj)
    else:
        kind, _, obj = item
        if kind != "msg" or type(obj) is not dict:
            return None
    if obj.get("t") != REQUEST_TYPE:
        return None
    p = obj.get("p")
    if type(p) is not dict or p.get("action") != "subscribe" or p.get("recover") is not True:
        return None
    return p


def split_requests(items: list[Pending]) -> tuple[list[Pending], list[dict[str, Any]]] | None:
    """Separate recovery requests from the other received messages (order kept).

    None, after one cheap pass and without allocating, when there is none: the usual
    case on the inbound hot path.
    """
    for item in items:
        if type(item) is bytes:
            if _MARK in item:
                break
        elif item[0] == "msg":
            value = item[2]
            if type(value) is dict and value.get("t") == REQUEST_TYPE:
                break
    else:
        return None
    kept: list[Pending] = []
    requests: list[dict[str, Any]] = []
    for item in items:
        p = request_payload(item)
        if p is None:
            kept.append(item)
        else:
            requests.append(p)
    if not requests:
        return None
    return kept, requests


class HubRecovery:
    """The recovery store of one :class:`ServerCore` and what the hub delegates to it."""

    __slots__ = ("_core", "store", "wire")

    def __init__(
        self, core: ServerCore, config: RecoveryConfig, rand: RandFn, *, wire: bool
    ) -> None:
        self._core = core
        self.store = RecoveryStore(config, rand)
        self.wire = wire
        """Answer clients' recovery requests here (``recovery_wire_handling``)."""

    # ------------------------------------------------------------------ publishing

    def produce(self, topic: str, text: str, now: float) -> bytes:
        """The payload of one publication: category injected (§5.3), and, when it is
        one valid JSON object, stamped and stored (PROTOCOL §13.2). Anything else is
        delivered as it is and takes no offset (F7)."""
        injected = envelope.inject_category(text)
        payload = injected.encode("utf-8")
        # inject_category returns a new string only after parsing a JSON object, so
        # only an unchanged text needs its own check.
        if injected is text and not _is_object(payload):
            return payload
        stored = self.store.publish(topic, payload, now)
        return payload if stored is None else stored[0]

    # ------------------------------------------------------------------ recovery subscribe

    def subscribe(
        self,
        conn_id: str,
        topics: Sequence[str],
        positions: Mapping[str, Position],
        now: float,
    ) -> dict[str, RecoveryOutcome]:
        """Subscribe ``conn_id`` to ``topics`` for live delivery, then judge each topic
        with its own position and queue the replays (PROTOCOL §13.4, F8, F10).

        Raises RuntimeError at the subscription limit (nothing done), DecodeError for an
        invalid position after the live subscription was made (ref §7.3); the replays
        are queued only once every position was found valid.
        """
        core = self._core
        core.subscribe(conn_id, topics)
        check_positions(positions)
        member = core._members.get(conn_id)
        was_clean = core._clean()
        outcomes: dict[str, RecoveryOutcome] = {}
        for topic in topics:
            if topic not in outcomes:
                epoch, offset = positions.get(topic, (None, None))
                outcomes[topic] = self._judge(member, topic, epoch, offset, now)
        core._woken(was_clean)
        return outcomes

    def _judge(
        self,
        member: _Member | None,
        topic: str,
        epoch: str | None,
        offset: int | None,
        now: float,
    ) -> RecoveryOutcome:
        store = self.store
        if member is None or member.conn.state is not _OPEN:
            # ref §7.3: a connection that is gone gets the current position only.
            return store.recover(topic, None, None, now)
        acl = member.acl
        if topic not in member.topics or (acl is not None and not acl.is_allowed(topic)):
            return NOT_RECOVERABLE  # denied or dropped: nothing is revealed (no probing)
        outcome = store.recover(topic, epoch, offset, now)
        messages = outcome.messages
        if not messages:
            return outcome
        conn = member.conn
        encrypted = conn.encrypted
        need = 0
        for m in messages:
            need += framed_size(len(m), encrypted)
        if need > self._core._backlog_limit - conn.outbound_backlog:
            # All or nothing, like recovery_max_messages: never a truncated replay.
            return RecoveryOutcome(False, 0, True, outcome.epoch, outcome.offset)
        self._queue(conn, messages)
        return outcome

    def _queue(self, conn: ServerConnection, messages: list[bytes]) -> None:
        """The stored stamped texts as text frames (``E:`` on encrypted connections)."""
        send = conn.send_broadcast
        if conn.encrypted:
            for m in messages:
                send(m, m)  # the frame argument is unused: the payload is encrypted
        else:
            for m in messages:
                send(text_frame(m), m)
        core = self._core
        core.metrics.messages_sent += len(messages)
        core._dirty[conn.conn_id] = conn

    # ------------------------------------------------------------------ the wire request

    def take_requests(self, cid: str, items: list[Pending]) -> list[Pending]:
        """Answer the recovery requests among ``items`` (received from ``cid``) and
        return the other messages, for the application."""
        found = split_requests(items)
        if found is None:
            return items
        kept, requests = found
        member = self._core._members.get(cid)
        if member is not None:
            for p in requests:
                self._answer(member, p)
        return kept

    def _answer(self, member: _Member, p: dict[str, Any]) -> None:
        conn = member.conn
        if conn.state is not _OPEN:
            return
        try:
            request = parse_recovery_request(p)
        except DecodeError as exc:
            log.info("malformed recovery request from %s: %s", conn.conn_id, exc.message)
            self._reply(
                conn,
                {
                    "action": "subscribe",
                    "success": False,
                    "success_topics": [],
                    "failed_topics": [],
                    "error": exc.message,
                },
            )
            return
        topics = request.topics
        positions = {t: request.position(t) for t in topics}
        error: str | None = None
        try:
            outcomes = self.subscribe(conn.conn_id, topics, positions, conn._now)
        except RuntimeError as exc:  # the subscription limit (ref §10.2)
            error = str(exc)
            outcomes = dict.fromkeys(topics, NOT_RECOVERABLE)
        held = member.topics
        reply = subscription_reply(
            outcomes,
            success_topics=[t for t in topics if t in held],
            failed_topics=[t for t in topics if t not in held],
        )
        if request.invalid:
            reply["invalid"] = dict(request.invalid)
        if error is not None:
            reply["error"] = error
        self._reply(conn, reply)

    def _reply(self, conn: ServerConnection, reply: dict[str, Any]) -> None:
        """The answer is the ``subscription_update`` envelope an application would send
        with ``send_event`` (binary JSON frame, ``E:`` when encrypted; ref §3.4), but it
        is not rate limited: the transport answers, like ``server_hello``."""
        core = self._core
        built = envelope.build_event(
            {"t": REQUEST_TYPE, "p": reply},
            wall_ms=core._wall_ms(),
            rand=core._rand,
            seq=core._next_seq(),
        )
        payload = envelope.dumps_server(built)
        conn.send_broadcast(binary_frame(payload), payload)
        core.metrics.messages_sent += 1
        core._dirty[conn.conn_id] = conn

    # ------------------------------------------------------------------ housekeeping

    def next_deadline(self) -> float | None:
        return self.store.next_deadline()

    def expire(self, now: float) -> None:
        self.store.expire(now)

    def stats(self, now: float) -> tuple[int, int]:
        """``(topic buffers, stored bytes)`` for the health snapshot, TTL applied."""
        self.store.expire(now)
        return self.store.stats()

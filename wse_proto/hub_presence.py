"""Presence inside the hub: who joins and leaves, and the events that follow.

:class:`ServerCore` owns one :class:`HubPresence` when presence is enabled and calls it
from ``subscribe`` (join), ``unsubscribe`` and unregistering (leave), ``update_presence``
and the periodic sweep; this module holds the logic so the hub stays small. It is a
friend of ``hub.py``: it fans events out through the core's subscriber indexes, under
the lock the caller holds.

The user id is the JWT ``sub``, or the connection id on a connection without a JWT
identity (F11, PROTOCOL §14.1). Tracking does not depend on how the application takes
its events: callback mode and drain mode get the same events (the facade hands them
over differently).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

import orjson

from . import envelope
from .errors import LocalProtocolError
from .presence import UPDATE_FAILED, PresenceConfig, PresenceEvent, PresenceState
from .server import ServerConnection
from .ws import text_frame

if TYPE_CHECKING:
    from .hub import ServerCore

__all__ = ["SWEEP_INTERVAL", "HubPresence", "presence_user"]

SWEEP_INTERVAL: Final = 30.0
"""Seconds between sweeps of entries whose connection is gone (ref §8)."""

log = logging.getLogger("wse_proto.hub")


def presence_user(conn: ServerConnection) -> str:
    """The presence user id: the JWT ``sub``, else the connection id (F11)."""
    user = conn.user_id
    return conn.conn_id if user is None else user


class HubPresence:
    """The presence state of one :class:`ServerCore` and what the hub delegates to it."""

    __slots__ = ("_core", "_next_sweep", "state")

    def __init__(self, core: ServerCore, config: PresenceConfig, now: float) -> None:
        self._core = core
        self.state = PresenceState(config)
        self._next_sweep = now + SWEEP_INTERVAL

    # ------------------------------------------------------------------ operations

    def join(self, conn: ServerConnection, topics: Iterable[str], data: Any) -> bool:
        """``conn`` joins the presence of ``topics`` (already subscribed, ACL-filtered)
        with ``data``; returns whether events were queued for the application.

        Data too large or a topic at ``presence_max_members`` is not tracked, as in the
        original, but logged. Data that cannot be serialised raises LocalProtocolError
        before anything is tracked.
        """
        user = presence_user(conn)
        now_ms = self._core._wall_ms()
        events: list[PresenceEvent] = []
        for topic in topics:
            result = self.state.join(topic, user, conn.conn_id, data, now_ms)
            if result.rejected is not None:
                log.warning("presence of %r on %r not tracked: %s", user, topic, result.rejected)
            events += result.events
        return self.emit(events)

    def leave(self, conn_id: str, topics: Iterable[str] | None) -> bool:
        """``conn_id`` leaves ``topics`` (every topic when None: it disconnected)."""
        state = self.state
        now_ms = self._core._wall_ms()
        if topics is None:
            events = state.leave_all(conn_id, now_ms)
        else:
            events = []
            for topic in topics:
                events += state.leave(topic, conn_id, now_ms)
        return self.emit(events)

    def update(self, conn_id: str, data: Any) -> bool:
        """``update_presence``: replace the user's data on every topic where it has a
        local connection (ref §8). LocalProtocolError(UPDATE_FAILED) for data that is
        too large or a connection that is not registered."""
        member = self._core._members.get(conn_id)
        if member is None:
            raise LocalProtocolError(UPDATE_FAILED)
        user = presence_user(member.conn)
        events = self.state.update(conn_id, data, self._core._wall_ms(), user_id=user)
        return self.emit(events)

    def sweep(self, now: float) -> bool:
        """Every 30 s: entries whose connection is no longer registered leave (a safety
        net; unregistering already leaves), and old tombstones are pruned."""
        if now < self._next_sweep:
            return False
        self._next_sweep = now + SWEEP_INTERVAL
        core = self._core
        return self.emit(self.state.sweep(core._members, core._wall_ms()))

    def next_deadline(self) -> float:
        return self._next_sweep

    # ------------------------------------------------------------------ events

    def emit(self, events: list[PresenceEvent]) -> bool:
        """Send each notify event to the topic's current subscribers (exact and glob,
        one member per queue group; ``E:`` on encrypted connections, never stamped) and
        queue the drain tuple ``(kind, None, {"topic", "user_id", "data"})`` (ref §8).

        Returns whether drain tuples were queued (the caller announces them).
        """
        core = self._core
        if events and core.on_presence_sync is not None:
            core.on_presence_sync(events)  # the sync events go to cluster peers (§8.6)
        queued = False
        for ev in events:
            if not ev.notify:
                continue  # cluster-only (sync) events
            topic = ev.topic
            payload = envelope.presence_event(ev.kind, ev.user_id, ev.data)
            targets = core._targets(topic)
            groups = core._groups.get(topic)
            if targets or groups:
                frame = text_frame(payload)
                if targets:
                    core._fan_out(targets, frame, payload)
                if groups:
                    core._deliver_groups(groups, frame, payload)
            value = {"topic": topic, "user_id": ev.user_id, "data": orjson.loads(ev.data_json)}
            core._push("", (ev.kind, None, value))
            queued = True
        return queued

"""Presence state: who is on which topic, here and on other cluster nodes.

Pure: operations take ``now_ms`` (wall-clock milliseconds, the ``updated_at`` of the
wire) and return the :class:`PresenceEvent` list to emit; nothing is sent from here.
Semantics and decisions: spec/RECOVERY_PRESENCE.md; wire view: PROTOCOL §14.

Model. Per topic and user, every *origin* that knows the user holds one record made
of two last-write-wins registers: membership (present or not, with a timestamp) and
data (a timestamp and the canonical JSON bytes). This node's own record follows its
local connections; other nodes' records come from PRESENCE_UPDATE / PRESENCE_FULL.
A user is present when some origin says so; the visible data is the greatest
``(updated_at, canonical JSON bytes)`` among the present origins. Registers merge
with a total order, so nodes that receive the same updates in any order end with
the same view, and one origin's leave never erases a user another origin still has.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, NamedTuple

import orjson

from .envelope import dumps_server
from .errors import LocalProtocolError

__all__ = [
    "JOIN",
    "LEAVE",
    "REMOTE_PREFIX",
    "UPDATE",
    "JoinResult",
    "PresenceConfig",
    "PresenceEvent",
    "PresenceState",
    "remote_sentinel",
]

JOIN: Final = "presence_join"
LEAVE: Final = "presence_leave"
UPDATE: Final = "presence_update"
_ACTIONS: Final[dict[int | str, str]] = {
    0: JOIN,
    1: LEAVE,
    2: UPDATE,
    "join": JOIN,
    "leave": LEAVE,
    "update": UPDATE,
    JOIN: JOIN,
    LEAVE: LEAVE,
    UPDATE: UPDATE,
}
_ACTION_CODES: Final = {JOIN: 0, LEAVE: 1, UPDATE: 2}
REMOTE_PREFIX: Final = "__remote__"
_NO_TS: Final = -1
UPDATE_FAILED: Final = "Failed to update presence data (size limit or unknown connection)"

EventKind = Literal["presence_join", "presence_leave", "presence_update"]


def remote_sentinel(origin: str, user_id: str) -> str:
    """The connection id standing for ``origin``'s connections of a user (ref §9.6)."""
    return REMOTE_PREFIX + origin + "\x1f" + user_id


@dataclass(frozen=True, slots=True)
class PresenceConfig:
    """``max_data_size`` caps the compact JSON of the data; ``max_members`` (0 = no
    limit) caps the users per topic (ref §8). ``tombstone_ms``: how long the record
    of a user who left is kept to order late cluster updates (pruned by the sweep)."""

    max_data_size: int = 4096
    max_members: int = 0
    tombstone_ms: int = 60_000

    def __post_init__(self) -> None:
        if isinstance(self.max_data_size, bool) or self.max_data_size < 0:
            raise ValueError(f"max_data_size must be >= 0, got {self.max_data_size!r}")
        if isinstance(self.max_members, bool) or self.max_members < 0:
            raise ValueError(f"max_members must be >= 0, got {self.max_members!r}")
        if isinstance(self.tombstone_ms, bool) or self.tombstone_ms < 0:
            raise ValueError(f"tombstone_ms must be >= 0, got {self.tombstone_ms!r}")


@dataclass(frozen=True, slots=True)
class PresenceEvent:
    """Something to emit. ``notify``: send ``kind`` to the topic's subscribers here
    (and the drain queue); ``sync``: send PRESENCE_UPDATE to cluster peers, with
    ``updated_at`` and ``data`` (this node's own record). ``data`` is shared with the
    state: serialise it, don't mutate it; ``data_json`` is its canonical JSON."""

    kind: EventKind
    topic: str
    user_id: str
    data: Any
    data_json: bytes
    updated_at: int
    notify: bool
    sync: bool

    @property
    def action(self) -> int:
        """PRESENCE_UPDATE action code (0 join, 1 leave, 2 update; ref §9.2)."""
        return _ACTION_CODES[self.kind]


class JoinResult(NamedTuple):
    """Events of a join, and why it was not tracked (None when it was)."""

    events: list[PresenceEvent]
    rejected: Literal["data_too_large", "max_members"] | None = None


class _Record:
    """One origin's view of one user on one topic: two LWW registers."""

    __slots__ = ("d_ts", "data", "data_json", "m_ts", "present")

    def __init__(self) -> None:
        self.present = False
        self.m_ts = _NO_TS
        self.d_ts = _NO_TS
        self.data_json = b""
        self.data: Any = None

    def last_ts(self) -> int:
        return max(self.m_ts, self.d_ts)

    def write_data(self, ts: int, data_json: bytes, data: Any) -> bool:
        if (ts, data_json) > (self.d_ts, self.data_json):
            self.d_ts = ts
            self.data_json = data_json
            self.data = data
            return True
        return False

    def write_member(self, ts: int, present: bool) -> None:
        # Ties go to the leave (the original applies a leave with an equal timestamp).
        if ts > self.m_ts or (ts == self.m_ts and not present):
            self.m_ts = ts
            self.present = present


class _Entry:
    """A user on a topic: local connections, this node's record, other origins' records,
    and the cached visible state."""

    __slots__ = ("data", "data_json", "local", "mine", "nconns", "present", "remote", "updated_at")

    def __init__(self) -> None:
        self.local: dict[str, None] = {}
        self.mine: _Record | None = None
        self.remote: dict[str, _Record] = {}
        self.present = False
        self.nconns = 0
        self.data: Any = None
        self.data_json = b""
        self.updated_at = _NO_TS

    def refresh(self) -> None:
        best: _Record | None = None
        count = len(self.local)
        mine = self.mine
        if mine is not None and mine.present:
            best = mine
        for rec in self.remote.values():
            if rec.present:
                count += 1
                if best is None or (rec.d_ts, rec.data_json) > (best.d_ts, best.data_json):
                    best = rec
        self.nconns = count
        if best is None:
            self.present = False
            self.data = None
            self.data_json = b""
            self.updated_at = _NO_TS
        else:
            self.present = True
            self.data = best.data
            self.data_json = best.data_json
            self.updated_at = best.d_ts

    def empty(self) -> bool:
        return not self.local and self.mine is None and not self.remote


class _Topic:
    __slots__ = ("conns", "entries", "users")

    def __init__(self) -> None:
        self.entries: dict[str, _Entry] = {}
        self.users = 0
        self.conns = 0


class _Conn:
    """A local connection's presence: its user id and the topics it joined."""

    __slots__ = ("topics", "user_id")

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        self.topics: dict[str, None] = {}


class PresenceState:
    """All presence of one server (PROTOCOL §14). See the module docstring."""

    __slots__ = (
        "_active",
        "_conns",
        "_origins",
        "_tombs",
        "_topics",
        "_total_users",
        "_user_topics",
        "config",
    )

    def __init__(self, config: PresenceConfig | None = None) -> None:
        self.config = config if config is not None else PresenceConfig()
        self._topics: dict[str, _Topic] = {}
        self._conns: dict[str, _Conn] = {}
        self._user_topics: dict[str, dict[str, None]] = {}  # topics with local conns
        self._origins: dict[str, dict[tuple[str, str], None]] = {}
        self._tombs: deque[tuple[int, str, str, str | None]] = deque()  # (ts, topic, user, origin)
        self._active = 0  # topics with at least one present user
        self._total_users = 0

    # ------------------------------------------------------------------ helpers

    def _encode(self, data: Any) -> tuple[bytes, Any] | None:
        """Canonical JSON (keys sorted, compact) and its decoded copy; None if too large."""
        data_json = dumps_server(data)
        if len(data_json) > self.config.max_data_size:
            return None
        return data_json, orjson.loads(data_json)

    def _begin(self, topic: str, user_id: str) -> tuple[_Topic, _Entry] | None:
        t = self._topics.get(topic)
        if t is None:
            return None
        entry = t.entries.get(user_id)
        return None if entry is None else (t, entry)

    def _ensure(self, topic: str, user_id: str) -> tuple[_Topic, _Entry]:
        t = self._topics.get(topic)
        if t is None:
            t = self._topics[topic] = _Topic()
        entry = t.entries.get(user_id)
        if entry is None:
            entry = t.entries[user_id] = _Entry()
        return t, entry

    def _has_room(self, topic: str, user_id: str) -> bool:
        """``max_members`` applies to users not yet present (ref §8 edge cases)."""
        limit = self.config.max_members
        if not limit:
            return True
        t = self._topics.get(topic)
        if t is None or t.users < limit:
            return True
        entry = t.entries.get(user_id)
        return entry is not None and entry.present

    def _finish(
        self,
        topic: str,
        user_id: str,
        t: _Topic,
        entry: _Entry,
        was_present: bool,
        was_conns: int,
        was_json: bytes,
        was_data: Any,
        was_ts: int,
        out: list[PresenceEvent],
    ) -> None:
        """Recompute the visible state, keep the counters, append the notify event."""
        entry.refresh()
        now_present = entry.present
        t.conns += entry.nconns - was_conns
        if now_present != was_present:
            delta = 1 if now_present else -1
            t.users += delta
            self._total_users += delta
            if t.users == (1 if now_present else 0):
                self._active += delta
        if now_present and not was_present:
            out.append(self._event(JOIN, topic, user_id, entry, notify=True))
        elif was_present and not now_present:
            out.append(
                PresenceEvent(
                    LEAVE, topic, user_id, was_data, was_json, entry.updated_at, True, False
                )
            )
        elif now_present and entry.data_json != was_json:
            out.append(self._event(UPDATE, topic, user_id, entry, notify=True))
        if entry.empty():
            del t.entries[user_id]
            if not t.entries:
                del self._topics[topic]

    @staticmethod
    def _event(
        kind: EventKind, topic: str, user_id: str, entry: _Entry, *, notify: bool
    ) -> PresenceEvent:
        return PresenceEvent(
            kind, topic, user_id, entry.data, entry.data_json, entry.updated_at, notify, False
        )

    @staticmethod
    def _local_ts(entry: _Entry, now_ms: int) -> int:
        """This node's writes get strictly increasing timestamps, so peers always
        take them (whatever the wall clock did)."""
        mine = entry.mine
        return now_ms if mine is None else max(now_ms, mine.last_ts() + 1)

    @staticmethod
    def _merge_sync(out: list[PresenceEvent], sync: PresenceEvent) -> None:
        """Fold the peer notification into an identical local one, else append it."""
        for i, ev in enumerate(out):
            if ev.kind == sync.kind and ev.data_json == sync.data_json and not ev.sync:
                out[i] = PresenceEvent(
                    ev.kind,
                    ev.topic,
                    ev.user_id,
                    ev.data,
                    ev.data_json,
                    sync.updated_at,
                    ev.notify,
                    True,
                )
                return
        out.append(sync)

    # ------------------------------------------------------------------ local operations

    def join(self, topic: str, user_id: str, conn_id: str, data: Any, now_ms: int) -> JoinResult:
        """A local connection joins ``topic``'s presence with ``data`` (ref §8).

        The user's first local connection emits ``presence_join`` (to local
        subscribers when the user was not present through another node either);
        later tabs emit nothing locally, and replace the data when ``now_ms`` is not
        older than the entry's. Data too large, or a new user beyond ``max_members``,
        is not tracked: the result says why.
        """
        conn = self._conns.get(conn_id)
        if conn is not None and conn.user_id != user_id:
            raise LocalProtocolError(
                f"connection {conn_id!r} has presence as {conn.user_id!r}, not {user_id!r}"
            )
        encoded = self._encode(data)
        if encoded is None:
            return JoinResult([], "data_too_large")
        data_json, value = encoded
        if not self._has_room(topic, user_id):
            return JoinResult([], "max_members")
        t, entry = self._ensure(topic, user_id)
        was = (entry.present, entry.nconns, entry.data_json, entry.data, entry.updated_at)
        first_local = not entry.local
        sync: PresenceEvent | None = None
        if first_local or now_ms >= entry.updated_at:
            ts = self._local_ts(entry, now_ms)
            if not first_local:
                ts = max(ts, entry.updated_at + 1)  # a later tab's data replaces (ref §8)
            mine = entry.mine
            if mine is None:
                mine = entry.mine = _Record()
            mine.write_member(ts, True)
            mine.write_data(ts, data_json, value)
            sync = PresenceEvent(JOIN, topic, user_id, value, data_json, ts, False, True)
        if conn_id not in entry.local:
            entry.local[conn_id] = None
            if conn is None:
                conn = self._conns[conn_id] = _Conn(user_id)
            conn.topics[topic] = None
            self._user_topics.setdefault(user_id, {})[topic] = None
        out: list[PresenceEvent] = []
        self._finish(topic, user_id, t, entry, *was, out)
        if not first_local:
            out.clear()  # later tabs produce nothing for local subscribers (ref §8)
        if sync is not None:
            self._merge_sync(out, sync)
        return JoinResult(out)

    def leave(self, topic: str, conn_id: str, now_ms: int) -> list[PresenceEvent]:
        """A local connection leaves ``topic``; the user's last local connection emits
        ``presence_leave`` with the entry's current data (ref §8)."""
        conn = self._conns.get(conn_id)
        if conn is None or topic not in conn.topics:
            return []
        del conn.topics[topic]
        if not conn.topics:
            del self._conns[conn_id]
        user_id = conn.user_id
        found = self._begin(topic, user_id)
        assert found is not None  # the connection index and the entries agree
        t, entry = found
        was = (entry.present, entry.nconns, entry.data_json, entry.data, entry.updated_at)
        del entry.local[conn_id]
        out: list[PresenceEvent] = []
        sync: PresenceEvent | None = None
        if not entry.local:
            topics = self._user_topics[user_id]
            del topics[topic]
            if not topics:
                del self._user_topics[user_id]
            mine = entry.mine
            assert mine is not None
            ts = self._local_ts(entry, now_ms)
            mine.write_member(ts, False)
            self._tombs.append((ts, topic, user_id, None))
            sync = PresenceEvent(LEAVE, topic, user_id, mine.data, mine.data_json, ts, False, True)
        self._finish(topic, user_id, t, entry, *was, out)
        if sync is not None:
            self._merge_sync(out, sync)
        return out

    def leave_all(self, conn_id: str, now_ms: int) -> list[PresenceEvent]:
        """Disconnect: leave every topic the connection joined."""
        conn = self._conns.get(conn_id)
        if conn is None:
            return []
        out: list[PresenceEvent] = []
        for topic in list(conn.topics):
            out.extend(self.leave(topic, conn_id, now_ms))
        return out

    def update(
        self, conn_id: str, data: Any, now_ms: int, *, user_id: str | None = None
    ) -> list[PresenceEvent]:
        """Replace the data of the connection's user on every topic where the user has
        a local connection; one ``presence_update`` per topic (ref §8).

        Data too large raises LocalProtocolError (the server answers with the
        original's RuntimeError). A connection without presence uses ``user_id`` if
        given; with neither, or no topics, nothing happens.
        """
        encoded = self._encode(data)
        if encoded is None:
            raise LocalProtocolError(UPDATE_FAILED)
        data_json, value = encoded
        conn = self._conns.get(conn_id)
        user = conn.user_id if conn is not None else user_id
        if user is None:
            return []
        out: list[PresenceEvent] = []
        for topic in list(self._user_topics.get(user, ())):
            found = self._begin(topic, user)
            assert found is not None
            t, entry = found
            mine = entry.mine
            assert mine is not None
            was = (entry.present, entry.nconns, entry.data_json, entry.data, entry.updated_at)
            ts = max(self._local_ts(entry, now_ms), entry.updated_at + 1)
            mine.write_data(ts, data_json, value)
            entry.refresh()
            t.conns += entry.nconns - was[1]
            out.append(PresenceEvent(UPDATE, topic, user, value, data_json, ts, True, True))
        return out

    def sweep(self, alive_conn_ids: Iterable[str], now_ms: int = 0) -> list[PresenceEvent]:
        """Remove local connections that are no longer alive (leave events for each);
        other nodes' sentinels are untouched (ref §8). Also prunes tombstones older
        than ``tombstone_ms`` (given a real ``now_ms``)."""
        alive = (
            alive_conn_ids
            if isinstance(alive_conn_ids, set | frozenset | dict)
            else set(alive_conn_ids)
        )
        out: list[PresenceEvent] = []
        for conn_id in [c for c in self._conns if c not in alive]:
            out.extend(self.leave_all(conn_id, now_ms))
        if now_ms > 0:
            self.prune_tombstones(now_ms - self.config.tombstone_ms)
        return out

    # ------------------------------------------------------------------ cluster merge

    def merge_remote(
        self,
        origin: str,
        topic: str,
        action: int | str,
        user_id: str,
        data: Any,
        updated_at: int,
    ) -> list[PresenceEvent]:
        """Apply a PRESENCE_UPDATE from ``origin`` (ref §9.6, with our merge rules).

        join writes the origin's membership (present) and data, leave its membership
        (absent; ties go to the leave), update its data only, each only if newer.
        Events go to local subscribers only when the visible state changes: a join
        when the user becomes present here, a leave when no origin has the user any
        more, an update when the visible data changes. Unknown actions are ignored;
        so are join/update data over ``max_data_size`` and joins of a new user beyond
        ``max_members``.
        """
        kind = _ACTIONS.get(action) if isinstance(action, int | str) else None
        if kind is None or not isinstance(origin, str) or not isinstance(user_id, str):
            return []
        if isinstance(updated_at, bool) or not isinstance(updated_at, int) or updated_at < 0:
            return []
        encoded: tuple[bytes, Any] | None = None
        if kind != LEAVE:
            encoded = self._encode(data)
            if encoded is None:
                return []
        if kind == JOIN and not self._has_room(topic, user_id):
            return []
        t, entry = self._ensure(topic, user_id)
        was = (entry.present, entry.nconns, entry.data_json, entry.data, entry.updated_at)
        rec = entry.remote.get(origin)
        if rec is None:
            rec = entry.remote[origin] = _Record()
            self._origins.setdefault(origin, {})[(topic, user_id)] = None
        if kind == LEAVE:
            rec.write_member(updated_at, False)
        else:
            assert encoded is not None
            rec.write_data(updated_at, *encoded)
            if kind == JOIN:
                rec.write_member(updated_at, True)
        if not rec.present:
            self._tombs.append((rec.last_ts(), topic, user_id, origin))
        out: list[PresenceEvent] = []
        self._finish(topic, user_id, t, entry, *was, out)
        return out

    def merge_full(self, origin: str, snapshot: object) -> list[PresenceEvent]:
        """Merge a PRESENCE_FULL payload ``{topic: {user: {"data", "updated_at"}}}`` with
        the join rule (missing ``updated_at`` = 0); malformed parts are skipped. The
        original emits no local events here; we return the same visible-change events
        as :meth:`merge_remote` (the server may drop them)."""
        out: list[PresenceEvent] = []
        if not isinstance(snapshot, Mapping):
            return out
        for topic, users in snapshot.items():
            if not isinstance(topic, str) or not isinstance(users, Mapping):
                continue
            for user_id, item in users.items():
                if not isinstance(user_id, str) or not isinstance(item, Mapping):
                    continue
                ts = item.get("updated_at", 0)
                out.extend(self.merge_remote(origin, topic, JOIN, user_id, item.get("data"), ts))
        return out

    def purge_origin(self, origin: str) -> list[PresenceEvent]:
        """Forget everything ``origin`` told us (its link is gone); leave events for the
        users only it had."""
        keys = self._origins.pop(origin, None)
        out: list[PresenceEvent] = []
        if not keys:
            return out
        for topic, user_id in keys:
            found = self._begin(topic, user_id)
            if found is None:
                continue
            t, entry = found
            was = (entry.present, entry.nconns, entry.data_json, entry.data, entry.updated_at)
            if entry.remote.pop(origin, None) is not None:
                self._finish(topic, user_id, t, entry, *was, out)
        return out

    def prune_tombstones(self, before_ms: int) -> int:
        """Forget records of absent users last written before ``before_ms``; they only
        exist to order late, reordered updates. Returns how many were dropped."""
        tombs = self._tombs
        dropped = 0
        while tombs and tombs[0][0] < before_ms:
            _, topic, user_id, origin = tombs.popleft()
            found = self._begin(topic, user_id)
            if found is None:
                continue
            t, entry = found
            if origin is None:
                rec = entry.mine
                if rec is None or entry.local or not _stale(rec, before_ms):
                    continue
                entry.mine = None
            else:
                rec = entry.remote.get(origin)
                if rec is None or not _stale(rec, before_ms):
                    continue
                del entry.remote[origin]
                keys = self._origins.get(origin)
                if keys is not None:
                    keys.pop((topic, user_id), None)
                    if not keys:
                        del self._origins[origin]
            dropped += 1
            if entry.empty():
                del t.entries[user_id]
                if not t.entries:
                    del self._topics[topic]
        return dropped

    def full_snapshot(self) -> dict[str, dict[str, dict[str, Any]]]:
        """PRESENCE_FULL content: users with a local connection, with this node's data."""
        snap: dict[str, dict[str, dict[str, Any]]] = {}
        for topic, t in self._topics.items():
            users = {
                user_id: {"data": entry.mine.data, "updated_at": entry.mine.d_ts}
                for user_id, entry in t.entries.items()
                if entry.local and entry.mine is not None
            }
            if users:
                snap[topic] = users
        return snap

    # ------------------------------------------------------------------ queries

    def members(self, topic: str) -> dict[str, dict[str, Any]]:
        """``{user_id: {"data": ..., "connections": n}}``; n counts one sentinel per
        other node that has the user (ref §8). The data are fresh copies."""
        t = self._topics.get(topic)
        if t is None:
            return {}
        return {
            user_id: {"data": orjson.loads(entry.data_json), "connections": entry.nconns}
            for user_id, entry in t.entries.items()
            if entry.present
        }

    def connections(self, topic: str, user_id: str) -> set[str]:
        """Local connection ids and remote sentinels holding the user on the topic."""
        found = self._begin(topic, user_id)
        if found is None:
            return set()
        entry = found[1]
        conns = set(entry.local)
        conns.update(remote_sentinel(o, user_id) for o, r in entry.remote.items() if r.present)
        return conns

    def stats(self, topic: str) -> dict[str, int]:
        """``{"num_users", "num_connections"}`` in O(1); zeros for an unknown topic."""
        t = self._topics.get(topic)
        if t is None:
            return {"num_users": 0, "num_connections": 0}
        return {"num_users": t.users, "num_connections": t.conns}

    def topic_count(self) -> int:
        """Topics with at least one present user (health ``presence_topics``)."""
        return self._active

    def total_users(self) -> int:
        """Present (topic, user) pairs (health ``presence_total_users``)."""
        return self._total_users

    def user_of(self, conn_id: str) -> str | None:
        conn = self._conns.get(conn_id)
        return None if conn is None else conn.user_id

    def topics_of(self, conn_id: str) -> list[str]:
        conn = self._conns.get(conn_id)
        return [] if conn is None else list(conn.topics)


def _stale(rec: _Record, before_ms: int) -> bool:
    return not rec.present and rec.last_ts() < before_ms

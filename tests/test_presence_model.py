"""Model-based tests of presence (ref §8, §9.6; spec/RECOVERY_PRESENCE.md).

1. A single node against a plain reference of the original's rules: first tab joins,
   last tab leaves, later tabs are silent, updates hit every topic of the user, the
   sweep removes dead connections; members, stats and the O(1) counters agree.
2. Convergence: several nodes make local changes, every sync event reaches every
   other node in an arbitrary order (across and within origins), and all nodes end
   with the same view; pure observers even agree on connection counts. The events a
   node emits describe its view exactly (join once, leave once, updates in between).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from wse_proto.errors import LocalProtocolError
from wse_proto.presence import (
    JOIN,
    LEAVE,
    UPDATE,
    PresenceConfig,
    PresenceEvent,
    PresenceState,
)

TOPICS = ("t1", "t2", "t3")
CONN_USER = {"c1": "alice", "c2": "alice", "c3": "bob", "c4": "carol", "c5": "bob"}
datas = st.sampled_from(
    [{}, {"s": "on"}, {"s": "away"}, {"n": 1}, {"n": [1, 2]}, {"big": "x" * 40}]
)

# --------------------------------------------------------------------------- single node


@dataclass
class RefUser:
    conns: set[str] = field(default_factory=set)
    data: Any = None
    ts: int = 0
    announced: Any = None  # what subscribers last heard (later tabs change data silently)


class LocalPresenceMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.state = PresenceState(PresenceConfig(max_data_size=30, max_members=2))
        self.ref: dict[str, dict[str, RefUser]] = {t: {} for t in TOPICS}
        self.now = 1000
        self.view: dict[str, dict[str, Any]] = {t: {} for t in TOPICS}  # built from events

    def tick(self) -> int:
        self.now += 1
        return self.now

    def apply(self, events: list[PresenceEvent]) -> list[tuple[str, str, str, Any]]:
        """Replay the notify events on a subscriber's view; returns them compactly."""
        out = []
        for e in events:
            assert e.sync, "single node: every local change is also for peers"
            if not e.notify:
                continue
            view = self.view[e.topic]
            if e.kind == JOIN:
                assert e.user_id not in view, "join only for a user not present"
                view[e.user_id] = e.data
            elif e.kind == LEAVE:
                assert e.user_id in view
                del view[e.user_id]
            else:
                assert e.user_id in view
                view[e.user_id] = e.data
            out.append((e.kind, e.topic, e.user_id, e.data))
        return out

    @rule(topic=st.sampled_from(TOPICS), conn=st.sampled_from(sorted(CONN_USER)), data=datas)
    def join(self, topic: str, conn: str, data: Any) -> None:
        user = CONN_USER[conn]
        now = self.tick()
        res = self.state.join(topic, user, conn, data, now)
        users = self.ref[topic]
        if len(orjson.dumps(data)) > 30:
            assert res.rejected == "data_too_large" and res.events == []
            return
        if user not in users and len(users) >= 2:
            assert res.rejected == "max_members" and res.events == []
            return
        assert res.rejected is None
        got = self.apply(res.events)
        entry = users.get(user)
        if entry is None:
            users[user] = RefUser({conn}, data, now, data)
            assert got == [(JOIN, topic, user, data)]
        else:
            entry.conns.add(conn)
            if now >= entry.ts:
                entry.data, entry.ts = data, now
            assert got == []

    @rule(topic=st.sampled_from(TOPICS), conn=st.sampled_from(sorted(CONN_USER)))
    def leave(self, topic: str, conn: str) -> None:
        got = self.apply(self.state.leave(topic, conn, self.tick()))
        self.expect_leave(topic, conn, got)

    def expect_leave(self, topic: str, conn: str, got: list[tuple[str, str, str, Any]]) -> None:
        user = CONN_USER[conn]
        entry = self.ref[topic].get(user)
        if entry is None or conn not in entry.conns:
            assert got == []
            return
        entry.conns.discard(conn)
        if entry.conns:
            assert got == []
        else:
            del self.ref[topic][user]
            assert got == [(LEAVE, topic, user, entry.data)]

    @rule(conn=st.sampled_from(sorted(CONN_USER)))
    def disconnect(self, conn: str) -> None:
        got = self.apply(self.state.leave_all(conn, self.tick()))
        expected: list[tuple[str, str, str, Any]] = []
        for topic in TOPICS:
            before = len(expected)
            user = CONN_USER[conn]
            entry = self.ref[topic].get(user)
            if entry is not None and conn in entry.conns:
                entry.conns.discard(conn)
                if not entry.conns:
                    del self.ref[topic][user]
                    expected.append((LEAVE, topic, user, entry.data))
            assert len(expected) - before <= 1
        assert sorted(got) == sorted(expected)

    @rule(conn=st.sampled_from(sorted(CONN_USER)), data=datas)
    def update(self, conn: str, data: Any) -> None:
        now = self.tick()
        user = CONN_USER[conn]
        if len(orjson.dumps(data)) > 30:
            with pytest.raises(LocalProtocolError):
                self.state.update(conn, data, now, user_id=user)
            return
        got = self.apply(self.state.update(conn, data, now, user_id=user))
        expected = []
        for topic in TOPICS:
            entry = self.ref[topic].get(user)
            if entry is not None:
                entry.data, entry.ts, entry.announced = data, now, data
                expected.append((UPDATE, topic, user, data))
        assert sorted(got) == sorted(expected)

    @rule(alive=st.sets(st.sampled_from(sorted(CONN_USER))))
    def sweep(self, alive: set[str]) -> None:
        got = self.apply(self.state.sweep(alive, self.tick()))
        expected: list[tuple[str, str, str, Any]] = []
        for topic in TOPICS:
            for user in list(self.ref[topic]):
                entry = self.ref[topic][user]
                entry.conns &= alive
                if not entry.conns:
                    del self.ref[topic][user]
                    expected.append((LEAVE, topic, user, entry.data))
        assert sorted(got) == sorted(expected)

    @invariant()
    def agrees(self) -> None:
        users_total = 0
        active = 0
        for topic in TOPICS:
            ref = self.ref[topic]
            expected = {u: {"data": e.data, "connections": len(e.conns)} for u, e in ref.items()}
            assert self.state.members(topic) == expected
            assert self.state.stats(topic) == {
                "num_users": len(ref),
                "num_connections": sum(len(e.conns) for e in ref.values()),
            }
            assert self.view[topic] == {u: e.announced for u, e in ref.items()}
            for user, e in ref.items():
                assert self.state.connections(topic, user) == e.conns
            users_total += len(ref)
            active += bool(ref)
        assert self.state.total_users() == users_total and self.state.topic_count() == active
        for conn, user in CONN_USER.items():
            topics = [t for t in TOPICS if conn in self.ref[t].get(user, RefUser()).conns]
            assert sorted(self.state.topics_of(conn)) == topics

    @rule()
    def prune(self) -> None:
        self.state.prune_tombstones(self.now + 1)  # never changes what is visible


LocalPresenceMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
TestLocalPresence = LocalPresenceMachine.TestCase


# --------------------------------------------------------------------------- convergence


@dataclass(frozen=True)
class Msg:
    origin: str
    topic: str
    action: int
    user: str
    data: Any
    ts: int


def sync_messages(origin: str, events: list[PresenceEvent]) -> list[Msg]:
    return [
        Msg(origin, e.topic, e.action, e.user_id, e.data, e.updated_at) for e in events if e.sync
    ]


class EventView:
    """A subscriber of one node: its view built only from that node's notify events."""

    def __init__(self) -> None:
        self.view: dict[str, dict[str, Any]] = {}

    def apply(self, events: list[PresenceEvent]) -> None:
        for e in events:
            if not e.notify:
                continue
            view = self.view.setdefault(e.topic, {})
            if e.kind == JOIN:
                assert e.user_id not in view, "duplicate presence_join"
                view[e.user_id] = e.data
            elif e.kind == LEAVE:
                assert e.user_id in view, "leave of a user not present"
                del view[e.user_id]
            else:
                assert e.user_id in view, "update of a user not present"
                view[e.user_id] = e.data

    def matches(self, state: PresenceState, *, data: bool = True) -> None:
        """Same users; same data too unless local later tabs changed it silently (ref §8)."""
        for topic in TOPICS:
            members = {u: m["data"] for u, m in state.members(topic).items()}
            view = self.view.get(topic, {})
            assert view == members if data else view.keys() == members.keys()


local_ops = st.lists(
    st.tuples(
        st.integers(0, 2),  # node
        st.sampled_from(["join", "join", "leave", "update", "disconnect"]),
        st.sampled_from(TOPICS),
        st.sampled_from(sorted(CONN_USER)),
        datas,
        st.integers(-3, 3),  # clock step: equal and backwards times included
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=local_ops, data=st.data())
def test_nodes_converge_whatever_the_delivery_order(
    ops: list[tuple[Any, ...]], data: st.DataObject
) -> None:
    names = ["n0", "n1", "n2"]
    nodes = [PresenceState(PresenceConfig(max_data_size=30)) for _ in names]
    subscribers = [EventView() for _ in names]
    outbox: list[Msg] = []
    clock = 1000
    for node, op, topic, conn, value, step in ops:
        clock += step
        state = nodes[node]
        conn_id = f"{names[node]}:{conn}"
        user = CONN_USER[conn]
        if op == "join":
            events = state.join(topic, user, conn_id, value, clock).events
        elif op == "leave":
            events = state.leave(topic, conn_id, clock)
        elif op == "update":
            try:
                events = state.update(conn_id, value, clock)
            except LocalProtocolError:  # oversize data: nothing changes
                events = []
        else:
            events = state.leave_all(conn_id, clock)
        subscribers[node].apply(events)
        outbox.extend(sync_messages(names[node], events))
    # every node receives every other node's messages, in its own arbitrary order
    for i, state in enumerate(nodes):
        inbox = [m for m in outbox if m.origin != names[i]]
        for m in data.draw(st.permutations(inbox), label=f"order at {names[i]}"):
            events = state.merge_remote(m.origin, m.topic, m.action, m.user, m.data, m.ts)
            assert not any(e.sync for e in events), "merged changes are not re-forwarded"
            subscribers[i].apply(events)
    views = [{t: {u: m["data"] for u, m in n.members(t).items()} for t in TOPICS} for n in nodes]
    assert views[0] == views[1] == views[2]
    for state, sub in zip(nodes, subscribers):
        sub.matches(state, data=False)
    # a user's connection count here = local tabs + one per other node that has a tab

    def tabs(j: int, topic: str, user: str) -> int:
        return sum(
            topic in nodes[j].topics_of(f"{names[j]}:{c}")
            for c, u in CONN_USER.items()
            if u == user
        )

    for i, state in enumerate(nodes):
        for topic in TOPICS:
            for user, member in state.members(topic).items():
                others = sum(1 for j in range(len(nodes)) if j != i and tabs(j, topic, user))
                assert member["connections"] == tabs(i, topic, user) + others


remote_msgs = st.lists(
    st.builds(
        Msg,
        origin=st.sampled_from(["A", "B", "C"]),
        topic=st.sampled_from(TOPICS[:2]),
        action=st.sampled_from([0, 0, 1, 2]),
        user=st.sampled_from(["u", "v"]),
        data=datas,
        ts=st.integers(0, 6),  # few values: plenty of ties
    ),
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(msgs=remote_msgs, data=st.data())
def test_observers_agree_on_everything_including_counts(
    msgs: list[Msg], data: st.DataObject
) -> None:
    observers = [PresenceState(PresenceConfig(max_data_size=30)) for _ in range(3)]
    subscribers = [EventView() for _ in observers]
    use_full = data.draw(st.booleans(), label="deliver joins of A as PRESENCE_FULL")
    for state, sub in zip(observers, subscribers):
        order = data.draw(st.permutations(msgs))
        for m in order:
            if use_full and m.origin == "A" and m.action == 0:
                events = state.merge_full(
                    "A", {m.topic: {m.user: {"data": m.data, "updated_at": m.ts}}}
                )
            else:
                events = state.merge_remote(m.origin, m.topic, m.action, m.user, m.data, m.ts)
            sub.apply(events)
            # applying a message twice changes nothing (at-least-once links)
            assert state.merge_remote(m.origin, m.topic, m.action, m.user, m.data, m.ts) == []
    snapshots = [[(o.members(t), o.stats(t)) for t in TOPICS] for o in observers]
    assert snapshots[0] == snapshots[1] == snapshots[2]
    for state, sub in zip(observers, subscribers):
        sub.matches(state)
    assert len({o.total_users() for o in observers}) == 1
    # purging an origin leaves everyone agreeing too
    purge = data.draw(st.sampled_from(["A", "B", "C"]))
    for state, sub in zip(observers, subscribers):
        sub.apply(state.purge_origin(purge))
        sub.matches(state)
    after = [[o.members(t) for t in TOPICS] for o in observers]
    assert after[0] == after[1] == after[2]

"""Model-based test of recovery and the replay seam (F8, spec/RECOVERY_PRESENCE.md).

A hypothesis state machine publishes to a few topics (objects and non-objects, small
and large), connects and disconnects clients that recover with current, stale,
future, foreign-epoch or invalid positions, paces replays while publications go on,
jumps the clock past the TTL and squeezes the memory budget. It checks:

- the store against a plain reference model of what each buffer must still hold
  (ring capacity, least-recently-written budget eviction, TTL): stats, held ranges
  and every recovery outcome (recovered, count, epoch, offset, messages);
- per subscriber session, the delivered stamped messages against the log of all
  publications: strictly increasing, no duplicates, and exactly the owed range
  (the replay then the live stream) unless the seam reported a gap or the outcome
  said ``recovered: false``;
- that the bytes delivered are the very objects the store produced.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from wse_proto.errors import DecodeError
from wse_proto.recovery import (
    MAX_OFFSET,
    RecoveryConfig,
    RecoveryStore,
    RecoverySubscription,
    format_epoch,
)

TOPICS = ("a", "b", "c/d")
CLIENTS = ("c1", "c2", "c3")
CAPACITY = 16
TTL = 10.0
MAX_MESSAGES = 12

# --------------------------------------------------------------------------- reference model


@dataclass
class RefBuffer:
    epoch: int
    entries: dict[int, bytes] = field(default_factory=dict)
    head: int = 0
    last_write: float = 0.0
    order: int = 0

    @property
    def tail(self) -> int:
        return min(self.entries) if self.entries else self.head


class RefStore:
    """What the store must hold, written the slow and obvious way."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.bufs: dict[str, RefBuffer] = {}
        self.writes = 0
        self.last_epoch: dict[str, int] = {}

    def total(self) -> int:
        return sum(len(b) for buf in self.bufs.values() for b in buf.entries.values())

    def drop_stale(self, topic: str, now: float) -> None:
        buf = self.bufs.get(topic)
        if buf is not None and now - buf.last_write >= TTL:
            del self.bufs[topic]

    def expire(self, now: float) -> int:
        stale = [t for t, b in self.bufs.items() if now - b.last_write >= TTL]
        for t in stale:
            del self.bufs[t]
        return len(stale)

    def publish(self, topic: str, stamped: bytes, epoch: int, offset: int, now: float) -> None:
        self.drop_stale(topic, now)
        buf = self.bufs.get(topic)
        if buf is None:
            assert offset == 0, "a new buffer starts at offset 0"
            assert self.last_epoch.get(topic) != epoch, "a new buffer needs a new epoch"
            buf = self.bufs[topic] = RefBuffer(epoch)
            self.last_epoch[topic] = epoch
        assert (epoch, offset) == (buf.epoch, buf.head), "offsets are contiguous (F7)"
        buf.entries[offset] = stamped
        buf.entries.pop(offset - CAPACITY, None)
        buf.head = offset + 1
        buf.last_write = now
        self.writes += 1
        buf.order = self.writes
        while self.total() > self.budget:
            others = [b for b in self.bufs.values() if b is not buf]
            if others:
                victim = min(others, key=lambda b: b.order)
                del self.bufs[next(t for t, b in self.bufs.items() if b is victim)]
            else:
                buf.entries.pop(min(buf.entries))

    def outcome(
        self, topic: str, epoch: int, offset: int, now: float
    ) -> tuple[bool, int, bool, str | None, int, list[bytes]]:
        self.drop_stale(topic, now)
        buf = self.bufs.get(topic)
        if buf is None:
            return (False, 0, False, None, 0, [])
        pos = (format_epoch(buf.epoch), buf.head - 1)
        if buf.epoch != epoch:
            return (False, 0, True, *pos, [])
        start = offset + 1
        if start >= buf.head:
            return (True, 0, True, *pos, [])
        if start < buf.tail or buf.head - start > MAX_MESSAGES:
            return (False, 0, True, *pos, [])
        msgs = [buf.entries[o] for o in range(start, buf.head)]
        return (True, len(msgs), True, *pos, msgs)


# --------------------------------------------------------------------------- subscribers


@dataclass
class Session:
    topic: str
    start: int  # index into the publication log of the first message owed
    seam: RecoverySubscription | None
    delivered: list[int] = field(default_factory=list)  # indexes into the log
    done_at: int | None = None  # log length when the replay finished (None while pending)

    @property
    def gaps(self) -> int:
        return self.seam.gaps if self.seam is not None else 0


@dataclass
class Client:
    connected: bool = False
    sessions: dict[str, Session] = field(default_factory=dict)
    positions: dict[str, tuple[str, int]] = field(default_factory=dict)
    history: list[tuple[str, str, int]] = field(default_factory=list)


class RecoveryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.log: dict[str, list[tuple[int, int, bytes]]] = {t: [] for t in TOPICS}
        self.index: dict[int, tuple[str, int]] = {}  # id(stamped bytes) -> (topic, log index)
        self.clients = {c: Client() for c in CLIENTS}
        self.replayed_in_one_step = 0
        self.paced = 0

    @initialize(
        budget=st.sampled_from([200, 700, 2500, 1 << 30, 1 << 30]), seed=st.integers(0, 2**32)
    )
    def setup(self, budget: int, seed: int) -> None:
        config = RecoveryConfig(
            buffer_size=CAPACITY, ttl=TTL, max_messages=MAX_MESSAGES, memory_budget=budget
        )
        self.store = RecoveryStore(config, rand=random.Random(seed).randbytes)
        self.ref = RefStore(budget)

    # ----------------------------------------------------------------- delivery helpers

    def deliver(self, client: Client, session: Session, stamped: bytes) -> None:
        topic, idx = self.index[id(stamped)]
        assert topic == session.topic
        assert self.log[topic][idx][2] is stamped, "the stored object itself is sent"
        session.delivered.append(idx)
        epoch, offset = self.log[topic][idx][:2]
        client.positions[topic] = (format_epoch(epoch), offset)
        client.history.append((topic, format_epoch(epoch), offset))

    # ----------------------------------------------------------------- rules

    @rule(
        topic=st.sampled_from(TOPICS),
        kind=st.sampled_from(["obj", "obj", "obj", "empty", "spaced", "array", "text"]),
        size=st.integers(0, 260),
    )
    def publish(self, topic: str, kind: str, size: int) -> None:
        payload = {
            "obj": b'{"t":"m","p":"' + b"x" * size + b'"}',
            "empty": b"{}",
            "spaced": b'  {"s": ' + b"1" * (size % 20 + 1) + b"}",
            "array": b"[1,2]",
            "text": b"hello",
        }[kind]
        before = (self.store.stats(), {t: self.store.held(t) for t in TOPICS})
        res = self.store.publish(topic, payload, self.now)
        if kind in ("array", "text"):
            assert res is None, "F7: non-objects are not stored"
            assert (self.store.stats(), {t: self.store.held(t) for t in TOPICS}) == before
            return
        assert res is not None
        stamped, epoch, offset = res
        self.ref.publish(topic, stamped, epoch, offset, self.now)
        self.log[topic].append((epoch, offset, stamped))
        self.index[id(stamped)] = (topic, len(self.log[topic]) - 1)
        for client in self.clients.values():
            session = client.sessions.get(topic)
            if session is None:
                continue
            seam = session.seam
            if seam is not None and session.done_at is None:
                if not seam.accept_live(epoch):
                    continue  # held back: the replay will get to it
                if not seam.pending:  # a new epoch: the replayed buffer is gone
                    session.done_at = len(self.log[topic]) - 1
                    event("replay ended by a new epoch")
            self.deliver(client, session, stamped)

    @precondition(lambda self: any(not c.connected for c in self.clients.values()))
    @rule(
        data=st.data(),
        paced=st.booleans(),
    )
    def connect(self, data: st.DataObject, paced: bool) -> None:
        name = data.draw(st.sampled_from([n for n, c in self.clients.items() if not c.connected]))
        client = self.clients[name]
        client.connected = True
        topics = data.draw(st.lists(st.sampled_from(TOPICS), min_size=1, max_size=3, unique=True))
        for topic in topics:
            mode = data.draw(
                st.sampled_from(
                    ["last", "last", "stale", "future", "max", "foreign", "bad", "none"]
                )
            )
            epoch: str | None
            offset: int | None
            if mode == "last" and topic in client.positions:
                epoch, offset = client.positions[topic]
            elif mode == "stale" and self.log[topic]:
                e, o, _ = data.draw(st.sampled_from(self.log[topic]))
                epoch, offset = format_epoch(e), o
            elif mode in ("future", "max") and self.log[topic]:
                e = self.log[topic][-1][0]
                epoch = format_epoch(e).upper()
                offset = MAX_OFFSET if mode == "max" else self.log[topic][-1][1] + 5
            elif mode == "foreign":
                epoch, offset = format_epoch(data.draw(st.integers(0, 0xFFFFFFFF))), 3
            elif mode == "bad":
                epoch, offset = data.draw(st.sampled_from([("zz", 1), ("", 0), ("1", -1)]))
            else:
                epoch, offset = None, None
            self.subscribe(client, topic, epoch, offset, paced, bad=mode == "bad")

    def subscribe(
        self,
        client: Client,
        topic: str,
        epoch: str | None,
        offset: int | None,
        paced: bool,
        *,
        bad: bool,
    ) -> None:
        log_len = len(self.log[topic])
        expected = None
        if bad:
            before = (self.store.stats(), self.store.held(topic))
            for call in (self.store.recover, self.store.begin_replay):
                with pytest.raises(DecodeError):
                    call(topic, epoch, offset, self.now)
            assert (self.store.stats(), self.store.held(topic)) == before
            epoch = offset = None  # the server then subscribes without recovery
        if epoch is not None and offset is not None:
            expected = self.ref.outcome(topic, int(epoch, 16), offset, self.now)
        else:
            self.ref.drop_stale(topic, self.now)
        seam: RecoverySubscription | None = None
        if paced:
            out, seam = self.store.begin_replay(topic, epoch, offset, self.now)
            assert out.messages == []
        else:
            out = self.store.recover(topic, epoch, offset, self.now)
        got = (out.recovered, out.count, out.recoverable, out.epoch, out.offset)
        event(f"outcome recovered={out.recovered} count>0={out.count > 0} paced={paced}")
        if expected is not None:
            assert got == expected[:5], (got, expected[:5])
            if not paced:
                assert out.messages == expected[5]
        else:
            buf = self.ref.bufs.get(topic)
            pos = (format_epoch(buf.epoch), buf.head - 1) if buf else (None, 0)
            assert got == (False, 0, buf is not None, *pos)
        if out.recovered:
            # owed: everything after the client's position, i.e. the last `count` entries
            start = log_len - out.count
            assert all(self.log[topic][i][0] == int(out.epoch, 16) for i in range(start, log_len))
        else:
            start = log_len
            if out.epoch is not None:  # the client re-baselines (wse-client does)
                client.positions[topic] = (out.epoch, out.offset)
        session = Session(topic, start, seam)
        client.sessions[topic] = session
        if seam is None:
            session.done_at = start
            for msg in out.messages:
                self.deliver(client, session, msg)
            if out.messages:
                self.replayed_in_one_step += 1
        else:
            self.paced += 1

    @precondition(
        lambda self: any(
            s.done_at is None for c in self.clients.values() for s in c.sessions.values()
        )
    )
    @rule(data=st.data(), count=st.integers(1, 6), max_bytes=st.none() | st.integers(0, 400))
    def pull(self, data: st.DataObject, count: int, max_bytes: int | None) -> None:
        pending = [
            (c, s) for c in self.clients.values() for s in c.sessions.values() if s.done_at is None
        ]
        client, session = data.draw(st.sampled_from(pending))
        assert session.seam is not None
        batch = session.seam.pull(max_count=count, max_bytes=max_bytes)
        assert len(batch) <= count
        if max_bytes is not None and len(batch) > 1:
            assert sum(len(b) for b in batch) <= max_bytes
        for msg in batch:
            self.deliver(client, session, msg)
        if not session.seam.pending:
            session.done_at = len(self.log[session.topic])
            event(f"replay finished, gaps={min(session.seam.gaps, 1)}")

    @precondition(
        lambda self: any(
            s.done_at is None for c in self.clients.values() for s in c.sessions.values()
        )
    )
    @rule(data=st.data(), every=st.integers(2, 4), size=st.integers(0, 80))
    def drain_while_publishing(self, data: st.DataObject, every: int, size: int) -> None:
        """Pull small batches of one replay with a publication to its topic between them."""
        pending = [
            (c, s) for c in self.clients.values() for s in c.sessions.values() if s.done_at is None
        ]
        client, session = data.draw(st.sampled_from(pending))
        assert session.seam is not None
        for _ in range(40):
            if session.done_at is not None:
                break
            for msg in session.seam.pull(max_count=every):
                self.deliver(client, session, msg)
            if not session.seam.pending:
                session.done_at = len(self.log[session.topic])
                event(f"replay drained, gaps={min(session.seam.gaps, 1)}")
                break
            self.publish(session.topic, "obj", size)
            self.check_sessions()
        assert session.done_at is not None, "a replay catches up when pulled faster than fed"

    @precondition(lambda self: any(c.connected for c in self.clients.values()))
    @rule(data=st.data())
    def disconnect(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from([n for n, c in self.clients.items() if c.connected]))
        client = self.clients[name]
        self.check_sessions()
        client.connected = False
        client.sessions.clear()

    @precondition(lambda self: any(c.connected and c.sessions for c in self.clients.values()))
    @rule(data=st.data(), missed=st.integers(0, 20), size=st.integers(0, 120), paced=st.booleans())
    def outage(self, data: st.DataObject, missed: int, size: int, paced: bool) -> None:
        """The common story: a client drops, misses publications, comes back with its
        last positions."""
        names = [n for n, c in self.clients.items() if c.connected and c.sessions]
        client = self.clients[data.draw(st.sampled_from(names))]
        topics = list(client.sessions)
        self.check_sessions()
        client.connected = False
        client.sessions.clear()
        for i in range(missed):
            self.publish(topics[i % len(topics)], "obj", size)
        client.connected = True
        for topic in topics:
            epoch, offset = client.positions.get(topic, (None, None))
            self.subscribe(client, topic, epoch, offset, paced, bad=False)

    @rule(dt=st.sampled_from([0.0, 0.0, 0.5, 0.5, 3.0, 9.99, 10.0, 25.0]), sweep=st.booleans())
    def tick(self, dt: float, sweep: bool) -> None:
        self.now += dt
        if sweep:
            assert self.store.expire(self.now) == self.ref.expire(self.now)

    # ----------------------------------------------------------------- invariants

    @invariant()
    def store_matches_reference(self) -> None:
        if not hasattr(self, "store"):
            return
        topics, total = self.store.stats()
        assert total == self.ref.total() <= self.ref.budget
        assert topics == len(self.ref.bufs)
        for topic in TOPICS:
            buf = self.ref.bufs.get(topic)
            held = self.store.held(topic)
            if buf is None:
                assert len(held) == 0
            else:
                assert held == range(buf.tail, buf.head)
                assert self.store.position(topic) == (format_epoch(buf.epoch), buf.head - 1)
        deadline = self.store.next_deadline()
        if self.ref.bufs:
            assert deadline == min(b.last_write for b in self.ref.bufs.values()) + TTL
        else:
            assert deadline is None

    @invariant()
    def check_sessions(self) -> None:
        for client in self.clients.values():
            for session in client.sessions.values():
                log = self.log[session.topic]
                got = session.delivered
                assert got == sorted(set(got)), "in order, each message once"
                assert all(i >= session.start for i in got), "nothing before the owed range"
                if session.gaps == 0:
                    # gap-free: a prefix of the owed range, all of it once the replay is done
                    assert got == list(range(session.start, session.start + len(got)))
                    if session.done_at is not None:
                        assert got == list(range(session.start, len(log)))
                elif session.done_at is not None:
                    # a reported gap; after the replay ends the live stream is complete
                    assert set(range(session.done_at, len(log))) <= set(got)


RecoveryMachine.TestCase.settings = settings(
    max_examples=400,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestRecoveryModel = RecoveryMachine.TestCase

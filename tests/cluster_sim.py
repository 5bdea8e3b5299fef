"""Deterministic simulation of a wse-py cluster: many :class:`ClusterNode` s on one virtual
clock, wired by an in-memory network that a seeded scheduler disturbs.

The network behaves like TCP: bytes on one connection arrive in order, each chunk after a
random delay of at most ``max_delay``; different connections are independent, so frames
of different links are reordered freely. Faults: dial attempts that fail (refused or
timing out), connections severed (both ends see a reset), partitions (bytes across the cut
are held until the partition heals; heartbeats notice the silence), and node restarts,
graceful (SHUTDOWN) or crashes, after which the node comes back at the same address with
a new, higher UUIDv7 instance id and empty state.

Each node also runs a RecoveryStore and a PresenceState, and has clients: subscribers
(exact topics and globs) that record every publication they receive, presence members
that join, update and leave, and recovering clients that ask any node for the messages
they missed.

Invariants:

- after every event: no subscriber receives a publication twice or one it did not ask
  for; a recovery answer is either a gap-free run of the exact bytes the publisher
  stamped, or ``recovered=false`` (and the publisher's own buffer always recovers what it
  still holds);
- at quiescence (faults healed, a long quiet period): every pair of live nodes shares
  exactly one link, the same connection seen from both ends; each node's view of each
  peer's interest equals that peer's local interest; presence is the same on every node
  and matches what the nodes hold locally;
- over the whole run: every subscriber receives exactly once every publication made
  while its link to the publisher was up and settled (a settle time of one network
  delay after the link came up and after the subscription), and a final round of
  publications reaches every subscriber exactly once.

A scenario is generated from a seed as a list of timed steps. A failure raises
:class:`SimFailure` whose message holds the seed, the step list (replay it with
``Simulation(seed, steps=...)``) and the last trace lines. Run one seed from the shell
with ``python tests/cluster_sim.py SEED``.
"""

from __future__ import annotations

import hashlib
import heapq
import random
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from wse_proto.cluster.link import PeerLink
from wse_proto.cluster.mesh import (
    CloseLink,
    ClusterConfig,
    ClusterNode,
    Deliver,
    Dial,
    LinkDown,
    LinkUp,
    PresenceNotify,
    Send,
)
from wse_proto.envelope import dumps_server, uuid7
from wse_proto.presence import PresenceState
from wse_proto.recovery import RecoveryConfig, RecoveryStore, format_epoch
from wse_proto.topics import glob_match, is_glob

T0_MS = 1_795_373_000_000
PORT = 7000
CONNECT_TIMEOUT = 5.0
EPS = 1e-6

TOPICS = ("room.1", "room.2", "news", "lobby")
PATTERNS = ("room.1", "room.2", "news", "lobby", "room.*", "r??m.2", "*")
USERS = ("alice", "bob", "carol", "dave")
PRESENCE_TOPICS = ("lobby", "room.1")

QUIET_PERIOD = 500.0
"""Virtual seconds after the last fault before the quiescence checks: enough for the
longest backoff (60 s x 1.2), an open breaker (60 s), rediscovery and a periodic RESYNC."""

Step = tuple[float, tuple[Any, ...]]


class SimFailure(AssertionError):
    pass


def address_of(index: int) -> str:
    return f"10.0.0.{index + 1}:{PORT}"


# --------------------------------------------------------------------------- scenario


@dataclass
class Scenario:
    n_nodes: int
    steps: list[Step]
    max_delay: float
    dial_drop: float
    chaos_end: float


def make_scenario(seed: int, *, chaos_time: float = 150.0) -> Scenario:
    """A random scenario: staggered starts (late joiners via seeds), then chaos."""
    rng = random.Random(seed)
    n = rng.choice((3, 4, 4, 5, 5, 6))
    steps: list[Step] = []
    started: list[int] = [0]
    steps.append((0.0, ("start", 0, ())))
    t = 0.0
    for i in range(1, n):
        t += rng.uniform(0.0, 15.0)
        style = rng.random()
        if style < 0.6:
            peers: tuple[str, ...] = (address_of(rng.choice(started)),)  # one seed
        elif style < 0.8:
            peers = tuple(address_of(j) for j in rng.sample(started, min(2, len(started))))
        else:
            peers = tuple(address_of(j) for j in range(n) if j != i)  # static full list
        steps.append((round(t, 3), ("start", i, peers)))
        started.append(i)
    t = 1.0
    partition_until = 0.0
    weights = {
        "pub": 30,
        "sub": 10,
        "unsub": 5,
        "pjoin": 6,
        "pleave": 3,
        "pupdate": 3,
        "recover": 5,
        "sever": 2,
        "partition": 1.5,
        "restart": 1.2,
    }
    kinds = list(weights)
    wts = [weights[k] for k in kinds]
    while True:
        t += rng.expovariate(1.5)
        if t >= chaos_time:
            break
        kind = rng.choices(kinds, wts)[0]
        k = rng.randrange(1 << 30)
        node = rng.randrange(n)
        ts = round(t, 3)
        if kind == "pub":
            steps.append((ts, ("pub", node, rng.choice(TOPICS))))
        elif kind == "sub":
            steps.append((ts, ("sub", node, rng.choice(PATTERNS))))
        elif kind == "unsub":
            steps.append((ts, ("unsub", node, k)))
        elif kind == "pjoin":
            steps.append((ts, ("pjoin", node, rng.choice(USERS), rng.choice(PRESENCE_TOPICS))))
        elif kind == "pleave":
            steps.append((ts, ("pleave", node, k)))
        elif kind == "pupdate":
            steps.append((ts, ("pupdate", node, k, rng.randrange(100))))
        elif kind == "recover":
            steps.append((ts, ("recover", k, rng.randrange(n))))
        elif kind == "sever":
            steps.append((ts, ("sever", k)))
        elif kind == "partition" and t > partition_until:
            side = tuple(sorted(rng.sample(range(n), rng.randint(1, n - 1))))
            length = rng.choice((3.0, 10.0, rng.uniform(16.0, 90.0)))
            partition_until = t + length
            steps.append((ts, ("partition", side)))
            steps.append((round(min(t + length, chaos_time), 3), ("heal",)))
        elif kind == "restart":
            # Long outages make the others forget a discovered address (forget_after).
            down = rng.choice((0.5, rng.uniform(1.0, 40.0), rng.uniform(60.0, 140.0)))
            steps.append((ts, ("stop", node, rng.random() < 0.5)))
            steps.append((round(min(t + down, chaos_time), 3), ("restart", node)))
    steps.append((chaos_time, ("heal",)))
    steps.sort(key=lambda s: s[0])  # stable: equal times keep their order
    return Scenario(
        n_nodes=n,
        steps=steps,
        max_delay=rng.choice((0.005, 0.05, 0.3)),
        dial_drop=rng.choice((0.0, 0.1, 0.3)),
        chaos_end=chaos_time,
    )


# --------------------------------------------------------------------------- model objects


@dataclass
class Pub:
    pid: str
    node: int
    inc: int
    topic: str
    t: float
    seq: int
    stamped: bytes
    epoch: int | None
    offset: int | None


@dataclass
class Subscriber:
    cid: int
    node: int
    inc: int
    pattern: str
    start: float
    start_seq: int
    end: float | None = None
    end_seq: int | None = None
    got: Counter[str] = field(default_factory=Counter)
    last: dict[str, tuple[int, int]] = field(default_factory=dict)  # topic -> (epoch, offset)


@dataclass
class End:
    node: int
    inc: int
    link_id: int
    closed: bool = False
    up_at: float | None = None


@dataclass
class Conn:
    cid: int
    ends: list[End | None]  # [dialer, acceptor]
    last_arrival: list[float] = field(default_factory=lambda: [0.0, 0.0])
    stalled: list[list[tuple[str, bytes]]] = field(default_factory=lambda: [[], []])
    dead: bool = False
    disturbed_at: float = float("inf")

    def disturb(self, now: float) -> None:
        if now < self.disturbed_at:
            self.disturbed_at = now


class SimNode:
    """One incarnation of a node: the ClusterNode and the server state around it."""

    def __init__(self, sim: Simulation, index: int, inc: int, peers: tuple[str, ...]) -> None:
        self.index = index
        self.inc = inc
        self.rng = random.Random(sim.net_rng.getrandbits(64))
        rand = self.rng.randbytes
        self.instance_id = sim.new_instance_id()
        sim.instance_ids[self.instance_id] = index
        self.recovery = RecoveryStore(RecoveryConfig(buffer_size=32), rand=rand)
        self.presence = PresenceState()
        self.node = ClusterNode(
            self.instance_id,
            rand=rand,
            wall_ms=sim.wall_ms,
            now=sim.now,
            address=address_of(index),
            peers=peers,
            config=ClusterConfig(),
            recovery=self.recovery,
            presence=self.presence,
        )
        self.alive = True
        self.ends: dict[int, tuple[Conn, int]] = {}  # link id -> (conn, side)
        self.dials: dict[int, str] = {}
        self.subs: list[Subscriber] = []
        self.pconns: dict[str, tuple[str, str]] = {}  # presence conn id -> (user, topic)
        self.timer_token = 0
        self.timer_at: float | None = None


# --------------------------------------------------------------------------- the simulation


class Simulation:
    """One run. ``steps`` and the keyword arguments override what the seed generates
    (the network's randomness always comes from the seed)."""

    def __init__(
        self,
        seed: int,
        steps: list[Step] | None = None,
        *,
        n_nodes: int | None = None,
        max_delay: float | None = None,
        dial_drop: float | None = None,
        chaos_time: float = 150.0,
    ) -> None:
        self.seed = seed
        self.scenario = make_scenario(seed, chaos_time=chaos_time)
        if steps is not None:
            self.scenario.steps = sorted(steps, key=lambda s: s[0])
        if n_nodes is not None:
            self.scenario.n_nodes = n_nodes
        if max_delay is not None:
            self.scenario.max_delay = max_delay
        if dial_drop is not None:
            self.scenario.dial_drop = dial_drop
        self._digest = hashlib.sha256()
        self.net_rng = random.Random(seed ^ 0x5EED5EED)
        self.max_delay = self.scenario.max_delay
        self.dial_drop = self.scenario.dial_drop
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self.op_seq = 0
        self.nodes: dict[int, SimNode] = {}  # index -> current incarnation
        self.incs: dict[int, int] = {}
        self.peers_cfg: dict[int, tuple[str, ...]] = {}
        self.group: dict[int, int] = {}
        self.conns: list[Conn] = []
        self.pubs: list[Pub] = []
        self.subs: list[Subscriber] = []
        self.stamped: dict[tuple[str, int, int], bytes] = {}
        self.instance_ids: dict[str, int] = {}
        self.trace: list[str] = []
        self._last_id_ms = 0
        self._next_cid = 0
        self._next_pid = 0
        self.stats = Counter[str]()

    # ------------------------------------------------------------------ plumbing

    def wall_ms(self) -> int:
        return T0_MS + int(self.now * 1000)

    def new_instance_id(self) -> str:
        """UUIDv7 from the virtual wall clock; a later node always gets a higher id."""
        ms = max(self.wall_ms(), self._last_id_ms + 1)
        self._last_id_ms = ms
        return uuid7(ms, self.net_rng.randbytes)

    def at(self, t: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (t, self._seq, fn))

    def delay(self) -> float:
        return self.net_rng.uniform(0.0005, self.max_delay)

    def log(self, text: str) -> None:
        line = f"{self.now:9.3f} {text}"
        self._digest.update(line.encode())
        self.trace.append(line)
        if len(self.trace) > 4000:
            del self.trace[:1000]

    def digest(self) -> str:
        """A fingerprint of everything that happened (for determinism checks)."""
        return self._digest.hexdigest()

    def fail(self, text: str) -> None:
        sc = self.scenario
        steps = ",\n    ".join(repr(s) for s in sc.steps)
        tail = "\n".join(self.trace[-60:])
        raise SimFailure(
            f"cluster simulation seed={self.seed} failed at t={self.now:.3f}: {text}\n"
            f"replay: Simulation({self.seed}, STEPS, n_nodes={sc.n_nodes}, "
            f"max_delay={sc.max_delay!r}, dial_drop={sc.dial_drop!r}, "
            f"chaos_time={sc.chaos_end!r}).run()\n"
            f"STEPS = [\n    {steps}\n]\n"
            f"last trace lines:\n{tail}"
        )

    def partitioned(self, a: int, b: int) -> bool:
        return self.group.get(a, 0) != self.group.get(b, 0)

    def live(self) -> list[SimNode]:
        return [sn for sn in self.nodes.values() if sn.alive]

    # ------------------------------------------------------------------ driving nodes

    def pump(self, sn: SimNode) -> None:
        """Carry out a node's intents, then re-arm its timer."""
        for intent in sn.node.intents():
            cls = type(intent)
            if cls is Send:
                assert isinstance(intent, Send)
                entry = sn.ends.get(intent.link_id)
                if entry is not None:
                    conn, side = entry
                    end = conn.ends[side]
                    assert end is not None
                    if not end.closed:
                        self.transmit(conn, side, ("data", intent.data))
            elif cls is Deliver:
                assert isinstance(intent, Deliver)
                self.deliver(sn, intent.topic, intent.payload)
            elif cls is Dial:
                assert isinstance(intent, Dial)
                self.dial(sn, intent.link_id, intent.address)
            elif cls is CloseLink:
                assert isinstance(intent, CloseLink)
                self.close_end(sn, intent.link_id)
            elif cls is LinkUp:
                assert isinstance(intent, LinkUp)
                conn, side = sn.ends[intent.link_id]
                end = conn.ends[side]
                assert end is not None
                end.up_at = self.now
                self.log(f"n{sn.index} link {intent.link_id} up with {intent.instance_id[-6:]}")
            elif cls is LinkDown:
                assert isinstance(intent, LinkDown)
                conn, _ = sn.ends[intent.link_id]
                conn.disturb(self.now)
                self.stats[f"down:{intent.reason.value}"] += 1
                self.log(f"n{sn.index} link {intent.link_id} down: {intent.reason.value}")
            elif cls is PresenceNotify:
                self.stats["presence_notify"] += 1
        self.arm(sn)

    def arm(self, sn: SimNode) -> None:
        if not sn.alive:
            return
        dl = sn.node.next_deadline()
        if dl is None:
            return
        if sn.timer_at is not None and sn.timer_at <= dl:
            return
        sn.timer_at = dl
        sn.timer_token += 1
        token = sn.timer_token
        self.at(max(dl, self.now), lambda: self.fire_timer(sn, token))

    def fire_timer(self, sn: SimNode, token: int) -> None:
        if not sn.alive or token != sn.timer_token:
            return
        sn.timer_at = None
        sn.node.handle_timer(self.now)
        self.pump(sn)

    # ------------------------------------------------------------------ network

    def transmit(self, conn: Conn, side: int, item: tuple[str, bytes]) -> None:
        if conn.dead:
            return
        ends = conn.ends
        a, b = ends[0], ends[1]
        if a is not None and b is not None and self.partitioned(a.node, b.node):
            conn.stalled[side].append(item)
            conn.disturb(self.now)
            return
        t = max(conn.last_arrival[side], self.now + self.delay())
        conn.last_arrival[side] = t
        self.at(t, lambda: self.arrive(conn, side, item))

    def arrive(self, conn: Conn, side: int, item: tuple[str, bytes]) -> None:
        if conn.dead:
            return
        recv = conn.ends[1 - side]
        if recv is None or recv.closed:
            return
        sn = self.nodes.get(recv.node)
        if sn is None or not sn.alive or sn.inc != recv.inc:
            return
        kind, data = item
        if kind == "data":
            sn.node.receive_data(recv.link_id, data, self.now)
        else:
            sn.node.receive_eof(recv.link_id, self.now)
        self.pump(sn)

    def close_end(self, sn: SimNode, link_id: int) -> None:
        if sn.dials.pop(link_id, None) is not None:
            return  # a dial given up: a connection that completes later is closed then
        entry = sn.ends.get(link_id)
        if entry is None:
            return
        conn, side = entry
        end = conn.ends[side]
        assert end is not None
        if end.closed:
            return
        end.closed = True
        conn.disturb(self.now)
        self.transmit(conn, side, ("eof", b""))

    def dial(self, sn: SimNode, link_id: int, address: str) -> None:
        sn.dials[link_id] = address
        target = next((i for i in self.peers_cfg if address_of(i) == address), None)
        tn = self.nodes.get(target) if target is not None else None
        if tn is None or not tn.alive:
            self.at(self.now + self.delay(), lambda: self.dial_failed(sn, link_id))
            return
        if self.partitioned(sn.index, tn.index) or self.net_rng.random() < self.dial_drop:
            self.at(self.now + CONNECT_TIMEOUT, lambda: self.dial_failed(sn, link_id))
            return
        self.at(self.now + self.delay(), lambda: self.syn(sn, link_id, tn))

    def dial_failed(self, sn: SimNode, link_id: int) -> None:
        if not sn.alive or sn.dials.pop(link_id, None) is None:
            return
        self.stats["dial_failed"] += 1
        sn.node.connection_failed(link_id, self.now)
        self.pump(sn)

    def syn(self, sn: SimNode, link_id: int, tn: SimNode) -> None:
        if not sn.alive or link_id not in sn.dials:
            return
        if not tn.alive or self.partitioned(sn.index, tn.index):
            self.at(self.now + self.delay(), lambda: self.dial_failed(sn, link_id))
            return
        self._next_cid += 1
        remote = f"10.0.0.{sn.index + 1}:{40000 + self._next_cid}"
        lid_b = tn.node.accept(remote, self.now)
        if lid_b is None:
            self.at(self.now + self.delay(), lambda: self.dial_failed(sn, link_id))
            return
        conn = Conn(self._next_cid, [None, End(tn.index, tn.inc, lid_b)])
        self.conns.append(conn)
        tn.ends[lid_b] = (conn, 1)
        self.pump(tn)
        self.at(self.now + self.delay(), lambda: self.syn_ack(sn, link_id, conn))

    def syn_ack(self, sn: SimNode, link_id: int, conn: Conn) -> None:
        if not sn.alive or sn.dials.pop(link_id, None) is None:
            conn.disturb(self.now)
            self.transmit(conn, 0, ("eof", b""))  # the dialer is gone: the acceptor sees EOF
            return
        conn.ends[0] = End(sn.index, sn.inc, link_id)
        sn.ends[link_id] = (conn, 0)
        sn.node.connection_made(link_id, self.now)
        self.pump(sn)

    # ------------------------------------------------------------------ clients

    def deliver(self, sn: SimNode, topic: str, payload: bytes) -> None:
        doc = orjson.loads(payload)
        pid = doc["id"]
        stamp = (doc["e"], doc["o"]) if "e" in doc else None
        if stamp is not None and doc["tp"] != topic:
            self.fail(f"publication {pid} stamped for {doc['tp']!r} arrived as {topic!r}")
        for sub in sn.subs:
            if not matches(sub.pattern, topic):
                continue
            sub.got[pid] += 1
            if sub.got[pid] > 1:
                self.fail(f"subscriber {sub.cid} on n{sn.index} got {pid} twice")
            if stamp is not None and not is_glob(sub.pattern):
                sub.last[topic] = (int(stamp[0], 16), stamp[1])

    # ------------------------------------------------------------------ steps

    def run_step(self, op: tuple[Any, ...]) -> None:
        self.op_seq += 1
        kind = op[0]
        self.log(f"step {op!r}")
        getattr(self, f"op_{kind}")(*op[1:])

    def node_at(self, index: int) -> SimNode | None:
        sn = self.nodes.get(index)
        return sn if sn is not None and sn.alive else None

    def op_start(self, index: int, peers: tuple[str, ...]) -> None:
        self.peers_cfg[index] = tuple(peers)
        self.incs[index] = 0
        sn = SimNode(self, index, 0, tuple(peers))
        self.nodes[index] = sn
        self.log(f"n{index} is {sn.instance_id}")
        self.pump(sn)

    def op_restart(self, index: int) -> None:
        old = self.nodes.get(index)
        if old is None or old.alive:
            return  # never started, or still running
        inc = self.incs.get(index, 0) + 1
        self.incs[index] = inc
        sn = SimNode(self, index, inc, self.peers_cfg[index])
        self.nodes[index] = sn
        self.log(f"n{index} restarted as {sn.instance_id}")
        self.pump(sn)

    def op_stop(self, index: int, graceful: bool) -> None:
        sn = self.node_at(index)
        if sn is None:
            return
        if graceful:
            sn.node.shutdown(self.now)
            self.pump(sn)
        sn.alive = False
        for sub in sn.subs:
            sub.end = self.now
            sub.end_seq = self.op_seq
        sn.subs = []
        for conn, side in sn.ends.values():
            end = conn.ends[side]
            assert end is not None
            conn.disturb(self.now)
            if not end.closed:
                end.closed = True
                self.transmit(conn, side, ("eof", b""))  # the OS closes the sockets
        sn.dials.clear()

    def op_pub(self, index: int, topic: str) -> None:
        sn = self.node_at(index)
        if sn is None:
            return
        self._next_pid += 1
        pid = f"p{self._next_pid}"
        payload = orjson.dumps({"id": pid, "t": "sim"})
        res = sn.recovery.publish(topic, payload, self.now)
        assert res is not None
        stamped, epoch, offset = res
        self.stamped[(topic, epoch, offset)] = stamped
        self.pubs.append(
            Pub(pid, index, sn.inc, topic, self.now, self.op_seq, stamped, epoch, offset)
        )
        self.deliver(sn, topic, stamped)
        sn.node.publish(topic, stamped, self.now, epoch=epoch, offset=offset)
        self.pump(sn)

    def op_sub(self, index: int, pattern: str) -> None:
        sn = self.node_at(index)
        if sn is None:
            return
        self._next_cid += 1
        sub = Subscriber(self._next_cid, index, sn.inc, pattern, self.now, self.op_seq)
        sn.subs.append(sub)
        self.subs.append(sub)
        sn.node.subscribe(pattern, self.now)
        self.pump(sn)

    def op_unsub(self, index: int, k: int) -> None:
        sn = self.node_at(index)
        if sn is None or not sn.subs:
            return
        sub = sn.subs.pop(k % len(sn.subs))
        sub.end = self.now
        sub.end_seq = self.op_seq
        sn.node.unsubscribe(sub.pattern, self.now)
        self.pump(sn)

    def op_pjoin(self, index: int, user: str, topic: str) -> None:
        sn = self.node_at(index)
        if sn is None:
            return
        self._next_cid += 1
        cid = f"pc{self._next_cid}"
        sn.pconns[cid] = (user, topic)
        result = sn.presence.join(
            topic, user, cid, {"at": sn.index, "n": self._next_cid}, self.wall_ms()
        )
        sn.node.sync_presence(result.events, self.now)
        self.pump(sn)

    def op_pleave(self, index: int, k: int) -> None:
        sn = self.node_at(index)
        if sn is None or not sn.pconns:
            return
        cid = list(sn.pconns)[k % len(sn.pconns)]
        _, topic = sn.pconns.pop(cid)
        sn.node.sync_presence(sn.presence.leave(topic, cid, self.wall_ms()), self.now)
        self.pump(sn)

    def op_pupdate(self, index: int, k: int, value: int) -> None:
        sn = self.node_at(index)
        if sn is None or not sn.pconns:
            return
        cid = list(sn.pconns)[k % len(sn.pconns)]
        events = sn.presence.update(cid, {"v": value}, self.wall_ms())
        sn.node.sync_presence(events, self.now)
        self.pump(sn)

    def op_recover(self, k: int, index: int) -> None:
        """A client that saw (epoch, offset) of a topic asks node ``index`` for the rest."""
        cands = [(s, t) for s in self.subs for t in sorted(s.last)]
        zn = self.node_at(index)
        if not cands or zn is None:
            return
        sub, topic = cands[k % len(cands)]
        epoch, offset = sub.last[topic]
        outcome = zn.recovery.recover(topic, format_epoch(epoch), offset, self.now)
        self.stats["recover_ok" if outcome.recovered else "recover_no"] += 1
        if outcome.recovered:
            if outcome.epoch != format_epoch(epoch) or outcome.count != len(outcome.messages):
                self.fail(f"recovery on n{index} answered {outcome!r}")
            for i, msg in enumerate(outcome.messages):
                want = self.stamped.get((topic, epoch, offset + 1 + i))
                if msg != want:
                    self.fail(
                        f"recovery of {topic} {epoch:08x} after {offset} on n{index}: "
                        f"message {i} is {msg!r}, expected {want!r}"
                    )
            if offset + len(outcome.messages) < outcome.offset:
                self.fail(f"recovery on n{index} stopped short of {outcome.offset}")
            return
        # Honest "no" only: the publisher's own live buffer recovers what it still holds.
        pos = zn.recovery.position(topic)
        held = zn.recovery.held(topic)
        if pos is not None and pos[0] == format_epoch(epoch) and held.start <= offset + 1:
            backlog = pos[1] - offset
            if backlog <= zn.recovery.config.max_messages:
                self.fail(f"n{index} refused to recover {topic} from its own buffer: {outcome!r}")

    def op_sever(self, k: int) -> None:
        open_conns = [
            c
            for c in self.conns
            if not c.dead and all(e is not None and not e.closed for e in c.ends)
        ]
        if not open_conns:
            return
        conn = open_conns[k % len(open_conns)]
        conn.dead = True
        conn.disturb(self.now)
        for end in conn.ends:
            assert end is not None
            self.at(self.now + self.delay(), lambda e=end: self.reset_end(e))

    def reset_end(self, end: End) -> None:
        sn = self.nodes.get(end.node)
        if sn is None or not sn.alive or sn.inc != end.inc or end.closed:
            return
        end.closed = True
        sn.node.connection_lost(end.link_id, self.now)
        self.pump(sn)

    def op_partition(self, side: tuple[int, ...]) -> None:
        self.group = {i: (1 if i in side else 0) for i in range(self.scenario.n_nodes)}
        for conn in self.conns:
            a, b = conn.ends
            if a is not None and b is not None and self.partitioned(a.node, b.node):
                conn.disturb(self.now)

    def op_heal(self) -> None:
        self.group = {}
        if self.now >= self.scenario.chaos_end - EPS:
            self.dial_drop = 0.0
        for conn in self.conns:
            for side in (0, 1):
                held = conn.stalled[side]
                conn.stalled[side] = []
                for item in held:
                    self.transmit(conn, side, item)

    # ------------------------------------------------------------------ running

    def run_until(self, t_end: float) -> None:
        queue = self._queue
        while queue and queue[0][0] <= t_end:
            t, _, fn = heapq.heappop(queue)
            self.now = t
            fn()
            self.check_step()
        self.now = t_end

    def check_step(self) -> None:
        known = self.instance_ids
        for sn in self.nodes.values():
            if not sn.alive:
                continue
            for peer in sn.node.peers():
                owner = known.get(peer)
                if owner is None or owner == sn.index:
                    self.fail(f"n{sn.index} is linked to {peer}, which is itself or nobody")

    def run(self) -> Simulation:
        for t, op in self.scenario.steps:
            self.at(t, lambda op=op: self.run_step(op))
        end = self.scenario.chaos_end
        self.run_until(end + QUIET_PERIOD)
        self.check_mesh()
        self.check_interest()
        self.check_presence()
        self.final_round()
        self.check_owed()
        return self

    # ------------------------------------------------------------------ quiescence checks

    def link_end(self, sn: SimNode, other: SimNode) -> tuple[PeerLink, Conn, int]:
        link = sn.node.link_of(other.instance_id)
        if link is None or not link.is_open:
            self.fail(f"n{sn.index} has no open link to n{other.index} at quiescence")
        assert link is not None
        conn, side = sn.ends[link.link_id]
        return link, conn, side

    def check_mesh(self) -> None:
        live = self.live()
        for sn in live:
            if sn.node.peer_count != len(live) - 1:
                self.fail(f"n{sn.index} has {sn.node.peer_count} peers, expected {len(live) - 1}")
            for other in live:
                if other is sn:
                    continue
                _, conn, side = self.link_end(sn, other)
                _, conn2, side2 = self.link_end(other, sn)
                if conn is not conn2 or side == side2:
                    self.fail(f"n{sn.index} and n{other.index} do not use the same connection")

    def check_interest(self) -> None:
        live = self.live()
        for sn in live:
            for other in live:
                if other is sn:
                    continue
                view = sn.node.peer_interest(other.instance_id)
                assert view is not None
                actual = frozenset(other.node.local_interest())
                expected = frozenset(s.pattern for s in other.subs)
                if actual != expected:
                    self.fail(
                        f"n{other.index} local interest {sorted(actual)} != {sorted(expected)}"
                    )
                if view.topics() != actual or (actual and not view.known):
                    self.fail(
                        f"n{sn.index} sees n{other.index} interested in {sorted(view.topics())} "
                        f"(known={view.known}), actual {sorted(actual)}"
                    )

    def check_presence(self) -> None:
        live = self.live()
        best: dict[str, dict[str, tuple[int, bytes, Any]]] = {}
        holders: dict[tuple[str, str], list[int]] = {}
        for sn in live:
            for topic, users in sn.presence.full_snapshot().items():
                for user, item in users.items():
                    key = (item["updated_at"], dumps_server(item["data"]))
                    cur = best.setdefault(topic, {}).get(user)
                    if cur is None or key > cur[:2]:
                        best[topic][user] = (key[0], key[1], item["data"])
                    holders.setdefault((topic, user), []).append(sn.index)
        for sn in live:
            for topic in PRESENCE_TOPICS:
                members = sn.presence.members(topic)
                want = best.get(topic, {})
                if set(members) != set(want):
                    self.fail(
                        f"n{sn.index} presence on {topic}: {sorted(members)}, "
                        f"expected {sorted(want)}"
                    )
                for user, info in members.items():
                    if info["data"] != want[user][2]:
                        self.fail(
                            f"n{sn.index} presence data of {user} on {topic}: {info['data']!r}"
                        )
                    local = sum(1 for u, t in sn.pconns.values() if (u, t) == (user, topic))
                    others = sum(1 for i in holders[(topic, user)] if i != sn.index)
                    if info["connections"] != local + others:
                        self.fail(
                            f"n{sn.index} counts {info['connections']} connections of {user} "
                            f"on {topic}, expected {local} local + {others} remote"
                        )

    def final_round(self) -> None:
        """Links are up and settled: every publication now reaches every subscriber."""
        first = len(self.pubs)
        for sn in self.live():
            for topic in TOPICS:
                self.op_pub(sn.index, topic)
        self.run_until(self.now + 2 * self.max_delay + 1.0)
        for pub in self.pubs[first:]:
            for sn in self.live():
                for sub in sn.subs:
                    if matches(sub.pattern, pub.topic) and sub.got[pub.pid] != 1:
                        self.fail(
                            f"final round: subscriber {sub.cid} ({sub.pattern!r}) on n{sn.index} "
                            f"got {pub.pid} ({pub.topic}) {sub.got[pub.pid]} times"
                        )

    def check_owed(self) -> None:
        """Every publication made while the publisher's link to a subscriber's node was
        up and settled was received exactly once."""
        d = self.max_delay
        # conns that came up at both ends, indexed by the pair of incarnations
        pairs: dict[tuple[int, int, int, int], list[tuple[float, float]]] = {}
        for conn in self.conns:
            a, b = conn.ends
            if a is None or b is None or a.up_at is None or b.up_at is None:
                continue
            window = (max(a.up_at, b.up_at), conn.disturbed_at)
            pairs.setdefault((a.node, a.inc, b.node, b.inc), []).append(window)
            pairs.setdefault((b.node, b.inc, a.node, a.inc), []).append(window)
        owed = 0
        for pub in self.pubs:
            for sub in self.subs:
                if not matches(sub.pattern, pub.topic):
                    continue
                if (sub.node, sub.inc) == (pub.node, pub.inc):
                    due = sub.start_seq < pub.seq and (sub.end_seq is None or sub.end_seq > pub.seq)
                else:
                    due = False
                    end = sub.end if sub.end is not None else float("inf")
                    for h0, h1 in pairs.get((pub.node, pub.inc, sub.node, sub.inc), ()):
                        if max(h0, sub.start) + d + EPS <= pub.t and pub.t + d + EPS <= min(
                            h1, end
                        ):
                            due = True
                            break
                if due:
                    owed += 1
                    if sub.got[pub.pid] != 1:
                        self.fail(
                            f"subscriber {sub.cid} ({sub.pattern!r}) on n{sub.node}#{sub.inc} got "
                            f"{pub.pid} ({pub.topic}, n{pub.node}#{pub.inc} at {pub.t:.3f}) "
                            f"{sub.got[pub.pid]} times"
                        )
        self.stats["owed"] = owed


def matches(pattern: str, topic: str) -> bool:
    return glob_match(pattern, topic) if is_glob(pattern) else pattern == topic


def run_seed(seed: int) -> Simulation:
    return Simulation(seed).run()


if __name__ == "__main__":  # python tests/cluster_sim.py SEED [SEED...] [--digest]
    args = [a for a in sys.argv[1:] if a != "--digest"]
    for arg in args or ["0"]:
        sim = run_seed(int(arg))
        if "--digest" in sys.argv:
            print(sim.digest())
        else:
            print(f"seed {arg}: ok, {len(sim.pubs)} publications, {dict(sim.stats)}")

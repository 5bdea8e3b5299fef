"""ClusterNode (spec/CLUSTER.md §8): backoff, circuit breaker, the F9a tiebreak (late
joiners, restarts, simultaneous dials), interest and routing, MSG variants and cross-node
recovery (F9b/F9c), presence sync and purge (F9d), gossip, DLQ, drain and shutdown, and
interop with the recorded traffic of two original nodes."""

from __future__ import annotations

import itertools
import json
import pathlib
import random
from collections import deque
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wse_proto.cluster import frames as cf
from wse_proto.cluster.link import CloseReason, LinkConfig
from wse_proto.cluster.mesh import (
    Backoff,
    BreakerState,
    CircuitBreaker,
    CloseLink,
    ClusterConfig,
    ClusterNode,
    Deliver,
    Dial,
    Intent,
    LinkDown,
    LinkUp,
    PresenceNotify,
    Send,
    valid_peer_address,
)
from wse_proto.errors import LocalProtocolError
from wse_proto.presence import PresenceState
from wse_proto.recovery import RecoveryStore, format_epoch
from wse_proto.topics import glob_match

DATA: dict[str, Any] = json.loads(
    (pathlib.Path(__file__).resolve().parent / "data" / "cluster.json").read_text("utf-8")
)
REC_A = "01a20492-c71a-73d3-97ab-a5d91ed28f29"
REC_B = "01a20492-c8e8-7b30-865d-cfbedfadc71e"
T0_MS = 1_795_373_000_000


def rand_of(seed: int) -> Any:
    return random.Random(seed).randbytes


def decode_all(data: bytes) -> list[cf.Frame]:
    reader = cf.FrameReader()
    reader.receive_data(data)
    out: list[cf.Frame] = []
    while batch := reader.frames():
        out.extend(batch)
    return out


# --------------------------------------------------------------------------- harness


class Net:
    """Nodes on a zero-delay, in-order network with a virtual clock. ``pump`` runs
    intents and deliveries until nothing moves; ``advance`` steps the clock through
    every due timer."""

    def __init__(self) -> None:
        self.now = 0.0
        self.nodes: dict[str, ClusterNode] = {}
        self.down: set[str] = set()
        self.ends: dict[tuple[str, int], tuple[str, int]] = {}
        self.queue: deque[tuple[str, int, bytes | None]] = deque()
        self.log: dict[str, list[Intent]] = {}
        self.wire: dict[tuple[str, int], list[bytes]] = {}  # what each link end sent
        self._port = 40000

    def add(
        self, address: str, instance: str, peers: tuple[str, ...] = (), **kw: Any
    ) -> ClusterNode:
        kw.setdefault("rand", rand_of(len(self.nodes)))
        node = ClusterNode(
            instance,
            wall_ms=lambda: T0_MS + int(self.now * 1000),
            now=self.now,
            address=address,
            peers=peers,
            **kw,
        )
        self.nodes[address] = node
        self.down.discard(address)
        self.log[address] = []
        node.handle_timer(self.now)
        return node

    def kill(self, address: str) -> None:
        """The process dies: its sockets close (peers see EOF), its state is gone."""
        self.down.add(address)
        for (addr, lid), (other, olid) in list(self.ends.items()):
            if addr == address:
                del self.ends[(addr, lid)]
                self.queue.append((other, olid, None))

    def pump(self) -> None:
        moved = True
        while moved:
            moved = False
            homes = {id(n): (a, n) for a, n in reversed(list(self.nodes.items()))}
            for address, node in homes.values():  # each node once, under its own address
                if address in self.down:
                    continue
                for intent in node.intents():
                    moved = True
                    self.log[address].append(intent)
                    self._do(address, node, intent)
            while self.queue:
                moved = True
                address, lid, data = self.queue.popleft()
                node = self.nodes[address]
                if address in self.down:
                    continue
                if data is None:
                    node.receive_eof(lid, self.now)
                else:
                    node.receive_data(lid, data, self.now)
                break  # run the intents it caused before the next delivery

    def _do(self, address: str, node: ClusterNode, intent: Intent) -> None:
        if isinstance(intent, Dial):
            target = self.nodes.get(intent.address)
            if target is None or intent.address in self.down:
                node.connection_failed(intent.link_id, self.now)
                return
            self._port += 1
            lid_b = target.accept(f"{address.rsplit(':', 1)[0]}:{self._port}", self.now)
            if lid_b is None:
                node.connection_failed(intent.link_id, self.now)
                return
            home = next(k for k, v in self.nodes.items() if v is target)  # aliases
            self.ends[(address, intent.link_id)] = (home, lid_b)
            self.ends[(home, lid_b)] = (address, intent.link_id)
            node.connection_made(intent.link_id, self.now)
        elif isinstance(intent, Send):
            self.wire.setdefault((address, intent.link_id), []).append(intent.data)
            other = self.ends.get((address, intent.link_id))
            if other is not None:
                self.queue.append((*other, intent.data))
        elif isinstance(intent, CloseLink):
            other = self.ends.pop((address, intent.link_id), None)
            if other is not None:
                self.ends.pop(other, None)
                self.queue.append((*other, None))

    def advance(self, seconds: float, step: float = 0.25) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + step)
            for address, node in self.nodes.items():
                if address in self.down:
                    continue
                dl = node.next_deadline()
                if dl is not None and dl <= self.now:
                    node.handle_timer(self.now)
            self.pump()

    def intents(self, address: str, cls: type) -> list[Any]:
        return [i for i in self.log[address] if isinstance(i, cls)]

    def linked(self, a: str, b: str) -> bool:
        na, nb = self.nodes[a], self.nodes[b]
        la, lb = na.link_of(nb.instance_id), nb.link_of(na.instance_id)
        if la is None or lb is None:
            return False
        return self.ends.get((a, la.link_id)) == (b, lb.link_id)

    def dialer_of(self, a: str, b: str) -> str:
        """Which node dialed the link a and b share."""
        link = self.nodes[a].link_of(self.nodes[b].instance_id)
        assert link is not None
        return a if link.role.value == "dialer" else b


def sent_frames(net: Net, src: str, dst: str, since: int = 0) -> list[cf.Frame]:
    link = net.nodes[src].link_of(net.nodes[dst].instance_id)
    assert link is not None
    return [f for d in net.wire.get((src, link.link_id), [])[since:] for f in decode_all(d)]


def wire_len(net: Net, src: str, dst: str) -> int:
    link = net.nodes[src].link_of(net.nodes[dst].instance_id)
    assert link is not None
    return len(net.wire.get((src, link.link_id), []))


A, B, C, D = "10.0.0.1:7000", "10.0.0.2:7000", "10.0.0.3:7000", "10.0.0.4:7000"


def mesh_of(n: int, **kw: Any) -> tuple[Net, list[str]]:
    net = Net()
    addrs = [f"10.0.0.{i + 1}:7000" for i in range(n)]
    for i, addr in enumerate(addrs):
        net.add(addr, f"id-{i:02d}", tuple(addrs[:i]), **kw)
        net.pump()
    net.advance(3.0)
    return net, addrs


# --------------------------------------------------------------------------- backoff, breaker


def fixed_rand(byte: int) -> Any:
    return lambda n: bytes([byte]) * n


def half_rand(n: int) -> bytes:
    """Jitter draw u = 0.5 exactly: the factor is 1.0."""
    return b"\x80" + b"\x00" * (n - 1)


def test_backoff_sequence_cap_and_jitter() -> None:
    mid = Backoff(ClusterConfig(), half_rand)
    delays = [mid.next_delay() for _ in range(14)]
    expected = [min(1.5**i, 60.0) for i in range(14)]
    assert delays == pytest.approx(expected)
    low = Backoff(ClusterConfig(), fixed_rand(0x00))
    high = Backoff(ClusterConfig(), fixed_rand(0xFF))
    assert low.next_delay() == pytest.approx(0.8)
    assert 1.199 < high.next_delay() < 1.2
    for _ in range(3000):  # no overflow however long it fails
        low.next_delay()
    assert low.next_delay() == pytest.approx(48.0)
    low.reset()
    assert low.next_delay() == pytest.approx(0.8)


@given(seed=st.integers(0, 2**32))
@settings(max_examples=60, deadline=None)
def test_backoff_jitter_stays_in_range(seed: int) -> None:
    backoff = Backoff(ClusterConfig(), rand_of(seed))
    for _ in range(20):
        base = backoff.base()
        assert 0.8 * base <= backoff.next_delay() < 1.2 * base


def test_circuit_breaker() -> None:
    br = CircuitBreaker()
    for i in range(9):
        assert br.allow(float(i))
        br.record_failure(float(i))
    assert br.state == BreakerState.CLOSED
    br.record_success()  # a success resets the count
    for _ in range(10):
        br.record_failure(100.0)
    assert br.state == BreakerState.OPEN
    assert not br.allow(159.9) and br.ready_at(120.0) == 160.0
    assert br.allow(160.0) and br.state == BreakerState.HALF_OPEN
    assert br.allow(160.0) and br.allow(160.0) and not br.allow(160.0)  # 3 at a time
    assert br.ready_at(160.0) is None
    br.record_success()
    br.record_success()
    assert br.state == BreakerState.HALF_OPEN
    br.record_success()
    assert br.state == BreakerState.CLOSED
    for _ in range(10):
        br.record_failure(200.0)
    assert br.allow(260.0)
    br.record_failure(260.0)  # a half-open failure reopens at once
    assert br.state == BreakerState.OPEN and br.open_until == 320.0


def test_config_validation() -> None:
    for kw in ({"backoff_factor": 0.5}, {"jitter_min": 2.0}, {"dlq_size": 0}, {"dial_timeout": 0}):
        with pytest.raises(ValueError):
            ClusterConfig(**kw)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        ClusterNode("", rand=rand_of(0), wall_ms=lambda: 0, now=0.0)


@pytest.mark.parametrize(
    ("address", "ok"),
    [
        ("127.0.0.1:18311", True),
        ("[::1]:7000", True),
        ("10.0.0.1:0", False),
        ("10.0.0.1:65536", False),
        ("localhost:7000", False),
        ("10.0.0.1", False),
        ("::1:7000", False),
        ("10.0.0.1:+80", False),
        ("10.0.0.1:٣", False),
    ],
)
def test_peer_address_validation(address: str, ok: bool) -> None:
    assert valid_peer_address(address) is ok


# --------------------------------------------------------------------------- tiebreak (F9a)


def test_late_joiner_with_higher_id_is_answered() -> None:
    """The original refuses a higher-id dialer forever; wse-py links (F9a)."""
    net = Net()
    net.add(A, "id-1")
    net.add(B, "id-2", (A,))  # later, higher id, knows only A
    net.pump()
    assert net.linked(A, B) and net.dialer_of(A, B) == B
    assert [u.instance_id for u in net.intents(A, LinkUp)] == ["id-2"]


def test_simultaneous_dials_keep_the_link_of_the_lower_id() -> None:
    net = Net()
    net.add(A, "id-1", (B,))
    net.add(B, "id-2", (A,))  # both have dialed before anything is delivered
    net.pump()
    assert net.linked(A, B) and net.dialer_of(A, B) == A
    assert net.nodes[A].peer_count == net.nodes[B].peer_count == 1
    net.advance(120.0)  # stable: no more dials, no churn
    assert net.linked(A, B)
    assert not net.intents(A, LinkDown)[1:] and not net.intents(B, LinkDown)[1:]


def test_restarted_lower_node_relinks() -> None:
    """Original bug: after the lower-id node restarts (new, higher id) the pair never
    links again. Here the old peer dials it back and is answered."""
    net = Net()
    net.add(A, "id-1")
    net.add(B, "id-2", (A,))
    net.pump()
    net.kill(A)
    net.pump()
    assert net.nodes[B].peer_count == 0
    net.advance(0.5)
    net.add(A, "id-3")  # same address, new higher id, no configured peers
    net.advance(5.0)
    assert net.linked(A, B)
    assert net.nodes[B].peers() == ["id-3"]


def test_acceptor_holding_the_preferred_link_refuses_without_answering() -> None:
    net = Net()
    net.add(A, "id-1", (B,))
    net.add(B, "id-2")
    net.pump()
    assert net.dialer_of(A, B) == A
    # B now dials A on its own (a fresh connection): A already holds the better link.
    lid_a = net.nodes[A].accept("10.0.0.2:50000", net.now)
    assert lid_a is not None
    hello_b = cf.encode(cf.Hello(1, "id-2", cf.OUR_CAPABILITIES))
    net.nodes[A].receive_data(lid_a, hello_b, net.now)
    intents = net.nodes[A].intents()
    assert intents == [CloseLink(lid_a)]  # no Send: no HELLO answer
    assert net.linked(A, B)


def test_a_second_link_from_the_same_dialer_replaces_the_old_one() -> None:
    """The dialer only dials again when it believes the old link dead: newest wins."""
    net = Net()
    net.add(A, "id-1")
    net.add(B, "id-2", (A,))
    net.pump()
    old = net.nodes[A].link_of("id-2")
    assert old is not None
    # B's side of the link died silently (A has not noticed): B reconnects.
    b_old = net.nodes[B].link_of("id-1")
    assert b_old is not None
    del net.ends[(B, b_old.link_id)]
    net.nodes[B].connection_lost(b_old.link_id, net.now)
    net.advance(2.0)
    assert net.linked(A, B)
    new = net.nodes[A].link_of("id-2")
    assert new is not None and new is not old
    downs = net.intents(A, LinkDown)
    assert [(d.link_id, d.reason) for d in downs] == [(old.link_id, CloseReason.SUPERSEDED)]


def test_own_address_is_refused_and_never_dialed_again() -> None:
    net = Net()
    alias = "127.0.0.1:7000"
    node = net.add(A, "id-1", (alias,))
    net.nodes[alias] = node  # the alias reaches the same node
    net.log[alias] = []
    net.pump()
    assert node.peer_count == 0
    state = node.address_state(alias)
    assert state is not None and not state["dialing"]
    net.advance(300.0)
    assert len(net.intents(A, Dial)) == 1


def test_failed_dials_back_off_then_open_the_breaker() -> None:
    net = Net()
    node = net.add(A, "id-1", (B,), rand=half_rand)  # jitter factor exactly 1
    net.pump()
    times = [0.0]  # the first dial, at once
    for _ in range(14):
        dl = node.next_deadline()
        assert dl is not None
        net.now = dl
        node.handle_timer(dl)
        net.pump()
        times.append(dl)
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(times)]
    assert gaps[:9] == [round(1.5**i, 6) for i in range(9)]
    assert gaps[9] == 60.0  # 10th failure opened the breaker: 60 s, longer than 1.5**9
    state = node.address_state(B)
    assert state is not None and state["static"] and state["failures"] == 15


def test_discovered_addresses_are_forgotten_static_ones_not() -> None:
    net = Net()
    net.add(A, "id-1")
    net.add(B, "id-2", (A,))
    net.pump()
    node_b = net.nodes[B]
    node_b.receive_data(
        node_b.link_of("id-1").link_id,  # type: ignore[union-attr]
        cf.encode(cf.PeerList(("10.0.0.9:7000",))),
        net.now,
    )
    net.pump()
    assert "10.0.0.9:7000" in node_b.known_addresses()
    net.advance(1500.0, step=1.0)
    assert "10.0.0.9:7000" not in node_b.known_addresses()
    assert A in node_b.known_addresses() and net.linked(A, B)


# --------------------------------------------------------------------------- gossip


def test_late_joiner_through_one_seed_gets_a_full_mesh() -> None:
    net, addrs = mesh_of(3)
    net.add(D, "id-09", (addrs[0],))  # knows only the first node
    net.advance(5.0)
    for x in [*addrs, D]:
        for y in [*addrs, D]:
            if x != y:
                assert net.linked(x, y), (x, y)
    assert all(net.nodes[x].peer_count == 3 for x in [*addrs, D])


def test_gossip_validates_and_caps_the_address_book() -> None:
    net, (a, _, _) = mesh_of(3, config=ClusterConfig(max_peers=5))
    node = net.nodes[a]
    lb, lc = node.link_of("id-01"), node.link_of("id-02")
    assert lb is not None and lc is not None
    bad = cf.encode(cf.PeerList(("example.com:7000", "10.0.0.7:99999")))
    node.receive_data(lb.link_id, bad + cf.encode(cf.PeerAnnounce("host:1")), net.now)
    assert node.metrics.invalid_addresses == 3
    more = cf.encode(cf.PeerList(tuple(f"10.0.1.{i}:7000" for i in range(10))))
    node.receive_data(lb.link_id, more, net.now)
    assert len(node.known_addresses()) == 5  # max_peers
    # A full book neither learns nor forwards a new address.
    before = wire_len(net, a, "10.0.0.3:7000")
    node.receive_data(lb.link_id, cf.encode(cf.PeerAnnounce("10.0.0.6:7000")), net.now)
    net.pump()
    assert "10.0.0.6:7000" not in node.known_addresses()
    assert cf.PeerAnnounce("10.0.0.6:7000") not in sent_frames(net, a, "10.0.0.3:7000", before)
    assert lc.is_open


def test_new_announced_address_is_forwarded_to_other_peers_only() -> None:
    net, (a, _, _) = mesh_of(3)
    node = net.nodes[a]
    lb, lc = node.link_of("id-01"), node.link_of("id-02")
    assert lb is not None and lc is not None
    before_b = len(net.wire.get((a, lb.link_id), []))
    before_c = len(net.wire.get((a, lc.link_id), []))
    node.receive_data(lb.link_id, cf.encode(cf.PeerAnnounce("10.0.0.8:7000")), net.now)
    net.pump()
    to_b = [f for d in net.wire[(a, lb.link_id)][before_b:] for f in decode_all(d)]
    to_c = [f for d in net.wire[(a, lc.link_id)][before_c:] for f in decode_all(d)]
    assert cf.PeerAnnounce("10.0.0.8:7000") in to_c
    assert cf.PeerAnnounce("10.0.0.8:7000") not in to_b
    assert "10.0.0.8:7000" in node.known_addresses()


# --------------------------------------------------------------------------- interest, routing


def test_interest_is_refcounted_and_resynced() -> None:
    net, (a, b) = mesh_of(2)
    na, nb = net.nodes[a], net.nodes[b]
    start = wire_len(net, a, b)
    assert na.subscribe("room", net.now) and not na.subscribe("room", net.now)
    assert na.subscribe("r*", net.now)
    assert not na.unsubscribe("room", net.now) and na.unsubscribe("room", net.now)
    assert not na.unsubscribe("room", net.now)
    net.pump()
    assert sent_frames(net, a, b, start) == [cf.Sub("room"), cf.Sub("r*"), cf.Unsub("room")]
    view = nb.peer_interest("id-00")
    assert view is not None and view.topics() == {"r*"} and not view.known
    net.advance(61.0)  # periodic RESYNC makes it known
    assert view.known and view.topics() == {"r*"}


def test_publications_follow_interest() -> None:
    net, (a, b, c) = mesh_of(3)
    for addr, topic in ((b, "room.*"), (c, "news")):
        net.nodes[addr].subscribe(topic, net.now)
    net.advance(61.0)  # RESYNCs: interest known everywhere
    na = net.nodes[a]
    assert na.publish("room.1", b'{"x":1}', net.now) == 1
    assert na.publish("news", b'{"x":2}', net.now) == 1
    assert na.publish("other", b'{"x":3}', net.now) == 0
    net.pump()
    got = {addr: [(i.topic, i.payload) for i in net.intents(addr, Deliver)] for addr in (b, c)}
    assert got == {b: [("room.1", b'{"x":1}')], c: [("news", b'{"x":2}')]}


def test_unknown_interest_gets_everything() -> None:
    net, (a, b) = mesh_of(2)  # b has no interest: it never sends RESYNC
    assert net.nodes[a].publish("anything", b"{}", net.now) == 1
    net.pump()
    assert [i.topic for i in net.intents(b, Deliver)] == ["anything"]


def test_msg_variant_per_peer_capabilities() -> None:
    """CLUSTER §7: trailer for bit3 peers when the topic has a buffer, zstd for bit1 peers;
    one frame object per variant."""
    net = Net()
    net.add(A, "id-1")
    caps = {B: cf.OUR_CAPABILITIES, C: cf.CAP_INTEREST | cf.CAP_PRESENCE, D: 0x0B & ~cf.CAP_ZSTD}
    for addr, cap in caps.items():
        net.add(
            addr, f"id-{addr[7]}", (A,), config=ClusterConfig(link=LinkConfig(capabilities=cap))
        )
        net.pump()
    node = net.nodes[A]
    node_b = net.nodes[B]
    starts = {addr: wire_len(net, A, addr) for addr in caps}
    payload = b'{"tp":"t","e":"0000abcd","o":7,"pad":"' + b"z" * 600 + b'"}'
    assert node.publish("t", payload, net.now, epoch=0xABCD, offset=7) == 3
    net.pump()
    frames = {addr: sent_frames(net, A, addr, starts[addr]) for addr in caps}
    assert frames[B] == [cf.Msg("t", payload, 0xABCD, 7)]
    assert frames[C] == [cf.Msg("t", payload)]
    assert frames[D] == [cf.Msg("t", payload, 0xABCD, 7)]
    raw = {
        addr: net.wire[(A, node.link_of(net.nodes[addr].instance_id).link_id)][-1] for addr in caps
    }  # type: ignore[union-attr]
    assert raw[B][5] == cf.FLAG_ZSTD | cf.FLAG_TRAILER and raw[D][5] == cf.FLAG_TRAILER
    assert raw[C][5] == 0 and len(raw[B]) < len(raw[D])
    assert node_b is not None
    # Without a recovery stamp: no trailer for anybody, zstd still where negotiated.
    node.publish("t", payload, net.now)
    net.pump()
    assert net.wire[(A, node.link_of("id-2").link_id)][-1][5] == cf.FLAG_ZSTD  # type: ignore[union-attr]


def test_peer_drain_stops_routing_until_its_next_resync() -> None:
    net, (a, b) = mesh_of(2)
    nb = net.nodes[b]
    nb.subscribe("t", net.now)
    net.advance(61.0)
    nb.drain(net.now)
    net.pump()
    assert net.nodes[a].publish("t", b"{}", net.now) == 0
    assert net.nodes[a].link_of("id-01") is not None  # the link stays
    net.advance(61.0)
    assert net.nodes[a].publish("t", b"{}", net.now) == 1


_TOPICS = ("a", "b.1", "b.2", "c")
_PATTERNS = ("a", "b.1", "b.*", "?.2", "*")


@given(
    ops=st.lists(
        st.tuples(
            st.integers(0, 2),
            st.sampled_from(("sub", "unsub", "pub", "resync")),
            st.integers(0, 4),
        ),
        max_size=30,
    )
)
@settings(max_examples=40, deadline=None)
def test_routing_follows_refcounted_interest(ops: list[tuple[int, str, int]]) -> None:
    """On an in-order network, after every operation: each node's view of each peer is
    that peer's local interest, and a publication reaches every node with a matching
    subscription exactly once, and no node whose interest is known and does not match."""
    net, addrs = mesh_of(3)
    local: list[dict[str, int]] = [{}, {}, {}]
    for n, (i, op, k) in enumerate(ops):
        node = net.nodes[addrs[i]]
        if op == "sub":
            node.subscribe(_PATTERNS[k], net.now)
            local[i][_PATTERNS[k]] = local[i].get(_PATTERNS[k], 0) + 1
        elif op == "unsub" and local[i].get(_PATTERNS[k]):
            node.unsubscribe(_PATTERNS[k], net.now)
            local[i][_PATTERNS[k]] -= 1
            if not local[i][_PATTERNS[k]]:
                del local[i][_PATTERNS[k]]
        elif op == "resync":
            net.advance(60.0, step=5.0)
        elif op == "pub":
            topic = _TOPICS[k % len(_TOPICS)]
            seen = {a: len(net.intents(a, Deliver)) for a in addrs}
            node.publish(topic, b'{"n":%d}' % n, net.now)
        net.pump()
        for j, a in enumerate(addrs):
            for other_j, other in enumerate(addrs):
                if other_j == j:
                    continue
                view = net.nodes[a].peer_interest(net.nodes[other].instance_id)
                assert view is not None and view.topics() == set(local[other_j])
        if op != "pub":
            continue
        for j, a in enumerate(addrs):
            if j == i:
                continue
            got = [d for d in net.intents(a, Deliver)[seen[a] :] if d.payload == b'{"n":%d}' % n]
            view = net.nodes[addrs[i]].peer_interest(net.nodes[a].instance_id)
            assert view is not None
            wanted = any(glob_match(p, topic) for p in local[j])
            if wanted:
                assert len(got) == 1
            elif view.known:
                assert got == []


# --------------------------------------------------------------------------- recovery (F9b, F9c)


def test_cross_node_recovery_with_the_origins_epoch() -> None:
    net = Net()
    store_a = RecoveryStore(None, rand_of(1))
    store_b = RecoveryStore(None, rand_of(2))
    net.add(A, "id-1", recovery=store_a)
    net.add(B, "id-2", (A,), recovery=store_b)
    net.pump()
    net.nodes[B].subscribe("room", net.now)
    net.pump()
    stamped = []
    for i in range(5):
        res = store_a.publish("room", b'{"n":%d}' % i, net.now)
        assert res is not None
        stamped.append(res[0])
        net.nodes[A].publish("room", res[0], net.now, epoch=res[1], offset=res[2])
    net.pump()
    # Remote subscribers get the stamped text (F9c), exactly as local ones did.
    assert [i.payload for i in net.intents(B, Deliver)] == stamped
    epoch = format_epoch(res[1])
    # A client that saw offsets 0..1 through A recovers 2..4 on B (F9b offsets).
    outcome = store_b.recover("room", epoch, 1, net.now)
    assert outcome.recovered and outcome.messages == stamped[2:]
    assert outcome.epoch == epoch and outcome.offset == 4
    assert store_b.position("room") is None  # B never stamps or buffers remote payloads


# --------------------------------------------------------------------------- presence


def test_presence_sync_full_snapshot_and_purge_on_link_loss() -> None:
    net = Net()
    pa, pb = PresenceState(), PresenceState()
    net.add(A, "id-1", presence=pa)
    early = pa.join("lobby", "alice", "c1", {"s": 1}, T0_MS).events
    net.nodes[A].sync_presence(early, net.now)  # no peers yet
    net.add(B, "id-2", (A,), presence=pb)
    net.pump()
    assert pb.members("lobby") == {"alice": {"data": {"s": 1}, "connections": 1}}  # FULL
    events = pb.join("lobby", "bob", "c2", {"s": 2}, T0_MS + 5).events
    net.nodes[B].sync_presence(events, net.now)
    net.pump()
    assert set(pa.members("lobby")) == {"alice", "bob"}
    notes = net.intents(A, PresenceNotify)
    assert [(n.event.kind, n.event.user_id) for n in notes] == [("presence_join", "bob")]
    update = pa.update("c1", {"s": 9}, T0_MS + 9)
    net.nodes[A].sync_presence(update, net.now)
    net.pump()
    assert pb.members("lobby")["alice"]["data"] == {"s": 9}
    # The link ends (an accepted link on A's side: F9d cleanup runs all the same).
    net.kill(B)
    net.pump()
    assert set(pa.members("lobby")) == {"alice"}
    assert net.nodes[A].peer_count == 0 and net.nodes[A].cluster_info() == []
    assert [n.event.kind for n in net.intents(A, PresenceNotify)][-1] == "presence_leave"


def test_presence_leave_and_invalid_updates() -> None:
    net = Net()
    pa, pb = PresenceState(), PresenceState()
    net.add(A, "id-1", presence=pa)
    net.add(B, "id-2", (A,), presence=pb)
    net.pump()
    net.nodes[A].sync_presence(pa.join("room", "u", "c1", {}, T0_MS).events, net.now)
    net.pump()
    assert "u" in pb.members("room")
    link = net.nodes[B].link_of("id-1")
    assert link is not None
    bad = cf.encode(cf.PresenceUpdate("room", 0, T0_MS, "v", b"{not json"))
    unknown_action = cf.encode(cf.PresenceUpdate("room", 7, T0_MS, "w", b"{}"))
    net.nodes[B].receive_data(link.link_id, bad + unknown_action, net.now)
    assert set(pb.members("room")) == {"u"} and net.nodes[B].metrics.presence_ignored == 1
    net.nodes[A].sync_presence(pa.leave("room", "c1", T0_MS + 1), net.now)
    net.pump()
    assert pb.members("room") == {}


def test_presence_needs_capability_bit2() -> None:
    net = Net()
    pa, pb = PresenceState(), PresenceState()
    net.add(A, "id-1", presence=pa)
    cfg = ClusterConfig(link=LinkConfig(capabilities=cf.CAP_INTEREST))
    net.add(B, "id-2", (A,), presence=pb, config=cfg)
    net.pump()
    assert net.nodes[A].sync_presence(pa.join("r", "u", "c", {}, T0_MS).events, net.now) == 0
    net.pump()
    assert pb.members("r") == {}


# --------------------------------------------------------------------------- lifecycle, limits


def test_shutdown_tells_peers_which_reconnect_with_backoff() -> None:
    net, (a, b) = mesh_of(2)
    net.nodes[a].shutdown(net.now)
    net.pump()
    assert [d.reason for d in net.intents(b, LinkDown)] == [CloseReason.PEER_SHUTDOWN]
    assert [d.reason for d in net.intents(a, LinkDown)] == [CloseReason.SHUTDOWN]
    assert net.nodes[a].accept("1.2.3.4:5", net.now) is None
    dials_before = len(net.intents(b, Dial))
    net.advance(0.7)
    assert len(net.intents(b, Dial)) == dials_before  # not before ~1 s (jittered)
    net.advance(1.0)
    assert len(net.intents(b, Dial)) == dials_before + 1


def test_inbound_limit() -> None:
    node = ClusterNode(
        "id", rand=rand_of(0), wall_ms=lambda: 0, now=0.0, config=ClusterConfig(max_inbound=2)
    )
    first = node.accept("1.1.1.1:1", 0.0)
    assert first is not None and node.accept("1.1.1.1:2", 0.0) is not None
    assert node.accept("1.1.1.1:3", 0.0) is None
    node.receive_eof(first, 0.0)
    assert node.accept("1.1.1.1:4", 0.0) is not None


def test_malformed_frame_drops_the_link_and_counts() -> None:
    net, (a, b) = mesh_of(2)
    link = net.nodes[a].link_of("id-01")
    assert link is not None
    net.nodes[a].receive_data(link.link_id, b"\x00\x00\x00\x00", net.now)
    net.pump()
    assert net.nodes[a].metrics.frames_rejected == 1
    assert [d.reason for d in net.intents(a, LinkDown)] == [CloseReason.MALFORMED]
    net.advance(5.0)
    assert net.linked(a, b)  # and it came back


def test_dead_letters_from_unsent_bytes_and_cap() -> None:
    net, (a, _) = mesh_of(2, config=ClusterConfig(dlq_size=3))
    node = net.nodes[a]
    link = node.link_of("id-01")
    assert link is not None
    unsent = b"".join(cf.encode_msg("t", b"%d" % i) for i in range(5))
    unsent += cf.encode(cf.PresenceUpdate("room", 1, 5, "u", b"{}"))
    node.connection_lost(link.link_id, net.now, unsent=unsent)
    assert node.dlq_size == 3 and node.metrics.dead_letters == 6
    letters = node.take_dead_letters()
    assert [(d.topic, d.payload, d.error) for d in letters] == [
        ("t", b"3", "peer channel closed"),
        ("t", b"4", "peer channel closed"),
        ("room", b"{}", "presence update failed"),
    ]
    assert node.dlq_size == 0 and letters[0].peer_addr == link.address


# --------------------------------------------------------------------------- original nodes


def recorded(name: str) -> list[dict[str, Any]]:
    return list(DATA["frames"][name])


def test_against_the_recorded_original_node_b() -> None:
    """wse-py in node A's place: dials B, answers B's setup, routes by B's interest, and
    writes the recorded bytes for the small publications."""
    a_rec = recorded("proxy to B #1 to B [HELLO from A]")
    b_rec = recorded("proxy to B #1 from B [HELLO from B]")
    a_addr, b_addr = "127.0.0.1:18311", "127.0.0.1:18312"
    node = ClusterNode(
        REC_A, rand=rand_of(0), wall_ms=lambda: T0_MS, now=0.0, address=a_addr, peers=(b_addr,)
    )
    node.handle_timer(0.0)
    (dial,) = node.intents()
    assert dial == Dial(dial.link_id, b_addr)  # type: ignore[attr-defined]
    lid = dial.link_id  # type: ignore[attr-defined]
    node.connection_made(lid, 0.1)
    out = b"".join(i.data for i in node.intents() if isinstance(i, Send))
    node.receive_data(lid, bytes.fromhex(b_rec[0]["raw_hex"]), 0.2)  # B's HELLO
    intents = node.intents()
    out += b"".join(i.data for i in intents if isinstance(i, Send))
    assert LinkUp(lid, REC_B, b_addr, 0x0F) in intents
    assert out == b"".join(bytes.fromhex(r["raw_hex"]) for r in a_rec[:3])
    for rec in b_rec[1:4]:  # RESYNC bench, PEER_ANNOUNCE, PEER_LIST
        node.receive_data(lid, bytes.fromhex(rec["raw_hex"]), 0.3)
    node.intents()
    assert node.address_state(b_addr)["instance_id"] == REC_B  # type: ignore[index]
    # Publications: 'bench' goes to B, 'nobody' does not (B's RESYNC said bench only).
    msgs = [r for r in a_rec if r["type"] == "MSG"]
    small = msgs[0]
    payload = small["payload_text"].encode()
    assert node.publish("bench", payload, 1.0) == 1
    (send,) = [i for i in node.intents() if isinstance(i, Send)]
    assert send.data == bytes.fromhex(small["raw_hex"])
    assert node.publish("nobody", payload, 1.0) == 0
    # B: SUB news, UNSUB news, ... UNSUB bench, SHUTDOWN.
    for rec in b_rec[4:]:
        node.receive_data(lid, bytes.fromhex(rec["raw_hex"]), 2.0)
    intents = node.intents()
    assert LinkDown(lid, REC_B, b_addr, CloseReason.PEER_SHUTDOWN) in intents
    assert node.peer_count == 0
    deadline = node.next_deadline()
    assert deadline is not None and 2.8 <= deadline <= 3.2  # redial after ~1 s

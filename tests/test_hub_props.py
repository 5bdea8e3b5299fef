"""Stateful property test of ServerCore fan-out against a simple model.

Real clients connect (real upgrade, real JWT), subscribe to exact topics and globs,
join queue groups, unsubscribe and disconnect in random order while publications
flow, with output flushed at random points. After every step each live client must
have received exactly the publications the model says, each once (per subscription
kind), in publication order; nothing may arrive after unsubscribe or disconnect.
"""

from __future__ import annotations

import re
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)
from test_hub import Net, Peer

TOPICS = ["a", "b", "a.b", "a.c", "é", "x"]
PATTERNS = ["a*", "a.?", "*", "??", "?", "é"]
GROUP_TOPICS = ["a", "a.b"]
GROUPS = ["g1", "g2"]


def model_match(pattern: str, topic: str) -> bool:
    """Independent byte-glob: ``*`` any bytes, ``?`` one byte (reference §10.2)."""
    if "*" not in pattern and "?" not in pattern:
        return pattern == topic
    parts = [
        b".*" if c == b"*" else b"." if c == b"?" else re.escape(c)
        for c in (bytes((x,)) for x in pattern.encode())
    ]
    return re.fullmatch(b"".join(parts), topic.encode(), flags=re.S) is not None


class HubMachine(RuleBasedStateMachine):
    peers = Bundle("peers")

    def __init__(self) -> None:
        super().__init__()
        self.net = Net(seed=7)
        self.subs: dict[str, set[str]] = {}  # conn id -> fan-out subscriptions
        self.groups: dict[tuple[str, str], list[str]] = {}  # (topic, group) -> members
        self.counters: dict[tuple[str, str], int] = {}
        self.expected: dict[str, list[int]] = {}
        self.gone: dict[str, tuple[Peer, int]] = {}  # closed peers and what they had
        self.by_id: dict[str, Peer] = {}
        self.seq = 0
        self.deliveries = 0

    # ------------------------------------------------------------------ rules

    @initialize(target=peers)
    def first_peers(self) -> Any:
        return multiple(self.connect(False), self.connect(True))

    @precondition(lambda self: len(self.by_id) < 6)
    @rule(target=peers, encryption=st.booleans())
    def connect(self, encryption: bool) -> Peer:
        peer = self.net.connect(encryption=encryption)
        self.by_id[peer.id] = peer
        self.subs[peer.id] = set()
        self.expected[peer.id] = []
        return peer

    @rule(peer=peers, topics=st.lists(st.sampled_from(TOPICS + PATTERNS), max_size=4))
    def subscribe(self, peer: Peer, topics: list[str]) -> None:
        self.net.core.subscribe(peer.id, topics)
        self.subs[peer.id].update(topics)

    @rule(peer=peers, topic=st.sampled_from(GROUP_TOPICS), group=st.sampled_from(GROUPS))
    def join_group(self, peer: Peer, topic: str, group: str) -> None:
        self.net.core.subscribe(peer.id, [topic], queue_group=group)
        members = self.groups.setdefault((topic, group), [])
        if peer.id not in members:
            members.append(peer.id)
            self.counters.setdefault((topic, group), 0)

    @rule(
        peer=peers,
        topics=st.none() | st.lists(st.sampled_from(TOPICS + PATTERNS), max_size=3),
    )
    def unsubscribe(self, peer: Peer, topics: list[str] | None) -> None:
        self.net.core.unsubscribe(peer.id, topics)
        if topics is None:
            self.subs[peer.id].clear()
            self._leave_groups(peer.id, lambda _t: True)
        else:
            self.subs[peer.id].difference_update(topics)
            self._leave_groups(peer.id, lambda t: t in topics)

    def _leave_groups(self, cid: str, which: Any) -> None:
        for (topic, group), members in list(self.groups.items()):
            if which(topic) and cid in members:
                members.remove(cid)
                if not members:
                    del self.groups[(topic, group)]
                    del self.counters[(topic, group)]

    @rule(topic=st.sampled_from(TOPICS))
    def publish(self, topic: str) -> None:
        self.seq += 1
        n = self.seq
        sent = self.net.core.broadcast_local(topic, f'{{"t":"m","p":{{"n":{n}}}}}')
        want = 0
        for cid, subs in self.subs.items():
            if any(model_match(s, topic) for s in subs):
                self.expected[cid].append(n)
                want += 1
        for (t, group), members in self.groups.items():
            if t == topic:
                count = self.counters[(t, group)]
                self.counters[(t, group)] = count + 1
                self.expected[members[count % len(members)]].append(n)
                want += 1
        assert sent == want
        self.deliveries += want

    @rule()
    def flush(self) -> None:
        self.net.pump()

    @rule(peer=consumes(peers), how=st.sampled_from(["client", "server", "lost"]))
    def disconnect(self, peer: Peer, how: str) -> None:
        self.net.pump()
        self._check_peer(peer)
        if how == "client":
            peer.client.close(1000)
        elif how == "server":
            self.net.core.disconnect(peer.id)
        else:
            self.net.core.connection_lost(peer.conn, self.net.now)
        self.net.pump()
        cid = peer.id
        del self.by_id[cid], self.subs[cid], self.expected[cid]
        self._leave_groups(cid, lambda _t: True)
        self.gone[cid] = (peer, len(peer.received))
        assert cid not in self.net.core.get_connections()

    # ------------------------------------------------------------------ checks

    def _check_peer(self, peer: Peer) -> None:
        got = [m["p"]["n"] for m in peer.received]
        assert got == self.expected[peer.id]

    @invariant()
    def everyone_got_exactly_their_publications(self) -> None:
        self.net.pump()
        for peer in self.by_id.values():
            self._check_peer(peer)
        for peer, count in self.gone.values():
            assert len(peer.received) == count  # nothing after disconnect
        core = self.net.core
        assert sorted(core.get_connections()) == sorted(self.by_id)
        assert core.metrics.messages_sent == self.deliveries
        for (topic, group), members in self.groups.items():
            assert core.get_queue_group_info(topic)[group] == len(members)


HubMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestHubStateful = HubMachine.TestCase

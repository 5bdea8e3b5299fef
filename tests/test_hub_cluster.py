"""HubCluster: the glue between ServerCore and ClusterNode (spec/CLUSTER.md §8).

Real ServerCores with real clients (tests/test_hub.py's ``Net``) and real ClusterNodes
on the in-memory network of tests/test_cluster_mesh.py; nothing is mocked.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from test_cluster_mesh import Net as Mesh
from test_hub import Net, jwt_config

from wse_proto.cluster.mesh import ClusterNode, Deliver
from wse_proto.hub_cluster import HubCluster

TOPICS = ["a", "b", "x.*", "x.1"]


def core_interest(net: Net) -> Counter[str]:
    """Fan-out subscriptions per topic, counted per connection (CLUSTER §8.3)."""
    out: Counter[str] = Counter()
    for member in net.core._members.values():
        out.update(list(member.topics))
    return out


ops = st.lists(
    st.tuples(
        st.sampled_from(["sub", "unsub", "group", "unsub_all", "disconnect"]),
        st.integers(0, 2),
        st.lists(st.sampled_from(TOPICS), min_size=1, max_size=3),
    ),
    max_size=25,
)


@settings(max_examples=30, deadline=None)
@given(ops)
def test_node_interest_counts_every_connection_subscription(script: list[Any]) -> None:
    net = Net()
    node = ClusterNode("me", rand=net.rng.randbytes, wall_ms=lambda: 0, now=0.0)
    peers = [net.connect() for _ in range(3)]
    net.core.subscribe(peers[0].id, ["a"])  # made before the glue: counted at attach
    woken: list[int] = []
    HubCluster(net.core, node, lambda: net.now, lambda: woken.append(1))
    for op, i, topics in script:
        cid = peers[i].id
        if op == "sub":
            net.core.subscribe(cid, topics)
        elif op == "group":
            net.core.subscribe(cid, topics, queue_group="g")  # queue groups: no interest
        elif op == "unsub":
            net.core.unsubscribe(cid, topics)
        elif op == "unsub_all":
            net.core.unsubscribe(cid, None)
        else:
            net.core.disconnect(cid)
            net.pump()
        assert Counter(node._interest) == core_interest(net)
    assert sorted(node.local_interest()) == sorted(core_interest(net))


def two_nodes(recovery: bool) -> tuple[Mesh, list[Net], list[HubCluster]]:
    mesh = Mesh()
    cores = [Net(jwt_config(recovery_enabled=recovery), seed=i) for i in range(2)]
    glues = []
    for i, (addr, net) in enumerate(zip(["10.0.0.1:7000", "10.0.0.2:7000"], cores, strict=True)):
        rec = net.core._recovery
        node = mesh.add(addr, f"id-{i}", ("10.0.0.1:7000",) if i else (),
                        recovery=rec.store if rec is not None else None)  # fmt: skip
        glues.append(HubCluster(net.core, node, lambda: mesh.now))
        mesh.pump()
    mesh.advance(3.0)
    assert mesh.linked("10.0.0.1:7000", "10.0.0.2:7000")
    return mesh, cores, glues


def deliver_all(mesh: Mesh, glues: list[HubCluster], seen: dict[str, int]) -> None:
    """Carry the Deliver intents logged since the last call into the receiving core."""
    for addr, glue in zip(["10.0.0.1:7000", "10.0.0.2:7000"], glues, strict=True):
        delivers = mesh.intents(addr, Deliver)
        for intent in delivers[seen.get(addr, 0) :]:
            glue.handle(intent)
        seen[addr] = len(delivers)


def test_publish_carries_the_stamped_bytes_and_deliver_does_not_republish() -> None:
    mesh, (a, b), glues = two_nodes(recovery=True)
    local, remote = a.connect(), b.connect()
    a.core.subscribe(local.id, ["t"])
    b.core.subscribe(remote.id, ["t"])
    mesh.pump()
    seen: dict[str, int] = {}
    for n in range(3):
        assert glues[0].publish("t", f'{{"t":"tick","p":{{"n":{n}}}}}', mesh.now) == 1
    mesh.pump()
    deliver_all(mesh, glues, seen)
    a.pump()
    b.pump()
    assert local.received == remote.received  # the same stamped messages (F9c)
    assert [m["o"] for m in remote.received] == [0, 1, 2]
    assert len({m["e"] for m in remote.received}) == 1 and remote.received[0]["tp"] == "t"
    store = b.core._recovery
    assert store is not None and store.store.foreign_count == 1  # trailer kept (F9b)
    assert glues[1].node.metrics.messages_sent == 0  # delivered, never published again
    glues[1].refresh_stats()
    stats = b.core.metrics.cluster
    assert (stats.connected, stats.peer_count, stats.messages_delivered) == (True, 1, 3)


def test_encrypted_subscriber_gets_remote_publications_as_e_frames() -> None:
    mesh, (_, b), glues = two_nodes(recovery=False)
    secret = b.connect(encryption=True)
    b.pump()
    b.core.subscribe(secret.id, ["t"])
    mesh.pump()
    glues[0].publish("t", '{"t":"tick","p":{"n":5}}', mesh.now)
    mesh.pump()
    deliver_all(mesh, glues, {})
    sent = b.core.data_to_send(secret.conn)
    assert b"E:" in sent and b'"tick"' not in sent  # never in clear (F9e)
    secret.client.receive_data(sent, b.now)
    got = [ev for ev in secret.client.events_received() if hasattr(ev, "envelope")]
    assert [ev.envelope["p"] for ev in got] == [{"n": 5}]

"""WSEServer nodes joined with ``connect_cluster`` (spec/CLUSTER.md §8, reference §10.6),
all in this process on 127.0.0.1, with the published wse-client 2.5.1 on every node.

Each server runs its drain loop in a thread that subscribes clients server-side, as an
application would. Waits are bounded polls, so a missing link or delivery fails as a
timeout naming what did not happen.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from wse_client import AsyncWSEClient, ReconnectConfig

from wse_server import WSEServer

from .conftest import SECRET, make_token, url_of
from .test_cluster_transport import CA

pytestmark = [pytest.mark.loopback, pytest.mark.interop, pytest.mark.timeout(30)]

HOST = "127.0.0.1"
NO_RECONNECT = ReconnectConfig(max_attempts=0)
TOPIC = "news"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Node:
    """One server and its drain-mode application (subscribes on subscribe requests)."""

    def __init__(self, transport: str = "asyncio", **options: Any) -> None:
        self.server = WSEServer(HOST, 0, jwt_secret=SECRET, transport=transport, **options)
        self.server.enable_drain_mode()
        self.server.start()
        self.cluster_port = free_port()
        self.addr = f"{HOST}:{self.cluster_port}"
        self.events: list[tuple[str, Any, Any]] = []
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for kind, cid, value in self.server.drain_inbound(256, 20):
                with self.lock:
                    self.events.append((kind, cid, value))
                if kind != "msg" or not isinstance(value, dict):
                    continue
                p = value.get("p")
                if (
                    value.get("t") == "subscription_update"
                    and isinstance(p, dict)
                    and p.get("action") == "subscribe"
                    and cid is not None
                ):
                    self.server.subscribe_connection(cid, p["topics"])

    def conn_ids(self) -> list[str]:
        with self.lock:
            return [cid for kind, cid, _ in self.events if kind == "auth_connect"]

    def join(self, peers: list[Node], **options: Any) -> None:
        self.server.connect_cluster(
            [p.addr for p in peers],
            cluster_port=self.cluster_port,
            cluster_addr=self.addr,
            **options,
        )

    def close(self) -> None:
        self._stop.set()
        self.server.stop()
        self._thread.join(5)


@pytest.fixture
def nodes() -> Iterator[list[Node]]:
    made: list[Node] = []
    yield made
    for node in made:
        node.close()


async def wait_for(what: str, cond: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def run(coro: Any, timeout: float = 15.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def wait_until(
    what: str, cond: Callable[[], Any], *, timeout: float = 5.0, interval: float = 0.01
) -> None:
    """Poll ``cond`` from a plain thread until it holds; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(interval)


def link_late_joiner(nodes: list[Node]) -> None:
    """Mesh the first two nodes, then let the third join through a seed only; every node
    must end up linked to the two others."""
    first, second, late = nodes
    first.join([second])
    second.join([first])
    wait_until("first two nodes did not link", lambda: meshed([first, second]))
    late.join([], seeds=[first.addr])
    wait_until("the late joiner did not reach everybody", lambda: meshed(nodes))
    seen = [{e["instance_id"] for e in n.server.cluster_info()} for n in nodes]
    assert all(len(ids) == 2 for ids in seen)
    assert len(set().union(*seen)) == 3  # each node sees the two others


def meshed(nodes: list[Node]) -> bool:
    return all(n.server.cluster_peers_count() == len(nodes) - 1 for n in nodes)


def record_raw(client: AsyncWSEClient) -> list[str | bytes]:
    """Every frame the client's connection receives (observation only)."""
    frames: list[str | bytes] = []
    manager = client._connection
    original = manager._handle_raw_message

    def spy(data: str | bytes) -> None:
        frames.append(data)
        original(data)

    manager._handle_raw_message = spy
    return frames


async def subscribed_client(
    node: Node, user: str, seen: list[tuple[str, Any]], **options: Any
) -> AsyncWSEClient:
    client = AsyncWSEClient(url_of(node.server), token=make_token(user), reconnect=NO_RECONNECT,
                            **options)  # fmt: skip
    client.on("tick")(lambda ev: seen.append((user, ev.payload["n"])))
    await client.connect()
    await client.subscribe([TOPIC])
    await wait_for(
        f"{user}'s subscription",
        lambda: node.server.get_topic_subscriber_count(TOPIC) >= 1,
    )
    return client


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("transport", ["asyncio", "uvloop"])
def test_broadcast_reaches_every_client_of_the_mesh_exactly_once(
    nodes: list[Node], transport: str
) -> None:
    nodes.extend(Node(transport) for _ in range(3))
    seen: list[tuple[str, Any]] = []

    async def scenario() -> None:
        users = ["ann", "ben", "cat"]
        clients = [await subscribed_client(n, u, seen) for n, u in zip(nodes, users, strict=True)]
        for i, node in enumerate(nodes):
            node.join([p for j, p in enumerate(nodes) if j != i])
        await wait_for("a full mesh", lambda: meshed(nodes))
        for i, node in enumerate(nodes):  # every node publishes
            for n in range(5):
                node.server.broadcast(TOPIC, f'{{"t":"tick","p":{{"n":{i * 100 + n}}}}}')
        expected = Counter((u, i * 100 + n) for u in users for i in range(3) for n in range(5))
        await wait_for("every delivery", lambda: len(seen) >= sum(expected.values()))
        await asyncio.sleep(0.3)  # duplicates would arrive now
        assert Counter(seen) == expected
        # each client sees each node's publications in publication order
        for u in users:
            for i in range(3):
                got = [n for who, n in seen if who == u and n // 100 == i]
                assert got == [i * 100 + n for n in range(5)]
        for c in clients:
            await c.disconnect()

    run(scenario())
    server = nodes[0].server
    info = server.cluster_info()
    assert len(info) == 2
    assert all(set(e) == {"address", "instance_id", "capabilities", "connected_at"} for e in info)
    snap = server.health_snapshot()
    assert snap["cluster_connected"] is True and snap["cluster_peer_count"] == 2
    assert snap["cluster_messages_sent"] >= 10  # 5 publications to each of 2 peers
    assert snap["cluster_bytes_sent"] > 0 and snap["cluster_bytes_received"] > 0
    assert "wse_cluster_peers 2" in server.prometheus_metrics()
    assert server.get_cluster_dlq_entries() == []
    # stop() sends SHUTDOWN: the others drop the link at once, without a heartbeat timeout
    nodes[2].server.stop()
    wait_until(
        "SHUTDOWN did not end the link", lambda: server.cluster_peers_count() == 1, timeout=3
    )


def test_restarted_node_relinks_and_its_clients_get_cross_node_broadcasts(
    nodes: list[Node],
) -> None:
    """A node is stopped and a new server (a new, higher instance id) takes its cluster
    address: both other nodes link to it again (F9a), and publications cross the mesh in
    both directions to wse-client subscribers on the restarted node and on the others."""
    nodes.extend(Node() for _ in range(3))
    a, b, c = nodes
    for i, node in enumerate(nodes):
        node.join([p for j, p in enumerate(nodes) if j != i])
    wait_until("no full mesh", lambda: meshed(nodes))
    old_ids = {e["instance_id"] for e in a.server.cluster_info()}  # b's and c's
    b.close()  # SHUTDOWN to the peers, clients closed
    wait_until(
        "the stopped node is still counted",
        lambda: a.server.cluster_peers_count() == 1 == c.server.cluster_peers_count(),
        timeout=3,
    )
    reborn = Node()
    reborn.cluster_port, reborn.addr = b.cluster_port, b.addr
    nodes.append(reborn)
    reborn.join([a, c])
    live = [a, c, reborn]
    wait_until(
        "the restarted node did not relink", lambda: meshed(live), timeout=10, interval=0.02
    )  # a and c redial with backoff (1 s, x1.5)
    # The link to the new instance may be the one it dialled (listed under its socket
    # address), so compare instance ids: two peers, the old instance gone.
    ids = {e["instance_id"] for e in a.server.cluster_info()}
    assert len(ids) == 2 and len(ids & old_ids) == 1  # c kept its id, b's is new
    seen: list[tuple[str, Any]] = []

    async def scenario() -> None:
        clients = [
            await subscribed_client(reborn, "rob", seen),
            await subscribed_client(a, "amy", seen),
        ]
        reborn.server.broadcast(TOPIC, '{"t":"tick","p":{"n":1}}')
        a.server.broadcast(TOPIC, '{"t":"tick","p":{"n":2}}')
        c.server.broadcast(TOPIC, '{"t":"tick","p":{"n":3}}')
        expected = Counter((u, n) for u in ("rob", "amy") for n in (1, 2, 3))
        await wait_for("every delivery", lambda: len(seen) >= sum(expected.values()))
        await asyncio.sleep(0.3)  # duplicates would arrive now
        assert Counter(seen) == expected
        for client in clients:
            await client.disconnect()

    run(scenario())


def test_encrypted_client_on_a_remote_node_gets_e_frames(nodes: list[Node]) -> None:
    nodes.extend(Node() for _ in range(2))
    seen: list[tuple[str, Any]] = []

    async def scenario() -> None:
        plain = await subscribed_client(nodes[0], "ann", seen)
        secret = await subscribed_client(nodes[1], "eve", seen, encryption=True)
        frames = record_raw(secret)
        await wait_for("the key exchange", lambda: secret._security and secret._security.is_enabled)
        nodes[0].join([nodes[1]])
        nodes[1].join([nodes[0]])
        await wait_for("the link", lambda: meshed(nodes))
        mark = len(frames)
        nodes[0].server.broadcast(TOPIC, '{"t":"tick","p":{"n":1}}')
        await wait_for("both deliveries", lambda: len(seen) == 2)
        assert sorted(seen) == [("ann", 1), ("eve", 1)]
        later = frames[mark:]
        assert any(
            (f if isinstance(f, str) else f.decode("latin-1")).startswith("E:") for f in later
        )
        assert not any(isinstance(f, str) and '"tick"' in f for f in later)  # never in clear
        await plain.disconnect()
        await secret.disconnect()

    run(scenario())


def test_presence_join_and_leave_cross_nodes(nodes: list[Node]) -> None:
    nodes.extend(Node(presence_enabled=True) for _ in range(2))
    events: list[tuple[str, str, Any]] = []

    async def scenario() -> None:
        nodes[0].join([nodes[1]])
        nodes[1].join([nodes[0]])
        await wait_for("the link", lambda: meshed(nodes))
        bob = AsyncWSEClient(url_of(nodes[1].server), token=make_token("bob"),
                             reconnect=NO_RECONNECT)  # fmt: skip
        for kind in ("presence_join", "presence_leave"):
            bob.on(kind)(lambda ev: events.append((ev.type, ev.payload["user_id"],
                                                   ev.payload["data"])))  # fmt: skip
        await bob.connect()
        (b_id,) = await wait_for("bob", nodes[1].conn_ids)
        features = await wait_for("server_hello", lambda: bob._server_features)
        assert features["cluster"] is True  # server_hello announces the linked cluster
        nodes[1].server.subscribe_connection(b_id, ["room"])
        alice = AsyncWSEClient(url_of(nodes[0].server), token=make_token("alice"),
                               reconnect=NO_RECONNECT)  # fmt: skip
        await alice.connect()
        (a_id,) = await wait_for("alice", nodes[0].conn_ids)
        nodes[0].server.subscribe_connection(a_id, ["room"], presence_data={"s": "on"})
        await wait_for("alice's remote join", lambda: events)
        assert events == [("presence_join", "alice", {"s": "on"})]
        remote = nodes[1].server.presence("room")
        assert remote["alice"]["data"] == {"s": "on"}
        await alice.disconnect()
        await wait_for("alice's remote leave", lambda: len(events) == 2)
        assert events[1] == ("presence_leave", "alice", {"s": "on"})
        assert "alice" not in nodes[1].server.presence("room")
        await bob.disconnect()

    run(scenario())


def test_late_joiner_through_a_seed_links_to_everybody(nodes: list[Node]) -> None:
    nodes.extend(Node() for _ in range(3))
    link_late_joiner(nodes)
    first, second, late = nodes
    assert {e["address"] for e in late.server.cluster_info()} >= {first.addr}

    # drain() sends DRAIN: peers stop routing publications to the draining node
    def sent() -> int:
        return int(first.server.health_snapshot()["cluster_messages_sent"])

    before = sent()
    first.server.broadcast(TOPIC, '{"t":"tick","p":{"n":1}}')
    assert sent() - before == 2  # interest unknown yet: both peers get it (CLUSTER §8.3)
    second.server.drain()
    deadline = time.monotonic() + 3
    while True:
        before = sent()
        first.server.broadcast(TOPIC, '{"t":"tick","p":{"n":2}}')
        if sent() - before == 1:
            break
        assert time.monotonic() < deadline, "DRAIN did not stop the routing"
        time.sleep(0.02)
    assert first.server.cluster_peers_count() == 2  # the link stays up


def test_mutual_tls_mesh_delivers(nodes: list[Node], tmp_path: Path) -> None:
    ca = CA(tmp_path, "main")
    nodes.extend(Node() for _ in range(2))
    seen: list[tuple[str, Any]] = []

    async def scenario() -> None:
        client = await subscribed_client(nodes[1], "ben", seen)
        for i, node in enumerate(nodes):
            cert, key = ca.issue(f"node{i}", HOST)
            node.join([nodes[1 - i]], tls_cert=cert, tls_key=key, tls_ca=str(ca.ca_path))
        await wait_for("the TLS link", lambda: meshed(nodes))
        nodes[0].server.broadcast(TOPIC, '{"t":"tick","p":{"n":7}}')
        await wait_for("the delivery", lambda: seen)
        await asyncio.sleep(0.2)
        assert seen == [("ben", 7)]
        cert, key = ca.issue("node0-renewed", HOST)
        nodes[0].server.reload_cluster_tls(cert, key, str(ca.ca_path))
        assert nodes[0].server.cluster_peers_count() == 1  # links stay up
        await client.disconnect()

    run(scenario())


def test_connect_cluster_argument_errors(nodes: list[Node], tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="not started"):
        WSEServer(HOST, 0, transport="threading").connect_cluster([])
    idle = WSEServer(HOST, 0)
    with pytest.raises(RuntimeError, match="not started"):
        idle.connect_cluster([])
    nodes.append(Node())
    server = nodes[0].server
    with pytest.raises(RuntimeError, match="cluster_addr"):
        server.connect_cluster([], seeds=["127.0.0.1:1"])
    with pytest.raises(RuntimeError, match="tls"):
        server.connect_cluster([], tls_cert=str(tmp_path / "c.pem"))
    with pytest.raises(RuntimeError, match="not connected"):
        server.reload_cluster_tls("c", "k", "a")
    assert server.cluster_connected() is False and server.cluster_info() == []
    server.connect_cluster([], cluster_port=0)
    assert server.cluster_port > 0
    with pytest.raises(RuntimeError, match="already connected"):
        server.connect_cluster([])
    server.drain()  # DRAIN to (no) peers, clients closed: no error

"""Cluster links on the threading transport (``wse_transports.cluster_blocking``): three
``WSEServer`` nodes in this process on 127.0.0.1, the published wse-client 2.5.1 on each.

The gevent nodes run in a monkey-patched subprocess (the pytest process never imports gevent).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from wse_client import AsyncWSEClient

from wse_server import WSEServer
from wse_transports.cluster_blocking import BlockingClusterTransport

from .conftest import SECRET, make_token
from .test_cluster_server import (
    HOST,
    NO_RECONNECT,
    TOPIC,
    Node,
    link_late_joiner,
    meshed,
    nodes,  # noqa: F401  (fixture)
    run,
    subscribed_client,
    wait_for,
    wait_until,
)
from .test_cluster_transport import CA

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.loopback, pytest.mark.interop, pytest.mark.timeout(30)]


def join(
    server: WSEServer,
    peers: list[str],
    *,
    cluster_port: int,
    cluster_addr: str,
    seeds: list[str] | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_ca: str | None = None,
) -> None:
    """``connect_cluster`` on a blocking transport, checking which link transport it chose."""
    server.connect_cluster(
        peers,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_ca=tls_ca,
        cluster_port=cluster_port,
        seeds=seeds,
        cluster_addr=cluster_addr,
    )
    cluster = server._cluster
    assert cluster is not None and isinstance(cluster.transport, BlockingClusterTransport)


class TNode(Node):
    def __init__(self) -> None:
        super().__init__("threading")

    def join(self, peers: list[Node], **options: Any) -> None:
        join(
            self.server,
            [p.addr for p in peers],
            cluster_port=self.cluster_port,
            cluster_addr=self.addr,
            **options,
        )


def test_threading_mesh_delivers_every_broadcast_exactly_once(nodes: list[Node]) -> None:  # noqa: F811
    nodes.extend(TNode() for _ in range(3))
    seen: list[tuple[str, Any]] = []

    async def scenario() -> None:
        users = ["ann", "bob", "cid"]
        clients = [
            await subscribed_client(node, user, seen)
            for node, user in zip(nodes, users, strict=True)
        ]
        for node in nodes:
            node.join([p for p in nodes if p is not node])
        await wait_for("the full mesh", lambda: meshed(nodes))
        # Interest travels after the links are up; wait until every node routes to all.
        await asyncio.sleep(0.3)
        for n, node in enumerate(nodes):
            node.server.broadcast(TOPIC, f'{{"t":"tick","p":{{"n":{n}}}}}')
        want = sorted((user, n) for user in users for n in range(3))
        await wait_for("every delivery", lambda: len(seen) >= len(want))
        await asyncio.sleep(0.3)  # duplicates would arrive by now
        assert sorted(seen) == want
        for client in clients:
            await client.disconnect()

    run(scenario())
    sent = sum(int(n.server.health_snapshot()["cluster_messages_sent"]) for n in nodes)
    assert sent >= 6  # every broadcast crossed to both peers


def test_threading_late_joiner_through_a_seed(nodes: list[Node]) -> None:  # noqa: F811
    nodes.extend(TNode() for _ in range(3))
    link_late_joiner(nodes)
    first, second, late = nodes
    # stop() sends SHUTDOWN: the others drop the link at once instead of timing out.
    late.close()
    nodes.remove(late)
    wait_until(
        "SHUTDOWN did not remove the stopped node",
        lambda: first.server.cluster_peers_count() == 1 == second.server.cluster_peers_count(),
        timeout=3,
    )


def test_threading_failed_dial_is_retried_by_the_timer(nodes: list[Node]) -> None:  # noqa: F811
    """A refused dial goes back to the node; its backoff timer (about 1 s) dials again.
    The peer is named ``localhost``: resolved off the I/O side, each address tried."""
    nodes.extend(TNode() for _ in range(2))
    early, late = nodes
    # nothing listens on late's cluster port yet
    join(
        early.server,
        [f"localhost:{late.cluster_port}"],
        cluster_port=early.cluster_port,
        cluster_addr=early.addr,
    )
    cluster = early.server._cluster
    assert cluster is not None
    wait_until(
        "the refused dial was not reported", lambda: cluster.transport.dial_failures >= 1, timeout=3
    )
    assert early.server.cluster_peers_count() == 0
    late.join([])
    wait_until("the dial was not retried", lambda: meshed(nodes))


def test_threading_mutual_tls_mesh_delivers(nodes: list[Node], tmp_path: Path) -> None:  # noqa: F811
    ca = CA(tmp_path, "main")
    nodes.extend(TNode() for _ in range(2))
    seen: list[tuple[str, Any]] = []

    async def scenario() -> None:
        client = await subscribed_client(nodes[1], "ben", seen)
        for i, node in enumerate(nodes):
            cert, key = ca.issue(f"node{i}", HOST)
            node.join([nodes[1 - i]], tls_cert=cert, tls_key=key, tls_ca=str(ca.ca_path))
        await wait_for("the TLS link", lambda: meshed(nodes))
        await asyncio.sleep(0.2)
        nodes[0].server.broadcast(TOPIC, '{"t":"tick","p":{"n":7}}')
        await wait_for("the delivery", lambda: seen)
        await asyncio.sleep(0.2)
        assert seen == [("ben", 7)]
        await client.disconnect()

    run(scenario())
    # A node with a certificate from another CA is refused by both sides.
    other = CA(tmp_path, "other")
    intruder = TNode()
    nodes.append(intruder)
    cert, key = other.issue("intruder", HOST)
    intruder.join([nodes[0]], tls_cert=cert, tls_key=key, tls_ca=str(other.ca_path))
    time.sleep(0.5)
    assert intruder.server.cluster_peers_count() == 0
    assert nodes[0].server.cluster_peers_count() == 1
    for server in (intruder.server, nodes[0].server):
        cluster = server._cluster
        assert cluster is not None and cluster.transport.tls_failures >= 1


# --------------------------------------------------------------------------- gevent

GEVENT_SCRIPT = r"""
from gevent import monkey

monkey.patch_all()

import json, os, socket, sys, time
import gevent
from wse_server import WSEServer
from wse_transports.gevent import process_is_patched

assert process_is_patched()
secret, topic, done = sys.argv[1].encode(), sys.argv[2], sys.argv[3]
servers = [WSEServer("127.0.0.1", 0, jwt_secret=secret, transport="gevent") for _ in range(3)]


def app(server):
    while True:
        for kind, cid, value in server.drain_inbound(256, 20):
            p = value.get("p") if kind == "msg" and isinstance(value, dict) else None
            if isinstance(p, dict) and p.get("action") == "subscribe":
                server.subscribe_connection(cid, p["topics"])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


addrs = [f"127.0.0.1:{free_port()}" for _ in servers]
for i, server in enumerate(servers):
    server.enable_drain_mode()
    server.start()
    gevent.spawn(app, server)
    server.connect_cluster([a for a in addrs if a != addrs[i]],
                           cluster_port=int(addrs[i].rpartition(":")[2]),
                           cluster_addr=addrs[i])
deadline = time.monotonic() + 10
while any(s.cluster_peers_count() < 2 for s in servers):
    assert time.monotonic() < deadline, [s.cluster_peers_count() for s in servers]
    gevent.sleep(0.01)
print(json.dumps([s.port for s in servers]), flush=True)
deadline = time.monotonic() + 20
while not all(s.get_topic_subscriber_count(topic) for s in servers):
    assert time.monotonic() < deadline, "no subscribers"
    gevent.sleep(0.01)
gevent.sleep(0.3)
for n, server in enumerate(servers):
    server.broadcast(topic, '{"t":"tick","p":{"n":%d}}' % n)
while not os.path.exists(done):
    assert time.monotonic() < deadline + 10, "never told to stop"
    gevent.sleep(0.02)
for server in servers:
    server.stop()
print("stopped", flush=True)
"""


def test_gevent_nodes_in_a_patched_process_deliver_exactly_once(tmp_path: Path) -> None:
    """Three gevent nodes in a monkey-patched subprocess (their cluster links served by
    the pump's greenlet), meshed; the clients run here, one on each node."""
    done = tmp_path / "done"
    proc = subprocess.Popen(
        [sys.executable, "-c", GEVENT_SCRIPT, SECRET.decode(), TOPIC, str(done)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    seen: list[tuple[str, Any]] = []
    try:
        assert proc.stdout is not None
        ports = json.loads(proc.stdout.readline())

        async def scenario() -> None:
            clients = []
            for port, user in zip(ports, ("ann", "bob", "cid"), strict=True):
                client = AsyncWSEClient(f"ws://127.0.0.1:{port}/wse", token=make_token(user),
                                        reconnect=NO_RECONNECT)  # fmt: skip
                client.on("tick")(lambda ev, user=user: seen.append((user, ev.payload["n"])))
                await client.connect()
                await client.subscribe([TOPIC])
                clients.append(client)
            await wait_for("every delivery", lambda: len(seen) >= 9, timeout=10)
            await asyncio.sleep(0.3)
            for client in clients:
                await client.disconnect()

        run(scenario(), 20)
        done.touch()
        out, _ = proc.communicate(timeout=15)
    finally:
        done.touch()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert out.strip() == "stopped"
    assert sorted(seen) == sorted((u, n) for u in ("ann", "bob", "cid") for n in range(3))

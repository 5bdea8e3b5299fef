"""Cluster links over real sockets: ClusterNodes driven by AsyncioClusterTransport on
127.0.0.1, plain TCP and mutual TLS (certificates made here with ``cryptography``).

Each test runs its nodes in one event loop (one lock per node, as each would be a
separate server) and waits for conditions with bounded polls, so a broken link shows up
as a timeout naming what did not happen.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import socket
import ssl
import threading
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from wse_proto._defaults import monotonic, wall_clock_ms
from wse_proto.cluster.frames import OUR_CAPABILITIES, FrameReader, Hello, Ping, encode
from wse_proto.cluster.link import CloseReason, LinkConfig
from wse_proto.cluster.mesh import ClusterConfig, ClusterNode, LinkDown, LinkUp
from wse_proto.envelope import uuid7
from wse_proto.presence import PresenceEvent, PresenceState
from wse_transports.cluster_aio import AsyncioClusterTransport, split_address
from wse_transports.cluster_tls import ENV_CA, ENV_CERT, ENV_KEY, ClusterTLS

pytestmark = [pytest.mark.loopback, pytest.mark.timeout(30)]

HOST = "127.0.0.1"


# --------------------------------------------------------------------------- certificates


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


class CA:
    """A throwaway certificate authority that issues node certificates (both EKUs)."""

    def __init__(self, directory: Path, name: str) -> None:
        self.dir = directory
        self.name = name
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(f"{name} root"))
            .issuer_name(_name(f"{name} root"))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.ca_path = directory / f"{name}-ca.pem"
        self.ca_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, label: str, ip: str = HOST) -> tuple[str, str]:
        """A node certificate with IP SAN ``ip``; returns (cert path, key path)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(f"{self.name} {label}"))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        cert_path = self.dir / f"{self.name}-{label}.pem"
        key_path = self.dir / f"{self.name}-{label}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key_path, key)
        return str(cert_path), str(key_path)

    def tls(self, label: str, ip: str = HOST, ca_path: Path | None = None) -> ClusterTLS:
        cert, key = self.issue(label, ip)
        return ClusterTLS(cert, key, str(ca_path or self.ca_path))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CA]:
    directory = tmp_path_factory.mktemp("cluster-pki")
    return {"main": CA(directory, "main"), "other": CA(directory, "other")}


# --------------------------------------------------------------------------- harness


def bound_socket(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, port))
    return sock


FAST = ClusterConfig(link=LinkConfig(hello_timeout=2.0))


class TNode:
    """One cluster node: a ClusterNode, its lock and transport, and what it was told."""

    def __init__(
        self,
        name: str,
        *,
        peers: tuple[str, ...] = (),
        tls: ClusterTLS | None = None,
        sock: socket.socket | None = None,
        listen: bool = True,
        subscribe: tuple[str, ...] = (),
        config: ClusterConfig = FAST,
        **transport_options: Any,
    ) -> None:
        self.name = name
        self.sock = (sock or bound_socket()) if listen else None
        self.port = self.sock.getsockname()[1] if self.sock is not None else 0
        self.address = f"{HOST}:{self.port}" if self.sock is not None else None
        self.lock = threading.Lock()
        self.instance_id = uuid7(wall_clock_ms(), os.urandom)
        self.presence = PresenceState()
        self.node = ClusterNode(
            self.instance_id,
            rand=os.urandom,
            wall_ms=wall_clock_ms,
            now=monotonic(),
            address=self.address,
            peers=peers,
            config=config,
            presence=self.presence,
        )
        now = monotonic()
        for topic in subscribe:
            self.node.subscribe(topic, now)
        self.delivered: list[tuple[str, bytes, str]] = []
        self.presence_events: list[PresenceEvent] = []
        self.link_events: list[LinkUp | LinkDown] = []
        self.transport = AsyncioClusterTransport(
            self.node,
            self.lock,
            tls=tls,
            sock=self.sock,
            on_deliver=lambda t, p, i: self.delivered.append((t, p, i)),
            on_presence=self.presence_events.append,
            on_link_change=self.link_events.append,
            **transport_options,
        )
        self.started = False

    async def start(self) -> TNode:
        await self.transport.start()
        self.started = True
        return self

    async def stop(self, send_shutdown: bool = True) -> None:
        if self.started:
            self.started = False
            await self.transport.stop(send_shutdown)
        elif self.sock is not None:
            self.sock.close()

    def call(self, fn: Callable[[ClusterNode, float], Any]) -> Any:
        """Change the node as server code would: under the lock, then wake the pump."""
        with self.lock:
            result = fn(self.node, monotonic())
            self.transport.wake()
        return result

    def publish(self, topic: str, payload: bytes) -> int:
        return int(self.call(lambda n, now: n.publish(topic, payload, now)))

    def peers(self) -> set[str]:
        with self.lock:
            return set(self.node.peers())

    def payloads(self, topic: str | None = None) -> list[bytes]:
        return [p for t, p, _ in self.delivered if topic is None or t == topic]


async def wait_for(what: str, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = monotonic() + timeout
    while not predicate():
        if monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.01)


def full_mesh(nodes: list[TNode]) -> bool:
    """Every node links every other (by instance id) over exactly one socket each."""
    for n in nodes:
        others = {m.instance_id for m in nodes if m is not n}
        if n.peers() != others or n.transport.link_count != len(others):
            return False
    return True


def run(
    test: Callable[[], Coroutine[Any, Any, None]], loop: str = "asyncio", budget: float = 12.0
) -> None:
    """Run one scenario on a fresh event loop (asyncio's or uvloop's), time-boxed."""

    async def main() -> None:
        async with asyncio.timeout(budget):
            await test()

    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())


async def stop_all(nodes: list[TNode]) -> None:
    for n in nodes:
        await n.stop()


def make_mesh(count: int, **options: Any) -> list[TNode]:
    """``count`` nodes, each configured with every other's address (static peers)."""
    socks = [bound_socket() for _ in range(count)]
    addrs = [f"{HOST}:{s.getsockname()[1]}" for s in socks]
    tls_for: Callable[[int], ClusterTLS | None] = options.pop("tls_for", lambda i: None)
    subs: list[tuple[str, ...]] = options.pop("subs", [()] * count)
    return [
        TNode(
            f"n{i}",
            peers=tuple(a for j, a in enumerate(addrs) if j != i),
            sock=socks[i],
            tls=tls_for(i),
            subscribe=subs[i],
            **options,
        )
        for i in range(count)
    ]


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float) -> None:
    """The other side closed the socket (EOF or reset) within ``timeout`` seconds,
    without sending anything."""
    try:
        data = await asyncio.wait_for(reader.read(), timeout)
    except ConnectionResetError:
        return
    assert data == b""


async def settle(nodes: list[TNode], seconds: float = 0.2) -> None:
    """Give in-flight frames time to land (loopback: well under a millisecond)."""
    await asyncio.sleep(seconds)


# --------------------------------------------------------------------------- tests


def test_split_address() -> None:
    assert split_address("127.0.0.1:9000") == ("127.0.0.1", 9000)
    assert split_address("[::1]:7") == ("::1", 7)
    assert split_address("node-2.local:65535") == ("node-2.local", 65535)
    for bad in ("127.0.0.1", ":80", "h:0", "h:65536", "h:x1"):
        with pytest.raises(ValueError):
            split_address(bad)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_plain_full_mesh_routes_each_publication_exactly_once(loop: str) -> None:
    async def body() -> None:
        nodes = make_mesh(3, subs=[("lobby",), ("room.*", "news"), ("room.1",)])
        a, b, c = nodes
        try:
            for n in nodes:
                await n.start()
            await wait_for("full mesh", lambda: full_mesh(nodes))
            # Each node told the others its interest in the setup burst (RESYNC).
            with a.lock:
                assert a.node.peer_interest(b.instance_id).known  # type: ignore[union-attr]
            sent = [f'{{"t":"room","n":{i}}}'.encode() for i in range(40)]
            for payload in sent:
                assert a.publish("room.1", payload) == 2
            assert a.publish("elsewhere", b'{"t":"x"}') == 0  # nobody wants it
            assert a.publish("news", b'{"t":"news"}') == 1  # only b
            await wait_for("b got all", lambda: len(b.payloads("room.1")) == len(sent))
            await wait_for("c got all", lambda: len(c.payloads("room.1")) == len(sent))
            await wait_for("b got news", lambda: b.payloads("news") == [b'{"t":"news"}'])
            await settle(nodes)
            # Exactly once, in publication order (one TCP stream per pair).
            assert b.payloads("room.1") == sent and c.payloads("room.1") == sent
            assert c.payloads("news") == [] and a.delivered == []
            assert {i for _, _, i in b.delivered} == {a.instance_id}
            # The other direction, and a glob interest.
            assert c.publish("room.7", b'{"t":"r7"}') == 1
            await wait_for("b got room.7", lambda: b.payloads("room.7") == [b'{"t":"r7"}'])
            # Presence: a local join on a reaches b and c as a visible change.
            joined = a.call(lambda n, now: a.presence.join("lobby", "alice", "c1", {"s": 1}, 1))
            a.call(lambda n, now: n.sync_presence(joined.events, now))
            for n in (b, c):
                await wait_for(
                    f"{n.name} sees alice",
                    lambda n=n: any(
                        e.user_id == "alice" and e.kind == "presence_join"
                        for e in n.presence_events
                    ),
                )
            ups = [e for e in a.link_events if isinstance(e, LinkUp)]
            assert {e.instance_id for e in ups} >= {b.instance_id, c.instance_id}
        finally:
            await stop_all(nodes)

    run(body, loop)


def test_late_joiner_through_a_seed_links_to_everybody() -> None:
    async def body() -> None:
        nodes = make_mesh(3, subs=[("t",), ("t",), ("t",)])
        late: TNode | None = None
        try:
            for n in nodes:
                await n.start()
            await wait_for("mesh of three", lambda: full_mesh(nodes))
            # The late node has a higher UUIDv7 id and knows only the first node.
            late = TNode("late", peers=(nodes[0].address or "",), subscribe=("t",))
            await late.start()
            everyone = [*nodes, late]
            await wait_for("mesh of four", lambda: full_mesh(everyone))
            assert late.publish("t", b'{"t":"hi"}') == 3
            for n in nodes:
                await wait_for(f"{n.name} got it", lambda n=n: n.payloads("t") == [b'{"t":"hi"}'])
            await settle(everyone)
            assert all(n.payloads("t") == [b'{"t":"hi"}'] for n in nodes)
            assert late.payloads() == []
        finally:
            await stop_all(nodes + ([late] if late else []))

    run(body)


def test_killed_node_restarts_with_a_new_id_and_relinks() -> None:
    async def body() -> None:
        nodes = make_mesh(3, subs=[("k",), ("k",), ("k",)])
        a, b, c = nodes
        revived: TNode | None = None
        try:
            for n in nodes:
                await n.start()
            await wait_for("mesh", lambda: full_mesh(nodes))
            old_id = c.instance_id
            await c.stop(send_shutdown=False)  # a crash: sockets just vanish
            await wait_for("a lost c", lambda: a.peers() == {b.instance_id})
            await wait_for("b lost c", lambda: b.peers() == {a.instance_id})
            # (Setup may also have superseded one of two crossing dials: not a loss.)
            downs = [
                e
                for e in a.link_events
                if isinstance(e, LinkDown) and e.reason is not CloseReason.SUPERSEDED
            ]
            assert [e.instance_id for e in downs] == [old_id]
            assert downs[0].reason in (CloseReason.EOF, CloseReason.ABORTED)
            # Same address, new incarnation (higher id), and no configured peers: a and
            # b find it again by redialing c's address after their backoff (~1 s).
            revived = TNode("c2", sock=bound_socket(c.port), subscribe=("k",))
            assert revived.instance_id != old_id
            await revived.start()
            live = [a, b, revived]
            await wait_for("mesh again", lambda: full_mesh(live), 6.0)
            with a.lock:
                info = {e["instance_id"] for e in a.node.cluster_info()}
            assert info == {b.instance_id, revived.instance_id}
            assert a.publish("k", b'{"t":"k"}') == 2
            for n in (b, revived):
                await wait_for(f"{n.name} got k", lambda n=n: n.payloads("k") == [b'{"t":"k"}'])
            await settle(live)
            assert b.payloads("k") == [b'{"t":"k"}'] and revived.payloads("k") == [b'{"t":"k"}']
        finally:
            await stop_all(nodes + ([revived] if revived else []))

    run(body)


def test_drain_stops_routing_and_shutdown_ends_links() -> None:
    async def body() -> None:
        nodes = make_mesh(3, subs=[("d",), ("d",), ("d",)])
        a, b, c = nodes
        try:
            for n in nodes:
                await n.start()
            await wait_for("mesh", lambda: full_mesh(nodes))
            a.call(lambda n, now: n.drain(now))

            def cleared(n: TNode) -> bool:
                with n.lock:
                    view = n.node.peer_interest(a.instance_id)
                return view is not None and view.known and len(view) == 0

            await wait_for("b and c saw DRAIN", lambda: cleared(b) and cleared(c))
            # The links stay; a just gets nothing new, c still does.
            assert b.publish("d", b'{"t":"d"}') == 1
            await wait_for("c got d", lambda: c.payloads("d") == [b'{"t":"d"}'])
            await settle(nodes)
            assert a.payloads() == [] and full_mesh(nodes)
            # A graceful stop: SHUTDOWN reaches both peers before the sockets close.
            await b.stop(send_shutdown=True)
            for n in (a, c):
                await wait_for(
                    f"{n.name} saw b's SHUTDOWN",
                    lambda n=n: any(
                        isinstance(e, LinkDown)
                        and e.instance_id == b.instance_id
                        and e.reason is CloseReason.PEER_SHUTDOWN
                        for e in n.link_events
                    ),
                )
            assert a.peers() == {c.instance_id} and c.peers() == {a.instance_id}
        finally:
            await stop_all(nodes)

    run(body)


def test_silent_peer_is_dropped_by_the_heartbeat_check() -> None:
    """A peer that answers HELLO and then says nothing is torn down once nothing has
    arrived for ``dead_after`` (checked at the ping ticks, CLUSTER §8.7)."""

    async def body() -> None:
        config = ClusterConfig(link=LinkConfig(ping_interval=0.2, dead_after=0.5))
        node = TNode("hb", config=config)
        writer: asyncio.StreamWriter | None = None
        try:
            await node.start()
            reader, writer = await asyncio.open_connection(HOST, node.port)
            silent_id = uuid7(wall_clock_ms(), os.urandom)
            writer.write(encode(Hello(1, silent_id, OUR_CAPABILITIES)))
            reader_frames = FrameReader()
            got: list[object] = []
            started = monotonic()
            while True:
                data = await asyncio.wait_for(reader.read(65536), 3.0)
                if not data:
                    break
                reader_frames.receive_data(data)
                got.extend(reader_frames.frames())
            elapsed = monotonic() - started
            assert isinstance(got[0], Hello) and got[0].instance_id == node.instance_id
            assert sum(isinstance(f, Ping) for f in got) >= 2  # pings, no answer
            assert 0.5 <= elapsed < 2.5
            down = [e for e in node.link_events if isinstance(e, LinkDown)]
            assert [(e.instance_id, e.reason) for e in down] == [
                (silent_id, CloseReason.HEARTBEAT_TIMEOUT)
            ]
            await wait_for("slot freed", lambda: node.transport.inbound_sockets == 0)
        finally:
            if writer is not None:
                writer.close()
            await node.stop()

    run(body)


def test_a_peer_that_stops_reading_gets_publications_dropped_not_buffered() -> None:
    """Above ``max_link_backlog`` unwritten bytes the link reports a full queue: further
    publications to that peer are dropped and counted (CLUSTER §8.7), and routing
    resumes once the peer reads again."""

    async def body() -> None:
        node = TNode("pub", max_link_backlog=128 * 1024)
        writer: asyncio.StreamWriter | None = None
        try:
            await node.start()
            reader, writer = await asyncio.open_connection(HOST, node.port)
            lazy_id = uuid7(wall_clock_ms(), os.urandom)
            writer.write(encode(Hello(1, lazy_id, 0)))  # no zstd: payloads stay large
            await wait_for("link up", lambda: node.peers() == {lazy_id})
            payload = b'{"t":"big","p":"' + b"x" * 16_000 + b'"}'
            queued = 0
            for _ in range(200):  # ~3 MiB, far beyond the socket buffers
                queued += node.publish("big", payload)
                await asyncio.sleep(0)
                with node.lock:
                    if node.node.metrics.messages_dropped:
                        break
            with node.lock:
                dropped = node.node.metrics.messages_dropped
                link = node.node.link_of(lazy_id)
            assert dropped > 0 and 0 < queued < 200
            assert link is not None and link.is_open
            # The peer reads again: the backlog drains and publications flow once more.
            received = 0
            while link.transport_pending_frames:
                received += len(await asyncio.wait_for(reader.read(1 << 20), 3.0))
            assert received > 0
            assert node.publish("big", payload) == 1
        finally:
            if writer is not None:
                writer.close()
            await node.stop(send_shutdown=False)

    run(body)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_mtls_mesh_refuses_a_certificate_from_another_ca(pki: dict[str, CA], loop: str) -> None:
    main, other = pki["main"], pki["other"]

    async def body() -> None:
        nodes = make_mesh(3, tls_for=lambda i: main.tls(f"node{i}"), subs=[("s",), ("s",), ("s",)])
        # Trusts our CA (so it would accept us) but holds a certificate from another one.
        intruder_tls = ClusterTLS(*other.issue("intruder"), str(main.ca_path))
        intruder = TNode(
            "intruder",
            peers=tuple(n.address or "" for n in nodes),
            tls=intruder_tls,
            subscribe=("s",),
        )
        try:
            for n in nodes:
                await n.start()
            await wait_for("mTLS mesh", lambda: full_mesh(nodes))
            assert nodes[0].publish("s", b'{"t":"tls"}') == 2
            for n in nodes[1:]:
                await wait_for(
                    f"{n.name} got it over TLS", lambda n=n: n.payloads("s") == [b'{"t":"tls"}']
                )
            await intruder.start()
            await wait_for(
                "the nodes rejected the intruder's handshakes",
                lambda: all(n.transport.tls_failures >= 1 for n in nodes),
            )
            await asyncio.sleep(0.3)
            assert intruder.peers() == set()
            for n in nodes:
                assert intruder.instance_id not in n.peers()
                assert all(i == nodes[0].instance_id for _, _, i in n.delivered)
            assert full_mesh(nodes)
        finally:
            await stop_all([*nodes, intruder])

    run(body, loop)


def test_dialer_checks_the_acceptors_ip_san(pki: dict[str, CA]) -> None:
    main = pki["main"]

    async def body() -> None:
        # The acceptor's certificate names another address than the one dialed.
        wrong = TNode("wrong", tls=main.tls("wrong-name", ip="127.0.0.9"))
        dialer = TNode("dialer", peers=(wrong.address or "",), tls=main.tls("dialer"))
        try:
            await wrong.start()
            await dialer.start()
            await wait_for("dialer refused the name", lambda: dialer.transport.tls_failures >= 1)
            assert dialer.transport.dial_failures >= 1
            assert dialer.peers() == set() and wrong.peers() == set()
            # With the name check off, any certificate of the cluster CA is enough.
            relaxed = ClusterTLS(*main.issue("relaxed"), str(main.ca_path), check_hostname=False)
            assert not relaxed.client_context.check_hostname
        finally:
            await stop_all([dialer, wrong])

    run(body)


def test_reload_tls_applies_to_new_handshakes_only(pki: dict[str, CA]) -> None:
    main, other = pki["main"], pki["other"]

    async def body() -> None:
        a, b = make_mesh(2, tls_for=lambda i: main.tls(f"r{i}"))
        # A node of the other CA: nobody of the main CA can link with it yet.
        e = TNode("e", peers=(a.address or "",), tls=other.tls("e"))
        try:
            await a.start()
            await b.start()
            await wait_for("a-b link", lambda: full_mesh([a, b]))
            await e.start()
            await wait_for("e refused", lambda: a.transport.tls_failures >= 1)
            assert e.peers() == set()
            with a.lock:
                ab_link = a.node.link_of(b.instance_id)
            assert ab_link is not None
            # a now holds a certificate of the other CA and trusts both CAs.
            bundle = main.dir / "bundle.pem"
            bundle.write_bytes(main.ca_path.read_bytes() + other.ca_path.read_bytes())
            cert, key = other.issue("a-reloaded")
            a.transport.reload_tls(cert, key, str(bundle))
            assert a.transport.tls is not None and a.transport.tls.cert_path == cert
            # e's next attempt (backoff) succeeds against the new context...
            await wait_for("e linked with a", lambda: e.peers() == {a.instance_id}, 6.0)
            # ...while the a-b link set up with the old one is untouched.
            with a.lock:
                assert a.node.link_of(b.instance_id) is ab_link and ab_link.is_open
            with pytest.raises(OSError):
                a.transport.reload_tls(cert, str(main.dir / "missing.key"), str(bundle))
            assert a.transport.tls.cert_path == cert  # the failed reload changed nothing
        finally:
            await stop_all([a, b, e])

    run(body)


def test_inbound_limit_and_tls_accept_timeout(pki: dict[str, CA]) -> None:
    main = pki["main"]

    async def body() -> None:
        config = ClusterConfig(max_inbound=2, link=LinkConfig(hello_timeout=2.0))
        node = TNode("capped", tls=main.tls("capped"), config=config, tls_handshake_timeout=0.4)
        conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        try:
            await node.start()
            for _ in range(3):  # plain TCP clients that never start TLS
                conns.append(await asyncio.open_connection(HOST, node.port))
            # The third socket is over the limit and closed at once.
            await closed_by_peer(conns[2][0], 1.0)
            assert node.transport.refused_inbound == 1
            assert node.transport.inbound_sockets == 2
            # The silent two are dropped by the TLS accept timeout, freeing their slots.
            start = monotonic()
            for reader, _ in conns[:2]:
                await closed_by_peer(reader, 3.0)
            assert 0.2 < monotonic() - start < 3.0
            await wait_for("slots freed", lambda: node.transport.inbound_sockets == 0)
            assert node.transport.tls_failures == 2
        finally:
            for _, writer in conns:
                writer.close()
            await node.stop()

    run(body)


def test_plain_silent_sockets_are_capped_and_time_out() -> None:
    async def body() -> None:
        config = ClusterConfig(max_inbound=2, link=LinkConfig(hello_timeout=0.4))
        node = TNode("plain-capped", config=config)
        conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        try:
            await node.start()
            for _ in range(3):
                conns.append(await asyncio.open_connection(HOST, node.port))
            await closed_by_peer(conns[2][0], 1.0)
            # No HELLO within the hello timeout: the node closes them (CLUSTER §8.1).
            for reader, _ in conns[:2]:
                await closed_by_peer(reader, 3.0)
            await wait_for("slots freed", lambda: node.transport.inbound_sockets == 0)
            # A socket that is not a cluster peer at all is dropped at its first frame.
            reader, writer = await asyncio.open_connection(HOST, node.port)
            conns.append((reader, writer))
            writer.write(b"GET / HTTP/1.1\r\n\r\n")
            await closed_by_peer(reader, 2.0)
            with node.lock:
                assert node.node.metrics.frames_rejected >= 1
        finally:
            for _, writer in conns:
                writer.close()
            await node.stop()

    run(body)


@pytest.mark.parametrize("with_tls", [False, True])
def test_adopt_takes_over_a_socket_from_the_main_port(pki: dict[str, CA], with_tls: bool) -> None:
    """CLUSTER §8.9: a server that peeked a cluster prefix on its WebSocket port hands
    the socket (and the bytes read) to the cluster transport; never with cluster TLS."""

    async def body() -> None:
        tls = pki["main"].tls("adopter") if with_tls else None
        receiver = TNode("receiver", listen=False, subscribe=("m",), tls=tls)
        adopted: list[bool] = []

        class Peek(asyncio.Protocol):
            def __init__(self) -> None:
                self.buf = b""
                self.transport: asyncio.Transport | None = None

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport  # type: ignore[assignment]

            def data_received(self, data: bytes) -> None:
                self.buf += data
                if len(self.buf) >= 4 and self.transport is not None:
                    assert self.buf[:3] == b"\x00\x00\x00" and self.buf[3] > 0
                    with receiver.lock:
                        adopted.append(receiver.transport.adopt(self.transport, self.buf))

        loop = asyncio.get_running_loop()
        main_port = await loop.create_server(Peek, HOST, 0)
        port = main_port.sockets[0].getsockname()[1]
        dialer = TNode("dialer", peers=(f"{HOST}:{port}",), subscribe=("m",))
        try:
            await receiver.start()
            await dialer.start()
            if with_tls:  # plain cluster traffic on the main port is dropped

                def refused() -> bool:
                    with dialer.lock:
                        state = dialer.node.address_state(f"{HOST}:{port}")
                    return state is not None and state["failures"] >= 1

                await wait_for("the dial was refused", refused)
                assert adopted and not any(adopted)
                assert receiver.transport.refused_inbound == len(adopted)
                assert receiver.peers() == set() and dialer.peers() == set()
                return
            await wait_for("link through the main port", lambda: full_mesh([receiver, dialer]))
            assert adopted[0] is True
            assert dialer.publish("m", b'{"t":"m"}') == 1
            await wait_for("delivered", lambda: receiver.payloads("m") == [b'{"t":"m"}'])
            assert receiver.publish("m", b'{"t":"back"}') == 1
            await wait_for("and back", lambda: dialer.payloads("m") == [b'{"t":"back"}'])
        finally:
            await stop_all([dialer, receiver])
            main_port.close()
            await main_port.wait_closed()

    run(body)


def test_listener_on_an_ephemeral_port_by_number() -> None:
    async def body() -> None:
        acceptor = TNode("acceptor", listen=False, subscribe=("p",))
        acceptor.transport.listen_host, acceptor.transport.listen_port = HOST, 0
        dialer: TNode | None = None
        try:
            await acceptor.start()
            port = acceptor.transport.bound_port
            assert port > 0
            dialer = TNode("dialer", listen=False, peers=(f"{HOST}:{port}",))
            await dialer.start()
            await wait_for("linked", lambda: full_mesh([acceptor, dialer]))
            assert dialer.publish("p", b'{"t":"p"}') == 1
            await wait_for("delivered", lambda: acceptor.payloads("p") == [b'{"t":"p"}'])
        finally:
            await stop_all([acceptor] + ([dialer] if dialer else []))

    run(body)


def test_wake_from_another_thread_flushes_publications() -> None:
    """Server code on application threads changes the node under the lock and wakes
    the pump; a burst of calls is carried out (and written) by the loop."""

    async def body() -> None:
        a, b = make_mesh(2, subs=[(), ("w",)])
        try:
            await a.start()
            await b.start()
            await wait_for("link", lambda: full_mesh([a, b]))

            def burst() -> None:
                for i in range(200):
                    a.publish("w", b'{"i":%d}' % i)

            thread = threading.Thread(target=burst)
            thread.start()
            await asyncio.to_thread(thread.join, 5.0)
            await wait_for("200 delivered", lambda: len(b.payloads("w")) == 200)
            assert b.payloads("w") == [b'{"i":%d}' % i for i in range(200)]
            assert Counter(b.payloads("w")).most_common(1)[0][1] == 1
        finally:
            await stop_all([a, b])

    run(body)


def test_cluster_tls_from_env(pki: dict[str, CA], tmp_path: Path) -> None:
    main = pki["main"]
    cert, key = main.issue("env")
    ca = str(main.ca_path)
    assert ClusterTLS.from_env({}) is None
    assert ClusterTLS.from_env({ENV_CERT: "", ENV_KEY: "", ENV_CA: ""}) is None
    tls = ClusterTLS.from_env({ENV_CERT: cert, ENV_KEY: key, ENV_CA: ca})
    assert tls is not None and (tls.cert_path, tls.key_path, tls.ca_path) == (cert, key, ca)
    server, client = tls.server_context, tls.client_context
    assert server.verify_mode is ssl.CERT_REQUIRED and client.verify_mode is ssl.CERT_REQUIRED
    assert server.minimum_version is ssl.TLSVersion.TLSv1_2
    assert client.check_hostname
    for partial in ({ENV_CERT: cert}, {ENV_CERT: cert, ENV_KEY: key}, {ENV_CA: ca}):
        with pytest.raises(ValueError, match="missing"):
            ClusterTLS.from_env(partial)
    # A key that does not belong to the certificate fails at construction.
    _, other_key = main.issue("env-other")
    with pytest.raises(ssl.SSLError):
        ClusterTLS(cert, other_key, ca)
    with pytest.raises(ValueError):
        ClusterTLS("", key, ca)
    assert ClusterTLS.server_hostname("[::1]") == "::1"
    assert ClusterTLS.server_hostname("node1") == "node1"

"""Cluster links of one ``WSEServer``: a ClusterNode run under the server's lock by an
AsyncioClusterTransport on the server's event loop (asyncio/uvloop), or by a
BlockingClusterTransport on the I/O side of the threading/gevent pump (spec/CLUSTER.md §8, reference
§10.6 ``connect_cluster``). The glue to the core is :class:`wse_proto.hub_cluster.HubCluster`.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any

from wse_proto._defaults import monotonic, system_rand, wall_clock_ms
from wse_proto.cluster import ClusterConfig, ClusterNode
from wse_proto.hub import ServerCore
from wse_proto.hub_cluster import HubCluster
from wse_proto.presence import PresenceEvent
from wse_transports._blocking import BlockingTransport
from wse_transports.cluster_aio import AsyncioClusterTransport
from wse_transports.cluster_blocking import BlockingClusterTransport
from wse_transports.cluster_tls import ClusterTLS

__all__ = ["ServerCluster", "check_cluster_args"]

START_TIMEOUT = 10.0
STOP_GRACE = 2.0


def check_cluster_args(
    tls: tuple[str | None, str | None, str | None],
    seeds: list[str] | None,
    cluster_addr: str | None,
) -> ClusterTLS | None:
    """The original's argument errors (reference §10.6), before anything starts."""
    if seeds and not cluster_addr:
        raise RuntimeError("cluster_addr is required when seeds are given")
    given = [part is not None for part in tls]
    if any(given) and not all(given):
        raise RuntimeError("tls_cert, tls_key and tls_ca must all be given, or none")
    if all(given):
        cert, key, ca = tls
        assert cert is not None and key is not None and ca is not None
        return ClusterTLS(cert, key, ca)
    return None


class ServerCluster:
    """Owns the node, the glue and the transport; started and stopped from any thread
    except the loop's own or the pump's I/O side (both block on it).

    ``runner``: the asyncio transport's loop, or the running threading/gevent transport.
    """

    transport: AsyncioClusterTransport | BlockingClusterTransport

    def __init__(
        self,
        core: ServerCore,
        lock: threading.Lock,
        runner: asyncio.AbstractEventLoop | BlockingTransport,
        *,
        peers: list[str],
        tls: ClusterTLS | None,
        cluster_port: int | None,
        cluster_addr: str | None,
        listen_host: str = "0.0.0.0",
    ) -> None:
        self.loop = runner if isinstance(runner, asyncio.AbstractEventLoop) else None
        self.lock = lock
        rec = core._recovery
        pres = core._presence
        self.node = ClusterNode(
            str(uuid.uuid4()),
            rand=system_rand,
            wall_ms=wall_clock_ms,
            now=monotonic(),
            address=cluster_addr,
            peers=peers,
            config=ClusterConfig(presence=pres is not None),
            recovery=rec.store if rec is not None else None,
            presence=pres.state if pres is not None else None,
        )
        if isinstance(runner, BlockingTransport):
            self.transport = BlockingClusterTransport(
                self.node,
                lock,
                runner,
                listen_host=listen_host,
                listen_port=cluster_port,
                tls=tls,
                on_deliver=self._deliver,
                on_presence=self._presence,
            )
        else:
            self.transport = AsyncioClusterTransport(
                self.node,
                lock,
                listen_host=listen_host,
                listen_port=cluster_port,
                tls=tls,
                on_deliver=self._deliver,
                on_presence=self._presence,
            )
        with lock:
            self.glue = HubCluster(core, self.node, monotonic, self.transport.wake)

    # ------------------------------------------------------------------ callbacks (loop, lock held)

    def _deliver(self, topic: str, payload: bytes, instance_id: str) -> None:
        self.glue.deliver(topic, payload)

    def _presence(self, event: PresenceEvent) -> None:
        self.glue.notify_presence(event)

    # ------------------------------------------------------------------ lifecycle

    def _run(self, coro: Any, timeout: float) -> Any:
        assert self.loop is not None
        try:
            current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if current is self.loop:
            coro.close()
            raise RuntimeError("cluster calls would block the serving loop; call from a thread")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        """Bind the cluster listener and start dialing (raises the bind error)."""
        try:
            transport = self.transport
            if isinstance(transport, BlockingClusterTransport):
                transport.start()
            else:
                self._run(transport.start(), START_TIMEOUT)
        except BaseException:
            self.detach()
            raise

    def stop(self, send_shutdown: bool = True) -> None:
        """SHUTDOWN to every peer (reference §10.3), then close every link."""
        try:
            transport = self.transport
            if isinstance(transport, BlockingClusterTransport):
                transport.stop(send_shutdown, grace=STOP_GRACE)
            else:
                self._run(transport.stop(send_shutdown, grace=STOP_GRACE), STOP_GRACE + 5.0)
        finally:
            self.detach()

    def detach(self) -> None:
        with self.lock:
            self.glue.detach()

    def drain(self) -> None:
        """DRAIN to every peer: they stop routing to us (CLUSTER §8.3). Lock held."""
        self.node.drain(monotonic())
        self.transport.wake()

    # ------------------------------------------------------------------ queries (lock held)

    @property
    def connected(self) -> bool:
        return self.node.peer_count > 0

    def info(self) -> list[dict[str, Any]]:
        return self.node.cluster_info()

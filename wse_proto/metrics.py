"""Server counters, ``health_snapshot()`` and the Prometheus text exposition.

Pure bookkeeping for :class:`wse_proto.hub.ServerCore`: the hub bumps plain
integer attributes on the hot path and this module only formats them. Key order
and metric names follow the original 2.5.1 server (reference notes §10.5) so
dashboards and health checks keep working after a switch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "TOPIC_METRICS_PRUNE_ABOVE",
    "TOPIC_METRICS_TOP_N",
    "ClusterStats",
    "Gauges",
    "Metrics",
    "escape_label_value",
    "health_snapshot",
    "prometheus_text",
]

TOPIC_METRICS_TOP_N = 50
"""Only the busiest topics are exported, to keep the scrape small (§10.5)."""

TOPIC_METRICS_PRUNE_ABOVE = 10_000
"""Above this many tracked topics the map is pruned to topics that still have subscribers."""


@dataclass(slots=True)
class ClusterStats:
    """Cluster counters; all zero until the cluster layer (a later issue) feeds them."""

    connected: bool = False
    peer_count: int = 0
    messages_sent: int = 0
    messages_delivered: int = 0
    messages_dropped: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    reconnect_count: int = 0
    unknown_message_types: int = 0
    dlq_size: int = 0


@dataclass(slots=True)
class Metrics:
    """Monotonic counters of one server. Plain ints: bumped inline by the hub."""

    messages_received: int = 0
    messages_sent: int = 0
    connections_accepted: int = 0
    connections_rejected: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    auth_failures: int = 0
    rate_limited: int = 0
    inbound_dropped: int = 0
    slow_consumer_drops: int = 0
    decrypt_failures: int = 0
    topic_messages: dict[str, int] = field(default_factory=dict)
    cluster: ClusterStats = field(default_factory=ClusterStats)
    _prune_at: int = TOPIC_METRICS_PRUNE_ABOVE

    def count_topic(self, topic: str, is_active: Callable[[str], bool]) -> None:
        """Count one publication on ``topic``; prune idle topics when the map grows too big.

        Pruning keeps only topics for which ``is_active`` is true. If most topics are
        still active the next prune waits until the map has doubled, so a server with
        more than 10,000 live topics does not rescan on every new one.
        """
        counts = self.topic_messages
        n = counts.get(topic)
        if n is not None:
            counts[topic] = n + 1
            return
        counts[topic] = 1
        if len(counts) > self._prune_at:
            self.topic_messages = {t: c for t, c in counts.items() if is_active(t)}
            self._prune_at = max(TOPIC_METRICS_PRUNE_ABOVE, 2 * len(self.topic_messages))

    def top_topics(self, n: int = TOPIC_METRICS_TOP_N) -> list[tuple[str, int]]:
        """The ``n`` busiest topics, busiest first (ties by name for a stable scrape)."""
        items = sorted(self.topic_messages.items(), key=lambda kv: (-kv[1], kv[0]))
        return items[:n]


@dataclass(frozen=True, slots=True)
class Gauges:
    """Point-in-time values the hub computes when a snapshot is asked for."""

    connections: int
    inbound_queue_depth: int
    uptime_secs: int
    topics: int
    recovery_enabled: bool
    recovery_topic_count: int
    recovery_total_bytes: int
    presence_enabled: bool
    presence_topics: int
    presence_total_users: int


def health_snapshot(metrics: Metrics, gauges: Gauges) -> dict[str, Any]:
    """The ``health_snapshot()`` dict with the original's keys in the original's order (§10.5).

    ``presence_topics``/``presence_total_users`` appear only when presence is enabled.
    """
    c = metrics.cluster
    snap: dict[str, Any] = {
        "connections": gauges.connections,
        "inbound_queue_depth": gauges.inbound_queue_depth,
        "inbound_dropped": metrics.inbound_dropped,
        "cluster_connected": c.connected,
        "cluster_peer_count": c.peer_count,
        "cluster_messages_sent": c.messages_sent,
        "cluster_messages_delivered": c.messages_delivered,
        "cluster_messages_dropped": c.messages_dropped,
        "cluster_bytes_sent": c.bytes_sent,
        "cluster_bytes_received": c.bytes_received,
        "cluster_reconnect_count": c.reconnect_count,
        "cluster_unknown_message_types": c.unknown_message_types,
        "cluster_dlq_size": c.dlq_size,
        "uptime_secs": gauges.uptime_secs,
        "recovery_enabled": gauges.recovery_enabled,
        "recovery_topic_count": gauges.recovery_topic_count,
        "recovery_total_bytes": gauges.recovery_total_bytes,
        "presence_enabled": gauges.presence_enabled,
    }
    if gauges.presence_enabled:
        snap["presence_topics"] = gauges.presence_topics
        snap["presence_total_users"] = gauges.presence_total_users
    return snap


def escape_label_value(value: str) -> str:
    """Escape a Prometheus label value: backslash, double quote and newline (§10.5)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


_COUNTERS: tuple[tuple[str, str, Callable[[Metrics], int]], ...] = (
    ("wse_messages_received_total", "Messages received from clients.",
     lambda m: m.messages_received),
    ("wse_messages_sent_total", "Messages queued to clients.", lambda m: m.messages_sent),
    ("wse_connections_accepted_total", "Connections accepted.",
     lambda m: m.connections_accepted),
    ("wse_connections_rejected_total", "Connections refused (limit or draining).",
     lambda m: m.connections_rejected),
    ("wse_bytes_received_total", "Bytes received from clients.", lambda m: m.bytes_received),
    ("wse_bytes_sent_total", "Bytes queued to clients.", lambda m: m.bytes_sent),
    ("wse_auth_failures_total", "Failed JWT authentications.", lambda m: m.auth_failures),
    ("wse_rate_limited_total", "send_event calls refused by the rate limiter.",
     lambda m: m.rate_limited),
    ("wse_inbound_dropped_total", "Inbound events dropped (only with inbound_overflow=drop).",
     lambda m: m.inbound_dropped),
    ("wse_slow_consumer_drops_total", "Messages not queued to a backlogged connection.",
     lambda m: m.slow_consumer_drops),
    ("wse_cluster_messages_sent_total", "Messages sent to cluster peers.",
     lambda m: m.cluster.messages_sent),
    ("wse_cluster_messages_delivered_total", "Cluster messages delivered locally.",
     lambda m: m.cluster.messages_delivered),
    ("wse_cluster_messages_dropped_total", "Cluster messages dropped.",
     lambda m: m.cluster.messages_dropped),
    ("wse_cluster_bytes_sent_total", "Bytes sent to cluster peers.",
     lambda m: m.cluster.bytes_sent),
    ("wse_cluster_bytes_received_total", "Bytes received from cluster peers.",
     lambda m: m.cluster.bytes_received),
    ("wse_cluster_reconnects_total", "Cluster peer reconnections.",
     lambda m: m.cluster.reconnect_count),
)  # fmt: skip
"""Counters in the original's order: (name, help, accessor)."""


def _block(out: list[str], name: str, kind: str, help_text: str, value: int) -> None:
    out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} {kind}")
    out.append(f"{name} {value}")


def prometheus_text(metrics: Metrics, gauges: Gauges) -> str:
    """Text exposition format 0.0.4 with the original's metric names and order (§10.5)."""
    out: list[str] = []
    g = gauges
    _block(out, "wse_connections", "gauge", "Current WebSocket connections.", g.connections)
    _block(
        out,
        "wse_inbound_queue_depth",
        "gauge",
        "Events waiting in the inbound queue.",
        g.inbound_queue_depth,
    )
    _block(out, "wse_uptime_seconds", "gauge", "Seconds since the server started.", g.uptime_secs)
    _block(out, "wse_topics", "gauge", "Topics with at least one subscription.", g.topics)
    _block(
        out, "wse_cluster_peers", "gauge", "Connected cluster peers.", metrics.cluster.peer_count
    )
    if g.recovery_enabled:
        _block(
            out,
            "wse_recovery_topics",
            "gauge",
            "Topics with a recovery buffer.",
            g.recovery_topic_count,
        )
        _block(
            out,
            "wse_recovery_bytes",
            "gauge",
            "Bytes held in recovery buffers.",
            g.recovery_total_bytes,
        )
    if g.presence_enabled:
        _block(
            out, "wse_presence_topics", "gauge", "Topics with presence members.", g.presence_topics
        )
        _block(
            out,
            "wse_presence_users",
            "gauge",
            "Users present across topics.",
            g.presence_total_users,
        )
    for name, help_text, get in _COUNTERS:
        _block(out, name, "counter", help_text, get(metrics))
    top = metrics.top_topics()
    if top:
        out.append("# HELP wse_topic_messages_total Publications per topic (busiest 50).")
        out.append("# TYPE wse_topic_messages_total counter")
        out.extend(
            f'wse_topic_messages_total{{topic="{escape_label_value(t)}"}} {n}' for t, n in top
        )
    out.append("")
    return "\n".join(out)

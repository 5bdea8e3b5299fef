"""health_snapshot() and prometheus_metrics(): the original's keys, names and order (§10.5),
and counters that follow what really happened on real connections."""

from __future__ import annotations

import json
import re

import pytest
from test_hub import Net, jwt_config, make_token

from wse_proto.metrics import (
    TOPIC_METRICS_PRUNE_ABOVE,
    ClusterStats,
    Gauges,
    Metrics,
    escape_label_value,
    health_snapshot,
    prometheus_text,
)

HEALTH_KEYS = [
    "connections",
    "inbound_queue_depth",
    "inbound_dropped",
    "cluster_connected",
    "cluster_peer_count",
    "cluster_messages_sent",
    "cluster_messages_delivered",
    "cluster_messages_dropped",
    "cluster_bytes_sent",
    "cluster_bytes_received",
    "cluster_reconnect_count",
    "cluster_unknown_message_types",
    "cluster_dlq_size",
    "uptime_secs",
    "recovery_enabled",
    "recovery_topic_count",
    "recovery_total_bytes",
    "presence_enabled",
]

GAUGES = [
    "wse_connections",
    "wse_inbound_queue_depth",
    "wse_uptime_seconds",
    "wse_topics",
    "wse_cluster_peers",
]
COUNTERS = [
    "wse_messages_received_total",
    "wse_messages_sent_total",
    "wse_connections_accepted_total",
    "wse_connections_rejected_total",
    "wse_bytes_received_total",
    "wse_bytes_sent_total",
    "wse_auth_failures_total",
    "wse_rate_limited_total",
    "wse_inbound_dropped_total",
    "wse_slow_consumer_drops_total",
    "wse_cluster_messages_sent_total",
    "wse_cluster_messages_delivered_total",
    "wse_cluster_messages_dropped_total",
    "wse_cluster_bytes_sent_total",
    "wse_cluster_bytes_received_total",
    "wse_cluster_reconnects_total",
]


def parse(text: str) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """(metric name, type) in TYPE-line order, and sample line -> value."""
    types = re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.M)
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = value
    return types, samples


# --------------------------------------------------------------------------- health


def test_health_snapshot_keys_in_the_originals_order() -> None:
    net = Net()
    snap = net.core.health_snapshot(0.0)
    assert list(snap) == HEALTH_KEYS
    assert snap["cluster_connected"] is False
    assert all(
        snap[k] == 0 for k in HEALTH_KEYS if k.startswith("cluster_") and k != "cluster_connected"
    )
    assert snap["recovery_enabled"] is False and snap["presence_enabled"] is False


def test_health_snapshot_presence_keys_only_when_enabled() -> None:
    net = Net(jwt_config(presence_enabled=True, recovery_enabled=True))
    snap = net.core.health_snapshot(0.0)
    assert list(snap) == [*HEALTH_KEYS, "presence_topics", "presence_total_users"]
    assert snap["presence_enabled"] is True and snap["recovery_enabled"] is True


def test_health_snapshot_values_follow_the_server() -> None:
    net = Net(jwt_config(max_inbound_queue_size=2, inbound_overflow="drop"))
    a = net.connect()
    net.connect()
    for i in range(3):
        a.client.send_text(json.dumps({"t": "m", "p": i}))
    net.pump()
    snap = net.core.health_snapshot(12.9)
    assert snap["connections"] == 2
    assert snap["inbound_queue_depth"] == net.core.inbound_queue_depth() == 2
    assert snap["inbound_dropped"] == 3
    assert snap["uptime_secs"] == 12 and isinstance(snap["uptime_secs"], int)


# --------------------------------------------------------------------------- prometheus


def test_prometheus_names_types_and_order() -> None:
    net = Net()
    types, samples = parse(net.core.prometheus_metrics(3.0))
    assert types == [(n, "gauge") for n in GAUGES] + [(n, "counter") for n in COUNTERS]
    assert samples["wse_uptime_seconds"] == "3"
    assert all(samples[n] == "0" for n in COUNTERS)


def test_prometheus_optional_gauges() -> None:
    net = Net(jwt_config(presence_enabled=True, recovery_enabled=True))
    types, _ = parse(net.core.prometheus_metrics(0.0))
    names = [n for n, _ in types]
    assert names[:9] == [
        *GAUGES,
        "wse_recovery_topics",
        "wse_recovery_bytes",
        "wse_presence_topics",
        "wse_presence_users",
    ]


def test_prometheus_every_metric_has_help_and_ends_with_newline() -> None:
    text = Net().core.prometheus_metrics(0.0)
    helps = re.findall(r"^# HELP (\S+) \S", text, flags=re.M)
    types = re.findall(r"^# TYPE (\S+) ", text, flags=re.M)
    assert helps == types
    assert text.endswith("\n")


def test_counters_follow_real_traffic() -> None:
    net = Net(jwt_config(max_connections=2, max_outbound_queue_bytes=10_000))
    a, b = net.connect(), net.connect()
    net.core.open_connection(0.0)  # refused: max_connections
    bad = Net(jwt_config())
    bad.connect(token=make_token().replace(".", ".x", 1))
    for p in (a, b):
        net.core.subscribe(p.id, ["t"])
    a.client.send_text('{"t":"hello"}')
    net.pump()
    net.core.broadcast_local("t", '{"t":"x","p":1}')
    net.core.send_event(a.id, {"t": "e"}, now=0.0)
    b.conn.transport_backlog = 10_000
    net.core.send(b.id, "dropped")
    net.pump()
    m = net.core.metrics
    assert (m.messages_received, m.messages_sent) == (1, 3)
    assert (m.connections_accepted, m.connections_rejected) == (2, 1)
    assert m.slow_consumer_drops == 1
    assert bad.core.metrics.auth_failures == 1
    _, samples = parse(net.core.prometheus_metrics(0.0))
    assert samples["wse_messages_sent_total"] == "3"
    assert samples["wse_connections"] == "2"
    assert samples["wse_topics"] == "1"
    assert samples['wse_topic_messages_total{topic="t"}'] == "1"


class CountingNet(Net):
    """Net that records every byte it moves, to check the byte counters exactly."""

    fed = 0
    flushed = 0

    def pump(self) -> None:
        core = self.core
        real_feed, real_flush = core.feed, core.data_to_send

        def feed(conn, data, now):  # type: ignore[no-untyped-def]
            self.fed += len(data)
            real_feed(conn, data, now)

        def flush(conn):  # type: ignore[no-untyped-def]
            data = real_flush(conn)
            self.flushed += len(data)
            return data

        core.feed, core.data_to_send = feed, flush  # type: ignore[method-assign]
        try:
            super().pump()
        finally:
            del core.feed, core.data_to_send


def test_byte_counters_cover_every_byte_moved() -> None:
    net = CountingNet()
    a = net.connect(encryption=True)
    net.core.subscribe(a.id, ["t"])
    net.core.broadcast_local("t", '{"t":"x","p":1}')
    a.client.send_text('{"t":"y"}')
    a.client.send_ping()
    net.pump()
    assert a.received
    assert net.core.metrics.bytes_received == net.fed > 0
    assert net.core.metrics.bytes_sent == net.flushed > 0


def test_rate_limited_counter() -> None:
    net = Net(jwt_config(connection={"rate_limit_capacity": 1, "rate_limit_refill": 0}))
    a = net.connect()
    for _ in range(3):
        net.core.send_event(a.id, {"t": "x"}, now=0.0)
    _, samples = parse(net.core.prometheus_metrics(0.0))
    assert samples["wse_rate_limited_total"] == "2"


def test_topic_label_escaping() -> None:
    assert escape_label_value('a\\b"c\nd') == 'a\\\\b\\"c\\nd'
    net = Net()
    net.core.broadcast_local('we"ird\\topic\nname', '{"t":"x"}')
    text = net.core.prometheus_metrics(0.0)
    assert 'wse_topic_messages_total{topic="we\\"ird\\\\topic\\nname"} 1\n' in text


def test_only_the_50_busiest_topics_are_exported() -> None:
    net = Net()
    for i in range(60):
        for _ in range(i + 1):
            net.core.broadcast_local(f"topic-{i:02d}", '{"t":"x"}')
    _, samples = parse(net.core.prometheus_metrics(0.0))
    topics = [k for k in samples if k.startswith("wse_topic_messages_total")]
    assert len(topics) == 50
    assert topics[0] == 'wse_topic_messages_total{topic="topic-59"}'
    assert samples[topics[0]] == "60"
    assert samples[topics[-1]] == "11"  # topic-10; topic-00..09 are left out


def test_topic_map_is_pruned_to_active_topics_above_10000() -> None:
    net = Net()
    a = net.connect()
    net.core.subscribe(a.id, ["live", "g.*"])
    net.core.subscribe(a.id, ["grouped"], queue_group="w")
    for topic in ("live", "g.1", "grouped"):
        net.core.broadcast_local(topic, '{"t":"x"}')
    for i in range(TOPIC_METRICS_PRUNE_ABOVE - 3):
        net.core.broadcast_local(f"idle-{i}", '{"t":"x"}')
    assert len(net.core.metrics.topic_messages) == TOPIC_METRICS_PRUNE_ABOVE
    net.core.broadcast_local("one-more", '{"t":"x"}')
    assert net.core.metrics.topic_messages == {"live": 1, "g.1": 1, "grouped": 1}


# --------------------------------------------------------------------------- pure formatting


def _gauges(**kw: object) -> Gauges:
    base: dict[str, object] = {
        "connections": 0,
        "inbound_queue_depth": 0,
        "uptime_secs": 0,
        "topics": 0,
        "recovery_enabled": False,
        "recovery_topic_count": 0,
        "recovery_total_bytes": 0,
        "presence_enabled": False,
        "presence_topics": 0,
        "presence_total_users": 0,
    }
    base.update(kw)
    return Gauges(**base)  # type: ignore[arg-type]


def test_cluster_stats_reach_both_outputs() -> None:
    m = Metrics(cluster=ClusterStats(connected=True, peer_count=2, messages_sent=7, dlq_size=1))
    snap = health_snapshot(m, _gauges())
    assert (snap["cluster_connected"], snap["cluster_peer_count"], snap["cluster_dlq_size"]) == (
        True,
        2,
        1,
    )
    _, samples = parse(prometheus_text(m, _gauges()))
    assert samples["wse_cluster_peers"] == "2"
    assert samples["wse_cluster_messages_sent_total"] == "7"


@pytest.mark.parametrize("presence", [False, True])
def test_presence_values_in_snapshot(presence: bool) -> None:
    snap = health_snapshot(
        Metrics(), _gauges(presence_enabled=presence, presence_topics=3, presence_total_users=9)
    )
    assert ("presence_topics" in snap) is presence
    if presence:
        assert (snap["presence_topics"], snap["presence_total_users"]) == (3, 9)


def test_prune_threshold_backs_off_when_most_topics_are_active() -> None:
    m = Metrics()
    for i in range(TOPIC_METRICS_PRUNE_ABOVE + 1):
        m.count_topic(f"t{i}", lambda t: True)
    assert len(m.topic_messages) == TOPIC_METRICS_PRUNE_ABOVE + 1
    # The next prune waits until the map doubled, instead of rescanning per new topic.
    scans = 0

    def active(t: str) -> bool:
        nonlocal scans
        scans += 1
        return True

    for i in range(1000):
        m.count_topic(f"u{i}", active)
    assert scans == 0

"""Glue between one :class:`~wse_proto.hub.ServerCore` and one
:class:`~wse_proto.cluster.ClusterNode` (spec/CLUSTER.md §8), without I/O.

The core tells us about interest and presence through its ``on_interest`` /
``on_presence_sync`` hooks; we turn local publications into ``node.publish`` calls and
the node's ``Deliver`` / ``PresenceNotify`` intents into local fan-out. Both objects
are guarded by the same lock as the core; nothing here takes it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import envelope
from .cluster.mesh import ClusterNode, Deliver, PresenceNotify
from .presence import PresenceEvent
from .ws import text_frame

if TYPE_CHECKING:
    from .hub import ServerCore

__all__ = ["HubCluster"]


class HubCluster:
    """Connects a core to a cluster node; :meth:`detach` undoes it."""

    __slots__ = ("clock", "core", "node", "wake")

    def __init__(
        self,
        core: ServerCore,
        node: ClusterNode,
        clock: Callable[[], float],
        wake: Callable[[], None] = lambda: None,
    ) -> None:
        self.core = core
        self.node = node
        self.clock = clock
        """Monotonic seconds, for the node calls the core's hooks make (they get no ``now``)."""
        self.wake = wake
        """Called after the node got work from this side (the transport pumps its intents)."""
        now = clock()
        # Interest that exists already (subscriptions made before connect_cluster).
        for member in core._members.values():
            for topic in member.topics:
                node.subscribe(topic, now)
        core.on_interest = self._interest
        core.on_presence_sync = self._presence_sync

    def detach(self) -> None:
        core = self.core
        core.on_interest = None
        core.on_presence_sync = None

    # ------------------------------------------------------------------ core -> node

    def _interest(self, topic: str, added: bool) -> None:
        """One connection subscription more or fewer (CLUSTER §8.3)."""
        now = self.clock()
        if added:
            self.node.subscribe(topic, now)
        else:
            self.node.unsubscribe(topic, now)
        self.wake()

    def _presence_sync(self, events: list[PresenceEvent]) -> None:
        if any(ev.sync for ev in events):
            self.node.sync_presence(events, self.clock())
            self.wake()

    def publish(self, topic: str, text: str, now: float) -> int:
        """``broadcast``: local fan-out first, then the same bytes to the peers, with the
        epoch and offset of their stamp when the topic keeps recovery history (F9b, F9c).
        Returns the number of peers the MSG was queued for."""
        node = self.node
        core = self.core
        rec = core._recovery
        local = rec.store._local if rec is not None else None
        before = local.get(topic) if local is not None else None
        head = before.head if before is not None else -1
        core.broadcast_local(topic, text, now=now)
        if local is not None:
            buf = local.get(topic)
            if buf is not None and (buf is not before or buf.head != head):
                offset = buf.head - 1
                stamped = buf.get(offset)
                if stamped is not None:
                    sent = node.publish(topic, stamped, now, epoch=buf.epoch, offset=offset)
                    self.wake()
                    return sent
        sent = node.publish(topic, envelope.inject_category(text).encode("utf-8"), now)
        self.wake()
        return sent

    # ------------------------------------------------------------------ node -> core

    def deliver(self, topic: str, payload: bytes) -> int:
        """A peer's publication to local subscribers and queue groups, as received: never
        stamped nor stored again, ``E:`` frames for encrypted connections (F9e)."""
        core = self.core
        targets = core._targets(topic)
        groups = core._groups.get(topic)
        if not targets and not groups:
            return 0
        frame = text_frame(payload)
        was_clean = core._clean()
        sent = core._fan_out(targets, frame, payload) if targets else 0
        if groups:
            sent += core._deliver_groups(groups, frame, payload)
        core._woken(was_clean)
        core.metrics.cluster.messages_delivered += 1
        return sent

    def notify_presence(self, event: PresenceEvent) -> int:
        """A visible presence change caused by a peer, to the topic's local subscribers
        (CLUSTER §8.6); remote changes never reach the application's drain queue."""
        if not event.notify:
            return 0
        core = self.core
        topic = event.topic
        targets = core._targets(topic)
        groups = core._groups.get(topic)
        if not targets and not groups:
            return 0
        payload = envelope.presence_event(event.kind, event.user_id, event.data)
        frame = text_frame(payload)
        was_clean = core._clean()
        sent = core._fan_out(targets, frame, payload) if targets else 0
        if groups:
            sent += core._deliver_groups(groups, frame, payload)
        core._woken(was_clean)
        return sent

    def handle(self, intent: Deliver | PresenceNotify) -> int:
        """Carry out a server-side intent of the node."""
        if isinstance(intent, Deliver):
            return self.deliver(intent.topic, intent.payload)
        return self.notify_presence(intent.event)

    # ------------------------------------------------------------------ observability

    def refresh_stats(self) -> None:
        """Copy the node's counters into the core's metrics (reference §10.5)."""
        node = self.node
        m = node.metrics
        c = self.core.metrics.cluster
        c.peer_count = node.peer_count
        c.connected = node.peer_count > 0
        c.messages_sent = m.messages_sent
        c.messages_dropped = m.messages_dropped
        c.bytes_sent = m.bytes_sent
        c.bytes_received = m.bytes_received
        c.reconnect_count = m.reconnects
        c.unknown_message_types = node.unknown_message_types
        c.dlq_size = node.dlq_size

    def dead_letters(self) -> list[dict[str, Any]]:
        """``get_cluster_dlq_entries()``: drained, as the original's dicts."""
        return [
            {
                "topic": d.topic,
                "payload": d.payload.decode("utf-8", "replace"),
                "peer_addr": d.peer_addr,
                "error": d.error,
            }
            for d in self.node.take_dead_letters()
        ]

"""Fuzz a PeerLink in both roles with arbitrary peer bytes (spec/CLUSTER.md §8).

Byte 0 picks the role and, if odd, whether the link is accepted after a valid HELLO is fed
first. Whatever follows must never make the machine raise: malformed input becomes an event
and a closed link.
"""

from __future__ import annotations

from wse_proto.cluster import frames as cf
from wse_proto.cluster.link import LinkRole, PeerHello, PeerLink

PEER_ID = "01a20492-c8e8-7b30-865d-cfbedfadc71e"
OUR_ID = "01a20492-c71a-73d3-97ab-a5d91ed28f29"
HELLO = cf.encode(cf.Hello(1, PEER_ID, 15))


def target(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0], data[1:]
    role = LinkRole.DIALER if mode & 2 else LinkRole.ACCEPTOR
    link = PeerLink(role, OUR_ID, 0.0, address="127.0.0.1:1")
    now = 0.0
    if mode & 1:
        link.receive_data(HELLO, now)
        for event in link.events_received():
            if isinstance(event, PeerHello):
                link.accept(now, interest=("room",), announce=None, peers=(), presence=None)
    step = (mode >> 2) + 1
    for i in range(0, len(body), step):
        now += 0.5
        link.receive_data(body[i : i + step], now)
        link.events_received()
        link.data_to_send()
        if link.wants_close:
            break
    link.handle_timer(now + 20.0)
    link.events_received()
    link.data_to_send()


SEEDS = [
    b"\x01" + cf.encode(cf.Resync(("room", "chat.*"))) + cf.encode(cf.Ping()),
    b"\x03" + cf.encode(cf.Msg("room", b'{"t":"x"}', 7, 2)) + cf.encode(cf.Sub("news")),
    b"\x00" + HELLO + cf.encode(cf.PeerList(("127.0.0.1:9",))),
    b"\x02" + HELLO + cf.encode(cf.Shutdown()),
    b"\x05" + cf.encode(cf.PresenceUpdate("room", 0, 5, "alice", b'{"s":1}')),
]

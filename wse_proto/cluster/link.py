"""``PeerLink``: one cluster link between two nodes, as one side sees it (Sans-IO).

Theory of operation
-------------------
A link is a byte stream of cluster frames (CLUSTER §2-§3) over TCP or TLS. The
transport feeds what it reads (:meth:`PeerLink.receive_data`, :meth:`receive_eof`),
writes :meth:`data_to_send`, closes the socket once :attr:`wants_close` is set, and
re-arms a timer at :meth:`next_deadline` (calling :meth:`handle_timer`). The owner (the
mesh, :mod:`wse_proto.cluster.mesh`) reads :meth:`events_received` after every call.

States (:class:`LinkState`), changed only through :data:`LINK_TRANSITIONS`:

- ``AWAIT_HELLO``: a dialer has queued its HELLO and waits for the answer; an
  acceptor waits for the dialer's HELLO and says nothing first (CLUSTER §8.1).
  The first frame must be a HELLO with version >= 1, within ``hello_timeout``.
- ``DECIDING``: the peer's HELLO was read and reported as :class:`PeerHello`.
  Frames behind it stay unread until the owner calls :meth:`PeerLink.accept` (the
  acceptor then answers with its HELLO) or :meth:`PeerLink.refuse` (an acceptor
  closes without answering; CLUSTER §8.2). The owner decides at once, inside the
  same call, so this state never outlives one event loop turn.
- ``OPEN``: :meth:`accept` sent the setup burst in the order of CLUSTER §8.1
  (RESYNC, PEER_ANNOUNCE, PEER_LIST, PRESENCE_FULL). Frames are dispatched, PING is
  sent every ``ping_interval`` and liveness checked at the same ticks (no frame for
  more than ``dead_after`` tears the link down), and :class:`ResyncDue` asks the owner
  for the periodic RESYNC every ``resync_interval`` (CLUSTER §8.3, §8.7).
- ``CLOSED``: terminal; exactly one :class:`LinkClosed` is emitted, whatever the
  cause. Bad peer input never raises: a malformed frame gives :class:`FrameRejected`
  and then :class:`LinkClosed` (CLUSTER §6).

The peer's interest set (:class:`PeerInterest`) lives in the link: SUB, UNSUB, RESYNC
and DRAIN update it here, and the mesh asks :meth:`PeerInterest.wants` when routing.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from wse_proto.errors import ClusterFrameError, LocalProtocolError, WSEError
from wse_proto.topics import GlobPattern, compile_glob, is_glob

from .frames import (
    CAP_INTEREST,
    CAP_PRESENCE,
    MAX_PEER_LIST,
    OUR_CAPABILITIES,
    PROTOCOL_VERSION,
    Drain,
    Frame,
    FrameReader,
    Hello,
    Msg,
    PeerAnnounce,
    PeerList,
    Ping,
    Pong,
    PresenceFull,
    PresenceUpdate,
    Resync,
    Shutdown,
    Sub,
    Unknown,
    Unsub,
    ZstdContext,
    encode,
    resync_frames,
)

__all__ = [
    "LINK_TRANSITIONS",
    "AddressAnnounced",
    "CloseReason",
    "DeadLetter",
    "FrameRejected",
    "LinkClosed",
    "LinkConfig",
    "LinkEvent",
    "LinkInput",
    "LinkRole",
    "LinkState",
    "MsgReceived",
    "PeerDraining",
    "PeerHello",
    "PeerInterest",
    "PeerLink",
    "PeerListReceived",
    "PresenceFullReceived",
    "PresenceReceived",
    "ResyncDue",
    "dead_letters_from",
    "resync_topics",
]


# --------------------------------------------------------------------------- config


@dataclass(frozen=True, slots=True)
class LinkConfig:
    """Per-link limits and timers; defaults are the original's (CLUSTER §5, §8.7)."""

    ping_interval: float = 5.0
    dead_after: float = 15.0
    hello_timeout: float = 5.0
    resync_interval: float = 60.0
    capabilities: int = OUR_CAPABILITIES
    max_queued_frames: int = 10_000
    max_interest: int = 1_000_000

    def __post_init__(self) -> None:
        for name in ("ping_interval", "dead_after", "hello_timeout", "resync_interval"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value > 0):
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if not 0 <= self.capabilities <= 0xFFFF_FFFF:
            raise ValueError(f"capabilities must be a u32, got {self.capabilities!r}")
        for name in ("max_queued_frames", "max_interest"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")


class LinkRole(enum.Enum):
    DIALER = "dialer"
    ACCEPTOR = "acceptor"


class LinkState(enum.Enum):
    AWAIT_HELLO = "AWAIT_HELLO"
    DECIDING = "DECIDING"
    OPEN = "OPEN"
    CLOSED = "CLOSED"


class LinkInput(enum.Enum):
    """What can happen to a link (the columns of :data:`LINK_TRANSITIONS`)."""

    RECV_HELLO = "recv_hello"  # a valid first HELLO
    ACCEPT = "accept"  # the owner keeps the link
    REFUSE = "refuse"  # the owner drops it (tiebreak, duplicate, own id)
    RECV_FRAME = "recv_frame"  # any frame on an open link but SHUTDOWN
    SEND = "send"  # the owner queues a frame
    PEER_SHUTDOWN = "peer_shutdown"
    PEER_ERROR = "peer_error"  # malformed frame, bad HELLO, wrong first frame
    EOF = "eof"
    ABORT = "abort"  # the transport lost the socket
    TIMEOUT = "timeout"  # HELLO timeout or heartbeat silence
    CLOSE = "close"  # the owner closes (with or without SHUTDOWN)
    TICK = "tick"  # ping / resync timer


_S = LinkState
_I = LinkInput

_ENDINGS: Final = (_I.PEER_ERROR, _I.EOF, _I.ABORT, _I.TIMEOUT, _I.CLOSE)

LINK_TRANSITIONS: Final[Mapping[tuple[LinkState, LinkInput], LinkState]] = {
    (_S.AWAIT_HELLO, _I.RECV_HELLO): _S.DECIDING,
    **{(_S.AWAIT_HELLO, i): _S.CLOSED for i in _ENDINGS},
    (_S.DECIDING, _I.ACCEPT): _S.OPEN,
    (_S.DECIDING, _I.REFUSE): _S.CLOSED,
    **{(_S.DECIDING, i): _S.CLOSED for i in _ENDINGS},
    (_S.OPEN, _I.RECV_FRAME): _S.OPEN,
    (_S.OPEN, _I.SEND): _S.OPEN,
    (_S.OPEN, _I.TICK): _S.OPEN,
    (_S.OPEN, _I.PEER_SHUTDOWN): _S.CLOSED,
    **{(_S.OPEN, i): _S.CLOSED for i in _ENDINGS},
    # Closed is terminal: late input is ignored (an accept() racing a close included).
    **{(_S.CLOSED, i): _S.CLOSED for i in _I if i is not _I.RECV_HELLO},
}
"""``(state, input) -> next state``; a missing pair is API misuse (LocalProtocolError),
e.g. ``accept()`` before the peer's HELLO or sending before the link is open."""


class CloseReason(enum.Enum):
    """Why a link ended (:attr:`LinkClosed.reason`)."""

    EOF = "eof"
    PEER_SHUTDOWN = "peer shutdown"
    MALFORMED = "malformed frame"
    BAD_HELLO = "bad hello"
    HELLO_TIMEOUT = "hello timeout"
    HEARTBEAT_TIMEOUT = "heartbeat timeout"
    REFUSED = "refused"
    SUPERSEDED = "superseded"
    ABORTED = "aborted"
    SHUTDOWN = "shutdown"
    CLOSED = "closed"


# --------------------------------------------------------------------------- events

_ERR_CHANNEL: Final = "peer channel closed"
_ERR_PRESENCE: Final = "presence update failed"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A frame that never reached its peer (CLUSTER §8.7 dead-letter queue)."""

    topic: str
    payload: bytes
    peer_addr: str
    error: str


@dataclass(frozen=True, slots=True)
class LinkEvent:
    """Base of the link events."""


@dataclass(frozen=True, slots=True)
class PeerHello(LinkEvent):
    """The peer's HELLO: the owner must now :meth:`~PeerLink.accept` or
    :meth:`~PeerLink.refuse` (CLUSTER §8.1-§8.2)."""

    instance_id: str
    version: int
    capabilities: int


@dataclass(frozen=True, slots=True)
class MsgReceived(LinkEvent):
    """A publication; ``epoch``/``offset`` are the recovery trailer when present."""

    topic: str
    payload: bytes
    epoch: int | None
    offset: int | None


@dataclass(frozen=True, slots=True)
class PresenceReceived(LinkEvent):
    update: PresenceUpdate


@dataclass(frozen=True, slots=True)
class PresenceFullReceived(LinkEvent):
    data: bytes


@dataclass(frozen=True, slots=True)
class AddressAnnounced(LinkEvent):
    """A PEER_ANNOUNCE. ``own`` is true for the one sent in the peer's setup burst,
    which is the peer's own cluster address (CLUSTER §8.1)."""

    address: str
    own: bool


@dataclass(frozen=True, slots=True)
class PeerListReceived(LinkEvent):
    addresses: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PeerDraining(LinkEvent):
    """The peer sent DRAIN; its interest set was cleared (CLUSTER §8.3)."""


@dataclass(frozen=True, slots=True)
class ResyncDue(LinkEvent):
    """Time for the periodic RESYNC: the owner calls :meth:`PeerLink.send_resync`."""


@dataclass(frozen=True, slots=True)
class FrameRejected(LinkEvent):
    """The peer broke the protocol (malformed frame, bad or missing HELLO); the link
    is dropped right after (CLUSTER §6)."""

    error: WSEError = field(compare=False)
    message: str = ""


@dataclass(frozen=True, slots=True)
class LinkClosed(LinkEvent):
    """Terminal event. ``dead_letters``: publications and presence updates queued but
    never handed to the transport (discarded with the link)."""

    reason: CloseReason
    error: WSEError | None = field(default=None, compare=False)
    dead_letters: tuple[DeadLetter, ...] = ()


# --------------------------------------------------------------------------- interest


class PeerInterest:
    """What a peer told us it wants (CLUSTER §8.3): exact topics and glob patterns.

    Unknown until the first RESYNC: an unknown set wants everything ("forward
    everything until the first RESYNC"); SUB and UNSUB edit the set either way.
    """

    __slots__ = ("_globs", "_matched", "exact", "known", "limit", "overflow")

    def __init__(self, limit: int = 1_000_000) -> None:
        self.known = False
        self.exact: set[str] = set()
        self._globs: dict[str, GlobPattern] = {}
        self._matched: dict[str, bool] = {}  # glob verdicts per topic, dropped on any change
        self.limit = limit
        self.overflow = 0  # topics refused at the cap

    def __len__(self) -> int:
        return len(self.exact) + len(self._globs)

    @property
    def globs(self) -> tuple[str, ...]:
        return tuple(self._globs)

    def topics(self) -> frozenset[str]:
        return frozenset(self.exact).union(self._globs)

    def wants(self, topic: str, raw: bytes) -> bool:
        """Route ``topic`` (``raw`` = its UTF-8 bytes) to this peer?"""
        if not self.known or topic in self.exact:
            return True
        globs = self._globs
        if not globs:
            return False
        matched = self._matched
        hit = matched.get(topic)
        if hit is None:
            hit = False
            for pattern in globs.values():
                if pattern.match_bytes(raw):
                    hit = True
                    break
            if len(matched) >= _MATCH_CACHE_MAX:
                matched.clear()
            matched[topic] = hit
        return hit

    def add(self, topic: str) -> None:
        if topic in self.exact or topic in self._globs:
            return
        if len(self) >= self.limit:
            self.overflow += 1
            return
        if is_glob(topic):
            self._globs[topic] = compile_glob(topic)
            self._matched.clear()
        else:
            self.exact.add(topic)

    def remove(self, topic: str) -> None:
        self.exact.discard(topic)
        if self._globs.pop(topic, None) is not None:
            self._matched.clear()

    def replace(self, topics: Iterable[str]) -> None:
        self.exact = set()
        self._globs = {}
        self._matched = {}
        self.known = True
        self.extend(topics)

    def extend(self, topics: Iterable[str]) -> None:
        for topic in topics:
            self.add(topic)

    def clear(self) -> None:
        """DRAIN: known and empty, so nothing is routed until the next RESYNC or SUB."""
        self.replace(())


_MATCH_CACHE_MAX: Final = 4096


def resync_topics(topics: Iterable[str]) -> list[str]:
    """The topics of an interest set that can travel in RESYNC (non-empty, no ``\\n``).

    Such topics cannot be subscribed anyway (PROTOCOL topic rules); this keeps a stray
    one from making the encoder raise in the middle of a link setup.
    """
    return [t for t in topics if t and "\n" not in t]


def dead_letters_from(data: bytes, peer_addr: str) -> list[DeadLetter]:
    """The publications and presence updates among frames we queued for a peer that
    never reached it (CLUSTER §8.7 dead-letter queue). ``data`` starts at a frame
    boundary; a torn last frame is ignored."""
    reader = FrameReader()
    reader.receive_data(data)
    out: list[DeadLetter] = []
    try:
        while batch := reader.frames():
            for frame in batch:
                if type(frame) is Msg:
                    out.append(DeadLetter(frame.topic, frame.payload, peer_addr, _ERR_CHANNEL))
                elif type(frame) is PresenceUpdate:
                    out.append(DeadLetter(frame.topic, frame.data, peer_addr, _ERR_PRESENCE))
    except ClusterFrameError:
        pass
    return out


# --------------------------------------------------------------------------- the link

_PING_BYTES: Final = encode(Ping())
_PONG_BYTES: Final = encode(Pong())
_SHUTDOWN_BYTES: Final = encode(Shutdown())
_DRAIN_BYTES: Final = encode(Drain())


class PeerLink:
    """One side of a cluster link. See the module docstring for the lifecycle."""

    __slots__ = (
        "_events",
        "_hello_deadline",
        "_last_rx",
        "_next_ping",
        "_next_resync",
        "_out",
        "_pending",
        "_pending_pos",
        "_reader",
        "_setup_phase",
        "address",
        "bytes_received",
        "bytes_sent",
        "capabilities",
        "config",
        "dropped_frames",
        "frames_received",
        "instance_id",
        "interest",
        "invalid_msgs",
        "link_id",
        "peer_capabilities",
        "peer_instance",
        "pending_frames",
        "role",
        "state",
        "transport_pending_frames",
        "unexpected_hellos",
        "unknown_frames",
        "version",
    )

    def __init__(
        self,
        role: LinkRole,
        instance_id: str,
        now: float,
        *,
        address: str = "",
        link_id: int = 0,
        config: LinkConfig | None = None,
        zstd: ZstdContext | None = None,
    ) -> None:
        self.config = config if config is not None else LinkConfig()
        self.role = role
        self.instance_id = instance_id
        self.address = address
        self.link_id = link_id
        self.state = LinkState.AWAIT_HELLO
        self.peer_instance: str | None = None
        self.peer_capabilities = 0
        self.capabilities = 0
        """Negotiated capability bits (ours AND the peer's); 0 until the HELLO exchange."""
        self.version = 0
        self.interest = PeerInterest(self.config.max_interest)
        self._reader = FrameReader(context=zstd)
        self._events: list[LinkEvent] = []
        self._out: list[bytes] = []
        self._pending: list[Frame] = []
        self._pending_pos = 0
        self._hello_deadline: float | None = now + self.config.hello_timeout
        self._next_ping: float | None = None
        self._next_resync: float | None = None
        self._last_rx = now
        self._setup_phase = False
        self.pending_frames = 0
        """Frames queued and not yet taken by :meth:`data_to_send`."""
        self.transport_pending_frames = 0
        """Set by a transport that knows how many frames it has not written yet; counts
        against ``max_queued_frames`` (CLUSTER §8.7)."""
        self.frames_received = 0
        self.bytes_received = 0
        self.bytes_sent = 0
        self.unknown_frames = 0
        self.unexpected_hellos = 0
        self.invalid_msgs = 0
        self.dropped_frames = 0
        if role is LinkRole.DIALER:
            # CLUSTER §8.1: the dialer speaks first.
            hello = Hello(PROTOCOL_VERSION, instance_id, self.config.capabilities)
            self._write(encode(hello))

    # ------------------------------------------------------------------ plumbing

    def __repr__(self) -> str:
        return (
            f"PeerLink({self.link_id}, {self.role.value}, {self.state.value}, "
            f"{self.address!r}, peer={self.peer_instance!r})"
        )

    def _transition(self, inp: LinkInput) -> LinkState:
        try:
            new = LINK_TRANSITIONS[(self.state, inp)]
        except KeyError:
            raise LocalProtocolError(
                f"{inp.value} is not allowed in link state {self.state.value}"
            ) from None
        self.state = new
        return new

    @property
    def is_open(self) -> bool:
        return self.state is LinkState.OPEN

    @property
    def wants_close(self) -> bool:
        """The transport should write :meth:`data_to_send` and close the socket."""
        return self.state is LinkState.CLOSED

    def events_received(self) -> list[LinkEvent]:
        """Every event since the last call (the list is handed over)."""
        events = self._events
        self._events = []
        return events

    def data_to_send(self) -> bytes:
        """Everything queued since the last call, as one buffer."""
        out = self._out
        if not out:
            return b""
        self._out = []
        self.pending_frames = 0
        data = out[0] if len(out) == 1 else b"".join(out)
        self.bytes_sent += len(data)
        return data

    def _write(self, data: bytes) -> None:
        self._out.append(data)
        self.pending_frames += 1

    def _close(
        self,
        inp: LinkInput,
        reason: CloseReason,
        error: WSEError | None = None,
        *,
        flush: bool = False,
    ) -> None:
        """Enter CLOSED. Output not yet handed to the transport is discarded (its
        publications become dead letters) unless ``flush`` (a graceful SHUTDOWN)."""
        if self.state is LinkState.CLOSED:
            return
        self._transition(inp)
        self._hello_deadline = self._next_ping = self._next_resync = None
        self._pending = []
        self._pending_pos = 0
        letters: tuple[DeadLetter, ...] = ()
        if self._out and not flush:
            letters = tuple(dead_letters_from(b"".join(self._out), self.address))
            self._out = []
            self.pending_frames = 0
        self._events.append(LinkClosed(reason, error, letters))

    def _reject(self, error: WSEError, reason: CloseReason) -> None:
        self._events.append(FrameRejected(error, error.message))
        self._close(_I.PEER_ERROR, reason, error)

    # ------------------------------------------------------------------ inbound

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> None:
        """Feed bytes read from the socket."""
        if self.state is LinkState.CLOSED or not data:
            return
        self.bytes_received += len(data)
        self._reader.receive_data(data)
        if self.state is not LinkState.DECIDING:
            self._process(now)

    def receive_eof(self, now: float) -> None:
        """The peer closed its side (or the socket ended)."""
        self._close(_I.EOF, CloseReason.EOF)

    def abort(self, now: float) -> None:
        """The transport lost the socket (reset, write error)."""
        self._close(_I.ABORT, CloseReason.ABORTED)

    def _next_frame(self) -> Frame | None:
        pending = self._pending
        pos = self._pending_pos
        if pos < len(pending):
            self._pending_pos = pos + 1
            return pending[pos]
        frames = self._reader.frames()  # may raise ClusterFrameError
        if not frames:
            self._pending = []
            self._pending_pos = 0
            return None
        self._pending = frames
        self._pending_pos = 1
        return frames[0]

    def _process(self, now: float) -> None:
        """Dispatch buffered frames until none is left or a decision is needed."""
        while True:
            state = self.state
            if state is not LinkState.OPEN and state is not LinkState.AWAIT_HELLO:
                return
            try:
                frame = self._next_frame()
            except ClusterFrameError as exc:
                self._reject(exc, CloseReason.MALFORMED)
                return
            if frame is None:
                return
            self.frames_received += 1
            if state is LinkState.OPEN:
                self._on_frame(frame, now)
            else:
                self._on_first_frame(frame)

    def _on_first_frame(self, frame: Frame) -> None:
        # CLUSTER §8.1: the first frame must be a HELLO with version >= 1.
        if type(frame) is not Hello:
            self._reject(
                ClusterFrameError(f"first cluster frame is {type(frame).__name__}, not HELLO"),
                CloseReason.BAD_HELLO,
            )
            return
        if frame.version < 1:
            self._reject(ClusterFrameError("HELLO with protocol version 0"), CloseReason.BAD_HELLO)
            return
        self._transition(_I.RECV_HELLO)
        self.peer_instance = frame.instance_id
        self.peer_capabilities = frame.capabilities
        self.capabilities = self.config.capabilities & frame.capabilities
        self.version = min(PROTOCOL_VERSION, frame.version)
        self._events.append(PeerHello(frame.instance_id, frame.version, frame.capabilities))

    def _on_frame(self, frame: Frame, now: float) -> None:
        cls = type(frame)
        if cls is Msg:
            self._last_rx = now
            self._setup_phase = False
            assert isinstance(frame, Msg)
            payload = frame.payload
            if not payload.isascii():
                try:
                    payload.decode("utf-8")
                except UnicodeDecodeError:
                    # CLUSTER §3.3: not deliverable as a text frame; dropped, link kept.
                    self.invalid_msgs += 1
                    return
            self._events.append(MsgReceived(frame.topic, payload, frame.epoch, frame.offset))
            return
        if cls is Hello:
            self.unexpected_hellos += 1  # ignored; does not count as liveness (§8.7)
            return
        if cls is Shutdown:
            self._close(_I.PEER_SHUTDOWN, CloseReason.PEER_SHUTDOWN)
            return
        self._last_rx = now
        if cls is Resync:
            assert isinstance(frame, Resync)
            if frame.continuation:
                self.interest.extend(frame.topics)
            else:
                self.interest.replace(frame.topics)
            return  # RESYNC frames lead the setup burst: the setup phase goes on
        if cls is PeerAnnounce:
            assert isinstance(frame, PeerAnnounce)
            own = self._setup_phase
            self._setup_phase = False
            self._events.append(AddressAnnounced(frame.address, own))
            return
        self._setup_phase = False
        if cls is Ping:
            self._send_control(_PONG_BYTES)
        elif cls is Pong:
            pass
        elif cls is Sub:
            assert isinstance(frame, Sub)
            self.interest.add(frame.topic)
        elif cls is Unsub:
            assert isinstance(frame, Unsub)
            self.interest.remove(frame.topic)
        elif cls is PeerList:
            assert isinstance(frame, PeerList)
            self._events.append(PeerListReceived(frame.addresses))
        elif cls is PresenceUpdate:
            assert isinstance(frame, PresenceUpdate)
            self._events.append(PresenceReceived(frame))
        elif cls is PresenceFull:
            assert isinstance(frame, PresenceFull)
            self._events.append(PresenceFullReceived(frame.data))
        elif cls is Drain:
            self.interest.clear()
            self._events.append(PeerDraining())
        else:  # Unknown: CLUSTER §3.14, counted and skipped
            assert isinstance(frame, Unknown)
            self.unknown_frames += 1

    # ------------------------------------------------------------------ decision

    def accept(
        self,
        now: float,
        *,
        interest: Iterable[str] = (),
        announce: str | None = None,
        peers: Sequence[str] = (),
        presence: Sequence[PresenceFull] | None = None,
    ) -> None:
        """Keep the link: an acceptor answers with its HELLO, then both roles send the
        setup burst of CLUSTER §8.1, in order and only what applies:

        1. RESYNC of ``interest`` if it is non-empty (several frames if needed);
        2. PEER_ANNOUNCE of ``announce`` (our cluster address) if given;
        3. PEER_LIST of ``peers`` (at most 256) if any;
        4. PRESENCE_FULL chunks if ``presence`` is given and bit2 was negotiated.

        Frames that arrived behind the peer's HELLO are processed before returning.
        """
        if self.state is LinkState.CLOSED:
            return
        self._transition(_I.ACCEPT)
        if self.role is LinkRole.ACCEPTOR:
            hello = Hello(PROTOCOL_VERSION, self.instance_id, self.config.capabilities)
            self._write(encode(hello))
        self._hello_deadline = None
        self._last_rx = now
        self._next_ping = now + self.config.ping_interval
        self._next_resync = now + self.config.resync_interval
        self._setup_phase = True
        topics = resync_topics(interest)
        if topics:
            for frame in resync_frames(topics):
                self._write(encode(frame))
        if announce:
            self._write(encode(PeerAnnounce(announce)))
        if peers:
            self._write(encode(PeerList(tuple(peers[:MAX_PEER_LIST]))))
        if presence is not None and self.capabilities & CAP_PRESENCE:
            for chunk in presence:
                self._write(encode(chunk))
        self._process(now)

    def refuse(self, reason: CloseReason = CloseReason.REFUSED, *, answer: bool = False) -> None:
        """Drop the link after the peer's HELLO. An acceptor does not answer (§8.2),
        unless ``answer``: then it sends its HELLO first, so that a dialer which reached
        its own node learns so from the instance id."""
        if self.state is LinkState.CLOSED:
            return
        self._transition(_I.REFUSE)
        if answer and self.role is LinkRole.ACCEPTOR:
            self._write(encode(Hello(PROTOCOL_VERSION, self.instance_id, self.config.capabilities)))
        self._hello_deadline = None
        self._pending = []
        self._events.append(LinkClosed(reason))

    # ------------------------------------------------------------------ outbound

    def _check_open(self) -> bool:
        state = self.state
        if state is LinkState.OPEN:
            return True
        self._transition(_I.SEND)  # raises unless CLOSED, where sends are dropped
        return False

    def _send_control(self, data: bytes) -> None:
        """PING/PONG/SUB/...: never dropped for a full queue (they are tiny)."""
        self._out.append(data)
        self.pending_frames += 1

    def send_msg(self, frame: bytes) -> bool:
        """Queue a pre-built MSG frame (the mesh builds one per variant, CLUSTER §7).

        It becomes a dead letter if the link closes before the frame was handed to
        the transport. False: dropped (queue full, or the link is closed).
        """
        if self.state is not LinkState.OPEN:
            self._check_open()
            return False
        if self.pending_frames + self.transport_pending_frames >= self.config.max_queued_frames:
            self.dropped_frames += 1  # CLUSTER §8.7: a full queue drops and counts
            return False
        self._out.append(frame)
        self.pending_frames += 1
        return True

    def send_presence(self, frame: bytes) -> bool:
        """Queue a pre-built PRESENCE_UPDATE if bit2 was negotiated (CLUSTER §8.6)."""
        if not self._check_open() or not self.capabilities & CAP_PRESENCE:
            return False
        if self.pending_frames + self.transport_pending_frames >= self.config.max_queued_frames:
            self.dropped_frames += 1
            return False
        self._out.append(frame)
        self.pending_frames += 1
        return True

    def send_sub(self, topic: str) -> bool:
        """SUB to a peer with bit0 (CLUSTER §8.3); False when not negotiated."""
        if not self._check_open() or not self.capabilities & CAP_INTEREST:
            return False
        self._send_control(encode(Sub(topic)))
        return True

    def send_unsub(self, topic: str) -> bool:
        if not self._check_open() or not self.capabilities & CAP_INTEREST:
            return False
        self._send_control(encode(Unsub(topic)))
        return True

    def send_resync(self, topics: Iterable[str]) -> bool:
        """Our whole interest set (several frames if needed); nothing for an empty set
        (CLUSTER §8.3: wse-py never sends an empty RESYNC)."""
        if not self._check_open():
            return False
        wanted = resync_topics(topics)
        if not wanted:
            return False
        for frame in resync_frames(wanted):
            self._send_control(encode(frame))
        return True

    def send_frame(self, frame: Frame) -> None:
        """Any other frame (PEER_ANNOUNCE, PEER_LIST, PRESENCE_FULL, ...)."""
        if self._check_open():
            self._send_control(encode(frame))

    def send_drain(self) -> None:
        """Tell the peer we are draining: it stops routing to us (CLUSTER §8.3)."""
        if self._check_open():
            self._send_control(_DRAIN_BYTES)

    def shutdown(self) -> None:
        """Send SHUTDOWN and close (the node is stopping, CLUSTER §3.6)."""
        if self.state is LinkState.OPEN:
            self._send_control(_SHUTDOWN_BYTES)
        self._close(_I.CLOSE, CloseReason.SHUTDOWN, flush=True)

    def close(self, reason: CloseReason = CloseReason.CLOSED) -> None:
        """Close without a word (tiebreak loser, superseded link, owner's choice)."""
        self._close(_I.CLOSE, reason)

    # ------------------------------------------------------------------ timers

    def next_deadline(self) -> float | None:
        """The earliest time :meth:`handle_timer` has work, or None."""
        state = self.state
        if state is LinkState.OPEN:
            ping = self._next_ping
            resync = self._next_resync
            assert ping is not None and resync is not None
            return ping if ping < resync else resync
        if state is LinkState.CLOSED:
            return None
        return self._hello_deadline

    def handle_timer(self, now: float) -> None:
        """Run what is due at ``now`` (deadlines are inclusive)."""
        state = self.state
        if state is LinkState.OPEN:
            ping = self._next_ping
            assert ping is not None
            interval = self.config.ping_interval
            if now >= ping:
                # CLUSTER §8.7: liveness is checked at the ping ticks.
                if now - self._last_rx > self.config.dead_after:
                    self._close(_I.TIMEOUT, CloseReason.HEARTBEAT_TIMEOUT)
                    return
                self._transition(_I.TICK)
                self._send_control(_PING_BYTES)
                ping += interval
                if ping <= now:  # the timer was late: skip missed ticks, no burst
                    ping += (int((now - ping) / interval) + 1) * interval
                self._next_ping = ping
            resync = self._next_resync
            assert resync is not None
            if now >= resync:
                period = self.config.resync_interval
                resync += period
                if resync <= now:
                    resync += (int((now - resync) / period) + 1) * period
                self._next_resync = resync
                self._events.append(ResyncDue())
        elif state is not LinkState.CLOSED:
            deadline = self._hello_deadline
            if deadline is not None and now >= deadline:
                self._close(_I.TIMEOUT, CloseReason.HELLO_TIMEOUT)

"""Load generator for the server benchmark: raw sockets, counted frames, separate processes.

Why hand-written: a benchmark client built on a WebSocket library would cost more CPU per
message than the servers it measures (the machine has two cores). This client never parses
JSON on the hot paths; it only walks frame headers. Runs of identically framed messages
(every fan-out delivery of one publication has the same header) are counted with a few
strided byte slices per ``recv`` instead of one Python step per frame.

A worker is ``python -m bench.loadgen``: the first stdin line is a JSON job, later lines are
commands (``{"cmd": "go", ...}``, ``{"cmd": "close"}``); it answers JSON lines on stdout.
Jobs (``mode``):

- ``fanout``: open ``conns`` connections, report ``ready``; on ``go`` (``expect`` messages per
  connection) count data messages until every connection has them or ``seconds`` pass.
- ``inbound``: open ``conns``, ``ready``; on ``go`` send ``messages`` masked text frames per
  connection as fast as the server takes them, report ``sent``.
- ``connect``: ``count`` sequential connections; each sample is the time from ``connect()``
  to the first data frame (``server_ready`` or the baseline's hello).
- ``ping``: one connection, ``count`` sequential round trips (WSE ping -> PONG, or echo).

Both latency jobs may name several ``targets`` (servers); they then alternate between them
sample by sample, so a burst of load from elsewhere on the machine hits every server alike.
- ``idle``: open ``conns`` and hold them until ``close`` (per-connection memory).

Every connection is to 127.0.0.1, sends the same upgrade request (optional extra headers
such as the JWT), and is ready once the server's first data frame has arrived.
:class:`Child` is the harness side: a subprocess with JSON lines on its pipes, stopped by PID.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import json
import os
import queue
import resource
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

HOST = "127.0.0.1"
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
RECV_SIZE = 262144
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
POLL_SLEEP = 0.002
"""Seconds a fan-out worker naps after each wake-up while counting (batches the reads)."""
INBOUND_BLOCK = 1024
"""Frames per pre-built (pre-masked) send block; blocks are re-sent to reach the count."""


# --------------------------------------------------------------------------- framing


def raise_nofile(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards ``wanted`` within the hard limit; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def upgrade_request(port: int, path: str, headers: Sequence[Sequence[str]]) -> tuple[bytes, bytes]:
    """(request bytes, expected Sec-WebSocket-Accept value) for one fresh key."""
    key = base64.b64encode(os.urandom(16))
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {HOST}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key.decode()}",
        "Sec-WebSocket-Version: 13",
    ]
    lines.extend(f"{name}: {value}" for name, value in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), accept


def check_response(head: bytes, accept: bytes) -> None:
    """Raise ConnectionError unless ``head`` (up to the blank line) is a valid 101."""
    status, _, rest = head.partition(b"\r\n")
    if not status.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(f"upgrade refused: {status[:80]!r}")
    for line in rest.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-accept":
            if value.strip() != accept:
                raise ConnectionError("wrong Sec-WebSocket-Accept")
            return
    raise ConnectionError("no Sec-WebSocket-Accept")


def mask(payload: bytes, key: bytes) -> bytes:
    """RFC 6455 §5.3 masking, done as one big-integer XOR (no per-byte Python loop)."""
    n = len(payload)
    if not n:
        return b""
    keys = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(keys, "big")).to_bytes(n, "big")


def client_frame(opcode: int, payload: bytes, key: bytes | None = None) -> bytes:
    """One FIN client frame, masked with ``key`` (random when None)."""
    if key is None:
        key = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0xFE, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0xFF, n)
    return head + key + mask(payload, key)


def close_frame(code: int = 1000) -> bytes:
    return client_frame(OP_CLOSE, struct.pack("!H", code))


class FrameCounter:
    """Incremental parser of server frames that counts complete data messages.

    ``keep=True`` also stores each message payload in ``kept`` (for the few frames whose
    content matters: hello, PONG, echo). Control frames are not messages; a close frame
    sets ``closed`` and ends counting. Masked server frames raise ``ValueError``.
    """

    __slots__ = ("_buf", "_frag", "close_code", "closed", "controls", "frames", "keep", "kept")

    def __init__(self, *, keep: bool = False) -> None:
        self.frames = 0
        self.controls = 0
        self.closed = False
        self.close_code: int | None = None
        self.keep = keep
        self.kept: list[bytes] = []
        self._buf = b""
        self._frag: list[bytes] | None = None

    def feed(self, data: bytes) -> int:
        """Consume ``data``; return how many messages it completed."""
        if self.closed:
            return 0
        if self._buf:
            data = self._buf + data
        n = len(data)
        pos = 0
        got = 0
        keep = self.keep
        while True:
            avail = n - pos
            if avail < 2:
                break
            b0 = data[pos]
            b1 = data[pos + 1]
            if b1 & 0x80:
                raise ValueError("server frames must not be masked (RFC 6455 §5.1)")
            length = b1 & 0x7F
            if length < 126:
                hl = 2
            elif length == 126:
                if avail < 4:
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
                hl = 4
            else:
                if avail < 10:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                hl = 10
            total = hl + length
            if avail < total:
                break
            op = b0 & 0x0F
            if op in (OP_TEXT, OP_BINARY):
                if not b0 & 0x80:  # first fragment
                    self._frag = [data[pos + hl : pos + total]] if keep else []
                elif keep:
                    self.kept.append(data[pos + hl : pos + total])
                    got += 1
                else:
                    # Fast path: k frames with the same header in a row are k messages,
                    # since the header alone fixes each frame's length.
                    k = avail // total
                    if k > 1:
                        end = pos + k * total
                        for j in range(hl):
                            col = data[pos + j : end : total]
                            ref = data[pos + j : pos + j + 1] * k
                            if col != ref:
                                diff = int.from_bytes(col, "big") ^ int.from_bytes(ref, "big")
                                k = k - 1 - (diff.bit_length() - 1) // 8  # first mismatch
                                end = pos + k * total
                        got += k
                        pos = end
                        continue
                    got += 1
            elif op == OP_CONT:
                frag = self._frag
                if frag is None:
                    raise ValueError("continuation frame without a message")
                if keep:
                    frag.append(data[pos + hl : pos + total])
                if b0 & 0x80:
                    if keep:
                        self.kept.append(b"".join(frag))
                    self._frag = None
                    got += 1
            elif op == OP_CLOSE:
                self.closed = True
                if length >= 2:
                    self.close_code = (data[pos + hl] << 8) | data[pos + hl + 1]
                pos += total
                break
            else:
                self.controls += 1
            pos += total
        self._buf = data[pos:] if pos < n and not self.closed else b""
        self.frames += got
        return got


# --------------------------------------------------------------------------- worker side


class Control:
    """The worker's stdin (commands) and stdout (JSON events)."""

    def __init__(self) -> None:
        self.fd = sys.stdin.fileno()
        self._partial = b""
        self._pending: list[dict[str, Any]] = []
        self.eof = False

    def send(self, **event: Any) -> None:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()

    def read_lines(self) -> list[dict[str, Any]]:
        """Commands available now (call when the fd is readable; blocks otherwise)."""
        if self._pending:
            out, self._pending = self._pending, []
            return out
        chunk = os.read(self.fd, 65536)
        if not chunk:
            self.eof = True
            return []
        self._partial += chunk
        *lines, self._partial = self._partial.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

    def next_cmd(self) -> dict[str, Any]:
        """Block for the next command; stdin EOF reads as ``close``."""
        while not self._pending:
            if self.eof:
                return {"cmd": "close"}
            self._pending = self.read_lines()
        return self._pending.pop(0)


class Client:
    """One non-blocking connection while it opens (connect, upgrade, first frame)."""

    __slots__ = ("accept", "counter", "head", "request", "sock", "state", "t0", "t_ready")

    def __init__(self, sock: socket.socket, request: bytes, accept: bytes) -> None:
        self.sock = sock
        self.request = request
        self.accept = accept
        self.state = "connect"
        self.head = b""
        self.counter = FrameCounter(keep=True)
        self.t0 = time.perf_counter()
        self.t_ready = 0.0


def _new_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def open_many(
    n: int,
    port: int,
    path: str,
    headers: Sequence[Sequence[str]],
    *,
    concurrency: int,
    deadline: float,
) -> tuple[list[Client], list[str]]:
    """Open ``n`` connections, at most ``concurrency`` in flight; (ready clients, errors)."""
    sel = selectors.DefaultSelector()
    ready: list[Client] = []
    errors: list[str] = []
    started = 0
    in_flight = 0

    def fail(c: Client, why: str) -> None:
        nonlocal in_flight
        in_flight -= 1
        errors.append(why)
        with contextlib.suppress(Exception):
            sel.unregister(c.sock)
        c.sock.close()

    while len(ready) + len(errors) < n:
        while started < n and in_flight < concurrency:
            request, accept = upgrade_request(port, path, headers)
            sock = _new_socket()
            sock.setblocking(False)
            c = Client(sock, request, accept)
            err = sock.connect_ex((HOST, port))
            started += 1
            in_flight += 1
            if err not in (0, errno.EINPROGRESS):
                fail(c, f"connect: {os.strerror(err)}")
                continue
            sel.register(sock, selectors.EVENT_WRITE, c)
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            errors.extend(["timeout"] * (n - len(ready) - len(errors)))
            for key in list(sel.get_map().values()):
                key.fileobj.close()  # type: ignore[union-attr]
            break
        for key, _ in sel.select(min(timeout, 1.0)):
            c = key.data
            try:
                if c.state == "connect":
                    err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        fail(c, f"connect: {os.strerror(err)}")
                        continue
                    c.sock.sendall(c.request)  # a few hundred bytes: fits the empty buffer
                    c.state = "head"
                    sel.modify(c.sock, selectors.EVENT_READ, c)
                    continue
                data = c.sock.recv(65536)
                if not data:
                    fail(c, f"EOF during {c.state}")
                    continue
                if c.state == "head":
                    c.head += data
                    head, sep, rest = c.head.partition(b"\r\n\r\n")
                    if not sep:
                        continue
                    check_response(head, c.accept)
                    c.state = "first"
                    data = rest
                if data:
                    c.counter.feed(data)
                if c.counter.closed:
                    fail(c, f"closed by server ({c.counter.close_code})")
                elif c.counter.frames:
                    c.t_ready = time.perf_counter()
                    c.state = "open"
                    sel.unregister(c.sock)
                    in_flight -= 1
                    ready.append(c)
            except (OSError, ConnectionError, ValueError) as exc:
                fail(c, f"{type(exc).__name__}: {exc}")
    sel.close()
    for c in ready:
        c.sock.setblocking(True)
    return ready, errors


def _close_all(clients: Sequence[Client]) -> None:
    frame = close_frame()
    for c in clients:
        with contextlib.suppress(OSError):
            c.sock.setblocking(False)
            c.sock.send(frame)
        c.sock.close()


def _start(job: dict[str, Any], ctl: Control) -> list[Client]:
    clients, errors = open_many(
        int(job["conns"]),
        int(job["port"]),
        job.get("path", "/"),
        job.get("headers", []),
        concurrency=int(job.get("concurrency", 64)),
        deadline=time.monotonic() + float(job.get("open_seconds", 60.0)),
    )
    ctl.send(event="ready", conns=len(clients), errors=len(errors), error_sample=errors[:3])
    return clients


def run_fanout(job: dict[str, Any], ctl: Control) -> None:
    """Count messages on every connection after each ``go`` (repeatable until ``close``)."""
    clients = _start(job, ctl)
    sel = selectors.DefaultSelector()
    sel.register(ctl.fd, selectors.EVENT_READ, None)
    counters: list[FrameCounter] = []
    for c in clients:
        c.sock.setblocking(False)
        counter = FrameCounter()
        counters.append(counter)
        sel.register(c.sock, selectors.EVENT_READ, (c.sock, counter))
    expect = 0
    remaining = 0
    deadline = 0.0
    t_go = t_first = t_last = cpu_go = user_go = 0.0
    counting = False
    dead = 0
    nap = float(job.get("poll_sleep", POLL_SLEEP))
    while True:
        timeout = max(0.0, deadline - time.monotonic()) if counting else None
        events = sel.select(timeout)
        if counting and nap:
            # Let deliveries pile up: a worker blocked in epoll would be woken (and could
            # preempt the server on its core) by every single segment a server writes.
            time.sleep(nap)
        for key, _ in events:
            if key.data is None:
                for msg in ctl.read_lines():
                    if msg.get("cmd") == "go":
                        expect = int(msg["expect"])
                        for counter in counters:
                            counter.frames = 0
                        remaining = sum(1 for counter in counters if not counter.closed)
                        deadline = time.monotonic() + float(msg.get("seconds", 30.0))
                        t_go = time.monotonic()
                        cpu_go = time.process_time()
                        user_go = os.times().user
                        t_first = t_last = 0.0
                        counting = True
                        ctl.send(event="counting")
                    elif msg.get("cmd") == "close":
                        _close_all(clients)
                        ctl.send(event="closed")
                        return
                if ctl.eof:
                    return
                continue
            sock, counter = key.data
            try:
                data = sock.recv(RECV_SIZE)
            except OSError:
                data = b""
            if not data:
                sel.unregister(sock)
                if counting and not counter.closed and counter.frames < expect:
                    remaining -= 1
                counter.closed = True
                dead += 1
                continue
            before = counter.frames
            if counter.feed(data) and counting:
                now = time.monotonic()
                if not t_first:
                    t_first = now
                if before < expect <= counter.frames:
                    remaining -= 1
                    t_last = now
            if counter.closed:
                sel.unregister(sock)
                dead += 1
                if counting and counter.frames < expect:
                    remaining -= 1
        if counting and (remaining <= 0 or time.monotonic() >= deadline):
            counting = False
            total = sum(counter.frames for counter in counters)
            complete = sum(1 for counter in counters if counter.frames >= expect)
            ctl.send(
                event="counted",
                messages=total,
                complete=complete,
                conns=len(counters),
                excess=sum(max(0, counter.frames - expect) for counter in counters),
                dead=dead,
                t_go=t_go,
                t_first=t_first,
                t_last=t_last if complete == len(counters) else time.monotonic(),
                timed_out=remaining > 0,
                cpu=time.process_time() - cpu_go,
                user=os.times().user - user_go,
            )


def inbound_block(payload: bytes, frames: int) -> bytes:
    """``frames`` masked text frames of ``payload``, each with its own random key."""
    keys = os.urandom(4 * frames)
    return b"".join(client_frame(OP_TEXT, payload, keys[i * 4 : i * 4 + 4]) for i in range(frames))


def run_inbound(job: dict[str, Any], ctl: Control) -> None:
    """On each ``go``, send ``messages`` text frames on every connection."""
    clients = _start(job, ctl)
    payload = job.get("payload", '{"t":"bench","p":{"i":1234567}}').encode()
    block = inbound_block(payload, INBOUND_BLOCK)
    frame_len = len(block) // INBOUND_BLOCK
    sel = selectors.DefaultSelector()
    sel.register(ctl.fd, selectors.EVENT_READ, None)
    for c in clients:
        c.sock.setblocking(False)
    while True:
        msg = ctl.next_cmd()
        if msg.get("cmd") == "close":
            _close_all(clients)
            ctl.send(event="closed")
            return
        if msg.get("cmd") != "go":
            continue
        per_conn = int(msg["messages"])
        deadline = time.monotonic() + float(msg.get("seconds", 30.0))
        # Per connection: how many bytes are left, offset into the current block.
        left = dict.fromkeys(range(len(clients)), per_conn * frame_len)
        offset = dict.fromkeys(range(len(clients)), 0)
        for i, c in enumerate(clients):
            sel.register(c.sock, selectors.EVENT_WRITE | selectors.EVENT_READ, i)
        view = memoryview(block)
        t_go = time.monotonic()
        cpu_go = time.process_time()
        sent_bytes = 0
        received = 0
        errors = 0
        while left and time.monotonic() < deadline:
            for key, mask_ in sel.select(max(0.0, deadline - time.monotonic())):
                i = key.data
                if i is None:
                    ctl._pending.extend(ctl.read_lines())  # handled after this run
                    if ctl.eof:
                        sel.unregister(ctl.fd)
                    continue
                sock = clients[i].sock
                if mask_ & selectors.EVENT_READ:
                    try:
                        received += len(sock.recv(RECV_SIZE))
                    except OSError:
                        pass
                if not mask_ & selectors.EVENT_WRITE or i not in left:
                    continue
                off = offset[i]
                want = min(left[i], len(block) - off)
                try:
                    n = sock.send(view[off : off + want])
                except BlockingIOError:
                    continue
                except OSError:
                    errors += 1
                    del left[i]
                    sel.unregister(sock)
                    continue
                sent_bytes += n
                left[i] -= n
                offset[i] = (off + n) % len(block)
                if not left[i]:
                    del left[i]
                    sel.modify(sock, selectors.EVENT_READ, i)
        t_sent = time.monotonic()
        for c in clients:
            with contextlib.suppress(KeyError, ValueError):
                sel.unregister(c.sock)
        ctl.send(
            event="sent",
            messages=sent_bytes // frame_len,
            partial=sent_bytes % frame_len != 0,
            t_go=t_go,
            t_sent=t_sent,
            received_bytes=received,
            errors=errors,
            timed_out=bool(left),
            cpu=time.process_time() - cpu_go,
        )


def _read_message(sock: socket.socket, counter: FrameCounter) -> bytes:
    """Block until the next data message (kept payload) arrives."""
    while not counter.kept:
        data = sock.recv(RECV_SIZE)
        if not data:
            raise ConnectionError("EOF")
        counter.feed(data)
        if counter.closed and not counter.kept:
            raise ConnectionError(f"closed by server ({counter.close_code})")
    return counter.kept.pop(0)


def open_blocking(
    port: int, path: str, headers: Sequence[Sequence[str]], timeout: float = 10.0
) -> tuple[socket.socket, FrameCounter, float, bytes]:
    """Open one connection and wait for its first message: (sock, counter, seconds, first).

    The request (and its key) is built before the clock starts.
    """
    request, accept = upgrade_request(port, path, headers)
    t0 = time.perf_counter()
    sock = _new_socket()
    sock.settimeout(timeout)
    sock.connect((HOST, port))
    sock.sendall(request)
    head = b""
    while True:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("EOF during upgrade")
        head += data
        h, sep, rest = head.partition(b"\r\n\r\n")
        if sep:
            break
    check_response(h, accept)
    counter = FrameCounter(keep=True)
    if rest:
        counter.feed(rest)
    first = _read_message(sock, counter)
    return sock, counter, time.perf_counter() - t0, first


def _targets(job: dict[str, Any]) -> list[dict[str, Any]]:
    """The servers a latency job alternates between (``targets``, or the job's own port)."""
    targets = job.get("targets") or [job]
    return [
        {
            "port": int(t["port"]),
            "path": t.get("path", "/"),
            "headers": t.get("headers", []),
            "expect": t.get("expect", "pong"),
        }
        for t in targets
    ]


def run_connect(job: dict[str, Any], ctl: Control) -> None:
    """Sequential connections, alternating between the targets (so noise hits all alike).

    Connections stay open until the end so no server does close work during the samples.
    """
    targets = _targets(job)
    samples: list[list[float]] = [[] for _ in targets]
    socks: list[socket.socket] = []
    errors: list[str] = []
    warmup = int(job.get("warmup", 0))
    deadline = time.monotonic() + float(job.get("seconds", 30.0))
    for i in range(warmup + int(job["count"])):
        if time.monotonic() > deadline:
            errors.append("timeout")
            break
        for j in range(len(targets)):
            k = (i + j) % len(targets)  # rotate who goes first
            t = targets[k]
            try:
                sock, _, seconds, _ = open_blocking(t["port"], t["path"], t["headers"])
            except (OSError, ConnectionError, ValueError) as exc:
                errors.append(f"{t['port']}: {type(exc).__name__}: {exc}")
                continue
            socks.append(sock)
            if i >= warmup:
                samples[k].append(seconds)
    ctl.send(event="samples", samples=samples, errors=len(errors), error_sample=errors[:3])
    frame = close_frame()
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.send(frame)
        sock.close()


def run_ping(job: dict[str, Any], ctl: Control) -> None:
    """Sequential round trips, one connection per target, alternating between targets.

    WSE targets get ``{"t":"ping",...}`` and must answer ``PONG``; echo targets must send the
    same text back.
    """
    targets = _targets(job)
    conns = [open_blocking(t["port"], t["path"], t["headers"])[:2] for t in targets]
    samples: list[list[float]] = [[] for _ in targets]
    bad = 0
    warmup = int(job.get("warmup", 0))
    deadline = time.monotonic() + float(job.get("seconds", 30.0))
    for i in range(warmup + int(job["count"])):
        if time.monotonic() > deadline:
            break
        for j in range(len(targets)):
            k = (i + j) % len(targets)
            sock, counter = conns[k]
            text = b'{"t":"ping","p":{"timestamp":%d}}' % int(time.time() * 1000)
            frame = client_frame(OP_TEXT, text)
            t0 = time.perf_counter()
            sock.sendall(frame)
            reply = _read_message(sock, counter)
            t1 = time.perf_counter()
            ok = (b'"t":"PONG"' in reply) if targets[k]["expect"] == "pong" else reply == text
            if not ok:
                bad += 1
            elif i >= warmup:
                samples[k].append(t1 - t0)
    ctl.send(event="samples", samples=samples, errors=bad, error_sample=[])
    for sock, _ in conns:
        with contextlib.suppress(OSError):
            sock.send(close_frame())
        sock.close()


def run_idle(job: dict[str, Any], ctl: Control) -> None:
    """Open ``conns`` connections and hold them until ``close`` (or stdin EOF)."""
    clients = _start(job, ctl)
    while ctl.next_cmd().get("cmd") != "close":
        pass
    _close_all(clients)
    ctl.send(event="closed")


MODES = {
    "fanout": run_fanout,
    "inbound": run_inbound,
    "connect": run_connect,
    "ping": run_ping,
    "idle": run_idle,
}


def worker_main() -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    ctl = Control()
    line = b""
    while not line.endswith(b"\n"):  # the job line, read unbuffered (stdin is shared with ctl)
        byte = os.read(ctl.fd, 1)
        if not byte:
            return 1
        line += byte
    job = json.loads(line)
    raise_nofile(int(job.get("conns", 1)) + 256)
    try:
        MODES[job["mode"]](job, ctl)
    except Exception as exc:  # reported to the harness, which decides
        ctl.send(event="error", error=f"{type(exc).__name__}: {exc}")
        return 1
    return 0


# --------------------------------------------------------------------------- harness side


class ChildError(RuntimeError):
    """A benchmark subprocess failed, reported an error, or timed out."""


class Child:
    """A subprocess speaking JSON lines: commands on stdin, events on stdout.

    Started with ``subprocess.Popen`` and stopped by its PID (``stop``): a polite ``stop``
    command or stdin EOF first, then SIGTERM, then SIGKILL. stderr goes to a temporary file
    whose tail is included in errors.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        name: str,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the child)
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            cwd=cwd,
            env=env,
        )
        self.pid = self.proc.pid
        self._events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "stdout", "text": line.decode(errors="replace")}
            self._events.put(event)
        self._events.put(None)

    def send(self, **msg: Any) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError) as exc:
            raise ChildError(f"{self.name}: cannot send {msg}: {exc}{self.stderr_tail()}") from None

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        """The next ``event`` (other informational lines are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChildError(f"{self.name}: no {event!r} within {timeout:.0f} s")
            try:
                msg = self._events.get(timeout=left)
            except queue.Empty:
                continue
            if msg is None:
                self._events.put(None)
                raise ChildError(f"{self.name}: exited waiting for {event!r}{self.stderr_tail()}")
            if msg.get("event") == event:
                return msg
            if msg.get("event") == "error":
                raise ChildError(f"{self.name}: {msg.get('error')}{self.stderr_tail()}")

    def stderr_tail(self, limit: int = 1500) -> str:
        try:
            self._stderr.seek(0, os.SEEK_END)
            size = self._stderr.tell()
            self._stderr.seek(max(0, size - limit))
            tail = self._stderr.read().decode(errors="replace").strip()
        except (OSError, ValueError):
            return ""
        return f"\n--- stderr of {self.name} (pid {self.pid}) ---\n{tail}" if tail else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 5.0, command: dict[str, Any] | None = None) -> int | None:
        """Stop the process by PID; returns its exit status (None if it had to be killed)."""
        if self.alive():
            with contextlib.suppress(Exception):
                if command is not None:
                    self.send(**command)
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGTERM)
                try:
                    self.proc.wait(3.0)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.pid, signal.SIGKILL)
                    self.proc.wait(3.0)
                    self._close()
                    return None
        self._close()
        return self.proc.returncode

    def _close(self) -> None:
        with contextlib.suppress(Exception):
            self._reader.join(1.0)
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(Exception):
                if stream is not None:
                    stream.close()
        with contextlib.suppress(Exception):
            self._stderr.close()


def spawn_worker(job: dict[str, Any], *, name: str, cwd: str, env: dict[str, str]) -> Child:
    """Start ``python -m bench.loadgen`` with ``job``."""
    child = Child([sys.executable, "-m", "bench.loadgen"], name=name, cwd=cwd, env=env)
    child.send(**job)
    return child


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (all threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB, from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise ValueError(f"no VmRSS for pid {pid}")


if __name__ == "__main__":
    sys.exit(worker_main())

"""Host process for the servers under test on the gevent transport.

Monkey-patching comes first, before anything else is imported (what a gevent application
does), and happens only in this process: the pytest process never imports gevent.
``remote.GeventHost`` starts ``python tests/integration/gevent_host.py``, reads the control
port from the first stdout line, then sends requests over local TCP (one connection per
client thread, one greenlet per connection here), each a length-prefixed pickle:

- ``("create", kwargs, port, start, transport_options)`` -> server id: a
  ``WSEServer("127.0.0.1", port, transport="gevent", **kwargs)`` in drain mode;
- ``("call", id, method, args, kwargs)`` -> what the method returned (``port``,
  ``conn_info``, ``process_is_patched`` and ``greenlet_count`` are answered here);
- ``("discard", id)``: stop and forget.

Answers are ``("ok", value)`` or ``("err", exception)``. The process exits when its stdin
closes (the pytest process ended or stopped it).
"""

from gevent import monkey

monkey.patch_all()

import gc  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import pickle  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import gevent.os  # noqa: E402
import greenlet  # noqa: E402

from wse_server import WSEServer  # noqa: E402
from wse_transports.gevent import process_is_patched  # noqa: E402

_LEN = struct.Struct("!I")
_servers: dict[int, WSEServer] = {}
_ids = itertools.count(1)


def conn_info(server: WSEServer, conn_id: str) -> dict[str, Any] | None:
    """What the tests read from a live connection (``server._core`` in-process)."""
    with server._lock:
        conn = server._core.get_connection(conn_id)
        if conn is None:
            return None
        return {
            "state": conn.state,
            "pending_bytes": conn.pending_bytes,
            "transport_backlog": conn.transport_backlog,
            "encrypted": conn.encrypted,
        }


def handle(request: tuple[Any, ...]) -> Any:
    op = request[0]
    if op == "create":
        _, kwargs, port, start, options = request
        server = WSEServer("127.0.0.1", port, transport="gevent", **kwargs)
        server._transport_options.update(options)
        server.enable_drain_mode()
        if start:
            server.start()
        sid = next(_ids)
        _servers[sid] = server
        return sid
    if op == "call":
        _, sid, name, args, kwargs = request
        server = _servers[sid]
        if name == "port":
            return server.port
        if name == "conn_info":
            return conn_info(server, *args)
        if name == "process_is_patched":
            return process_is_patched()
        if name == "greenlet_count":
            return sum(isinstance(o, greenlet.greenlet) for o in gc.get_objects())
        return getattr(server, name)(*args, **kwargs)
    if op == "discard":
        server = _servers.pop(request[1], None)
        if server is not None:
            server.stop()
        return None
    raise ValueError(f"unknown request {op!r}")


def _read_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def serve_client(sock: socket.socket) -> None:
    with sock:
        while True:
            head = _read_exact(sock, _LEN.size)
            if head is None:
                return
            body = _read_exact(sock, _LEN.unpack(head)[0])
            if body is None:
                return
            try:
                reply: tuple[str, Any] = ("ok", handle(pickle.loads(body)))
            except BaseException as exc:  # sent back and raised in the caller
                reply = ("err", exc)
            try:
                data = pickle.dumps(reply)
            except Exception as exc:  # an unpicklable value or exception
                data = pickle.dumps(("err", RuntimeError(f"unpicklable reply: {exc!r}")))
            sock.sendall(_LEN.pack(len(data)) + data)


def watch_stdin() -> None:
    """Exit when the parent closes our stdin (or dies)."""
    fd = sys.stdin.fileno()
    gevent.os.make_nonblocking(fd)
    while gevent.os.nb_read(fd, 1024):
        pass
    for server in list(_servers.values()):
        server.stop()
    os._exit(0)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    gevent.spawn(watch_stdin)
    print(json.dumps({"port": listener.getsockname()[1]}), flush=True)
    while True:
        sock, _ = listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        gevent.spawn(serve_client, sock)


if __name__ == "__main__":
    main()

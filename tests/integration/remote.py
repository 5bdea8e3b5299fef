"""The pytest side of servers that run in another process (``gevent_host.py``).

:class:`RemoteServer` forwards ``WSEServer`` method calls, so a test body reads the same
for every transport; :class:`GeventHost` owns the host subprocess (stopped by its PID).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
HOST_SCRIPT = Path(__file__).with_name("gevent_host.py")
CALL_TIMEOUT = 60.0
_LEN = struct.Struct("!I")


class GeventHost:
    """``python gevent_host.py``: one patched process serving every gevent test server."""

    def __init__(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            [sys.executable, str(HOST_SCRIPT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=str(ROOT),
            env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(5)
            raise RuntimeError("the gevent host process failed to start")
        self.port = int(json.loads(line)["port"])
        self._local = threading.local()
        self._socks: list[socket.socket] = []
        self._socks_lock = threading.Lock()

    def _sock(self) -> socket.socket:
        sock: socket.socket | None = getattr(self._local, "sock", None)
        if sock is None:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=CALL_TIMEOUT)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._local.sock = sock
            with self._socks_lock:
                self._socks.append(sock)
        return sock

    def request(self, *request: Any) -> Any:
        sock = self._sock()
        data = pickle.dumps(request)
        sock.sendall(_LEN.pack(len(data)) + data)
        kind, value = pickle.loads(self._read(sock, _LEN.unpack(self._read(sock, 4))[0]))
        if kind == "err":
            raise value
        return value

    @staticmethod
    def _read(sock: socket.socket, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("the gevent host process went away")
            buf += chunk
        return bytes(buf)

    def create(
        self,
        kwargs: dict[str, Any],
        *,
        port: int = 0,
        start: bool = True,
        transport_options: dict[str, Any] | None = None,
    ) -> RemoteServer:
        sid = self.request("create", kwargs, port, start, transport_options or {})
        return RemoteServer(self, sid)

    def close(self) -> None:
        with self._socks_lock:
            for sock in self._socks:
                sock.close()
        with contextlib.suppress(Exception):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class RemoteServer:
    """A ``WSEServer`` in the host process: every method call is forwarded."""

    def __init__(self, host: GeventHost, sid: int) -> None:
        self._host = host
        self._sid = sid

    @property
    def port(self) -> int:
        port: int = self._host.request("call", self._sid, "port", (), {})
        return port

    def conn_info(self, conn_id: str) -> SimpleNamespace | None:
        info = self._host.request("call", self._sid, "conn_info", (conn_id,), {})
        return None if info is None else SimpleNamespace(**info)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._host.request("call", self._sid, name, args, kwargs)

        call.__name__ = name
        return call

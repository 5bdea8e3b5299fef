"""A deliberately small blocking WebSocket client for the loopback tests.

Written independently of wse_proto (its own handshake and frame code) so a test does not
share a bug with the server it checks.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import struct
import time
from typing import Any

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

TEXT, BINARY, CLOSE, PING, PONG = 1, 2, 8, 9, 10


def mask_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A client (masked) frame."""
    head = bytearray([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head.append(0x80 | n)
    elif n < 65536:
        head.append(0x80 | 126)
        head += struct.pack("!H", n)
    else:
        head.append(0x80 | 127)
        head += struct.pack("!Q", n)
    key = os.urandom(4)
    head += key
    masked = bytes(b ^ key[i & 3] for i, b in enumerate(payload))
    return bytes(head) + masked


def server_frame(opcode: int, payload: bytes) -> bytes:
    """An unmasked server frame, as the server must produce it."""
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 126]) + struct.pack("!H", n)
    else:
        head = bytes([0x80 | opcode, 127]) + struct.pack("!Q", n)
    return head + payload


def upgrade_request(host: str, path: str = "/wse", headers: dict[str, str] | None = None) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class RawWS:
    """Blocking client: handshake, send masked frames, read frames with a deadline."""

    def __init__(
        self,
        port: int,
        *,
        path: str = "/wse",
        headers: dict[str, str] | None = None,
        token: str | None = None,
        timeout: float = 5.0,
        rcvbuf: int | None = None,
    ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        hdrs = dict(headers or {})
        if token is not None:
            hdrs.setdefault("Cookie", f"access_token={token}")
        self.sock.sendall(upgrade_request(f"127.0.0.1:{port}", path, hdrs))
        self.buf = bytearray()
        self.status_line = ""
        self.response_headers: dict[str, str] = {}
        self._read_response(timeout)

    def _read_response(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.buf:
            self._recv_some(deadline)
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        self.buf = bytearray(rest)
        lines = head.decode("latin-1").split("\r\n")
        self.status_line = lines[0]
        for line in lines[1:]:
            k, _, v = line.partition(":")
            self.response_headers[k.strip().lower()] = v.strip()

    def _recv_some(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no data from server in time")
        self.sock.settimeout(remaining)
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buf += chunk

    def send(self, opcode: int, payload: bytes, *, fin: bool = True) -> None:
        self.sock.sendall(mask_frame(opcode, payload, fin=fin))

    def send_text(self, text: str) -> None:
        self.send(TEXT, text.encode())

    def send_json(self, obj: Any) -> None:
        self.send_text(json.dumps(obj))

    def recv_frame(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """Next frame (opcode, payload); raises TimeoutError or ConnectionError."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self._parse()
            if frame is not None:
                return frame
            self._recv_some(deadline)

    def _parse(self) -> tuple[int, bytes] | None:
        b = self.buf
        if len(b) < 2:
            return None
        opcode = b[0] & 0x0F
        n = b[1] & 0x7F
        pos = 2
        if n == 126:
            if len(b) < 4:
                return None
            n = struct.unpack_from("!H", b, 2)[0]
            pos = 4
        elif n == 127:
            if len(b) < 10:
                return None
            n = struct.unpack_from("!Q", b, 2)[0]
            pos = 10
        if b[1] & 0x80:
            raise AssertionError("server frames must not be masked")
        if len(b) < pos + n:
            return None
        payload = bytes(b[pos : pos + n])
        del b[: pos + n]
        return opcode, payload

    def recv_json(self, timeout: float = 5.0, *, skip_pings: bool = True) -> dict[str, Any]:
        """Next text/binary JSON message (server heartbeats skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            op, payload = self.recv_frame(max(0.01, deadline - time.monotonic()))
            if op in (TEXT, BINARY):
                msg: dict[str, Any] = json.loads(payload)
                if skip_pings and msg.get("t") == "ping":
                    continue
                return msg
            if op == CLOSE:
                raise ConnectionError(f"closed: {parse_close(payload)}")

    def recv_close(self, timeout: float = 5.0) -> tuple[int | None, str, list[tuple[int, bytes]]]:
        """Read until a Close frame; returns (code, reason, frames seen before it)."""
        seen: list[tuple[int, bytes]] = []
        deadline = time.monotonic() + timeout
        while True:
            op, payload = self.recv_frame(max(0.01, deadline - time.monotonic()))
            if op == CLOSE:
                code, reason = parse_close(payload)
                return code, reason, seen
            seen.append((op, payload))

    def expect_eof(self, timeout: float = 5.0) -> None:
        """The server closes TCP (after any frames)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._recv_some(deadline)
            except ConnectionError:
                return
            except ConnectionResetError:
                return

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def parse_close(payload: bytes) -> tuple[int | None, str]:
    if len(payload) < 2:
        return None, ""
    return struct.unpack("!H", payload[:2])[0], payload[2:].decode("utf-8", "replace")


def accept_value(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()

"""The ``wse_server`` command line under SIGTERM, shared by the per-transport tests."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from integration.rawws import CLOSE, RawWS

ROOT = Path(__file__).resolve().parent.parent


def wait_for_sigterm_handler(pid: int, timeout: float = 10.0) -> None:
    """The CLI prints its address before installing its SIGTERM handler; a SIGTERM sent in
    between would kill it with the default action. Wait until the handler is in place."""
    deadline = time.monotonic() + timeout
    bit = 1 << (signal.SIGTERM - 1)
    while True:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            caught = next(int(line.split()[1], 16) for line in fh if line.startswith("SigCgt:"))
        if caught & bit:
            return
        assert time.monotonic() < deadline, "the CLI never installed its SIGTERM handler"
        time.sleep(0.01)


def check_cli_sigterm(argv: list[str], env: dict[str, str], transport: str) -> None:
    """Start the CLI, connect, SIGTERM it: the client gets close 1001, the process exits 0
    after the closing handshake, and its log names ``transport``."""
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on ws://127.0.0.1:" in line, line
        ws = RawWS(int(line.rsplit(":", 1)[1].split("/")[0]))
        assert ws.status_line.startswith("HTTP/1.1 101")
        wait_for_sigterm_handler(proc.pid)
        proc.send_signal(signal.SIGTERM)
        code, _, _ = ws.recv_close()
        assert code == 1001
        ws.send(CLOSE, b"\x03\xe9")
        ws.close()
        assert proc.wait(15) == 0
        assert proc.stderr is not None
        assert f"({transport})" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)

"""What only the gevent transport must show, always in subprocesses.

The shared behaviour runs in ``tests/integration`` (gevent servers in a patched host
process). Here: that host really is patched and this process never imports gevent; no
greenlet per connection; callbacks and application greenlets cooperating with the server in
a patched process; the unpatched mode (own hub in a dedicated thread) and what importing
the module pulls in; the command line, patched and not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _cli import check_cli_sigterm
from integration.rawws import RawWS, upgrade_request
from integration.remote import GeventHost

pytestmark = pytest.mark.loopback

ROOT = Path(__file__).resolve().parent.parent
PATCH = "from gevent import monkey; monkey.patch_all()\n"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "WSE_JWT_SECRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    return env


def _run(code: str, *, patched: bool = False, timeout: float = 60.0) -> Any:
    """Run a script in a fresh interpreter (patched first); its last stdout line is JSON."""
    script = (PATCH if patched else "") + textwrap.dedent(code)
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def host() -> Iterator[GeventHost]:
    h = GeventHost()
    yield h
    h.close()


def test_host_is_patched_and_this_process_never_imports_gevent(host: GeventHost) -> None:
    server = host.create({})
    try:
        assert server.process_is_patched() is True
        ws = RawWS(server.port)
        assert ws.status_line.startswith("HTTP/1.1 101")
        ws.close()
    finally:
        server.stop()
    assert not [m for m in sys.modules if m.split(".")[0] == "gevent"]


def test_no_greenlet_per_connection(host: GeventHost) -> None:
    import socket

    n = 500
    server = host.create({"jwt_secret": None, "max_connections": n + 10})
    socks: list[socket.socket] = []
    try:
        before = server.greenlet_count()
        request = upgrade_request(f"127.0.0.1:{server.port}")
        for _ in range(n):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(request)
            socks.append(sock)
        for sock in socks:
            assert sock.recv(4096).startswith(b"HTTP/1.1 101")
        assert server.get_connection_count() == n
        assert server.greenlet_count() - before <= 1  # nothing per connection
    finally:
        for sock in socks:
            sock.close()
        server.stop()


def test_callbacks_and_app_greenlets_cooperate_in_a_patched_process() -> None:
    result = _run(
        """
        import json, threading, time
        import gevent
        from integration.rawws import RawWS
        from wse_server import WSEServer
        from wse_transports.gevent import process_is_patched

        calls = []
        done = threading.Event()
        ticks = [0]

        def ticker():
            while not done.is_set():
                ticks[0] += 1
                gevent.sleep(0.01)

        def on_connect(cid, cookies):
            calls.append(["connect", cookies, threading.current_thread().name])

        def on_message(cid, value):
            calls.append(["message", value, threading.current_thread().name])

        def on_disconnect(cid):
            calls.append(["disconnect", None, threading.current_thread().name])
            done.set()

        server = WSEServer("127.0.0.1", 0, transport="gevent")
        server.set_callbacks(on_connect, on_message, on_disconnect)
        server.start()
        gevent.spawn(ticker)
        ws = RawWS(server.port, headers={"Cookie": "theme=dark"})
        ws.send_text('{"t":"a","p":{"n":1}}')
        ws.send_text("raw")
        gevent.sleep(0.2)
        ws.close()
        assert done.wait(5)
        server.stop()
        print(json.dumps({"calls": calls, "ticks": ticks[0], "patched": process_is_patched()}))
        """,
        patched=True,
    )
    assert result["patched"] is True
    assert [c[:2] for c in result["calls"]] == [
        ["connect", "theme=dark"],
        ["message", {"t": "a", "p": {"n": 1}}],
        ["message", "raw"],
        ["disconnect", None],
    ]
    assert {c[2] for c in result["calls"]} == {"wse-callbacks"}
    assert result["ticks"] >= 10  # the app's greenlet kept running while serving


def test_unpatched_process_runs_its_own_hub_in_a_thread() -> None:
    result = _run(
        """
        import json, sys, threading
        import wse_transports.gevent as g

        imported = sorted(m for m in sys.modules if m.startswith("wse_transports."))
        from integration.conftest import make_token
        from integration.rawws import RawWS
        from wse_server import WSEServer

        before = threading.active_count()
        server = WSEServer("127.0.0.1", 0, transport="gevent", jwt_secret=b"k" * 32)
        server.enable_drain_mode()
        server.start()
        io_threads = threading.active_count() - before
        ws = RawWS(server.port, token=make_token("u", key=b"k" * 32))
        ready = ws.recv_json()["t"]
        _, cid, user = server.drain_inbound(10, 2000)[0]
        server.subscribe_connection(cid, ["t"])
        server.broadcast_local("t", '{"t":"x","p":{}}')
        got = ws.recv_json()["t"]
        server.stop()
        ws.close()
        print(json.dumps({
            "imported": imported, "patched": g.process_is_patched(), "ready": ready,
            "user": user, "got": got, "io_threads": io_threads,
            "task": type(server._transport._task).__name__ if server._transport else None,
            "left": threading.active_count() - before,
        }))
        """
    )
    assert result["imported"] == [
        "wse_transports._blocking",
        "wse_transports.base",
        "wse_transports.gevent",
    ]
    assert result["patched"] is False
    assert (result["ready"], result["user"], result["got"]) == ("server_ready", "u", "x")
    assert result["io_threads"] == 1 and result["left"] == 0


@pytest.mark.parametrize("patched", [False, True], ids=["unpatched", "patched"])
def test_cli_transport_gevent(patched: bool) -> None:
    args = ["--transport", "gevent", "--port", "0"]
    if patched:
        code = PATCH + f"import sys; from wse_server.__main__ import main; sys.exit(main({args!r}))"
        argv = [sys.executable, "-c", code]
    else:
        argv = [sys.executable, "-m", "wse_server", *args]
    check_cli_sigterm(argv, _env(), "gevent")

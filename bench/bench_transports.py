"""Transport benchmark: the same WSEServer on asyncio, uvloop, gevent and threading.

One row per transport, all measured in the same run, each server in its own subprocess
(started and stopped by PID) with the load from ``bench/loadgen.py`` workers:

- fan-out deliveries/s to 1,000 (and 100) subscribers of one topic, exactly as
  ``bench_server.py`` measures it (calibrated runs, best kept), reported as a ratio to
  the asyncio transport; targets: gevent >= 0.7x, threading >= 0.5x;
- RSS per idle connection: a fresh server process, VmRSS before and after opening N idle,
  authenticated, subscribed connections; target <= 16 KiB on each transport.

The gevent server process is monkey-patched before anything else is imported (the way a
gevent application runs): ``python -c "from gevent import monkey; monkey.patch_all(); ..."``.

``python -m bench transports [--quick]`` (or ``WSE_BENCH_QUICK=1``).
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from bench.bench_server import (
    Server,
    Settings,
    auth_headers,
    feasible_conns,
    make_token,
    measure_fanout,
    measure_rss,
    spawn_server,
)
from bench.loadgen import ChildError

KINDS = ("asyncio", "uvloop", "gevent", "threading")
FANOUT_TARGETS = {"gevent": 0.7, "threading": 0.5}
RSS_TARGET_KIB = 16.0


# =============================================================================== server side


def _stdin_lines(kind: str) -> Iterator[str]:
    """Command lines from stdin; under gevent without blocking the hub."""
    if kind != "gevent":
        yield from sys.stdin
        return
    import gevent.os

    fd = sys.stdin.fileno()
    gevent.os.make_nonblocking(fd)
    buf = b""
    while True:
        chunk = gevent.os.nb_read(fd, 65536)
        if not chunk:
            return
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            yield line.decode()


def serve(kind: str) -> int:
    """The server process: ``WSEServer(transport=kind)`` and ``bench_server.WseApp``."""
    from bench.bench_server import emit, start_wse_app

    server, app = start_wse_app(kind)
    patched = "gevent.monkey" in sys.modules and sys.modules["gevent.monkey"].is_module_patched(
        "threading"
    )
    emit(event="ready", port=server.port, pid=os.getpid(), kind=kind, patched=patched)
    try:
        for line in _stdin_lines(kind):
            if line.strip() and not app.command(json.loads(line)):
                break
    finally:
        app.stopping.set()
        server.stop()
        app.thread.join(2.0)
    return 0


def start_server(kind: str, secret: bytes, token: str) -> Server:
    """One server subprocess (gevent: patched first), ready to take commands."""
    if kind == "gevent":
        code = (
            "from gevent import monkey; monkey.patch_all(); import sys; "
            "from bench.bench_transports import serve; sys.exit(serve('gevent'))"
        )
        argv = [sys.executable, "-c", code]
    else:
        argv = [sys.executable, "-m", "bench.bench_transports", "--serve", kind]
    child, ready = spawn_server(kind, argv, secret)
    if kind == "gevent" and not ready.get("patched"):
        child.stop(1.0)
        raise ChildError("the gevent server process is not monkey-patched")
    return Server(kind, child, int(ready["port"]), auth_headers(token), "/", "pong")


# =============================================================================== figures


def _ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base <= 0:
        return None
    return value / base


def run(quick: bool, out: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Measure every transport; print the table; return ``{kind: {figure: value}}``."""
    cfg = Settings.make(quick)
    subs_list = (100, 1000)
    secret = base64.b64encode(os.urandom(33))
    token = make_token(secret)
    rss_conns = feasible_conns(cfg.rss_conns)
    rows: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
    notes: list[str] = []
    t_start = time.monotonic()
    for subs in subs_list:
        for kind in KINDS:  # one server after the other, same settings
            try:
                server = start_server(kind, secret, token)
            except ChildError as exc:
                notes.append(f"{kind} unavailable: {str(exc)[:400]}")
                continue
            try:
                result = measure_fanout(server, subs, cfg)
                rows[kind][f"fanout{subs}"] = float(result["rate"])
                rows[kind][f"lost{subs}"] = int(result["lost"])
                rows[kind][f"cpu{subs}"] = (result["server_cpu"], result["loadgen_cpu"])
            except Exception as exc:  # one failure must not lose the whole table
                notes.append(f"fan-out {subs} on {kind} failed: {str(exc)[:400]}")
            finally:
                server.child.stop(5.0, command={"cmd": "stop"})
        out(f"   fan-out {subs} done ({time.monotonic() - t_start:.0f} s)")
    for kind in KINDS:
        try:
            rows[kind]["rss"] = measure_rss(kind, rss_conns, secret, token, start=start_server)
        except Exception as exc:
            notes.append(f"RSS on {kind} failed: {str(exc)[:400]}")
    out(f"   RSS done ({time.monotonic() - t_start:.0f} s)")

    base = rows["asyncio"]
    head = ["transport"]
    for subs in subs_list:
        head += [f"fan-out {subs} (/s)", "vs asyncio"]
    head += ["target", "met?", f"RSS/idle conn @ {rss_conns:,} (KiB)", "<= 16?"]
    table = [head]
    for kind in KINDS:
        row = rows[kind]
        cells = [kind]
        for subs in subs_list:
            value = row.get(f"fanout{subs}")
            ratio = _ratio(value, base.get(f"fanout{subs}"))
            cells.append("n/a" if value is None else f"{value:,.0f}")
            cells.append("n/a" if ratio is None else f"{ratio:.2f}x")
        target = FANOUT_TARGETS.get(kind)
        ratio_1000 = _ratio(row.get("fanout1000"), base.get("fanout1000"))
        cells.append("-" if target is None else f">= {target:g}x")
        if target is None or ratio_1000 is None:
            cells.append("-")
        else:
            cells.append("yes" if ratio_1000 >= target else "NO")
        rss = row.get("rss")
        cells.append("n/a" if rss is None else f"{rss:.1f}")
        cells.append("n/a" if rss is None else ("yes" if rss <= RSS_TARGET_KIB else "NO"))
        table.append(cells)
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    out("")
    mode = "quick" if quick else "full"
    took = time.monotonic() - t_start
    out(f"transport benchmark ({mode}, {took:.0f} s; fan-out payload 100 B; ratios to the "
        "asyncio transport; targets apply to the 1,000-subscriber figure)")  # fmt: skip
    for i, r in enumerate(table):
        out(" | ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]))
        if i == 0:
            out("-+-".join("-" * w for w in widths))
    lost = [
        f"{kind} {rows[kind][f'lost{subs}']} @ {subs}"
        for kind in KINDS
        for subs in subs_list
        if rows[kind].get(f"lost{subs}")
    ]
    if lost:
        out("fan-out deliveries missing: " + ", ".join(lost))
    cpu = [
        f"{kind} {rows[kind]['cpu1000'][0]:.2f}+{rows[kind]['cpu1000'][1]:.2f}"
        for kind in KINDS
        if "cpu1000" in rows[kind]
    ]
    if cpu:
        out("CPU cores busy in the kept 1,000-subscriber run, server+loadgen: " + ", ".join(cpu))
    for note in notes:
        out("note: " + note)
    return rows


def main() -> None:
    argv = sys.argv[1:]
    quick = "--quick" in argv or os.environ.get("WSE_BENCH_QUICK", "") not in ("", "0")
    run(quick)


if __name__ == "__main__":
    if "--serve" in sys.argv:
        sys.exit(serve(sys.argv[sys.argv.index("--serve") + 1]))
    main()

"""Whole-server benchmark: wse-py (asyncio and uvloop transports) vs a plain websockets server.

Every server runs in its own subprocess, started and stopped by PID; the load comes from
``bench/loadgen.py`` worker processes over raw loopback sockets. Each figure is measured on
the three servers back to back in the same run and reported as a ratio to websockets,
never as an absolute pass/fail on time (the machine is shared and noisy).
``bench/README.md`` explains each figure and its target.

``python -m bench server [--quick] [--profile]`` (or ``WSE_BENCH_QUICK=1``,
``WSE_BENCH_PROFILE=1``). ``python -m bench.bench_server --serve asyncio|uvloop`` is the
WSE server process itself (the control protocol is described in :class:`WseApp`).
"""

from __future__ import annotations

import base64
import contextlib
import cProfile
import json
import os
import pstats
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.loadgen import Child, ChildError, cpu_seconds, raise_nofile, rss_kib, spawn_worker

if TYPE_CHECKING:
    from wse_server import WSEServer

ROOT = Path(__file__).resolve().parent.parent
SECRET_ENV = "WSE_BENCH_JWT_SECRET"
TOPIC = "bench"
MAX_CONNECTIONS = 20000
KINDS = ("websockets", "asyncio", "uvloop")
LABELS = {"websockets": "websockets", "asyncio": "wse-py asyncio", "uvloop": "wse-py uvloop"}
PAYLOAD_BYTES = 100


def publish_text(size: int = PAYLOAD_BYTES) -> str:
    """A JSON event of exactly ``size`` bytes (the fan-out payload)."""
    head = '{"t":"tick","p":{"d":"'
    tail = '"}}'
    return head + "x" * (size - len(head) - len(tail)) + tail


INBOUND_PAYLOAD = '{"t":"bench","p":{"i":1234567,"s":"inbound"}}'


# =============================================================================== the servers


class WseApp:
    """The WSE bench application, in the server subprocess.

    Control protocol (JSON lines; the baseline server implements the same): the process
    prints ``{"event": "ready", "port": P}``, then answers commands read on stdin:
    ``wait_subs n`` -> ``subs`` (topic subscriber count reached n), ``wait_conns max`` ->
    ``conns``, ``publish count text`` -> ``published t0 t1`` (monotonic seconds),
    ``expect n`` -> ``expecting`` then ``inbound_done t`` once n ``msg`` events were drained,
    ``count`` -> ``count n dropped``, ``stop``. Every connection is subscribed to the bench
    topic on ``auth_connect``; ``msg`` events are counted; nothing else is done with them.
    """

    def __init__(self, server: Any) -> None:
        self.server = server
        self.lock = threading.Lock()
        self.count = 0
        self.target = 0
        self.done = False
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.drain_loop, name="bench-drain", daemon=True)

    def drain_loop(self) -> None:
        server = self.server
        subscribe = server.subscribe_connection
        topics = [TOPIC]
        while not self.stopping.is_set():
            try:
                events = server.drain_inbound(4096, 50)
            except RuntimeError:
                return
            n = 0
            for kind, conn_id, _value in events:
                if kind == "msg":
                    n += 1
                elif kind == "auth_connect":
                    subscribe(conn_id, topics)
            if n:
                with self.lock:
                    self.count += n
                    if self.target and not self.done and self.count >= self.target:
                        self.done = True
                        emit(event="inbound_done", t=time.monotonic(), count=self.count)

    def command(self, msg: dict[str, Any]) -> bool:
        """Run one command; False once told to stop."""
        server = self.server
        cmd = msg.get("cmd")
        if cmd == "wait_subs":
            n = int(msg["n"])
            deadline = time.monotonic() + float(msg.get("timeout", 30.0))
            while server.get_topic_subscriber_count(TOPIC) < n and time.monotonic() < deadline:
                time.sleep(0.005)
            emit(event="subs", n=server.get_topic_subscriber_count(TOPIC))
        elif cmd == "wait_conns":
            limit = int(msg["max"])
            deadline = time.monotonic() + float(msg.get("timeout", 10.0))
            while server.get_connection_count() > limit and time.monotonic() < deadline:
                time.sleep(0.01)
            emit(event="conns", n=server.get_connection_count())
        elif cmd == "publish":
            text = msg["text"]
            publish = server.broadcast_local
            t0 = time.monotonic()
            for _ in range(int(msg["count"])):
                publish(TOPIC, text)
            t1 = time.monotonic()
            emit(event="published", t0=t0, t1=t1, subs=server.get_topic_subscriber_count(TOPIC))
        elif cmd == "expect":
            with self.lock:
                self.count = 0
                self.target = int(msg["n"])
                self.done = False
            emit(event="expecting")
        elif cmd == "count":
            with self.lock:
                n = self.count
            emit(event="count", n=n, dropped=server.inbound_dropped_count())
        elif cmd == "stop":
            return False
        else:
            emit(event="error", error=f"unknown command {cmd!r}")
        return True


def emit(**event: Any) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


_profiles: list[cProfile.Profile] = []


def _profile_threads() -> cProfile.Profile:
    """Profile the main thread and every thread started from now on (one cProfile each).

    The timer is the thread's CPU time: with wall time, a thread waiting for the GIL would
    charge that wait to whatever function it was in.
    """
    original = threading.Thread.run

    def run(self: threading.Thread) -> None:
        prof = cProfile.Profile(time.thread_time)
        _profiles.append(prof)
        prof.enable()
        try:
            original(self)
        finally:
            prof.disable()

    threading.Thread.run = run  # type: ignore[method-assign]
    main = cProfile.Profile(time.thread_time)
    _profiles.append(main)
    return main


def start_wse_app(kind: str) -> tuple[WSEServer, WseApp]:
    """Start ``WSEServer(transport=kind)`` in drain mode and its :class:`WseApp` thread.

    Shared by this benchmark's and the transport benchmark's server processes.
    """
    from wse_server import WSEServer

    raise_nofile(MAX_CONNECTIONS + 256)
    server = WSEServer(
        "127.0.0.1",
        0,
        max_connections=MAX_CONNECTIONS,
        jwt_secret=os.environ[SECRET_ENV].encode(),
        ping_interval=3600,  # no heartbeat frames inside a measurement
        idle_timeout=7200,
        transport=kind,
    )
    server.enable_drain_mode()
    server.start()
    app = WseApp(server)
    app.thread.start()
    return server, app


def serve_wse(kind: str, profile_out: str | None) -> int:
    """The WSE server process: ``WSEServer`` in drain mode plus :class:`WseApp`."""
    main_prof = _profile_threads() if profile_out else None
    server, app = start_wse_app(kind)
    emit(event="ready", port=server.port, pid=os.getpid(), kind=kind)
    if main_prof is not None:
        main_prof.enable()
    try:
        for line in sys.stdin:
            if line.strip() and not app.command(json.loads(line)):
                break
    finally:
        if main_prof is not None:
            main_prof.disable()
        app.stopping.set()
        server.stop()
        app.thread.join(2.0)
        if profile_out:
            stats = pstats.Stats(*_profiles) if _profiles else None
            if stats is not None:
                stats.dump_stats(profile_out)
    return 0


# =============================================================================== harness


@dataclass
class Settings:
    quick: bool
    fanout_subs: tuple[int, ...] = (100, 1000)
    inbound_conns: tuple[int, ...] = (1, 20, 100)
    run_seconds: float = 1.5  # target duration of one measured run (after calibration)
    repeats: int = 3  # measured runs per figure and server; the best one is kept
    connect_count: int = 300
    ping_count: int = 2000
    rss_conns: int = 10000

    @classmethod
    def make(cls, quick: bool) -> Settings:
        if quick:
            return cls(
                quick=True,
                run_seconds=0.35,
                repeats=1,
                connect_count=60,
                ping_count=300,
                rss_conns=1000,
            )
        return cls(quick=False)


@dataclass
class Server:
    kind: str
    child: Child
    port: int
    headers: list[list[str]]
    echo_path: str
    pong: str

    @property
    def label(self) -> str:
        return LABELS[self.kind]


@dataclass
class Results:
    values: dict[tuple[str, str], float | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    cpu: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)

    def put(self, figure: str, kind: str, value: float | None) -> None:
        self.values[(figure, kind)] = value

    def get(self, figure: str, kind: str) -> float | None:
        return self.values.get((figure, kind))


def make_token(secret: bytes) -> str:
    import jwt  # pyjwt: a test dependency of the project, only the harness needs it

    claims = {"sub": "bench-user", "exp": int(time.time()) + 3600}
    return jwt.encode(claims, secret, algorithm="HS256")


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("PYTHONHASHSEED", "0")
    if extra:
        env.update(extra)
    return env


def spawn_server(kind: str, argv: list[str], secret: bytes) -> tuple[Child, dict[str, Any]]:
    """Run a server process (it reads the JWT secret from ``SECRET_ENV``); return it and its
    ``ready`` line, or stop it and raise if that line does not come."""
    env = child_env({SECRET_ENV: secret.decode()})
    child = Child(argv, name=f"server-{kind}", cwd=str(ROOT), env=env)
    try:
        ready = child.expect("ready", 30.0)
    except ChildError:
        child.stop(1.0)
        raise
    return child, ready


def auth_headers(token: str) -> list[list[str]]:
    """The upgrade request's credentials: the token as cookie and as bearer."""
    return [["Cookie", f"access_token={token}"], ["Authorization", f"Bearer {token}"]]


def start_server(kind: str, secret: bytes, token: str, profile_out: str | None = None) -> Server:
    """Start one server subprocess and wait for its ``ready`` line."""
    if kind == "websockets":
        argv = [sys.executable, "-m", "bench.baseline_websockets"]
    else:
        argv = [sys.executable, "-m", "bench.bench_server", "--serve", kind]
        if profile_out:
            argv += ["--profile-out", profile_out]
    child, ready = spawn_server(kind, argv, secret)
    # The same request bytes go to every server: the baseline ignores the credentials.
    headers = auth_headers(token)
    if kind == "websockets":
        return Server(kind, child, int(ready["port"]), headers, "/echo", "echo")
    return Server(kind, child, int(ready["port"]), headers, "/", "pong")


def _split(n: int, parts: int) -> list[int]:
    parts = max(1, min(parts, n))
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def _workers(server: Server, mode: str, conns: int, **job: Any) -> list[Child]:
    """Start 1-2 workers sharing ``conns`` connections; wait until all are open."""
    env = child_env()
    workers = []
    try:
        for i, n in enumerate(_split(conns, 2 if conns >= 2 else 1)):
            spec = {"mode": mode, "port": server.port, "conns": n, "headers": server.headers}
            spec.update(job)
            workers.append(spawn_worker(spec, name=f"{mode}-{i}", cwd=str(ROOT), env=env))
        opened = 0
        for w in workers:
            ready = w.expect("ready", 120.0)
            opened += int(ready["conns"])
            if ready["errors"]:
                raise ChildError(
                    f"{w.name}: {ready['errors']} failed opens {ready['error_sample']}"
                )
        if opened != conns:
            raise ChildError(f"opened {opened} of {conns} connections")
    except BaseException:
        for w in workers:
            w.stop(1.0)
        raise
    return workers


def _stop_workers(server: Server, workers: Sequence[Child]) -> None:
    for w in workers:
        with contextlib.suppress(ChildError):
            w.send(cmd="close")
    for w in workers:
        w.stop(5.0)
    with contextlib.suppress(ChildError):
        server.child.send(cmd="wait_conns", max=0, timeout=10.0)
        server.child.expect("conns", 15.0)


def _clamp(x: float, lo: int, hi: int) -> int:
    return int(max(lo, min(hi, x)))


# ----------------------------------------------------------------------------- figures


def fanout_run(server: Server, workers: Sequence[Child], subs: int, count: int) -> dict[str, Any]:
    """Publish ``count`` messages; deliveries/s from the first publish to the last receipt."""
    seconds = 30.0
    for w in workers:
        w.send(cmd="go", expect=count, seconds=seconds)
    for w in workers:
        w.expect("counting", 10.0)
    cpu0 = cpu_seconds(server.child.pid)
    server.child.send(cmd="publish", count=count, text=publish_text())
    published = server.child.expect("published", seconds + 10.0)
    counted = [w.expect("counted", seconds + 15.0) for w in workers]
    server_cpu = cpu_seconds(server.child.pid) - cpu0
    delivered = sum(int(c["messages"]) for c in counted)
    elapsed = max(float(c["t_last"]) for c in counted) - float(published["t0"])
    return {
        "rate": delivered / elapsed if elapsed > 0 else 0.0,
        "delivered": delivered,
        "expected": subs * count,
        "lost": subs * count - delivered,
        "server_cpu": server_cpu / elapsed if elapsed > 0 else 0.0,
        "loadgen_cpu": sum(float(c["cpu"]) for c in counted) / elapsed if elapsed > 0 else 0.0,
        "excess": sum(int(c["excess"]) for c in counted),
        "elapsed": elapsed,
        "publish_seconds": float(published["t1"]) - float(published["t0"]),
    }


def _calibrated(
    run_once: Callable[[int], dict[str, Any]], first: int, per_unit: int, cfg: Settings
) -> dict[str, Any]:
    """Warm up and size the runs so one lasts about ``cfg.run_seconds``; keep the best.

    ``run_once(count)`` does one run of ``count`` messages per connection (``per_unit``
    connections) and returns at least ``rate``, ``elapsed`` and ``lost``. Warm-up runs grow
    the count until a run lasts a third of the target; their losses are counted too.
    """
    count = first
    lost = 0
    run = run_once(count)
    lost += run["lost"]
    for _ in range(4):
        if run["elapsed"] >= cfg.run_seconds / 3:
            break
        count = _clamp(run["rate"] * cfg.run_seconds / 2 / per_unit, count, 2_000_000)
        run = run_once(count)
        lost += run["lost"]
    best: dict[str, Any] | None = None
    for _ in range(cfg.repeats):
        count = _clamp(run["rate"] * cfg.run_seconds / per_unit, 10, 2_000_000)
        run = run_once(count)
        lost += run["lost"]
        if best is None or run["rate"] > best["rate"]:
            best = run
    assert best is not None
    best["lost"] = lost
    return best


Hook = Callable[[], None] | None
"""Called once the connections are open, before any measured traffic (profiling)."""


def measure_fanout(server: Server, subs: int, cfg: Settings, hook: Hook = None) -> dict[str, Any]:
    workers = _workers(server, "fanout", subs, concurrency=50)
    try:
        server.child.send(cmd="wait_subs", n=subs, timeout=30.0)
        got = int(server.child.expect("subs", 40.0)["n"])
        if got < subs:
            raise ChildError(f"only {got} of {subs} subscribed")
        if hook is not None:
            hook()
        return _calibrated(
            lambda count: fanout_run(server, workers, subs, count),
            _clamp(20000 / subs, 10, 200),
            subs,
            cfg,
        )
    finally:
        _stop_workers(server, workers)


def inbound_run(
    server: Server, workers: Sequence[Child], conns: int, per_conn: int
) -> dict[str, Any]:
    """Send ``per_conn`` messages on every connection; rate until the app counted them all."""
    total = per_conn * conns
    seconds = 30.0
    server.child.send(cmd="expect", n=total)
    server.child.expect("expecting", 10.0)
    cpu0 = cpu_seconds(server.child.pid)
    for w in workers:
        w.send(cmd="go", messages=per_conn, seconds=seconds)
    sent = [w.expect("sent", seconds + 10.0) for w in workers]
    n_sent = sum(int(s["messages"]) for s in sent)
    t_go = min(float(s["t_go"]) for s in sent)
    try:
        done = server.child.expect("inbound_done", 20.0)
        handled = int(done["count"])
        t_done = float(done["t"])
    except ChildError:
        # Not all arrived: wait until the count settles, then report what is missing.
        handled = -1
        for _ in range(20):
            server.child.send(cmd="count")
            n = int(server.child.expect("count", 5.0)["n"])
            if n == handled:
                break
            handled = n
            time.sleep(0.25)
        t_done = time.monotonic()
    elapsed = t_done - t_go
    server_cpu = cpu_seconds(server.child.pid) - cpu0
    return {
        "rate": handled / elapsed if elapsed > 0 else 0.0,
        "handled": handled,
        "sent": n_sent,
        "expected": total,
        "lost": n_sent - handled,
        "elapsed": elapsed,
        "server_cpu": server_cpu / elapsed if elapsed > 0 else 0.0,
        "loadgen_cpu": sum(float(x["cpu"]) for x in sent) / elapsed if elapsed > 0 else 0.0,
    }


def measure_inbound(server: Server, conns: int, cfg: Settings, hook: Hook = None) -> dict[str, Any]:
    workers = _workers(server, "inbound", conns, concurrency=50, payload=INBOUND_PAYLOAD)
    try:
        server.child.send(cmd="wait_subs", n=conns, timeout=30.0)  # app saw every connect
        server.child.expect("subs", 40.0)
        if hook is not None:
            hook()
        return _calibrated(
            lambda count: inbound_run(server, workers, conns, count),
            _clamp(20000 / conns, 20, 20000),
            conns,
            cfg,
        )
    finally:
        _stop_workers(server, workers)


def _sampled(servers: Sequence[Server], job: dict[str, Any]) -> list[list[float]]:
    """Run a latency job alternating between ``servers``; samples (seconds) per server."""
    targets = [
        {"port": s.port, "headers": s.headers, "path": job.get("path") or s.echo_path}
        | {"expect": s.pong}
        for s in servers
    ]
    w = spawn_worker({**job, "targets": targets}, name=job["mode"], cwd=str(ROOT), env=child_env())
    try:
        out = w.expect("samples", float(job.get("seconds", 30.0)) + 30.0)
    finally:
        w.stop(5.0)
    if out["errors"]:
        raise ChildError(f"{job['mode']}: {out['errors']} errors {out['error_sample']}")
    for s in servers:
        with contextlib.suppress(ChildError):
            s.child.send(cmd="wait_conns", max=0, timeout=10.0)
            s.child.expect("conns", 15.0)
    return [[float(x) for x in per] for per in out["samples"]]


def _pct(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure_latencies(servers: Sequence[Server], cfg: Settings) -> dict[tuple[str, str], float]:
    """connect->ready and ping RTT p50/p99 (seconds) per server, samples interleaved."""
    out: dict[tuple[str, str], float] = {}
    jobs = (
        ("connect", {"mode": "connect", "path": "/", "count": cfg.connect_count, "warmup": 20}),
        ("ping", {"mode": "ping", "path": None, "count": cfg.ping_count, "warmup": 100}),
    )
    for name, job in jobs:
        for server, samples in zip(servers, _sampled(servers, job)):
            out[(f"{name}_p50", server.kind)] = statistics.median(samples)
            out[(f"{name}_p99", server.kind)] = _pct(samples, 0.99)
    return out


def measure_rss(
    kind: str,
    conns: int,
    secret: bytes,
    token: str,
    start: Callable[[str, bytes, str], Server] | None = None,
) -> float:
    """KiB of server RSS per idle (authenticated, subscribed) connection, fresh process.

    ``start`` launches the server (default: this module's ``start_server``), so the
    transport benchmark measures its own servers the same way.
    """
    server = (start or start_server)(kind, secret, token)
    try:
        # Warm-up: the first connections load lazily imported code and fill caches.
        _sampled([server], {"mode": "connect", "path": "/", "count": 20, "warmup": 0})
        time.sleep(0.3)
        before = rss_kib(server.child.pid)
        workers = _workers(server, "idle", conns, concurrency=100, open_seconds=120.0)
        try:
            server.child.send(cmd="wait_subs", n=conns, timeout=60.0)
            got = int(server.child.expect("subs", 70.0)["n"])
            if got < conns:
                raise ChildError(f"only {got} of {conns} idle connections registered")
            time.sleep(0.5)
            after = rss_kib(server.child.pid)
        finally:
            for w in workers:
                w.stop(2.0, command={"cmd": "close"})
        return (after - before) / conns
    finally:
        server.child.stop(5.0, command={"cmd": "stop"})


def feasible_conns(wanted: int) -> int:
    """Largest idle-connection count this machine allows (server needs one fd each)."""
    soft = raise_nofile(wanted + 512)
    return max(100, min(wanted, soft - 512))


# ----------------------------------------------------------------------------- table


@dataclass
class Figure:
    key: str
    title: str
    unit: str
    higher_is_better: bool
    target: float | None  # ratio ours/baseline to meet (None: informational)
    scale: float = 1.0
    fmt: str = "{:,.0f}"

    def show(self, value: float | None) -> str:
        return "n/a" if value is None else self.fmt.format(value * self.scale)

    def target_text(self) -> str:
        if self.target is None:
            return "-"
        return f"{'>=' if self.higher_is_better else '<='} {self.target:g}x"


def _ratio(ours: float | None, base: float | None) -> float | None:
    if ours is None or base is None or base <= 0:
        return None
    return ours / base


def _met(fig: Figure, ratio: float | None) -> str:
    if fig.target is None or ratio is None:
        return "-"
    ok = ratio >= fig.target if fig.higher_is_better else ratio <= fig.target
    return "yes" if ok else "NO"


def print_table(figs: Sequence[Figure], res: Results, out: Callable[[str], None]) -> None:
    head = ["figure", "websockets", "wse-py asyncio", "wse-py uvloop", "ratio a|u", "target"]
    head.append("met? a|u")
    rows = [head]
    for fig in figs:
        base = res.get(fig.key, "websockets")
        ours = [res.get(fig.key, k) for k in ("asyncio", "uvloop")]
        ratios = [_ratio(v, base) for v in ours]
        if fig.key.startswith("loss"):
            ratio_txt = "-"
            met = "|".join("-" if v is None else ("yes" if v == 0 else "NO") for v in ours)
            target = "0 (ours)"
        else:
            ratio_txt = "|".join("n/a" if r is None else f"{r:.2f}x" for r in ratios)
            met = "|".join(_met(fig, r) for r in ratios) if fig.target is not None else "-"
            target = fig.target_text()
        rows.append(
            [
                f"{fig.title} ({fig.unit})",
                fig.show(base),
                fig.show(ours[0]),
                fig.show(ours[1]),
                ratio_txt,
                target,
                met,
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for i, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        out(" | ".join(cells))
        if i == 0:
            out("-+-".join("-" * w for w in widths))


# ----------------------------------------------------------------------------- profile


BLOCKING = ("acquire", "poll", "sleep", "select", "wait", "readline", "_accept", "join")
"""Built-ins in which a thread mostly waits: left out of the cProfile list, totalled apart."""


def _cprofile_hotspots(path: str, top: int) -> list[str]:
    """Top functions by own (thread CPU) time from a pstats file, waits excluded."""
    stats = pstats.Stats(path).stats  # type: ignore[attr-defined]
    rows = []
    waited = 0.0
    for (filename, line, func), (_cc, nc, tt, ct, _callers) in stats.items():
        builtin = filename == "~"
        if builtin and any(word in func for word in BLOCKING):
            waited += tt
            continue
        where = func if builtin else f"{os.path.relpath(filename, ROOT)}:{line}({func})"
        rows.append((tt, nc, ct, where))
    busy = sum(r[0] for r in rows) or 1.0
    rows.sort(reverse=True)
    out = [f"{'own s':>7} {'share':>6} {'calls':>9} {'us/call':>8} {'cum s':>7}  function"]
    for tt, nc, ct, where in rows[:top]:
        per = tt / nc * 1e6 if nc else 0.0
        out.append(f"{tt:7.3f} {tt / busy:6.1%} {nc:9d} {per:8.2f} {ct:7.3f}  {where[-90:]}")
    out.append(f"(CPU total {busy:.3f} s; waits {waited:.3f} s not shown; cProfile adds about")
    out.append(" a microsecond to every call, so many-call functions look heavier than they are)")
    return out


def _split_frame(frame: str) -> tuple[str, str]:
    """``func (path/to/file.py:12)`` -> (``func (file.py)``, ``12``), project-relative."""
    func, _, where = frame.partition(" (")
    where = where.rstrip(")")
    where, _, line = where.rpartition(":")
    if where.startswith(str(ROOT)):
        where = where[len(str(ROOT)) + 1 :]
    elif "/lib/python" in where:
        where = "stdlib/" + where.rsplit("/lib/python", 1)[1].split("/", 1)[-1]
    return f"{func} ({where})", line


def _pyspy_hotspots(path: str, top: int) -> list[str]:
    """Top functions by self samples, their inclusive share and hottest lines (py-spy raw)."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    lines: dict[str, dict[str, int]] = {}
    total = 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        for row in fh:
            stack, _, count_text = row.rstrip("\n").rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = [_split_frame(f) for f in stack.split(";") if " (" in f]
            if not frames:
                continue
            total += count
            leaf, line = frames[-1]
            own[leaf] = own.get(leaf, 0) + count
            per_line = lines.setdefault(leaf, {})
            per_line[line] = per_line.get(line, 0) + count
            for func in {f for f, _ in frames}:
                incl[func] = incl.get(func, 0) + count
    if not total:
        return ["(no samples)"]
    out = [f"{'self':>6} {'incl':>6}  function (file)  [hottest lines: self share]"]
    for func, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        hot = sorted(lines[func].items(), key=lambda kv: -kv[1])[:3]
        where = ", ".join(f"{ln}: {c / total:.0%}" for ln, c in hot)
        out.append(f"{n / total:6.1%} {incl[func] / total:6.1%}  {func[-80:]}  [{where}]")
    out.append(f"({total} samples of busy threads; waiting threads are not sampled)")
    return out


def pyspy_path() -> str | None:
    """py-spy executable: ``$WSE_BENCH_PYSPY`` or ``py-spy`` on PATH (optional tool)."""
    import shutil

    found = os.environ.get("WSE_BENCH_PYSPY") or shutil.which("py-spy")
    return found if found and os.access(found, os.X_OK) else None


def profile_ours(cfg: Settings, secret: bytes, token: str, top: int = 15) -> None:
    """Profile the asyncio server on the fan-out and inbound paths; print hot spots.

    With py-spy (sampling, attaches to the server PID for the measured runs only) when it
    is installed, else cProfile on every server thread for the server's whole life.
    Fresh servers, full-length runs even under ``--quick``; read the shares, not the rates.
    """
    import signal
    import subprocess
    import tempfile

    pyspy = pyspy_path()
    prof_cfg = Settings(quick=cfg.quick, run_seconds=2.0, repeats=1)
    paths: list[tuple[str, Callable[[Server, Hook], dict[str, Any]]]] = [
        ("fan-out, 1000 subscribers", lambda s, h: measure_fanout(s, 1000, prof_cfg, h)),
        ("inbound, 100 connections", lambda s, h: measure_inbound(s, 100, prof_cfg, h)),
    ]
    for path_name, measure in paths:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "server.prof")
            server = start_server("asyncio", secret, token, None if pyspy else out)
            recorder: list[subprocess.Popen[bytes]] = []

            def attach(
                server: Server = server,
                out: str = out,
                recorder: list[subprocess.Popen[bytes]] = recorder,
            ) -> None:
                if pyspy is None:
                    return
                argv = [pyspy, "record", "--pid", str(server.child.pid), "--rate", "400"]
                argv += ["--format", "raw", "--nonblocking", "--output", out]
                recorder.append(
                    subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                )
                time.sleep(0.5)  # let it attach

            try:
                result = measure(server, attach)
            finally:
                for proc in recorder:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGINT)
                    try:
                        proc.wait(20.0)
                    except subprocess.TimeoutExpired:
                        os.kill(proc.pid, signal.SIGKILL)
                        proc.wait()
                server.child.stop(15.0, command={"cmd": "stop"})
            tool = "py-spy" if pyspy else "cProfile (install py-spy for sampling)"
            print(f"\n-- {tool}: wse-py asyncio, {path_name} "
                  f"({result['rate']:,.0f}/s while profiled), all server threads:")  # fmt: skip
            if not os.path.exists(out):
                print("   (no profile written)")
                continue
            lines = _pyspy_hotspots(out, top) if pyspy else _cprofile_hotspots(out, top)
            for line in lines:
                print("   " + line)


# ----------------------------------------------------------------------------- main


def _flag(argv: Sequence[str], name: str, env: str) -> bool:
    return name in argv or os.environ.get(env, "") not in ("", "0")


def run(quick: bool, profile: bool = False, out: Callable[[str], None] = print) -> Results:
    cfg = Settings.make(quick)
    secret = base64.b64encode(os.urandom(33))
    token = make_token(secret)
    res = Results()
    t_start = time.monotonic()
    rss_conns = feasible_conns(cfg.rss_conns)

    servers: dict[str, Server] = {}
    for kind in KINDS:
        try:
            servers[kind] = start_server(kind, secret, token)
        except ChildError as exc:
            res.notes.append(f"{LABELS[kind]} unavailable: {str(exc)[:600]}")
    live = [k for k in KINDS if k in servers]

    def each(figure: str, fn: Callable[[Server], float]) -> None:
        for kind in live:
            if kind not in servers:
                continue
            try:
                res.put(figure, kind, fn(servers[kind]))
            except Exception as exc:  # one failure must not lose the whole table
                res.notes.append(f"{figure} on {LABELS[kind]} failed: {str(exc)[:600]}")

    def rate(s: Server, r: dict[str, Any], lost: str, cpu: str) -> float:
        """Record a throughput run's loss and CPU split; return its rate."""
        res.put(lost, s.kind, r["lost"])
        res.cpu.setdefault(cpu, {})[s.kind] = (r["server_cpu"], r["loadgen_cpu"])
        return float(r["rate"])

    try:
        for subs in cfg.fanout_subs:

            def fan(s: Server, subs: int = subs) -> float:
                return rate(s, measure_fanout(s, subs, cfg), f"fanlost{subs}", f"fan-out {subs}")

            each(f"fanout{subs}", fan)
            out(f"   fan-out {subs} done ({time.monotonic() - t_start:.0f} s)")
        for conns in cfg.inbound_conns:

            def inb(s: Server, conns: int = conns) -> float:
                return rate(s, measure_inbound(s, conns, cfg), f"loss{conns}", f"inbound {conns}")

            each(f"inbound{conns}", inb)
            out(f"   inbound {conns} done ({time.monotonic() - t_start:.0f} s)")
        try:
            alive = [s for s in servers.values() if s.child.alive()]
            for (figure, kind), value in measure_latencies(alive, cfg).items():
                res.put(figure, kind, value)
        except Exception as exc:
            res.notes.append(f"latencies failed: {str(exc)[:600]}")
        out(f"   latencies done ({time.monotonic() - t_start:.0f} s)")
    finally:
        for s in servers.values():
            s.child.stop(5.0, command={"cmd": "stop"})

    for kind in live:
        try:
            res.put("rss", kind, measure_rss(kind, rss_conns, secret, token))
        except Exception as exc:
            res.notes.append(f"RSS on {LABELS[kind]} failed: {str(exc)[:600]}")
    out(f"   RSS done ({time.monotonic() - t_start:.0f} s)")

    figs = [
        Figure("fanout100", "fan-out 100 subs", "deliveries/s", True, 15.0),
        Figure("fanout1000", "fan-out 1000 subs", "deliveries/s", True, 15.0),
        Figure("inbound1", "inbound 1 conn", "msgs/s", True, 3.0),
        Figure("inbound20", "inbound 20 conns", "msgs/s", True, 3.0),
        Figure("inbound100", "inbound 100 conns", "msgs/s", True, 3.0),
        Figure("loss1", "inbound loss 1 conn", "msgs", False, None),
        Figure("loss20", "inbound loss 20 conns", "msgs", False, None),
        Figure("loss100", "inbound loss 100 conns", "msgs", False, None),
        Figure("connect_p50", "connect->ready p50", "ms", False, 0.6, 1000.0, "{:.3f}"),
        Figure("connect_p99", "connect->ready p99", "ms", False, None, 1000.0, "{:.3f}"),
        Figure("ping_p50", "ping RTT p50", "ms", False, 0.9, 1000.0, "{:.3f}"),
        Figure("ping_p99", "ping RTT p99", "ms", False, None, 1000.0, "{:.3f}"),
        Figure("rss", f"RSS per idle conn @ {rss_conns:,}", "KiB", False, 0.6, 1.0, "{:.1f}"),
    ]
    out("")
    mode = "quick" if quick else "full"
    took = time.monotonic() - t_start
    out(f"server benchmark ({mode}, {took:.0f} s; ratio = ours / websockets, a = asyncio, "
        f"u = uvloop; fan-out payload {PAYLOAD_BYTES} B)")  # fmt: skip
    print_table(figs, res, out)
    lost = [
        f"{LABELS[k]} {res.get(f'fanlost{n}', k):.0f} @ {n}"
        for n in cfg.fanout_subs
        for k in live
        if res.get(f"fanlost{n}", k)
    ]
    if lost:
        out("fan-out deliveries missing: " + ", ".join(lost))
    if res.cpu:
        out("CPU cores busy during the kept run, server+loadgen (2 cores; a loadgen near 1.0")
        out("means the figure may be bounded by the load generator, not the server):")
        for name, per_kind in res.cpu.items():
            cells = [f"{LABELS[k]} {v[0]:.2f}+{v[1]:.2f}" for k, v in per_kind.items()]
            out(f"  {name}: " + ", ".join(cells))
    for note in res.notes:
        out("note: " + note)
    if profile and "asyncio" in live:
        profile_ours(cfg, secret, token)
    return res


def main() -> None:
    argv = sys.argv[1:]
    quick = _flag(argv, "--quick", "WSE_BENCH_QUICK")
    profile = _flag(argv, "--profile", "WSE_BENCH_PROFILE")
    run(quick, profile)


def _serve_main(argv: list[str]) -> int:
    kind = argv[argv.index("--serve") + 1]
    profile_out = argv[argv.index("--profile-out") + 1] if "--profile-out" in argv else None
    return serve_wse(kind, profile_out)


if __name__ == "__main__":
    if "--serve" in sys.argv:
        sys.exit(_serve_main(sys.argv))
    main()

"""``python -m wse_server.conformance``: run the WSE conformance kit.

    server URL --token T | --jwt-secret S     check a server (the kit is the client)
    client --listen HOST:PORT [--run CMD]     check a client (the kit is the server)
    serve-reference-app [--port N]            wse-py's server with the control protocol

See spec/CONFORMANCE.md. Exit status: 0 when nothing failed, 1 when a scenario failed
(or, with --strict, warned), 2 for usage or setup errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any

from . import report, vectors
from .core import Result, Scenario, exit_code, run_suite, select

__all__ = ["build_parser", "main"]

SECRET_ENV = "WSE_JWT_SECRET"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="IDS",
        help="run only these ids (comma-separated, globs)",
    )
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="IDS",
        help="skip these ids (comma-separated, globs)",
    )
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--junit", metavar="FILE", help="write the results as JUnit XML")
    p.add_argument("--strict", action="store_true", help="SHOULD findings (warn) also fail the run")
    p.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        help="seconds to wait for each expected frame (default 5)",
    )
    p.add_argument("--vectors", metavar="DIR", help="directory of spec/vectors/*.json")
    p.add_argument("-v", "--verbose", action="store_true", help="show every detail line")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m wse_server.conformance",
        description="WSE protocol conformance kit (spec/CONFORMANCE.md).",
    )
    sub = parser.add_subparsers(dest="mode", required=True)

    s = sub.add_parser("server", help="check a server under test (the kit is the client)")
    s.add_argument("url", nargs="?", help="ws://host:port/path of the server under test")
    s.add_argument("--token", help="a valid JWT for the server under test")
    s.add_argument(
        "--jwt-secret",
        help=f"the server's HS256 secret (or ${SECRET_ENV}); lets the kit mint tokens",
    )
    s.add_argument(
        "--jwt-secret-file", help="file holding the secret (or a PEM private key for RS256/ES256)"
    )
    s.add_argument("--jwt-algorithm", default="HS256", choices=["HS256", "RS256", "ES256"])
    s.add_argument(
        "--no-control", action="store_true", help="skip scenarios that need the control protocol"
    )
    s.add_argument(
        "--max-wait",
        type=float,
        default=10.0,
        help="longest wait for timed behaviour (server pings)",
    )
    _common(s)

    c = sub.add_parser("client", help="check a client under test (the kit is the server)")
    c.add_argument(
        "--listen", default="127.0.0.1:0", help="HOST:PORT to listen on (default 127.0.0.1:0)"
    )
    c.add_argument("--token", help="the token the client is given (default: a generated JWT)")
    c.add_argument(
        "--run",
        metavar="CMD",
        help="start the client with this command; {url} and {token} are substituted",
    )
    c.add_argument(
        "--wait",
        type=float,
        default=60.0,
        help="seconds to wait for the first connection (default 60)",
    )
    c.add_argument(
        "--reconnect-timeout", type=float, default=15.0, help="seconds to wait for a reconnection"
    )
    _common(c)

    r = sub.add_parser(
        "serve-reference-app", help="run WSEServer with the control protocol (for server mode)"
    )
    r.add_argument("--host", default="127.0.0.1")
    r.add_argument("--port", type=int, default=5006)
    r.add_argument("--jwt-secret", help=f"HS256 secret (or ${SECRET_ENV}, or --jwt-secret-file)")
    r.add_argument("--jwt-secret-file")
    r.add_argument(
        "--rate-limit-capacity",
        type=float,
        default=100.0,
        help="small, so the rate-limit scenario can run",
    )
    r.add_argument("--rate-limit-refill", type=float, default=10.0)
    r.add_argument(
        "--ping-interval",
        type=float,
        default=2.0,
        help="short, so the server-ping scenario can run",
    )
    r.add_argument("--idle-timeout", type=float, default=60.0)
    r.add_argument("--log-level", default="WARNING")
    r.add_argument(
        "--transport",
        default="asyncio",
        help="WSEServer transport: asyncio, uvloop, threading or gevent (patch gevent first)",
    )
    return parser


def _secret(value: str | None, path: str | None) -> bytes | None:
    if path:
        with open(path, "rb") as fh:
            data = fh.read()
        return data.rstrip(b"\r\n") if not data.startswith(b"-----") else data
    if value:
        return value.encode("utf-8")
    env = os.environ.get(SECRET_ENV)
    return env.encode("utf-8") if env else None


def _finish(args: argparse.Namespace, results: list[Result], mode: str, target: str) -> int:
    report.write_summary(results, sys.stdout)
    if args.json:
        report.write_json(results, args.json, mode=mode, target=target)
    if args.junit:
        report.write_junit(results, args.junit, mode=mode, target=target)
    return exit_code(results, strict=args.strict)


def _printer(scenarios: Sequence[Scenario], verbose: bool) -> Any:
    width = max((len(s.id) for s in scenarios), default=10)
    sections = max((len(s.section) for s in scenarios), default=10)

    def show(result: Result) -> None:
        report.write_row(result, sys.stdout, width=width, section_width=sections, verbose=verbose)
        sys.stdout.flush()

    return show


async def _server_mode(args: argparse.Namespace, scenarios: list[Scenario]) -> int:
    from .server_mode import ServerModeContext

    secret = _secret(args.jwt_secret, args.jwt_secret_file)
    if args.token is None and secret is None:
        print(
            "error: give --token, --jwt-secret, --jwt-secret-file or $WSE_JWT_SECRET",
            file=sys.stderr,
        )
        return 2
    try:
        ctx = ServerModeContext(
            args.url,
            token=args.token,
            jwt_secret=secret,
            jwt_algorithm=args.jwt_algorithm,
            control=not args.no_control,
            timeout=args.timeout,
            max_wait=args.max_wait,
        )
        await ctx.setup()
    except Exception as exc:
        print(f"error: cannot start a session with {args.url}: {exc}", file=sys.stderr)
        return 2
    print(f"server under test: {args.url}; control protocol: "
          f"{'yes' if ctx.control_available else 'no'}\n")  # fmt: skip
    results = await run_suite(scenarios, ctx, on_result=_printer(scenarios, args.verbose))
    return _finish(args, results, "server", args.url)


async def _client_mode(args: argparse.Namespace, scenarios: list[Scenario]) -> int:
    from .client_mode import ClientModeContext

    host, _, port = args.listen.rpartition(":")
    try:
        ctx = ClientModeContext(
            host.strip("[]") or "127.0.0.1",
            int(port),
            token=args.token,
            timeout=args.timeout,
            reconnect_timeout=args.reconnect_timeout,
        )
        await ctx.start()
    except (ValueError, OSError) as exc:
        print(f"error: cannot listen on {args.listen}: {exc}", file=sys.stderr)
        return 2
    print(f"reference server listening on {ctx.url}\ntoken: {ctx.token}", flush=True)
    proc: subprocess.Popen[bytes] | None = None
    try:
        if args.run:
            argv = [
                part.replace("{url}", ctx.url).replace("{token}", ctx.token)
                for part in shlex.split(args.run)
            ]
            proc = subprocess.Popen(argv)
        try:
            await ctx.wait_first(args.wait)
        except Exception as exc:
            state = (
                f" (the client exited with {proc.poll()})"
                if proc is not None and proc.poll() is not None
                else ""
            )
            print(f"error: the client under test did not connect: {exc}{state}", file=sys.stderr)
            return 2
        print()
        results = await run_suite(scenarios, ctx, on_result=_printer(scenarios, args.verbose))
    finally:
        await ctx.finish()
        if proc is not None:
            _stop_process(proc)
    return _finish(args, results, "client", ctx.url)


def _stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5.0)


def _serve_reference_app(args: argparse.Namespace) -> int:
    from wse_server import WSEServer

    from .control import ReferenceApp, close_quietly

    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.WARNING), stream=sys.stderr
    )
    secret = _secret(args.jwt_secret, args.jwt_secret_file)
    if secret is None:
        print("error: give --jwt-secret, --jwt-secret-file or $WSE_JWT_SECRET", file=sys.stderr)
        return 2
    try:
        server = WSEServer(
            args.host,
            args.port,
            jwt_secret=secret,
            rate_limit_capacity=args.rate_limit_capacity,
            rate_limit_refill=args.rate_limit_refill,
            ping_interval=args.ping_interval,
            idle_timeout=args.idle_timeout,
            recovery_enabled=True,
            presence_enabled=True,
            transport=args.transport,
        )
        server.start()
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    app = ReferenceApp(server, presence_enabled=True)
    app.start()
    print(
        f"wse-py conformance reference app listening on ws://{args.host}:{server.port}/wse",
        flush=True,
    )
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        while not stop.wait(0.5):
            if not server.is_running():
                return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        close_quietly(app, server)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.mode == "serve-reference-app":
        return _serve_reference_app(args)
    if args.vectors:
        vectors.set_directory(args.vectors)
    if args.mode == "server":
        from .server_mode import SERVER_SCENARIOS as pool
    else:
        from .client_mode import CLIENT_SCENARIOS as pool
    scenarios = select(pool, args.only, args.skip)
    if args.list:
        report.write_list(scenarios, sys.stdout)
        return 0
    if not scenarios:
        print("error: no scenario selected", file=sys.stderr)
        return 2
    try:
        vectors.vectors_dir()
    except vectors.VectorsMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.mode == "server":
        if not args.url:
            print("error: the server URL is required", file=sys.stderr)
            return 2
        runner = _server_mode(args, scenarios)
    else:
        runner = _client_mode(args, scenarios)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(runner)
    return 130


if __name__ == "__main__":
    sys.exit(main())

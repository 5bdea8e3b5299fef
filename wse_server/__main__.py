"""``python -m wse_server`` / ``wse-py-server``: run a WSE server from the command line.

Secrets never come from the command line (they would show in ``ps`` and shell history): the
JWT secret or public key is read from the environment variable ``WSE_JWT_SECRET`` or from
``--jwt-key-file``. ``--dev`` embeds a development secret when none is configured and prints
a ready-to-use token; ``--demo`` runs the demo application (:mod:`wse_server.demo`).
Logs go to stderr; the listening address, and with ``--dev`` the token, go to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from wse_transports.base import available_transports

__all__ = ["DEV_SECRET", "DEV_TOKEN_TTL", "build_parser", "main"]

DEV_SECRET = b"wse-py-development-secret-not-for-production-use"
"""Embedded HS256 secret for ``--dev`` when neither WSE_JWT_SECRET nor a key file is given."""

DEV_TOKEN_TTL = 24 * 3600
DEV_USER = "dev-user"
SECRET_ENV = "WSE_JWT_SECRET"
TLS_ENV = ("WSE_CLUSTER_TLS_CERT", "WSE_CLUSTER_TLS_KEY", "WSE_CLUSTER_TLS_CA")

log = logging.getLogger("wse_server")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wse-py-server",
        description="Run a WSE real-time WebSocket server (wse-server 2.5.1 compatible).",
        epilog=(
            f"The JWT secret (HS256) or PEM public key (RS256/ES256) is read from ${SECRET_ENV} "
            "or --jwt-key-file, never from the command line. Without either, connections are "
            "not authenticated (unless --dev)."
        ),
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=5006, help="TCP port (default 5006; 0 = any)")
    p.add_argument(
        "--transport",
        default="asyncio",
        choices=available_transports(),
        help="I/O transport (default asyncio)",
    )
    p.add_argument("--max-connections", type=int, default=1000, help="default 1000")
    p.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
    )
    jwt = p.add_argument_group("JWT authentication")
    jwt.add_argument("--jwt-issuer", default=None, help="expected iss (checked when present)")
    jwt.add_argument("--jwt-audience", default=None, help="expected aud (checked when present)")
    jwt.add_argument(
        "--jwt-algorithm", default=None, choices=["HS256", "RS256", "ES256"], help="default HS256"
    )
    jwt.add_argument(
        "--jwt-key-file",
        default=None,
        help="file with the HS256 secret or the RS256/ES256 PEM public key",
    )
    jwt.add_argument("--jwt-cookie-name", default=None, help="default access_token")
    p.add_argument(
        "--demo",
        action="store_true",
        help="subscribe every connection to 'demo', tick every second, echo client messages",
    )
    p.add_argument(
        "--dev",
        action="store_true",
        help="development mode: embedded secret if none is configured, print a 24 h token",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="N >= 2: run N processes on the same port (SO_REUSEPORT, Linux) joined by a "
        "loopback cluster; --cluster-port is then the base port (worker i: base+i)",
    )
    p.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    cl = p.add_argument_group(
        "cluster",
        f"TLS files may also come from ${TLS_ENV[0]}, ${TLS_ENV[1]}, ${TLS_ENV[2]} (all or none)",
    )
    cl.add_argument("--cluster-port", type=int, default=None, help="listen for peers (0.0.0.0)")
    cl.add_argument("--cluster-peers", default=None, help="host:port,... peers to dial")
    cl.add_argument(
        "--cluster-seeds", default=None, help="host:port,... seeds (needs --cluster-addr)"
    )
    cl.add_argument("--cluster-addr", default=None, help="ip:port announced to the mesh")
    cl.add_argument("--cluster-tls-cert", default=None, help="PEM certificate (mutual TLS)")
    cl.add_argument("--cluster-tls-key", default=None, help="PEM private key")
    cl.add_argument("--cluster-tls-ca", default=None, help="PEM CA that signs every peer")
    return p


def _split(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def _cluster_tls(args: argparse.Namespace) -> tuple[str | None, str | None, str | None]:
    """TLS paths from the options, else from the environment; all three or none."""
    paths = (args.cluster_tls_cert, args.cluster_tls_key, args.cluster_tls_ca)
    if not any(paths):
        paths = tuple(os.environ.get(name) or None for name in TLS_ENV)  # type: ignore[assignment]
    if any(paths) and not all(paths):
        raise ValueError("cluster TLS needs a certificate, a key and a CA (all or none)")
    return paths


def _load_secret(args: argparse.Namespace) -> bytes | None:
    if args.jwt_key_file:
        with open(args.jwt_key_file, "rb") as fh:
            data = fh.read()
        if (args.jwt_algorithm or "HS256") == "HS256":
            # A secret file normally ends with a newline that is not part of the secret.
            data = data.rstrip(b"\r\n")
        return data
    env = os.environ.get(SECRET_ENV)
    if env:
        return env.encode("utf-8")
    return None


def _dev_banner(url: str, secret: bytes, token: str | None) -> str:
    lines = ["", "=== wse-py development mode: do not use this setup in production ==="]
    if secret == DEV_SECRET:
        lines.append(f"JWT secret (HS256, embedded): {secret.decode()}")
    if token is not None:
        lines.append(f"Token (sub={DEV_USER}, valid 24 h): {token}")
        snippet = (
            'python -c "from wse_client import SyncWSEClient as C; '
            f"c = C({url!r}, token={token!r}); c.connect(); "
            '[print(e.type, e.payload) for e in iter(lambda: c.recv(timeout=60), None)]"'
        )
        lines.append("Try it with wse-client:")
        lines.append(snippet)
    lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m wse_server`` and the ``wse-py-server`` script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    worker = args.worker_index
    tag = "" if worker is None else f"w{worker} "
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s",
    )
    from . import WSEServer, rust_jwt_encode

    try:
        cluster_tls = _cluster_tls(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.workers > 1 and worker is None:
        from .workers import supervise

        return supervise(args, argv)

    try:
        secret = _load_secret(args)
    except OSError as exc:
        print(f"error: cannot read --jwt-key-file: {exc}", file=sys.stderr)
        return 2
    if secret is None and args.dev:
        secret = DEV_SECRET
    algorithm = args.jwt_algorithm or "HS256"
    kwargs: dict[str, Any] = {"max_connections": args.max_connections, "transport": args.transport}
    if secret is not None:
        kwargs.update(
            jwt_secret=secret,
            jwt_issuer=args.jwt_issuer,
            jwt_audience=args.jwt_audience,
            jwt_algorithm=args.jwt_algorithm,
            jwt_cookie_name=args.jwt_cookie_name,
        )
    # Handlers go in before the address is printed: a supervisor may signal as soon as it
    # sees the address, and that must still be a clean shutdown.
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server = WSEServer(args.host, args.port, reuse_port=worker is not None, **kwargs)
        server.start()
    except (ValueError, OSError) as exc:
        for s, handler in previous.items():
            signal.signal(s, handler)
        print(f"error: {exc}", file=sys.stderr)
        return 2

    url = f"ws://{args.host}:{server.port}/wse"
    if args.cluster_port is not None or args.cluster_peers or args.cluster_seeds:
        try:
            server.connect_cluster(
                _split(args.cluster_peers),
                *cluster_tls,
                cluster_port=args.cluster_port,
                seeds=_split(args.cluster_seeds) or None,
                cluster_addr=args.cluster_addr,
            )
        except (RuntimeError, NotImplementedError, ValueError, OSError) as exc:
            for s, handler in previous.items():
                signal.signal(s, handler)
            server.stop()
            print(f"error: cluster: {exc}", file=sys.stderr)
            return 2
        log.info("cluster: listening on port %d, peers %s", server.cluster_port, args.cluster_peers)
    if worker is None:
        print(f"wse-py server listening on {url}", flush=True)
    else:
        print(f"wse-py worker {worker} (pid {os.getpid()}) listening on {url}", flush=True)
    log.info("authentication: %s", f"JWT {algorithm}" if secret is not None else "off")
    if args.dev and secret is not None and not worker:
        token = None
        if algorithm == "HS256":
            claims: dict[str, Any] = {"sub": DEV_USER, "exp": int(time.time()) + DEV_TOKEN_TTL}
            if args.jwt_issuer:
                claims["iss"] = args.jwt_issuer
            if args.jwt_audience:
                claims["aud"] = args.jwt_audience
            token = rust_jwt_encode(claims, secret)
        print(_dev_banner(url, secret, token), flush=True)

    demo = None
    if args.demo:
        from .demo import DemoApp

        if worker is None:
            demo = DemoApp(server)
        else:
            from .workers import ClusterDemoApp

            demo = ClusterDemoApp(server, publisher=worker == 0)
        demo.start()
        log.info("demo: topic 'demo' ticks every second, client messages are echoed")

    parent = os.getppid()
    try:
        while not stop.wait(0.5):
            if not server.is_running():
                log.error("server stopped unexpectedly")
                return 1
            if worker is not None and os.getppid() != parent:
                log.error("supervisor is gone; stopping")
                return 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if demo is not None:
            demo.stop()
        server.stop()
        log.info("stopped; %s", json.dumps(server.health_snapshot(), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

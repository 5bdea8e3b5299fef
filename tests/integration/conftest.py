"""Fixtures for the loopback tests: a real server on 127.0.0.1:<ephemeral> and real JWTs.

Every test that takes ``server`` or ``server_factory`` runs once per transport
(:data:`TRANSPORTS`). asyncio, uvloop and threading servers run in this process; gevent
servers run in one monkey-patched host process (``gevent_host.py``) and are driven through
:class:`~.remote.RemoteServer`, so this process never imports gevent.

Tokens are minted with PyJWT directly (not with wse_proto.auth), so a bug in our token code
cannot hide a bug in our validation.
"""

from __future__ import annotations

import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import jwt
import pytest

from wse_server import WSEServer

from .remote import GeventHost, RemoteServer

TRANSPORTS = ("asyncio", "uvloop", "threading", "gevent")
IN_PROCESS_TRANSPORTS = ("asyncio", "uvloop", "threading")

AnyServer = WSEServer | RemoteServer

SECRET = b"integration-test-secret-0123456789abcdef"
OTHER_SECRET = b"a-completely-different-secret-0123456789"


_leftovers: weakref.WeakKeyDictionary[AnyServer, deque[tuple[str, Any, Any]]] = (
    weakref.WeakKeyDictionary()
)


def make_token(
    sub: Any = "alice",
    *,
    key: bytes | str = SECRET,
    algorithm: str = "HS256",
    exp_in: float = 3600,
    headers: dict[str, Any] | None = None,
    **claims: Any,
) -> str:
    payload: dict[str, Any] = {"exp": int(time.time() + exp_in), **claims}
    if sub is not None:
        payload["sub"] = sub
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers)


def drain_until(
    server: AnyServer,
    predicate: Callable[[tuple[str, Any, Any]], bool],
    timeout: float = 5.0,
    sink: list[tuple[str, Any, Any]] | None = None,
) -> tuple[str, Any, Any]:
    """Drain events until one matches; every drained event is appended to ``sink``.

    Events drained after the match (same batch) are kept for the next call.
    """
    stash = _leftovers.setdefault(server, deque())
    deadline = time.monotonic() + timeout
    while True:
        while stash:
            ev = stash.popleft()
            if sink is not None:
                sink.append(ev)
            if predicate(ev):
                return ev
        if time.monotonic() >= deadline:
            raise TimeoutError("expected drain event did not arrive")
        stash.extend(server.drain_inbound(256, 50))


def wait_for(cond: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(interval)


def conn_info(server: AnyServer, conn_id: str) -> SimpleNamespace | None:
    """A snapshot of a live connection's state, buffers and encryption (None when gone)."""
    if isinstance(server, RemoteServer):
        return server.conn_info(conn_id)
    with server._lock:
        conn = server._core.get_connection(conn_id)
        if conn is None:
            return None
        return SimpleNamespace(
            state=conn.state,
            pending_bytes=conn.pending_bytes,
            transport_backlog=conn.transport_backlog,
            encrypted=conn.encrypted,
        )


@pytest.fixture(scope="session")
def gevent_host() -> Iterator[GeventHost]:
    """The monkey-patched process that runs every gevent server of the session."""
    host = GeventHost()
    yield host
    host.close()


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def server_factory(
    transport: str, request: pytest.FixtureRequest
) -> Iterator[Callable[..., AnyServer]]:
    """Start servers on the transport under test; every one is stopped at teardown.

    ``port`` (default 0: ephemeral), ``start=False`` (return it unstarted) and
    ``transport_options`` (extra transport constructor options) are accepted besides the
    ``WSEServer`` keyword arguments.
    """
    host: GeventHost | None = (
        request.getfixturevalue("gevent_host") if transport == "gevent" else None
    )
    started: list[AnyServer] = []

    def factory(
        *,
        port: int = 0,
        start: bool = True,
        transport_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> AnyServer:
        kwargs.setdefault("jwt_secret", SECRET)
        server: AnyServer
        if host is not None:
            server = host.create(
                kwargs, port=port, start=start, transport_options=transport_options
            )
        else:
            server = WSEServer("127.0.0.1", port, transport=transport, **kwargs)
            server._transport_options.update(transport_options or {})
            server.enable_drain_mode()
            if start:
                server.start()
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


@pytest.fixture
def server(server_factory: Callable[..., AnyServer]) -> AnyServer:
    return server_factory()


def url_of(server: AnyServer, query: str = "") -> str:
    return f"ws://127.0.0.1:{server.port}/wse{query}"

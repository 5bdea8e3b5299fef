"""Fixtures for the loopback tests: a real server on 127.0.0.1:<ephemeral> and real JWTs.

Tokens are minted with PyJWT directly (not with wse_proto.auth), so a bug in our token code
cannot hide a bug in our validation.
"""

from __future__ import annotations

import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import pytest

from wse_server import WSEServer

SECRET = b"integration-test-secret-0123456789abcdef"
OTHER_SECRET = b"a-completely-different-secret-0123456789"


_leftovers: weakref.WeakKeyDictionary[WSEServer, deque[tuple[str, Any, Any]]] = (
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
    server: WSEServer,
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


@pytest.fixture
def server_factory() -> Iterator[Callable[..., WSEServer]]:
    """Start servers on an ephemeral port; every one is stopped at teardown."""
    started: list[WSEServer] = []

    def factory(**kwargs: Any) -> WSEServer:
        kwargs.setdefault("jwt_secret", SECRET)
        server = WSEServer("127.0.0.1", 0, **kwargs)
        server.enable_drain_mode()
        server.start()
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


@pytest.fixture
def server(server_factory: Callable[..., WSEServer]) -> WSEServer:
    return server_factory()


def url_of(server: WSEServer, query: str = "") -> str:
    return f"ws://127.0.0.1:{server.port}/wse{query}"

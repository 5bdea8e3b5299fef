"""The WSE conformance kit: prove a third-party WSE client or server speaks the protocol.

Two modes, driven by the vectors in ``spec/vectors`` and wse-py's Sans-IO machines:

- server mode (:mod:`.server_mode`): a :class:`~wse_proto.client.ClientConnection` checks a
  server under test; application-level scenarios use the control protocol
  (:mod:`.control`, which also holds the reference application for ``WSEServer``);
- client mode (:mod:`.client_mode`): a scripted reference server built on
  :class:`~wse_proto.server.ServerConnection` checks a client under test that follows the
  echo convention.

Run ``python -m wse_server.conformance --help``; spec/CONFORMANCE.md documents the
conventions and every scenario.
"""

from __future__ import annotations

from .client_mode import CLIENT_SCENARIOS, ClientModeContext
from .control import ReferenceApp
from .core import KIT_VERSION, Outcome, Result, Scenario, exit_code, run_suite, select
from .server_mode import SERVER_SCENARIOS, ServerModeContext

__all__ = [
    "CLIENT_SCENARIOS",
    "KIT_VERSION",
    "SERVER_SCENARIOS",
    "ClientModeContext",
    "Outcome",
    "ReferenceApp",
    "Result",
    "Scenario",
    "ServerModeContext",
    "exit_code",
    "run_suite",
    "select",
]

"""wse_server: the WSE server built from wse_proto and wse_transports.

``WSEServer`` mirrors the original wse-server 2.5.1 ``RustWSEServer`` API (also exported
under that name), plus a native asyncio API (``serve``, ``running``, ``events``,
``publish``). Run ``python -m wse_server --help`` for the command line.
"""

from __future__ import annotations

from .compat import RustWSEServer, rust_jwt_decode, rust_jwt_encode
from .server import WSEServer

__all__ = ["RustWSEServer", "WSEServer", "rust_jwt_decode", "rust_jwt_encode"]

"""Access to ``spec/vectors/*.json`` for data-driven scenarios.

The files are looked up in ``--vectors DIR``, then ``$WSE_VECTORS_DIR``, then the
``spec/vectors`` directory of the source tree this package lives in.
"""

from __future__ import annotations

import json
import os
import struct
from functools import cache
from pathlib import Path
from typing import Any

__all__ = [
    "VectorsMissing",
    "cases",
    "mask_frames",
    "set_directory",
    "vectors_dir",
]

_override: Path | None = None


class VectorsMissing(Exception):
    """The vector files cannot be found (pass ``--vectors DIR``)."""


def set_directory(path: str | os.PathLike[str] | None) -> None:
    """Use ``path`` for the vector files (``None``: back to the default lookup)."""
    global _override
    _override = Path(path) if path is not None else None
    _load.cache_clear()


def vectors_dir() -> Path:
    """The directory holding the vector files."""
    candidates = []
    env = os.environ.get("WSE_VECTORS_DIR")
    if _override is not None:
        candidates.append(_override)  # an explicit choice: no fallback
    elif env:
        candidates.append(Path(env))
    else:
        candidates.append(Path(__file__).resolve().parents[2] / "spec" / "vectors")
    for candidate in candidates:
        if (candidate / "frames.json").is_file():
            return candidate
    raise VectorsMissing(
        "spec/vectors not found (tried " + ", ".join(str(c) for c in candidates) + "); "
        "pass --vectors DIR or set WSE_VECTORS_DIR"
    )


@cache
def _load(name: str) -> tuple[dict[str, Any], ...]:
    path = vectors_dir() / f"{name}.json"
    with open(path, encoding="utf-8") as fh:
        doc = json.load(fh)
    if doc.get("format") != "wse-test-vectors" or doc.get("version") != 1:
        raise VectorsMissing(f"{path} is not a version 1 wse-test-vectors file")
    return tuple(doc["cases"])


def cases(name: str, op: str) -> list[dict[str, Any]]:
    """Every case of ``name.json`` with operation ``op``, in file order."""
    return [c for c in _load(name) if c["op"] == op]


def mask_frames(data: bytes, mask_key: bytes = b"\x37\xfa\x21\x3d") -> bytes:
    """Set the MASK bit on every frame of ``data`` and mask its payload.

    Header bits (FIN, RSV, opcode) and the length encoding, even a non-minimal one, are
    kept, so a client-direction vector (an unmasked frame a server would send) becomes the
    same frame as a client sends it. A truncated tail is copied as is.
    """
    out = bytearray()
    pos = 0
    while pos + 2 <= len(data):
        b0, b1 = data[pos], data[pos + 1]
        length = b1 & 0x7F
        head_end = pos + 2
        if length == 126:
            if head_end + 2 > len(data):
                break
            (length,) = struct.unpack_from("!H", data, head_end)
            head_end += 2
        elif length == 127:
            if head_end + 8 > len(data):
                break
            (length,) = struct.unpack_from("!Q", data, head_end)
            head_end += 8
        if b1 & 0x80:  # already masked: copy the frame through
            end = head_end + 4 + length
            out += data[pos:end]
            pos = end
            continue
        payload = data[head_end : head_end + length]
        out.append(b0)
        out.append(b1 | 0x80)
        out += data[pos + 2 : head_end]
        out += mask_key
        out += bytes(b ^ mask_key[i & 3] for i, b in enumerate(payload))
        pos = head_end + length
    out += data[pos:]
    return bytes(out)

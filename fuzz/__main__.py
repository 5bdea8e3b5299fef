"""Bounded-time fuzz runner for every harness in this folder.

Each ``fuzz/fuzz_*.py`` module defines:

- ``SEEDS``: a list of ``bytes`` inputs to start mutating from;
- ``target(data: bytes) -> None``: feeds the decoder; it may raise only the
  project's documented errors (``wse_proto.errors.WSEError`` subclasses)
  unless the module narrows that with ``ALLOWED``.

The runner mutates seeds (bit flips, splices, truncations, insertions of
interesting bytes) with a seeded PRNG so a failure prints a reproducible case.
``--atheris`` uses atheris' coverage-guided engine instead when installed.

Usage: ``python -m fuzz --seconds 10 [--only NAME] [--seed N]``.
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import random
import sys
import time
import traceback
from collections.abc import Callable
from types import ModuleType

from wse_proto.errors import WSEError

HERE = pathlib.Path(__file__).resolve().parent
INTERESTING = [
    b"\x00",
    b"\xff",
    b"{",
    b"}",
    b'"',
    b"\\",
    b"E:",
    b"C:",
    b"M:",
    b"WSE{",
    b"\x78\x9c",
    b"\xc1",
    b"\xdc\xff\xff",
    b"\x7f\xff\xff\xff",
    b"\r\n",
    b"\r\n\r\n",
]


def _harnesses(only: str | None) -> list[tuple[str, ModuleType]]:
    mods = []
    for path in sorted(HERE.glob("fuzz_*.py")):
        name = path.stem
        if only and only not in name:
            continue
        mods.append((name, importlib.import_module(f"fuzz.{name}")))
    return mods


def mutate(rng: random.Random, data: bytes, seeds: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        if op == 0 and buf:
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:
            i = rng.randrange(len(buf))
            buf[i] = rng.randrange(256)
        elif op == 2 and buf:
            i = rng.randrange(len(buf))
            del buf[i : i + rng.randint(1, 8)]
        elif op == 3:
            i = rng.randint(0, len(buf))
            buf[i:i] = rng.choice(INTERESTING)
        elif op == 4 and seeds:
            other = rng.choice(seeds)
            i = rng.randint(0, len(buf))
            j = rng.randint(0, len(other))
            buf = buf[:i] + other[j:]
        elif op == 5 and buf:
            buf = buf[: rng.randrange(len(buf) + 1)]
        else:
            buf += bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return bytes(buf)


def run_one(
    name: str, mod: ModuleType, seconds: float, seed: int
) -> tuple[int, list[tuple[bytes, str]]]:
    target: Callable[[bytes], None] = mod.target
    allowed: tuple[type[BaseException], ...] = getattr(mod, "ALLOWED", (WSEError,))
    seeds: list[bytes] = list(getattr(mod, "SEEDS", [b""])) or [b""]
    rng = random.Random(seed)
    failures: list[tuple[bytes, str]] = []
    deadline = time.monotonic() + seconds
    count = 0
    corpus = list(seeds)
    while time.monotonic() < deadline and len(failures) < 5:
        data = corpus[count % len(corpus)] if count < len(corpus) else None
        if data is None:
            data = mutate(rng, rng.choice(corpus), seeds)
        count += 1
        try:
            target(data)
        except allowed:
            pass
        except Exception:
            failures.append((data, traceback.format_exc()))
        else:
            if len(corpus) < 2000 and rng.random() < 0.05:
                corpus.append(data)
    return count, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz")
    parser.add_argument("--seconds", type=float, default=10.0, help="time budget per harness")
    parser.add_argument("--only", default=None, help="run harnesses whose name contains this")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--atheris", action="store_true", help="use atheris (coverage-guided)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    harnesses = _harnesses(args.only)
    if not harnesses:
        print("no fuzz harness matched", file=sys.stderr)
        return 2
    if args.atheris:
        import atheris  # type: ignore[import-not-found]

        name, mod = harnesses[0]
        atheris.Setup([sys.argv[0], f"-max_total_time={int(args.seconds)}"], mod.target)
        atheris.Fuzz()
        return 0
    print(f"fuzz seed {seed}")
    bad = 0
    for name, mod in harnesses:
        count, failures = run_one(name, mod, args.seconds, seed)
        print(f"{name}: {count} inputs, {len(failures)} failures")
        for data, tb in failures:
            bad += 1
            print(f"  input (hex): {data.hex()}\n{tb}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

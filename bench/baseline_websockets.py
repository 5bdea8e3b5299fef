"""Baseline server for the server benchmark: plain ``websockets`` (asyncio API), no WSE.

It does what the WSE server does in each figure with the least code a websockets user
would write: every connection gets one text message on connect (stands in for
``server_ready``; same order of size), joins the broadcast set, then either echoes (path
``/echo``) or counts what it receives (``async for message in ws``). Publishing is
``websockets.broadcast`` to every connection. Keepalive pings and compression are off
(the load generator offers no extension and WSE pings are disabled in the WSE bench server).

Run as ``python -m bench.baseline_websockets``; it speaks the bench control protocol on
stdin/stdout (JSON lines, see ``bench/bench_server.py``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import uuid
from typing import Any

from websockets.asyncio.server import ServerConnection, broadcast, serve

HELLO_PAD = "x" * 360
"""Pads the hello to the size of a WSE server_ready frame (~490 bytes)."""


class Bench:
    def __init__(self) -> None:
        self.clients: set[ServerConnection] = set()
        self.count = 0
        self.target = 0
        self.t_done = 0.0
        self.stop = asyncio.Event()

    def hello(self) -> str:
        return json.dumps(
            {
                "t": "hello",
                "id": str(uuid.uuid4()),
                "p": {"connection_id": str(uuid.uuid4()), "pad": HELLO_PAD},
            },
            separators=(",", ":"),
        )

    async def handler(self, ws: ServerConnection) -> None:
        await ws.send(self.hello())
        self.clients.add(ws)
        try:
            if ws.request is not None and ws.request.path.startswith("/echo"):
                async for message in ws:
                    await ws.send(message)
            else:
                async for _message in ws:
                    self.count += 1
                    if self.count == self.target:
                        self.t_done = time.monotonic()
                        emit(event="inbound_done", t=self.t_done, count=self.count)
        finally:
            self.clients.discard(ws)

    async def command(self, msg: dict[str, Any]) -> None:
        cmd = msg.get("cmd")
        if cmd == "wait_subs":
            deadline = time.monotonic() + float(msg.get("timeout", 30.0))
            while len(self.clients) < int(msg["n"]) and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            emit(event="subs", n=len(self.clients))
        elif cmd == "wait_conns":
            deadline = time.monotonic() + float(msg.get("timeout", 10.0))
            while len(self.clients) > int(msg["max"]) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            emit(event="conns", n=len(self.clients))
        elif cmd == "publish":
            text = msg["text"]
            count = int(msg["count"])
            clients = self.clients
            t0 = time.monotonic()
            for i in range(count):
                broadcast(clients, text)
                if i % 16 == 15:
                    await asyncio.sleep(0)  # let the loop write, as a real app would
            emit(event="published", t0=t0, t1=time.monotonic(), subs=len(clients))
        elif cmd == "expect":
            self.count = 0
            self.target = int(msg["n"])
            self.t_done = 0.0
            emit(event="expecting")
        elif cmd == "count":
            emit(event="count", n=self.count, dropped=0)
        elif cmd == "stop":
            self.stop.set()
        else:
            emit(event="error", error=f"unknown command {cmd!r}")


def emit(**event: Any) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def amain() -> None:
    bench = Bench()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, bench.stop.set)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def control() -> None:
        while True:
            line = await reader.readline()
            if not line:
                bench.stop.set()
                return
            if line.strip():
                await bench.command(json.loads(line))

    async with serve(
        bench.handler,
        "127.0.0.1",
        0,
        compression=None,
        ping_interval=None,
        backlog=1024,
    ) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        emit(event="ready", port=port, pid=os.getpid(), kind="websockets")
        task = asyncio.create_task(control())
        await bench.stop.wait()
        task.cancel()


if __name__ == "__main__":
    asyncio.run(amain())

"""Bench: how long after a client goes away does the upstream see its request
closed? Run ``python -m tests.faults.disconnect_latency [rounds]``.

Not a test (a timing bound in a unit test would be flaky): it starts a real
``python -m proxy serve`` in front of a fault server on 127.0.0.1, and for each
round opens a raw client connection, sends a request, and closes the
connection (FIN, or RST) at one of two moments:

- *thinking*: the upstream has the request and sends nothing yet;
- *streaming*: the client has the headers and a first SSE event.

The figure is the time from the client's close to the fault server reading
EOF (or a reset) on the proxy's upstream connection, as ``time.perf_counter``
in this one process measures both ends.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

from tests.faults.fixtures import chat_body, route_config
from tests.faults.process import running_proxy, write_config
from tests.faults.server import FaultServer, hang, sse


async def one_round(proxy_port: int, upstream: FaultServer, stream: bool, rst: bool) -> float:
    seen = len(upstream.connections)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
    body = chat_body(stream=stream)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    await writer.drain()
    if stream:
        await reader.readuntil(b"data: ")  # headers and the start of the first event are in
    else:
        await upstream.wait_requests(len(upstream.requests) + 1)
    while len(upstream.connections) <= seen:
        await asyncio.sleep(0)
    conn = upstream.connections[-1]
    if rst:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        started = time.perf_counter()
        writer.transport.abort()
    else:
        started = time.perf_counter()
        writer.close()
    async with asyncio.timeout(10):
        await conn.peer_closed.wait()
    assert conn.closed_at is not None
    return conn.closed_at - started


async def main(rounds: int) -> None:
    upstream = await FaultServer().start()
    with tempfile.TemporaryDirectory() as tmp:
        config = route_config({"a": upstream.url}, "a")
        config["log"] = {"access": False, "level": "WARNING"}
        path = write_config(Path(tmp) / "routes.yaml", config)
        async with running_proxy(path) as proxy:
            for stream in (False, True):
                for rst in (False, True):
                    upstream.default = sse(1, end="hang") if stream else hang()
                    figures = sorted(
                        [await one_round(proxy.port, upstream, stream, rst) for _ in range(rounds)]
                    )
                    ms = [f * 1000 for f in figures]
                    print(
                        f"{'streaming' if stream else 'thinking ':9} {'RST' if rst else 'FIN'}: "
                        f"n={rounds} p50={statistics.median(ms):.2f} ms "
                        f"p95={ms[int(len(ms) * 0.95) - 1]:.2f} ms max={ms[-1]:.2f} ms"
                    )
    await upstream.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 200))

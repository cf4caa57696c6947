"""A stream on a kept-alive connection holds no keep-alive timer (docs/decisions.md,
"The keep-alive timer outlives a short request"): the connection drops it when
the stream's body starts to be piped (server/connections.py, ``body_piped``,
which the view passes down to the relay), and aiohttp arms it again once the
response has ended, so the time allowed for the next head is unchanged.

Looked at on the proxy's own connection objects (served as ``oaimux serve``
serves): the timer is aiohttp's, and nothing on the wire shows it.
"""

from __future__ import annotations

import asyncio
import json

from proxy.config import parse_settings
from proxy.server.connections import GuardedRequestHandler
from tests.conftest import basic_config
from tests.fakes.security import RunningProxy, running_proxy
from tests.fakes.upstream import FakeUpstream


def chat(stream: bool) -> bytes:
    body = json.dumps({"model": "gpt-4o-mini", "messages": [], "stream": stream}).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )


def the_connection(proxy: RunningProxy) -> GuardedRequestHandler:
    server = proxy.runner.server
    assert server is not None
    (conn,) = server.guarded()
    return conn


async def test_a_stream_drops_the_keepalive_timer_and_it_is_armed_again_after(
    upstream_url: str, fake: FakeUpstream
) -> None:
    settings = parse_settings(basic_config(upstream_url), environ={})
    async with running_proxy(settings) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            async with asyncio.timeout(10):
                writer.write(chat(stream=False))
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                # Between requests: aiohttp's timer waits for the next head.
                conn = the_connection(proxy)
                assert conn._keepalive_handle is not None
                fake.gated = True
                writer.write(chat(stream=True))
                await reader.readuntil(b"\r\n\r\n")  # the stream's head: its body is piped
                assert conn._keepalive_handle is None
                for i in range(fake.sse_chunks + 1):
                    fake.gate(i).set()
                await reader.readuntil(b"0\r\n\r\n")  # the stream's end
                # Armed once aiohttp's handler loop is past the response: a few
                # turns of the event loop, no clock involved.
                for _ in range(1000):
                    if conn._keepalive_handle is not None:
                        break
                    await asyncio.sleep(0)
                assert conn._keepalive_handle is not None, "not armed again after the stream"
            assert not conn._force_close  # kept alive for the next request
        finally:
            writer.close()

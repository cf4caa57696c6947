"""The options of a client connection the proxy accepted, as ``oaimux serve``
listens (server/process.py, ``_listen``): keep-alive probes on, set once on
the listener rather than per connection by aiohttp, and Nagle off."""

from __future__ import annotations

import asyncio
import socket

from proxy.config import parse_settings
from proxy.server.app import create_app, server_options
from proxy.server.drain import ProxyRunner
from proxy.server.process import _listen
from tests.conftest import basic_config


async def test_an_accepted_connection_has_keepalive_probes_and_nagle_off() -> None:
    settings = parse_settings(basic_config("http://127.0.0.1:9/v1"), environ={})
    app = create_app(settings)
    runner = ProxyRunner(app, settings.server, handler_cancellation=True, **server_options())
    await runner.setup()
    assert server_options()["tcp_keepalive"] is False  # aiohttp's per-connection call is off
    try:
        await _listen(runner, settings, "127.0.0.1", 0, False)
        port = int(runner.addresses[0][1])
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            server = runner.server
            assert server is not None
            async with asyncio.timeout(5):
                while not server.guarded():
                    await asyncio.sleep(0.01)
            (conn,) = server.guarded()
            assert conn.transport is not None
            sock = conn.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        finally:
            writer.close()
    finally:
        await runner.cleanup()

"""Helpers for the security tests: a hostile upstream, raw sockets, a real proxy server.

- :class:`HostileUpstream` records every request (like ``FakeUpstream``) and
  answers in ways an upstream can hurt a proxy: identity headers and cookies,
  its own CORS headers, a redirect elsewhere, a 401 whose body quotes the key
  it was given (as OpenAI's does), headers named in ``Connection``.
- :func:`garbage_server` is a raw TCP server that answers every connection with
  fixed bytes (an invalid HTTP response), so aiohttp's client raises.
- :func:`running_proxy` runs the proxy exactly as ``oaimux serve`` does
  (``ProxyRunner`` with the server options) on a loopback port.
- :func:`exchange` writes raw bytes to a port and reads until the server closes
  the connection or the timeout passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from proxy.config import Settings
from proxy.server.app import create_app, server_options
from proxy.server.drain import ProxyRunner
from tests.fakes.upstream import Received

__all__ = [
    "HostileUpstream",
    "RunningProxy",
    "error_of",
    "exchange",
    "garbage_server",
    "running_proxy",
    "split_response",
]


@dataclass
class HostileUpstream:
    """``/v1/identity``, ``/v1/redirect``, ``/v1/refuse/{status}``; anything else echoes."""

    redirect_to: str = "http://127.0.0.1:9/elsewhere"
    # The echo shows the headers received; off for the canary sweep, where
    # an upstream reflecting its own key back would be the upstream's leak.
    echo_headers: bool = True
    received: list[Received] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(
            Received(
                method=request.method,
                path=request.path,
                query_string=request.query_string,
                headers={k.lower(): v for k, v in request.headers.items()},
                header_items=list(request.headers.items()),
                body=body,
            )
        )
        path = request.path
        if path.endswith("/identity"):
            resp = web.json_response({"ok": True})
            resp.headers.add("Set-Cookie", "__cf_bm=upstream-session; Path=/; HttpOnly")
            resp.headers.add("Set-Cookie", "other=1; Path=/")
            resp.headers["openai-organization"] = "org-upstream-secret"
            resp.headers["openai-project"] = "proj_upstream_secret"
            resp.headers["x-request-id"] = "req_upstream_1"
            resp.headers["Access-Control-Allow-Origin"] = "*"
            resp.headers["Access-Control-Allow-Credentials"] = "true"
            resp.headers["Connection"] = "X-Hop-Secret"
            resp.headers["X-Hop-Secret"] = "hop"
            resp.headers["X-Plain"] = "kept"
            return resp
        if path.endswith("/redirect"):
            return web.Response(status=302, headers={"Location": self.redirect_to}, text="moved")
        if "/refuse/" in path:
            status = int(path.rsplit("/", 1)[1])
            auth = request.headers.get("Authorization", "")
            key = auth.removeprefix("Bearer ")
            # OpenAI quotes the start and the end of the key it was given.
            quoted = f"{key[:8]}****{key[-4:]}" if key else "(none)"
            return web.json_response(
                {
                    "error": {
                        "message": f"Incorrect API key provided: {quoted}. Full key: {key}",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "invalid_api_key",
                    }
                },
                status=status,
            )
        return web.json_response(
            {
                "path": path,
                "query": request.query_string,
                "raw_query": request.raw_path.partition("?")[2],
                "headers": {k.lower(): v for k, v in request.headers.items()}
                if self.echo_headers
                else {},
                "body_len": len(body),
            }
        )


@contextlib.asynccontextmanager
async def garbage_server(answer: bytes) -> AsyncIterator[int]:
    """A TCP server on 127.0.0.1 that answers each connection with ``answer`` and closes."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


@dataclass
class RunningProxy:
    runner: ProxyRunner
    app: web.Application
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def running_proxy(settings: Settings, **runner_kwargs: Any) -> AsyncIterator[RunningProxy]:
    """The proxy served as ``oaimux serve`` serves it, on a free loopback port."""
    app = create_app(settings)
    runner = ProxyRunner(
        app, settings.server, handler_cancellation=True, **{**server_options(), **runner_kwargs}
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = int(runner.addresses[0][1])
    try:
        yield RunningProxy(runner, app, port)
    finally:
        await runner.cleanup()


async def exchange(
    port: int, data: bytes, timeout: float = 5.0, settle: float | None = None
) -> bytes:
    """Send ``data`` on a new connection; return everything read until EOF or ``timeout``.

    With ``settle``, stop once a whole response has arrived and nothing more
    came for ``settle`` seconds (a kept-alive connection then needs no timeout).
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        chunks: list[bytes] = []
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(timeout):
                while True:
                    wait = None
                    if settle is not None and _complete(
                        chunks[0] if len(chunks) == 1 else b"".join(chunks)
                    ):
                        wait = settle
                    try:
                        chunk = await asyncio.wait_for(reader.read(1 << 20), wait)
                    except TimeoutError:
                        break
                    if not chunk:
                        break
                    chunks.append(chunk)
        return b"".join(chunks)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def _complete(buf: bytes) -> bool:
    head, sep, body = buf.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names, last wins) and body of the first response in ``raw``."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = headers.get("content-length")
    if length is not None:
        body = body[: int(length)]
    return status, headers, body


def error_of(body: bytes) -> dict[str, Any]:
    """The ``error`` object of an OpenAI-shaped error body (asserts the shape)."""
    data = json.loads(body)
    assert set(data) == {"error"}, data
    assert set(data["error"]) == {"message", "type", "param", "code"}, data
    error: dict[str, Any] = data["error"]
    return error

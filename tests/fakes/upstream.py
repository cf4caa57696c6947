"""A fake OpenAI upstream, run in-process with ``aiohttp_server``.

It records every request it receives (method, path, query, headers, raw body)
and answers by path, so tests assert on what the upstream really got:

- ``POST .../chat/completions``: JSON, or SSE when the body asks ``"stream": true``;
  SSE chunks can be gated one by one (``FakeUpstream.gate``) so a test proves the
  first chunk reached the client before the second was sent.
- ``.../status/{n}``: answers status n with an OpenAI-shaped error body.
- ``.../slow``: never answers before ``release`` is set.
- ``.../hangup``: closes the connection without a response.
- ``.../binary``: a deterministic binary body of ``?size=`` bytes.
- ``.../echo`` and every other path: echo what was received, as JSON.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field

from aiohttp import web

__all__ = ["FakeUpstream", "Received", "binary_payload"]


@dataclass
class Received:
    method: str
    path: str
    query_string: str
    headers: dict[str, str]
    header_items: list[tuple[str, str]]
    body: bytes


def binary_payload(size: int) -> bytes:
    block = hashlib.sha256(b"oaimux").digest() * 2048  # 64 KiB, deterministic
    return (block * (size // len(block) + 1))[:size]


@dataclass
class FakeUpstream:
    received: list[Received] = field(default_factory=list)
    # SSE gating: chunk i is sent only after gate[i] is set (when gating is on).
    gated: bool = False
    gates: list[asyncio.Event] = field(default_factory=list)
    sse_chunks: int = 3
    release: asyncio.Event = field(default_factory=asyncio.Event)
    # Set when a streaming or slow handler notices its client (the proxy) left.
    upstream_closed: asyncio.Event = field(default_factory=asyncio.Event)
    handler_started: asyncio.Event = field(default_factory=asyncio.Event)
    status_override: int | None = None

    def gate(self, i: int) -> asyncio.Event:
        while len(self.gates) <= i:
            self.gates.append(asyncio.Event())
        return self.gates[i]

    @property
    def last(self) -> Received:
        return self.received[-1]

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
                query_string=request.raw_path.partition("?")[2],
                headers={k.lower(): v for k, v in request.headers.items()},
                header_items=list(request.headers.items()),
                body=body,
            )
        )
        self.handler_started.set()
        path = request.path
        if self.status_override is not None:
            return _error(self.status_override)
        if "/status/" in path:
            return _error(int(path.rsplit("/", 1)[1]))
        if path.endswith("/slow"):
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.upstream_closed.set()
                raise
            return web.json_response({"slow": True})
        if path.endswith("/hangup"):
            assert request.transport is not None
            request.transport.close()
            raise asyncio.CancelledError
        if path.endswith("/binary"):
            size = int(request.query.get("size", "1048576"))
            return web.Response(body=binary_payload(size), content_type="audio/mpeg")
        if path.endswith("/chat/completions"):
            try:
                data = json.loads(body)
            except ValueError:
                data = {}
            if isinstance(data, dict) and data.get("stream"):
                return await self._sse(request, str(data.get("model")))
            return web.json_response(
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "model": data.get("model") if isinstance(data, dict) else None,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "hi"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
                }
            )
        return web.json_response(
            {
                "method": request.method,
                "path": path,
                "query": request.query_string,
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "body_sha256": hashlib.sha256(body).hexdigest(),
                "body_len": len(body),
            }
        )

    async def _sse(self, request: web.Request, model: str) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i in range(self.sse_chunks):
                if self.gated:
                    await self.gate(i).wait()
                chunk = {
                    "id": "chatcmpl-1",
                    "object": "chat.completion.chunk",
                    "model": model,
                    "choices": [{"index": 0, "delta": {"content": f"tok{i}"}}],
                }
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            if self.gated:
                await self.gate(self.sse_chunks).wait()
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except (asyncio.CancelledError, ConnectionError):
            self.upstream_closed.set()
            raise
        return resp


def _error(status: int) -> web.Response:
    return web.json_response(
        {
            "error": {
                "message": f"upstream says {status}",
                "type": "server_error",
                "param": None,
                "code": None,
            }
        },
        status=status,
    )

"""A fake Anthropic Messages upstream, run in-process with ``aiohttp_server``.

It speaks the public wire format of ``POST /v1/messages`` (a Message as JSON,
or with ``"stream": true`` the SSE event flow ``message_start``, then per
content block ``content_block_start``, ``content_block_delta`` (``text_delta``)
and ``content_block_stop``, then ``message_delta`` carrying ``stop_reason`` and
the final ``usage.output_tokens``, then ``message_stop``; a ``ping`` comes after
the first block starts, as Anthropic's own streams show) and of
``POST /v1/messages/count_tokens`` (``{"input_tokens": n}``) and ``GET
/v1/models`` (Anthropic's list: ``data`` of ``{"type": "model", "id", ...}``,
``has_more``, ``first_id``, ``last_id``). Every other path answers Anthropic's
404 error shape.

Every request is recorded in :attr:`AnthropicMessages.received` (method, path,
query, headers, raw body), so a test asserts on what the upstream really got.
The reply's text names the fake and the model (:meth:`reply_text`), so a test
tells which upstream served a turn from the agent's output alone.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fakes.recorded import AgentUpstream, Received, hold_until_client_leaves

__all__ = ["AnthropicMessages", "Received", "sse_frame"]


def sse_frame(name: str, data: dict[str, Any]) -> bytes:
    """One server-sent event with a named ``event:`` line, as Anthropic frames them."""
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@dataclass
class AnthropicMessages(AgentUpstream):
    name: str = "anthropic"
    # The bytes of the last streamed answer, as written, for byte-for-byte checks.
    sent_stream: bytes = b""
    input_tokens: int = 25
    # Prompt-cache reads and writes reported beside input_tokens (which leaves them out).
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0
    # Keep a stream open after ``message_stop`` until the client leaves
    # (``hold_until_client_leaves``); ``held_stream_left`` tells it left.
    hold_after_stop: bool = False
    held_stream_left: asyncio.Event = field(default_factory=asyncio.Event)
    # When set, a stream waits for it after message_start: a relay that held
    # events back until more came would keep that first one from the client.
    after_start: asyncio.Event | None = None
    # What GET /v1/models lists.
    model_ids: tuple[str, ...] = ()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_post("/v1/messages/count_tokens", self.count_tokens)
        app.router.add_get("/v1/models", self.models)
        app.router.add_route("*", "/{tail:.*}", self.unknown)
        return app

    @property
    def messages_received(self) -> list[Received]:
        return [r for r in self.received if r.path == "/v1/messages"]

    def _authorized(self, received: Received) -> bool:
        """``api_key``, when set, is required as ``x-api-key`` (or ``Authorization: Bearer``)."""
        if self.api_key is None:
            return True
        return self.api_key in (
            received.headers.get("x-api-key"),
            received.headers.get("authorization", "").removeprefix("Bearer "),
        )

    async def unknown(self, request: web.Request) -> web.Response:
        await self._record(request)
        return _error(404, "not_found_error", f"Not found: {request.method} {request.path}")

    async def _checked_body(self, request: web.Request) -> dict[str, Any] | web.Response:
        received = await self._record(request)
        if not self._authorized(received):
            return _error(401, "authentication_error", "invalid x-api-key")
        try:
            doc = received.json()
        except ValueError:
            return _error(400, "invalid_request_error", "body is not a JSON object")
        if not isinstance(doc.get("model"), str) or not isinstance(doc.get("messages"), list):
            return _error(400, "invalid_request_error", "model and messages are required")
        return doc

    async def models(self, request: web.Request) -> web.Response:
        received = await self._record(request)
        if not self._authorized(received):
            return _error(401, "authentication_error", "invalid x-api-key")
        if "anthropic-version" not in received.headers:
            return _error(400, "invalid_request_error", "anthropic-version header is required")
        data = [
            {
                "type": "model",
                "id": model,
                "display_name": model,
                "created_at": "2026-01-01T00:00:00Z",
            }
            for model in self.model_ids
        ]
        first = self.model_ids[0] if self.model_ids else None
        last = self.model_ids[-1] if self.model_ids else None
        return web.json_response(
            {"data": data, "has_more": False, "first_id": first, "last_id": last}
        )

    async def count_tokens(self, request: web.Request) -> web.Response:
        doc = await self._checked_body(request)
        if isinstance(doc, web.Response):
            return doc
        return web.json_response({"input_tokens": self.input_tokens}, headers=self._ids())

    async def messages(self, request: web.Request) -> web.StreamResponse:
        doc = await self._checked_body(request)
        if isinstance(doc, web.Response):
            return doc
        model = doc["model"]
        deltas = self.reply_deltas(model)
        usage = {
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": self.cache_creation_tokens,
            "cache_read_input_tokens": self.cache_read_tokens,
            "output_tokens": len(deltas),
        }
        message: dict[str, Any] = {
            "id": f"msg_fake{len(self.received):04d}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": "".join(deltas)}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": usage,
        }
        if not doc.get("stream"):
            return web.json_response(message, headers=self._ids())
        return await self._stream(request, message, deltas)

    async def _stream(
        self, request: web.Request, message: dict[str, Any], deltas: list[str]
    ) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                **self._ids(),
            }
        )
        await resp.prepare(request)
        started = {
            **message,
            "content": [],
            "stop_reason": None,
            "usage": {**message["usage"], "output_tokens": 1},
        }
        frames = [
            sse_frame("message_start", {"type": "message_start", "message": started}),
            sse_frame(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            ),
            sse_frame("ping", {"type": "ping"}),
        ]
        frames += [
            sse_frame(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": d},
                },
            )
            for d in deltas
        ]
        frames += [
            sse_frame("content_block_stop", {"type": "content_block_stop", "index": 0}),
            sse_frame(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": message["usage"]["output_tokens"]},
                },
            ),
            sse_frame("message_stop", {"type": "message_stop"}),
        ]
        # One write per event: a relay that coalesced or held them would show.
        for i, frame in enumerate(frames):
            await resp.write(frame)
            if i == 0 and self.after_start is not None:
                async with asyncio.timeout(10):
                    await self.after_start.wait()
        self.sent_stream = b"".join(frames)
        if self.hold_after_stop:
            await hold_until_client_leaves(self.held_stream_left)
        await resp.write_eof()
        return resp

    def _ids(self) -> dict[str, str]:
        return {"request-id": f"req_{self.name}_{len(self.received):04d}"}


def _error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response(
        {"type": "error", "error": {"type": kind, "message": message}}, status=status
    )

"""An OpenAI stand-in whose answers report the token usage a test chooses,
and a byte tap that counts every byte sent to it.

:class:`UsageUpstream` answers ``POST .../chat/completions`` as OpenAI does:
JSON with a ``usage`` object, or an SSE stream whose last data event carries
``usage`` when the request asked for it (``stream_options.include_usage``);
``.../responses`` (``response.completed`` when streamed) and
``.../embeddings`` likewise. The usage reported is ``usage`` (``None``: the
answer carries none), and ``status`` other than 200 answers an OpenAI-shaped
error instead. Every request is counted, and its body kept.

:class:`ByteTap` sits between the proxy and the upstream on its own port and
counts the bytes the proxy sent, so a test can assert that a refused request
reached the upstream with no byte at all (not merely no whole request).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["ByteTap", "UsageUpstream", "usage"]


def usage(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    """A Chat Completions usage object, as OpenAI writes it."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    }


@dataclass
class UsageUpstream:
    usage: dict[str, Any] | None = field(default_factory=lambda: usage(5, 1))
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)  # sent on every answer
    requests: int = 0
    bodies: list[bytes] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_post("/v1/embeddings", self.embeddings)
        return app

    async def _read(self, request: web.Request) -> dict[str, Any]:
        body = await request.read()
        self.requests += 1
        self.bodies.append(body)
        data = json.loads(body)
        assert isinstance(data, dict)
        return data

    def _error(self) -> web.Response:
        return web.json_response(
            {
                "error": {
                    "message": "The server had an error while processing your request.",
                    "type": "server_error" if self.status >= 500 else "invalid_request_error",
                    "param": None,
                    "code": None,
                }
            },
            status=self.status,
            headers=self.headers,
        )

    async def chat(self, request: web.Request) -> web.StreamResponse:
        data = await self._read(request)
        if self.status != 200:
            return self._error()
        message = {"role": "assistant", "content": "ok", "refusal": None}
        if not data.get("stream"):
            answer: dict[str, Any] = {
                "id": "chatcmpl-tok",
                "object": "chat.completion",
                "created": 1,
                "model": data.get("model"),
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            }
            if self.usage is not None:
                answer["usage"] = self.usage
            answer["service_tier"] = "default"
            answer["system_fingerprint"] = "fp_tok"
            return web.json_response(answer, headers=self.headers)
        options = data.get("stream_options") or {}
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", **self.headers})
        await resp.prepare(request)
        for i, delta in enumerate(({"role": "assistant", "content": ""}, {"content": "ok"}, {})):
            chunk: dict[str, Any] = {
                "id": "chatcmpl-tok",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": data.get("model"),
                "choices": [
                    {"index": 0, "delta": delta, "finish_reason": "stop" if i == 2 else None}
                ],
            }
            if include_usage:
                chunk["usage"] = None
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if include_usage and self.usage is not None:
            final = {
                "id": "chatcmpl-tok",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": data.get("model"),
                "choices": [],
                "usage": self.usage,
            }
            await resp.write(f"data: {json.dumps(final)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    def _responses_usage(self) -> dict[str, Any] | None:
        if self.usage is None:
            return None
        prompt, completion = self.usage["prompt_tokens"], self.usage["completion_tokens"]
        cached = self.usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
        return {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion,
        }

    async def responses(self, request: web.Request) -> web.StreamResponse:
        data = await self._read(request)
        if self.status != 200:
            return self._error()
        response = {
            "id": "resp_tok",
            "object": "response",
            "created_at": 1,
            "status": "completed",
            "model": data.get("model"),
            "output": [
                {
                    "type": "message",
                    "id": "msg_tok",
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "ok", "annotations": []}],
                }
            ],
            "usage": self._responses_usage(),
            "user": None,
            "metadata": {},
        }
        if not data.get("stream"):
            return web.json_response(response, headers=self.headers)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", **self.headers})
        await resp.prepare(request)
        created = {**response, "status": "in_progress", "output": [], "usage": None}
        events = [
            ("response.created", {"type": "response.created", "sequence_number": 0,
                                  "response": created}),
            ("response.output_text.delta", {"type": "response.output_text.delta",
                                            "sequence_number": 1, "item_id": "msg_tok",
                                            "output_index": 0, "content_index": 0,
                                            "delta": "ok"}),
            ("response.completed", {"type": "response.completed", "sequence_number": 2,
                                    "response": response}),
        ]  # fmt: skip
        for name, event in events:
            await resp.write(f"event: {name}\ndata: {json.dumps(event)}\n\n".encode())
        await resp.write_eof()
        return resp

    async def embeddings(self, request: web.Request) -> web.Response:
        data = await self._read(request)
        if self.status != 200:
            return self._error()
        prompt = 0 if self.usage is None else self.usage["prompt_tokens"]
        return web.json_response(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                "model": data.get("model"),
                "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
            },
            headers=self.headers,
        )


class ByteTap:
    """A TCP relay in front of ``target_port`` that counts the bytes sent through it."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.bytes_in = 0  # bytes the proxy sent towards the upstream
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, count: bool) -> None:
            try:
                while data := await src.read(65536):
                    if count:
                        self.bytes_in += len(data)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        tasks = [
            asyncio.create_task(pump(reader, up_writer, True)),
            asyncio.create_task(pump(up_reader, writer, False)),
        ]
        self._tasks.update(tasks)
        for task in tasks:
            task.add_done_callback(self._tasks.discard)
        await asyncio.gather(*tasks)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

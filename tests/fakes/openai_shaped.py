"""Responses shaped like OpenAI's own, byte for byte in layout, for usage and id tests.

The non-streaming body is pretty-printed with two-space indents and ends with
``service_tier`` and ``system_fingerprint`` after ``usage``, as the API sends
it. Streams carry ``"usage": null`` on every chunk and the usage in one last
chunk with empty ``choices`` only when ``stream_options.include_usage`` was
asked; without it the chunks have no ``usage`` key at all. Every answer has
the upstream's own ``x-request-id``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = [
    "CHAT_USAGE",
    "RESPONSES_USAGE",
    "STREAM_USAGE",
    "OpenAIShaped",
    "chat_completion_body",
    "chat_stream_events",
    "responses_body",
]

CHAT_USAGE = (1117, 46)
STREAM_USAGE = (9, 2)
RESPONSES_USAGE = (36, 87)


def chat_completion_body(model: str, content: str = "The image shows a wooden boardwalk.") -> bytes:
    body = {
        "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        "object": "chat.completion",
        "created": 1741570283,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": content,
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": CHAT_USAGE[0],
            "completion_tokens": CHAT_USAGE[1],
            "total_tokens": sum(CHAT_USAGE),
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "service_tier": "default",
        "system_fingerprint": "fp_fc9f1d7035",
    }
    return json.dumps(body, indent=2, ensure_ascii=False).encode()


def chat_stream_events(
    model: str, include_usage: bool, words: tuple[str, ...] = ("Hello", "!")
) -> list[bytes]:
    """The SSE events of a streamed chat completion, each ``data: ...\\n\\n``."""
    base: dict[str, Any] = {
        "id": "chatcmpl-123",
        "object": "chat.completion.chunk",
        "created": 1694268190,
        "model": model,
        "service_tier": "default",
        "system_fingerprint": "fp_44709d6fcb",
    }

    def chunk(choices: list[dict[str, Any]], usage: object = "absent") -> bytes:
        data = dict(base, choices=choices)
        if include_usage:
            data["usage"] = usage if usage != "absent" else None
        return (
            b"data: "
            + json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
            + b"\n\n"
        )

    events = [
        chunk(
            [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": "", "refusal": None},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ]
        )
    ]
    for word in words:
        events.append(
            chunk(
                [{"index": 0, "delta": {"content": word}, "logprobs": None, "finish_reason": None}]
            )
        )
    events.append(chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]))
    if include_usage:
        events.append(
            chunk(
                [],
                {
                    "prompt_tokens": STREAM_USAGE[0],
                    "completion_tokens": STREAM_USAGE[1],
                    "total_tokens": sum(STREAM_USAGE),
                    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                    "completion_tokens_details": {
                        "reasoning_tokens": 0,
                        "audio_tokens": 0,
                        "accepted_prediction_tokens": 0,
                        "rejected_prediction_tokens": 0,
                    },
                },
            )
        )
    events.append(b"data: [DONE]\n\n")
    return events


def responses_body(model: str) -> bytes:
    body = {
        "id": "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b",
        "object": "response",
        "created_at": 1741476542,
        "status": "completed",
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "max_output_tokens": None,
        "model": model,
        "output": [
            {
                "type": "message",
                "id": "msg_67ccd2bf17f0819081ff3bb2cf6508e60bb6a6b452d3795b",
                "status": "completed",
                "role": "assistant",
                "content": [
                    {"type": "output_text", "text": "In a peaceful grove...", "annotations": []}
                ],
            }
        ],
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": True,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": {
            "input_tokens": RESPONSES_USAGE[0],
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": RESPONSES_USAGE[1],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": sum(RESPONSES_USAGE),
        },
        "user": None,
        "metadata": {},
    }
    return json.dumps(body, indent=2, ensure_ascii=False).encode()


@dataclass
class OpenAIShaped:
    """An in-process upstream answering like OpenAI. ``request_ids`` records the
    ``X-Request-Id`` each request arrived with; every answer carries its own
    ``x-request-id`` (``req_<n>``)."""

    request_ids: list[str | None] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/responses", self.responses)
        return app

    def _headers(self, request: web.Request) -> dict[str, str]:
        self.request_ids.append(request.headers.get("X-Request-Id"))
        return {"x-request-id": f"req_{len(self.request_ids)}", "openai-processing-ms": "321"}

    async def chat(self, request: web.Request) -> web.StreamResponse:
        data = await request.json()
        headers = self._headers(request)
        model = str(data.get("model"))
        if not data.get("stream"):
            return web.Response(
                body=chat_completion_body(model), content_type="application/json", headers=headers
            )
        include = bool((data.get("stream_options") or {}).get("include_usage"))
        resp = web.StreamResponse(
            headers={**headers, "Content-Type": "text/event-stream; charset=utf-8"}
        )
        await resp.prepare(request)
        for event in chat_stream_events(model, include):
            await resp.write(event)
        await resp.write_eof()
        return resp

    async def responses(self, request: web.Request) -> web.Response:
        data = await request.json()
        return web.Response(
            body=responses_body(str(data.get("model"))),
            content_type="application/json",
            headers=self._headers(request),
        )

"""What the fake agent upstreams share (anthropic_messages.py, openai_responses.py):
a received request as recorded, the fake's name in its replies, and holding a
finished stream open until the client leaves."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["HOLD_SECONDS", "AgentUpstream", "Received", "hold_until_client_leaves", "record"]

HOLD_SECONDS = 10.0


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    query_string: str
    headers: dict[str, str]  # names lower-cased; a repeated name keeps its last value
    header_names: tuple[str, ...]  # as sent, in order, repeats kept
    body: bytes

    def json(self) -> dict[str, Any]:
        doc = json.loads(self.body)
        if not isinstance(doc, dict):
            raise ValueError("the body is not a JSON object")
        return doc


async def record(request: web.Request) -> Received:
    return Received(
        method=request.method,
        path=request.path,
        query_string=request.raw_path.partition("?")[2],
        headers={k.lower(): v for k, v in request.headers.items()},
        header_names=tuple(request.headers.keys()),
        body=await request.read(),
    )


@dataclass
class AgentUpstream:
    """A fake agent upstream: every request it got, as received, and replies
    that name it and the model, so a test tells from an agent's output alone
    which upstream served a turn."""

    name: str
    api_key: str | None = None  # when set, required (each fake's _authorized says how)
    received: list[Received] = field(default_factory=list)

    def reply_text(self, model: str) -> str:
        return f"Hello from {self.name} as {model}."

    def reply_deltas(self, model: str) -> list[str]:
        """The reply in the pieces streamed as text deltas (several, never one)."""
        words = self.reply_text(model).split(" ")
        return [w if i == 0 else " " + w for i, w in enumerate(words)]

    async def _record(self, request: web.Request) -> Received:
        received = await record(request)
        self.received.append(received)
        return received


async def hold_until_client_leaves(left: asyncio.Event) -> None:
    """Keep a response open after its last event until the client leaves (at
    most HOLD_SECONDS), as a slow network keeps a body's end behind its last
    event. ``left`` is set when the client went away: the server (aiohttp's
    ``TestServer``, with ``handler_cancellation``) cancels the handler then."""
    try:
        await asyncio.sleep(HOLD_SECONDS)
    except asyncio.CancelledError:
        left.set()
        raise

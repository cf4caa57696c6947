"""What the fake agent upstreams share: a received request as recorded, and
holding a finished stream open until the client leaves."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web

__all__ = ["HOLD_SECONDS", "Received", "hold_until_client_leaves", "record"]

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

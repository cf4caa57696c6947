"""A fake OpenAI Responses upstream, over HTTP SSE and over its WebSocket.

Run in-process with ``aiohttp_server(OpenAIResponses().app())``. It speaks the
public wire formats:

- ``POST /v1/responses`` with ``"stream": true``: SSE with named ``event:``
  lines, ``response.created``, ``response.in_progress``,
  ``response.output_item.added``, ``response.content_part.added``, several
  ``response.output_text.delta``, ``response.output_text.done``,
  ``response.content_part.done``, ``response.output_item.done`` and
  ``response.completed`` carrying ``usage`` (each with its ``sequence_number``);
  without ``stream``, the Response object as JSON.
- ``GET /v1/responses`` upgraded to a WebSocket: every text frame is a
  ``response.create`` event (the request body's fields at the top level); the
  answer is the same events, one JSON text frame each. ``"generate": false``
  (Codex's prewarm) answers ``response.created`` then ``response.completed``
  with no output. ``previous_response_id`` must name a response made earlier
  on the same connection (with ``store: false`` the server keeps it only in
  the memory of the socket that made it), else an ``error`` event, code
  ``previous_response_not_found``.
  :attr:`ws_refuse` answers the upgrade with that HTTP status instead.

What it received is recorded: HTTP requests in :attr:`received`, each
WebSocket connection (its handshake and its frames) in :attr:`connections`.
The reply's text names the fake and the model (:meth:`reply_text`).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from tests.fakes.recorded import AgentUpstream, Received, hold_until_client_leaves

__all__ = ["OpenAIResponses", "Received", "WsConnection"]

WS_MAX_MESSAGE = 32 * 1024**2


@dataclass
class WsConnection:
    handshake: Received
    frames: list[str] = field(default_factory=list)  # text frames the client sent
    response_ids: list[str] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(f) for f in self.frames]


@dataclass
class OpenAIResponses(AgentUpstream):
    name: str = "openai"
    connections: list[WsConnection] = field(default_factory=list)
    ws_refuse: int | None = None
    # Keep an SSE stream open after ``response.completed`` until the client
    # leaves (``hold_until_client_leaves``); ``held_stream_left`` tells it left.
    hold_after_completed: bool = False
    held_stream_left: asyncio.Event = field(default_factory=asyncio.Event)
    turns_completed: int = 0
    _made: int = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_post("/v1/responses", self.create)
        app.router.add_get("/v1/responses", self.websocket)
        app.router.add_get("/v1/models", self.models)
        app.router.add_route("*", "/{tail:.*}", self.unknown)
        return app

    def _authorized(self, received: Received) -> bool:
        """``api_key``, when set, is required as ``Authorization: Bearer``."""
        if self.api_key is None:
            return True
        return received.headers.get("authorization") == f"Bearer {self.api_key}"

    async def unknown(self, request: web.Request) -> web.Response:
        await self._record(request)
        return _error(
            404,
            "invalid_request_error",
            "unknown_url",
            f"Unknown request URL: {request.method} {request.path}.",
        )

    async def models(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {"id": "gpt-5-codex", "object": "model", "created": 0, "owned_by": self.name}
                ],
            }
        )

    # -- the turn, as events -----------------------------------------------

    def _response(self, doc: dict[str, Any], status: str) -> dict[str, Any]:
        return {
            "id": "",
            "object": "response",
            "created_at": 1767225600,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": None,
            "model": doc.get("model"),
            "output": [],
            "parallel_tool_calls": True,
            "previous_response_id": doc.get("previous_response_id"),
            "store": bool(doc.get("store", False)),
            "tool_choice": "auto",
            "tools": [],
            "usage": None,
        }

    def turn_events(self, doc: dict[str, Any]) -> list[dict[str, Any]]:
        """The events of one turn for request ``doc``, in order, numbered."""
        self._made += 1
        response_id = f"resp_{self.name}_{self._made:04d}"
        model = str(doc.get("model"))
        base = {**self._response(doc, "in_progress"), "id": response_id}
        events: list[dict[str, Any]] = [
            {"type": "response.created", "response": base},
            {"type": "response.in_progress", "response": base},
        ]
        done = {**base, "status": "completed"}
        if doc.get("generate") is False:
            done["usage"] = _usage(0, 0)
            events.append({"type": "response.completed", "response": done})
            return _numbered(events)
        item_id = f"msg_{self.name}_{self._made:04d}"
        deltas = self.reply_deltas(model)
        text = "".join(deltas)
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        item = {
            "id": item_id,
            "type": "message",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        at = {"item_id": item_id, "output_index": 0, "content_index": 0}
        events += [
            {"type": "response.output_item.added", "output_index": 0, "item": item},
            {"type": "response.content_part.added", **at, "part": part},
        ]
        events += [
            {"type": "response.output_text.delta", **at, "delta": d, "logprobs": []} for d in deltas
        ]
        full_part = {**part, "text": text}
        full_item = {**item, "status": "completed", "content": [full_part]}
        events += [
            {"type": "response.output_text.done", **at, "text": text, "logprobs": []},
            {"type": "response.content_part.done", **at, "part": full_part},
            {"type": "response.output_item.done", "output_index": 0, "item": full_item},
        ]
        done["output"] = [full_item]
        done["usage"] = _usage(len(json.dumps(doc.get("input", ""))) // 4, len(deltas))
        events.append({"type": "response.completed", "response": done})
        return _numbered(events)

    # -- HTTP --------------------------------------------------------------

    async def create(self, request: web.Request) -> web.StreamResponse:
        received = await self._record(request)
        if not self._authorized(received):
            return _error(
                401, "invalid_request_error", "invalid_api_key", "Incorrect API key provided."
            )
        try:
            doc = received.json()
        except ValueError:
            return _error(400, "invalid_request_error", None, "We could not parse the JSON body.")
        events = self.turn_events(doc)
        if not doc.get("stream"):
            return web.json_response(events[-1]["response"])
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        for event in events:
            await resp.write(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode())
        self.turns_completed += 1
        if self.hold_after_completed:
            await hold_until_client_leaves(self.held_stream_left)
        await resp.write_eof()
        return resp

    # -- WebSocket ---------------------------------------------------------

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        received = await self._record(request)
        if self.ws_refuse is not None:
            return _error(
                self.ws_refuse, "invalid_request_error", None, "WebSocket refused by the fake"
            )
        if not self._authorized(received):
            return _error(
                401, "invalid_request_error", "invalid_api_key", "Incorrect API key provided."
            )
        ws = web.WebSocketResponse(max_msg_size=WS_MAX_MESSAGE)
        if not ws.can_prepare(request).ok:
            return _error(
                405, "invalid_request_error", None, "GET /v1/responses needs a WebSocket upgrade"
            )
        await ws.prepare(request)
        conn = WsConnection(handshake=received)
        self.connections.append(conn)
        try:
            async for msg in ws:
                if msg.type is not WSMsgType.TEXT:
                    await ws.close(code=1003, message=b"text frames only")
                    break
                conn.frames.append(msg.data)
                for event in self._answer_frame(conn, msg.data):
                    await ws.send_str(json.dumps(event))
        finally:
            conn.closed.set()
        return ws

    def _answer_frame(self, conn: WsConnection, text: str) -> list[dict[str, Any]]:
        try:
            doc = json.loads(text)
        except ValueError:
            return [_ws_error(400, None, "Invalid JSON in the WebSocket message.")]
        if not isinstance(doc, dict) or doc.get("type") != "response.create":
            return [_ws_error(400, "unknown_event", "Expected a response.create event.")]
        doc = {**doc.get("response", {}), **doc} if isinstance(doc.get("response"), dict) else doc
        previous = doc.get("previous_response_id")
        if previous is not None and previous not in conn.response_ids:
            return [
                _ws_error(
                    400,
                    "previous_response_not_found",
                    f"Previous response with id '{previous}' not found.",
                )
            ]
        events = self.turn_events(doc)
        conn.response_ids.append(events[0]["response"]["id"])
        if doc.get("generate") is not False:
            self.turns_completed += 1
        return events


def _numbered(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**e, "sequence_number": i} for i, e in enumerate(events)]


def _usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def _error(status: int, kind: str, code: str | None, message: str) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": kind, "param": None, "code": code}}, status=status
    )


def _ws_error(status: int, code: str | None, message: str) -> dict[str, Any]:
    return {
        "type": "error",
        "status": status,
        "error": {"type": "invalid_request_error", "code": code, "message": message, "param": None},
    }

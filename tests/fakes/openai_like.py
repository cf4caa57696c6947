"""A richer fake OpenAI upstream: every family the surface tests need, real-shaped.

Run in-process with ``aiohttp_server(OpenAILike().app())``. Bodies are built
once and kept in :attr:`OpenAILike.sent` (path → bytes of the last response),
so a test can compare what the client got with what the upstream sent, hash
for hash. What the upstream received is in :attr:`OpenAILike.received`.

Families (all under ``/v1``):

- ``GET /models`` (ids from :attr:`models`; :attr:`models_status` makes it fail);
- ``POST /chat/completions``: JSON; SSE when ``"stream": true``; with
  ``"modalities": ["text", "audio"]`` the reply carries ``audio_bytes`` of
  base64 WAV-like data (several MB by default);
- ``POST /embeddings``, ``POST /images/generations`` (``b64_json``),
  ``POST /audio/speech`` (streamed ``audio/mpeg`` in chunks),
  ``POST /audio/transcriptions`` (multipart; answers the file's size and hash);
- ``POST /responses``: a Response object, or SSE with named ``event:`` lines;
- files (multipart upload read as a stream, list, get, content, delete),
  and create/list/get/delete for batches, uploads (with parts and complete),
  vector_stores, assistants, threads;
- ``GET /realtime``: a WebSocket server that records every message and close,
  echoes text and binary, answers pings with pongs (autoping off, so the
  pings and pongs seen are the client's own); :attr:`ws_script` replaces it.

A model id ``fail-<status>`` makes the model endpoints answer that status
with OpenAI's error JSON (``fail-429`` carries ``Retry-After: 0``).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

__all__ = ["OpenAILike", "Received", "WsEvent", "audio_blob"]


@dataclass
class Received:
    method: str
    path: str
    query_string: str
    headers: dict[str, str]
    body_sha256: str
    body_len: int
    body: bytes  # kept only up to 1 MiB (uploads are hashed, not kept)


@dataclass
class WsEvent:
    kind: str  # "text" | "binary" | "ping" | "pong" | "close"
    data: bytes
    extra: str | None = None  # close reason


def audio_blob(size: int) -> bytes:
    """Deterministic bytes standing in for WAV audio."""
    block = hashlib.sha256(b"audio").digest() * 4096  # 128 KiB
    return (block * (size // len(block) + 1))[:size]


WsScript = Callable[[web.WebSocketResponse, web.Request], Awaitable[None]]


@dataclass
class OpenAILike:
    name: str = "upstream"
    models: list[str] = field(default_factory=lambda: ["gpt-4o-mini"])
    models_status: int = 200
    audio_bytes: int = 3 * 1024 * 1024
    received: list[Received] = field(default_factory=list)
    sent: dict[str, bytes] = field(default_factory=dict)
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    models_asked: int = 0
    # Set when the first bytes of a streamed upload reached this upstream.
    upload_started: asyncio.Event = field(default_factory=asyncio.Event)
    # WebSocket side.
    ws_events: list[WsEvent] = field(default_factory=list)
    ws_event: asyncio.Event = field(default_factory=asyncio.Event)
    ws_connected: asyncio.Event = field(default_factory=asyncio.Event)
    ws_closed: asyncio.Event = field(default_factory=asyncio.Event)
    ws_current: web.WebSocketResponse | None = None
    ws_request: Received | None = None
    ws_protocol: str | None = None
    ws_script: WsScript | None = None
    ws_refuse: int | None = None  # answer the handshake with this HTTP status

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024**3)
        r = app.router
        r.add_get("/v1/models", self.list_models)
        r.add_get("/v1/realtime", self.realtime)
        r.add_post("/v1/chat/completions", self.chat)
        r.add_post("/v1/embeddings", self.embeddings)
        r.add_post("/v1/images/generations", self.images)
        r.add_post("/v1/audio/speech", self.speech)
        r.add_post("/v1/audio/transcriptions", self.transcriptions)
        r.add_post("/v1/responses", self.responses)
        r.add_post("/v1/files", self.upload_file)
        r.add_get("/v1/files/{id}/content", self.file_content)
        r.add_post("/v1/uploads/{id}/parts", self.upload_part)
        r.add_post("/v1/uploads/{id}/complete", self.upload_complete)
        for family in ("files", "batches", "uploads", "vector_stores", "assistants", "threads"):
            if family != "files":
                r.add_post(f"/v1/{family}", self.create)
            r.add_get(f"/v1/{family}", self.list_objects)
            r.add_get(f"/v1/{family}/{{id}}", self.get_object)
            r.add_delete(f"/v1/{family}/{{id}}", self.delete_object)
        r.add_route("*", "/{tail:.*}", self.unknown)
        return app

    async def unknown(self, request: web.Request) -> web.Response:
        await self._record(request)
        return self._json(
            request,
            {
                "error": {
                    "message": f"Unknown request URL: {request.method} {request.path}.",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "unknown_url",
                }
            },
            404,
        )

    # -- recording -----------------------------------------------------------

    async def _record(self, request: web.Request, *, stream: bool = False) -> bytes:
        """Read (or, for uploads, hash as it streams in) and record the request."""
        digest = hashlib.sha256()
        kept = bytearray()
        size = 0
        if stream:
            async for chunk in request.content.iter_any():
                self.upload_started.set()
                digest.update(chunk)
                size += len(chunk)
                if len(kept) < 1 << 20:
                    kept += chunk[: (1 << 20) - len(kept)]
            body = bytes(kept)
        else:
            body = await request.read()
            digest.update(body)
            size = len(body)
        self.received.append(
            Received(
                method=request.method,
                path=request.path,
                query_string=request.raw_path.partition("?")[2],
                headers={k.lower(): v for k, v in request.headers.items()},
                body_sha256=digest.hexdigest(),
                body_len=size,
                body=body,
            )
        )
        return body

    @property
    def last(self) -> Received:
        return self.received[-1]

    def _send(self, request: web.Request, payload: bytes, content_type: str) -> web.Response:
        self.sent[request.path] = payload
        return web.Response(
            body=payload,
            content_type=content_type,
            headers={"x-request-id": f"req_{self.name}_{len(self.received)}"},
        )

    def _json(self, request: web.Request, doc: Any, status: int = 200) -> web.Response:
        resp = self._send(request, json.dumps(doc).encode(), "application/json")
        resp.set_status(status)
        return resp

    def _failure(self, request: web.Request, model: object) -> web.Response | None:
        if isinstance(model, str) and model.startswith("fail-"):
            status = int(model[5:])
            resp = self._json(
                request,
                {
                    "error": {
                        "message": f"{self.name} says {status}",
                        "type": "server_error" if status >= 500 else "invalid_request_error",
                        "param": None,
                        "code": None,
                    }
                },
                status,
            )
            if status == 429:
                resp.headers["Retry-After"] = "0"
            return resp
        return None

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        body = await self._record(request)
        try:
            doc = json.loads(body)
        except ValueError:
            return {}
        return doc if isinstance(doc, dict) else {}

    # -- models --------------------------------------------------------------

    async def list_models(self, request: web.Request) -> web.Response:
        await self._record(request)
        self.models_asked += 1
        if self.models_status != 200:
            return self._json(request, {"error": {"message": "down"}}, self.models_status)
        data = [
            {"id": m, "object": "model", "created": 1700000000, "owned_by": self.name}
            for m in self.models
        ]
        return self._json(request, {"object": "list", "data": data})

    # -- model endpoints -----------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        doc = await self._json_body(request)
        model = doc.get("model")
        if (failed := self._failure(request, model)) is not None:
            return failed
        if doc.get("stream"):
            return await self._chat_stream(request, str(model))
        message: dict[str, Any] = {"role": "assistant", "content": f"hello from {self.name}"}
        if "audio" in (doc.get("modalities") or []):
            message["content"] = None
            message["audio"] = {
                "id": "audio_abc123",
                "data": base64.b64encode(audio_blob(self.audio_bytes)).decode(),
                "expires_at": 1729018505,
                "transcript": "Hello there.",
            }
        return self._json(
            request,
            {
                "id": "chatcmpl-abc123",
                "object": "chat.completion",
                "created": 1700000000,
                "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21},
            },
        )

    async def _chat_stream(self, request: web.Request, model: str) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        sent = bytearray()
        # As OpenAI streams it: one delta per event, then an empty delta carrying
        # finish_reason (litellm, for one, treats a stream without it as cut off).
        words: list[str | None] = ["Hel", "lo", " there", "!", None]
        for i, word in enumerate(words):
            delta: dict[str, str] = {"role": "assistant"} if i == 0 else {}
            if word is not None:
                delta["content"] = word
            chunk = {
                "id": "chatcmpl-abc123",
                "object": "chat.completion.chunk",
                "created": 1700000000,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "delta": delta,
                        "finish_reason": "stop" if word is None else None,
                    }
                ],
            }
            line = f"data: {json.dumps(chunk)}\n\n".encode()
            sent += line
            await resp.write(line)
        done = b"data: [DONE]\n\n"
        sent += done
        await resp.write(done)
        await resp.write_eof()
        self.sent[request.path] = bytes(sent)
        return resp

    async def embeddings(self, request: web.Request) -> web.Response:
        doc = await self._json_body(request)
        if (failed := self._failure(request, doc.get("model"))) is not None:
            return failed
        inputs = doc.get("input")
        items = inputs if isinstance(inputs, list) else [inputs]
        vectors = [[0.001 * i, -0.5, 0.25] for i in range(len(items))]
        encoded: list[Any] = vectors
        if doc.get("encoding_format") == "base64":
            # What the official SDKs ask for by default: little-endian float32.
            encoded = [base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() for v in vectors]
        return self._json(
            request,
            {
                "object": "list",
                "data": [
                    {"object": "embedding", "index": i, "embedding": e}
                    for i, e in enumerate(encoded)
                ],
                "model": doc.get("model"),
                "usage": {"prompt_tokens": 4, "total_tokens": 4},
            },
        )

    async def images(self, request: web.Request) -> web.Response:
        doc = await self._json_body(request)
        if (failed := self._failure(request, doc.get("model"))) is not None:
            return failed
        png = b"\x89PNG\r\n\x1a\n" + audio_blob(4096)
        return self._json(
            request,
            {"created": 1700000000, "data": [{"b64_json": base64.b64encode(png).decode()}]},
        )

    async def speech(self, request: web.Request) -> web.StreamResponse:
        doc = await self._json_body(request)
        if (failed := self._failure(request, doc.get("model"))) is not None:
            return failed
        audio = audio_blob(256 * 1024)
        resp = web.StreamResponse(headers={"Content-Type": "audio/mpeg"})
        await resp.prepare(request)
        for i in range(0, len(audio), 16 * 1024):
            await resp.write(audio[i : i + 16 * 1024])
        await resp.write_eof()
        self.sent[request.path] = audio
        return resp

    async def transcriptions(self, request: web.Request) -> web.Response:
        await self._record(request)
        received = self.last
        form = await _multipart_fields(request, received.body)
        if (failed := self._failure(request, form.get("model", b"").decode())) is not None:
            return failed
        audio = form.get("file", b"")
        return self._json(
            request,
            {"text": f"{len(audio)} bytes, sha256 {hashlib.sha256(audio).hexdigest()}"},
        )

    async def responses(self, request: web.Request) -> web.StreamResponse:
        doc = await self._json_body(request)
        model = doc.get("model")
        if (failed := self._failure(request, model)) is not None:
            return failed
        response = {
            "id": "resp_67ccd2bed1ec8190b14f964abc054267",
            "object": "response",
            "created_at": 1741476542,
            "status": "completed",
            "model": model,
            "output": [
                {
                    "type": "message",
                    "id": "msg_67ccd2bf17f0819081ff3bb2cf6508e6",
                    "status": "completed",
                    "role": "assistant",
                    "content": [
                        {"type": "output_text", "text": "In a peaceful grove...", "annotations": []}
                    ],
                }
            ],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": {"input_tokens": 36, "output_tokens": 87, "total_tokens": 123},
        }
        if not doc.get("stream"):
            return self._json(request, response)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        in_progress = {**response, "status": "in_progress", "output": []}
        events: list[tuple[str, dict[str, Any]]] = [
            ("response.created", {"response": in_progress}),
            ("response.in_progress", {"response": in_progress}),
        ]
        for i, delta in enumerate(["In a ", "peaceful ", "grove..."]):
            events.append(
                (
                    "response.output_text.delta",
                    {
                        "item_id": "msg_67ccd2bf17f0819081ff3bb2cf6508e6",
                        "output_index": 0,
                        "content_index": 0,
                        "delta": delta,
                        "sequence_number": i,
                    },
                )
            )
        events.append(("response.completed", {"response": response}))
        sent = bytearray()
        for seq, (name, data) in enumerate(events):
            frame = f"event: {name}\ndata: {json.dumps({'type': name, 'sequence_number': seq, **data})}\n\n"
            sent += frame.encode()
            await resp.write(frame.encode())
        await resp.write_eof()
        self.sent[request.path] = bytes(sent)
        return resp

    # -- files, batches, uploads and the other families -----------------------

    async def upload_file(self, request: web.Request) -> web.Response:
        await self._record(request, stream=True)
        received = self.last
        file_id = f"file-{len(self.objects) + 1:04d}"
        obj = {
            "id": file_id,
            "object": "file",
            "bytes": received.body_len,
            "created_at": int(time.time()),
            "filename": "upload.jsonl",
            "purpose": "batch",
            "sha256_of_request": received.body_sha256,
        }
        self.objects[file_id] = obj
        return self._json(request, obj)

    async def file_content(self, request: web.Request) -> web.Response:
        await self._record(request)
        if request.match_info["id"] not in self.objects:
            return self._json(request, {"error": {"message": "No such File object"}}, 404)
        return self._send(request, b'{"custom_id": "request-1"}\n', "application/octet-stream")

    async def upload_part(self, request: web.Request) -> web.Response:
        await self._record(request, stream=True)
        part_id = f"part_{len(self.received)}"
        return self._json(
            request,
            {
                "id": part_id,
                "object": "upload.part",
                "upload_id": request.match_info["id"],
                "bytes": self.last.body_len,
            },
        )

    async def upload_complete(self, request: web.Request) -> web.Response:
        doc = await self._json_body(request)
        upload = self.objects.get(request.match_info["id"])
        if upload is None:
            return self._json(request, {"error": {"message": "No such Upload"}}, 404)
        upload = {**upload, "status": "completed", "part_ids": doc.get("part_ids", [])}
        return self._json(request, upload)

    async def create(self, request: web.Request) -> web.Response:
        doc = await self._json_body(request)
        family = request.path.split("/")[2]
        kind = {"batches": "batch", "vector_stores": "vector_store"}.get(family, family[:-1])
        obj_id = f"{kind}_{len(self.objects) + 1:04d}"
        obj = {"id": obj_id, "object": kind, "created_at": 1700000000, **doc}
        if kind == "batch":
            obj["status"] = "validating"
        self.objects[obj_id] = obj
        return self._json(request, obj)

    async def list_objects(self, request: web.Request) -> web.Response:
        await self._record(request)
        family = request.path.split("/")[2]
        prefix = {"files": "file-", "batches": "batch_", "vector_stores": "vector_store_"}.get(
            family, family[:-1] + "_"
        )
        data = [o for k, o in self.objects.items() if k.startswith(prefix)]
        return self._json(request, {"object": "list", "data": data, "has_more": False})

    async def get_object(self, request: web.Request) -> web.Response:
        await self._record(request)
        obj = self.objects.get(request.match_info["id"])
        if obj is None:
            return self._json(
                request,
                {"error": {"message": "not found", "type": "invalid_request_error"}},
                404,
            )
        return self._json(request, obj)

    async def delete_object(self, request: web.Request) -> web.Response:
        await self._record(request)
        obj = self.objects.pop(request.match_info["id"], None)
        if obj is None:
            return self._json(request, {"error": {"message": "not found"}}, 404)
        return self._json(
            request, {"id": obj["id"], "object": f"{obj['object']}.deleted", "deleted": True}
        )

    # -- realtime ------------------------------------------------------------

    async def realtime(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        self.ws_request = self.last
        if self.ws_refuse is not None:
            return self._json(request, {"error": {"message": "refused"}}, self.ws_refuse)
        model = request.query.get("model", "")
        if model.startswith("fail-"):
            failed = self._failure(request, model)
            assert failed is not None
            return failed
        ws = web.WebSocketResponse(
            protocols=("realtime",),
            autoping=False,
            autoclose=False,
            max_msg_size=64 * 1024 * 1024,
            decode_text=False,
        )
        await ws.prepare(request)
        self.ws_current = ws
        self.ws_protocol = ws.ws_protocol
        self.ws_connected.set()
        try:
            if self.ws_script is not None:
                await self.ws_script(ws, request)
            else:
                await self._echo(ws)
        finally:
            self.ws_closed.set()
        return ws

    def _note(self, event: WsEvent) -> None:
        self.ws_events.append(event)
        self.ws_event.set()

    async def _echo(self, ws: web.WebSocketResponse) -> None:
        while True:
            msg = await ws.receive()
            if msg.type is WSMsgType.TEXT:
                self._note(WsEvent("text", msg.data))
                await ws.send_frame(msg.data, WSMsgType.TEXT)
            elif msg.type is WSMsgType.BINARY:
                self._note(WsEvent("binary", msg.data))
                await ws.send_bytes(msg.data)
            elif msg.type is WSMsgType.PING:
                self._note(WsEvent("ping", msg.data))
                await ws.pong(msg.data)
            elif msg.type is WSMsgType.PONG:
                self._note(WsEvent("pong", msg.data))
            elif msg.type is WSMsgType.CLOSE:
                self._note(WsEvent("close", str(msg.data).encode(), msg.extra))
                await ws.close(code=msg.data, message=b"")
                return
            else:
                self._note(WsEvent(msg.type.name.lower(), b""))
                return

    async def wait_events(self, count: int, timeout: float = 5.0) -> list[WsEvent]:
        """The WebSocket events once there are at least ``count`` (bounded wait)."""
        async with asyncio.timeout(timeout):
            while len(self.ws_events) < count:
                self.ws_event.clear()
                await self.ws_event.wait()
        return self.ws_events


async def _multipart_fields(request: web.Request, body: bytes) -> dict[str, bytes]:
    """The fields of a multipart body already read (a plain split: enough for a fake)."""
    boundary = request.content_type and request.headers["Content-Type"].split("boundary=")[1]
    fields: dict[str, bytes] = {}
    for part in body.split(b"--" + boundary.strip('"').encode())[1:]:
        if part.startswith(b"--"):
            break
        head, _, value = part.partition(b"\r\n\r\n")
        name = re.search(rb'name="([^"]*)"', head)
        if name is not None:
            fields[name.group(1).decode()] = value[:-2] if value.endswith(b"\r\n") else value
    return fields

"""The built-in demo upstream: a small OpenAI-compatible server inside oaimux.

It exists so that oaimux answers with no key and no other service: the shipped
``routes.yaml`` routes the model ``demo`` to it (``upstreams.demo: {builtin:
demo}``). It is a real HTTP server on a loopback port, started only when a
configuration names it, and the proxy reaches it like any upstream: the same
forwarding, byte-for-byte relay, rate limit, access log and metrics.

What it answers (under ``/v1``), made up on the spot, no model involved:

- ``GET /models``, ``GET /models/{id}``: the one model ``demo``;
- ``POST /chat/completions``: a short canned answer that quotes the last user
  message; with ``"stream": true`` an SSE stream of several chunks with a
  pause between them, so a client shows the answer arriving; with
  ``stream_options.include_usage`` a final usage chunk, as OpenAI sends it;
- ``POST /embeddings``: a deterministic vector per input (the same text gives
  the same vector), as floats or, as the official SDKs ask by default, base64;
- ``POST /audio/speech``: a short stretch of silence, streamed (``mp3``, the
  default, as ``audio/mpeg``; ``wav``; ``pcm``).

Anything else is a 404 in OpenAI's error shape, naming what is served.

:func:`demo_app` is the application; the loopback listener that serves it, and
the URL it gives every upstream with ``builtin: demo``, are the server's
(``proxy/server/builtin_upstreams.py``). This module imports nothing else of
the proxy, so any layer may start it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import math
import struct
import time
import wave
from collections.abc import Iterator
from typing import Any

from aiohttp import web

__all__ = ["demo_app"]

DEMO_MODEL = "demo"
CREATED = 1_735_689_600  # 2025-01-01: a fixed "created" for the model list
# Between two chunks of a streamed answer: long enough to see the words arrive.
STREAM_PAUSE = 0.08
STREAM_CHUNKS = 10
EMBEDDING_DIMENSIONS = 16
SPEECH_SECONDS = 1.0
SERVED = "GET /v1/models, POST /v1/chat/completions, POST /v1/embeddings, POST /v1/audio/speech"


# ---------------------------------------------------------------------------
# Requests and errors, in OpenAI's shapes.


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status


def _error(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> web.Response:
    kind = "invalid_request_error" if status < 500 else "api_error"
    return web.json_response(
        {"error": {"message": message, "type": kind, "param": param, "code": code}},
        status=status,
    )


@web.middleware
async def _openai_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except _BadRequest as exc:
        return _error(exc.status, str(exc), exc.param)
    except web.HTTPNotFound:
        return _error(
            404,
            f"The oaimux demo upstream has no {request.method} {request.path}; it serves {SERVED}.",
            code="unknown_url",
        )
    except web.HTTPMethodNotAllowed:
        return _error(405, f"{request.method} is not allowed on {request.path}.")


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.read())
    except ValueError:
        raise _BadRequest("The body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise _BadRequest("The body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _BadRequest("'model' must be a non-empty string.", "model")
    return body


def _text_of(content: object) -> str:
    """A message's text: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _words(text: str) -> int:
    return len(text.split())


# ---------------------------------------------------------------------------
# The endpoints.


async def _models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model_object(DEMO_MODEL)]})


async def _model(request: web.Request) -> web.Response:
    model_id = request.match_info["model"]
    if model_id != DEMO_MODEL:
        return _error(404, f"The model '{model_id}' does not exist.", "model", "model_not_found")
    return web.json_response(_model_object(model_id))


def _model_object(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": CREATED, "owned_by": "oaimux-demo"}


def _answer(messages: object) -> tuple[str, int]:
    """The canned answer to ``messages``, and the prompt's size in words."""
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("'messages' must be a non-empty list.", "messages")
    said = ""
    prompt_words = 0
    for message in messages:
        if not isinstance(message, dict):
            raise _BadRequest("Each message must be an object.", "messages")
        text = _text_of(message.get("content"))
        prompt_words += _words(text)
        if message.get("role") == "user":
            said = text
    quoted = " ".join(said.split())
    if len(quoted) > 80:
        quoted = quoted[:77] + "..."
    answer = (
        "Hello from the oaimux demo upstream! "
        + (f'You said: "{quoted}". ' if quoted else "")
        + "This answer came through the proxy, as a real model's would: "
        "route a model to a real upstream in routes.yaml to get real answers."
    )
    return answer, prompt_words


def _chunks(text: str, count: int) -> Iterator[str]:
    """``text`` in about ``count`` pieces, split after spaces (joined, they are ``text``)."""
    words = text.split(" ")
    size = max(1, math.ceil(len(words) / count))
    for i in range(0, len(words), size):
        piece = " ".join(words[i : i + size])
        yield piece if i + size >= len(words) else piece + " "


async def _chat(request: web.Request) -> web.StreamResponse:
    body = await _json_body(request)
    answer, prompt_words = _answer(body.get("messages"))
    usage = {
        "prompt_tokens": prompt_words,
        "completion_tokens": _words(answer),
        "total_tokens": prompt_words + _words(answer),
    }
    ident = f"chatcmpl-demo{hashlib.sha256(answer.encode()).hexdigest()[:20]}"
    created = int(time.time())
    if body.get("stream") is not True:
        return web.json_response(
            {
                "id": ident,
                "object": "chat.completion",
                "created": created,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": answer, "refusal": None},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            }
        )
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)

    async def send(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> None:
        chunk: dict[str, Any] = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": body["model"],
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            chunk["usage"] = None
        chunk.update(extra)
        await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")

    await send({"role": "assistant", "content": "", "refusal": None})
    for piece in _chunks(answer, STREAM_CHUNKS):
        await asyncio.sleep(STREAM_PAUSE)
        await send({"content": piece})
    await send({}, "stop")
    if include_usage:
        await send({}, None, choices=[], usage=usage)
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def _embedding(text: str, dimensions: int) -> list[float]:
    """A unit vector drawn from the text's hash: deterministic, meaningless."""
    seed = hashlib.sha256(text.encode()).digest()
    raw: list[float] = []
    counter = 0
    while len(raw) < dimensions:
        block = hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
        raw.extend((b - 127.5) / 127.5 for b in block)
        counter += 1
    del raw[dimensions:]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    # Rounded to what float32 keeps, so floats and base64 give the same numbers.
    return [struct.unpack("<f", struct.pack("<f", v / norm))[0] for v in raw]


def _inputs(value: object) -> list[str]:
    """``input`` as texts: a string, a list of strings, or token ids (one list or several)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return [str(v) for v in value]
        if all(isinstance(v, int) for v in value):
            return [json.dumps(value)]
        if all(isinstance(v, list) and all(isinstance(t, int) for t in v) for v in value):
            return [json.dumps(v) for v in value]
    raise _BadRequest(
        "'input' must be a string, a list of strings or a list of token ids.", "input"
    )


async def _embeddings(request: web.Request) -> web.Response:
    body = await _json_body(request)
    texts = _inputs(body.get("input"))
    dimensions = body.get("dimensions", EMBEDDING_DIMENSIONS)
    if (
        isinstance(dimensions, bool)
        or not isinstance(dimensions, int)
        or not 0 < dimensions <= 4096
    ):
        raise _BadRequest("'dimensions' must be a whole number from 1 to 4096.", "dimensions")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise _BadRequest("'encoding_format' must be 'float' or 'base64'.", "encoding_format")
    data = []
    for index, text in enumerate(texts):
        vector = _embedding(text, dimensions)
        value: object = vector
        if encoding == "base64":
            value = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": value})
    tokens = sum(_words(t) for t in texts)
    return web.json_response(
        {
            "object": "list",
            "data": data,
            "model": body["model"],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


# A silent MPEG-1 Layer III frame: 32 kbit/s, 44.1 kHz, mono, no CRC; its side
# information is all zero, so it decodes to 1152 samples of silence.
_MP3_FRAME = b"\xff\xfb\x10\xc0" + bytes(104 - 4)
_MP3_FRAME_SECONDS = 1152 / 44100
_PCM_RATE = 24000  # OpenAI's pcm: 24 kHz, 16-bit signed little-endian, mono


def _silence(fmt: str, seconds: float) -> tuple[bytes, str]:
    if fmt == "mp3":
        return _MP3_FRAME * math.ceil(seconds / _MP3_FRAME_SECONDS), "audio/mpeg"
    pcm = bytes(2 * round(_PCM_RATE * seconds))
    if fmt == "pcm":
        return pcm, "audio/pcm"
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(_PCM_RATE)
        wav.writeframes(pcm)
    return out.getvalue(), "audio/wav"


async def _speech(request: web.Request) -> web.StreamResponse:
    body = await _json_body(request)
    if not isinstance(body.get("input"), str) or not body["input"]:
        raise _BadRequest("'input' must be a non-empty string.", "input")
    fmt = body.get("response_format", "mp3")
    if fmt not in ("mp3", "wav", "pcm"):
        raise _BadRequest(
            "The demo upstream makes 'mp3', 'wav' or 'pcm' (of silence).", "response_format"
        )
    audio, content_type = _silence(fmt, SPEECH_SECONDS)
    response = web.StreamResponse(headers={"Content-Type": content_type})
    await response.prepare(request)
    step = math.ceil(len(audio) / 4)  # a few writes: audio arrives as it is made
    for start in range(0, len(audio), step):
        await response.write(audio[start : start + step])
    await response.write_eof()
    return response


def demo_app() -> web.Application:
    """The demo upstream's application (serve it under any base; paths start at ``/v1``)."""
    app = web.Application(middlewares=[_openai_errors])
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1/models/{model}", _model)
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/v1/embeddings", _embeddings)
    app.router.add_post("/v1/audio/speech", _speech)
    return app

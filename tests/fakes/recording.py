"""A recording upstream for the openai SDK's own test suite (test_sdk_suite.py).

It plays the part the SDK's CI gives a mock server built from the OpenAPI
document: every endpoint answers with the example the SDK's own types accept
(tests/sdk_suite/examples.py makes the table), ``text/event-stream`` when the
JSON body asks ``"stream": true``, and a 404 in OpenAI's shape for a path no
endpoint has. Answers depend only on the request, so two runs get the same.

Every request is recorded whole (method, path, raw query, headers, body
bytes) under the name of the test that sent it: the suite's plugin
(tests/sdk_suite/plugin.py) posts each test's id to ``MARK_PATH`` before the
test starts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

__all__ = ["MARK_PATH", "Recorded", "RecordingUpstream"]

MARK_PATH = "/__suite__/test"


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclass(frozen=True)
class _Endpoint:
    method: str
    pattern: re.Pattern[str]
    query: frozenset[tuple[str, str]]
    kind: str  # json | binary | empty
    body: bytes


def _endpoint(entry: dict[str, Any]) -> _Endpoint:
    parts = re.split(r"\{[^}/]+\}", entry["path"])
    pattern = re.compile("/v1" + "[^/]+".join(re.escape(p) for p in parts))
    return _Endpoint(
        entry["method"],
        pattern,
        frozenset(parse_qsl(entry["query"])),
        entry["kind"],
        json.dumps(entry.get("body")).encode(),
    )


@dataclass
class RecordingUpstream:
    table: Iterable[dict[str, Any]]
    by_test: dict[str, list[Recorded]] = field(default_factory=dict)
    current: str = ""

    def __post_init__(self) -> None:
        endpoints = [_endpoint(e) for e in self.table]
        # Templates with a query (``?beta=true``) first, then fewer parameters:
        # a literal segment beats a parameter in the same place.
        endpoints.sort(key=lambda e: (-len(e.query), e.pattern.pattern.count("[^/]+")))
        self._endpoints = endpoints

    def take(self) -> dict[str, list[Recorded]]:
        """The records so far, by test id; the next run starts empty."""
        taken, self.by_test, self.current = self.by_test, {}, ""
        return taken

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024**3)
        app.router.add_post(MARK_PATH, self._mark)
        app.router.add_route("*", "/{tail:.*}", self._answer)
        return app

    async def _mark(self, request: web.Request) -> web.Response:
        self.current = (await request.read()).decode()
        self.by_test.setdefault(self.current, [])
        return web.Response(status=204)

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        raw_path, _, query = request.raw_path.partition("?")
        self.by_test.setdefault(self.current, []).append(
            Recorded(
                request.method,
                raw_path,
                query,
                tuple((k.lower(), v) for k, v in request.headers.items()),
                body,
            )
        )
        endpoint = self._find(request.method, request.path, frozenset(parse_qsl(query)))
        if endpoint is None:
            error = {"message": "no such endpoint", "type": "invalid_request_error"}
            return web.json_response({"error": {**error, "param": None, "code": None}}, status=404)
        if endpoint.kind == "empty":
            return web.Response(status=204)
        if endpoint.kind == "binary":
            return web.Response(body=b"binary", content_type="application/octet-stream")
        if _asks_for_a_stream(body):
            return web.Response(body=b"data: [DONE]\n\n", content_type="text/event-stream")
        return web.Response(body=endpoint.body, content_type="application/json")

    def _find(self, method: str, path: str, query: frozenset[tuple[str, str]]) -> _Endpoint | None:
        for endpoint in self._endpoints:
            if (
                endpoint.method == method
                and endpoint.query <= query
                and endpoint.pattern.fullmatch(path)
            ):
                return endpoint
        return None


def _asks_for_a_stream(body: bytes) -> bool:
    if b'"stream"' not in body:
        return False
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    return isinstance(doc, dict) and doc.get("stream") is True

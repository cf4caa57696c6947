"""The error boundary without a middleware (docs/decisions.md, "The error
boundary is in the views"): whatever a view raises, and whatever target a
client sends, the answer is the proxy's error JSON named ``Server: oaimux``,
never aiohttp's plain text and version.

The proxy is served as ``oaimux serve`` serves it (``running_proxy``: the
guarded connections). An unexpected exception has no real trigger (it is a
bug), so those tests put one in a stage of the request path with
``monkeypatch``: the only fault injected into our own code here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web

from proxy.config import Settings, parse_settings
from proxy.server import views
from tests.conftest import basic_config
from tests.fakes.security import error_of, exchange, running_proxy, split_response
from tests.fakes.upstream import FakeUpstream

CHAT = b'{"model": "gpt-4o-mini", "messages": []}'


def post(path: str, body: bytes = CHAT) -> bytes:
    return (
        # Connection: close: the answer ends at EOF, no wait for more bytes.
        f"POST {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode()


def raises(exc: BaseException) -> Callable[..., Any]:
    """A stand-in for a stage of the request path that fails with ``exc``."""

    def stage(*args: Any) -> Any:
        raise exc

    return stage


@pytest.fixture
def settings(upstream_url: str) -> Settings:
    return parse_settings(basic_config(upstream_url), environ={})


def assert_ours(raw: bytes, status: int, code: str) -> dict[str, Any]:
    got, headers, body = split_response(raw)
    assert got == status, raw[:300]
    assert headers["server"] == "oaimux", raw[:300]
    assert headers["content-type"].startswith("application/json"), raw[:300]
    assert headers["x-oaimux-error"] == code, raw[:300]
    return error_of(body)


@pytest.mark.parametrize(
    "head",
    [
        b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
        # The proxy's own endpoint too, not only the proxied paths.
        b"GET http://evil.example/v1/models HTTP/1.1\r\nHost: evil.example\r\n\r\n",
    ],
)
async def test_targets_not_in_origin_form_are_refused_by_the_connection(
    settings: Settings, fake: FakeUpstream, head: bytes
) -> None:
    async with running_proxy(settings) as proxy:
        # The connection closes after the refusal: no settle needed.
        raw = await exchange(proxy.port, head + b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
    err = assert_ours(raw, 400, "invalid_path")
    assert err["message"] == "Only origin-form request targets are accepted."
    assert raw.count(b"HTTP/1.") == 1, "a request after the refused head was read"
    assert fake.received == []


async def test_a_pipelined_head_not_in_origin_form_is_refused_too(
    settings: Settings, fake: FakeUpstream
) -> None:
    """Two heads parsed from one read: the first is checked as well as the last."""
    async with running_proxy(settings) as proxy:
        raw = await exchange(
            proxy.port,
            b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\nGET /healthz HTTP/1.1\r\nHost: a\r\n\r\n",
        )
    assert_ours(raw, 400, "invalid_path")
    assert raw.count(b"HTTP/1.") == 1


OTHER_FORMS = [
    b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
    b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
    b"GET http://evil.example/v1/models HTTP/1.1\r\nHost: evil.example\r\n\r\n",
]


@pytest.mark.parametrize("head", OTHER_FORMS, ids=["asterisk", "connect", "absolute"])
async def test_a_head_behind_a_declined_upgrade_is_refused_too(
    settings: Settings, fake: FakeUpstream, head: bytes
) -> None:
    """aiohttp parses the bytes behind an upgrade it declined after answering
    it, past data_received: those heads are checked as well."""
    declined = (
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    async with running_proxy(settings) as proxy:
        raw = await exchange(proxy.port, declined + head)
    first, second = raw.split(b"HTTP/1.", 2)[1:]
    assert first.startswith(b"1 200 "), raw[:300]
    assert_ours(b"HTTP/1." + second, 400, "invalid_path")
    assert fake.received == []


async def test_the_userinfo_of_a_refused_target_is_never_logged(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    head = (
        b"POST http://user:sk-userinfo-secret@evil.example/v1/messages HTTP/1.1\r\n"
        b"Host: evil.example\r\nContent-Length: 0\r\n\r\n"
    )
    async with running_proxy(settings) as proxy:
        raw = await exchange(proxy.port, head)
    _, _, body = split_response(raw)
    assert json.loads(body)["type"] == "error", "not in the dialect of the target's path"
    access = [r.getMessage() for r in caplog.records if r.name == "oaimux.access"]
    assert len(access) == 1 and "path=/v1/messages" in access[0], access
    assert "sk-userinfo-secret" not in caplog.text


async def test_a_line_feed_in_the_path_is_routed_like_any_path(settings: Settings) -> None:
    """aiohttp's router matched ``.*``, which stops at a line feed: with no
    middleware its own plain-text 404 would go out. The catch-all route takes it."""
    async with running_proxy(settings) as proxy:
        for path in ("/v1/a%0Ab", "/v1/messages%0A", "/v1/models/a%0Ab"):
            raw = await exchange(proxy.port, get(path))
            got, headers, body = split_response(raw)
            # No such route (405 for a GET to a model path): the proxy's answer.
            assert got in (404, 405), raw[:300]
            assert headers["server"] == "oaimux"
            assert headers["x-oaimux-error"] in ("unknown_url", "method_not_allowed")
            assert json.loads(body)["error"]  # the OpenAI or the Anthropic shape


async def test_an_unexpected_error_is_answered_500_in_the_dialect_and_logged(
    settings: Settings, fake: FakeUpstream, monkeypatch: Any, caplog: Any
) -> None:
    monkeypatch.setattr(views, "vet_target", raises(RuntimeError("detail sk-never-shown")))
    caplog.set_level(logging.ERROR, logger="oaimux")
    async with running_proxy(settings) as proxy:
        raw = await exchange(proxy.port, post("/v1/chat/completions"))
        anthropic = await exchange(proxy.port, post("/v1/messages"))
    err = assert_ours(raw, 500, "internal_error")
    assert err["message"] == "The proxy failed to handle the request."
    assert b"sk-never-shown" not in raw
    status, headers, body = split_response(anthropic)
    assert status == 500 and headers["server"] == "oaimux"
    assert json.loads(body) == {
        "type": "error",
        "error": {"type": "api_error", "message": "The proxy failed to handle the request."},
    }
    logged = [r for r in caplog.records if "unexpected error handling" in r.getMessage()]
    assert [r.getMessage() for r in logged] == [
        "unexpected error handling POST /v1/chat/completions",
        "unexpected error handling POST /v1/messages",
    ]
    assert all(r.exc_info is not None for r in logged)  # with the traceback, server-side
    assert fake.received == []


async def test_an_aiohttp_http_error_raised_in_a_view_is_our_json(
    settings: Settings, monkeypatch: Any
) -> None:
    too_large = web.HTTPRequestEntityTooLarge(max_size=1, actual_size=2)
    monkeypatch.setattr(views, "vet_target", raises(too_large))
    async with running_proxy(settings) as proxy:
        raw = await exchange(proxy.port, post("/v1/chat/completions"))
    assert_ours(raw, 413, "request_too_large")


async def test_the_own_endpoints_have_the_same_boundary(
    settings: Settings, monkeypatch: Any, caplog: Any
) -> None:
    monkeypatch.setattr(views, "_model_object", raises(RuntimeError("broken")))
    caplog.set_level(logging.ERROR, logger="oaimux")
    async with running_proxy(settings) as proxy:
        raw = await exchange(proxy.port, get("/v1/models/gpt-4o-mini"))
        # Still serving after it.
        ok = await exchange(proxy.port, get("/healthz"))
    assert_ours(raw, 500, "internal_error")
    assert any("unexpected error handling GET" in r.getMessage() for r in caplog.records)
    assert split_response(ok)[0] == 200

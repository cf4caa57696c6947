"""Anthropic's Messages API through the proxy, read by the official ``anthropic`` SDK.

``POST /v1/messages`` and ``/v1/messages/count_tokens`` are routed by the
body's top-level ``model`` like chat (README, "Coding agents"); the upstreams
are tests/fakes/anthropic_messages.py, which records what it got. Errors the
proxy makes there are Anthropic's shape, and the SDK raises the class it
raises for Anthropic's own (sync, async, streaming, count_tokens).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anthropic
import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from proxy.server.keys import DISCOVERY
from tests.fakes.access_lines import capture_logs, parse_text_line
from tests.fakes.anthropic_messages import AnthropicMessages

UPSTREAM_KEY = "sk-ant-upstream-0001"
PROXY_KEY = "sk-oaimux-claude-0001"
GPT_ONLY_KEY = "sk-oaimux-gpt-only-0001"
LIMITED_KEY = "sk-oaimux-limited-0001"
SONNET = "claude-sonnet-5-5"
OPUS = "claude-opus-5-5"
MESSAGES = [{"role": "user", "content": "say hi"}]

MakeServer = Callable[..., Awaitable[TestServer]]


@pytest.fixture
def opus() -> AnthropicMessages:
    return AnthropicMessages(name="opus", api_key=UPSTREAM_KEY)


@pytest.fixture
def sonnet() -> AnthropicMessages:
    return AnthropicMessages(name="sonnet", api_key=UPSTREAM_KEY)


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
async def silent_url() -> AsyncIterator[str]:
    """An upstream that accepts connections and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/v1"
    for writer in held:
        writer.close()
    server.close()
    await server.wait_closed()


@pytest.fixture
async def proxy_url(
    aiohttp_server: Any,
    make_proxy_server: MakeServer,
    opus: AnthropicMessages,
    sonnet: AnthropicMessages,
    silent_url: str,
) -> str:
    opus_server: TestServer = await aiohttp_server(opus.app())
    sonnet_server: TestServer = await aiohttp_server(sonnet.app())

    def upstream(url: str) -> dict[str, Any]:
        return {"url": url, "headers": {"set": {"x-api-key": UPSTREAM_KEY}}}

    config = {
        "server": {"max_body_bytes": 4096},
        "upstreams": {
            "opus": upstream(str(opus_server.make_url("/v1"))),
            "sonnet": upstream(str(sonnet_server.make_url("/v1"))),
            "dead": upstream(f"http://127.0.0.1:{_closed_port()}/v1"),
            "silent": {**upstream(silent_url), "timeouts": {"response": 0.3}},
        },
        "routes": [
            {"model": "claude-sonnet-*", "upstream": "sonnet"},
            {"model": "opus", "upstream": "opus", "rewrite_model": OPUS},
            {"model": "claude-dead", "upstream": "dead"},
            {"model": "claude-fallback", "upstream": ["dead", "sonnet"]},
            {"model": "claude-silent", "upstream": "silent"},
            {"model": "claude-*", "upstream": "opus"},
        ],
        "auth": {
            "keys": [
                {"name": "claude", "key": PROXY_KEY},
                {"name": "gpt-only", "key": GPT_ONLY_KEY, "models": ["gpt-*"]},
                {
                    "name": "limited",
                    "key": LIMITED_KEY,
                    "rate_limit": {"requests_per_minute": 1, "burst": 1},
                },
            ]
        },
    }
    server = await make_proxy_server(config)
    return str(server.make_url("")).rstrip("/")


def sdk(proxy_url: str, key: str = PROXY_KEY, **extra: Any) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=proxy_url, api_key=key, max_retries=0, **extra)


def text_of(message: anthropic.types.Message) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


# -- Routing ---------------------------------------------------------------------


async def test_messages_are_routed_by_model_to_the_matching_upstream(
    proxy_url: str, opus: AnthropicMessages, sonnet: AnthropicMessages
) -> None:
    async with sdk(proxy_url) as client:
        by_glob = await client.messages.create(model=SONNET, max_tokens=64, messages=MESSAGES)
        by_fallthrough = await client.messages.create(
            model="claude-haiku-5", max_tokens=64, messages=MESSAGES
        )
    assert text_of(by_glob) == sonnet.reply_text(SONNET)
    assert text_of(by_fallthrough) == opus.reply_text("claude-haiku-5")
    assert [r.json()["model"] for r in sonnet.messages_received] == [SONNET]
    assert [r.json()["model"] for r in opus.messages_received] == ["claude-haiku-5"]


async def test_an_alias_changes_only_the_models_bytes(
    proxy_url: str, opus: AnthropicMessages
) -> None:
    body = b'{"model" : "opus","max_tokens":64,\n "messages":[{"role":"user","content":"hi"}]}'
    async with ClientSession() as http:
        async with http.post(
            f"{proxy_url}/v1/messages",
            data=body,
            headers={"x-api-key": PROXY_KEY, "content-type": "application/json"},
        ) as resp:
            assert resp.status == 200
            answer = await resp.json()
    assert answer["model"] == OPUS
    [sent] = opus.messages_received
    assert sent.body == body.replace(b'"opus"', f'"{OPUS}"'.encode())


async def test_count_tokens_is_routed_by_model_too(
    proxy_url: str, opus: AnthropicMessages, sonnet: AnthropicMessages
) -> None:
    async with sdk(proxy_url) as client:
        counted = await client.messages.count_tokens(model=SONNET, messages=MESSAGES)
    assert counted.input_tokens == sonnet.input_tokens
    assert [r.path for r in sonnet.received] == ["/v1/messages/count_tokens"]
    assert opus.received == []


@pytest.mark.parametrize("path", ["/messages", "/messages/count_tokens"])
async def test_the_paths_without_v1_are_routed_by_model(
    proxy_url: str, sonnet: AnthropicMessages, path: str
) -> None:
    async with ClientSession() as http:
        async with http.post(
            f"{proxy_url}{path}",
            json={"model": SONNET, "max_tokens": 8, "messages": MESSAGES},
            headers={"x-api-key": PROXY_KEY},
        ) as resp:
            assert resp.status == 200, await resp.text()
    [sent] = sonnet.received
    assert sent.path == f"/v1{path}"


@pytest.mark.parametrize("carrier", ["x-api-key", "authorization"])
async def test_the_upstream_gets_its_own_key_and_the_anthropic_headers(
    proxy_url: str, sonnet: AnthropicMessages, carrier: str
) -> None:
    """The proxy key is taken from either carrier (ANTHROPIC_API_KEY or
    ANTHROPIC_AUTH_TOKEN) and never forwarded."""
    if carrier == "x-api-key":
        client = sdk(proxy_url)
    else:
        client = anthropic.AsyncAnthropic(base_url=proxy_url, auth_token=PROXY_KEY, max_retries=0)
    async with client:
        await client.beta.messages.create(
            model=SONNET,
            max_tokens=64,
            messages=MESSAGES,
            betas=["interleaved-thinking-2025-05-14", "context-1m-2025-08-07"],
        )
    [sent] = sonnet.messages_received
    assert sent.query_string == "beta=true"
    assert sent.headers["x-api-key"] == UPSTREAM_KEY
    assert "authorization" not in sent.headers
    assert PROXY_KEY not in str(sent.headers)
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert sent.headers["anthropic-beta"] == (
        "interleaved-thinking-2025-05-14,context-1m-2025-08-07"
    )


async def test_a_client_key_next_to_the_proxy_key_is_not_forwarded(
    proxy_url: str, sonnet: AnthropicMessages
) -> None:
    async with ClientSession() as http:
        async with http.post(
            f"{proxy_url}/v1/messages",
            json={"model": SONNET, "max_tokens": 8, "messages": MESSAGES},
            headers={"Authorization": f"Bearer {PROXY_KEY}", "x-api-key": "sk-ant-client-0001"},
        ) as resp:
            assert resp.status == 200, await resp.text()
    [sent] = sonnet.received
    assert sent.headers["x-api-key"] == UPSTREAM_KEY and "authorization" not in sent.headers


async def test_a_stream_reaches_the_client_byte_for_byte(
    proxy_url: str, sonnet: AnthropicMessages
) -> None:
    async with ClientSession() as http:
        async with http.post(
            f"{proxy_url}/v1/messages",
            json={"model": SONNET, "max_tokens": 8, "messages": MESSAGES, "stream": True},
            headers={"x-api-key": PROXY_KEY},
        ) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            got = await resp.read()
    assert got == sonnet.sent_stream and got


async def test_each_event_is_relayed_as_it_comes(proxy_url: str, sonnet: AnthropicMessages) -> None:
    """message_start reaches the client while the upstream holds back the rest."""
    sonnet.after_start = asyncio.Event()
    async with ClientSession() as http:
        async with http.post(
            f"{proxy_url}/v1/messages",
            json={"model": SONNET, "max_tokens": 8, "messages": MESSAGES, "stream": True},
            headers={"x-api-key": PROXY_KEY},
        ) as resp:
            async with asyncio.timeout(10):
                first = await resp.content.readuntil(b"\n\n")
            assert first.startswith(b"event: message_start\n")
            assert not sonnet.after_start.is_set()
            sonnet.after_start.set()
            rest = await resp.read()
    assert first + rest == sonnet.sent_stream


async def test_a_fallback_list_serves_messages(proxy_url: str, sonnet: AnthropicMessages) -> None:
    async with sdk(proxy_url) as client:
        message = await client.messages.create(
            model="claude-fallback", max_tokens=64, messages=MESSAGES
        )
    assert text_of(message) == sonnet.reply_text("claude-fallback")


async def test_ids_discovered_from_anthropics_model_list_are_routed(
    aiohttp_server: Any, make_proxy_server: MakeServer
) -> None:
    """``models: discover`` reads Anthropic's GET /v1/models (with the
    upstream's anthropic-version set), and the prefix is stripped upstream."""
    local = AnthropicMessages(name="local", api_key=UPSTREAM_KEY, model_ids=("claude-q", "x"))
    local_server: TestServer = await aiohttp_server(local.app())
    headers = {"x-api-key": UPSTREAM_KEY, "anthropic-version": "2023-06-01"}
    config = {
        "upstreams": {
            "local": {"url": str(local_server.make_url("/v1")), "headers": {"set": headers}}
        },
        "routes": [{"models": "discover", "upstream": "local", "prefix": "local/"}],
    }
    server = await make_proxy_server(config)
    async with asyncio.timeout(10):
        await server.app[DISCOVERY].complete.wait()
    async with sdk(str(server.make_url("")).rstrip("/")) as client:
        message = await client.messages.create(
            model="local/claude-q", max_tokens=8, messages=MESSAGES
        )
    assert text_of(message) == local.reply_text("claude-q")
    [sent] = local.messages_received
    assert sent.json()["model"] == "claude-q"


async def test_the_sdk_streams_through_the_proxy_event_by_event(
    proxy_url: str, sonnet: AnthropicMessages
) -> None:
    events: list[str] = []
    async with sdk(proxy_url) as client:
        async with client.messages.stream(model=SONNET, max_tokens=64, messages=MESSAGES) as stream:
            async for event in stream:
                events.append(event.type)
            final = await stream.get_final_message()
    assert text_of(final) == sonnet.reply_text(SONNET)
    assert final.usage.input_tokens == sonnet.input_tokens
    assert events.count("text") == len(sonnet.reply_deltas(SONNET))
    assert events[0] == "message_start" and events[-1] == "message_stop"


async def test_the_sync_client_through_the_proxy(proxy_url: str, sonnet: AnthropicMessages) -> None:
    # In a thread: the proxy and the fakes run on this test's event loop.
    def call() -> tuple[anthropic.types.Message, int]:
        with anthropic.Anthropic(base_url=proxy_url, api_key=PROXY_KEY, max_retries=0) as c:
            message = c.messages.create(model=SONNET, max_tokens=64, messages=MESSAGES)
            counted = c.messages.count_tokens(model=SONNET, messages=MESSAGES)
            return message, counted.input_tokens

    message, counted = await asyncio.to_thread(call)
    assert text_of(message) == sonnet.reply_text(SONNET) and counted == sonnet.input_tokens


# -- Errors in Anthropic's shape ---------------------------------------------------

# status -> (the SDK's class, Anthropic's error type, our code, how to cause it)
ERRORS: dict[int, tuple[type[anthropic.APIStatusError], str, str]] = {
    400: (anthropic.BadRequestError, "invalid_request_error", "missing_model"),
    401: (anthropic.AuthenticationError, "authentication_error", "invalid_api_key"),
    403: (anthropic.PermissionDeniedError, "permission_error", "model_not_allowed"),
    404: (anthropic.NotFoundError, "not_found_error", "model_not_found"),
    413: (anthropic.RequestTooLargeError, "request_too_large", "request_too_large"),
    429: (anthropic.RateLimitError, "rate_limit_error", "rate_limit_exceeded"),
    502: (anthropic.InternalServerError, "api_error", "upstream_unavailable"),
    504: (anthropic.InternalServerError, "timeout_error", "upstream_timeout"),
}


def _failing_call(status: int) -> tuple[str, str, list[dict[str, Any]]]:
    """The key, model and messages of a request the proxy answers with ``status``."""
    key, model, messages = PROXY_KEY, SONNET, MESSAGES
    if status == 400:
        model = ""
    elif status == 401:
        key = "sk-oaimux-wrong-0001"
    elif status == 403:
        key = GPT_ONLY_KEY
    elif status == 404:
        model = "gpt-4o"
    elif status == 413:
        messages = [{"role": "user", "content": "x" * 5000}]
    elif status == 429:
        key = LIMITED_KEY
    elif status == 502:
        model = "claude-dead"
    elif status == 504:
        model = "claude-silent"
    return key, model, messages


async def _use_up_the_limit(proxy_url: str) -> None:
    async with sdk(proxy_url, LIMITED_KEY) as client:
        await client.messages.count_tokens(model=SONNET, messages=MESSAGES)


def _check_error(exc: anthropic.APIStatusError, status: int) -> None:
    kind, error_type, code = ERRORS[status]
    assert type(exc) is kind
    assert exc.status_code == status
    assert exc.body == {
        "type": "error",
        "error": {"type": error_type, "message": exc.body["error"]["message"]},
    }  # type: ignore[index]
    assert exc.response.headers["x-oaimux-error"] == code
    if status == 429:
        assert int(exc.response.headers["retry-after"]) >= 1


@pytest.mark.parametrize("status", sorted(ERRORS))
@pytest.mark.parametrize("mode", ["async", "stream", "count_tokens"])
async def test_each_error_raises_the_sdks_class(proxy_url: str, status: int, mode: str) -> None:
    if status == 429:
        await _use_up_the_limit(proxy_url)
    key, model, messages = _failing_call(status)
    async with sdk(proxy_url, key) as client:
        with pytest.raises(anthropic.APIStatusError) as caught:
            if mode == "async":
                await client.messages.create(model=model, max_tokens=8, messages=messages)  # type: ignore[arg-type]
            elif mode == "stream":
                async with client.messages.stream(
                    model=model,
                    max_tokens=8,
                    messages=messages,  # type: ignore[arg-type]
                ) as stream:
                    await stream.get_final_message()
            else:
                await client.messages.count_tokens(model=model, messages=messages)  # type: ignore[arg-type]
    _check_error(caught.value, status)


@pytest.mark.parametrize("status", sorted(ERRORS))
async def test_each_error_raises_the_sync_sdks_class(proxy_url: str, status: int) -> None:
    if status == 429:
        await _use_up_the_limit(proxy_url)
    key, model, messages = _failing_call(status)

    def call() -> anthropic.APIStatusError:
        with anthropic.Anthropic(base_url=proxy_url, api_key=key, max_retries=0) as client:
            try:
                client.messages.create(model=model, max_tokens=8, messages=messages)  # type: ignore[arg-type]
            except anthropic.APIStatusError as exc:
                return exc
        raise AssertionError("no error raised")

    _check_error(await asyncio.to_thread(call), status)


async def test_errors_off_the_anthropic_paths_stay_openais(proxy_url: str) -> None:
    async with ClientSession() as http:
        async with http.post(
            f"{proxy_url}/v1/chat/completions",
            json={"model": "gpt-4o", "messages": MESSAGES},
            headers={"x-api-key": PROXY_KEY},
        ) as resp:
            body = await resp.json()
    assert resp.status == 404 and body["error"]["code"] == "model_not_found"
    assert "type" not in body


async def test_an_unknown_path_under_messages_is_answered_in_anthropics_shape(
    proxy_url: str,
) -> None:
    async with ClientSession() as http:
        async with http.get(
            f"{proxy_url}/v1/messages/batches", headers={"x-api-key": PROXY_KEY}
        ) as resp:
            body = await resp.json()
    assert resp.status == 404 and resp.headers["x-oaimux-error"] == "unknown_url"
    assert body["type"] == "error" and body["error"]["type"] == "not_found_error"


# -- Usage -------------------------------------------------------------------------


def _usage_of(line: str) -> tuple[str, ...]:
    fields = parse_text_line(line)
    names = ("prompt_tokens", "completion_tokens", "cache_read_tokens", "cache_creation_tokens")
    return tuple(fields[name] for name in names)


async def _tokens_counted(proxy_url: str) -> dict[str, float]:
    """oaimux_tokens_total for the sonnet glob, by type."""
    async with ClientSession() as http:
        async with http.get(f"{proxy_url}/metrics") as resp:
            text = await resp.text()
    counted = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "oaimux_tokens_total" and sample.labels["upstream"] == "sonnet":
                assert sample.labels["model"] == "claude-sonnet-*"
                counted[sample.labels["type"]] = sample.value
    return counted


@pytest.mark.parametrize("stream", [False, True])
async def test_usage_reaches_the_access_log_and_the_metrics(
    proxy_url: str, sonnet: AnthropicMessages, stream: bool
) -> None:
    """Input and cache counts from message_start, output from the last message_delta
    (the stream's usage is split); a JSON answer's usage is whole at its end."""
    sonnet.input_tokens, sonnet.cache_read_tokens, sonnet.cache_creation_tokens = 1234, 56, 7
    output = len(sonnet.reply_deltas(SONNET))
    with capture_logs() as logs:
        async with ClientSession() as http:
            async with http.post(
                f"{proxy_url}/v1/messages",
                json={"model": SONNET, "max_tokens": 8, "messages": MESSAGES, "stream": stream},
                headers={"x-api-key": PROXY_KEY},
            ) as resp:
                assert resp.status == 200
                await resp.read()
        [line] = await logs.wait_for(1)
    assert _usage_of(line) == ("1234", str(output), "56", "7")
    assert parse_text_line(line)["model"] == SONNET
    assert await _tokens_counted(proxy_url) == {
        "prompt": 1234,
        "completion": output,
        "cache_read": 56,
        "cache_creation": 7,
    }

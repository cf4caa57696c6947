"""The official ``openai`` Python SDK, sync and async, pointed at the proxy (README, "Clients").

The proxy and the fake upstream listen on real loopback ports; the SDK talks
HTTP to the proxy exactly as it would to api.openai.com. Sync calls run in a
worker thread so the event loop keeps serving both servers.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.conftest import serve_proxy
from tests.fakes.openai_like import OpenAILike, audio_blob

T = TypeVar("T")

PROXY_KEY = "sk-oaimux-team-0001"
UPSTREAM_KEY = "sk-upstream-sdk-secret"
MODELS = ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "tts-1", "whisper-1", "dall-e-3"]

Client = openai.OpenAI | openai.AsyncOpenAI


@pytest.fixture
def upstream() -> OpenAILike:
    return OpenAILike(name="openai")


@pytest.fixture
async def upstream_server(aiohttp_server: Any, upstream: OpenAILike) -> TestServer:
    server: TestServer = await aiohttp_server(upstream.app())
    return server


def config(upstream_server: TestServer, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "upstreams": {
            "openai": {
                "url": str(upstream_server.make_url("/v1")),
                "headers": {"set": {"Authorization": f"Bearer {UPSTREAM_KEY}"}},
            }
        },
        "routes": [{"model": m, "upstream": "openai"} for m in MODELS],
        "auth": {"keys": [{"name": "team", "key": PROXY_KEY}]},
    }
    cfg.update(extra)
    return cfg


@pytest.fixture
async def proxy(aiohttp_client: Any, upstream_server: TestServer) -> TestClient[Any, Any]:
    return await serve_proxy(aiohttp_client, config(upstream_server))


@pytest.fixture(params=["sync", "async"])
async def sdk(request: pytest.FixtureRequest, proxy: TestClient[Any, Any]) -> Any:
    base_url = str(proxy.make_url("/v1"))
    client: Client
    if request.param == "sync":
        client = openai.OpenAI(base_url=base_url, api_key=PROXY_KEY, max_retries=0)
    else:
        client = openai.AsyncOpenAI(base_url=base_url, api_key=PROXY_KEY, max_retries=0)
    yield client
    if isinstance(client, openai.AsyncOpenAI):
        await client.close()
    else:
        client.close()


async def call(client: Client, fn: Callable[..., T], /, **kwargs: Any) -> T:
    """Run an SDK method of either client: awaited, or in a thread for the sync one."""
    if isinstance(client, openai.AsyncOpenAI):
        result: T = await fn(**kwargs)
        return result
    return await asyncio.to_thread(fn, **kwargs)


MESSAGES = [{"role": "user", "content": "Say hello"}]


async def test_chat_non_stream(sdk: Client, upstream: OpenAILike) -> None:
    completion = await call(
        sdk, sdk.chat.completions.create, model="gpt-4o-mini", messages=MESSAGES
    )
    assert completion.choices[0].message.content == "hello from openai"
    assert completion.usage is not None and completion.usage.total_tokens == 21
    # The upstream got its own key, never the proxy key.
    assert upstream.last.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


async def test_chat_stream(sdk: Client) -> None:
    if isinstance(sdk, openai.AsyncOpenAI):
        stream = await sdk.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True
        )
        parts = [chunk.choices[0].delta.content or "" async for chunk in stream]
    else:
        sync = sdk

        def collect() -> list[str]:
            stream = sync.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, stream=True
            )
            return [chunk.choices[0].delta.content or "" for chunk in stream]

        parts = await asyncio.to_thread(collect)
    assert parts == ["Hel", "lo", " there", "!", ""]  # the last chunk carries finish_reason


async def test_embeddings(sdk: Client, upstream: OpenAILike) -> None:
    result = await call(
        sdk, sdk.embeddings.create, model="text-embedding-3-small", input=["one", "two"]
    )
    assert [e.index for e in result.data] == [0, 1]
    assert result.data[1].embedding == pytest.approx([0.001, -0.5, 0.25])


async def test_audio_speech_streamed_to_a_file(
    sdk: Client, upstream: OpenAILike, tmp_path: Path
) -> None:
    target = tmp_path / "speech.mp3"
    if isinstance(sdk, openai.AsyncOpenAI):
        async with sdk.audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input="Hello there"
        ) as response:
            assert response.headers["content-type"] == "audio/mpeg"
            await response.stream_to_file(target)
    else:
        sync = sdk

        def fetch() -> None:
            with sync.audio.speech.with_streaming_response.create(
                model="tts-1", voice="alloy", input="Hello there"
            ) as response:
                response.stream_to_file(target)

        await asyncio.to_thread(fetch)
    assert target.read_bytes() == upstream.sent["/v1/audio/speech"]


async def test_transcription_with_a_file(sdk: Client, tmp_path: Path) -> None:
    recording = tmp_path / "meeting.wav"
    audio = b"RIFF" + audio_blob(3 * 1024 * 1024)
    recording.write_bytes(audio)
    with recording.open("rb") as f:
        result = await call(sdk, sdk.audio.transcriptions.create, model="whisper-1", file=f)
    assert result.text == f"{len(audio)} bytes, sha256 {hashlib.sha256(audio).hexdigest()}"


async def test_images(sdk: Client) -> None:
    result = await call(
        sdk,
        sdk.images.generate,
        model="dall-e-3",
        prompt="a lighthouse",
        response_format="b64_json",
    )
    assert result.data is not None and result.data[0].b64_json is not None
    assert base64.b64decode(result.data[0].b64_json).startswith(b"\x89PNG")


async def test_models_list(sdk: Client) -> None:
    if isinstance(sdk, openai.AsyncOpenAI):
        ids = [m.id async for m in sdk.models.list()]
    else:
        ids = await asyncio.to_thread(lambda: [m.id for m in sdk.models.list()])
    assert ids == MODELS


async def test_responses(sdk: Client) -> None:
    response = await call(sdk, sdk.responses.create, model="gpt-4o", input="Tell me a story")
    assert response.output_text == "In a peaceful grove..."
    if isinstance(sdk, openai.AsyncOpenAI):
        stream = await sdk.responses.create(model="gpt-4o", input="Tell me a story", stream=True)
        kinds = [event.type async for event in stream]
    else:
        sync = sdk
        kinds = await asyncio.to_thread(
            lambda: [e.type for e in sync.responses.create(model="gpt-4o", input="x", stream=True)]
        )
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"


def make_client(kind: str, base_url: str, api_key: str) -> Client:
    if kind == "sync":
        return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0)
    return openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0)


async def close(client: Client) -> None:
    if isinstance(client, openai.AsyncOpenAI):
        await client.close()
    else:
        client.close()


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_error_classes(
    kind: str, aiohttp_client: Any, upstream_server: TestServer, unused_tcp_port: int
) -> None:
    cfg = config(upstream_server, rate_limit={"requests_per_minute": 1, "burst": 2})
    cfg["upstreams"]["down"] = {"url": f"http://127.0.0.1:{unused_tcp_port}/v1"}
    cfg["routes"].append({"model": "gpt-down", "upstream": "down"})
    proxy = await serve_proxy(aiohttp_client, cfg)
    base_url = str(proxy.make_url("/v1"))

    stranger = make_client(kind, base_url, "sk-not-a-proxy-key")
    with pytest.raises(openai.AuthenticationError) as auth:
        await call(
            stranger, stranger.chat.completions.create, model="gpt-4o-mini", messages=MESSAGES
        )
    assert auth.value.status_code == 401 and auth.value.code == "invalid_api_key"
    await close(stranger)

    member = make_client(kind, base_url, PROXY_KEY)
    with pytest.raises(openai.NotFoundError) as missing:
        await call(member, member.chat.completions.create, model="no-such-model", messages=MESSAGES)
    assert missing.value.status_code == 404 and missing.value.code == "model_not_found"

    with pytest.raises(openai.InternalServerError) as down:
        await call(member, member.chat.completions.create, model="gpt-down", messages=MESSAGES)
    assert isinstance(down.value, openai.APIStatusError)
    assert down.value.status_code == 502 and down.value.code == "upstream_unavailable"

    # The key's bucket (burst 2) is spent by the two calls above.
    with pytest.raises(openai.RateLimitError) as limited:
        await call(member, member.chat.completions.create, model="gpt-4o-mini", messages=MESSAGES)
    assert limited.value.status_code == 429 and limited.value.code == "rate_limit_exceeded"
    assert int(limited.value.response.headers["retry-after"]) >= 1
    await close(member)


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_upstream_errors_reach_the_sdk_as_their_classes(
    kind: str, aiohttp_client: Any, upstream_server: TestServer
) -> None:
    cfg = config(upstream_server)
    cfg["routes"].append({"model": "fail-*", "upstream": "openai"})
    proxy = await serve_proxy(aiohttp_client, cfg)
    client = make_client(kind, str(proxy.make_url("/v1")), PROXY_KEY)
    for model, error in [
        ("fail-429", openai.RateLimitError),
        ("fail-404", openai.NotFoundError),
        ("fail-500", openai.InternalServerError),
    ]:
        with pytest.raises(error) as info:
            await call(client, client.chat.completions.create, model=model, messages=MESSAGES)
        assert info.value.message.endswith(f"openai says {model[5:]}")
    await close(client)

"""The built-in demo upstream behind the proxy, with the shipped routes.yaml.

The official openai SDK and real curl talk to the real proxy, which forwards to
the demo's own loopback listener like to any upstream. The README's curl and
SDK examples are run as written (only the port changes), so they cannot drift
from what the shipped configuration answers.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestClient

from proxy.config import load_settings, parse_settings
from proxy.demo import STREAM_PAUSE
from proxy.server.app import create_app, server_options
from proxy.server.keys import BUILTINS, DISCOVERY, RUNTIME
from tests.faults.process import running_proxy

ROOT = Path(__file__).parents[2]
README = ROOT / "README.md"


@pytest.fixture
async def proxy(aiohttp_client: Any) -> TestClient[Any, Any]:
    app = create_app(load_settings(ROOT / "routes.yaml", environ={}))
    client: TestClient[Any, Any] = await aiohttp_client(app, server_kwargs=server_options())
    return client


@pytest.fixture
async def sdk(proxy: TestClient[Any, Any]) -> Any:
    client = openai.AsyncOpenAI(
        base_url=str(proxy.make_url("/v1")), api_key="unused", max_retries=0
    )
    yield client
    await client.close()


async def test_chat_completion(sdk: openai.AsyncOpenAI) -> None:
    answer = await sdk.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "Hello there"}]
    )
    assert answer.object == "chat.completion"
    assert answer.model == "demo"
    content = answer.choices[0].message.content
    assert content is not None and 'You said: "Hello there"' in content
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None and answer.usage.prompt_tokens == 2


async def test_streamed_chat_arrives_in_several_chunks_over_time(
    sdk: openai.AsyncOpenAI,
) -> None:
    stream = await sdk.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "Hello"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces: list[tuple[float, str]] = []
    usage = None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append((time.monotonic(), chunk.choices[0].delta.content))
        if chunk.usage is not None:
            usage = chunk.usage
    text = "".join(p for _, p in pieces)
    assert 'You said: "Hello"' in text
    assert len(pieces) >= 5
    # Streamed, not buffered: the pieces did not all arrive together. (Each
    # is sent at least STREAM_PAUSE after the one before.)
    assert pieces[-1][0] - pieces[0][0] >= 2 * STREAM_PAUSE
    assert usage is not None and usage.completion_tokens == len(text.split())


async def test_an_alias_reaches_the_demo_with_the_rewritten_model(
    sdk: openai.AsyncOpenAI,
) -> None:
    answer = await sdk.chat.completions.create(
        model="demo-alias", messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.model == "demo"  # the demo echoes the model it received


async def test_embeddings_in_base64_and_floats_agree(sdk: openai.AsyncOpenAI) -> None:
    # The SDK asks for base64 by default and decodes it.
    packed = await sdk.embeddings.create(model="demo", input=["Hello", "world", "Hello"])
    floats = await sdk.embeddings.create(
        model="demo", input=["Hello", "world", "Hello"], encoding_format="float"
    )
    vectors = [d.embedding for d in packed.data]
    assert [d.embedding for d in floats.data] == vectors
    assert len(vectors[0]) == 16 and vectors[0] == vectors[2] != vectors[1]
    assert abs(sum(v * v for v in vectors[0]) - 1.0) < 1e-5
    sized = await sdk.embeddings.create(model="demo", input="Hello", dimensions=64)
    assert len(sized.data[0].embedding) == 64


async def test_speech_is_audio_mpeg_bytes(sdk: openai.AsyncOpenAI) -> None:
    audio = await sdk.audio.speech.create(model="demo", voice="alloy", input="Hello")
    assert audio.response.headers["content-type"] == "audio/mpeg"
    body = audio.content
    # MPEG-1 Layer III frames, one after another: a player plays them (silence).
    assert len(body) > 1000 and body[:4] == b"\xff\xfb\x10\xc0"
    assert body.count(b"\xff\xfb\x10\xc0") == len(body) // 104
    wav = await sdk.audio.speech.create(
        model="demo", voice="alloy", input="Hello", response_format="wav"
    )
    assert wav.response.headers["content-type"] == "audio/wav"
    assert wav.content[:4] == b"RIFF" and wav.content[8:12] == b"WAVE"
    assert struct.unpack("<I", wav.content[4:8])[0] == len(wav.content) - 8


async def test_models_lists_demo(sdk: openai.AsyncOpenAI) -> None:
    ids = [m.id async for m in sdk.models.list()]
    assert ids == ["demo", "demo-alias"]


async def test_the_demo_speaks_openai_errors(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await sdk.responses.create(model="demo", input="hi")
    assert "demo upstream has no POST /v1/responses" in str(info.value)
    with pytest.raises(openai.BadRequestError, match="'messages' must be a non-empty list"):
        await sdk.chat.completions.create(model="demo", messages=[])


async def test_the_demo_listener_is_loopback_and_closes_with_the_proxy(
    aiohttp_client: Any,
) -> None:
    app = create_app(load_settings(ROOT / "routes.yaml", environ={}))
    client: TestClient[Any, Any] = await aiohttp_client(app, server_kwargs=server_options())
    url = app[RUNTIME].current.settings.upstreams["demo"].url
    assert url.host == "127.0.0.1" and url.port not in (None, 0)
    assert app[RUNTIME].generation == 0  # binding at start is not a reload
    async with aiohttp.ClientSession() as direct:
        async with direct.get(url / "models") as resp:
            assert resp.status == 200
        await client.close()
        with pytest.raises(aiohttp.ClientConnectorError):
            async with direct.get(url / "models"):
                pass


async def test_no_demo_listener_unless_a_config_names_it(aiohttp_client: Any) -> None:
    config = {
        "upstreams": {"a": {"url": "http://127.0.0.1:9/v1"}},
        "routes": [{"model": "m", "upstream": "a"}],
    }
    app = create_app(parse_settings(config, environ={}))
    await aiohttp_client(app, server_kwargs=server_options())
    assert app[BUILTINS].started == ()
    named = create_app(load_settings(ROOT / "routes.yaml", environ={}))
    await aiohttp_client(named, server_kwargs=server_options())
    assert named[BUILTINS].started == ("demo",)


# ---------------------------------------------------------------------------
# The README's examples, as written.


def readme_blocks(language: str) -> list[str]:
    """The README's fenced blocks of ``language``, in order."""
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def curl_examples() -> list[str]:
    """Each README curl command against 127.0.0.1:8080 (continuation lines joined)."""
    commands = []
    for block in readme_blocks("sh"):
        for command in block.replace("\\\n", " ").splitlines():
            if command.startswith("curl ") and "127.0.0.1:8080/v1/" in command:
                commands.append(command)
    return commands


def test_the_readme_shows_each_demo_answer_with_curl() -> None:
    joined = "\n".join(curl_examples())
    for path in ("chat/completions", "embeddings", "audio/speech", "models"):
        assert f"127.0.0.1:8080/v1/{path}" in joined, path
    assert '"model": "demo"' in joined and '"stream": true' in joined


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
async def test_the_readme_curl_examples_answer(proxy: TestClient[Any, Any], tmp_path: Path) -> None:
    port = proxy.port
    for command in curl_examples():
        proc = await asyncio.create_subprocess_shell(
            command.replace("127.0.0.1:8080", f"127.0.0.1:{port}").replace(
                "curl ", "curl -sS --fail-with-body ", 1
            ),
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, (command, out, err)
        if "chat/completions" in command:
            assert out.count(b"data: ") >= 5 and out.endswith(b"data: [DONE]\n\n")
        elif "embeddings" in command:
            assert b'"embedding"' in out
        elif "models" in command:
            assert b'"demo"' in out
    speech = list(tmp_path.glob("*.mp3"))
    assert len(speech) == 1 and speech[0].read_bytes()[:2] == b"\xff\xfb"


async def test_the_readme_sdk_example_runs(proxy: TestClient[Any, Any], tmp_path: Path) -> None:
    (example,) = [b for b in readme_blocks("python") if "from openai import OpenAI" in b]
    script = tmp_path / "example.py"
    script.write_text(example.replace("127.0.0.1:8080", f"127.0.0.1:{proxy.port}"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    text = out.decode()
    assert 'Hello from the oaimux demo upstream! You said: "Hello"' in text
    assert "16 dimensions" in text
    assert "audio/mpeg" in text


# ---------------------------------------------------------------------------
# Reload, workers and discovery with the demo.


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="--workers needs SO_REUSEPORT")
async def test_each_worker_serves_the_demo_before_and_after_a_reload(tmp_path: Path) -> None:
    # The shipped file; metrics off: their sharing across workers is tested on
    # its own (test_observability_workers.py), lifecycle only here.
    config = tmp_path / "routes.yaml"
    config.write_text((ROOT / "routes.yaml").read_text() + "\nmetrics: {enabled: false}\n")
    async with running_proxy(config, "--workers", "2") as proxy:
        await proxy.wait_line(r"oaimux serving .*\(pid \d+\)", count=2)

        async def chat_from_each_worker() -> set[str]:
            answered: set[str] = set()
            connector = aiohttp.TCPConnector(force_close=True)  # spread over both workers
            async with aiohttp.ClientSession(connector=connector) as session:
                # Until both workers answered (bounded; the shipped burst is 50).
                for _ in range(20):
                    if len(answered) == 2:
                        break
                    async with session.post(
                        f"{proxy.url}/v1/chat/completions",
                        json={"model": "demo", "messages": [{"role": "user", "content": "hi"}]},
                    ) as resp:
                        assert resp.status == 200, await resp.text()
                        assert (await resp.json())["model"] == "demo"
                    async with session.get(f"{proxy.url}/about") as resp:
                        answered.add(str((await resp.json())["pid"]))
            return answered

        assert len(await chat_from_each_worker()) == 2
        proxy.signal(signal.SIGHUP)
        await proxy.wait_line(r"reloaded .*\(pid \d+\)", count=2)
        assert len(await chat_from_each_worker()) == 2
        proxy.signal(signal.SIGTERM)
        assert await proxy.wait_exit() == 0
    assert "Traceback" not in proxy.text()


async def test_the_demo_can_be_discovered(aiohttp_client: Any) -> None:
    config = {
        "upstreams": {"demo": {"builtin": "demo"}},
        "routes": [{"models": "discover", "upstream": "demo", "prefix": "try/"}],
    }
    app = create_app(parse_settings(config, environ={}))
    proxy: TestClient[Any, Any] = await aiohttp_client(app, server_kwargs=server_options())
    async with asyncio.timeout(10):
        await app[DISCOVERY].complete.wait()
    resp = await proxy.get("/v1/models")
    assert [m["id"] for m in (await resp.json())["data"]] == ["try/demo"]
    resp = await proxy.post(
        "/v1/embeddings", json={"model": "try/demo", "input": "hi", "encoding_format": "float"}
    )
    assert resp.status == 200 and (await resp.json())["model"] == "demo"

"""Third-party Python clients through oaimux: LangChain, LlamaIndex, the litellm SDK
and the ``llm`` CLI, each set up with its own base-URL setting as the README's
"Clients" section says.

Each client runs as its own process from an isolated venv (tests/clients/harness.py;
the first run installs it, about two minutes), talking HTTP to the proxy on a
loopback port; the proxy forwards to the fake OpenAI upstream. Each does a chat
completion, a streamed one (the text must come as several chunks) and
embeddings. The offline guard fails a test if its client reaches past loopback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.clients.harness import (
    CLIENTS_DIR,
    PROXY_KEY,
    UPSTREAM_KEY,
    client_env,
    clients_python,
    last_json_line,
    proxy_config,
    run_client,
)
from tests.conftest import serve_proxy
from tests.fakes.openai_like import OpenAILike

pytestmark = pytest.mark.slow

STREAMED = ["Hel", "lo", " there", "!"]  # what OpenAILike streams, one word per event
EMBEDDINGS = [[0.0, -0.5, 0.25], [0.001, -0.5, 0.25]]


@pytest.fixture
def python() -> Path:
    return clients_python()


@pytest.fixture
def upstream() -> OpenAILike:
    return OpenAILike(name="openai")


@pytest.fixture
async def proxy(aiohttp_client: Any, aiohttp_server: Any, upstream: OpenAILike) -> str:
    """The proxy's base URL (``http://127.0.0.1:PORT/v1``)."""
    upstream_server: TestServer = await aiohttp_server(upstream.app())
    client: TestClient[Any, Any] = await serve_proxy(aiohttp_client, proxy_config(upstream_server))
    return str(client.make_url("/v1"))


def assert_reached_upstream(upstream: OpenAILike) -> None:
    """Chat, streamed chat and embeddings all went through, with the upstream's key.

    All three of these clients speak through the openai SDK underneath, whose
    User-Agent the upstream sees.
    """
    chats = [r for r in upstream.received if r.path == "/v1/chat/completions"]
    assert [b'"stream": true' in r.body or b'"stream":true' in r.body for r in chats] == [
        False,
        True,
    ]
    assert [r.path for r in upstream.received].count("/v1/embeddings") == 1
    for r in upstream.received:
        assert r.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
        assert r.headers["user-agent"].startswith("OpenAI/Python"), r.headers["user-agent"]


def assert_report(report: dict[str, Any]) -> None:
    assert report["chat"] == "hello from openai"
    # Some clients end the stream with an empty (or null) finishing chunk.
    assert [c for c in report["stream"] if c] == STREAMED
    assert len(report["embeddings"]) == len(EMBEDDINGS)
    for got, want in zip(report["embeddings"], EMBEDDINGS, strict=True):
        assert got == pytest.approx(want)  # float32 on the wire when asked for base64


async def test_langchain_chat_openai(
    python: Path, proxy: str, upstream: OpenAILike, tmp_path: Path
) -> None:
    out, _ = await run_client(
        [str(python), str(CLIENTS_DIR / "drive_langchain.py"), proxy, PROXY_KEY],
        client_env(tmp_path),
    )
    assert_report(last_json_line(out))
    assert_reached_upstream(upstream)


async def test_llamaindex_openai_like(
    python: Path, proxy: str, upstream: OpenAILike, tmp_path: Path
) -> None:
    out, _ = await run_client(
        [str(python), str(CLIENTS_DIR / "drive_llamaindex.py"), proxy, PROXY_KEY],
        client_env(tmp_path),
    )
    assert_report(last_json_line(out))
    assert_reached_upstream(upstream)


async def test_litellm_sdk(python: Path, proxy: str, upstream: OpenAILike, tmp_path: Path) -> None:
    # Without LITELLM_LOCAL_MODEL_COST_MAP, `import litellm` fetches a cost map
    # from the internet (the offline guard would refuse it and fail the test).
    out, _ = await run_client(
        [str(python), str(CLIENTS_DIR / "drive_litellm.py"), proxy, PROXY_KEY],
        client_env(tmp_path, LITELLM_LOCAL_MODEL_COST_MAP="True"),
    )
    assert_report(last_json_line(out))
    assert_reached_upstream(upstream)
    # "openai/" only tells litellm which API to speak: the model id arrives without it.
    assert {json.loads(r.body)["model"] for r in upstream.received} == {
        "gpt-4o-mini",
        "text-embedding-3-small",
    }


EXTRA_OPENAI_MODELS = """\
- model_id: oaimux-mini
  model_name: gpt-4o-mini
  api_base: "{base_url}"
  api_key_name: oaimux
"""


async def test_llm_cli_extra_openai_models(
    python: Path, proxy: str, upstream: OpenAILike, tmp_path: Path
) -> None:
    user_dir = tmp_path / "llm"
    user_dir.mkdir()
    (user_dir / "extra-openai-models.yaml").write_text(EXTRA_OPENAI_MODELS.format(base_url=proxy))
    (user_dir / "keys.json").write_text(f'{{"oaimux": "{PROXY_KEY}"}}')
    env = client_env(tmp_path, LLM_USER_PATH=str(user_dir))
    llm_cli = str(python.parent / "llm")

    out, _ = await run_client([llm_cli, "-m", "oaimux-mini", "Say hello"], env)
    assert out.strip() == "".join(STREAMED)  # the CLI streams by default
    # The CLI prints a stream as one text; llm's Python API, on the same model
    # file, shows the chunks (and a whole answer, as `llm --no-stream` gets it).
    out, _ = await run_client([str(python), str(CLIENTS_DIR / "drive_llm.py"), "oaimux-mini"], env)
    report = last_json_line(out)
    assert report["chat"] == "hello from openai"
    assert report["stream"] == STREAMED

    # llm's OpenAI embedding models take no api_base: the openai SDK under them
    # reads OPENAI_BASE_URL; the key is llm's "openai" key, else OPENAI_API_KEY.
    embed_env = {**env, "OPENAI_BASE_URL": proxy, "OPENAI_API_KEY": PROXY_KEY}
    out, _ = await run_client([llm_cli, "embed", "-m", "3-small", "-c", "one"], embed_env)
    assert last_json_line(out) == pytest.approx(EMBEDDINGS[0])

    chats = [r for r in upstream.received if r.path == "/v1/chat/completions"]
    assert len(chats) == 3
    for r in upstream.received:
        assert r.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"

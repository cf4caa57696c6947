"""Claude Code and Codex CLI, the real agents from npm, each completing one turn.

Each agent runs headless and offline (tests/agents_cli.py says how) against a
fake upstream written to the public wire format: the Anthropic Messages API
(tests/fakes/anthropic_messages.py) for Claude Code, the Responses API over SSE
and over its WebSocket (tests/fakes/openai_responses.py) for Codex. First
against the fake directly, which pins down what the agent sends and needs;
then through a real ``oaimux serve`` process, with proxy keys.

The fakes answer with text naming themselves and the model, so the agent's own
output proves which upstream served the turn and that the streamed text
reached the agent.

Through oaimux: Claude Code's turn routed by the body's ``model`` (and judged
by the key's model allow-list) with its stream's input tokens in the access
log; Codex's WebSocket through the relay, the ``426`` that makes Codex give up
its WebSocket at once when no upstream takes it, and a finished Codex turn
logged ``complete``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.agents_cli import AgentRun, EgressTrap, claude_run, codex_run, egress_trap
from tests.fakes.anthropic_messages import AnthropicMessages
from tests.fakes.openai_responses import OpenAIResponses
from tests.faults.process import ProxyProcess, running_proxy, write_config

pytestmark = [pytest.mark.slow, pytest.mark.node]

# Passed with --model and sent as it is. Not a retired model: Claude Code warns about those.
CLAUDE_MODEL = "claude-sonnet-5-5"
CODEX_MODEL = "gpt-5-codex"
PROMPT = "say hi"
ANTHROPIC_UPSTREAM_KEY = "sk-ant-upstream-agents-0001"
OPENAI_UPSTREAM_KEY = "sk-openai-upstream-agents-0001"
CLAUDE_PROXY_KEY = "sk-oaimux-claude-0001"
CODEX_PROXY_KEY = "sk-oaimux-codex-0001"
GPT_ONLY_PROXY_KEY = "sk-oaimux-gpt-only-0001"
WS_BETA = "responses_websockets="  # Codex's OpenAI-Beta value on the upgrade


@pytest.fixture
async def trap() -> AsyncIterator[EgressTrap]:
    async with egress_trap() as trap:
        yield trap


@pytest.fixture
def anthropic() -> AnthropicMessages:
    return AnthropicMessages(name="anthropic", api_key=ANTHROPIC_UPSTREAM_KEY)


@pytest.fixture
def responses() -> OpenAIResponses:
    return OpenAIResponses(name="openai", api_key=OPENAI_UPSTREAM_KEY)


@dataclass
class Lab:
    """What every test here runs in: a throwaway folder, the egress trap and the
    two fakes, served; the agents run as this file runs them (with ``PROMPT``,
    the home in the folder), and oaimux in front of the fakes."""

    folder: Path
    trap: EgressTrap
    anthropic_url: str
    responses_url: str

    async def claude(
        self, base_url: str, *, model: str | None = CLAUDE_MODEL, **key: str
    ) -> AgentRun:
        """Claude Code's turn at ``base_url`` (no ``/v1``); ``key``: its
        ``api_key`` or ``auth_token`` (tests/agents_cli.py, ``claude_run``)."""
        home = self.folder / "home"
        return await claude_run(home, self.trap, base_url, PROMPT, model=model, **key)

    async def codex(
        self, base_url: str, *, key: str, websockets: bool, model: str = CODEX_MODEL
    ) -> AgentRun:
        """Codex's turn at ``base_url`` + ``/v1`` with ``key`` as its Bearer key."""
        return await codex_run(
            self.folder / "home",
            self.trap,
            f"{base_url}/v1",
            PROMPT,
            key=key,
            model=model,
            websockets=websockets,
        )

    def proxy(
        self,
        routes: list[dict[str, Any]],
        *,
        upstreams: dict[str, Any] | None = None,
        responses_websocket: bool = False,
    ) -> AbstractAsyncContextManager[ProxyProcess]:
        """A real ``oaimux serve`` in front of both fakes (and ``upstreams``),
        with the proxy keys of this file and ``routes``."""
        config = proxy_config(self.anthropic_url, self.responses_url, routes)
        if responses_websocket:
            config["upstreams"]["openai"]["responses_websocket"] = True
        config["upstreams"].update(upstreams or {})
        return running_proxy(write_config(self.folder / "routes.yaml", config))


@pytest.fixture
async def lab(
    tmp_path: Path,
    aiohttp_server: Any,
    trap: EgressTrap,
    anthropic: AnthropicMessages,
    responses: OpenAIResponses,
) -> Lab:
    return Lab(
        tmp_path,
        trap,
        await served_url(aiohttp_server, anthropic.app()),
        await served_url(aiohttp_server, responses.app()),
    )


async def served_url(aiohttp_server: Any, app: web.Application) -> str:
    server: TestServer = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/")


def assert_turn(run: AgentRun, text: str) -> None:
    """The agent exited 0, printed the upstream's streamed text, and tried no outside host."""
    assert run.returncode == 0, str(run)
    assert run.stdout.strip() == text, str(run)
    assert run.egress == [], str(run)


def proxy_config(
    anthropic_url: str, responses_url: str, routes: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "upstreams": {
            "anthropic": {
                "url": f"{anthropic_url}/v1",
                "headers": {"set": {"x-api-key": ANTHROPIC_UPSTREAM_KEY}},
            },
            "openai": {
                "url": f"{responses_url}/v1",
                "headers": {"set": {"Authorization": f"Bearer {OPENAI_UPSTREAM_KEY}"}},
            },
        },
        "routes": routes,
        "auth": {
            "keys": [
                {"name": "claude", "key": CLAUDE_PROXY_KEY},
                {"name": "codex", "key": CODEX_PROXY_KEY},
                {"name": "gpt-only", "key": GPT_ONLY_PROXY_KEY, "models": ["gpt-*"]},
            ]
        },
    }


def access_fields(line: str) -> dict[str, str]:
    """An access-log line's fields (text format)."""
    return dict(part.split("=", 1) for part in line.split(" ") if "=" in part)


def access_lines(proxy: ProxyProcess, path: str) -> list[dict[str, str]]:
    """The proxy's access-log lines for ``path``, as field dicts."""
    return [f for f in map(access_fields, proxy.lines) if f.get("path") == path]


CLAUDE_ROUTE = {"model": "claude-*", "upstream": "anthropic"}
CODEX_ROUTE = {"model": CODEX_MODEL, "upstream": "openai"}


# -- Offline ---------------------------------------------------------------------


@pytest.mark.parametrize("agent", ["claude", "codex"])
async def test_an_agent_pointed_outside_reaches_only_the_egress_trap(lab: Lab, agent: str) -> None:
    """What every other test's ``egress == []`` rests on: a request for an outside
    host goes to the trap (and is refused there), never out. ``.invalid`` names no
    host anywhere (RFC 6761 §6.4)."""
    if agent == "claude":
        run = await lab.claude("http://api.anthropic.invalid", model=None, api_key="sk-x-0001")
        asked = "POST http://api.anthropic.invalid/v1/messages?beta=true HTTP/1.1"
    else:
        run = await lab.codex("http://api.openai.invalid", key="sk-x-0001", websockets=False)
        asked = "POST http://api.openai.invalid/v1/responses HTTP/1.1"
    assert run.returncode != 0, str(run)
    assert run.egress and set(run.egress) == {asked}, str(run)


# -- Claude Code ---------------------------------------------------------------


async def test_claude_code_completes_a_streamed_turn_against_the_fake_directly(
    lab: Lab, anthropic: AnthropicMessages
) -> None:
    run = await lab.claude(lab.anthropic_url, api_key=ANTHROPIC_UPSTREAM_KEY)
    assert_turn(run, anthropic.reply_text(CLAUDE_MODEL))
    [sent] = anthropic.messages_received
    assert sent.method == "POST" and sent.query_string == "beta=true"
    body = sent.json()
    assert body["model"] == CLAUDE_MODEL and body["stream"] is True
    assert PROMPT in json.dumps(body["messages"])
    assert sent.headers["x-api-key"] == ANTHROPIC_UPSTREAM_KEY
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert sent.headers["anthropic-beta"]


@pytest.mark.parametrize("carrier", ["api_key", "auth_token"], ids=["x-api-key", "bearer"])
async def test_claude_code_through_oaimux_with_the_proxy_key_in_either_carrier(
    lab: Lab, anthropic: AnthropicMessages, carrier: str
) -> None:
    async with lab.proxy([CLAUDE_ROUTE]) as proxy:
        run = await lab.claude(proxy.url, **{carrier: CLAUDE_PROXY_KEY})
        [line] = await proxy.wait_line(r"path=/v1/messages ")
    assert_turn(run, anthropic.reply_text(CLAUDE_MODEL))
    [sent] = anthropic.messages_received
    assert sent.query_string == "beta=true"
    # The upstream got its own key, never the proxy key, whichever way it came.
    assert sent.headers["x-api-key"] == ANTHROPIC_UPSTREAM_KEY
    assert "authorization" not in sent.headers
    assert CLAUDE_PROXY_KEY not in str(sent.headers)
    assert sent.headers["anthropic-version"] == "2023-06-01" and sent.headers["anthropic-beta"]
    assert sent.json()["model"] == CLAUDE_MODEL
    assert "status=200" in line and "key=claude" in line


async def test_claude_code_turn_through_oaimux_logs_its_token_usage(
    lab: Lab, anthropic: AnthropicMessages
) -> None:
    """``input_tokens`` from ``message_start``, ``output_tokens`` from the last ``message_delta``."""
    async with lab.proxy([CLAUDE_ROUTE]) as proxy:
        run = await lab.claude(proxy.url, api_key=CLAUDE_PROXY_KEY)
        [line] = await proxy.wait_line(r"path=/v1/messages ")
    assert_turn(run, anthropic.reply_text(CLAUDE_MODEL))
    output_tokens = len(anthropic.reply_deltas(CLAUDE_MODEL))
    assert f"prompt_tokens={anthropic.input_tokens} completion_tokens={output_tokens}" in line


async def test_claude_code_through_oaimux_routed_by_model(
    lab: Lab, aiohttp_server: Any, anthropic: AnthropicMessages
) -> None:
    sonnet = AnthropicMessages(name="sonnet", api_key=ANTHROPIC_UPSTREAM_KEY)
    sonnet_upstream = {
        "url": f"{await served_url(aiohttp_server, sonnet.app())}/v1",
        "headers": {"set": {"x-api-key": ANTHROPIC_UPSTREAM_KEY}},
    }
    routes = [{"model": "claude-sonnet-*", "upstream": "sonnet"}, CLAUDE_ROUTE]
    async with lab.proxy(routes, upstreams={"sonnet": sonnet_upstream}) as proxy:
        run = await lab.claude(proxy.url, api_key=CLAUDE_PROXY_KEY)
        lines = await proxy.wait_line(r"path=/v1/messages ")
    assert_turn(run, sonnet.reply_text(CLAUDE_MODEL))
    assert anthropic.received == []
    [sent] = sonnet.messages_received
    assert sent.headers["x-api-key"] == ANTHROPIC_UPSTREAM_KEY
    [line] = lines
    assert f"model={CLAUDE_MODEL}" in line and "upstream=sonnet" in line


async def test_claude_code_with_a_key_allowed_only_gpt_models_is_refused(
    lab: Lab, anthropic: AnthropicMessages
) -> None:
    # The path route stays, as a deployment of today has it: once /v1/messages
    # is routed by model, the model route and the key's allow-list decide.
    async with lab.proxy([CLAUDE_ROUTE, {"path": "messages*", "upstream": "anthropic"}]) as proxy:
        run = await lab.claude(proxy.url, api_key=GPT_ONLY_PROXY_KEY)
        lines = await proxy.wait_line(r"path=/v1/messages ")
    assert run.returncode != 0, str(run)
    assert anthropic.received == []
    assert all("status=403" in line and "error=model_not_allowed" in line for line in lines)


# -- Codex CLI -----------------------------------------------------------------


async def test_codex_completes_a_turn_over_http_against_the_fake_directly(
    lab: Lab, responses: OpenAIResponses
) -> None:
    run = await lab.codex(lab.responses_url, key=OPENAI_UPSTREAM_KEY, websockets=False)
    assert_turn(run, responses.reply_text(CODEX_MODEL))
    assert responses.connections == []
    [sent] = [r for r in responses.received if r.path == "/v1/responses"]
    assert sent.method == "POST"
    body = sent.json()
    assert body["model"] == CODEX_MODEL and body["stream"] is True
    assert PROMPT in json.dumps(body["input"])
    assert sent.headers["authorization"] == f"Bearer {OPENAI_UPSTREAM_KEY}"


async def test_codex_completes_a_turn_over_the_websocket_against_the_fake_directly(
    lab: Lab, responses: OpenAIResponses
) -> None:
    run = await lab.codex(lab.responses_url, key=OPENAI_UPSTREAM_KEY, websockets=True)
    assert_turn(run, responses.reply_text(CODEX_MODEL))
    assert [r.method for r in responses.received] == ["GET"]  # no HTTP turn
    [conn] = responses.connections
    assert WS_BETA in conn.handshake.headers["openai-beta"]
    assert conn.handshake.headers["authorization"] == f"Bearer {OPENAI_UPSTREAM_KEY}"
    prewarm, turn = conn.events()
    assert prewarm["type"] == "response.create" and prewarm["generate"] is False
    assert turn["type"] == "response.create" and turn.get("generate") is not False
    # The turn chains on the prewarm: both must reach the same upstream connection.
    assert turn["previous_response_id"] == conn.response_ids[0]
    assert prewarm["model"] == turn["model"] == CODEX_MODEL


@pytest.mark.parametrize(("status", "upgrades"), [(426, 1), (405, 3)])
async def test_codex_refused_websocket_falls_back_to_http(
    lab: Lab, responses: OpenAIResponses, status: int, upgrades: int
) -> None:
    """426 makes Codex give up the WebSocket after one try; other refusals are retried
    (1 + 2 with stream_max_retries = 1; 7 and ~7 s with Codex's default of 5)."""
    responses.ws_refuse = status
    run = await lab.codex(lab.responses_url, key=OPENAI_UPSTREAM_KEY, websockets=True)
    assert_turn(run, responses.reply_text(CODEX_MODEL))
    assert [r.method for r in responses.received] == ["GET"] * upgrades + ["POST"]


async def test_codex_over_http_through_oaimux_on_a_model_route(
    lab: Lab, responses: OpenAIResponses
) -> None:
    async with lab.proxy([CODEX_ROUTE]) as proxy:
        run = await lab.codex(proxy.url, key=CODEX_PROXY_KEY, websockets=False)
        [line] = await proxy.wait_line(r"path=/v1/responses ")
    assert_turn(run, responses.reply_text(CODEX_MODEL))
    [sent] = responses.received
    assert sent.method == "POST" and sent.path == "/v1/responses"
    assert sent.headers["authorization"] == f"Bearer {OPENAI_UPSTREAM_KEY}"
    assert CODEX_PROXY_KEY not in str(sent.headers)
    assert sent.json()["model"] == CODEX_MODEL
    assert f"model={CODEX_MODEL}" in line and "upstream=openai" in line and "key=codex" in line


async def test_a_finished_codex_turn_through_oaimux_is_logged_complete(
    lab: Lab, responses: OpenAIResponses
) -> None:
    """The upstream keeps the stream open after ``response.completed``; Codex hangs
    up once it has it. The turn is complete, and the upstream request is closed.
    (Claude Code reads a stream to its end, after ``message_stop`` too.)"""
    responses.hold_after_completed = True
    async with lab.proxy([CODEX_ROUTE]) as proxy:
        run = await lab.codex(proxy.url, key=CODEX_PROXY_KEY, websockets=False)
        [line] = await proxy.wait_line(r"path=/v1/responses ")
        async with asyncio.timeout(5):
            await responses.held_stream_left.wait()
    assert_turn(run, responses.reply_text(CODEX_MODEL))
    assert "outcome=complete" in line, line


async def test_codex_over_the_websocket_through_oaimux(
    lab: Lab, responses: OpenAIResponses
) -> None:
    async with lab.proxy([CODEX_ROUTE], responses_websocket=True) as proxy:
        run = await lab.codex(proxy.url, key=CODEX_PROXY_KEY, websockets=True)
        [line] = await proxy.wait_line(r"path=/v1/responses ")
    assert_turn(run, responses.reply_text(CODEX_MODEL))
    assert [r.method for r in responses.received] == ["GET"]  # no HTTP fallback
    # One session, routed by its first message (the prewarm's model).
    fields = access_fields(line)
    assert (fields["method"], fields["status"], fields["model"]) == ("GET", "101", CODEX_MODEL)
    assert (fields["upstream"], fields["key"]) == ("openai", "codex"), line
    # Codex drops the connection once it has response.completed: a finished turn.
    assert fields["outcome"] == "complete", line
    [conn] = responses.connections
    assert conn.handshake.headers["authorization"] == f"Bearer {OPENAI_UPSTREAM_KEY}"
    assert WS_BETA in conn.handshake.headers["openai-beta"]
    prewarm, turn = conn.events()
    assert prewarm["generate"] is False
    assert turn["previous_response_id"] == conn.response_ids[0]


async def test_codex_over_the_websocket_through_an_alias_has_every_turn_rewritten(
    lab: Lab, responses: OpenAIResponses
) -> None:
    """Codex names its model in every message (prewarm, then the turn): each
    reaches the upstream with the alias's target (README, "Codex CLI")."""
    alias = "team-codex"
    route = {"model": alias, "upstream": "openai", "rewrite_model": CODEX_MODEL}
    async with lab.proxy([route], responses_websocket=True) as proxy:
        run = await lab.codex(proxy.url, key=CODEX_PROXY_KEY, websockets=True, model=alias)
        [line] = await proxy.wait_line(r"path=/v1/responses ")
    assert_turn(run, responses.reply_text(CODEX_MODEL))
    assert "outcome=complete" in line, line
    [conn] = responses.connections
    assert [event["model"] for event in conn.events()] == [CODEX_MODEL, CODEX_MODEL]


async def test_codex_websocket_with_no_upstream_accepting_it_gets_426_and_falls_back(
    lab: Lab, responses: OpenAIResponses
) -> None:
    async with lab.proxy([CODEX_ROUTE]) as proxy:
        run = await lab.codex(proxy.url, key=CODEX_PROXY_KEY, websockets=True)
        await proxy.wait_line(r"method=POST path=/v1/responses ")
        upgrades = [f for f in access_lines(proxy, "/v1/responses") if f.get("method") == "GET"]
    assert_turn(run, responses.reply_text(CODEX_MODEL))
    assert [f["status"] for f in upgrades] == ["426"]  # one try, answered at once
    assert [r.method for r in responses.received] == ["POST"]  # the upgrade never left the proxy

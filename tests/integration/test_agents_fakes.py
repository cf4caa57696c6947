"""The fake agent upstreams, read by the official SDKs.

tests/integration/test_agents_cli.py runs Claude Code and Codex CLI against
tests/fakes/anthropic_messages.py and tests/fakes/openai_responses.py; here the
official ``anthropic`` and ``openai`` Python SDKs parse the same fakes, event
by event into their typed models, so the fakes are checked against clients
nobody here wrote even where node is missing. The WebSocket's chaining rule
(``previous_response_id`` only on the connection that made it) is checked with
aiohttp's client: it is what a relay must preserve.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import openai
import pytest
from aiohttp import ClientSession, WSMsgType
from aiohttp.test_utils import TestServer

from tests.fakes.anthropic_messages import AnthropicMessages
from tests.fakes.openai_responses import OpenAIResponses

KEY = "sk-fake-upstream-key-0001"
CLAUDE = "claude-sonnet-5-5"
GPT = "gpt-5-codex"


@pytest.fixture
def messages_fake() -> AnthropicMessages:
    return AnthropicMessages(name="anthropic", api_key=KEY)


@pytest.fixture
async def anthropic_sdk(
    aiohttp_server: Any, messages_fake: AnthropicMessages
) -> AsyncIterator[anthropic.AsyncAnthropic]:
    server: TestServer = await aiohttp_server(messages_fake.app())
    client = anthropic.AsyncAnthropic(base_url=str(server.make_url("")), api_key=KEY, max_retries=0)
    yield client
    await client.close()


@pytest.fixture
def responses_fake() -> OpenAIResponses:
    return OpenAIResponses(name="openai", api_key=KEY)


@pytest.fixture
async def responses_server(aiohttp_server: Any, responses_fake: OpenAIResponses) -> TestServer:
    server: TestServer = await aiohttp_server(responses_fake.app())
    return server


async def test_anthropic_sdk_streams_the_fake_event_by_event(
    anthropic_sdk: anthropic.AsyncAnthropic, messages_fake: AnthropicMessages
) -> None:
    events = []
    async with anthropic_sdk.messages.stream(
        model=CLAUDE, max_tokens=64, messages=[{"role": "user", "content": "say hi"}]
    ) as stream:
        async for event in stream:
            events.append(event.type)
        final = await stream.get_final_message()
    text = messages_fake.reply_text(CLAUDE)
    assert "".join(b.text for b in final.content if b.type == "text") == text
    assert final.stop_reason == "end_turn"
    assert final.usage.input_tokens == messages_fake.input_tokens
    assert final.usage.output_tokens == len(messages_fake.reply_deltas(CLAUDE))
    # The SDK's own events: its text events come from each text_delta.
    assert events.count("text") == len(messages_fake.reply_deltas(CLAUDE))
    assert events[0] == "message_start" and events[-1] == "message_stop"
    sent = messages_fake.sent_stream.decode()
    names = [
        line.removeprefix("event: ") for line in sent.splitlines() if line.startswith("event: ")
    ]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]


async def test_anthropic_sdk_reads_a_message_and_a_token_count(
    anthropic_sdk: anthropic.AsyncAnthropic, messages_fake: AnthropicMessages
) -> None:
    message = await anthropic_sdk.messages.create(
        model=CLAUDE, max_tokens=64, messages=[{"role": "user", "content": "say hi"}]
    )
    assert message.content[0].type == "text"
    assert message.content[0].text == messages_fake.reply_text(CLAUDE)
    count = await anthropic_sdk.messages.count_tokens(
        model=CLAUDE, messages=[{"role": "user", "content": "say hi"}]
    )
    assert count.input_tokens == messages_fake.input_tokens
    assert [r.path for r in messages_fake.received] == ["/v1/messages", "/v1/messages/count_tokens"]
    assert all(r.headers["x-api-key"] == KEY for r in messages_fake.received)


async def test_anthropic_sdk_gets_the_fakes_errors_as_its_exception_classes(
    aiohttp_server: Any, messages_fake: AnthropicMessages
) -> None:
    server: TestServer = await aiohttp_server(messages_fake.app())
    async with anthropic.AsyncAnthropic(
        base_url=str(server.make_url("")), api_key="sk-wrong-key-0001", max_retries=0
    ) as client:
        with pytest.raises(anthropic.AuthenticationError):
            await client.messages.create(
                model=CLAUDE, max_tokens=8, messages=[{"role": "user", "content": "hi"}]
            )
        with pytest.raises(anthropic.NotFoundError):
            await client.models.retrieve("claude-unknown")  # a path the fake does not serve


async def test_openai_sdk_streams_a_response_from_the_fake(
    responses_server: TestServer, responses_fake: OpenAIResponses
) -> None:
    async with openai.AsyncOpenAI(
        base_url=str(responses_server.make_url("/v1")), api_key=KEY, max_retries=0
    ) as client:
        deltas = []
        async with client.responses.stream(model=GPT, input="say hi") as stream:
            async for event in stream:
                if event.type == "response.output_text.delta":
                    deltas.append(event.delta)
            final = await stream.get_final_response()
    assert deltas == responses_fake.reply_deltas(GPT)
    assert final.output_text == responses_fake.reply_text(GPT)
    assert final.status == "completed"
    assert final.usage is not None and final.usage.output_tokens == len(deltas)
    assert responses_fake.received[0].headers["authorization"] == f"Bearer {KEY}"


async def test_websocket_turns_chain_only_on_their_own_connection(
    responses_server: TestServer, responses_fake: OpenAIResponses
) -> None:
    url = responses_server.make_url("/v1/responses")
    headers = {"Authorization": f"Bearer {KEY}"}
    async with ClientSession() as session:
        async with session.ws_connect(url, headers=headers) as first:
            await first.send_json({"type": "response.create", "model": GPT, "generate": False})
            prewarm = [json.loads((await first.receive()).data) for _ in range(3)]
            assert [e["type"] for e in prewarm] == [
                "response.created",
                "response.in_progress",
                "response.completed",
            ]
            prewarm_id = prewarm[-1]["response"]["id"]
            await first.send_json(
                {"type": "response.create", "model": GPT, "previous_response_id": prewarm_id}
            )
            turn: list[dict[str, Any]] = []
            while not turn or turn[-1]["type"] != "response.completed":
                msg = await first.receive(timeout=5)
                assert msg.type is WSMsgType.TEXT
                turn.append(json.loads(msg.data))
            text = "".join(e["delta"] for e in turn if e["type"] == "response.output_text.delta")
            assert text == responses_fake.reply_text(GPT)
            assert [e["sequence_number"] for e in turn] == list(range(len(turn)))
        # The same id on another connection: the upstream does not know it.
        async with session.ws_connect(url, headers=headers) as second:
            await second.send_json(
                {"type": "response.create", "model": GPT, "previous_response_id": prewarm_id}
            )
            error = json.loads((await second.receive(timeout=5)).data)
    assert error["type"] == "error"
    assert error["error"]["code"] == "previous_response_not_found"
    assert responses_fake.turns_completed == 1

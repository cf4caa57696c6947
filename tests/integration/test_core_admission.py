"""The rate limit is checked before the body is read when the bucket cannot
depend on the route: a client over its limit costs no body read."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.conftest import basic_config


async def _status_without_sending_body(host: str, port: int, length: int) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {length}\r\n\r\n".encode()
        )
        await writer.drain()
        # The body never comes: only an answer that does not wait for it arrives.
        return await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()


async def test_throttled_client_gets_429_while_its_body_is_still_unsent(
    make_proxy_server: Any, upstream_url: str
) -> None:
    server = await make_proxy_server(
        basic_config(upstream_url, rate_limit={"requests_per_minute": 1, "burst": 1})
    )
    reader, writer = await asyncio.open_connection(server.host, server.port)
    body = b'{"model": "gpt-4o-mini"}'
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    status = await asyncio.wait_for(reader.readline(), 10)
    assert status.startswith(b"HTTP/1.1 200"), status
    writer.close()
    line = await _status_without_sending_body(server.host, server.port, 5_000_000)
    assert line.startswith(b"HTTP/1.1 429"), line


async def test_with_route_limits_the_route_bucket_is_charged(
    make_proxy: Any, upstream_url: str
) -> None:
    config = basic_config(upstream_url)
    config["routes"][0]["rate_limit"] = {"requests_per_minute": 1, "burst": 1}
    client = await make_proxy(config)
    body = b'{"model": "gpt-4o-mini"}'
    assert (await client.post("/v1/embeddings", data=body)).status == 200
    assert (await client.post("/v1/embeddings", data=body)).status == 429
    # Another route, no limit of its own and no global one: still served.
    other = await client.post("/v1/embeddings", data=b'{"model": "fast"}')
    assert other.status == 200


async def test_a_budget_on_another_key_does_not_make_this_one_wait_for_its_body(
    make_proxy_server: Any, upstream_url: str
) -> None:
    """Only a request whose own block (its key's, else the global one) has a
    token budget is charged after its body is read (README, "Token budgets")."""
    keys = [
        {"name": "metered", "key": "sk-metered", "rate_limit": {"tokens_per_minute": 10_000}},
        {"name": "plain", "key": "sk-plain"},
    ]
    server = await make_proxy_server(
        basic_config(
            upstream_url,
            auth={"keys": keys},
            rate_limit={"requests_per_minute": 1, "burst": 1},
        )
    )
    body = b'{"model": "gpt-4o-mini"}'
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer sk-plain\r\n"
    )
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(head + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    status = await asyncio.wait_for(reader.readline(), 10)
    assert status.startswith(b"HTTP/1.1 200"), status
    writer.close()
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(head + b"Content-Length: 5000000\r\n\r\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
    assert line.startswith(b"HTTP/1.1 429"), line

"""A raised rate limit is felt at once: real ``python -m proxy serve``, real SIGHUP.

A client drained under ``1/min, burst 20`` owes 20 minutes. After a SIGHUP to
``6000/min, burst 100`` it must wait no longer than the new limit can ever
make a client wait (one token, 10 ms), not the 20 minutes the old one named;
in memory and in a real Redis.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.faults import fixtures
from tests.faults.fixtures import JSON, FaultFactory, chat_body, route_config
from tests.faults.process import running_proxy, write_config
from tests.faults.server import chat_json, respond

faults = fixtures.faults

OLD = {"requests_per_minute": 1, "burst": 20}
RAISED = {"requests_per_minute": 6000, "burst": 100}  # 10 ms a token


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def storage(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory"
    url: str = request.getfixturevalue("redis_server").url
    return url


def config_for(url: str, storage: str, limit: dict[str, int]) -> dict[str, Any]:
    config = route_config({"u": url}, "u")
    config["log"] = {"access": False}
    config["rate_limit"] = {**limit, "storage": storage}
    return config


async def ask(session: aiohttp.ClientSession, base: str) -> tuple[int, dict[str, str]]:
    async with session.post(f"{base}/v1/chat/completions", data=chat_body(), headers=JSON) as resp:
        await resp.read()
        return resp.status, dict(resp.headers)


async def test_a_raised_limit_relieves_a_drained_client_at_once(
    tmp_path: Path, faults: FaultFactory, storage: str
) -> None:
    upstream = await faults(default=respond(200, chat_json()))
    path = write_config(tmp_path / "routes.yaml", config_for(upstream.url, storage, OLD))
    async with running_proxy(path) as proxy, aiohttp.ClientSession() as session:
        assert [(await ask(session, proxy.url))[0] for _ in range(20)] == [200] * 20
        status, headers = await ask(session, proxy.url)
        assert status == 429 and headers["Retry-After"] == "60"

        write_config(path, config_for(upstream.url, storage, RAISED))
        proxy.signal(signal.SIGHUP)
        await proxy.wait_line(r"reloaded .*routes\.yaml")
        # The old debt, cut to the most the new limit can owe (an emptied
        # bucket): one token of the new limit to wait for, then served.
        status, headers = await ask(session, proxy.url)
        assert status == 429
        assert headers["retry-after-ms"] == "10"
        assert headers["Retry-After"] == "1"  # whole seconds, at least 1
        assert headers["x-ratelimit-reset-requests"] == "1s"
        await asyncio.sleep(0.015)  # the 10 ms the 429 names, and a margin
        assert (await ask(session, proxy.url))[0] == 200
    assert len(upstream.requests) == 21

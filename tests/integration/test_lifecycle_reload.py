"""SIGHUP against a real ``python -m proxy serve``: a good file is swapped in
atomically (requests in flight finish on the old one), a bad one is refused
with the reason logged, and a reload under load loses no request."""

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
from tests.faults.server import chat_json, gated, respond

# The shared fixture, bound here so pytest finds it.
faults = fixtures.faults


def ok(text: str) -> Any:
    return respond(200, chat_json(text))


def config_for(url: str, **extra: Any) -> dict[str, Any]:
    config = route_config({"u": url}, "u")
    config["log"] = {"access": False}  # quiet under load; lifecycle lines remain
    config.update(extra)
    return config


async def ask(session: aiohttp.ClientSession, base: str, model: str = "m") -> tuple[int, str]:
    async with session.post(
        f"{base}/v1/chat/completions", data=chat_body(model=model), headers=JSON
    ) as resp:
        if resp.status != 200:
            return resp.status, await resp.text()
        return 200, (await resp.json())["choices"][0]["message"]["content"]


async def test_reload_swaps_for_new_requests_and_spares_those_in_flight(
    tmp_path: Path, faults: FaultFactory
) -> None:
    release = asyncio.Event()
    old = await faults(gated(release, ok("old")), default=ok("old"))
    new = await faults(default=ok("new"))
    path = write_config(tmp_path / "routes.yaml", config_for(old.url))
    async with running_proxy(path) as proxy, aiohttp.ClientSession() as session:
        in_flight = asyncio.ensure_future(ask(session, proxy.url))
        await old.wait_requests(1)
        write_config(path, config_for(new.url))
        proxy.signal(signal.SIGHUP)
        await proxy.wait_line(r"reloaded .*routes.yaml")
        assert await ask(session, proxy.url) == (200, "new")
        release.set()
        assert await in_flight == (200, "old")  # finished on the config it started with
        async with session.get(f"{proxy.url}/about") as resp:
            assert (await resp.json())["reloads"] == 1


@pytest.mark.parametrize(
    ("broken", "reason"),
    [
        ("routes: [\n  {model: m, upstream: u\n", "not valid YAML"),
        (
            "upstreams: {u: {url: 'http://127.0.0.1:1/v1'}}\nroutes: [{model: m, upstream: nope}]\n",
            "routes[0].upstream: unknown upstream 'nope'",
        ),
        (
            "upstreams: {u: {url: '${OAIMUX_TEST_UNSET_URL}'}}\nroutes: [{model: m, upstream: u}]\n",
            "environment variable OAIMUX_TEST_UNSET_URL is not set",
        ),
    ],
    ids=["yaml", "unknown-upstream", "missing-env"],
)
async def test_bad_reload_keeps_the_running_config(
    tmp_path: Path, faults: FaultFactory, broken: str, reason: str
) -> None:
    upstream = await faults(default=ok("still here"))
    path = write_config(tmp_path / "routes.yaml", config_for(upstream.url))
    async with running_proxy(path) as proxy, aiohttp.ClientSession() as session:
        path.write_text(broken)
        proxy.signal(signal.SIGHUP)
        [line] = await proxy.wait_line("reload failed, keeping the running config")
        assert str(path) in line and reason in line
        assert await ask(session, proxy.url) == (200, "still here")
        async with session.get(f"{proxy.url}/about") as resp:
            assert (await resp.json())["reloads"] == 0


async def test_reload_that_needs_a_restart_says_so(tmp_path: Path, faults: FaultFactory) -> None:
    upstream = await faults(default=ok("x"))
    path = write_config(tmp_path / "routes.yaml", config_for(upstream.url))
    async with running_proxy(path) as proxy:
        write_config(
            path, config_for(upstream.url, server={"shutdown_grace_seconds": 5, "port": 1})
        )
        proxy.signal(signal.SIGHUP)
        [line] = await proxy.wait_line("need a restart")
        assert "server.port" in line and "server.shutdown_grace_seconds" in line


async def test_reloads_in_the_middle_of_1000_requests_lose_none(
    tmp_path: Path, faults: FaultFactory
) -> None:
    one = await faults(default=ok("one"))
    two = await faults(default=ok("two"))
    configs = [config_for(one.url), config_for(two.url)]
    path = write_config(tmp_path / "routes.yaml", configs[0])
    total, concurrency, reloads = 1000, 50, 10
    async with running_proxy(path) as proxy, aiohttp.ClientSession() as session:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(total):
            queue.put_nowait(i)
        results: list[tuple[int, str]] = []
        reloaded = 0

        async def client() -> None:
            nonlocal reloaded
            while not queue.empty():
                i = queue.get_nowait()
                if i and i % (total // (reloads + 1)) == 0 and reloaded < reloads:
                    # Mid-load, from inside the stream of requests: swap files, SIGHUP.
                    reloaded += 1
                    write_config(path, configs[reloaded % 2])
                    proxy.signal(signal.SIGHUP)
                results.append(await ask(session, proxy.url))

        async with asyncio.timeout(120):
            await asyncio.gather(*(client() for _ in range(concurrency)))
        await proxy.wait_line(r"reloaded .*routes.yaml", count=reloads)
    failures = [r for r in results if r[0] != 200]
    assert len(results) == total
    assert failures == []
    served = {text for _, text in results}
    assert served == {"one", "two"}  # the reloads really switched upstreams under load
    assert len(one.requests) + len(two.requests) == total

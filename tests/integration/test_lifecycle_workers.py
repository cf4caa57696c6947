"""``oaimux serve --workers 2``: two processes share the port; SIGHUP and
SIGTERM sent to the supervisor reach both; a worker that dies is replaced."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.faults import fixtures
from tests.faults.fixtures import JSON, FaultFactory, chat_body, route_config
from tests.faults.process import ProxyProcess, running_proxy, write_config
from tests.faults.server import chat_json, delayed, respond, sse

# The shared fixture, bound here so pytest finds it.
faults = fixtures.faults

pytestmark = pytest.mark.skipif(
    not hasattr(socket, "SO_REUSEPORT"), reason="--workers needs SO_REUSEPORT"
)


def config_for(url: str, model: str = "m") -> dict[str, Any]:
    config = route_config({"u": url}, "u")
    config["routes"][0]["model"] = model
    config["log"] = {"access": False}
    config["server"] = {"shutdown_grace_seconds": 10}
    # Lifecycle only: metrics' cross-worker sharing is tested on its own
    # (test_observability_workers.py).
    config["metrics"] = {"enabled": False}
    return config


async def about_from_each_worker(proxy: ProxyProcess, workers: int) -> dict[int, dict[str, Any]]:
    """``/about`` over fresh connections until every worker answered (bounded)."""
    seen: dict[int, dict[str, Any]] = {}
    connector = aiohttp.TCPConnector(force_close=True)  # a new connection each time
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(400):
            async with session.get(f"{proxy.url}/about") as resp:
                about = await resp.json()
            seen[about["pid"]] = about
            if len(seen) == workers:
                return seen
    raise AssertionError(f"only saw workers {sorted(seen)}")


async def worker_pids(proxy: ProxyProcess, workers: int) -> set[int]:
    lines = await proxy.wait_line(r"oaimux serving .*\(pid \d+\)", count=workers)
    return {int(line.rsplit("(pid ", 1)[1].split(")")[0]) for line in lines}


async def test_two_workers_serve_reload_and_stop_together(
    tmp_path: Path, faults: FaultFactory
) -> None:
    upstream = await faults(default=respond(200, chat_json()))
    path = write_config(tmp_path / "routes.yaml", config_for(upstream.url))
    async with running_proxy(path, "--workers", "2") as proxy:
        pids = await worker_pids(proxy, 2)
        assert proxy.proc.pid not in pids and len(pids) == 2
        # Requests are spread over both workers.
        assert set(await about_from_each_worker(proxy, 2)) == pids

        # A bad file is refused once, by the supervisor, and never reaches a worker.
        path.write_text("routes: [")
        proxy.signal(signal.SIGHUP)
        await proxy.wait_line("reload refused, the workers keep the running config")
        assert all(a["reloads"] == 0 for a in (await about_from_each_worker(proxy, 2)).values())

        # A good one reaches both: each logs it, each serves the new route.
        write_config(path, config_for(upstream.url, model="m2"))
        proxy.signal(signal.SIGHUP)
        lines = await proxy.wait_line(r"reloaded .*\(pid \d+\)", count=2)
        assert {int(line.rsplit("(pid ", 1)[1].split(")")[0]) for line in lines} == pids
        assert all(a["reloads"] == 1 for a in (await about_from_each_worker(proxy, 2)).values())
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(20):
                async with session.post(
                    f"{proxy.url}/v1/chat/completions",
                    data=chat_body(model="m2"),
                    headers=JSON,
                ) as resp:
                    assert resp.status == 200

        proxy.signal(signal.SIGTERM)
        assert await proxy.wait_exit() == 0
    stopped = proxy.matching(r"stopped \(pid (\d+)\)")
    assert {int(m.group(1)) for m in stopped} == pids


async def test_sigterm_drains_a_stream_on_a_worker(tmp_path: Path, faults: FaultFactory) -> None:
    release = asyncio.Event()
    upstream = await faults(sse(1, before_end=release))
    path = write_config(tmp_path / "routes.yaml", config_for(upstream.url))
    async with (
        running_proxy(path, "--workers", "2") as proxy,
        aiohttp.ClientSession() as session,
    ):
        await worker_pids(proxy, 2)
        stream = await session.post(
            f"{proxy.url}/v1/chat/completions", data=chat_body(stream=True), headers=JSON
        )
        await stream.content.readuntil(b"\n\n")
        proxy.signal(signal.SIGTERM)
        await proxy.wait_line(r"stopping \(pid \d+\)", count=2)
        release.set()
        assert (await stream.read()).endswith(b"data: [DONE]\n\n")
        assert await proxy.wait_exit() == 0


def pid_in(line: str) -> int:
    return int(line.rsplit("(pid ", 1)[1].split(")")[0])


class PinnedClient:
    """One kept-alive connection, so it stays on the worker that accepted it."""

    def __init__(self) -> None:
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
        self.pid = 0
        self.outcomes: list[bool] = []

    async def learn_worker(self, proxy: ProxyProcess) -> int:
        async with self.session.get(f"{proxy.url}/about") as resp:
            self.pid = int((await resp.json())["pid"])
        return self.pid


async def one_request(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.post(url, data=chat_body(), headers=JSON) as resp:
            await resp.read()
            return resp.status == 200
    except aiohttp.ClientError:
        return False


async def test_a_killed_worker_is_replaced_while_the_others_serve(
    tmp_path: Path, faults: FaultFactory
) -> None:
    """``kill -9`` of one worker under load: requests on the other worker do not
    fail, new connections are served throughout, and a replacement starts."""
    upstream = await faults(default=delayed(0.02, respond(200, chat_json())))
    path = write_config(tmp_path / "routes.yaml", config_for(upstream.url))
    async with running_proxy(path, "--workers", "2") as proxy:
        pids = await worker_pids(proxy, 2)
        url = f"{proxy.url}/v1/chat/completions"
        # Kept-alive clients, at least two on each worker (bounded).
        pinned: list[PinnedClient] = []
        for _ in range(60):
            client = PinnedClient()
            pinned.append(client)
            await client.learn_worker(proxy)
            if all(sum(c.pid == pid for c in pinned) >= 2 for pid in pids):
                break
        victim = pinned[0].pid
        (survivor,) = pids - {victim}
        # Fresh-connection clients: (started, ok) per request.
        fresh_outcomes: list[tuple[float, bool]] = []
        counted = asyncio.Condition()
        running = True

        async def fresh_served(n: int) -> None:
            async with asyncio.timeout(30), counted:
                await counted.wait_for(lambda: len(fresh_outcomes) >= n)

        async def pinned_loop(client: PinnedClient) -> None:
            while running:
                client.outcomes.append(await one_request(client.session, url))

        async def fresh_loop(session: aiohttp.ClientSession) -> None:
            while running:
                started = time.perf_counter()
                fresh_outcomes.append((started, await one_request(session, url)))
                async with counted:
                    counted.notify_all()

        fresh = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True, limit=0))
        load = [asyncio.create_task(pinned_loop(c)) for c in pinned]
        load += [asyncio.create_task(fresh_loop(fresh)) for _ in range(8)]
        try:
            await fresh_served(100)  # under load
            os.kill(victim, signal.SIGKILL)
            await proxy.wait_line(rf"worker {victim} was killed by SIGKILL")
            death_seen = time.perf_counter()
            (started_line,) = await proxy.wait_line(r"started worker \d+ in place of one that died")
            replacement = int(started_line.split("started worker ")[1].split()[0])
            await proxy.wait_line(rf"oaimux serving .*\(pid {replacement}\)")
            await fresh_served(len(fresh_outcomes) + 200)  # and on, with the replacement
        finally:
            running = False
            await asyncio.gather(*load)
            await fresh.close()
            for client in pinned:
                await client.session.close()

        # Requests on the survivor never failed.
        on_survivor = [c for c in pinned if c.pid == survivor]
        assert on_survivor and all(all(c.outcomes) for c in on_survivor)
        # A client on the victim lost at most the request in flight, then reconnected.
        for client in pinned:
            if client.pid == victim:
                assert client.outcomes.count(False) <= 1 and client.outcomes[-1]
        # New connections were served throughout once the victim was gone.
        assert all(ok for started, ok in fresh_outcomes if started > death_seen)
        assert set(await about_from_each_worker(proxy, 2)) == {survivor, replacement}
        proxy.signal(signal.SIGTERM)
        assert await proxy.wait_exit() == 0


async def test_workers_dying_too_often_stop_the_service(
    tmp_path: Path, faults: FaultFactory
) -> None:
    """Each death is logged with its status or signal; a replacement serves the
    configuration in force; more than N deaths within a minute stop everything
    with a non-zero status, for the service manager to act on."""
    upstream = await faults(default=respond(200, chat_json()))
    path = write_config(tmp_path / "routes.yaml", config_for(upstream.url))
    async with running_proxy(path, "--workers", "2") as proxy:
        first = sorted(await worker_pids(proxy, 2))
        write_config(path, config_for(upstream.url, model="m2"))
        proxy.signal(signal.SIGHUP)
        await proxy.wait_line(r"reloaded .*\(pid \d+\)", count=2)

        os.kill(first[0], signal.SIGKILL)
        (line,) = await proxy.wait_line(r"started worker \d+ in place")
        replacement = int(line.split("started worker ")[1].split()[0])
        await proxy.wait_line(rf"oaimux serving .*\(pid {replacement}\)")
        # The replacement serves the reloaded routes, like its sibling.
        about = await about_from_each_worker(proxy, 2)
        assert set(about) == {first[1], replacement}
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(20):
                async with session.post(
                    f"{proxy.url}/v1/chat/completions", data=chat_body(model="m2"), headers=JSON
                ) as resp:
                    assert resp.status == 200

        os.kill(replacement, signal.SIGTERM)  # a worker stopped by someone else: exit 0
        await proxy.wait_line(rf"worker {replacement} exited with status 0")
        await proxy.wait_line(r"started worker \d+ in place", count=2)
        await proxy.wait_line(r"oaimux serving", count=4)
        os.kill(first[1], signal.SIGKILL)  # the third death within a minute, for 2 workers
        assert await proxy.wait_exit() == 1
    assert proxy.matching(rf"worker {first[0]} was killed by SIGKILL")
    assert proxy.matching(rf"worker {first[1]} was killed by SIGKILL")
    assert proxy.matching(r"3 workers died within 60s; stopping all of them")
    assert len(proxy.matching(r"stopped \(pid \d+\)")) == 2  # the one sent SIGTERM, the last one


async def in_flight(session: aiohttp.ClientSession, proxy: ProxyProcess) -> float:
    async with session.get(f"{proxy.url}/metrics") as resp:
        text = await resp.text()
    (line,) = [x for x in text.splitlines() if x.startswith("oaimux_requests_in_flight ")]
    return float(line.split()[1])


async def test_a_dead_workers_requests_leave_the_shared_metrics(
    tmp_path: Path, faults: FaultFactory
) -> None:
    """The in-flight gauge summed over the workers forgets a killed worker's
    stream (its counters stay in the totals)."""
    upstream = await faults(sse(1, end="hang"), default=respond(200, chat_json()))
    config = config_for(upstream.url)
    config["metrics"] = {"enabled": True}
    path = write_config(tmp_path / "routes.yaml", config)
    async with running_proxy(path, "--workers", "2") as proxy:
        await worker_pids(proxy, 2)
        pinned = PinnedClient()
        fresh = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        try:
            victim = await pinned.learn_worker(proxy)
            stream = await pinned.session.post(
                f"{proxy.url}/v1/chat/completions", data=chat_body(stream=True), headers=JSON
            )
            await stream.content.readuntil(b"\n\n")
            async with asyncio.timeout(10):  # workers publish their samples every second
                while await in_flight(fresh, proxy) != 1:
                    await asyncio.sleep(0.1)
            os.kill(victim, signal.SIGKILL)
            (line,) = await proxy.wait_line(r"started worker \d+ in place")
            replacement = int(line.split("started worker ")[1].split()[0])
            await proxy.wait_line(rf"oaimux serving .*\(pid {replacement}\)")
            async with asyncio.timeout(10):
                while await in_flight(fresh, proxy) != 0:
                    await asyncio.sleep(0.1)
            stream.close()
        finally:
            await fresh.close()
            await pinned.session.close()

"""Bench: what do clients see when one worker of ``--workers N`` is killed
under load? Run ``python -m tests.faults.worker_kill [--workers N] [--seconds S]``.

Not a test (the bounded one is in tests/integration/test_lifecycle_workers.py):
it starts a real ``python -m proxy serve --workers N`` in front of a fault
server on 127.0.0.1 answering each chat request after 20 ms, runs 32 clients
that each send one request after another, every one on a new connection,
sends SIGKILL to one worker halfway through, and prints how many requests
failed, how (refused, reset...), when relative to the kill, and how long the
supervisor took to start the replacement.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import signal
import tempfile
import time
from pathlib import Path

import aiohttp

from tests.faults.fixtures import JSON, chat_body, route_config
from tests.faults.process import running_proxy, write_config
from tests.faults.server import FaultServer, chat_json, delayed, respond

CLIENTS = 32


async def client(
    session: aiohttp.ClientSession,
    url: str,
    until: float,
    outcomes: list[tuple[float, float, str]],
) -> None:
    body = chat_body()
    while time.perf_counter() < until:
        started = time.perf_counter()
        try:
            async with session.post(url, data=body, headers=JSON) as resp:
                await resp.read()
                outcome = "ok" if resp.status == 200 else f"status {resp.status}"
        except aiohttp.ClientConnectorError:
            outcome = "refused"
        except aiohttp.ClientError as exc:
            outcome = type(exc).__name__
        outcomes.append((started, time.perf_counter(), outcome))


async def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.worker_kill")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    upstream = await FaultServer(delayed(0.02, respond(200, chat_json()))).start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config = route_config({"a": upstream.url}, "a")
            config["log"] = {"access": False}
            config["metrics"] = {"enabled": False}
            path = write_config(Path(tmp) / "routes.yaml", config)
            async with running_proxy(path, "--workers", str(args.workers)) as proxy:
                lines = await proxy.wait_line(r"oaimux serving", count=args.workers)
                victim = int(lines[0].rsplit("(pid ", 1)[1].rstrip(")"))
                url = f"{proxy.url}/v1/chat/completions"
                outcomes: list[tuple[float, float, str]] = []
                fresh = aiohttp.TCPConnector(force_close=True, limit=0)
                async with aiohttp.ClientSession(connector=fresh) as session:
                    start = time.perf_counter()
                    until = start + args.seconds
                    load = [
                        asyncio.create_task(client(session, url, until, outcomes))
                        for _ in range(CLIENTS)
                    ]
                    await asyncio.sleep(args.seconds / 2)
                    killed = time.perf_counter()
                    os.kill(victim, signal.SIGKILL)
                    await proxy.wait_line(rf"worker {victim} was killed by SIGKILL")
                    seen_death = time.perf_counter()
                    await proxy.wait_line(r"started worker \d+ in place of one that died")
                    await proxy.wait_line(r"oaimux serving", count=args.workers + 1)
                    replaced = time.perf_counter()
                    await asyncio.gather(*load)
                proxy.signal(signal.SIGTERM)
                code = await proxy.wait_exit()
    finally:
        await upstream.close()
    failed = [(s, e, o) for s, e, o in outcomes if o != "ok"]
    kinds = collections.Counter(o for _, _, o in failed)
    print(
        f"--workers {args.workers}, {CLIENTS} clients, a new connection per request: "
        f"{len(outcomes)} requests, {len(failed)} failed {dict(kinds)}"
    )
    if failed:
        first = min(s for s, _, _ in failed) - killed
        last = max(e for _, e, _ in failed) - killed
        print(
            f"  failures started {first * 1000:+.0f} ms and ended {last * 1000:+.0f} ms from the kill"
        )
        after = [f for f in failed if f[0] > seen_death]
        print(
            f"  failed among requests started after the supervisor logged the death: {len(after)}"
        )
    print(
        f"  supervisor logged the death {(seen_death - killed) * 1000:.0f} ms after the kill; "
        f"replacement serving {(replaced - killed) * 1000:.0f} ms after; "
        f"supervisor exit on SIGTERM: {code}"
    )


if __name__ == "__main__":
    asyncio.run(main())

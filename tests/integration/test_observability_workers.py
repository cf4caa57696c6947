"""``--workers 2`` as real processes: one scrape sees every worker's requests.

The proxy runs as ``python -m proxy serve --workers 2`` in front of the
in-process fake upstream; each request uses a new connection, so the kernel
spreads them over both workers (SO_REUSEPORT). The metrics are served on
their own listener (``metrics.listen``), as an operator keeping them off the
public port would.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.access_lines import parse_text_line

ROOT = Path(__file__).parents[2]
REQUESTS = 40


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_healthy(url: str, proc: asyncio.subprocess.Process) -> None:
    async with asyncio.timeout(30), aiohttp.ClientSession() as session:
        while True:
            assert proc.returncode is None, "oaimux exited during start-up"
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)  # polling a starting process, bounded by the timeout


def requests_total(text: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "oaimux_requests_total":
                total += s.value
    return total


async def test_two_workers_one_scrape(upstream_url: str, tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    temp = tmp_path / "tmp"
    temp.mkdir()
    config = tmp_path / "routes.yaml"
    config.write_text(
        f"server: {{host: 127.0.0.1}}\n"
        f"metrics: {{listen: '127.0.0.1:{metrics_port}'}}\n"
        f"upstreams: {{fake: {{url: '{upstream_url}'}}}}\n"
        "routes: [{model: gpt-4o-mini, upstream: fake}]\n"
    )
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("OAIMUX_", "PORT", "PROMETHEUS_"))
    }
    env["TMPDIR"] = str(temp)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", str(port), "--workers", "2",
        cwd=ROOT, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    stderr = asyncio.ensure_future(proc.stderr.read())
    try:
        await wait_healthy(f"http://127.0.0.1:{port}/healthz", proc)
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        # A new connection per request: the kernel picks a worker for each.
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True)
        ) as session:
            for _ in range(REQUESTS):
                async with session.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions", json=body
                ) as resp:
                    assert resp.status == 200
                    await resp.read()
            (shared,) = temp.glob("oaimux-metrics-*")
            # Each worker publishes its counters within a second (observe/metrics.py, _SYNC_SECONDS).
            async with asyncio.timeout(10):
                while True:
                    async with session.get(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
                        if requests_total(await resp.text()) == REQUESTS:
                            break
                    await asyncio.sleep(0.1)  # bounded polling for the workers' next sync
            pids = {
                m.group(1)
                for f in shared.iterdir()
                if (m := re.fullmatch(r"counter_(\d+)\.db", f.name))
            }
            assert len(pids) == 2, f"expected both workers to have counted, got files for {pids}"
            for _ in range(10):  # whichever worker answers, it reports all of them
                async with session.get(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
                    text = await resp.text()
                assert requests_total(text) == REQUESTS
                assert "oaimux_requests_in_flight 0.0" in text
            async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                assert resp.status == 404  # moved to metrics.listen: an unknown URL here
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            code = await proc.wait()
            log = (await stderr).decode()
    assert code == 0, log
    assert not list(temp.glob("oaimux-metrics-*")), "the shared metrics directory was left behind"
    access = [line for line in log.splitlines() if line.startswith("time=")]
    assert len(access) == REQUESTS + 1, log
    assert [parse_text_line(line)["status"] for line in access] == ["200"] * REQUESTS + ["404"]

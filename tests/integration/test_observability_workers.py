"""``--workers 2`` as real processes: one scrape sees every worker's requests.

The proxy runs as ``python -m proxy serve --workers 2`` in front of the
in-process fake upstream; each request uses a new connection, so the kernel
spreads them over both workers (SO_REUSEPORT). The metrics are served on
their own listener (``metrics.listen``), as an operator keeping them off the
public port would.
"""

from __future__ import annotations

import asyncio
import re
import signal
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.access_lines import parse_text_line
from tests.faults.process import free_port, running_proxy

REQUESTS = 40


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
    serving = running_proxy(config, "--workers", "2", port=port, env={"TMPDIR": str(temp)})
    async with serving as proxy:
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
        proxy.signal(signal.SIGTERM)
        code = await proxy.wait_exit(30)
    log = proxy.text()
    assert code == 0, log
    assert not list(temp.glob("oaimux-metrics-*")), "the shared metrics directory was left behind"
    access = [line for line in log.splitlines() if line.startswith("time=")]
    assert len(access) == REQUESTS + 1, log
    assert [parse_text_line(line)["status"] for line in access] == ["200"] * REQUESTS + ["404"]

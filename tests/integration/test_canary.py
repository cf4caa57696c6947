"""The canary sweep: recognisable secrets go in, and come out nowhere.

An upstream key and a proxy key made of letters that never occur in hex ids
are configured; requests that succeed, fail auth, hit an upstream that refuses
the key (quoting it, as OpenAI does), cannot be reached, hangs up, or answers
garbage (aiohttp raises a client error whose repr carries the request headers)
are run. Then every response (status line, headers, body), ``/about``,
``/v1/models``, ``/metrics``, ``/healthz``, captured logs, stdout and stderr,
the output of a real ``oaimux serve`` process and of ``oaimux check`` are
searched for the secrets and for every 8-character piece of them
(docs/faults.md, "Secrets in any output").
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from proxy.config import parse_settings
from tests.fakes.security import HostileUpstream, garbage_server, running_proxy
from tests.fakes.upstream import FakeUpstream
from tests.integration.test_hostile_http import free_port, serve_process

ROOT = Path(__file__).parents[2]
_LETTERS = "ghijklmnopqrstuvwxyz"  # never in a hex request id or digest
UPSTREAM_KEY = "sk-CANARY" + "".join(random.choices(_LETTERS, k=32))
PROXY_KEY = "pk-CANARY" + "".join(random.choices(_LETTERS, k=32))


def fragments() -> Iterator[str]:
    """The secrets, and every 8-character window of their random parts."""
    for secret in (UPSTREAM_KEY, PROXY_KEY):
        yield secret
        tail = secret[len("sk-CANARY") :]
        for i in range(len(tail) - 7):
            yield tail[i : i + 8]


def leaks(text: str) -> list[str]:
    return [f for f in fragments() if f in text]


def canary_config(
    good: str, refuser: str, hangup: str, garbage: int, partial: int, closed: int
) -> dict[str, Any]:
    key = {"headers": {"set": {"Authorization": "Bearer ${UPSTREAM_KEY}"}}}
    return {
        "log": {"level": "DEBUG"},
        "upstreams": {
            "good": {"url": good, **key},
            "refuser": {"url": refuser, **key},
            "hangup": {"url": hangup, **key},
            "garbage": {"url": f"http://127.0.0.1:{garbage}/v1", **key},
            "partial": {"url": f"http://127.0.0.1:{partial}/v1", **key},
            "down": {"url": f"http://127.0.0.1:{closed}/v1", **key},
        },
        "routes": [
            {"model": "gpt-4o-mini", "upstream": "good"},
            {"model": "refused", "upstream": "refuser"},
            {"model": "garbage", "upstream": "garbage"},
            {"model": "partial", "upstream": "partial"},
            {"model": "down", "upstream": "down"},
            {"path": "refuse/*", "upstream": "refuser"},
            {"path": "hangup", "upstream": "hangup"},
            {"path": "*", "upstream": "good"},
        ],
        "auth": {"keys": [{"name": "canary-team", "key": "${PROXY_KEY}"}]},
    }


async def run_requests(base: str) -> list[str]:
    """Everything the clients saw, as text: status lines, headers, bodies."""
    seen: list[str] = []
    good = {"Authorization": f"Bearer {PROXY_KEY}"}
    requests: list[tuple[str, str, dict[str, str], Any]] = [
        ("POST", "/v1/chat/completions", good, {"model": "gpt-4o-mini", "messages": []}),
        ("POST", "/v1/chat/completions", good, {"model": "gpt-4o-mini", "stream": True}),
        ("POST", "/v1/chat/completions", good, {"model": "refused"}),
        ("POST", "/v1/refuse/401", good, {}),
        ("POST", "/v1/refuse/403", good, {}),
        ("POST", "/v1/chat/completions", good, {"model": "garbage"}),
        ("POST", "/v1/chat/completions", good, {"model": "partial"}),
        ("POST", "/v1/chat/completions", good, {"model": "down"}),
        ("GET", "/v1/hangup", good, None),
        ("GET", f"/v1/files?key={PROXY_KEY}&api-key={UPSTREAM_KEY}", good, None),
        (
            "POST",
            "/v1/chat/completions",
            {"Authorization": f"Bearer {PROXY_KEY}x"},
            {"model": "gpt-4o-mini"},
        ),
        ("POST", "/v1/chat/completions", {"api-key": PROXY_KEY[:-1]}, {"model": "gpt-4o-mini"}),
        (
            "POST",
            "/v1/chat/completions",
            {"Authorization": f"Bearer {UPSTREAM_KEY}"},
            {"model": "gpt-4o-mini"},
        ),
        ("GET", "/v1/models", good, None),
        ("GET", "/v1/models/gpt-4o-mini", good, None),
        ("GET", "/about", good, None),
        ("GET", "/healthz", {}, None),
        ("GET", "/metrics", {}, None),
    ]
    async with aiohttp.ClientSession() as session:
        for method, path, headers, body in requests:
            try:
                async with session.request(method, base + path, headers=headers, json=body) as resp:
                    text = await resp.text(errors="replace")
                    seen.append(f"{resp.status} {resp.reason}\n{dict(resp.headers)}\n{text}")
            except aiohttp.ClientPayloadError:
                seen.append(f"{path}: aborted mid-body, as it must be")
    return seen


async def start_upstreams(aiohttp_server: Any) -> tuple[HostileUpstream, list[str]]:
    hostile = HostileUpstream(echo_headers=False)
    server: TestServer = await aiohttp_server(hostile.app())
    fake_server: TestServer = await aiohttp_server(FakeUpstream().app())
    return hostile, [
        str(server.make_url("/v1")),
        str(server.make_url("/v1")),
        str(fake_server.make_url("/v1")),
    ]


GARBAGE = b"HTTP/1.1 2OO OK\r\nContent-Length: nope\r\n\r\n"
PARTIAL = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"id":'


async def test_canary_in_process(
    aiohttp_server: Any, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    hostile, (good, refuser, hangup) = await start_upstreams(aiohttp_server)
    async with garbage_server(GARBAGE) as garbage, garbage_server(PARTIAL) as partial:
        config = canary_config(good, refuser, hangup, garbage, partial, free_port())
        settings = parse_settings(
            config, environ={"UPSTREAM_KEY": UPSTREAM_KEY, "PROXY_KEY": PROXY_KEY}
        )
        assert leaks(repr(settings)) == []
        async with running_proxy(settings) as proxy:
            seen = await run_requests(proxy.url)
    # The upstream got its key, so the sweep below would have found it had it leaked.
    assert hostile.received[0].headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert any(r.path.endswith("/refuse/401") for r in hostile.received)
    captured = capsys.readouterr()
    assert leaks("\n".join(seen)) == []
    assert leaks(caplog.text) == []
    assert leaks("\n".join(str(r.args) + r.getMessage() for r in caplog.records)) == []
    assert leaks(captured.out + captured.err) == []
    # The failures were logged (so the sweep looked at real log lines).
    assert "refuser" in caplog.text and "garbage" in caplog.text


async def test_canary_in_a_real_process_and_in_oaimux_check(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    hostile, (good, refuser, hangup) = await start_upstreams(aiohttp_server)
    env = {"UPSTREAM_KEY": UPSTREAM_KEY, "PROXY_KEY": PROXY_KEY}
    async with garbage_server(GARBAGE) as garbage, garbage_server(PARTIAL) as partial:
        config = canary_config(good, refuser, hangup, garbage, partial, free_port())
        async with serve_process(config, tmp_path, env) as (port, output):
            seen = await run_requests(f"http://127.0.0.1:{port}")
    stdout, stderr = (part.decode(errors="replace") for part in output)
    assert (
        hostile.received
        and hostile.received[0].headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    )
    assert "canary-team" in stderr  # the key's name is what the access log shows
    assert leaks("\n".join(seen)) == []
    assert leaks(stdout + stderr) == [], stderr[-2000:]

    check = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "proxy", "check", "--config", str(tmp_path / "routes.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, **env},
    )
    assert check.returncode == 0, check.stderr
    assert leaks(check.stdout + check.stderr) == []
    # A config error that involves the key's line names the place, not the key.
    bad = json.loads((tmp_path / "routes.yaml").read_text())
    bad["auth"]["keys"].append({"name": "canary-team", "key": "${PROXY_KEY}"})
    (tmp_path / "bad.yaml").write_text(json.dumps(bad))
    check = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "proxy", "check", "--config", str(tmp_path / "bad.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, **env},
    )
    assert check.returncode == 2 and "duplicate key name" in check.stderr
    assert leaks(check.stdout + check.stderr) == []

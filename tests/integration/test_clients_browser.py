"""A browser app on another origin streams a chat completion from oaimux (CORS).

Headless Chromium (Debian's ``chromium-headless-shell``, or ``chromium``) loads
tests/clients/stream_page.html from a page server on one loopback port; the page
calls oaimux on another port, so every call is cross-origin: the browser sends a
preflight, then the POST with the proxy key, and reads the SSE body with a stream
reader. The fake upstream sends each chunk only after the page has reported the
one before, so the test proves the chunks reach the page one by one, not buffered.

Chromium gets a proxy server that does not exist for everything but loopback
(which Chromium always reaches directly) and no background networking, so
nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.clients.harness import CLIENTS_DIR, skip_or_fail
from tests.conftest import basic_config
from tests.fakes.upstream import FakeUpstream

pytestmark = pytest.mark.slow

KEY = "pk-browser-0123456"
CHUNKS = 3  # FakeUpstream streams tok0, tok1, tok2, then [DONE]


def chromium_or_skip() -> list[str]:
    for name in ("chromium-headless-shell", "chromium"):
        path = shutil.which(name)
        if path is not None:
            return [path, "--headless"]
    skip_or_fail("no headless Chromium: install Debian's chromium-headless-shell")
    raise AssertionError("unreachable")


class PageServer:
    """Serves the page and hears from it: /seen after each read, /report at the end."""

    def __init__(self, fake: FakeUpstream) -> None:
        self.fake = fake
        self.report: dict[str, Any] | None = None
        self.reported = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/stream_page.html", self.page)
        app.router.add_post("/seen", self.seen)
        app.router.add_post("/report", self.finished)
        return app

    async def page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(CLIENTS_DIR / "stream_page.html")

    async def seen(self, request: web.Request) -> web.Response:
        text = (await request.json())["text"]
        for i in range(CHUNKS):
            if f"tok{i}" in text:
                self.fake.gate(i + 1).set()  # the page has chunk i: send the next
        return web.Response(status=204)

    async def finished(self, request: web.Request) -> web.Response:
        self.report = await request.json()
        self.reported.set()
        return web.Response(status=204)


async def open_page(url: str, profile: Path, page: PageServer) -> dict[str, Any]:
    """Load ``url`` in headless Chromium and return what the page reported."""
    argv = [
        *chromium_or_skip(),
        "--no-sandbox",  # tests may run as root, where Chromium's sandbox refuses to start
        "--disable-gpu",
        f"--user-data-dir={profile}",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--proxy-server=http://127.0.0.1:9",  # anything but loopback fails at once
        url,
    ]
    log = profile.with_suffix(".log")
    with log.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.DEVNULL, stderr=stderr, start_new_session=True
        )
    try:
        async with asyncio.timeout(60):
            await page.reported.wait()
    except TimeoutError:
        pytest.fail(f"the page never reported; Chromium said:\n{log.read_text()[-3000:]}")
    finally:
        # Chromium's renderer and helper processes share the session it was started in.
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(10):
                await proc.wait()
        except TimeoutError:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    assert page.report is not None
    return page.report


async def browser_run(
    aiohttp_server: Any, make_proxy_server: Any, upstream_url: str, fake: FakeUpstream,
    tmp_path: Path, allow_origins: Any,
) -> dict[str, Any]:  # fmt: skip
    fake.gated = True
    fake.sse_chunks = CHUNKS
    fake.gate(0).set()
    page = PageServer(fake)
    page_server: TestServer = await aiohttp_server(page.app())
    origin = str(page_server.make_url("")).rstrip("/")
    proxy: TestServer = await make_proxy_server(
        basic_config(
            upstream_url,
            auth={"keys": [{"name": "web", "key": KEY}]},
            server={"cors": {"allow_origins": allow_origins(origin)}},
        )
    )
    api = str(proxy.make_url("/v1"))
    assert page_server.port != proxy.port  # two origins
    url = str(page_server.make_url("/stream_page.html").with_query(api=api, key=KEY))
    return await open_page(url, tmp_path / "profile", page)


async def test_browser_streams_from_an_allowed_origin(
    aiohttp_server: Any, make_proxy_server: Any, upstream_url: str, fake: FakeUpstream,
    tmp_path: Path,
) -> None:  # fmt: skip
    report = await browser_run(
        aiohttp_server, make_proxy_server, upstream_url, fake, tmp_path, lambda o: [o]
    )
    assert "error" not in report, report
    assert report["status"] == 200
    events = [e.removeprefix("data: ") for e in report["text"].split("\n\n") if e]
    assert events[-1] == "[DONE]"
    deltas = [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-1]]
    assert deltas == ["tok0", "tok1", "tok2"]
    assert report["reads"] >= CHUNKS + 1  # each chunk, then [DONE], read on its own
    # Access-Control-Expose-Headers lets the page read oaimux's own headers.
    assert report["requestId"]
    assert len(fake.received) == 1  # the preflight was answered by the proxy
    assert fake.last.headers["authorization"] == "Bearer sk-upstream-secret"


async def test_browser_is_refused_from_another_origin(
    aiohttp_server: Any, make_proxy_server: Any, upstream_url: str, fake: FakeUpstream,
    tmp_path: Path,
) -> None:  # fmt: skip
    report = await browser_run(
        aiohttp_server, make_proxy_server, upstream_url, fake, tmp_path,
        lambda o: ["https://app.example"],
    )  # fmt: skip
    # The preflight is refused, so Chromium never sends the POST.
    assert report == {"error": "TypeError: Failed to fetch"}
    assert fake.received == []

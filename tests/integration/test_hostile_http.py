"""Hostile HTTP over raw sockets against a real server (README, "Hostile HTTP").

Every malformed or smuggling-shaped request is refused (400/431/413/408) with
an OpenAI-shaped body, bounded memory, and nothing reaches the upstream. Each
case is an entry of (docs/faults.md, "Smuggling and hostile request heads",
"Oversized and slow clients", "Clients going away"). The
corpus runs against the server as ``oaimux serve`` builds it, with aiohttp's C
parser (asserted), and once against a real ``python -m proxy serve`` process
running the pure-Python parser (``AIOHTTP_NO_EXTENSIONS=1``), since most
aiohttp smuggling advisories were in that fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.http_parser
import pytest
from aiohttp import web

from proxy.config import Settings
from tests.conftest import basic_config
from tests.fakes.security import error_of, exchange, running_proxy, split_response
from tests.fakes.upstream import FakeUpstream

ROOT = Path(__file__).parents[2]
CHAT = b'{"model": "gpt-4o-mini", "messages": []}'


def test_aiohttp_c_parser_is_in_use() -> None:
    """Most 2023-2026 request-smuggling advisories were in the pure-Python parser."""
    import aiohttp._http_parser as c_parser  # the import itself is part of the assertion

    assert not os.environ.get("AIOHTTP_NO_EXTENSIONS"), "AIOHTTP_NO_EXTENSIONS must not be set"
    assert aiohttp.http_parser.HttpRequestParser is c_parser.HttpRequestParser
    assert aiohttp.http_parser.HttpResponseParser is c_parser.HttpResponseParser
    assert tuple(int(p) for p in aiohttp.__version__.split(".")[:3]) >= (3, 14, 4)


def post(headers: str, body: bytes = b"", path: str = "/v1/chat/completions") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: a\r\n{headers}\r\n".encode() + body


SMUGGLED = b"GET /v1/smuggled HTTP/1.1\r\nHost: a\r\n\r\n"


@dataclass(frozen=True)
class Case:
    raw: bytes
    statuses: frozenset[int] = frozenset({400})
    # The pure-Python parser may accept a few of these harmlessly (checked below),
    # and closes on bytes that are not HTTP at all without answering.
    python_parser_may_accept: bool = False
    python_parser_may_close: bool = False
    # Accepted by both parsers, harmlessly: the upstream gets a clean request.
    may_accept: bool = False


CORPUS: dict[str, Case] = {
    # CL.TE and TE.CL, with a request smuggled behind the body (docs/faults.md,
    # "Conflicting Content-Length and Transfer-Encoding")
    "cl-te": Case(
        post("Content-Length: 4\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n" + SMUGGLED)
    ),
    "te-cl": Case(
        post("Transfer-Encoding: chunked\r\nContent-Length: 40\r\n", b"0\r\n\r\n" + SMUGGLED)
    ),
    # (docs/faults.md, "Obfuscated Transfer-Encoding")
    "te-xchunked": Case(post("Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n")),
    "te-chunked-identity": Case(post("Transfer-Encoding: chunked, identity\r\n", b"0\r\n\r\n")),
    "te-twice": Case(
        post("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n")
    ),
    "te-space-before-colon": Case(post("Transfer-Encoding : chunked\r\n", b"0\r\n\r\n")),
    "te-vertical-tab": Case(post("Transfer-Encoding:\x0bchunked\r\n", b"0\r\n\r\n")),
    "te-gzip-only": Case(post("Transfer-Encoding: gzip\r\n", b"0\r\n\r\n"), frozenset({400, 501})),
    # (docs/faults.md, "Malformed Content-Length")
    "cl-twice-equal": Case(post("Content-Length: 2\r\nContent-Length: 2\r\n", b"{}")),
    "cl-twice-different": Case(post("Content-Length: 2\r\nContent-Length: 40\r\n", b"{}")),
    "cl-plus": Case(post("Content-Length: +2\r\n", b"{}")),
    "cl-negative": Case(post("Content-Length: -1\r\n", b"{}")),
    "cl-hex": Case(post("Content-Length: 0x2\r\n", b"{}")),
    "cl-underscore": Case(post("Content-Length: 1_0\r\n", b"{}")),
    "cl-fullwidth": Case(
        "POST /v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: \uff12\r\n\r\n{}".encode()
    ),
    "cl-comma-list": Case(post("Content-Length: 2, 2\r\n", b"{}")),
    # (docs/faults.md, "CR, LF and NUL in a request head"), the GHSA-45c4-8wx5-qw6w
    # reproducer first
    "cr-in-value": Case(
        post("X-Abc: \rxTransfer-Encoding: chunked\r\nContent-Length: 2\r\n", b"{}")
    ),
    "bare-lf": Case(b"GET /v1/models HTTP/1.1\nHost: a\n\n"),
    "obs-fold": Case(b"GET /v1/models HTTP/1.1\r\nHost: a\r\nX-A: a\r\n b\r\n\r\n"),
    "nul-in-value": Case(b"GET /v1/models HTTP/1.1\r\nHost: a\r\nX-A: a\x00b\r\n\r\n"),
    "nul-in-name": Case(b"GET /v1/models HTTP/1.1\r\nHost: a\r\nX-\x00A: b\r\n\r\n"),
    "space-in-name": Case(b"GET /v1/models HTTP/1.1\r\nHost: a\r\nX A: b\r\n\r\n"),
    "escape-in-target": Case(b"GET /v1/\x1b[31mred HTTP/1.1\r\nHost: a\r\n\r\n"),
    # (docs/faults.md, "Chunk framing tricks")
    "chunk-ext-newline": Case(post("Transfer-Encoding: chunked\r\n", b"2;a\nb\r\n{}\r\n0\r\n\r\n")),
    "chunk-size-mismatch": Case(post("Transfer-Encoding: chunked\r\n", b"5\r\n{}\r\n0\r\n\r\n")),
    "chunk-size-garbage": Case(post("Transfer-Encoding: chunked\r\n", b"zz\r\n{}\r\n0\r\n\r\n")),
    "chunk-ext-huge": Case(
        post(
            "Transfer-Encoding: chunked\r\n",
            b"%x;" % len(CHAT) + b"x" * 20000 + b"\r\n" + CHAT + b"\r\n0\r\n\r\n",
        ),
        frozenset({400, 431, 413}),
        may_accept=True,
    ),
    # (docs/faults.md, "Trailers carrying framing headers")
    "trailer-cl-host": Case(
        post(
            "Transfer-Encoding: chunked\r\n",
            b"%x\r\n%s\r\n0\r\nContent-Length: 5\r\nHost: evil\r\n\r\n" % (len(CHAT), CHAT),
        ),
        python_parser_may_accept=True,
    ),
    # (docs/faults.md, "Two Host headers")
    "host-twice": Case(b"GET /v1/models HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
    # (docs/faults.md, "Absolute-form targets and CONNECT")
    "absolute-form": Case(
        b"POST http://evil.example/v1/chat/completions HTTP/1.1\r\nHost: evil.example\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(CHAT), CHAT)
    ),
    "connect": Case(
        b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
        frozenset({400, 404, 405}),
    ),
    # (docs/faults.md, "Underscores in header names")
    "underscore-xff": Case(
        post(f"X_Forwarded_For: 1.2.3.4\r\nContent-Length: {len(CHAT)}\r\n", CHAT)
    ),
    "underscore-api-key": Case(post(f"api_key: sk-x\r\nContent-Length: {len(CHAT)}\r\n", CHAT)),
    # (docs/faults.md, "Upgrade smuggling")
    "upgrade-on-post": Case(
        post(
            f"Connection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: {len(CHAT)}\r\n",
            CHAT + SMUGGLED,
        )
    ),
    # A WebSocket offer among others is still one: refused on a POST.
    "h2c-and-websocket-on-post": Case(
        post(
            f"Connection: Upgrade\r\nUpgrade: h2c, WebSocket/13\r\nContent-Length: {len(CHAT)}\r\n",
            CHAT + SMUGGLED,
        )
    ),
    "upgrade-get-with-body": Case(
        b"GET /v1/realtime?model=gpt-4o-mini HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Content-Length: 5\r\n\r\nhello" + SMUGGLED
    ),
    # (docs/faults.md, "Other HTTP versions and non-HTTP bytes")
    "http-0.9": Case(b"GET /v1/files\r\n\r\n", frozenset({400, 505})),
    "http-2.0-line": Case(b"GET /v1/files HTTP/2.0\r\nHost: a\r\n\r\n", frozenset({400, 505})),
    "http-1.2": Case(b"GET /v1/files HTTP/1.2\r\nHost: a\r\n\r\n", frozenset({400, 505})),
    "method-nul": Case(b"PO\x00ST /v1/chat/completions HTTP/1.1\r\nHost: a\r\n\r\n"),
    "tls-on-http-port": Case(
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, python_parser_may_close=True
    ),
    "ssh-banner": Case(b"SSH-2.0-OpenSSH_9.6\r\n", python_parser_may_close=True),
    # Many headers, a big header, a long request line (docs/faults.md, "Header floods")
    "200-headers": Case(
        b"GET /v1/models HTTP/1.1\r\nHost: a\r\n"
        + b"".join(b"X-H%d: v\r\n" % i for i in range(200))
        + b"\r\n",
        frozenset({400, 431}),
    ),
    "16k-header": Case(
        b"GET /v1/models HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 16384 + b"\r\n\r\n",
        frozenset({400, 431}),
    ),
    "10k-request-line": Case(
        b"GET /v1/" + b"a" * 10240 + b" HTTP/1.1\r\nHost: a\r\n\r\n", frozenset({400, 414, 431})
    ),
    "16k-header-name": Case(
        b"GET /v1/models HTTP/1.1\r\nHost: a\r\nX-" + b"a" * 16384 + b": v\r\n\r\n",
        frozenset({400, 431}),
    ),
}


@pytest.fixture
def path_config(upstream_url: str) -> dict[str, Any]:
    return basic_config(
        upstream_url, routes=[{"model": "*", "upstream": "fake"}, {"path": "*", "upstream": "fake"}]
    )


def check_refused(
    name: str, raw: bytes, case: Case, fake: FakeUpstream, python: bool
) -> str | None:
    """``None`` when the case was handled as required, else what went wrong."""
    if python and case.python_parser_may_close and (not raw or raw.startswith(b"HTTP/1.1 408")):
        return None  # it waits for a request line that never comes: the header deadline
    if not raw:
        return f"{name}: connection closed without a response"
    status, headers, body = split_response(raw)
    if status in case.statuses:
        if "json" not in headers.get("content-type", ""):
            return f"{name}: {status} is not JSON: {raw[:120]!r}"
        error_of(body)
        if raw.count(b"HTTP/1.") > 1 and b"smuggled" in raw:
            return f"{name}: a second response followed"
        return None
    if case.may_accept and status == 200:
        # llhttp skips chunk extensions without buffering them; the upstream
        # gets the body re-framed by the client library, no extension.
        got = fake.received.pop()
        if got.body == CHAT and "transfer-encoding" not in got.headers:
            return None
    if python and case.python_parser_may_accept and status == 200:
        # The Python parser drops the trailer section: nothing of it may show.
        got = fake.received.pop()
        if (
            got.body == CHAT
            and got.headers.get("host", "").startswith("127.0.0.1")
            and got.headers.get("content-length") == str(len(CHAT))
        ):
            return None
    return f"{name}: got {status}, wanted one of {sorted(case.statuses)}: {raw[:160]!r}"


async def test_hostile_corpus_with_the_c_parser(
    make_settings: Any, fake: FakeUpstream, path_config: dict[str, Any]
) -> None:
    settings: Settings = make_settings(path_config)
    problems = []
    async with running_proxy(settings) as proxy:
        for name, case in CORPUS.items():
            raw = await exchange(proxy.port, case.raw, timeout=5, settle=0.3)
            problem = check_refused(name, raw, case, fake, python=False)
            if problem:
                problems.append(problem)
        # The server is still serving after all of it.
        raw = await exchange(
            proxy.port, post(f"Content-Length: {len(CHAT)}\r\nConnection: close\r\n", CHAT)
        )
        assert split_response(raw)[0] == 200
    assert problems == [], "\n".join(problems)
    assert [r.path for r in fake.received] == ["/v1/chat/completions"]


async def wait_healthy(port: int, proc: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            assert proc.returncode is None, "the proxy process exited"
            try:
                async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)  # polling a starting process, bounded by the deadline
    raise AssertionError("the proxy did not become healthy")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def serve_process(
    config: dict[str, Any], tmp_path: Path, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[int, list[bytes]]]:
    """``python -m proxy serve`` on a free port; yields the port and its captured output."""
    path = tmp_path / "routes.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--config",
        str(path),
        "--port",
        str(port),
        cwd=ROOT,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith(("OAIMUX_", "PORT"))},
            **(env or {}),
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    output: list[bytes] = []
    try:
        await wait_healthy(port, proc)
        yield port, output
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        output.extend((out, err))


async def test_hostile_corpus_with_the_python_parser_in_a_real_process(
    fake: FakeUpstream, path_config: dict[str, Any], tmp_path: Path
) -> None:
    problems = []
    config = {**path_config, "server": {"header_timeout": 1}}
    async with serve_process(config, tmp_path, {"AIOHTTP_NO_EXTENSIONS": "1"}) as (port, output):
        for name, case in CORPUS.items():
            raw = await exchange(port, case.raw, timeout=5, settle=0.3)
            problem = check_refused(name, raw, case, fake, python=True)
            if problem:
                problems.append(problem)
    assert problems == [], "\n".join(problems)
    assert all(r.path != "/v1/smuggled" for r in fake.received)
    stderr = output[1].decode()
    assert "Traceback" not in stderr
    # Refusals are logged as one line each, never with the bytes that were refused.
    assert "Transfer-Encoding: chunked" not in stderr and "sk-x" not in stderr


async def test_pipelined_requests_are_answered_in_order_with_bounded_memory(
    make_settings: Any, fake: FakeUpstream, path_config: dict[str, Any]
) -> None:
    """10 000 requests in one write, as in aiohttp CVE-2026-54273, fixed in 3.14.1
    (docs/faults.md, "Pipelining floods")."""
    settings = make_settings(path_config)
    count = 10_000
    request = b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
    flood = request * (count - 1) + b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    async with running_proxy(settings) as proxy:
        server = proxy.runner.server
        assert server is not None
        queued: list[int] = []
        done = asyncio.Event()

        async def watch_queue() -> None:
            # The parsed-but-unanswered requests the server holds (its memory
            # per connection): sampled while the flood is being answered.
            while not done.is_set():
                queued.extend(len(conn._messages) for conn in server.connections)
                await asyncio.sleep(0)

        watcher = asyncio.ensure_future(watch_queue())
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(flood)
        answered = 0
        tail = b""
        async with asyncio.timeout(60):
            while chunk := await reader.read(1 << 16):
                data = tail + chunk
                answered += data.count(b"HTTP/1.1 200 OK")
                tail = data[-20:]
        done.set()
        await watcher
        writer.close()
        assert answered == count
        # aiohttp stops reading a connection with 32 requests queued (and
        # resumes at 16); without that the whole flood would sit parsed in memory.
        assert queued and max(queued) <= 32, max(queued)
        # Pipelined proxied requests come back in the order they were sent.
        ids = [f"pipelined-{i:03d}" for i in range(50)]
        batch = (
            b"".join(
                post(f"X-Request-Id: {rid}\r\nContent-Length: {len(CHAT)}\r\n", CHAT) for rid in ids
            )
            + b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
        raw = await exchange(proxy.port, batch, timeout=30)
    seen = [
        line.split(b": ", 1)[1].decode()
        for line in raw.split(b"\r\n")
        if line.lower().startswith(b"x-oaimux-request-id")
    ]
    assert seen == ids


async def test_content_length_over_the_limit_is_refused_before_the_body(
    make_settings: Any, fake: FakeUpstream, path_config: dict[str, Any]
) -> None:
    """413 while the client has sent only the head (docs/faults.md, "Declared body over the limit")."""
    settings = make_settings({**path_config, "server": {"max_body_bytes": 1 << 20}})
    async with running_proxy(settings) as proxy:
        for extra in ("", "Expect: 100-continue\r\n"):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(
                post(f"Content-Type: application/json\r\nContent-Length: 41943040\r\n{extra}")
            )
            await writer.drain()
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 413"), head  # no "100 Continue" first
            status, headers, _ = split_response(head)
            body = await reader.readexactly(int(headers["content-length"]))
            assert error_of(body)["code"] == "request_too_large"
            writer.close()
        # Within the limit, 100-continue is answered and the request goes through.
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(
            post(f"Content-Length: {len(CHAT)}\r\nExpect: 100-continue\r\nConnection: close\r\n")
        )
        await writer.drain()
        async with asyncio.timeout(5):
            interim = await reader.readuntil(b"\r\n\r\n")
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(CHAT)
        async with asyncio.timeout(5):
            final = await reader.read()
        writer.close()
    assert split_response(final)[0] == 200
    assert len(fake.received) == 1


async def test_unknown_expectation_is_417(
    make_settings: Any, fake: FakeUpstream, path_config: dict[str, Any]
) -> None:
    async with running_proxy(make_settings(path_config)) as proxy:
        raw = await exchange(
            proxy.port, post(f"Expect: teapot\r\nContent-Length: {len(CHAT)}\r\n", CHAT)
        )
    status, _, body = split_response(raw)
    assert status == 417 and error_of(body)["code"] == "expectation_failed"
    assert fake.received == []


async def test_chunked_body_over_the_limit_is_refused_as_it_crosses(
    make_settings: Any, fake: FakeUpstream, path_config: dict[str, Any]
) -> None:
    """No Content-Length; 413 once the limit is crossed, the rest never read
    (docs/faults.md, "Chunked body crossing the limit")."""
    settings = make_settings({**path_config, "server": {"max_body_bytes": 64 * 1024}})
    async with running_proxy(settings) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(post("Transfer-Encoding: chunked\r\n"))
        chunk = b'{"model": "gpt-4o-mini", "x": "' + b"a" * 16384
        for _ in range(8):  # 128 KiB, twice the limit; the body never ends
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        await writer.drain()
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
        writer.close()
    assert head.startswith(b"HTTP/1.1 413")
    assert fake.received == []


async def test_stalled_body_gets_408_and_nothing_upstream(
    make_settings: Any, fake: FakeUpstream, path_config: dict[str, Any]
) -> None:
    """Shorter than Content-Length, then silence (docs/faults.md, "Body shorter than announced")."""
    settings = make_settings({**path_config, "server": {"body_idle_timeout": 0.3}})
    async with running_proxy(settings) as proxy:
        started = time.monotonic()
        raw = await exchange(
            proxy.port, post("Content-Length: 100\r\n", b'{"model": "gpt'), timeout=5
        )
        waited = time.monotonic() - started
    status, _, body = split_response(raw)
    assert status == 408 and error_of(body)["code"] == "request_timeout"
    assert 0.3 <= waited < 3
    assert fake.received == []


async def dribble(port: int, data: bytes, interval: float) -> tuple[float, bytes]:
    """Send ``data`` one byte per ``interval``; return when the server closed, and what it said."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    answer = b""

    async def read_all() -> bytes:
        return await reader.read()

    reading = asyncio.ensure_future(read_all())
    try:
        for byte in data:
            if reading.done():
                break
            with contextlib.suppress(ConnectionError):
                writer.write(bytes([byte]))
                await writer.drain()
            await asyncio.wait({reading}, timeout=interval)
        with contextlib.suppress(ConnectionError):
            answer = await asyncio.wait_for(reading, 10)
        return time.monotonic() - started, answer
    finally:
        reading.cancel()
        writer.close()


async def test_slowloris_is_cut_while_others_are_served(
    make_settings: Any, fake: FakeUpstream, path_config: dict[str, Any]
) -> None:
    """Slow heads and idle connections are closed at the header deadline
    (docs/faults.md, "Slow headers (slowloris)", "Idle connections")."""
    settings = make_settings(
        {**path_config, "server": {"header_timeout": 0.5, "keepalive_timeout": 1.0}}
    )
    head = post(f"Content-Length: {len(CHAT)}\r\nX-Pad: " + "a" * 200 + "\r\n")
    async with running_proxy(settings) as proxy:
        slow = [asyncio.ensure_future(dribble(proxy.port, head, 0.05)) for _ in range(50)]
        idle = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(50)]
        served = 0
        async with aiohttp.ClientSession() as session:
            for _ in range(20):
                async with session.post(f"{proxy.url}/v1/chat/completions", data=CHAT) as resp:
                    assert resp.status == 200
                    served += 1
        results = await asyncio.gather(*slow)
        for reader, writer in idle:
            async with asyncio.timeout(5):
                assert split_response(await reader.read())[0] == 408
            writer.close()
    assert served == 20
    for waited, answer in results:
        assert waited < 0.5 + 1.0, waited
        status, _, body = split_response(answer)
        assert status == 408 and error_of(body)["code"] == "request_timeout"
    assert len(fake.received) == 20


async def test_keepalive_idle_and_a_dribbled_second_head_are_bounded(
    make_settings: Any, path_config: dict[str, Any]
) -> None:
    settings = make_settings(
        {**path_config, "server": {"header_timeout": 0.5, "keepalive_timeout": 0.8}}
    )
    async with running_proxy(settings) as proxy:
        for second in (b"", b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Slow: " + b"a" * 100):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
            await writer.drain()
            first = await reader.readuntil(b"}")
            assert first.startswith(b"HTTP/1.1 200")
            started = time.monotonic()
            for byte in second:
                writer.write(bytes([byte]))
                await asyncio.sleep(0.02)  # the dribble itself is the behaviour under test
                if reader.at_eof():
                    break
            async with asyncio.timeout(5):
                rest = await reader.read()
            assert rest == b""  # closed, not answered: the client may retry safely
            assert time.monotonic() - started < 0.8 + 1.0
            writer.close()


async def test_a_dribbled_head_within_the_deadline_is_served(
    make_settings: Any, fake: FakeUpstream, path_config: dict[str, Any]
) -> None:
    """Headers one byte per segment are fine while they arrive in time
    (docs/faults.md, "Header floods")."""
    settings = make_settings({**path_config, "server": {"header_timeout": 5}})
    async with running_proxy(settings) as proxy:
        raw = post(f"Content-Length: {len(CHAT)}\r\nConnection: close\r\n")
        waited, answer = await dribble(proxy.port, raw + CHAT, 0.001)
    assert split_response(answer)[0] == 200


def rst_close(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashing client does."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def test_client_reset_right_after_the_head(
    make_settings: Any,
    fake: FakeUpstream,
    path_config: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No crash, no upstream request, the server keeps serving
    (docs/faults.md, "A client reset right after its head")."""
    caplog.set_level(logging.INFO)
    async with running_proxy(make_settings(path_config)) as proxy:
        for _ in range(20):
            _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(post(f"Content-Length: {len(CHAT)}\r\n"))
            await writer.drain()
            rst_close(writer)
        raw = await exchange(
            proxy.port, post(f"Content-Length: {len(CHAT)}\r\nConnection: close\r\n", CHAT)
        )
    assert split_response(raw)[0] == 200
    assert [r.path for r in fake.received] == ["/v1/chat/completions"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_client_reset_mid_upload_aborts_the_upstream_request(
    make_settings: Any,
    fake: FakeUpstream,
    path_config: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """5 of 25 MB sent, then RST: the upstream request is aborted, nothing logged as 2xx
    (docs/faults.md, "A client reset mid-upload")."""
    caplog.set_level(logging.INFO)
    boundary = "up10ad"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()
    total = 25 * 1024 * 1024
    async with running_proxy(make_settings(path_config)) as proxy:
        _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(
            post(
                f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {total}\r\n",
                path="/v1/audio/transcriptions",
            )
            + head
        )
        for _ in range(5):
            writer.write(b"\0" * (1024 * 1024))
            await writer.drain()
        rst_close(writer)
        # The next request is served, on a fresh or a cleanly reusable upstream connection.
        raw = await exchange(
            proxy.port, post(f"Content-Length: {len(CHAT)}\r\nConnection: close\r\n", CHAT)
        )
    assert split_response(raw)[0] == 200
    # The upload never completed at the upstream (it records only whole bodies).
    assert [r.path for r in fake.received] == ["/v1/chat/completions"]
    access = [r.getMessage() for r in caplog.records if r.name == "oaimux.access"]
    upload_lines = [line for line in access if "audio/transcriptions" in line]
    assert upload_lines and not any(
        "status=200" in line or '"status":200' in line for line in upload_lines
    )


async def test_slow_reader_holds_back_the_upstream(
    aiohttp_server: Any, make_settings: Any, upstream_url: str
) -> None:
    """A client that stops reading stops the upstream being read: every write is
    awaited, so nothing piles up in the proxy (docs/faults.md, "A client that reads slowly")."""
    block = b"\0" * 65536
    total = 256 * 1024 * 1024
    written = 0
    stalled = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        nonlocal written
        resp = web.StreamResponse(headers={"Content-Type": "audio/mpeg"})
        resp.content_length = total
        await resp.prepare(request)
        while written < total:
            try:
                async with asyncio.timeout(0.5):
                    await resp.write(block)
            except TimeoutError:
                stalled.set()  # backpressure reached the upstream
                await resp.write(block)
            written += len(block)
        return resp

    app = web.Application()
    app.router.add_get("/v1/audio/big", endless)
    server = await aiohttp_server(app)
    config = basic_config(str(server.make_url("/v1")), routes=[{"path": "*", "upstream": "fake"}])
    async with running_proxy(make_settings(config)) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        writer.write(b"GET /v1/audio/big HTTP/1.1\r\nHost: a\r\n\r\n")
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")
        async with asyncio.timeout(20):
            await stalled.wait()
        # Socket buffers on both legs plus one chunk in flight: a few MiB at
        # most, of 256 MiB the upstream would send if it could.
        assert written < 16 * 1024 * 1024, written
        rst_close(writer)


async def test_suspect_heads_are_refused_and_closed_even_without_a_key(
    make_settings: Any, fake: FakeUpstream, path_config: dict[str, Any]
) -> None:
    settings = make_settings(
        {**path_config, "auth": {"keys": [{"name": "k", "key": "pk-0123456789"}]}}
    )
    async with running_proxy(settings) as proxy:
        for name in ("upgrade-on-post", "underscore-api-key", "upgrade-get-with-body"):
            raw = await exchange(proxy.port, CORPUS[name].raw, timeout=5)
            status, headers, _ = split_response(raw)
            assert status == 400, (name, raw[:200])
            assert headers.get("connection") == "close"
            assert raw.count(b"HTTP/1.1 ") == 1, name  # nothing after the head was answered
    assert fake.received == []


# An h2c offer (RFC 7540 §3.2) is ignored, never acted on (RFC 9110 §7.8).
H2C_OFFER = (
    "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"
)
# What an h2c client sends once it has its 101: the connection preface and an
# empty SETTINGS frame (RFC 9113 §3.4). Sent here without waiting for one.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
CHUNKED_CHAT = b"%x\r\n%s\r\n0\r\n\r\n" % (len(CHAT), CHAT)
H2C_OFFERS = {
    # A body with the offer, then HTTP/2 bytes as if the upgrade had happened.
    "post-then-h2-preface": post(f"{H2C_OFFER}Content-Length: {len(CHAT)}\r\n", CHAT) + H2_PREFACE,
    # HTTP2-Settings not named in Connection: dropped all the same.
    "chunked-post": post(
        "Connection: Upgrade\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"
        "Transfer-Encoding: chunked\r\n",
        CHUNKED_CHAT,
    ),
    # On the realtime path an offer that is not WebSocket is a plain GET.
    "get-realtime": (
        f"GET /v1/realtime?model=gpt-4o-mini HTTP/1.1\r\nHost: a\r\n{H2C_OFFER}\r\n".encode()
    ),
}


async def h2c_offers_are_served_as_http11(port: int, fake: FakeUpstream, python: bool) -> list[str]:
    """Each offer gets an HTTP/1.1 answer (never a 101), the upstream gets the
    request without the offer, and the connection serves a next request."""
    problems = []
    follow_up = post(f"Content-Length: {len(CHAT)}\r\nConnection: close\r\n", CHAT)
    for name, raw in H2C_OFFERS.items():
        fake.received.clear()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(raw)
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
            with contextlib.suppress(ConnectionError):
                writer.write(follow_up)
            rest = b""
            # A refusal closes the connection with the client's bytes unread, so
            # the kernel may end it with a reset once the refusal's head is in.
            with contextlib.suppress(ConnectionResetError):
                async with asyncio.timeout(5):
                    rest = await reader.read()  # until the proxy closes
            answers = head + rest
        finally:
            writer.close()
        statuses = [int(code) for code in re.findall(rb"HTTP/1\.[01] (\d{3}) ", answers)]
        first_body = b"" if raw.startswith(b"GET") else CHAT
        if raw.endswith(H2_PREFACE) and python:
            # The pure-Python parser refuses the whole write, whose last
            # line is no HTTP/1.x request line.
            wanted = ([400], [])
        else:
            # The C parser drops the bytes after an upgrade offer's request:
            # the preface is never read, and the next write is a new request.
            wanted = ([200, 200], [first_body, CHAT])
        got = (statuses, [r.body for r in fake.received])
        if got != wanted:
            problems.append(f"{name}: got {got}, wanted {wanted}: {answers[:300]!r}")
        leaked = [
            (r.path, h)
            for r in fake.received
            for h in ("upgrade", "http2-settings", "connection")
            if h in r.headers
        ]
        if leaked:
            problems.append(f"{name}: upstream got {leaked}")
    return problems


async def test_h2c_offers_are_served_as_http11_with_the_c_parser(
    make_settings: Any, fake: FakeUpstream, path_config: dict[str, Any]
) -> None:
    async with running_proxy(make_settings(path_config)) as proxy:
        problems = await h2c_offers_are_served_as_http11(proxy.port, fake, python=False)
    assert problems == [], "\n".join(problems)


async def test_h2c_offers_are_served_as_http11_with_the_python_parser(
    fake: FakeUpstream, path_config: dict[str, Any], tmp_path: Path
) -> None:
    async with serve_process(path_config, tmp_path, {"AIOHTTP_NO_EXTENSIONS": "1"}) as (port, _):
        problems = await h2c_offers_are_served_as_http11(port, fake, python=True)
    assert problems == [], "\n".join(problems)

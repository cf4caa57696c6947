"""deploy/nginx/oaimux.conf in front of a real `oaimux serve`, driven through a real nginx.

Layout of every test: client -> nginx (the shipped site file, with only its
`listen` lines and the upstream `server` line rewritten for free ports) ->
`python -m proxy serve` (a subprocess) -> a fake upstream (an aiohttp server in
this test's event loop).

What is shown:
- SSE events reach the client one at a time: the fake upstream sends event N+1
  only after the client has received event N, so a buffering hop stalls it.
- A 25 MiB multipart upload arrives at the upstream byte for byte (hashed there).
- oaimux sees the real client address (from nginx's X-Forwarded-For, believed
  because nginx connects from 127.0.0.1, a trusted proxy), and a forged
  X-Forwarded-For sent by the client changes neither the logged address nor the
  rate-limit bucket. The client binds 127.0.0.2 (Linux routes all of 127/8 to
  lo), so its address differs from nginx's own 127.0.0.1.
- A realtime WebSocket session passes nginx and oaimux in both directions.
- `curl --http2` (an h2c upgrade offer with every request) gets plain HTTP/1.1
  answers through nginx and oaimux, and the upstream sees no upgrade headers.
- With a stand-in where oaimux would be: nginx reuses one HTTP/1.1 connection
  for many client connections (the keep-alive pool), a WebSocket handshake
  on /v1/realtime is passed through and works in both directions, and an h2c
  offer is not passed on at all.

nginx missing: skipped locally, a failure when CI is set.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import IO, Any

import aiohttp
import pytest
from aiohttp import web

from tests.fakes.clients import curl_sent_headers, run_client, tool_or_skip

pytestmark = pytest.mark.nginx

REPO = Path(__file__).resolve().parents[2]
SITE_CONF = REPO / "deploy" / "nginx" / "oaimux.conf"
NGINX_PLACES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")

CLIENT_ADDR = "127.0.0.2"  # the "real client" as nginx sees it
OTHER_CLIENT_ADDR = "127.0.0.3"  # a second client, for the per-client bucket check
FORGED = "6.6.6.6"

START_DEADLINE = 30.0  # seconds for a process to come up
SSE_EVENTS = 5
ACK_WAIT = 5.0  # how long the fake upstream waits for the client to see an event
UPLOAD_BYTES = 25 * 1024 * 1024


# ---------------------------------------------------------------------------
# Environment checks


@pytest.fixture(scope="session")
def nginx_bin() -> str:
    found = shutil.which("nginx") or next((p for p in NGINX_PLACES if os.access(p, os.X_OK)), None)
    if found is None:
        if "CI" in os.environ:
            pytest.fail(
                "nginx is required when CI is set: install the nginx package "
                "(looked on PATH and in " + ", ".join(NGINX_PLACES) + ")"
            )
        pytest.skip("nginx is not installed (needed for the deploy/nginx tests; required in CI)")
    return found


@pytest.fixture(scope="session")
def loopback_aliases() -> None:
    for addr in (CLIENT_ADDR, OTHER_CLIENT_ADDR):
        with socket.socket() as s:
            try:
                s.bind((addr, 0))
            except OSError as exc:
                pytest.fail(f"cannot bind {addr} ({exc}): these tests need all of 127/8 on lo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ---------------------------------------------------------------------------
# The fake upstream


class FakeUpstream:
    """An OpenAI-shaped upstream that records what reached it."""

    def __init__(self) -> None:
        self.acks = [asyncio.Event() for _ in range(SSE_EVENTS)]
        self.unacked: list[int] = []  # events the client had not seen within ACK_WAIT
        self.uploads: list[dict[str, Any]] = []
        self.chat_requests = 0
        self.realtime_queries: list[str] = []
        self.headers: list[dict[str, str]] = []  # of every chat and files request
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/files", self.files)
        app.router.add_post("/v1/audio/transcriptions", self.transcriptions)
        app.router.add_get("/v1/realtime", self.realtime)
        return app

    async def realtime(self, request: web.Request) -> web.WebSocketResponse:
        """Echo: text comes back prefixed, binary as it was."""
        self.realtime_queries.append(request.query_string)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str(f"echo:{msg.data}")
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws

    async def files(self, request: web.Request) -> web.Response:
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        return web.json_response({"object": "list", "data": []})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.chat_requests += 1
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "model": body.get("model"),
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "ok"},
                            "finish_reason": "stop",
                        }
                    ],
                }
            )
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        waiting = True
        for i in range(SSE_EVENTS):
            chunk = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "model": body.get("model"),
                "choices": [{"index": 0, "delta": {"content": f"tok{i}"}, "finish_reason": None}],
            }
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            if waiting:
                # Event i+1 is only produced once the client holds event i.
                try:
                    async with asyncio.timeout(ACK_WAIT):
                        await self.acks[i].wait()
                except TimeoutError:
                    self.unacked.append(i)
                    waiting = False  # held back somewhere: finish quickly so the test can report it
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def transcriptions(self, request: web.Request) -> web.Response:
        reader = await request.multipart()
        fields: dict[str, str] = {}
        digest = hashlib.sha256()
        size = 0
        filename = None
        while True:
            part = await reader.next()
            if part is None:
                break
            assert isinstance(part, aiohttp.BodyPartReader)
            if part.name == "file":
                filename = part.filename
                while chunk := await part.read_chunk(1 << 16):
                    digest.update(chunk)
                    size += len(chunk)
            else:
                fields[part.name or ""] = await part.text()
        record = {
            "sha256": digest.hexdigest(),
            "size": size,
            "filename": filename,
            "fields": fields,
        }
        self.uploads.append(record)
        return web.json_response({"text": "ok", **record})


@pytest.fixture
async def upstream(aiohttp_server: Callable[..., Any]) -> FakeUpstream:
    fake = FakeUpstream()
    server = await aiohttp_server(fake.app())
    fake.port = server.port
    return fake


# ---------------------------------------------------------------------------
# Processes


class Proc:
    """A subprocess with its output in a file; stopped (and reaped) at teardown."""

    def __init__(self, name: str, cmd: list[str], log: Path, **kwargs: Any) -> None:
        self.name = name
        self.log = log
        self._out: IO[bytes] = log.open("wb")
        self.popen = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT, **kwargs
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def assert_running(self) -> None:
        code = self.popen.poll()
        if code is not None:
            pytest.fail(f"{self.name} exited with {code}:\n{self.output()[-4000:]}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._out.close()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in reversed(started):
        proc.stop()


async def wait_http_ok(proc: Proc, url: str) -> None:
    """Poll url until it answers 200, with a bounded deadline (process start-up)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_DEADLINE
    last = "no answer"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while loop.time() < deadline:
            proc.assert_running()
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
                    last = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = repr(exc)
            await asyncio.sleep(0.05)
    pytest.fail(
        f"{proc.name} did not answer 200 at {url} within {START_DEADLINE}s ({last}):\n"
        f"{proc.output()[-4000:]}"
    )


async def start_oaimux(
    tmp_path: Path, procs: list[Proc], config: dict[str, Any]
) -> tuple[int, Proc]:
    port = free_port()
    cfg = tmp_path / "routes.yaml"
    cfg.write_text(json.dumps(config, indent=2))  # JSON is YAML
    env = dict(os.environ)
    for name in ("PORT", "OAIMUX_CONFIG"):
        env.pop(name, None)
    env["PYTHONUNBUFFERED"] = "1"
    proc = Proc(
        "oaimux",
        [sys.executable, "-m", "proxy", "serve", "--config", str(cfg), "--port", str(port)],
        tmp_path / "oaimux.log",
        cwd=REPO,
        env=env,
    )
    procs.append(proc)
    await wait_http_ok(proc, f"http://127.0.0.1:{port}/healthz")
    return port, proc


def site_for_test(text: str, nginx_port: int, oaimux_port: int) -> str:
    """The shipped site with only its addresses changed: upstream server and listen lines."""
    text, n = re.subn(
        r"(?m)^(\s*)server\s+127\.0\.0\.1:8080;",
        rf"\g<1>server 127.0.0.1:{oaimux_port};",
        text,
    )
    assert n == 1, "deploy/nginx/oaimux.conf must have exactly one `server 127.0.0.1:8080;` line"
    count = 0

    def listen(m: re.Match[str]) -> str:
        nonlocal count
        count += 1
        if count == 1:
            return f"{m.group(1)}listen 127.0.0.1:{nginx_port};"
        return f"{m.group(1)}# listen removed for the test"

    text = re.sub(r"(?m)^(\s*)listen\s+[^;#]*;", listen, text)
    assert count >= 1, "deploy/nginx/oaimux.conf has no active `listen` line"
    return text


def nginx_main_conf(workdir: Path) -> str:
    # As root the workers would switch to "nobody", who cannot enter the test's
    # private temp directory; keep them as the current user instead.
    user = "user root root;\n" if os.geteuid() == 0 else ""
    return (
        "daemon off;\n"
        "master_process on;\n"
        "worker_processes 1;\n"
        f"{user}"
        f"pid {workdir}/nginx.pid;\n"
        f"error_log {workdir}/error.log info;\n"
        "events { worker_connections 512; }\n"
        "http {\n"
        f"    access_log {workdir}/access.log;\n"
        f"    client_body_temp_path {workdir}/client_body;\n"
        f"    proxy_temp_path {workdir}/proxy;\n"
        f"    fastcgi_temp_path {workdir}/fastcgi;\n"
        f"    uwsgi_temp_path {workdir}/uwsgi;\n"
        f"    scgi_temp_path {workdir}/scgi;\n"
        f"    include {workdir}/oaimux.conf;\n"
        "}\n"
    )


async def start_nginx(nginx_bin: str, tmp_path: Path, procs: list[Proc], oaimux_port: int) -> int:
    workdir = tmp_path / "nginx"
    workdir.mkdir()
    port = free_port()
    (workdir / "oaimux.conf").write_text(site_for_test(SITE_CONF.read_text(), port, oaimux_port))
    (workdir / "nginx.conf").write_text(nginx_main_conf(workdir))
    args = ["-p", f"{workdir}/", "-c", str(workdir / "nginx.conf")]
    help_text = subprocess.run([nginx_bin, "-h"], capture_output=True, text=True).stderr
    if re.search(r"^\s*-e filename", help_text, re.M):  # nginx >= 1.19.5
        args += ["-e", str(workdir / "error.log")]
    check = subprocess.run([nginx_bin, "-t", *args], capture_output=True, text=True)
    assert check.returncode == 0, f"nginx -t rejected the site:\n{check.stderr}"
    proc = Proc("nginx", [nginx_bin, *args], workdir / "stderr.log")
    procs.append(proc)
    # nginx is up once it accepts connections; oaimux was already healthy.
    await wait_http_ok(proc, f"http://127.0.0.1:{port}/healthz")
    return port


async def start_stack(
    nginx_bin: str, tmp_path: Path, procs: list[Proc], upstream: FakeUpstream, **extra: Any
) -> tuple[str, Proc]:
    """Start oaimux (config from extra) and nginx; return nginx's base URL and oaimux."""
    config: dict[str, Any] = {
        "server": {"trusted_proxies": ["127.0.0.1/32"]},
        "log": {"format": "json", "access": True},
        "upstreams": {"fake": {"url": f"http://127.0.0.1:{upstream.port}/v1"}},
        "routes": [{"model": "*", "upstream": "fake"}, {"default": True, "upstream": "fake"}],
    }
    config.update(extra)
    oaimux_port, oaimux = await start_oaimux(tmp_path, procs, config)
    nginx_port = await start_nginx(nginx_bin, tmp_path, procs, oaimux_port)
    return f"http://127.0.0.1:{nginx_port}", oaimux


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """A client whose connections come from 127.0.0.2."""
    connector = aiohttp.TCPConnector(local_addr=(CLIENT_ADDR, 0))
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=60)
    ) as session:
        yield session


# ---------------------------------------------------------------------------
# Access log


def chat_records(proc: Proc) -> list[dict[str, Any]]:
    """oaimux's JSON access-log lines for chat completions, in order."""
    records = []
    for raw in proc.output().splitlines():
        line = raw.strip()
        if not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict) or "client" not in rec:
            continue
        if any(isinstance(v, str) and "/chat/completions" in v for v in rec.values()):
            records.append(rec)
    return records


async def wait_chat_records(proc: Proc, count: int) -> list[dict[str, Any]]:
    """Wait (bounded) until oaimux has logged `count` chat requests."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10.0
    while loop.time() < deadline:
        records = chat_records(proc)
        if len(records) >= count:
            return records
        await asyncio.sleep(0.05)
    pytest.fail(
        f"expected {count} JSON access-log lines with a 'client' field for /chat/completions; "
        f"oaimux wrote:\n{proc.output()[-4000:]}"
    )


async def chat(session: aiohttp.ClientSession, base: str, **headers: str) -> aiohttp.ClientResponse:
    async with session.post(
        f"{base}/v1/chat/completions",
        json={"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]},
        headers=headers,
    ) as resp:
        await resp.read()
        return resp


# ---------------------------------------------------------------------------
# Tests


async def test_sse_events_pass_nginx_one_at_a_time(
    nginx_bin: str,
    loopback_aliases: None,
    tmp_path: Path,
    procs: list[Proc],
    upstream: FakeUpstream,
    client: aiohttp.ClientSession,
) -> None:
    base, _ = await start_stack(nginx_bin, tmp_path, procs, upstream)
    received: list[str] = []
    done = False
    async with client.post(
        f"{base}/v1/chat/completions",
        json={"model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
    ) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        async with asyncio.timeout(ACK_WAIT * 2 + 10):
            while line := await resp.content.readline():
                if not line.startswith(b"data: "):
                    continue
                payload = line[len(b"data: ") :].strip()
                if payload == b"[DONE]":
                    done = True
                    continue
                index = len(received)
                received.append(json.loads(payload)["choices"][0]["delta"]["content"])
                if index < SSE_EVENTS:
                    upstream.acks[index].set()  # lets the upstream produce the next event
    assert not upstream.unacked, (
        f"event {upstream.unacked[0]} did not reach the client within {ACK_WAIT}s of being "
        "sent: something between upstream and client buffers the stream"
    )
    assert received == [f"tok{i}" for i in range(SSE_EVENTS)]
    assert done


async def test_25_mib_multipart_upload_arrives_byte_identical(
    nginx_bin: str,
    loopback_aliases: None,
    tmp_path: Path,
    procs: list[Proc],
    upstream: FakeUpstream,
    client: aiohttp.ClientSession,
) -> None:
    base, _ = await start_stack(nginx_bin, tmp_path, procs, upstream)
    audio = os.urandom(UPLOAD_BYTES)
    form = aiohttp.FormData()
    form.add_field("model", "whisper-test")
    # A file object, as a client uploads a file (raw bytes this large make
    # aiohttp warn about blocking the event loop).
    form.add_field("file", io.BytesIO(audio), filename="speech.wav", content_type="audio/wav")
    async with client.post(f"{base}/v1/audio/transcriptions", data=form) as resp:
        assert resp.status == 200, (await resp.text())[:2000]
        answer = await resp.json()
    assert len(upstream.uploads) == 1
    got = upstream.uploads[0]
    assert got["size"] == UPLOAD_BYTES
    assert got["sha256"] == hashlib.sha256(audio).hexdigest()
    assert got["filename"] == "speech.wav"
    assert got["fields"] == {"model": "whisper-test"}
    assert answer["sha256"] == got["sha256"]


async def test_oaimux_sees_the_real_client_not_nginx_nor_a_forged_header(
    nginx_bin: str,
    loopback_aliases: None,
    tmp_path: Path,
    procs: list[Proc],
    upstream: FakeUpstream,
    client: aiohttp.ClientSession,
) -> None:
    base, oaimux = await start_stack(nginx_bin, tmp_path, procs, upstream)

    plain = await chat(client, base)
    assert plain.status == 200
    [first] = await wait_chat_records(oaimux, 1)
    # nginx connects from 127.0.0.1 (trusted); its X-Forwarded-For names the client.
    assert first["client"] == CLIENT_ADDR, first

    forged = await chat(client, base, **{"X-Forwarded-For": FORGED, "X-Real-IP": FORGED})
    assert forged.status == 200
    second = (await wait_chat_records(oaimux, 2))[1]
    assert second["client"] == CLIENT_ADDR, second


async def test_forged_forwarded_for_gets_no_fresh_rate_limit_bucket(
    nginx_bin: str,
    loopback_aliases: None,
    tmp_path: Path,
    procs: list[Proc],
    upstream: FakeUpstream,
    client: aiohttp.ClientSession,
) -> None:
    base, oaimux = await start_stack(
        nginx_bin,
        tmp_path,
        procs,
        upstream,
        rate_limit={"requests_per_minute": 1, "burst": 2},
    )
    assert (await chat(client, base)).status == 200
    assert (await chat(client, base, **{"X-Forwarded-For": FORGED})).status == 200
    # The bucket of 127.0.0.2 is empty now; claiming to be someone else does not help.
    third = await chat(client, base, **{"X-Forwarded-For": "7.7.7.7", "X-Real-IP": "7.7.7.7"})
    assert third.status == 429
    assert third.headers.get("x-oaimux-error") == "rate_limit_exceeded"

    # The limit is per client: another address still gets through, so the 429
    # above was 127.0.0.2's own bucket, not a limit shared by everything behind nginx.
    connector = aiohttp.TCPConnector(local_addr=(OTHER_CLIENT_ADDR, 0))
    async with aiohttp.ClientSession(connector=connector) as other:
        assert (await chat(other, base)).status == 200

    records = await wait_chat_records(oaimux, 4)
    assert [r["client"] for r in records] == [CLIENT_ADDR] * 3 + [OTHER_CLIENT_ADDR]
    assert upstream.chat_requests == 3


async def test_realtime_websocket_through_nginx_and_oaimux(
    nginx_bin: str,
    loopback_aliases: None,
    tmp_path: Path,
    procs: list[Proc],
    upstream: FakeUpstream,
    client: aiohttp.ClientSession,
) -> None:
    base, _ = await start_stack(nginx_bin, tmp_path, procs, upstream)
    async with client.ws_connect(f"{base}/v1/realtime?model=gpt-realtime") as ws:
        event = '{"type": "session.update"}'
        await ws.send_str(event)
        msg = await ws.receive(timeout=10)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.TEXT, f"echo:{event}")
        audio = bytes(range(256)) * 64
        await ws.send_bytes(audio)
        msg = await ws.receive(timeout=10)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.BINARY, audio)
    assert upstream.realtime_queries == ["model=gpt-realtime"]


async def test_curl_http2_through_nginx_and_oaimux(
    nginx_bin: str, tmp_path: Path, procs: list[Proc], upstream: FakeUpstream
) -> None:
    curl = tool_or_skip("curl")
    base, _ = await start_stack(nginx_bin, tmp_path, procs, upstream)
    body = b'{"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}'
    out, verbose = await run_client(
        curl, "--http2", "-sS", "-v", "--fail", "-w", "\n%{http_version}\n",
        "-H", "Content-Type: application/json", "--data-binary", "@-",
        f"{base}/v1/chat/completions",
        "--next", "--http2", "-sS", "--fail", "-w", "\n%{http_version}\n", f"{base}/v1/files",
        stdin=body,
    )  # fmt: skip
    assert curl_sent_headers(verbose).count("Upgrade: h2c") == 2
    answer, post_version, files, get_version = out.splitlines()
    assert json.loads(answer)["choices"][0]["message"]["content"] == "ok"
    assert json.loads(files) == {"object": "list", "data": []}
    assert (post_version, get_version) == ("1.1", "1.1")
    assert upstream.chat_requests == 1 and len(upstream.headers) == 2
    for headers in upstream.headers:
        assert not {"upgrade", "http2-settings", "connection"} & headers.keys(), headers


class StandIn:
    """Plays oaimux's part for checks of nginx's own behaviour."""

    def __init__(self) -> None:
        self.peers: list[tuple[str, int]] = []
        self.connection_headers: list[str | None] = []
        self.versions: list[str] = []
        self.ws_paths: list[str] = []
        # (Upgrade, Connection) as nginx sent them, per request.
        self.upgrades: list[tuple[str | None, str | None]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_post("/v1/echo", self.echo)
        app.router.add_get("/v1/echo", self.echo)
        app.router.add_get("/v1/realtime", self.realtime)
        return app

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def echo(self, request: web.Request) -> web.Response:
        assert request.transport is not None
        self.peers.append(request.transport.get_extra_info("peername"))
        self.connection_headers.append(request.headers.get("Connection"))
        self.versions.append(f"{request.version.major}.{request.version.minor}")
        self.upgrades.append((request.headers.get("Upgrade"), request.headers.get("Connection")))
        return web.json_response({"ok": True})

    async def realtime(self, request: web.Request) -> web.WebSocketResponse:
        self.ws_paths.append(request.path_qs)
        self.upgrades.append((request.headers.get("Upgrade"), request.headers.get("Connection")))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str(f"echo:{msg.data}")
        return ws


async def test_nginx_pools_upstream_connections_and_upgrades_websockets(
    nginx_bin: str, tmp_path: Path, procs: list[Proc], aiohttp_server: Callable[..., Any]
) -> None:
    stand_in = StandIn()
    server = await aiohttp_server(stand_in.app())
    port = await start_nginx(nginx_bin, tmp_path, procs, server.port)
    base = f"http://127.0.0.1:{port}"

    # A new client connection for every request; nginx still reuses its own.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=30)
    ) as session:
        for _ in range(5):
            async with session.post(f"{base}/v1/echo", json={}) as resp:
                assert resp.status == 200
    assert stand_in.versions == ["1.1"] * 5
    assert all(h is None or h.lower() != "close" for h in stand_in.connection_headers)
    assert len(set(stand_in.peers)) == 1, f"nginx opened {len(set(stand_in.peers))} connections"

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async with session.ws_connect(f"{base}/v1/realtime?model=gpt-realtime") as ws:
            for word in ("hello", "again"):
                await ws.send_str(word)
                msg = await ws.receive(timeout=10)
                assert msg.type == aiohttp.WSMsgType.TEXT
                assert msg.data == f"echo:{word}"
    assert stand_in.ws_paths == ["/v1/realtime?model=gpt-realtime"]


async def test_nginx_passes_a_websocket_upgrade_and_no_other(
    nginx_bin: str, tmp_path: Path, procs: list[Proc], aiohttp_server: Callable[..., Any]
) -> None:
    """An h2c offer (curl --http2) reaches oaimux as plain HTTP/1.1, and the
    connection nginx used for it stays in the pool; a WebSocket handshake
    still carries its upgrade."""
    curl = tool_or_skip("curl")
    stand_in = StandIn()
    server = await aiohttp_server(stand_in.app())
    base = f"http://127.0.0.1:{await start_nginx(nginx_bin, tmp_path, procs, server.port)}"
    _, verbose = await run_client(
        curl, "--http2", "-sS", "-v", "--fail", "--data-binary", "{}", f"{base}/v1/echo",
        "--next", "--http2", "-sS", "--fail", f"{base}/v1/echo",
        "--next", "-sS", "--fail", "-H", "Upgrade: WebSocket", "-H", "Connection: Upgrade",
        f"{base}/v1/echo",
    )  # fmt: skip
    assert curl_sent_headers(verbose).count("Upgrade: h2c") == 2
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async with session.ws_connect(f"{base}/v1/realtime?model=gpt-realtime") as ws:
            await ws.send_str("hello")
            assert (await ws.receive(timeout=10)).data == "echo:hello"
    assert stand_in.upgrades == [
        (None, None),  # POST with h2c
        (None, None),  # GET with h2c
        ("websocket", "upgrade"),  # "WebSocket" offered; the stand-in answers plainly
        ("websocket", "upgrade"),  # the realtime handshake
    ]
    # nginx kept one pooled connection for the three plain requests.
    assert len(set(stand_in.peers)) == 1

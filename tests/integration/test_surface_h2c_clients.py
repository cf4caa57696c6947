"""Clients that offer an h2c upgrade get plain HTTP/1.1 (RFC 9110 §7.8).

``curl --http2 http://...`` and Java's ``java.net.http.HttpClient`` with its
default settings send every request with ``Upgrade: h2c``,
``Connection: Upgrade, HTTP2-Settings`` and an ``HTTP2-Settings`` header,
bodies included. The proxy ignores the offer: the request is served over
HTTP/1.1 on the same connection, its body is read and forwarded, no ``101`` is
sent, and the upstream sees none of the upgrade headers.

The clients are the real ones, run as processes against the proxy on a
loopback port (served as ``oaimux serve`` serves it); the Java client is
tests/java/ChatClient.java, run as a single-file program. Missing ``curl`` or
``java``: skipped locally, a failure when CI is set (.ci/run installs both).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy.config import Settings
from tests.conftest import basic_config
from tests.fakes.clients import CLIENT_DEADLINE, curl_sent_headers, run_client, tool_or_skip
from tests.fakes.security import running_proxy
from tests.fakes.upstream import FakeUpstream, Received

JAVA_CLIENT = Path(__file__).resolve().parents[1] / "java" / "ChatClient.java"
CHAT = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'
UPGRADE_HEADERS = ("upgrade", "http2-settings", "connection")


@pytest.fixture
def settings(make_settings: Any, upstream_url: str) -> Settings:
    config = basic_config(
        upstream_url, routes=[{"model": "*", "upstream": "fake"}, {"path": "*", "upstream": "fake"}]
    )
    result: Settings = make_settings(config)
    return result


def assert_no_upgrade_reached(received: list[Received]) -> None:
    for request in received:
        leaked = [name for name in UPGRADE_HEADERS if name in request.headers]
        assert leaked == [], f"{request.method} {request.path} carried {leaked}"


async def test_curl_http2_post_then_get_on_one_connection(
    settings: Settings, fake: FakeUpstream
) -> None:
    curl = tool_or_skip("curl")
    async with running_proxy(settings) as proxy:
        # One curl run, two requests: the POST's connection is reused for the GET.
        out, verbose = await run_client(
            curl, "--http2", "-sS", "-v", "-w", "\n%{http_version} %{num_connects}\n",
            "-H", "Content-Type: application/json", "--data-binary", "@-",
            f"{proxy.url}/v1/chat/completions",
            "--next", "--http2", "-sS", "-w", "\n%{http_version} %{num_connects}\n",
            f"{proxy.url}/v1/files?limit=2",
            stdin=CHAT,
        )  # fmt: skip
    sent = curl_sent_headers(verbose)
    assert "Upgrade: h2c" in sent and "Connection: Upgrade, HTTP2-Settings" in sent
    assert "< HTTP/1.1 101" not in verbose
    assert verbose.count("< HTTP/1.1 200 OK") == 2
    assert "Re-using existing connection" in verbose
    lines = out.splitlines()
    chat_answer, post_summary, files_answer, get_summary = lines[0], lines[1], lines[2], lines[3]
    assert json.loads(chat_answer)["choices"][0]["message"]["content"] == "hi"
    assert json.loads(files_answer)["path"] == "/v1/files"
    # HTTP/1.1 both times; the GET opened no connection of its own.
    assert (post_summary, get_summary) == ("1.1 1", "1.1 0")
    assert [(r.method, r.path, r.query_string, r.body) for r in fake.received] == [
        ("POST", "/v1/chat/completions", "", CHAT),
        ("GET", "/v1/files", "limit=2", b""),
    ]
    assert_no_upgrade_reached(fake.received)


async def test_curl_http2_chunked_post_body_is_forwarded(
    settings: Settings, fake: FakeUpstream
) -> None:
    curl = tool_or_skip("curl")
    async with running_proxy(settings) as proxy:
        out, verbose = await run_client(
            curl, "--http2", "-sS", "-v",
            "-H", "Content-Type: application/json", "-H", "Transfer-Encoding: chunked",
            "--data-binary", "@-", f"{proxy.url}/v1/chat/completions",
            stdin=CHAT,
        )  # fmt: skip
    sent = curl_sent_headers(verbose)
    assert "Upgrade: h2c" in sent and "Transfer-Encoding: chunked" in sent
    assert json.loads(out)["object"] == "chat.completion"
    assert [r.body for r in fake.received] == [CHAT]
    assert_no_upgrade_reached(fake.received)


@contextlib.asynccontextmanager
async def recording_relay(port: int) -> AsyncIterator[tuple[int, list[bytearray]]]:
    """A TCP relay to ``port`` on 127.0.0.1 that keeps what each client connection sent."""
    sent: list[bytearray] = []

    async def pipe(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, record: bytearray | None
    ) -> None:
        try:
            while data := await reader.read(1 << 16):
                if record is not None:
                    record += data
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        record = bytearray()
        sent.append(record)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.gather(pipe(reader, up_writer, record), pipe(up_reader, writer, None))

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1]), sent
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.java
async def test_java_http_client_chat_and_stream(settings: Settings, fake: FakeUpstream) -> None:
    java = tool_or_skip("java")
    fake.gated = True
    fake.gate(0).set()
    events: list[str] = []
    async with running_proxy(settings) as proxy, recording_relay(proxy.port) as (port, sent):
        proc = await asyncio.create_subprocess_exec(
            java, str(JAVA_CLIENT), f"http://127.0.0.1:{port}", "sk-any", "gpt-4o-mini",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None and proc.stderr is not None
        lines: list[str] = []
        try:
            async with asyncio.timeout(CLIENT_DEADLINE):
                while raw := await proc.stdout.readline():
                    line = raw.decode().rstrip("\n")
                    lines.append(line)
                    if line.startswith("line data: {"):
                        # Event i+1 is produced only once Java holds event i:
                        # a client or hop that waited for the whole body stalls here.
                        delta = json.loads(line[len("line data: ") :])["choices"][0]["delta"]
                        events.append(delta["content"])
                        fake.gate(len(events)).set()
                err = await proc.stderr.read()
                await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 0, err.decode(errors="replace")
    chat = lines[0].split(" ", 3)
    assert chat[:3] == ["chat", "200", "HTTP_1_1"]
    assert json.loads(chat[3])["choices"][0]["message"]["content"] == "hi"
    assert lines[1] == "stream 200 HTTP_1_1"
    assert events == ["tok0", "tok1", "tok2"]
    assert lines[-2:] == ["line data: [DONE]", "end"]
    # Java offered h2c with both requests, on one kept-alive connection.
    assert len(sent) == 1
    assert bytes(sent[0]).count(b"\r\nUpgrade: h2c\r\n") == 2
    assert [r.body for r in fake.received] == [
        b'{"model": "gpt-4o-mini", "messages": []}',
        b'{"model": "gpt-4o-mini", "stream": true, "messages": []}',
    ]
    assert all(r.headers["user-agent"].startswith("Java-http-client/") for r in fake.received)
    assert_no_upgrade_reached(fake.received)

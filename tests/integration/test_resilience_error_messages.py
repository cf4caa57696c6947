"""The errors that end a fallback walk name the cause at every upstream tried.

Real sockets on 127.0.0.1 only: a refused port, an upstream answering 401 to
the proxy's key, a silent one, a breaker opened by real failures, a TLS
handshake against a server whose certificate nobody trusts. Each asserts the
client's ``error.message`` word for word, the one warning line in the server
log, and that a canary secret put in every header, query and upstream body
never appears in either.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestClient

from proxy.client.failures import connect_failure
from tests.conftest import serve_proxy
from tests.fakes.access_lines import LogLines, capture_logs
from tests.faults import fixtures
from tests.faults.fixtures import JSON, FaultFactory, chat_body, route_config
from tests.faults.server import closed_port, hang, respond

# The shared fixture, bound here so pytest finds it.
faults = fixtures.faults

CANARY = "canary-7f3d"
CLIENT_HEADERS = {
    **JSON,
    "Authorization": f"Bearer sk-{CANARY}-client",
    "X-Trace": f"{CANARY}-header",
    "X-Request-Id": "walk",
}
QUERY = f"?api-key={CANARY}-query&trace={CANARY}-param"
FAST = {"connect": 2, "response": 0.5, "idle": 2}


def keyed(url: str, **extra: Any) -> dict[str, Any]:
    """An upstream that injects its own (canary) key and header."""
    return {
        "url": url,
        "headers": {"set": {"Authorization": f"Bearer sk-{CANARY}-upstream", "X-Org": CANARY}},
        **extra,
    }


@pytest.fixture
def logs() -> Iterator[LogLines]:
    with capture_logs() as lines:
        yield lines


async def ask(client: TestClient[Any, Any]) -> tuple[int, dict[str, Any], str]:
    resp = await client.post(
        f"/v1/chat/completions{QUERY}", data=chat_body(), headers=CLIENT_HEADERS
    )
    raw = await resp.text()
    assert CANARY not in raw and CANARY not in str(resp.headers)
    error: dict[str, Any] = (await resp.json())["error"]
    return resp.status, error, raw


def walk_warnings(logs: LogLines) -> list[str]:
    return [line for line in logs.everything if line.startswith("no upstream answered:")]


def assert_no_canary(logs: LogLines) -> None:
    leaked = [line for line in logs.everything if CANARY in line]
    assert not leaked, leaked


async def test_credential_refused_then_connection_refused(
    aiohttp_client: Any, faults: FaultFactory, logs: LogLines
) -> None:
    # The 401 body quotes the key, as some upstreams' do: it must go nowhere.
    openai = await faults(default=respond(401, f'{{"error": "bad key sk-{CANARY}"}}'.encode()))
    local = closed_port()
    config = route_config(
        {"openai": keyed(openai.url), "local": f"http://127.0.0.1:{local}/v1"},
        ["openai", "local"],
    )
    client = await serve_proxy(aiohttp_client, config)
    status, error, _ = await ask(client)
    assert (status, error["code"]) == (502, "upstream_unavailable")
    detail = (
        f"openai: answered 401 (credential refused); local: connection refused at 127.0.0.1:{local}"
    )
    assert error["message"] == f"No upstream could answer: {detail}."
    assert walk_warnings(logs) == [f"no upstream answered: {detail} [request walk]"]
    assert_no_canary(logs)


async def test_connection_refused_then_credential_refused_is_an_auth_failure(
    aiohttp_client: Any, faults: FaultFactory, logs: LogLines
) -> None:
    local = closed_port()
    openai = await faults(default=respond(403, b"{}"))
    config = route_config(
        {"local": f"http://127.0.0.1:{local}/v1", "openai": keyed(openai.url)},
        ["local", "openai"],
    )
    client = await serve_proxy(aiohttp_client, config)
    status, error, _ = await ask(client)
    assert (status, error["code"]) == (502, "upstream_auth_failed")
    assert error["message"] == (
        "The upstream 'openai' refused the proxy's credential: a configuration problem of "
        "the proxy, not of your request. Tried: "
        f"local: connection refused at 127.0.0.1:{local}; openai: answered 403 (credential refused)."
    )
    assert len(walk_warnings(logs)) == 1
    assert_no_canary(logs)


async def test_silent_upstream_after_a_refused_one_is_a_timeout(
    aiohttp_client: Any, faults: FaultFactory, logs: LogLines
) -> None:
    a = closed_port()
    b = await faults(default=hang())
    config = route_config(
        {"a": f"http://127.0.0.1:{a}/v1", "b": keyed(b.url, timeouts=FAST)}, ["a", "b"]
    )
    client = await serve_proxy(aiohttp_client, config)
    async with asyncio.timeout(10):
        status, error, _ = await ask(client)
    assert (status, error["code"]) == (504, "upstream_timeout")
    detail = f"a: connection refused at 127.0.0.1:{a}; b: no response headers within 0.5 s"
    assert error["message"] == f"No upstream answered in time: {detail}."
    assert walk_warnings(logs) == [f"no upstream answered: {detail} [request walk]"]
    assert_no_canary(logs)


async def test_an_open_circuit_and_retries_are_named(
    aiohttp_client: Any, faults: FaultFactory, logs: LogLines
) -> None:
    c = await faults(default=respond(500, b'{"error": "down"}'))
    b = closed_port()
    config = route_config(
        {
            "c": keyed(c.url, circuit_breaker={"failures": 1, "cooldown": 600}),
            "b": {"url": f"http://127.0.0.1:{b}/v1", "retries": {"attempts": 2, "backoff": 0}},
        },
        ["c", "b"],
    )
    client = await serve_proxy(aiohttp_client, config)
    refused = f"b: connection refused at 127.0.0.1:{b} (3 tries)"
    # The first request opens c's breaker (one failure is enough here).
    status, error, _ = await ask(client)
    assert (status, error["message"]) == (
        502,
        f"No upstream could answer: c: answered 500; {refused}.",
    )
    status, error, _ = await ask(client)
    assert (status, error["message"]) == (
        502,
        f"No upstream could answer: c: circuit open; {refused}.",
    )
    assert len(c.requests) == 1  # skipped, not tried
    assert len(walk_warnings(logs)) == 2
    assert_no_canary(logs)


async def test_a_fallback_that_answers_logs_what_went_before_once(
    aiohttp_client: Any, faults: FaultFactory, logs: LogLines
) -> None:
    a = closed_port()
    b = await faults()
    config = route_config({"a": f"http://127.0.0.1:{a}/v1", "b": keyed(b.url)}, ["a", "b"])
    client = await serve_proxy(aiohttp_client, config)
    resp = await client.post("/v1/chat/completions", data=chat_body(), headers=CLIENT_HEADERS)
    assert resp.status == 200
    after = [line for line in logs.everything if line.startswith("answered by")]
    assert after == [f"answered by b after: a: connection refused at 127.0.0.1:{a} [request walk]"]
    assert_no_canary(logs)


@contextlib.contextmanager
def self_signed(tmp_path: Path) -> Iterator[ssl.SSLContext]:
    """A server TLS context with a fresh self-signed certificate (openssl CLI)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    yield context


@contextlib.asynccontextmanager
async def tls_server(context: ssl.SSLContext) -> AsyncIterator[int]:
    """A TLS listener on 127.0.0.1 (the handshake is all that matters)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


async def test_an_untrusted_certificate_is_named(
    aiohttp_client: Any, tmp_path: Path, logs: LogLines
) -> None:
    with self_signed(tmp_path) as context:
        async with tls_server(context) as port:
            config = route_config({"t": keyed(f"https://127.0.0.1:{port}/v1")}, "t")
            client = await serve_proxy(aiohttp_client, config)
            status, error, _ = await ask(client)
    assert (status, error["code"]) == (502, "upstream_unavailable")
    assert error["message"].startswith(
        f"No upstream could answer: t: TLS handshake with 127.0.0.1:{port} failed "
        "(certificate verify failed"
    )
    assert "self" in error["message"] and "signed certificate" in error["message"]
    assert_no_canary(logs)


async def test_realtime_handshake_walk_names_each_upstream(
    aiohttp_client: Any, faults: FaultFactory, logs: LogLines
) -> None:
    a = await faults(default=respond(503, b"{}"))
    b = closed_port()
    config = route_config({"a": keyed(a.url), "b": f"http://127.0.0.1:{b}/v1"}, ["a", "b"])
    client = await serve_proxy(aiohttp_client, config)
    resp = await client.get(
        f"/v1/realtime?model=m&trace={CANARY}",
        headers={
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "X-Request-Id": "rt",
            "X-Trace": CANARY,
        },
    )
    raw = await resp.text()
    assert resp.status == 502 and CANARY not in raw
    detail = f"a: answered 503; b: connection refused at 127.0.0.1:{b}"
    assert (await resp.json())["error"]["message"] == f"No upstream could answer: {detail}."
    assert walk_warnings(logs) == [f"no upstream answered: {detail} [request rt]"]
    assert_no_canary(logs)


def test_connect_failure_words() -> None:
    """The wording for failures the suite cannot cause on 127.0.0.1 (DNS)."""
    dns = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert connect_failure(dns, "api.example.com", 443) == (
        "DNS lookup of api.example.com failed (Name or service not known)"
    )
    assert connect_failure(ConnectionRefusedError(111, "refused"), "::1", 8000) == (
        "connection refused at [::1]:8000"
    )
    unreachable = OSError(101, "Network is unreachable")
    assert connect_failure(unreachable, "10.0.0.1", 80) == (
        "cannot connect to 10.0.0.1:80 (Network is unreachable)"
    )


async def test_the_official_sdk_shows_the_cause(aiohttp_client: Any) -> None:
    """What a user of the openai SDK reads first, for a route whose one upstream
    (a local Ollama, say) is not running."""
    port = closed_port()
    config = route_config({"local": f"http://127.0.0.1:{port}/v1"}, "local")
    client = await serve_proxy(aiohttp_client, config)
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0)
    async with sdk:
        with pytest.raises(openai.InternalServerError) as info:
            await sdk.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}]
            )
    assert info.value.status_code == 502
    assert info.value.body == {
        "message": f"No upstream could answer: local: connection refused at 127.0.0.1:{port}.",
        "type": "api_error",
        "param": None,
        "code": "upstream_unavailable",
    }

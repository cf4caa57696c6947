"""Requests refused before their body still leave a trace: one access-log line
and their count in the metrics, with status and error code.

The proxy runs as ``oaimux serve`` builds it (``ProxyRunner``: the header
deadline, the parser's refusals and the ``Expect`` handler are all in play),
on a loopback port; the requests come from raw sockets and, for the
``Expect: 100-continue`` case, from real curl, which adds that header by
itself to bodies above 1 MB.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from proxy.config import Settings
from proxy.observe.metrics import Metrics
from proxy.server.keys import OBSERVER
from tests.conftest import basic_config
from tests.fakes.access_lines import LogLines, capture_logs, parse_text_line
from tests.fakes.security import RunningProxy, error_of, exchange, running_proxy, split_response

CHAT = "/v1/chat/completions"
LIMIT = 1000


def post_head(headers: str, path: str = CHAT + "?api-key=sk-secret") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: a\r\n{headers}\r\n".encode()


@pytest.fixture
def logs() -> Iterator[LogLines]:
    with capture_logs() as lines:
        yield lines


@pytest.fixture
def settings(make_settings: Callable[..., Settings], upstream_url: str) -> Settings:
    config = basic_config(upstream_url)
    config["server"] = {"max_body_bytes": LIMIT, "header_timeout": 0.5, "body_idle_timeout": 0.5}
    return make_settings(config)


def metrics_of(proxy: RunningProxy) -> Metrics:
    metrics = proxy.app[OBSERVER].metrics
    assert metrics is not None
    return metrics


def counted(metrics: Metrics, status: int, code: str) -> tuple[float | None, float | None]:
    """(requests counted with no model or upstream in ``status``'s class, errors with this code)."""
    registry = metrics.registry
    requests = registry.get_sample_value(
        "oaimux_requests_total",
        {"model": "", "upstream": "", "status_class": f"{status // 100}xx"},
    )
    errors = registry.get_sample_value("oaimux_errors_total", {"status": str(status), "code": code})
    return requests, errors


async def one_line(logs: LogLines) -> dict[str, str]:
    (line,) = await logs.wait_for(1)
    return parse_text_line(line)


REFUSALS: dict[str, tuple[bytes, int, str]] = {
    "413 on Content-Length": (
        post_head(f"Content-Length: {LIMIT + 1}\r\n"),
        413,
        "request_too_large",
    ),
    "413 on Expect": (
        post_head(f"Content-Length: {LIMIT + 1}\r\nExpect: 100-continue\r\n"),
        413,
        "request_too_large",
    ),
    "417": (post_head("Content-Length: 2\r\nExpect: teapot\r\n"), 417, "expectation_failed"),
    "431": (post_head("X-Long: " + "a" * 9000 + "\r\n"), 431, "request_header_fields_too_large"),
    "400 from the parser": (
        post_head("Content-Length: 4\r\nTransfer-Encoding: chunked\r\n") + b"0\r\n\r\n",
        400,
        "malformed_request",
    ),
    "408 head never complete": (post_head("X-Slow: 1\r\n")[:-2], 408, "request_timeout"),
    "408 body stalled": (post_head("Content-Length: 10\r\n") + b"{}", 408, "request_timeout"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
async def test_each_refusal_is_logged_once_and_counted(
    case: str, settings: Settings, logs: LogLines
) -> None:
    raw, status, code = REFUSALS[case]
    async with running_proxy(settings) as proxy:
        answer = await exchange(proxy.port, raw, timeout=5)
        got, headers, body = split_response(answer)
        assert got == status, answer[:300]
        assert error_of(body)["code"] == code
        f = await one_line(logs)
        assert (f["method"], f["path"]) == ("POST", CHAT)  # the query (a key) never logged
        assert (f["status"], f["error"], f["outcome"]) == (str(status), code, "error")
        assert f["request_id"] == headers["x-oaimux-request-id"]
        assert f["client"] == "127.0.0.1"
        assert int(f["bytes_out"]) == len(body)
        assert counted(metrics_of(proxy), status, code) == (1.0, 1.0)
    assert len(logs.access) == 1
    assert not any("sk-secret" in line for line in logs.everything)


async def test_the_header_deadline_names_the_time_the_head_took(
    settings: Settings, logs: LogLines
) -> None:
    async with running_proxy(settings) as proxy:
        await exchange(proxy.port, post_head("X-Slow: 1\r\n")[:-2], timeout=5)
        f = await one_line(logs)
    # Arrival is when the connection opened: the whole deadline is in the line.
    assert float(f["duration_ms"]) >= 500


@pytest.mark.parametrize(
    ("path", "anthropic"),
    [("/v1/messages?beta=true", True), ("/messages", True), (CHAT, False)],
)
async def test_a_late_head_gets_its_408_in_the_dialect_of_its_path(
    settings: Settings, logs: LogLines, path: str, anthropic: bool
) -> None:
    """Claude Code's path gets Anthropic's error shape, as every refusal there does."""
    async with running_proxy(settings) as proxy:
        answer = await exchange(proxy.port, post_head("x-api-key: k\r\n", path)[:-2], timeout=5)
    status, headers, body = split_response(answer)
    assert status == 408 and headers["x-oaimux-error"] == "request_timeout"
    doc = json.loads(body)
    if anthropic:
        assert doc["type"] == "error" and doc["error"]["type"] == "timeout_error", doc
    else:
        assert doc["error"]["code"] == "request_timeout" and "type" not in doc, doc
    assert int((await one_line(logs))["bytes_out"]) == len(body)


@pytest.mark.parametrize(
    "raw",
    [b"", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"GET /\x01 HTTP/1.1\r\n\r\n"],
    ids=["nothing", "tls-hello", "broken-request-line"],
)
async def test_what_is_not_a_request_is_not_logged(
    raw: bytes, settings: Settings, logs: LogLines
) -> None:
    async with running_proxy(settings) as proxy:
        answer = await exchange(proxy.port, raw, timeout=5)
        assert answer.startswith((b"HTTP/1.1 408", b"HTTP/1.0 400")), answer[:100]
        metrics = metrics_of(proxy)
        assert counted(metrics, 400, "malformed_request") == (None, None)
        assert counted(metrics, 408, "request_timeout") == (None, None)
    assert logs.access == []


async def test_a_refused_head_after_a_request_is_logged_with_its_own_line(
    settings: Settings, logs: LogLines
) -> None:
    """On a kept-alive connection, a refused second head is logged with its own
    method and path: not the first request's, nor bytes of its body (which
    arrives on its own, after the 100 Continue)."""
    body = b'{"model": "nope"}'
    first = post_head(f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n", path=CHAT)
    second = b"GET /v1/models HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n"
    async with running_proxy(settings) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            async with asyncio.timeout(5):
                writer.write(first)
                assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
                writer.write(body)
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 404")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                writer.write(second)
                assert (await reader.read()).startswith(b"HTTP/1.0 400")
        finally:
            writer.close()
        lines = await logs.wait_for(2)
    fields = [parse_text_line(line) for line in lines]
    assert [(f["method"], f["path"], f["status"]) for f in fields] == [
        ("POST", CHAT, "404"),
        ("GET", "/v1/models", "400"),
    ]


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
async def test_curl_upload_over_the_limit_gets_413_before_sending_and_a_trace(
    settings: Settings, logs: LogLines, tmp_path: Path
) -> None:
    big = tmp_path / "big.json"
    big.write_bytes(b'{"model": "gpt-4o-mini", "pad": "' + b"x" * (2 * 1024 * 1024) + b'"}')
    async with running_proxy(settings) as proxy:
        # Not subprocess.run: the proxy answers from this test's own event loop.
        curl = await asyncio.create_subprocess_exec(
            "curl", "-sS", "-v", "-o", "-", "-w", "\n%{http_code}",
            "-H", "Content-Type: application/json",
            "--data-binary", f"@{big}",
            f"{proxy.url}{CHAT}",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(30):
            out, err = await curl.communicate()
        f = await one_line(logs)
        assert counted(metrics_of(proxy), 413, "request_too_large") == (1.0, 1.0)
    body, _, code = out.decode().rpartition("\n")
    assert code == "413"
    assert error_of(body.encode())["code"] == "request_too_large"
    assert "> Expect: 100-continue" in err.decode()  # curl asked first, by itself
    assert (f["method"], f["path"], f["status"], f["error"]) == (
        "POST",
        CHAT,
        "413",
        "request_too_large",
    )
    assert f["bytes_in"] == "0"  # refused before the body was sent

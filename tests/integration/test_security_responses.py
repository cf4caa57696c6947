"""What a malformed upstream answer can do to a client: nothing (docs/faults.md,
"Malformed upstream answers"), and requests whose body and Content-Type disagree get
a defined answer (docs/faults.md, "Body and Content-Type that disagree")."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from proxy.config import parse_settings
from tests.fakes.security import error_of, exchange, garbage_server, running_proxy, split_response
from tests.fakes.upstream import FakeUpstream

GET = b"GET /v1/anything HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nX-A: a\rSet-Cookie: injected=1\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nX-A: a\x1b[2Jb\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 5\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 1000 OK\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"{}",
    ],
    ids=[
        "nul",
        "cr-splitting",
        "escape",
        "two-lengths",
        "cl-and-te",
        "bad-status",
        "status-1000",
        "bad-chunk",
        "not-http",
        "no-status-line",
    ],
)
async def test_malformed_upstream_answers_are_502_never_relayed(
    answer: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with garbage_server(answer) as port:
        settings = parse_settings(
            {
                "upstreams": {"u": {"url": f"http://127.0.0.1:{port}/v1"}},
                "routes": [{"path": "*", "upstream": "u"}],
            },
            environ={},
        )
        async with running_proxy(settings) as proxy:
            raw = await exchange(proxy.port, GET)
    status, headers, body = split_response(raw)
    assert status == 502, raw
    error = error_of(body)
    assert error["type"] == "api_error"
    assert "set-cookie" not in headers and "x-a" not in headers
    assert b"injected" not in raw and b"\x1b" not in raw
    # Logged as the upstream's fault, never as an unexpected error of the proxy.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\nX-A: a\nContent-Length: 2\n\n{}",
        b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 2\r\n\r\n{}",
    ],
    ids=["bare-lf", "obs-fold"],
)
async def test_tolerated_upstream_quirks_are_reserialized(answer: bytes) -> None:
    """aiohttp's response parser is lenient on purpose; what reaches the client is
    the proxy's own serialization (CRLF, one line per header), never the raw bytes."""
    async with garbage_server(answer) as port:
        settings = parse_settings(
            {
                "upstreams": {"u": {"url": f"http://127.0.0.1:{port}/v1"}},
                "routes": [{"path": "*", "upstream": "u"}],
            },
            environ={},
        )
        async with running_proxy(settings) as proxy:
            raw = await exchange(proxy.port, GET)
    head = raw.partition(b"\r\n\r\n")[0]
    assert split_response(raw)[0] == 200
    assert b"\n" not in head.replace(b"\r\n", b"")
    assert b"\r\n b" not in head


@pytest.mark.parametrize(
    ("path", "content_type", "body", "status", "code"),
    [
        # JSON endpoint, multipart label, JSON body: read as the label says.
        ("/v1/chat/completions", "multipart/form-data; boundary=x", b'{"model": "gpt-4o-mini"}', 400, "invalid_multipart"),
        ("/v1/chat/completions", "multipart/form-data", b'{"model": "gpt-4o-mini"}', 400, "invalid_multipart"),
        ("/v1/chat/completions", "multipart/form-data; boundary=" + "b" * 71, b"--", 400, "invalid_multipart"),
        # Form endpoint, JSON label: JSON is accepted there too.
        ("/v1/audio/transcriptions", "application/json", b'{"model": "gpt-4o-mini"}', 200, None),
        # No Content-Type: JSON is assumed, as the OpenAI API does.
        ("/v1/chat/completions", None, b'{"model": "gpt-4o-mini"}', 200, None),
        ("/v1/chat/completions", "text/plain", b"model=gpt-4o-mini", 400, "invalid_json"),
        # Multipart edge cases (docs/faults.md, "Form parts that parsers read differently").
        ("/v1/audio/transcriptions", "multipart/form-data; boundary=x",
         b'--x\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1', 400, "invalid_multipart"),
        ("/v1/audio/transcriptions", "multipart/form-data; boundary=x",
         b'--x\r\nContent-Disposition: form-data; name="file"\r\n\r\nabc\r\n--x--\r\n', 400, "missing_model"),
        ("/v1/audio/transcriptions", "multipart/form-data; boundary=x", b"no boundary here", 400, "invalid_multipart"),
    ],
    ids=[
        "json-as-multipart", "multipart-no-boundary", "boundary-too-long", "form-endpoint-json",
        "no-content-type", "text-plain", "unterminated-part", "no-model-field", "no-delimiter",
    ],
)  # fmt: skip
async def test_body_and_content_type_mismatches_have_a_defined_answer(
    make_proxy: Any,
    fake: FakeUpstream,
    path: str,
    content_type: str | None,
    body: bytes,
    status: int,
    code: str | None,
) -> None:
    client = await make_proxy()
    headers = {"Content-Type": content_type} if content_type else {}
    resp = await client.post(
        path,
        data=body,
        headers=headers,
        skip_auto_headers=() if content_type else ("Content-Type",),
    )
    assert resp.status == status, await resp.text()
    if code is None:
        assert fake.last.body == body
    else:
        assert error_of(await resp.read())["code"] == code
        assert fake.received == []

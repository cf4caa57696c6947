"""Every error the proxy makes has exactly OpenAI's shape and x-oaimux-error."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from tests.conftest import basic_config
from tests.fakes.upstream import FakeUpstream

JSON = {"Content-Type": "application/json"}


async def assert_error(
    resp: Any, status: int, type_: str, code: str, param: str | None = None
) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.headers["x-oaimux-error"] == code
    body = await resp.json()
    assert list(body) == ["error"]
    err = body["error"]
    assert sorted(err) == ["code", "message", "param", "type"]
    assert err["type"] == type_
    assert err["code"] == code
    assert err["param"] == param
    assert isinstance(err["message"], str) and err["message"] and "None" not in err["message"]
    return err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        (b'{"model": "no-such-model"}', 404, "model_not_found", "model"),
        (b"{not json", 400, "invalid_json", None),
        (b"", 400, "invalid_json", None),
        (b'{"messages": []}', 400, "missing_model", "model"),
        (b'{"model": 7}', 400, "missing_model", "model"),
        (b'{"model": "gpt-4o-mini", "model": "fast"}', 400, "ambiguous_model", "model"),
    ],
)
async def test_request_errors(
    make_proxy: Any, fake: FakeUpstream, body: bytes, status: int, code: str, param: str | None
) -> None:
    client = await make_proxy()
    resp = await client.post("/v1/chat/completions", data=body, headers=JSON)
    await assert_error(resp, status, "invalid_request_error", code, param)
    assert fake.received == []


async def test_ambiguous_model_form_fields(make_proxy: Any, fake: FakeUpstream) -> None:
    client = await make_proxy()
    body = (
        b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-4o-mini\r\n'
        b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nfast\r\n--b--\r\n'
    )
    resp = await client.post(
        "/v1/audio/transcriptions",
        data=body,
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    await assert_error(resp, 400, "invalid_request_error", "ambiguous_model", "model")
    assert fake.received == []


async def test_body_limit_is_exact(make_proxy: Any, fake: FakeUpstream, upstream_url: str) -> None:
    limit = 4096
    client = await make_proxy(basic_config(upstream_url, server={"max_body_bytes": limit}))
    prefix = b'{"model": "gpt-4o-mini", "pad": "'
    exact = prefix + b"x" * (limit - len(prefix) - 2) + b'"}'
    assert len(exact) == limit
    resp = await client.post("/v1/embeddings", data=exact, headers=JSON)
    assert resp.status == 200
    assert fake.last.body == exact
    over = prefix + b"x" * (limit - len(prefix) - 1) + b'"}'
    resp = await client.post("/v1/embeddings", data=over, headers=JSON)
    await assert_error(resp, 413, "invalid_request_error", "request_too_large")

    async def chunked() -> Any:
        yield over[:100]
        yield over[100:]

    resp = await client.post("/v1/embeddings", data=chunked(), headers=JSON)
    await assert_error(resp, 413, "invalid_request_error", "request_too_large")


async def test_unknown_path_and_wrong_method(make_proxy: Any) -> None:
    client = await make_proxy()
    await assert_error(
        await client.get("/v1/nothing/here"), 404, "invalid_request_error", "unknown_url"
    )
    resp = await client.get("/v1/chat/completions")
    await assert_error(resp, 405, "invalid_request_error", "method_not_allowed")
    assert resp.headers["Allow"] == "POST"


async def test_a_long_model_or_path_is_clipped_in_the_message(make_proxy: Any) -> None:
    """A client-chosen string quoted in an error stays at 200 characters and ``...``."""
    client = await make_proxy()
    model = "m" * 250  # a valid id (up to 256), longer than what a message quotes
    resp = await client.post("/v1/chat/completions", json={"model": model}, headers=JSON)
    err = await assert_error(resp, 404, "invalid_request_error", "model_not_found", "model")
    assert err["message"] == (
        f"The model '{model[:200]}...' does not exist or you do not have access to it."
    )
    path = "/v1/" + "p" * 300
    err = await assert_error(await client.get(path), 404, "invalid_request_error", "unknown_url")
    assert err["message"] == f"Unknown request URL: GET {path[:200]}...."


async def test_every_upstream_unreachable(make_proxy: Any, upstream_url: str) -> None:
    a, b = free_port(), free_port()
    config = basic_config(upstream_url)
    config["upstreams"] = {
        "a": {"url": f"http://127.0.0.1:{a}/v1"},
        "b": {"url": f"http://127.0.0.1:{b}/v1"},
    }
    config["routes"] = [{"model": "gpt-4o-mini", "upstream": ["a", "b"]}]
    client = await make_proxy(config)
    resp = await client.post("/v1/chat/completions", data=b'{"model": "gpt-4o-mini"}', headers=JSON)
    err = await assert_error(resp, 502, "api_error", "upstream_unavailable")
    # Host and port are no secret; what an operator needs to see is which, and why.
    assert err["message"] == (
        f"No upstream could answer: a: connection refused at 127.0.0.1:{a}; "
        f"b: connection refused at 127.0.0.1:{b}."
    )


async def test_fallback_when_first_cannot_be_connected(
    make_proxy: Any, fake: FakeUpstream, upstream_url: str
) -> None:
    config = basic_config(upstream_url)
    config["upstreams"]["dead"] = {"url": f"http://127.0.0.1:{free_port()}/v1"}
    config["routes"] = [{"model": "gpt-4o-mini", "upstream": ["dead", "fake"]}]
    client = await make_proxy(config)
    resp = await client.post("/v1/chat/completions", data=b'{"model": "gpt-4o-mini"}', headers=JSON)
    assert resp.status == 200
    assert len(fake.received) == 1


async def test_upstream_rejects_proxy_credential(make_proxy: Any, fake: FakeUpstream) -> None:
    fake.status_override = 401
    client = await make_proxy()
    resp = await client.post("/v1/chat/completions", data=b'{"model": "gpt-4o-mini"}', headers=JSON)
    err = await assert_error(resp, 502, "api_error", "upstream_auth_failed")
    assert "upstream says" not in err["message"]


async def test_upstream_errors_pass_through_verbatim(make_proxy: Any, fake: FakeUpstream) -> None:
    fake.status_override = 400
    client = await make_proxy()
    resp = await client.post("/v1/chat/completions", data=b'{"model": "gpt-4o-mini"}', headers=JSON)
    assert resp.status == 400
    assert "x-oaimux-error" not in resp.headers
    assert (await resp.json())["error"]["message"] == "upstream says 400"


async def test_response_timeout(make_proxy: Any, fake: FakeUpstream, upstream_url: str) -> None:
    config = basic_config(upstream_url)
    config["upstreams"]["fake"]["timeouts"] = {"response": 0.2}
    config["routes"] = [{"path": "slow", "upstream": "fake"}]
    client = await make_proxy(config)
    resp = await client.post("/v1/slow", data=b"{}")
    await assert_error(resp, 504, "api_error", "upstream_timeout")
    # The abandoned upstream request is closed, not left running.
    await asyncio.wait_for(fake.upstream_closed.wait(), 10)

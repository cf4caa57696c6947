"""Requests that name no model on a model-routed path, and methods on /v1/models.

OpenAI makes ``model`` optional on moderations, images and responses (a
stored prompt names its own): such a request goes to the path routes, then
the ``default: true`` route, as a model-less path does; with neither it is
``400 missing_model``. A ``model`` that is there but unusable keeps its
error, and a key with a ``models:`` list must name one. ``GET /v1/models``
stays the proxy's own; any other method there is routed like a model-less
path, else ``405`` with ``Allow: GET``. The official SDK sends the requests.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.conftest import serve_proxy
from tests.fakes.upstream import FakeUpstream

PROXY_KEY = "pk-model-optional-1"
LISTED_KEY = "pk-model-optional-listed"  # may use gpt-4o-mini only
MiB = 1024 * 1024


@pytest.fixture
def main() -> FakeUpstream:
    return FakeUpstream()


@pytest.fixture
def moderation() -> FakeUpstream:
    return FakeUpstream()


@pytest.fixture
async def servers(
    aiohttp_server: Any, main: FakeUpstream, moderation: FakeUpstream
) -> tuple[TestServer, TestServer]:
    return (
        await aiohttp_server(main.app(), auto_decompress=False),
        await aiohttp_server(moderation.app(), auto_decompress=False),
    )


def config(
    servers: tuple[TestServer, TestServer], *, default: bool = True, keys: bool = False
) -> dict[str, Any]:
    main_server, moderation_server = servers
    routes: list[dict[str, Any]] = [
        {"model": "gpt-4o-mini", "upstream": "main"},
        {"path": "moderations", "upstream": "moderation"},
    ]
    if default:
        routes.append({"default": True, "upstream": "main"})
    cfg: dict[str, Any] = {
        "upstreams": {
            "main": {
                "url": str(main_server.make_url("/v1")),
                "headers": {"set": {"Authorization": "Bearer sk-main"}},
            },
            "moderation": {"url": str(moderation_server.make_url("/v1"))},
        },
        "routes": routes,
    }
    if keys:
        cfg["auth"] = {
            "keys": [
                {"name": "open", "key": PROXY_KEY},
                {"name": "listed", "key": LISTED_KEY, "models": ["gpt-4o-mini"]},
            ]
        }
    return cfg


def sdk(proxy: TestClient[Any, Any], key: str = PROXY_KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(proxy.make_url("/v1")), api_key=key, max_retries=0)


def form(*fields: tuple[str, bytes]) -> tuple[bytes, dict[str, str]]:
    boundary = "oaimuxModelOptional"
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        + value
        + b"\r\n"
        for name, value in fields
    )
    return body + f"--{boundary}--\r\n".encode(), {
        "Content-Type": f"multipart/form-data; boundary={boundary}"
    }


async def test_sdk_calls_without_a_model_take_the_path_route_then_the_default(
    aiohttp_client: Any,
    servers: tuple[TestServer, TestServer],
    main: FakeUpstream,
    moderation: FakeUpstream,
) -> None:
    proxy = await serve_proxy(aiohttp_client, config(servers))
    async with sdk(proxy) as client:
        await client.moderations.create(input="is this fine?")
        (got,) = moderation.received
        assert (got.method, got.path) == ("POST", "/v1/moderations")
        assert json.loads(got.body) == {"input": "is this fine?"}
        # Named, the model routes it: the path route is only for requests without one.
        await client.moderations.create(input="and this?", model="gpt-4o-mini")
        assert len(moderation.received) == 1
        assert json.loads(main.last.body) == {"input": "and this?", "model": "gpt-4o-mini"}

        await client.images.generate(prompt="a lighthouse at dusk")
        assert (main.last.path, json.loads(main.last.body)) == (
            "/v1/images/generations",
            {"prompt": "a lighthouse at dusk"},
        )
        await client.responses.create(prompt={"id": "pmpt_stored_1", "version": "2"})
        assert main.last.path == "/v1/responses"
        assert json.loads(main.last.body) == {"prompt": {"id": "pmpt_stored_1", "version": "2"}}
        assert main.last.headers["authorization"] == "Bearer sk-main"

        # A multipart form without a model field, small and over the streaming threshold.
        for size in (1000, 3 * MiB):
            image = hashlib.sha256(str(size).encode()).digest() * (size // 32)
            await client.images.edit(image=("in.png", image, "image/png"), prompt="add a boat")
            assert main.last.path == "/v1/images/edits"
            assert image in main.last.body and b'name="model"' not in main.last.body
            assert b'name="prompt"\r\n\r\nadd a boat\r\n' in main.last.body


@pytest.mark.parametrize(
    ("path", "body", "headers"),
    [
        ("/v1/moderations", b'{"input": "x"}', {"Content-Type": "application/json"}),
        ("/v1/images/generations", b'{"prompt": "x"}', {"Content-Type": "application/json"}),
        ("/v1/images/variations", *form(("image", b"\x89PNG"))),
    ],
    ids=["moderations", "images-generations", "images-variations-form"],
)
async def test_no_model_and_no_route_is_missing_model(
    aiohttp_client: Any,
    servers: tuple[TestServer, TestServer],
    main: FakeUpstream,
    moderation: FakeUpstream,
    path: str,
    body: bytes,
    headers: dict[str, str],
) -> None:
    cfg = config(servers, default=False)
    if path == "/v1/moderations":
        cfg["routes"].pop(1)  # no path route either
    proxy = await serve_proxy(aiohttp_client, cfg)
    resp = await proxy.post(path, data=body, headers=headers)
    assert resp.status == 400, await resp.text()
    error = (await resp.json())["error"]
    assert (error["code"], error["param"]) == ("missing_model", "model")
    assert error["message"] == "you must provide a model parameter"
    assert main.received == [] and moderation.received == []


@pytest.mark.parametrize(
    ("body", "headers", "code"),
    [
        (b'{"model": 7, "input": "x"}', None, "missing_model"),
        (b'{"model": null, "input": "x"}', None, "missing_model"),
        (b'{"model": ["gpt-4o-mini"]}', None, "missing_model"),
        (b'{"model": ""}', None, "missing_model"),
        (b"[]", None, "missing_model"),
        (b'{"model": "gpt-4o-mini", "model": "gpt-4o-mini"}', None, "ambiguous_model"),
        (json.dumps({"model": "m" * 257}).encode(), None, "invalid_model"),
        (b'{"model": "a\\u0000b"}', None, "invalid_model"),
        (*form(("model", b""), ("prompt", b"x")), "missing_model"),
        (*form(("model", b"\xff\xfe"), ("prompt", b"x")), "missing_model"),
        (*form(("model", b"gpt-4o-mini"), ("model", b"gpt-4o-mini")), "ambiguous_model"),
    ],
    ids=[
        "number",
        "null",
        "list",
        "empty",
        "not-an-object",
        "twice",
        "too-long",
        "control-character",
        "form-empty",
        "form-not-utf8",
        "form-twice",
    ],
)
async def test_a_model_that_is_there_but_unusable_keeps_its_error(
    aiohttp_client: Any,
    servers: tuple[TestServer, TestServer],
    main: FakeUpstream,
    moderation: FakeUpstream,
    body: bytes,
    headers: dict[str, str] | None,
    code: str,
) -> None:
    proxy = await serve_proxy(aiohttp_client, config(servers))
    for path in ("/v1/moderations", "/v1/images/edits"):
        resp = await proxy.post(
            path, data=body, headers=headers or {"Content-Type": "application/json"}
        )
        assert resp.status == 400, await resp.text()
        assert (await resp.json())["error"]["code"] == code
    assert main.received == [] and moderation.received == []


async def test_a_key_with_a_models_list_must_name_a_model(
    aiohttp_client: Any,
    servers: tuple[TestServer, TestServer],
    main: FakeUpstream,
    moderation: FakeUpstream,
) -> None:
    proxy = await serve_proxy(aiohttp_client, config(servers, keys=True))
    async with sdk(proxy, LISTED_KEY) as listed, sdk(proxy) as unlisted:
        for call in (
            lambda c: c.moderations.create(input="x"),
            lambda c: c.images.generate(prompt="x"),
            lambda c: c.images.edit(image=("a.png", b"\x89PNG", "image/png"), prompt="x"),
        ):
            with pytest.raises(openai.PermissionDeniedError) as refused:
                await call(listed)
            error = refused.value.body
            assert isinstance(error, dict)
            assert error["code"] == "model_not_allowed" and error["param"] == "model"
            assert error["message"] == "this key must name a model"
            assert main.received == [] and moderation.received == []
        # Naming an allowed model works; a key without a list may leave it out.
        await listed.moderations.create(input="x", model="gpt-4o-mini")
        await unlisted.moderations.create(input="x")
    assert len(main.received) == 1 and len(moderation.received) == 1
    # With no route to fall back to, the request is what is wrong: 400, not 403.
    proxy = await serve_proxy(aiohttp_client, config(servers, default=False, keys=True))
    resp = await proxy.post(
        "/v1/images/generations",
        json={"prompt": "x"},
        headers={"Authorization": f"Bearer {LISTED_KEY}"},
    )
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "missing_model"


async def test_other_methods_on_the_models_paths_are_routed_like_model_less_paths(
    aiohttp_client: Any, servers: tuple[TestServer, TestServer], main: FakeUpstream
) -> None:
    proxy = await serve_proxy(aiohttp_client, config(servers))
    async with sdk(proxy) as client:
        deleted = await client.models.delete("ft:gpt-4o-mini:acme:custom:abc123")
        assert deleted is not None
        assert (main.last.method, main.last.path) == (
            "DELETE",
            "/v1/models/ft:gpt-4o-mini:acme:custom:abc123",
        )
        # GET stays the proxy's own: the routing table, not the upstream's list.
        listed = await client.models.list()
        assert [m.id for m in listed.data] == ["gpt-4o-mini"]
        assert (await client.models.retrieve("gpt-4o-mini")).owned_by == "oaimux"
    assert [r.method for r in main.received] == ["DELETE"]
    resp = await proxy.post("/models", json={"id": "x"})
    assert resp.status == 200 and (main.last.method, main.last.path) == ("POST", "/v1/models")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/models"),
        ("DELETE", "/v1/models/ft:gpt-4o-mini:acme:custom:abc123"),
        ("PUT", "/v1/models/meta-llama/Llama-3"),
        ("PATCH", "/models"),
        ("OPTIONS", "/v1/models"),
    ],
)
async def test_other_methods_on_the_models_paths_without_a_route_are_405(
    aiohttp_client: Any,
    servers: tuple[TestServer, TestServer],
    main: FakeUpstream,
    method: str,
    path: str,
) -> None:
    proxy = await serve_proxy(aiohttp_client, config(servers, default=False))
    resp = await proxy.request(method, path)
    assert resp.status == 405, await resp.text()
    assert resp.headers["Allow"] == "GET"
    error = (await resp.json())["error"]
    assert error["code"] == "method_not_allowed" and method in error["message"]
    assert main.received == []


async def test_non_post_on_model_paths_keeps_its_rule(
    aiohttp_client: Any, servers: tuple[TestServer, TestServer], main: FakeUpstream
) -> None:
    proxy = await serve_proxy(aiohttp_client, config(servers, default=False))
    resp = await proxy.get("/v1/responses")
    assert (resp.status, resp.headers["Allow"]) == (405, "POST")
    resp = await proxy.get("/v1/responses/resp_123")  # a sub-resource: unknown without a route
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "unknown_url"
    resp = await proxy.get("/v1/models/")  # no id: not one of the proxy's own paths
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "unknown_url"
    assert main.received == []

    proxy = await serve_proxy(aiohttp_client, config(servers))
    for path in ("/v1/responses/resp_123", "/v1/chat/completions"):
        resp = await proxy.get(path)
        assert resp.status == 200 and (main.last.method, main.last.path) == ("GET", path)

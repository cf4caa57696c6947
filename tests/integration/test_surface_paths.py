"""Requests with no model: path routes, the default route, streamed uploads.

Files, batches, uploads, vector stores, assistants and threads go to the
upstream their ``path`` route names; GET and DELETE by id pass through; large
uploads are streamed to the upstream as they arrive, never held whole
(README, "Endpoints", "Uploads are streamed").
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tests.conftest import serve_proxy
from tests.fakes.openai_like import OpenAILike, audio_blob

BOUNDARY = "----oaimuxBoundary7MA4YWxkTrZu0gW"
MiB = 1024 * 1024


@pytest.fixture
def files() -> OpenAILike:
    return OpenAILike(name="files")


@pytest.fixture
def main() -> OpenAILike:
    return OpenAILike(name="main")


@pytest.fixture
async def servers(
    aiohttp_server: Any, files: OpenAILike, main: OpenAILike
) -> tuple[TestServer, TestServer]:
    return await aiohttp_server(files.app()), await aiohttp_server(main.app())


def config(servers: tuple[TestServer, TestServer], **extra: Any) -> dict[str, Any]:
    files_server, main_server = servers
    cfg: dict[str, Any] = {
        "upstreams": {
            "files": {
                "url": str(files_server.make_url("/v1")),
                "headers": {"set": {"Authorization": "Bearer sk-files-upstream"}},
            },
            "main": {"url": str(main_server.make_url("/v1"))},
        },
        "routes": [
            {"model": "gpt-4o-mini", "upstream": "main"},
            {"path": "files*", "upstream": "files"},
            {"path": "batches*", "upstream": "files"},
            {"path": "uploads*", "upstream": "files"},
            {"path": "vector_stores*", "upstream": "main"},
            {"path": "assistants*", "upstream": "main"},
            {"path": "threads*", "upstream": "main"},
        ],
    }
    cfg.update(extra)
    return cfg


@pytest.fixture
async def proxy(
    aiohttp_client: Any, servers: tuple[TestServer, TestServer]
) -> TestClient[web.Request, web.Application]:
    return await serve_proxy(aiohttp_client, config(servers))


def multipart(file_bytes: bytes, purpose: str = "batch") -> tuple[bytes, bytes]:
    """(head, tail) of a multipart/form-data body around the file's bytes."""
    head = (
        f"--{BOUNDARY}\r\n"
        'Content-Disposition: form-data; name="purpose"\r\n\r\n'
        f"{purpose}\r\n"
        f"--{BOUNDARY}\r\n"
        'Content-Disposition: form-data; name="file"; filename="input.jsonl"\r\n'
        "Content-Type: application/jsonl\r\n\r\n"
    ).encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    return head, tail


FORM = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


async def test_a_20mb_upload_streams_through_before_the_client_has_finished(
    proxy: TestClient[Any, Any], files: OpenAILike
) -> None:
    """The client holds back the last part of its body until the upstream has
    seen the first bytes: a proxy that buffered the upload would wait forever."""
    payload = audio_blob(20 * MiB)
    head, tail = multipart(payload)
    body = head + payload + tail

    async def gated() -> AsyncIterator[bytes]:
        yield body[: 2 * MiB]
        async with asyncio.timeout(10):
            await files.upload_started.wait()
        for i in range(2 * MiB, len(body), 256 * 1024):
            yield body[i : i + 256 * 1024]

    resp = await proxy.post(
        "/v1/files",
        data=gated(),
        headers={**FORM, "Content-Length": str(len(body)), "Authorization": "Bearer sk-client"},
    )
    assert resp.status == 200, await resp.text()
    answer = await resp.json()
    assert answer["object"] == "file" and answer["bytes"] == len(body)
    got = files.last
    assert got.path == "/v1/files" and got.method == "POST"
    assert got.body_len == len(body)
    assert got.body_sha256 == hashlib.sha256(body).hexdigest()
    assert got.headers["content-length"] == str(len(body))
    assert got.headers["content-type"] == FORM["Content-Type"]
    assert got.headers["authorization"] == "Bearer sk-files-upstream"
    assert "transfer-encoding" not in got.headers


async def test_a_chunked_upload_streams_through_chunked(
    proxy: TestClient[Any, Any], files: OpenAILike
) -> None:
    payload = audio_blob(5 * MiB + 3)
    head, tail = multipart(payload)

    async def chunks() -> AsyncIterator[bytes]:
        yield head
        for i in range(0, len(payload), 100_000):
            yield payload[i : i + 100_000]
        yield tail

    resp = await proxy.post("/v1/files", data=chunks(), headers=FORM)
    assert resp.status == 200, await resp.text()
    body = head + payload + tail
    assert files.last.body_sha256 == hashlib.sha256(body).hexdigest()
    assert files.last.headers.get("transfer-encoding") == "chunked"


async def test_upload_over_max_body_bytes_is_413_without_reaching_the_upstream(
    aiohttp_client: Any, servers: tuple[TestServer, TestServer], files: OpenAILike
) -> None:
    proxy = await serve_proxy(aiohttp_client, config(servers, server={"max_body_bytes": 2 * MiB}))
    body = b"x" * (3 * MiB)
    resp = await proxy.post("/v1/files", data=io.BytesIO(body), headers=FORM)
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "request_too_large"
    assert files.received == []


async def test_chunked_upload_growing_over_max_body_bytes_is_413(
    aiohttp_client: Any, servers: tuple[TestServer, TestServer], files: OpenAILike
) -> None:
    proxy = await serve_proxy(aiohttp_client, config(servers, server={"max_body_bytes": 2 * MiB}))

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(6):
            yield b"y" * (512 * 1024)

    resp = await proxy.post("/v1/files", data=chunks(), headers=FORM)
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "request_too_large"


async def test_a_stalled_upload_is_408_and_not_blamed_on_the_upstream(
    aiohttp_client: Any, servers: tuple[TestServer, TestServer], files: OpenAILike
) -> None:
    proxy = await serve_proxy(aiohttp_client, config(servers, server={"body_idle_timeout": 0.3}))
    never = asyncio.Event()

    async def stalls() -> AsyncIterator[bytes]:
        yield b"z" * (2 * MiB)
        await never.wait()
        yield b"never sent"

    resp = await proxy.post(
        "/v1/files", data=stalls(), headers={**FORM, "Content-Length": str(3 * MiB)}
    )
    assert resp.status == 408
    assert (await resp.json())["error"]["code"] == "request_timeout"
    never.set()


async def test_fallback_still_applies_before_a_streamed_body_went_out(
    aiohttp_client: Any,
    servers: tuple[TestServer, TestServer],
    files: OpenAILike,
    unused_tcp_port: int,
) -> None:
    cfg = config(servers)
    cfg["upstreams"]["down"] = {"url": f"http://127.0.0.1:{unused_tcp_port}/v1"}
    cfg["routes"][1] = {"path": "files*", "upstream": ["down", "files"]}
    proxy = await serve_proxy(aiohttp_client, cfg)
    payload = audio_blob(3 * MiB)
    head, tail = multipart(payload)
    resp = await proxy.post("/v1/files", data=io.BytesIO(head + payload + tail), headers=FORM)
    assert resp.status == 200, await resp.text()
    assert files.last.body_len == len(head + payload + tail)


async def test_a_streamed_body_is_not_sent_twice(
    aiohttp_client: Any,
    aiohttp_server: Any,
    servers: tuple[TestServer, TestServer],
    files: OpenAILike,
) -> None:
    """An upstream that read the whole upload and answered 503: its answer is
    relayed, the next upstream is not tried with a body that is gone."""
    seen: list[int] = []

    async def busy(request: web.Request) -> web.Response:
        seen.append(len(await request.read()))
        return web.json_response({"error": {"message": "overloaded"}}, status=503)

    busy_app = web.Application(client_max_size=64 * MiB)
    busy_app.router.add_post("/v1/files", busy)
    busy_server = await aiohttp_server(busy_app)
    cfg = config(servers)
    cfg["upstreams"]["busy"] = {"url": str(busy_server.make_url("/v1"))}
    cfg["routes"][1] = {"path": "files*", "upstream": ["busy", "files"]}
    proxy = await serve_proxy(aiohttp_client, cfg)
    body = audio_blob(3 * MiB)
    resp = await proxy.post("/v1/files", data=io.BytesIO(body), headers=FORM)
    assert resp.status == 503
    assert (await resp.json())["error"]["message"] == "overloaded"
    assert seen == [len(body)]
    assert files.received == []


async def test_small_path_routed_bodies_keep_their_fallback(
    aiohttp_client: Any,
    aiohttp_server: Any,
    servers: tuple[TestServer, TestServer],
    files: OpenAILike,
) -> None:
    async def busy(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"error": {"message": "overloaded"}}, status=503)

    busy_app = web.Application()
    busy_app.router.add_post("/v1/batches", busy)
    busy_server = await aiohttp_server(busy_app)
    cfg = config(servers)
    cfg["upstreams"]["busy"] = {"url": str(busy_server.make_url("/v1"))}
    cfg["routes"][2] = {"path": "batches*", "upstream": ["busy", "files"]}
    proxy = await serve_proxy(aiohttp_client, cfg)
    resp = await proxy.post(
        "/v1/batches",
        json={
            "input_file_id": "file-1",
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        },
    )
    assert resp.status == 200
    assert (await resp.json())["object"] == "batch"


async def test_files_get_and_delete_by_id_pass_through(
    proxy: TestClient[Any, Any], files: OpenAILike, main: OpenAILike
) -> None:
    head, tail = multipart(b'{"custom_id": "request-1"}\n')
    created = await (
        await proxy.post(
            "/v1/files", data=head + b'{"custom_id": "request-1"}\n' + tail, headers=FORM
        )
    ).json()
    file_id = created["id"]

    listed = await proxy.get("/v1/files?purpose=batch&limit=10")
    assert listed.status == 200
    assert [f["id"] for f in (await listed.json())["data"]] == [file_id]
    assert files.last.query_string == "purpose=batch&limit=10"

    got = await proxy.get(f"/v1/files/{file_id}")
    assert got.status == 200 and (await got.json())["id"] == file_id

    content = await proxy.get(f"/v1/files/{file_id}/content")
    assert content.status == 200
    assert await content.read() == files.sent[f"/v1/files/{file_id}/content"]

    deleted = await proxy.delete(f"/v1/files/{file_id}")
    assert deleted.status == 200
    assert await deleted.json() == {"id": file_id, "object": "file.deleted", "deleted": True}
    assert files.last.method == "DELETE" and files.last.path == f"/v1/files/{file_id}"

    missing = await proxy.get(f"/v1/files/{file_id}")
    assert missing.status == 404  # the upstream's own 404, passed through
    assert (await missing.json())["error"]["message"] == "not found"
    assert main.received == []


async def test_batches_uploads_vector_stores_assistants_threads(
    proxy: TestClient[Any, Any], files: OpenAILike, main: OpenAILike
) -> None:
    batch = await (
        await proxy.post(
            "/v1/batches",
            json={
                "input_file_id": "file-abc123",
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
            },
        )
    ).json()
    assert batch["object"] == "batch" and batch["status"] == "validating"
    assert (await (await proxy.get(f"/v1/batches/{batch['id']}")).json())["id"] == batch["id"]
    assert files.last.path == f"/v1/batches/{batch['id']}"

    upload = await (
        await proxy.post(
            "/v1/uploads",
            json={
                "purpose": "fine-tune",
                "filename": "t.jsonl",
                "bytes": 2 * MiB,
                "mime_type": "text/jsonl",
            },
        )
    ).json()
    part_body = audio_blob(2 * MiB)
    head, tail = multipart(part_body)
    part = await proxy.post(
        f"/v1/uploads/{upload['id']}/parts", data=io.BytesIO(head + part_body + tail), headers=FORM
    )
    assert part.status == 200
    assert files.last.body_sha256 == hashlib.sha256(head + part_body + tail).hexdigest()
    part_id = (await part.json())["id"]
    done = await proxy.post(f"/v1/uploads/{upload['id']}/complete", json={"part_ids": [part_id]})
    assert (await done.json())["status"] == "completed"

    beta = {"OpenAI-Beta": "assistants=v2"}
    for family, kind, body in [
        ("vector_stores", "vector_store", {"name": "Support FAQ"}),
        ("assistants", "assistant", {"model": "gpt-4o", "instructions": "Be terse."}),
        ("threads", "thread", {"messages": [{"role": "user", "content": "Hello"}]}),
    ]:
        created = await proxy.post(f"/v1/{family}", json=body, headers=beta)
        assert created.status == 200, family
        obj = await created.json()
        assert obj["object"] == kind
        assert main.last.headers["openai-beta"] == "assistants=v2"
        listed = await proxy.get(f"/v1/{family}?order=desc&limit=2", headers=beta)
        assert obj["id"] in [o["id"] for o in (await listed.json())["data"]]
        assert main.last.query_string == "order=desc&limit=2"
        fetched = await proxy.get(f"/v1/{family}/{obj['id']}", headers=beta)
        assert (await fetched.json())["id"] == obj["id"]
        gone = await proxy.delete(f"/v1/{family}/{obj['id']}", headers=beta)
        assert (await gone.json())["deleted"] is True
    # A body with a "model" on a path route is not routed by it: the path decides.
    assert all(r.path.startswith("/v1/") for r in main.received)


async def test_no_matching_route_is_an_openai_404(
    proxy: TestClient[Any, Any], files: OpenAILike, main: OpenAILike
) -> None:
    for method, path in [
        ("GET", "/v1/fine_tuning/jobs"),
        ("POST", "/v1/evals"),
        ("DELETE", "/v1/containers/cntr_1"),
    ]:
        resp = await proxy.request(method, path, json={} if method == "POST" else None)
        assert resp.status == 404, path
        error = (await resp.json())["error"]
        assert error["type"] == "invalid_request_error"
        assert error["code"] == "unknown_url"
        assert path in error["message"]
    assert files.received == [] and main.received == []


async def test_the_default_route_takes_every_other_path(
    aiohttp_client: Any, servers: tuple[TestServer, TestServer], main: OpenAILike
) -> None:
    cfg = config(servers)
    cfg["routes"].append({"default": True, "upstream": "main"})
    proxy = await serve_proxy(aiohttp_client, cfg)
    resp = await proxy.get("/v1/fine_tuning/jobs?limit=3")
    assert resp.status == 404  # the fake has no such family: its own 404 came back
    assert main.last.path == "/v1/fine_tuning/jobs" and main.last.query_string == "limit=3"
    # A model-routed path with an unknown model is still the proxy's 404, not the default's.
    resp = await proxy.post("/v1/chat/completions", json={"model": "nope", "messages": []})
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "model_not_found"
    assert json.loads(main.last.body or b"{}") == {}

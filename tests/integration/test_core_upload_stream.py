"""Large multipart forms reach the upstream while the client is still sending,
once their model field is in; a second model field still stops them."""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from tests.conftest import basic_config

BOUNDARY = "oaimuxbnd"


def part(name: str, value: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"


class Recorder:
    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.done = asyncio.Event()
        self.body = b""
        self.error: BaseException | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.entered.set()  # the request head is in; its body may still be coming
        try:
            self.body = await request.read()
        except BaseException as exc:  # the proxy cut the upload off
            self.error = exc
            self.done.set()
            raise
        self.done.set()
        return web.json_response({"text": "ok", "sha256": hashlib.sha256(self.body).hexdigest()})


async def upstream(aiohttp_server: Any) -> tuple[Recorder, str]:
    recorder = Recorder()
    app = web.Application(client_max_size=1 << 30)
    app.router.add_post("/v1/audio/transcriptions", recorder.handle)
    server = await aiohttp_server(app, auto_decompress=False)
    return recorder, str(server.make_url("/v1"))


async def test_upload_streams_after_the_model_field(aiohttp_server: Any, make_proxy: Any) -> None:
    recorder, url = await upstream(aiohttp_server)
    client = await make_proxy(basic_config(url))
    audio = bytes(range(256)) * 20_000  # ~5 MB
    first = part("model", b"fast") + part("file", audio[:1_000_000], "a.mp3")[:-2]
    rest = audio[1_000_000:] + b"\r\n" + part("language", b"en") + f"--{BOUNDARY}--\r\n".encode()

    async def body() -> AsyncIterator[bytes]:
        yield first
        # Only a proxy that streams lets the upstream see the request before this.
        await asyncio.wait_for(recorder.entered.wait(), 10)
        yield rest

    resp = await client.post(
        "/v1/audio/transcriptions",
        data=body(),
        headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
    )
    assert resp.status == 200, await resp.text()
    expected = (first + rest).replace(b"\r\n\r\nfast\r\n", b"\r\n\r\nllama3.2:3b\r\n", 1)
    assert recorder.body == expected


async def test_second_model_in_the_streamed_rest_is_refused(
    aiohttp_server: Any, make_proxy: Any
) -> None:
    recorder, url = await upstream(aiohttp_server)
    client = await make_proxy(basic_config(url))
    payload = (
        part("model", b"gpt-4o-mini")
        + part("file", b"\x00" * 2_000_000, "a.mp3")
        + part("model", b"fast")
        + f"--{BOUNDARY}--\r\n".encode()
    )
    resp = await client.post(
        "/v1/audio/transcriptions",
        data=io.BytesIO(payload),
        headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
    )
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "ambiguous_model"
    # The upstream never got a whole request.
    if recorder.entered.is_set():
        await asyncio.wait_for(recorder.done.wait(), 10)
        assert recorder.error is not None

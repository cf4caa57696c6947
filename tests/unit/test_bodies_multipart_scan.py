"""MultipartModelScan: one pass over an arriving form, with the answers of the prefix parse;
and the model finders on the bytearray read_body hands on.

The reference below is how the model field used to be looked for: after each
read, every prefix of the body closed right after a delimiter was parsed
whole with ``find_multipart_model`` (quadratic in the body). The scan must
give the same answer after every read, for well-formed and mangled forms cut
into arbitrary reads: the same model and offsets, the same error, or still
nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from aiohttp import web
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.errors import InvalidRequest
from proxy.inbound.json_model import find_json_model
from proxy.inbound.model import FoundModel, rewrite_model
from proxy.inbound.multipart_model import MultipartModelScan, find_multipart_model
from proxy.inbound.upload import read_until_model

FUZZ = settings(
    max_examples=int(os.environ.get("OAIMUX_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
B = "bnd"


def reference(prefix: bytes, boundary: bytes) -> FoundModel | None:
    """The old per-read search: each closed prefix, from the start, parsed whole."""
    marker = b"\r\n--" + boundary
    end = 0
    while True:
        next_delim = prefix.find(marker, end)
        if next_delim < 0:
            return None
        try:
            return find_multipart_model(prefix[:next_delim] + marker + b"--\r\n", boundary)
        except InvalidRequest as err:
            if err.code != "missing_model":
                raise
            end = next_delim + len(marker)


def outcome(call: Any, *args: Any) -> tuple[str, Any]:
    try:
        return ("found", call(*args))
    except InvalidRequest as err:
        return ("error", err.code)


names = st.sampled_from(["model", "file", "prompt", "Model", "x", ""])
values = st.sampled_from(
    [b"", b"whisper-1", b"gpt-4o", b"\xff\xfe", b"a\r\n--bnd", b"\r\n", b"--bnd--", b"x" * 40]
)
headers = st.sampled_from(
    [
        'Content-Disposition: form-data; name="{n}"',
        "Content-Disposition: form-data; name={n}",
        'Content-Disposition: form-data; name="{n}"; filename="a.wav"',
        'Content-Disposition: form-data; name="{n}"\r\nContent-Disposition: form-data; name="z"',
        'Content-Disposition: form-data; name="{n}"\r\nContent-Type: text/plain',
        "",
    ]
)
pieces = st.sampled_from(
    [b"\r\n", b"--", b"--bnd", b"\r\n--bnd", b"\r\n\r\n", b'"', b";", b"\\", b"--bnd--\r\n"]
)


@st.composite
def arriving_forms(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    """A form (sometimes mangled) and the sizes of the reads it arrives in."""
    body = b"preamble\r\n" if draw(st.booleans()) else b""
    early_close = draw(st.integers(-1, 4))  # parts after a close delimiter are epilogue
    for i in range(draw(st.integers(0, 5))):
        if i == early_close:
            body += f"--{B}--\r\n".encode()
        head = draw(headers).format(n=draw(names))
        body += f"--{B}\r\n{head}\r\n\r\n".encode() + draw(values) + b"\r\n"
    if draw(st.booleans()):
        body += f"--{B}--\r\n".encode() + (b"epilogue" if draw(st.booleans()) else b"")
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(body)))
        body = body[:at] + draw(pieces) + body[at + draw(st.integers(0, 3)) :]
    reads = draw(st.lists(st.integers(1, 40), max_size=30))
    return body, reads


@FUZZ
@given(arriving_forms())
@example((b'--bnd\r\nContent-Disposition: form-data; name="model"\r\n\r\nm\r\n--bnd--\r\n', [7]))
@example((b'pre\r\n--bnd\r\nContent-Disposition: form-data; name="model"\r\n\r\n\r\n--bnd\r\n', []))
def test_scan_answers_as_the_prefix_parse_after_every_read(case: tuple[bytes, list[int]]) -> None:
    body, reads = case
    boundary = B.encode()
    scan = MultipartModelScan(boundary)
    buf = bytearray()
    cuts = [*reads, len(body)]
    pos = 0
    for size in cuts:
        buf += body[pos : pos + size]
        pos += size
        want = outcome(reference, bytes(buf), boundary)
        got = outcome(scan.feed, buf)
        assert got == want, (bytes(buf), want, got)
        if want != ("found", None):
            return  # found or refused: reading stops here
        if pos >= len(body):
            return


def form(*parts: tuple[str, bytes]) -> bytes:
    out = b"".join(
        f'--{B}\r\nContent-Disposition: form-data; name="{n}"\r\n\r\n'.encode() + v + b"\r\n"
        for n, v in parts
    )
    return out + f"--{B}--\r\n".encode()


class Reads:
    """A StreamReader stand-in handing out fixed pieces (the scan is what is tested)."""

    def __init__(self, data: bytes, size: int) -> None:
        self._pieces = [data[i : i + size] for i in range(0, len(data), size)]

    async def readany(self) -> bytes:
        await asyncio.sleep(0)
        return self._pieces.pop(0) if self._pieces else b""


async def test_model_after_a_large_file_is_found_and_the_body_kept_whole() -> None:
    body = form(("file", b"\x00\r\n-" * 300_000), ("model", b"whisper-1"), ("language", b"en"))
    head = await read_until_model(Reads(body, 1000), B.encode(), 10**9, 5)  # type: ignore[arg-type]
    assert head.found == find_multipart_model(body, B.encode())
    assert head.found.model == "whisper-1"
    # The model part closes before the language part: reading stopped there.
    assert not head.complete
    assert bytes(head.head) == body[: len(head.head)]
    assert head.found.end < len(head.head)


async def test_a_form_without_model_is_read_whole_and_handed_back() -> None:
    """No model field: the whole form comes back, for routing by path."""
    body = form(("file", b"\x00" * 100_000), ("prompt", b"hi"))
    head = await read_until_model(Reads(body, 999), B.encode(), 10**9, 5)  # type: ignore[arg-type]
    assert head.found is None and head.complete
    assert head.head == body


def test_rewrite_of_a_bytearray_equals_that_of_bytes() -> None:
    body = form(("file", b"\x01" * 5000), ("model", b"fast"))
    found = find_multipart_model(bytearray(body), B.encode())
    assert found == find_multipart_model(body, B.encode())
    out = rewrite_model(bytearray(body), found, "llama3.2:3b")
    assert isinstance(out, bytes)
    assert out == rewrite_model(body, found, "llama3.2:3b")
    assert out == body.replace(b"\r\n\r\nfast\r\n", b"\r\n\r\nllama3.2:3b\r\n")


json_bodies = st.one_of(
    st.binary(max_size=60),
    st.builds(
        lambda model, pad, last: (
            json.dumps({"x": pad, "model": model} if last else {"model": model, "x": pad})
        ).encode(),
        st.text(max_size=10),
        st.text(max_size=30),
        st.booleans(),
    ),
)


@FUZZ
@given(json_bodies, st.sampled_from([None, 0]))
def test_json_model_of_a_bytearray_equals_that_of_bytes(
    body: bytes, exact_limit: int | None
) -> None:
    """read_body hands on a bytearray when the body came in pieces: same answers."""
    want = outcome(find_json_model, body, exact_limit)
    assert outcome(find_json_model, bytearray(body), exact_limit) == want


MODEL_PART = b'Content-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n--bnd--\r\n'
EMPTY_FIRST = [
    # RFC 2046 §5.1.1: a body-part's headers and content are both optional, so
    # the CRLF ending an empty part's header block is the next delimiter's.
    b"--bnd\r\n\r\n--bnd\r\n" + MODEL_PART,
    b'--bnd\r\nContent-Disposition: form-data; name="x"\r\n\r\n--bnd\r\n' + MODEL_PART,
]


def test_a_model_after_an_empty_part_is_found_by_both_finders() -> None:
    for body in EMPTY_FIRST:
        whole = find_multipart_model(body, B.encode())
        assert whole.model == "whisper-1"
        assert body[whole.start : whole.end] == b"whisper-1"
        assert MultipartModelScan(B.encode()).feed(body) == whole


async def test_a_model_after_an_empty_part_is_the_one_aiohttp_parses(aiohttp_client: Any) -> None:
    # aiohttp's form parser, a real upstream's: it refuses a part with no
    # name, and reads the empty named part and then the model.
    async def fields(request: web.Request) -> web.Response:
        return web.json_response(
            {name: str(value) for name, value in (await request.post()).items()}
        )

    app = web.Application()
    app.router.add_post("/", fields)
    client = await aiohttp_client(app)
    form = {"Content-Type": f"multipart/form-data; boundary={B}"}
    resp = await client.post("/", data=EMPTY_FIRST[1], headers=form)
    assert await resp.json() == {"x": "", "model": "whisper-1"}

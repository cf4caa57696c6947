"""What an open stream holds (docs/decisions.md, "Memory per open stream is a budget"):
the objects a real proxy made for one stream held open, found by walking the references
from its client connection, with everything that existed before the stream set apart."""

from __future__ import annotations

import asyncio
import gc
import sys
from collections import deque
from types import CodeType, FunctionType, ModuleType

from proxy.config import parse_settings
from proxy.server.connections import GuardedRequestHandler
from tests.fakes.security import running_proxy
from tests.faults import fixtures
from tests.faults.fixtures import FaultFactory, chat_body, route_config
from tests.faults.server import sse

faults = fixtures.faults

# A prompt no other object in the process holds: found in a walk, it is the body.
PROMPT_MARK = "prompt-held-by-the-stream-3f9c"
# The references of one open stream, for a walk that has lost its bounds.
MOST_OBJECTS = 20_000


def existing_objects() -> list[object]:
    """Every object alive now and what each refers to directly, kept alive so
    that no id is reused by an object made later."""
    gc.collect()
    alive = gc.get_objects()
    return alive + [ref for obj in alive for ref in gc.get_referents(obj)]


def made_for_the_stream(root: object, before: set[int]) -> list[object]:
    """What ``root`` reaches that did not exist before the stream (``before``:
    ids), not going through other connections, modules, classes or code."""
    seen = {id(root)}
    found = [root]
    queue = deque([root])
    while queue:
        assert len(found) < MOST_OBJECTS, "the walk left the stream's objects"
        for ref in gc.get_referents(queue.popleft()):
            if id(ref) in seen or id(ref) in before:
                continue
            if isinstance(ref, type | ModuleType | FunctionType | CodeType):
                continue
            if isinstance(ref, GuardedRequestHandler):
                continue  # another client connection
            seen.add(id(ref))
            found.append(ref)
            queue.append(ref)
    return found


def the_open_stream() -> GuardedRequestHandler:
    (handler,) = [
        obj
        for obj in gc.get_objects()
        if isinstance(obj, GuardedRequestHandler) and obj._request_in_progress
    ]
    return handler


async def test_an_open_stream_holds_no_deque_and_not_its_request_body(
    faults: FaultFactory,
) -> None:
    """aiohttp keeps four queues per stream in deques, each holding a 64-slot
    block however empty (~760 bytes): the server's parsed heads, the request
    body's pieces, the upstream connection's parsed heads, the response body's
    pieces, and a fifth for its chunk ends. The proxy gives each a lighter
    stand-in once it is no longer needed as a deque. And the request body,
    sent upstream long before, is not kept."""
    release = asyncio.Event()
    upstream = await faults(sse(2, before_end=release))
    settings = parse_settings(route_config({"a": upstream.url}, "a"), environ={})
    async with running_proxy(settings) as proxy:  # served as oaimux serve serves it
        await hold_one_stream_open(proxy.port, release)


async def hold_one_stream_open(port: int, release: asyncio.Event) -> None:
    before_objects = existing_objects()
    before = {id(obj) for obj in before_objects}
    body = chat_body(stream=True, filler=PROMPT_MARK)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        async with asyncio.timeout(10):
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            await reader.readuntil(b"data: {")  # the stream is open and relaying
        gc.collect()
        held = made_for_the_stream(the_open_stream(), before)
        deques = [obj for obj in held if isinstance(obj, deque)]
        assert not deques, f"{len(deques)} deque(s) held by an open stream"
        mark = PROMPT_MARK.encode()
        assert not [obj for obj in held if isinstance(obj, bytes | bytearray) and mark in obj]
        # Sizes as this Python reports them (no allocator overhead): what the objects
        # above and the rest of the stream's (aiohttp's, uvloop's, ours) come to.
        held_bytes = sum(map(sys.getsizeof, held))
        assert 4_000 < held_bytes < 16_000, held_bytes
    finally:
        release.set()
        writer.close()
        del before_objects

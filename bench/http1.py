"""A tiny HTTP/1.1 client on a raw asyncio protocol, for measuring rather than for general use.

Why not aiohttp's client: we need the arrival time of every socket read (to compute the
delay of each SSE chunk and to see two chunks arriving in one read), and as little client
overhead as possible, since the client shares core 0 with the mock.

Contract of ``ResponseParser``: feed it bytes in arrival order; it exposes status, headers
and ``done``, and returns the body bytes decoded from each feed (Content-Length, chunked or
close-delimited framing). It handles one response; a keep-alive client makes a new parser
per request. It raises ``ProtocolError`` on malformed framing.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

MAX_HEADER_BYTES = 64 * 1024


class ProtocolError(Exception):
    """The peer sent something that is not valid HTTP/1.1 framing."""


class ResponseParser:
    """Incremental decoder of one HTTP/1.1 response."""

    def __init__(self, head_request: bool = False) -> None:
        self._head_request = head_request
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.done = False
        self._buf = bytearray()
        self._in_head = True
        self._remaining = -1  # bytes left of Content-Length body or of the current chunk
        self._chunked = False
        self._until_close = False
        self._chunk_state = "size"  # size -> data -> crlf -> size ... -> trailer

    def feed(self, data: bytes) -> bytes:
        """Consume ``data``; return the body bytes it completed (possibly empty)."""
        if self.done:
            return b""
        if self._in_head:
            self._buf += data
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > MAX_HEADER_BYTES:
                    raise ProtocolError("response head too large")
                return b""
            self._parse_head(bytes(self._buf[:end]))
            data = bytes(self._buf[end + 4 :])
            self._buf.clear()
            if self.status in (100, 101) or 100 < self.status < 200:
                # Interim response (e.g. 100 Continue): the real one follows.
                self._reset()
                return self.feed(data)
            if self._head_request or self.status in (204, 304):
                self.done = True
                return b""
        if self._until_close:
            return data
        if not self._chunked:
            take = data[: self._remaining]
            self._remaining -= len(take)
            if self._remaining == 0:
                self.done = True
            return take
        return self._feed_chunked(data)

    def eof(self) -> None:
        """The connection closed: that ends a close-delimited body, and is an error otherwise."""
        if self._until_close and not self._in_head:
            self.done = True
        elif not self.done:
            raise ProtocolError("connection closed before the response was complete")

    def _parse_head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise ProtocolError(f"bad status line {lines[0]!r}")
        self.status = int(parts[1])
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self._in_head = False
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            self._chunked = True
        elif "content-length" in self.headers:
            self._remaining = int(self.headers["content-length"])
            if self._remaining == 0:
                self.done = True
        else:
            self._until_close = True

    def _feed_chunked(self, data: bytes) -> bytes:
        self._buf += data
        out = bytearray()
        # Each pass consumes one framing element; bounded by the buffer length.
        while not self.done:
            if self._chunk_state == "size":
                eol = self._buf.find(b"\r\n")
                if eol < 0:
                    break
                size_txt = bytes(self._buf[:eol]).split(b";", 1)[0].strip()
                try:
                    self._remaining = int(size_txt, 16)
                except ValueError as exc:
                    raise ProtocolError(f"bad chunk size {size_txt!r}") from exc
                del self._buf[: eol + 2]
                self._chunk_state = "data" if self._remaining else "trailer"
            elif self._chunk_state == "data":
                if not self._buf:
                    break
                take = self._buf[: self._remaining]
                out += take
                del self._buf[: len(take)]
                self._remaining -= len(take)
                if self._remaining == 0:
                    self._chunk_state = "crlf"
            elif self._chunk_state == "crlf":
                if len(self._buf) < 2:
                    break
                del self._buf[:2]
                self._chunk_state = "size"
            else:  # trailer: lines until an empty one
                eol = self._buf.find(b"\r\n")
                if eol < 0:
                    break
                line_empty = eol == 0
                del self._buf[: eol + 2]
                if line_empty:
                    self.done = True
        return bytes(out)


def build_request(
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    host: str = "127.0.0.1",
) -> bytes:
    """Serialise a request with Content-Length (keep-alive, the HTTP/1.1 default)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    hdrs = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench-client"}
    hdrs.update(headers or {})
    for name, value in hdrs.items():
        lines.append(f"{name}: {value}")
    if body or method not in ("GET", "HEAD"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass
class Response:
    """What ``fetch`` saw: status, headers, timings (monotonic ns) and the body or its digest."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    body_len: int = 0
    sha256: str = ""
    t_start: int = 0
    t_first_byte: int = 0
    t_end: int = 0
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and 200 <= self.status < 300

    @property
    def elapsed_ms(self) -> float:
        return (self.t_end - self.t_start) / 1e6


class _FetchProtocol(asyncio.Protocol):
    """One request, one response; the body is kept, or only hashed when ``keep_body`` is off."""

    def __init__(
        self,
        request: bytes,
        resp: Response,
        keep_body: bool,
        done: asyncio.Future[None],
        on_data: Callable[[int, bytes], None] | None = None,
    ) -> None:
        self.request = request
        self.resp = resp
        self.keep_body = keep_body
        self.done = done
        self.on_data = on_data
        self.parser = ResponseParser()
        self.hasher = hashlib.sha256()
        self.chunks: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, so no isinstance check.
        self.transport = cast(asyncio.Transport, transport)
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        if not self.resp.t_first_byte:
            self.resp.t_first_byte = now
        try:
            body = self.parser.feed(data)
        except (ProtocolError, ValueError) as exc:
            self._finish(now, f"protocol: {exc}")
            return
        if body:
            self.resp.body_len += len(body)
            if self.keep_body:
                self.chunks.append(body)
            else:
                self.hasher.update(body)
            if self.on_data is not None:
                self.on_data(now, body)
        if self.parser.done:
            self._finish(now, "")

    def eof_received(self) -> bool | None:
        try:
            self.parser.eof()
            self._finish(time.monotonic_ns(), "")
        except ProtocolError as exc:
            self._finish(time.monotonic_ns(), str(exc))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            try:
                self.parser.eof()
                self._finish(time.monotonic_ns(), "")
            except ProtocolError as err:
                self._finish(time.monotonic_ns(), f"{err} ({exc})")

    def _finish(self, now: int, error: str) -> None:
        if self.done.done():
            return
        r = self.resp
        r.t_end = now
        r.error = error
        r.status = self.parser.status
        r.headers = self.parser.headers
        if self.keep_body:
            r.body = b"".join(self.chunks)
        r.sha256 = hashlib.sha256(r.body).hexdigest() if self.keep_body else self.hasher.hexdigest()
        self.done.set_result(None)
        if self.transport is not None:
            self.transport.close()


async def fetch(
    port: int,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    keep_body: bool = True,
    timeout: float = 60.0,
    host: str = "127.0.0.1",
) -> Response:
    """Send one request on a fresh connection and read the whole response (bounded by timeout).

    ``t_start`` is taken before connecting, so elapsed time includes the TCP handshake, the
    same for every peer. Never raises for network errors: they land in ``Response.error``.
    """
    loop = asyncio.get_running_loop()
    resp = Response(t_start=time.monotonic_ns())
    done: asyncio.Future[None] = loop.create_future()
    request = build_request(method, path, body, headers)
    transport = None
    try:
        transport, _ = await asyncio.wait_for(
            loop.create_connection(
                lambda: _FetchProtocol(request, resp, keep_body, done), host, port
            ),
            timeout,
        )
        await asyncio.wait_for(done, timeout)
    except (OSError, TimeoutError) as exc:
        resp.error = f"{type(exc).__name__}: {exc}"
        resp.t_end = time.monotonic_ns()
    finally:
        if transport is not None:
            transport.close()
    return resp

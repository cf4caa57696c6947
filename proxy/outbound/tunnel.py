"""The tunnel of one WebSocket session (realtime, or the Responses API's):
both legs, frame by frame.

Contract (the handshake before it: upstream_leg.py, client_leg.py):

- Messages pass both ways as they come: text (not decoded, so byte for byte),
  binary, ping and pong (neither leg answers pings itself), in order. A
  fragmented message is passed on as one message.
- Closing: a close frame from one side is sent on to the other with its code
  and reason, and the side that closed gets its own code back (RFC 6455
  §5.5.1). An empty close frame is passed on as 1000. A close frame no
  endpoint may send (a code RFC 6455 §7.4 forbids on the wire, such as 1005,
  1006 or 5000, a one-byte payload, a reason over 123 bytes) is answered 1002
  and the other side is closed with 1002 (1007 for a reason that is not
  UTF-8). A side that vanishes without a close frame closes the other with
  1001 (client gone) or 1011 (upstream gone). On shutdown both legs get 1001
  (a Responses WebSocket still choosing its upstream: its client leg, the
  choice given up).
  A client that vanishes right after a terminal event (``response.completed``)
  with nothing asked since is logged ``complete``.
- A message over ``server.max_body_bytes`` closes that leg with 1009 and the
  other with the same code (both legs are opened with that limit).
- A Responses WebSocket has its client's messages vetted before they
  are sent on (``vet``, responses_socket.py): a refused one ends the session with one
  ``error`` event and 1008 to the client (:func:`refuse_session`), and the
  upstream leg closed with 1001. The upstream's messages are never read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web

from ..errors import ProxyError, error_event
from ..observe import Exchange, Outcome
from ..observe.stream_end import message_ended

__all__ = ["CLOSE_TIMEOUT", "RealtimeSessions", "Tunnel", "Vet", "refuse_session"]

# What a client's message becomes before it is sent upstream (the same
# bytes, or a rewrite), or the ProxyError that ends the session.
Vet = Callable[[bytes], Awaitable[bytes]]

# The reason of the 1001 every leg gets at shutdown.
_SHUTDOWN = b"server shutdown"

# Seconds to wait for the other side's close frame once ours is sent.
CLOSE_TIMEOUT = 5.0

# The close code for the other leg when one vanishes without a close frame,
# keyed by "the one that vanished is the client".
_GONE_CODE = {True: WSCloseCode.GOING_AWAY, False: WSCloseCode.INTERNAL_ERROR}


class Tunnel:
    """Both legs of one realtime session; whoever starts closing closes both."""

    def __init__(
        self,
        client: web.WebSocketResponse[bool],
        upstream: aiohttp.ClientWebSocketResponse[bool],
        ex: Exchange,
        vet: Vet | None = None,
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.ex = ex
        self.vet = vet  # None: every message passes as it came (realtime)
        self.closing = False
        # The last message passed, when it went to the client (b"" when the
        # client's went last): a client that vanishes after a terminal event
        # with nothing asked since got its whole answer (observe/stream_end.py).
        self.last_to_client = b""
        # The code the upstream leg is (being) closed with; the handler's
        # cleanup uses it if the handler is cancelled half way (aiohttp cancels
        # it when the client's connection closes, which can come first).
        self.upstream_code: int = WSCloseCode.GOING_AWAY

    async def shutdown(self, code: int, reason: bytes) -> None:
        """Close both legs with ``code`` (server shutdown)."""
        if self.closing:
            return
        self.closing = True
        await asyncio.gather(
            self.upstream.close(code=code, message=reason),
            self.client.close(code=code, message=reason),
            return_exceptions=True,
        )

    async def run(self, handshake: web.BaseRequest | None, sessions: RealtimeSessions) -> None:
        """Answer the client's upgrade (``handshake``; None: the client's leg is
        open already), then relay both ways until both legs are closed; the
        upstream leg is closed whatever happens."""
        client, upstream, ex = self.client, self.upstream, self.ex
        sessions.add(self)
        try:
            if handshake is not None:
                try:
                    await client.prepare(handshake)
                except (ConnectionError, web.HTTPException):
                    ex.outcome = "client_gone"
                    await upstream.close(code=WSCloseCode.GOING_AWAY)
                    return
                ex.status = 101
                ex.ttfb = time.perf_counter() - ex.started
                ex.streaming = True
            await self._both_ways()
        except asyncio.CancelledError:
            # The client's connection was lost (handler_cancellation): close
            # upstream. Once a close frame was passed on, that is how a session
            # ends (the client drops the connection after the closing handshake).
            if not self.closing:
                ex.outcome = self._client_gone_outcome()
            raise
        finally:
            sessions.discard(self)
            if not upstream.closed:
                try:
                    await asyncio.wait_for(upstream.close(code=self.upstream_code), CLOSE_TIMEOUT)
                except (TimeoutError, aiohttp.ClientError, OSError):
                    pass

    async def _both_ways(self) -> None:
        to_upstream = asyncio.create_task(
            self.pump(self.client, self.upstream, True), name="realtime client->upstream"
        )
        to_client = asyncio.create_task(
            self.pump(self.upstream, self.client, False), name="realtime upstream->client"
        )
        pumps = {to_upstream, to_client}
        try:
            _, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            if pending:
                # The first pump to finish has closed (or is closing) both legs.
                _, pending = await asyncio.wait(pending, timeout=CLOSE_TIMEOUT * 2)
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    async def pump(
        self,
        src: web.WebSocketResponse[bool] | aiohttp.ClientWebSocketResponse[bool],
        dst: web.WebSocketResponse[bool] | aiohttp.ClientWebSocketResponse[bool],
        src_is_client: bool,
    ) -> None:
        """Relay ``src`` → ``dst`` until either closes (named task: shows in tracebacks)."""
        ex = self.ex
        receive = src.receive
        vet = self.vet if src_is_client else None
        sent = 0
        try:
            while True:
                msg = await receive()
                kind = msg.type
                try:
                    if kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
                        data = msg.data
                        if vet is not None:  # binary too: an upstream may parse it alike
                            try:
                                data = await vet(data)
                            except ProxyError as err:
                                await self._refuse(err)
                                return
                        await dst.send_frame(data, kind)
                        sent += len(data)
                        self.last_to_client = b"" if src_is_client else data
                    elif kind is WSMsgType.PING:
                        await dst.ping(msg.data)
                    elif kind is WSMsgType.PONG:
                        await dst.pong(msg.data)
                    elif kind is WSMsgType.CLOSE:
                        await self._close_frame(
                            src, dst, src_is_client, code=msg.data, reason=msg.extra
                        )
                        return
                    elif kind is WSMsgType.CLOSING or self.closing:
                        return  # the other direction is closing both legs
                    else:
                        await self._src_gone(dst, src_is_client, kind=kind, error=msg.data)
                        return
                except (ConnectionError, aiohttp.ClientError):
                    await self._dst_gone(src, src_is_client)
                    return
        finally:
            if src_is_client:
                ex.bytes_in += sent
            else:
                ex.bytes_out += sent

    async def _close_frame(
        self,
        src: web.WebSocketResponse[bool] | aiohttp.ClientWebSocketResponse[bool],
        dst: web.WebSocketResponse[bool] | aiohttp.ClientWebSocketResponse[bool],
        src_is_client: bool,
        *,
        code: int,
        reason: str | None,
    ) -> None:
        """src's close frame (``code`` 0: it had no code): passed on to dst, or
        answered 1002 when no endpoint may send it."""
        code = code or WSCloseCode.OK
        if _valid_close_code(code):
            await self._pass_close(src, dst, code, reason=reason)
        else:
            await self._protocol_error(src, dst, src_is_client)

    async def _src_gone(
        self,
        dst: web.WebSocketResponse[bool] | aiohttp.ClientWebSocketResponse[bool],
        src_is_client: bool,
        *,
        kind: WSMsgType,
        error: object,
    ) -> None:
        """src is CLOSED (gone without a close frame) or ERROR (aiohttp already
        closed src with the reason, e.g. 1002 or 1009): close dst to match."""
        reason_code = getattr(error, "code", None)  # WebSocketError
        if kind is WSMsgType.ERROR and isinstance(reason_code, int):
            code = reason_code
        else:
            code = _GONE_CODE[src_is_client]
        await self._end(dst, src_is_client, code)

    async def _dst_gone(
        self,
        src: web.WebSocketResponse[bool] | aiohttp.ClientWebSocketResponse[bool],
        src_is_client: bool,
    ) -> None:
        """dst went away while we wrote to it: close src (unless closing already)."""
        if not self.closing:
            self.closing = True
            self.ex.outcome = "upstream_reset" if src_is_client else self._client_gone_outcome()
            code = _GONE_CODE[not src_is_client]
            await src.close(code=code, message=b"")

    async def _end(
        self,
        dst: web.WebSocketResponse[bool] | aiohttp.ClientWebSocketResponse[bool],
        src_is_client: bool,
        code: int,
    ) -> None:
        """src is closed or broken: close dst with ``code``."""
        self.closing = True
        self.ex.outcome = self._client_gone_outcome() if src_is_client else "upstream_reset"
        if not _valid_close_code(code):  # not expected from aiohttp's WebSocketError
            code = WSCloseCode.INTERNAL_ERROR
        if src_is_client:
            self.upstream_code = code
        await dst.close(code=code, message=b"")

    async def _refuse(self, err: ProxyError) -> None:
        """A client message was refused: end the session (the module's docstring)."""
        if self.closing:
            return
        self.closing = True
        await asyncio.gather(
            self.upstream.close(code=self.upstream_code, message=b""),
            refuse_session(self.client, err, self.ex),
            return_exceptions=True,
        )

    def _client_gone_outcome(self) -> Outcome:
        """``complete`` when the client vanished right after a terminal event
        (Codex drops the connection once it has ``response.completed``)."""
        last = self.last_to_client
        return "complete" if last and message_ended(last) else "client_gone"

    async def _protocol_error(
        self,
        src: web.WebSocketResponse[bool] | aiohttp.ClientWebSocketResponse[bool],
        dst: web.WebSocketResponse[bool] | aiohttp.ClientWebSocketResponse[bool],
        src_is_client: bool,
    ) -> None:
        """src sent a close code no endpoint may send: answer it 1002 at once (it
        has closed already, so aiohttp waits for nothing), then tell dst 1002, as
        aiohttp does for the codes its reader refuses itself."""
        code = WSCloseCode.PROTOCOL_ERROR
        await src.close(code=code, message=b"")
        if not self.closing:
            await self._end(dst, src_is_client, code)

    async def _pass_close(
        self,
        src: web.WebSocketResponse[bool] | aiohttp.ClientWebSocketResponse[bool],
        dst: web.WebSocketResponse[bool] | aiohttp.ClientWebSocketResponse[bool],
        code: int,
        *,
        reason: str | None,
    ) -> None:
        if self.closing:
            await src.close(code=code, message=b"")
            return
        self.closing = True
        if dst is self.upstream:
            self.upstream_code = code
        message = (reason or "").encode("utf-8")
        # dst.close() interrupts the other pump's receive() on dst (aiohttp
        # supports close from another task) and waits for dst's reply.
        await dst.close(code=code, message=message)
        await src.close(code=code, message=b"")


async def refuse_session(
    client: web.WebSocketResponse[bool], err: ProxyError, ex: Exchange
) -> None:
    """End a Responses WebSocket with one ``error`` event (OpenAI's shape on
    that socket), then close 1011 when the upstream refused or failed, else
    1008 (policy)."""
    ex.outcome = "error"
    ex.error_code = err.code
    upstream_failed = err.status >= 500 or err.code.startswith("upstream_")
    code = WSCloseCode.INTERNAL_ERROR if upstream_failed else WSCloseCode.POLICY_VIOLATION
    try:
        await client.send_str(error_event(err))
        await client.close(code=code, message=err.code.encode()[:123])
    except (ConnectionError, aiohttp.ClientError):
        pass  # the client is gone already


def _valid_close_code(code: int) -> bool:
    """A code an endpoint may send (RFC 6455 §7.4.1, §7.4.2; 1012-1014 are in
    the IANA registry, §11.7). aiohttp's reader refuses with 1002 the codes
    under 3000 it has no name for, but lets 1006 and codes over 4999 through."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


class RealtimeSessions:
    """The open tunnels of one app, and the Responses WebSockets still choosing
    their upstream (waiting for their first message or their upstream's
    handshake), so shutdown can close them (aiohttp's graceful shutdown leaves
    WebSockets to the application)."""

    def __init__(self) -> None:
        self._open: set[Tunnel] = set()
        # A client leg answered 101 before its upstream leg exists, and the
        # task choosing that leg.
        self._routing: dict[web.WebSocketResponse[bool], asyncio.Future[Any]] = {}

    def __len__(self) -> int:
        return len(self._open)

    def add(self, tunnel: Tunnel) -> None:
        self._open.add(tunnel)

    def discard(self, tunnel: Tunnel) -> None:
        self._open.discard(tunnel)

    def routing(self, client: web.WebSocketResponse[bool], task: asyncio.Future[Any]) -> None:
        """Note a client leg whose upstream leg ``task`` is choosing: shutdown
        cancels the task and closes the leg with 1001."""
        self._routing[client] = task

    def routed(self, client: web.WebSocketResponse[bool]) -> None:
        self._routing.pop(client, None)

    async def close_all(self) -> None:
        """Close every open tunnel, and every client leg still choosing its
        upstream, with 1001 (an ``on_shutdown`` hook, see app.py)."""
        tunnels = list(self._open)
        routing = list(self._routing.items())
        for _, task in routing:
            task.cancel()  # the first-message wait, or the upstream handshake
        if tunnels or routing:
            await asyncio.gather(
                *(t.shutdown(WSCloseCode.GOING_AWAY, _SHUTDOWN) for t in tunnels),
                *(c.close(code=WSCloseCode.GOING_AWAY, message=_SHUTDOWN) for c, _ in routing),
                return_exceptions=True,
            )

"""``GET /v1/realtime?model=...`` with a WebSocket upgrade: a frame-by-frame tunnel.

Contract:

- The request is routed by its ``model`` query parameter, like a body's
  ``model``: unknown ids are refused with the OpenAI-shaped 404 *before* the
  upgrade, an alias's ``rewrite_model`` (or a discovered id's prefix) is applied
  to the query value, and every other byte of the query is forwarded as it
  came. With no ``model`` the path routes apply (``- path: "realtime*"``).
  Proxy keys and the rate limit apply as to any request (handlers.py charges
  the handshake before this module runs).
- The upstream handshake happens first; the client is answered ``101`` only
  after the upstream answered ``101`` (Go's ``handleUpgradeResponse`` does the
  same), so no byte is tunnelled to an upstream that refused. A refusal is an
  HTTP error to the client: 401/403 to the proxy's own credential, 429 and
  5xx move on to the route's next upstream, then become 502 (429 stays 429);
  any other 4xx is passed on with its status.
- The upgrade request gets the upstream's header rewrites (headers.py: its
  credential set, the client's credentials and hop-by-hop headers dropped);
  ``Sec-WebSocket-*`` are made per leg by aiohttp. Subprotocols the client
  offered are forwarded, except the browser-credential ones
  (``openai-insecure-api-key.*``, ``openai-organization.*``,
  ``openai-project.*``) unless the client's own credential may reach the
  upstream (``pass_client_auth`` and no proxy keys). The client is told the
  subprotocol the upstream chose, nothing else.
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
  1001 (client gone) or 1011 (upstream gone). On shutdown both legs get 1001.
- A message over ``server.max_body_bytes`` closes that leg with 1009 and the
  other with the same code. Compression is off on both legs: a pass-through
  does not spend CPU re-deflating audio.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import quote, unquote

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web
from multidict import CIMultiDict, CIMultiDictProxy

from . import SERVER
from .admission import Caller
from .attempts import CIRCUIT_OPEN, Attempts, Ending, answered, no_headers_within
from .auth import KeyTable
from .client import Origin
from .client.failures import DISCONNECTED, connect_failure, reset
from .config.settings import Route
from .errors import (
    InvalidRequest,
    ModelNotAllowed,
    NotFound,
    ProxyError,
    RateLimited,
    UpstreamUnavailable,
    clip,
)
from .health import Health, order_upstreams
from .observe import Exchange
from .observe.observer import Observer
from .runtime import Runtime

__all__ = [
    "REALTIME_PATH",
    "RealtimeSessions",
    "RealtimeTarget",
    "close_realtime_sessions",
    "is_websocket_upgrade",
    "proxy_realtime",
    "realtime_target",
]

log = logging.getLogger("oaimux.realtime")

REALTIME_PATH = "realtime"

# Seconds to wait for the other side's close frame once ours is sent.
CLOSE_TIMEOUT = 5.0

# Made per leg by aiohttp (key, accept, version, extensions) or by us (protocol).
_HANDSHAKE_HEADERS = (
    "Sec-WebSocket-Key",
    "Sec-WebSocket-Version",
    "Sec-WebSocket-Extensions",
    "Sec-WebSocket-Protocol",
    "Sec-WebSocket-Accept",
)
# Subprotocols that carry a credential (OpenAI's browser WebSocket scheme).
_CREDENTIAL_PROTOCOLS = ("openai-insecure-api-key.", "openai-organization.", "openai-project.")
# The close code for the other leg when one vanishes without a close frame,
# keyed by "the one that vanished is the client".
_GONE_CODE = {True: WSCloseCode.GOING_AWAY, False: WSCloseCode.INTERNAL_ERROR}
# As handlers.MAX_MODEL_LENGTH: longer than any real model id.
_MAX_MODEL_LENGTH = 256


@dataclass(frozen=True, slots=True)
class RealtimeTarget:
    """Where a realtime handshake goes: the route, and the query to send upstream."""

    route: Route
    model: str | None
    upstream_model: str | None
    query: str


def is_websocket_upgrade(request: web.BaseRequest) -> bool:
    """A ``GET`` asking to switch to WebSocket (RFC 6455 §4.1); the rest is checked later."""
    return request.method == "GET" and request.headers.get("Upgrade", "").strip().lower() == (
        "websocket"
    )


def realtime_target(
    request: web.BaseRequest,
    runtime: Runtime,
    caller: Caller,
    query: str,
    query_models: Sequence[str],
) -> RealtimeTarget:
    """Resolve the handshake's route from ``?model=``, or raise the error to answer.

    ``query`` is the vetted query (credential parameters removed) and
    ``query_models`` the ``model`` values in it (handlers.vet_query); more
    than one was already refused.
    """
    if request.body_exists:
        # A body on an upgrade request is a smuggling attempt (CVE-2026-69243).
        raise InvalidRequest("A WebSocket handshake must not have a body.", code="body_not_allowed")
    model = query_models[0] if query_models else ""
    if len(model) > _MAX_MODEL_LENGTH or not model.isprintable():
        raise InvalidRequest(
            f"The model id must be 1 to {_MAX_MODEL_LENGTH} printable characters.",
            code="invalid_model",
            param="model",
        )
    if not model:
        route = runtime.table.resolve_path(REALTIME_PATH)
        if route is None:
            raise InvalidRequest(
                "You must provide a model parameter: /v1/realtime?model=<id>.",
                code="missing_model",
                param="model",
            )
        return RealtimeTarget(route, None, None, query)
    match = runtime.table.resolve(model)
    if match is None:
        raise NotFound(
            f"The model '{clip(model)}' does not exist or you do not have access to it.",
            code="model_not_found",
            param="model",
        )
    if not KeyTable.allows(caller.key, model):
        raise ModelNotAllowed(f"Your key may not use the model '{clip(model)}'.", param="model")
    upstream_model = match.upstream_model
    if upstream_model != model:
        query = _with_model(query, upstream_model)
    return RealtimeTarget(match.route, model, upstream_model, query)


def _with_model(query: str, model: str) -> str:
    """``query`` with the value of its ``model`` parameter replaced; the rest as it came."""
    value = quote(model, safe="/:@-._~")  # ';' and '&' encoded: no second reading
    parts = query.split("&")
    for i, part in enumerate(parts):
        name = part.partition("=")[0]
        # The same reading of a name as handlers.vet_query's.
        if unquote(name.replace("+", " ")).lower() == "model":
            parts[i] = f"{name}={value}"
    return "&".join(parts)


def _offered_protocols(headers: CIMultiDictProxy[str]) -> list[str]:
    return [
        token.strip()
        for value in headers.getall("Sec-WebSocket-Protocol", ())
        for token in value.split(",")
        if token.strip()
    ]


class _Tunnel:
    """Both legs of one realtime session; whoever starts closing closes both."""

    def __init__(
        self,
        client: web.WebSocketResponse[bool],
        upstream: aiohttp.ClientWebSocketResponse[bool],
        ex: Exchange,
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.ex = ex
        self.closing = False
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

    async def pump(
        self,
        src: web.WebSocketResponse[bool] | aiohttp.ClientWebSocketResponse[bool],
        dst: web.WebSocketResponse[bool] | aiohttp.ClientWebSocketResponse[bool],
        src_is_client: bool,
    ) -> None:
        """Relay ``src`` → ``dst`` until either closes (named task: shows in tracebacks)."""
        ex = self.ex
        receive = src.receive
        sent = 0
        try:
            while True:
                msg = await receive()
                kind = msg.type
                try:
                    if kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
                        data = msg.data
                        await dst.send_frame(data, kind)
                        sent += len(data)
                    elif kind is WSMsgType.PING:
                        await dst.ping(msg.data)
                    elif kind is WSMsgType.PONG:
                        await dst.pong(msg.data)
                    elif kind is WSMsgType.CLOSE:
                        code = msg.data or WSCloseCode.OK  # 0: a close frame with no code
                        if _valid_close_code(code):
                            await self._pass_close(src, dst, code, msg.extra)
                        else:
                            await self._protocol_error(src, dst, src_is_client)
                        return
                    elif kind is WSMsgType.CLOSING or self.closing:
                        return  # the other direction is closing both legs
                    else:
                        # CLOSED (gone without a close frame) or ERROR (aiohttp
                        # already closed src with the reason, e.g. 1002 or 1009).
                        reason_code = getattr(msg.data, "code", None)  # WebSocketError
                        if kind is WSMsgType.ERROR and isinstance(reason_code, int):
                            code = reason_code
                        else:
                            code = _GONE_CODE[src_is_client]
                        await self._end(dst, src_is_client, code)
                        return
                except (ConnectionError, aiohttp.ClientError):
                    # dst went away while we wrote to it.
                    if not self.closing:
                        self.closing = True
                        ex.outcome = "upstream_reset" if src_is_client else "client_gone"
                        code = _GONE_CODE[not src_is_client]
                        await src.close(code=code, message=b"")
                    return
        finally:
            if src_is_client:
                ex.bytes_in += sent
            else:
                ex.bytes_out += sent

    async def _end(
        self,
        dst: web.WebSocketResponse[bool] | aiohttp.ClientWebSocketResponse[bool],
        src_is_client: bool,
        code: int,
    ) -> None:
        """src is closed or broken: close dst with ``code``."""
        self.closing = True
        self.ex.outcome = "client_gone" if src_is_client else "upstream_reset"
        if not _valid_close_code(code):  # not expected from aiohttp's WebSocketError
            code = WSCloseCode.INTERNAL_ERROR
        if src_is_client:
            self.upstream_code = code
        await dst.close(code=code, message=b"")

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


def _valid_close_code(code: int) -> bool:
    """A code an endpoint may send (RFC 6455 §7.4.1, §7.4.2; 1012-1014 are in
    the IANA registry, §11.7). aiohttp's reader refuses with 1002 the codes
    under 3000 it has no name for, but lets 1006 and codes over 4999 through."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


class RealtimeSessions:
    """The open tunnels of one app, so shutdown can close them (aiohttp's
    graceful shutdown leaves WebSockets to the application)."""

    def __init__(self) -> None:
        self._open: set[_Tunnel] = set()

    def __len__(self) -> int:
        return len(self._open)

    def add(self, tunnel: _Tunnel) -> None:
        self._open.add(tunnel)

    def discard(self, tunnel: _Tunnel) -> None:
        self._open.discard(tunnel)

    async def close_all(self) -> None:
        tunnels = list(self._open)
        if tunnels:
            await asyncio.gather(
                *(t.shutdown(WSCloseCode.GOING_AWAY, b"server shutdown") for t in tunnels),
                return_exceptions=True,
            )


async def close_realtime_sessions(sessions: RealtimeSessions) -> None:
    """Close every open tunnel with 1001 (an ``on_shutdown`` hook, see app.py)."""
    await sessions.close_all()


async def proxy_realtime(
    request: web.Request,
    target: RealtimeTarget,
    runtime: Runtime,
    ex: Exchange,
    client_authorization: str | None,
    session: aiohttp.ClientSession,
    health: Health,
    observer: Observer,
    sessions: RealtimeSessions,
) -> web.StreamResponse:
    """Connect upstream, then answer the client's upgrade and relay until closed."""
    offered = _offered_protocols(request.headers)
    # Offering the client's own protocols back keeps aiohttp from logging
    # them as "not overlapping": they can hold a key (docs/faults.md,
    # "A key in a WebSocket subprotocol").
    if not web.WebSocketResponse(protocols=offered).can_prepare(request).ok:
        raise InvalidRequest(
            "Not a valid WebSocket handshake (RFC 6455 §4.2.1).",
            code="invalid_websocket_handshake",
        )
    limit = runtime.settings.server.max_body_bytes
    client_may_authenticate = not runtime.keys and all(
        runtime.plans[n].request_headers.pass_authorization for n in target.route.upstreams
    )
    protocols = [
        p
        for p in offered
        if client_may_authenticate or not p.lower().startswith(_CREDENTIAL_PROTOCOLS)
    ]
    upstream = await _connect(
        request, target, runtime, ex, client_authorization, protocols, session, health, observer
    )
    chosen = upstream.protocol
    client = web.WebSocketResponse(
        protocols=(chosen,) if chosen else (),
        autoping=False,
        autoclose=False,
        compress=False,
        max_msg_size=limit,
        timeout=CLOSE_TIMEOUT,
        decode_text=False,
    )
    client.headers["Server"] = SERVER
    handshake: web.BaseRequest = request
    if offered and not chosen:
        # Answer without a subprotocol, and keep aiohttp from logging the
        # offered ones: they can hold a key (docs/faults.md, "A key in a
        # WebSocket subprotocol").
        headers = CIMultiDict(request.headers)
        headers.popall("Sec-WebSocket-Protocol", None)
        handshake = request.clone(headers=headers)
    tunnel = _Tunnel(client, upstream, ex)
    sessions.add(tunnel)
    try:
        try:
            await client.prepare(handshake)
        except (ConnectionError, web.HTTPException):
            ex.outcome = "client_gone"
            await upstream.close(code=WSCloseCode.GOING_AWAY)
            return client
        ex.status = 101
        ex.streaming = True
        await _relay(tunnel)
        return client
    except asyncio.CancelledError:
        # The client's connection was lost (handler_cancellation): close upstream.
        ex.outcome = "client_gone"
        raise
    finally:
        sessions.discard(tunnel)
        if not upstream.closed:
            try:
                await asyncio.wait_for(upstream.close(code=tunnel.upstream_code), CLOSE_TIMEOUT)
            except (TimeoutError, aiohttp.ClientError, OSError):
                pass


async def _relay(tunnel: _Tunnel) -> None:
    to_upstream = asyncio.create_task(
        tunnel.pump(tunnel.client, tunnel.upstream, True), name="realtime client->upstream"
    )
    to_client = asyncio.create_task(
        tunnel.pump(tunnel.upstream, tunnel.client, False), name="realtime upstream->client"
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


async def _connect(
    request: web.Request,
    target: RealtimeTarget,
    runtime: Runtime,
    ex: Exchange,
    client_authorization: str | None,
    protocols: Sequence[str],
    session: aiohttp.ClientSession,
    health: Health,
    observer: Observer,
) -> aiohttp.ClientWebSocketResponse[bool]:
    """The upstream leg, after the upstream's ``101``; tries the route's upstreams in order."""
    route = target.route
    plans = runtime.plans
    # As in forward.py: made at the first failure or skip.
    attempts: Attempts | None = None
    ending: Ending | None = None
    previous: str | None = None
    limit = runtime.settings.server.max_body_bytes
    for name in order_upstreams(route.upstreams, route.balance):
        plan = plans[name]
        upstream_settings = plan.upstream
        if not health.available(upstream_settings):
            # Breaker open: skip, as forward.py does.
            attempts = attempts or Attempts()
            attempts.note(name, CIRCUIT_OPEN)
            continue
        if previous is not None:
            observer.fallback(previous, name)
        previous = name
        headers = plan.request_headers.build(request.headers, ex.request_id, client_authorization)
        for header in _HANDSHAKE_HEADERS:
            headers.popall(header, None)
        ex.tried.append(name)
        timeout = plan.upstream.timeouts.response
        try:
            async with asyncio.timeout(timeout):
                upstream = await session.ws_connect(
                    plan.url_for(REALTIME_PATH, target.query),
                    protocols=tuple(protocols),
                    headers=headers,
                    autoping=False,
                    autoclose=False,
                    compress=0,
                    max_msg_size=limit,
                    decode_text=False,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT),
                )
        except aiohttp.WSServerHandshakeError as exc:
            status = exc.status
            if (
                status in (401, 403)
                and upstream_settings.injects_credential
                and not upstream_settings.pass_client_auth
            ):
                log.error(
                    "upstream %s answered %d to the proxy's own credential on a realtime "
                    "handshake; check its key",
                    name,
                    status,
                )
                kind = "auth"
                what = answered(status, credential_refused=True)
                ending = Ending.CREDENTIAL_REFUSED
            elif status == 429 or status >= 500 or status < 400:
                kind = f"status_{status}"
                what = answered(status)
                ending = (
                    Ending.HANDSHAKE_RATE_LIMITED if status == 429 else Ending.HANDSHAKE_REFUSED
                )
            else:
                # The upstream's verdict on this request (e.g. 400, 404): no fallback.
                health.success(upstream_settings)
                raise _refused(name, status) from None
        except TimeoutError:
            kind = "timeout"
            what = no_headers_within(timeout)
            ending = Ending.TIMEOUT
        except (aiohttp.ClientError, OSError) as exc:
            # Its words, never the exception's repr: that can carry request headers (our key).
            kind, what = _connect_failure(exc, plan.origin)
            ending = Ending.UNAVAILABLE
        except asyncio.CancelledError:
            health.release_probe(upstream_settings)
            raise
        else:
            health.success(upstream_settings)
            ex.tried.pop()
            ex.upstream = name
            if attempts is not None and attempts.failed:
                log.warning(
                    "answered by %s after: %s [request %s]",
                    name,
                    attempts.summary(),
                    ex.request_id,
                )
            return upstream
        attempts = attempts or Attempts()
        attempts.note(name, what)
        health.failure(upstream_settings)
        observer.upstream_failure(name, kind)
    if ending is None or attempts is None:
        raise health.all_paused(plans[n].upstream for n in route.upstreams)
    raise attempts.error(ending, ex.request_id)


def _connect_failure(exc: aiohttp.ClientError | OSError, origin: Origin) -> tuple[str, str]:
    """The failure kind and its words for an upstream WebSocket that could not
    be opened, in the lean client's terms (client/failures.py)."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect", connect_failure(exc.os_error, origin.host, origin.port)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "disconnected", DISCONNECTED
    if isinstance(exc, OSError) and not isinstance(exc, aiohttp.ClientError):
        return "connect", connect_failure(exc, origin.host, origin.port)
    return "reset", reset(exc)


def _refused(name: str, status: int) -> ProxyError:
    message = f"The upstream '{name}' refused the WebSocket handshake with HTTP {status}."
    if status == 429:
        return RateLimited(message, code="upstream_rate_limited")
    if 400 <= status < 500:
        err = InvalidRequest(message, code="upstream_refused_handshake")
        err.status = status  # passed on, as for any other upstream 4xx
        return err
    return UpstreamUnavailable(message, code="upstream_refused_handshake")

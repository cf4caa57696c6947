"""The WebSocket sessions: ``GET /v1/realtime?model=...`` (the upstream leg
first) and ``GET /v1/responses`` (the client's leg first); one tunnel for both.

Contract (the routing before it: inbound/route.py; the tunnel after it:
tunnel.py):

- The upstream handshake happens first; the client is answered ``101`` only
  after the upstream answered ``101`` (Go's ``handleUpgradeResponse`` does the
  same), so no byte is tunnelled to an upstream that refused. The route's
  upstreams are walked as for any request (attempts.py: breakers, fallback),
  each tried once. A refusal is an HTTP error to the client: 401/403 to the
  proxy's own credential, 429 and 5xx move on to the route's next upstream,
  then become 502 (429 stays 429); any other 4xx is passed on with its status.
- The upgrade request gets the upstream's header rewrites (headers.py: its
  credential set, the client's credentials and hop-by-hop headers dropped);
  ``Sec-WebSocket-*`` are made per leg by aiohttp. Subprotocols the client
  offered are forwarded, except the browser-credential ones
  (``openai-insecure-api-key.*``, ``openai-organization.*``,
  ``openai-project.*``) unless the client's own credential may reach the
  upstream (``pass_client_auth`` and no proxy keys). The client is told the
  subprotocol the upstream chose, nothing else.
- Compression is off on both legs: a pass-through does not spend CPU
  re-deflating audio. A message over ``server.max_body_bytes`` closes the
  tunnel (tunnel.py).

The Responses API's WebSocket (Codex CLI) is routed by its first message, so
the client is answered ``101`` first (:meth:`RealtimeProxy.serve_responses`):

- The first message is awaited for ``server.body_idle_timeout`` seconds
  (pings are answered meanwhile), and is at most ``server.max_body_bytes``.
- Then the upstream leg is opened through the same walk, with the same
  header rewrites, at ``<upstream url>/responses``; no subprotocol is offered
  upstream nor chosen for the client (the upstream's choice is not known
  when the client is answered). The first message is sent, rewritten for an
  alias, and the tunnel takes over.
- Rate limit: the handshake was charged before the route was known (the
  key's or the global bucket); a route with a ``rate_limit`` of its own is
  charged once more when the first message has chosen it. Each later message
  that may be a ``response.create`` is a request: checked
  (inbound/route.py, ``ResponsesTurns``), then charged to the route's bucket,
  else the key's, else the global one. A refusal ends the session as below.
- A session that cannot go anywhere gets one ``error`` event (OpenAI's
  ``{"type": "error", "status": ..., "error": {...}}``) and a close frame:
  1011 when the upstream refused or could not be reached, 1008 (policy) for
  anything about the message or the caller (no model, unknown or forbidden
  model, no upstream taking the WebSocket). No upstream connection is left
  open.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web
from multidict import CIMultiDict, CIMultiDictProxy

from .. import SERVER
from ..admission.admission import Admission, Caller
from ..client import Origin
from ..client.failures import DISCONNECTED, connect_failure, reset
from ..errors import InvalidRequest, ProxyError, RateLimited, UpstreamUnavailable
from ..inbound.responses_route import ResponsesTurns, responses_target
from ..inbound.route import RealtimeTarget, client_authorization
from ..observe import Exchange
from ..observe.observer import Observer
from ..runtime.runtime import Runtime, UpstreamPlan
from .attempts import Attempts, Ending, answered, no_headers_within
from .health import Health
from .tunnel import CLOSE_TIMEOUT, RealtimeSessions, Tunnel, refuse_session

__all__ = ["RealtimeProxy"]

log = logging.getLogger("oaimux.realtime")

# Made per leg by aiohttp (key, accept, version, extensions) or by us (protocol).
_HANDSHAKE_HEADERS = (
    "Sec-WebSocket-Key",
    "Sec-WebSocket-Version",
    "Sec-WebSocket-Extensions",
    "Sec-WebSocket-Protocol",
    "Sec-WebSocket-Accept",
)
# Control frames taken from a Responses WebSocket before its first message.
_FIRST_MESSAGE_CONTROL_FRAMES = 16
# Subprotocols that carry a credential (OpenAI's browser WebSocket scheme).
_CREDENTIAL_PROTOCOLS = ("openai-insecure-api-key.", "openai-organization.", "openai-project.")


@dataclass(frozen=True, slots=True)
class _Upgrade:
    """What every upstream handshake of one session is made from."""

    headers: CIMultiDictProxy[str]  # the client's, rewritten per upstream
    target: RealtimeTarget
    protocols: tuple[str, ...]  # the subprotocols to offer upstream
    max_msg_size: int


class RealtimeProxy:
    """Opens realtime sessions: the upstream leg through the route's walk, then
    the tunnel. One per app, holding the WebSocket client session, the
    breakers, the observer and the open sessions (closed on shutdown)."""

    __slots__ = ("_admission", "_health", "_observer", "_session", "_sessions")

    def __init__(
        self,
        session: aiohttp.ClientSession,
        health: Health,
        observer: Observer,
        *,
        sessions: RealtimeSessions,
        admission: Admission,
    ) -> None:
        self._session = session
        self._health = health
        self._observer = observer
        self._sessions = sessions
        self._admission = admission  # charges a Responses WebSocket's turns

    async def serve(
        self, request: web.Request, target: RealtimeTarget, runtime: Runtime, *, ex: Exchange
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
        protocols = _forwarded_protocols(offered, target, runtime)
        upgrade = _Upgrade(request.headers, target, protocols, limit)
        attempts = Attempts(ex, self._health, self._observer)
        upstream = await self._connect(upgrade, runtime, attempts)
        chosen = upstream.protocol
        client = _client_leg(chosen, limit)
        tunnel = Tunnel(client, upstream, ex)
        await tunnel.run(_handshake_request(request, offered, chosen), self._sessions)
        return client

    async def serve_responses(
        self,
        request: web.Request,
        runtime: Runtime,
        caller: Caller,
        *,
        query: str,
        ex: Exchange,
    ) -> web.StreamResponse:
        """Accept the client's upgrade, route by its first message, connect
        upstream, then relay until closed (the module's docstring)."""
        offered = _offered_protocols(request.headers)
        if not web.WebSocketResponse(protocols=offered).can_prepare(request).ok:
            raise InvalidRequest(
                "Not a valid WebSocket handshake (RFC 6455 §4.2.1).",
                code="invalid_websocket_handshake",
            )
        server = runtime.settings.server
        client = _client_leg(None, server.max_body_bytes)
        try:
            await client.prepare(_handshake_request(request, offered, None))
        except (ConnectionError, web.HTTPException):
            ex.outcome = "client_gone"
            return client
        ex.status = 101
        ex.ttfb = time.perf_counter() - ex.started
        ex.streaming = True
        try:
            first = await _first_message(client, server.body_idle_timeout)
            if first is None:
                ex.outcome = "client_gone"
                return client
            target, first = responses_target(
                first,
                runtime,
                caller,
                query=query,
                authorization=client_authorization(request, runtime),
            )
            _describe(ex, target)
            if target.route.rate_limit is not None:
                # The handshake was charged before the route was known.
                await self._admission.charge(runtime.settings, caller, target.route)
            upstream = await self._open_responses(request, target, first, runtime, ex)
        except ProxyError as err:
            await refuse_session(client, err, ex)
            return client
        except asyncio.CancelledError:
            ex.outcome = "client_gone"
            raise
        turns = ResponsesTurns(runtime, caller, target.route)
        admission = self._admission

        async def vet(message: bytes) -> bytes:
            """A later message: checked, and charged as a request when it may
            be a ``response.create`` (README, "Codex CLI")."""
            checked = turns.check(message)
            if checked is None:
                return message
            await admission.charge(runtime.settings, caller, target.route)
            return checked

        await Tunnel(client, upstream, ex, vet).run(None, self._sessions)
        return client

    async def _open_responses(
        self,
        request: web.Request,
        target: RealtimeTarget,
        first: bytes,
        runtime: Runtime,
        ex: Exchange,
    ) -> aiohttp.ClientWebSocketResponse[bool]:
        """The upstream leg of a routed Responses WebSocket, its first message sent."""
        limit = runtime.settings.server.max_body_bytes
        upgrade = _Upgrade(request.headers, target, (), limit)
        attempts = Attempts(ex, self._health, self._observer)
        upstream = await self._connect(upgrade, runtime, attempts)
        try:
            await upstream.send_frame(first, WSMsgType.TEXT)
        except (ConnectionError, aiohttp.ClientError):
            await upstream.close(code=WSCloseCode.GOING_AWAY)
            raise UpstreamUnavailable(
                f"The upstream '{ex.upstream}' closed the WebSocket at once."
            ) from None
        except BaseException:
            await asyncio.shield(upstream.close(code=WSCloseCode.GOING_AWAY))
            raise
        ex.bytes_in += len(first)
        return upstream

    async def _connect(
        self, upgrade: _Upgrade, runtime: Runtime, attempts: Attempts
    ) -> aiohttp.ClientWebSocketResponse[bool]:
        """The upstream leg, after the upstream's ``101``; each upstream is tried once."""
        for plan in attempts.walk(upgrade.target.route, runtime):
            attempts.start(plan)
            try:
                upstream = await self._handshake(plan, upgrade, attempts.ex.request_id)
            except (aiohttp.ClientError, OSError) as exc:  # TimeoutError too
                _handshake_failed(attempts, plan, exc)
                continue
            except BaseException as exc:
                attempts.abandon(plan, exc)
                raise
            attempts.answered_by(plan)
            return upstream
        raise attempts.exhausted()

    async def _handshake(
        self, plan: UpstreamPlan, upgrade: _Upgrade, request_id: str
    ) -> aiohttp.ClientWebSocketResponse[bool]:
        target = upgrade.target
        headers = plan.request_headers.build(
            upgrade.headers, request_id, target.client_authorization
        )
        for header in _HANDSHAKE_HEADERS:
            headers.popall(header, None)
        async with asyncio.timeout(plan.upstream.timeouts.response):
            return await self._session.ws_connect(
                plan.url_for(target.path, target.query),
                protocols=upgrade.protocols,
                headers=headers,
                autoping=False,
                autoclose=False,
                compress=0,
                max_msg_size=upgrade.max_msg_size,
                decode_text=False,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT),
            )


async def _first_message(client: web.WebSocketResponse[bool], wait: float) -> bytes | None:
    """The client's first text message (bounded in time here, in size by the
    leg's ``max_msg_size``); None when the client closed first. Pings before
    it are answered, as the upstream would."""
    try:
        async with asyncio.timeout(wait):
            for _ in range(_FIRST_MESSAGE_CONTROL_FRAMES):
                msg = await client.receive()
                kind = msg.type
                if kind is WSMsgType.TEXT:
                    data: bytes = msg.data
                    return data
                if kind is WSMsgType.PING:
                    await client.pong(msg.data)
                elif kind is WSMsgType.CLOSE:
                    await client.close(code=WSCloseCode.OK)
                    return None
                elif kind is WSMsgType.BINARY:
                    raise InvalidRequest(
                        "The first message must be a response.create event as JSON text.",
                        code="invalid_first_message",
                    )
                elif kind is not WSMsgType.PONG:
                    # Gone, or broken (aiohttp closed it: 1009 for an oversized message).
                    return None
    except TimeoutError:
        raise InvalidRequest(
            f"No first message (a response.create event) within {wait:g} s.",
            code="first_message_timeout",
        ) from None
    raise InvalidRequest(
        "Too many control frames before the first message.", code="invalid_first_message"
    )


def _describe(ex: Exchange, target: RealtimeTarget) -> None:
    """Name the session's model and route in its access log line and metrics."""
    ex.model, ex.upstream_model = target.model, target.upstream_model
    ex.metric_model = target.route.model or target.model or ""
    ex.route = target.route.describe()


def _offered_protocols(headers: CIMultiDictProxy[str]) -> list[str]:
    return [
        token.strip()
        for value in headers.getall("Sec-WebSocket-Protocol", ())
        for token in value.split(",")
        if token.strip()
    ]


def _forwarded_protocols(
    offered: list[str], target: RealtimeTarget, runtime: Runtime
) -> tuple[str, ...]:
    """The offered subprotocols to pass upstream: the credential-bearing ones
    only when the client's own credential may reach every upstream."""
    client_may_authenticate = not runtime.keys and all(
        runtime.plans[n].request_headers.pass_authorization for n in target.route.upstreams
    )
    return tuple(
        p
        for p in offered
        if client_may_authenticate or not p.lower().startswith(_CREDENTIAL_PROTOCOLS)
    )


def _client_leg(chosen: str | None, limit: int) -> web.WebSocketResponse[bool]:
    """The client's leg, told the subprotocol the upstream chose (if any)."""
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
    return client


def _handshake_request(
    request: web.Request, offered: list[str], chosen: str | None
) -> web.BaseRequest:
    """The request the client's ``101`` answers."""
    if not offered or chosen:
        return request
    # Answer without a subprotocol, and keep aiohttp from logging the
    # offered ones: they can hold a key (docs/faults.md, "A key in a
    # WebSocket subprotocol").
    headers = CIMultiDict(request.headers)
    headers.popall("Sec-WebSocket-Protocol", None)
    return request.clone(headers=headers)


def _handshake_failed(
    attempts: Attempts, plan: UpstreamPlan, exc: aiohttp.ClientError | OSError
) -> None:
    """Note why ``plan``'s handshake failed, so the walk moves on; or raise the
    upstream's own verdict on this request (a 4xx other than 401/403/429)."""
    if isinstance(exc, aiohttp.WSServerHandshakeError):
        status = exc.status
        if attempts.refuses_credential(plan, status):
            log.error(
                "upstream %s answered %d to the proxy's own credential on a realtime "
                "handshake; check its key",
                plan.name,
                status,
            )
            attempts.credential_refused(plan, status)
        elif status == 429 or status >= 500 or status < 400:
            rate_limited = status == 429
            ending = Ending.HANDSHAKE_RATE_LIMITED if rate_limited else Ending.HANDSHAKE_REFUSED
            attempts.failed(plan, f"status_{status}", answered(status), ending=ending)
        else:
            # The upstream's verdict on this request (e.g. 400, 404): no fallback.
            attempts.healthy(plan)
            raise _refused(plan.name, status) from None
    elif isinstance(exc, TimeoutError):
        what = no_headers_within(plan.upstream.timeouts.response)
        attempts.failed(plan, "timeout", what, ending=Ending.TIMEOUT)
    else:
        # Its words, never the exception's repr: that can carry request headers (our key).
        kind, what = _connect_failure(exc, plan.origin)
        attempts.failed(plan, kind, what, ending=Ending.UNAVAILABLE)


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

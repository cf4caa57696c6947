"""The Responses API's WebSocket (``GET /v1/responses``, Codex CLI): routed by
its first message, so the client's leg is answered ``101`` first.

Contract (the upstream leg: upstream_leg.py; the tunnel: tunnel.py):

- The first message is awaited for ``server.body_idle_timeout`` seconds
  (pings are answered meanwhile), and is at most ``server.max_body_bytes``.
  Shutdown closes a session still waiting for it, or for its upstream's
  handshake, with 1001 at once (tunnel.py, ``RealtimeSessions``).
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
import time

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web

from ..admission.admission import Admission, Caller
from ..errors import InvalidRequest, ProxyError, UpstreamUnavailable
from ..inbound.responses_route import ResponsesTurns, responses_target
from ..inbound.route import RealtimeTarget, client_authorization
from ..observe import Exchange
from ..runtime.runtime import Runtime
from .client_leg import client_leg, handshake_request, offered_protocols
from .tunnel import RealtimeSessions, Tunnel, Vet, refuse_session
from .upstream_leg import Upgrade, UpstreamLegs

__all__ = ["ResponsesSockets"]

# Control frames taken from a Responses WebSocket before its first message.
_FIRST_MESSAGE_CONTROL_FRAMES = 16

# The upstream leg of a routed session, and its route.
_Routed = tuple[RealtimeTarget, aiohttp.ClientWebSocketResponse[bool]]


class ResponsesSockets:
    """Opens Responses WebSocket sessions: the client's leg, the route from the
    first message, the upstream leg, then the tunnel with each later message
    vetted and charged. One per app."""

    __slots__ = ("_admission", "_legs", "_sessions")

    def __init__(
        self, legs: UpstreamLegs, sessions: RealtimeSessions, admission: Admission
    ) -> None:
        self._legs = legs
        self._sessions = sessions
        self._admission = admission  # charges the session's turns

    async def serve(
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
        offered = offered_protocols(request)
        client = client_leg(None, runtime.settings.server.max_body_bytes)
        if not await _accept(client, handshake_request(request, offered, None), ex):
            return client
        # A task of its own, so shutdown can give it up (RealtimeSessions).
        routing = asyncio.ensure_future(
            self._route(client, request, runtime, caller, query=query, ex=ex)
        )
        self._sessions.routing(client, routing)
        try:
            routed = await routing
        except ProxyError as err:
            await refuse_session(client, err, ex)
            return client
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or not task.cancelling():
                return client  # given up at shutdown, which closes the client's leg
            ex.outcome = "client_gone"
            raise
        finally:
            self._sessions.routed(client)
        if routed is None:
            ex.outcome = "client_gone"
            return client
        target, upstream = routed
        vet = _vetting(ResponsesTurns(runtime, caller, target.route), self._admission)
        await Tunnel(client, upstream, ex, vet).run(None, self._sessions)
        return client

    async def _route(
        self,
        client: web.WebSocketResponse[bool],
        request: web.Request,
        runtime: Runtime,
        caller: Caller,
        *,
        query: str,
        ex: Exchange,
    ) -> _Routed | None:
        """The session's route, from its first message, and its upstream leg
        with that message sent; None when the client closed first."""
        server = runtime.settings.server
        first = await _first_message(client, server.body_idle_timeout)
        if first is None:
            return None
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
        upgrade = Upgrade(request.headers, target, (), server.max_body_bytes)
        upstream = await self._legs.connect(upgrade, runtime, ex)
        await _send_first(upstream, first, ex)
        return target, upstream


async def _accept(
    client: web.WebSocketResponse[bool], handshake: web.BaseRequest, ex: Exchange
) -> bool:
    """Answer the client's upgrade ``101``; False when the client is gone."""
    try:
        await client.prepare(handshake)
    except (ConnectionError, web.HTTPException):
        ex.outcome = "client_gone"
        return False
    ex.status = 101
    ex.ttfb = time.perf_counter() - ex.started
    ex.streaming = True
    return True


async def _send_first(
    upstream: aiohttp.ClientWebSocketResponse[bool], first: bytes, ex: Exchange
) -> None:
    """Send the routed first message on the upstream leg, which is closed if
    that fails."""
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


def _vetting(turns: ResponsesTurns, admission: Admission) -> Vet:
    """The tunnel's check of the client's later messages."""
    runtime, caller, route = turns.runtime, turns.caller, turns.route

    async def vet(message: bytes) -> bytes:
        """A later message: checked, and charged as a request when it may
        be a ``response.create`` (README, "Codex CLI")."""
        checked = turns.check(message)
        if checked is None:
            return message
        await admission.charge(runtime.settings, caller, route)
        return checked

    return vet


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

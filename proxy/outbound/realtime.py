"""The WebSocket sessions: ``GET /v1/realtime?model=...`` (the upstream leg
first, here) and ``GET /v1/responses`` (the client's leg first:
responses_socket.py); one upstream walk (upstream_leg.py) and one tunnel
(tunnel.py) for both.

Contract of the realtime session (the routing before it: inbound/route.py):

- The upstream handshake happens first; the client is answered ``101`` only
  after the upstream answered ``101`` (Go's ``handleUpgradeResponse`` does the
  same), so no byte is tunnelled to an upstream that refused. The route's
  upstreams are walked as for any request (attempts.py: breakers, fallback),
  each tried once; a refusal is an HTTP error to the client (upstream_leg.py).
- The client's subprotocols are offered upstream, the credential-bearing ones
  only when the client's own credential may reach the upstream; the client is
  told the subprotocol the upstream chose, nothing else (client_leg.py).
- Compression is off on both legs: a pass-through does not spend CPU
  re-deflating audio. A message over ``server.max_body_bytes`` closes the
  tunnel (tunnel.py).
"""

from __future__ import annotations

import aiohttp
from aiohttp import web

from ..admission.admission import Admission, Caller
from ..inbound.route import RealtimeTarget
from ..observe import Exchange
from ..observe.observer import Observer
from ..runtime.runtime import Runtime
from .client_leg import client_leg, forwarded_protocols, handshake_request, offered_protocols
from .health import Health
from .responses_socket import ResponsesSockets
from .tunnel import RealtimeSessions, Tunnel
from .upstream_leg import Upgrade, UpstreamLegs

__all__ = ["RealtimeProxy"]


class RealtimeProxy:
    """Opens WebSocket sessions: the upstream leg through the route's walk,
    then the tunnel. One per app, holding the upstream legs (the WebSocket
    client session, the breakers, the observer) and the open sessions (closed
    on shutdown)."""

    __slots__ = ("_legs", "_responses", "_sessions")

    def __init__(
        self,
        session: aiohttp.ClientSession,
        health: Health,
        observer: Observer,
        *,
        sessions: RealtimeSessions,
        admission: Admission,
    ) -> None:
        self._legs = UpstreamLegs(session, health, observer)
        self._sessions = sessions
        # admission charges a Responses WebSocket's turns
        self._responses = ResponsesSockets(self._legs, sessions, admission)

    async def serve(
        self, request: web.Request, target: RealtimeTarget, runtime: Runtime, *, ex: Exchange
    ) -> web.StreamResponse:
        """Connect upstream, then answer the client's upgrade and relay until closed."""
        offered = offered_protocols(request)
        limit = runtime.settings.server.max_body_bytes
        protocols = forwarded_protocols(offered, target, runtime)
        upgrade = Upgrade(request.headers, target, protocols, limit)
        upstream = await self._legs.connect(upgrade, runtime, ex)
        chosen = upstream.protocol
        client = client_leg(chosen, limit)
        tunnel = Tunnel(client, upstream, ex)
        await tunnel.run(handshake_request(request, offered, chosen), self._sessions)
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
        upstream, then relay until closed (responses_socket.py)."""
        return await self._responses.serve(request, runtime, caller, query=query, ex=ex)

"""``GET /v1/realtime?model=...`` with a WebSocket upgrade: the upstream leg first.

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
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from .. import SERVER
from ..client import Origin
from ..client.failures import DISCONNECTED, connect_failure, reset
from ..errors import InvalidRequest, ProxyError, RateLimited, UpstreamUnavailable
from ..inbound.route import REALTIME_PATH, RealtimeTarget
from ..observe import Exchange
from ..observe.observer import Observer
from ..runtime.runtime import Runtime, UpstreamPlan
from .attempts import Attempts, Ending, answered, no_headers_within
from .health import Health
from .tunnel import CLOSE_TIMEOUT, RealtimeSessions, Tunnel

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

    __slots__ = ("_health", "_observer", "_session", "_sessions")

    def __init__(
        self,
        session: aiohttp.ClientSession,
        health: Health,
        observer: Observer,
        *,
        sessions: RealtimeSessions,
    ) -> None:
        self._session = session
        self._health = health
        self._observer = observer
        self._sessions = sessions

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
                plan.url_for(REALTIME_PATH, target.query),
                protocols=upgrade.protocols,
                headers=headers,
                autoping=False,
                autoclose=False,
                compress=0,
                max_msg_size=upgrade.max_msg_size,
                decode_text=False,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT),
            )


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

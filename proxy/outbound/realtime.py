"""``GET /v1/realtime?model=...`` with a WebSocket upgrade: the upstream leg first.

Contract (the routing before it: inbound/route.py; the tunnel after it:
tunnel.py):

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
- Compression is off on both legs: a pass-through does not spend CPU
  re-deflating audio. A message over ``server.max_body_bytes`` closes the
  tunnel (tunnel.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from .. import SERVER
from ..errors import InvalidRequest, ProxyError, RateLimited, UpstreamUnavailable
from ..inbound.route import REALTIME_PATH, RealtimeTarget
from ..observe import Exchange
from ..observe.observer import Observer
from ..runtime import Runtime
from ..upstream import Origin
from .attempts import (
    CIRCUIT_OPEN,
    DISCONNECTED,
    Attempts,
    Ending,
    answered,
    connect_failure,
    no_headers_within,
    reset,
)
from .health import Health, order_upstreams
from .tunnel import CLOSE_TIMEOUT, RealtimeSessions, Tunnel

__all__ = ["proxy_realtime"]

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


def _offered_protocols(headers: CIMultiDictProxy[str]) -> list[str]:
    return [
        token.strip()
        for value in headers.getall("Sec-WebSocket-Protocol", ())
        for token in value.split(",")
        if token.strip()
    ]


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
    tunnel = Tunnel(client, upstream, ex)
    await tunnel.run(handshake, sessions)
    return client


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
    be opened, in upstream.py's terms."""
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

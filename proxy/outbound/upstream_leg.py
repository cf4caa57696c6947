"""The upstream leg of a WebSocket session (realtime, or the Responses API's):
the route's upstreams walked as for any request, each tried once, until one
answers the handshake ``101``.

Contract (the sessions that use it: realtime.py, responses_socket.py; the
walk itself: attempts.py):

- The upgrade request gets the upstream's header rewrites (headers.py: its
  credential set, the client's credentials and hop-by-hop headers dropped);
  ``Sec-WebSocket-*`` are made per leg by aiohttp. Compression is off: a
  pass-through does not spend CPU re-deflating audio. A message over
  ``server.max_body_bytes`` closes the tunnel (tunnel.py).
- A refusal is an HTTP error: 401/403 to the proxy's own credential, 429 and
  5xx move on to the route's next upstream, then become 502 (429 stays 429);
  any other 4xx is the upstream's verdict on this request, passed on with its
  status and no fallback.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDictProxy

from ..client import Origin
from ..client.failures import DISCONNECTED, connect_failure, reset
from ..errors import InvalidRequest, ProxyError, RateLimited, UpstreamUnavailable
from ..inbound.route import RealtimeTarget
from ..observe import Exchange
from ..observe.observer import Observer
from ..runtime.runtime import Runtime, UpstreamPlan
from .attempts import Attempts, Ending, answered, no_headers_within
from .health import Health
from .tunnel import CLOSE_TIMEOUT

__all__ = ["Upgrade", "UpstreamLegs"]

log = logging.getLogger("oaimux.realtime")

# Made per leg by aiohttp (key, accept, version, extensions) or by us (protocol).
_HANDSHAKE_HEADERS = (
    "Sec-WebSocket-Key",
    "Sec-WebSocket-Version",
    "Sec-WebSocket-Extensions",
    "Sec-WebSocket-Protocol",
    "Sec-WebSocket-Accept",
)


@dataclass(frozen=True, slots=True)
class Upgrade:
    """What every upstream handshake of one session is made from."""

    headers: CIMultiDictProxy[str]  # the client's, rewritten per upstream
    target: RealtimeTarget
    protocols: tuple[str, ...]  # the subprotocols to offer upstream
    max_msg_size: int


class UpstreamLegs:
    """Opens the upstream leg of a session through the route's walk. One per
    app, holding the WebSocket client session, the breakers and the observer."""

    __slots__ = ("_health", "_observer", "_session")

    def __init__(self, session: aiohttp.ClientSession, health: Health, observer: Observer) -> None:
        self._session = session
        self._health = health
        self._observer = observer

    async def connect(
        self, upgrade: Upgrade, runtime: Runtime, ex: Exchange
    ) -> aiohttp.ClientWebSocketResponse[bool]:
        """The upstream leg, after the upstream's ``101``; each upstream is tried once."""
        attempts = Attempts(ex, self._health, self._observer)
        for plan in attempts.walk(upgrade.target.route, runtime):
            attempts.start(plan)
            try:
                upstream = await self._handshake(plan, upgrade, ex.request_id)
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
        self, plan: UpstreamPlan, upgrade: Upgrade, request_id: str
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

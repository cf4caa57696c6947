"""The client's leg of a WebSocket session: the subprotocols it offered, the
ones passed upstream, and the ``101`` it is answered with.

- Subprotocols the client offered are forwarded upstream, except the
  browser-credential ones (``openai-insecure-api-key.*``,
  ``openai-organization.*``, ``openai-project.*``) unless the client's own
  credential may reach the upstream (``pass_client_auth`` and no proxy keys).
  The client is told the subprotocol the upstream chose, nothing else.
- Compression is off (as on the upstream leg, upstream_leg.py); a message over
  ``server.max_body_bytes`` closes the leg with 1009 (tunnel.py).
"""

from __future__ import annotations

from aiohttp import web
from multidict import CIMultiDict

from .. import SERVER
from ..errors import InvalidRequest
from ..inbound.route import RealtimeTarget
from ..runtime.runtime import Runtime
from .tunnel import CLOSE_TIMEOUT

__all__ = [
    "client_leg",
    "forwarded_protocols",
    "handshake_request",
    "offered_protocols",
]

# Subprotocols that carry a credential (OpenAI's browser WebSocket scheme).
_CREDENTIAL_PROTOCOLS = ("openai-insecure-api-key.", "openai-organization.", "openai-project.")


def offered_protocols(request: web.Request) -> list[str]:
    """The subprotocols the client offered; refuses a request that is not a
    valid WebSocket handshake."""
    offered = [
        token.strip()
        for value in request.headers.getall("Sec-WebSocket-Protocol", ())
        for token in value.split(",")
        if token.strip()
    ]
    # Offering the client's own protocols back keeps aiohttp from logging
    # them as "not overlapping": they can hold a key (docs/faults.md,
    # "A key in a WebSocket subprotocol").
    if not web.WebSocketResponse(protocols=offered).can_prepare(request).ok:
        raise InvalidRequest(
            "Not a valid WebSocket handshake (RFC 6455 §4.2.1).",
            code="invalid_websocket_handshake",
        )
    return offered


def forwarded_protocols(
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


def client_leg(chosen: str | None, limit: int) -> web.WebSocketResponse[bool]:
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


def handshake_request(
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

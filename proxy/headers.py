"""Which headers cross the proxy, in each direction.

Request direction (client → upstream), in this order (Go issue 50580: our own
headers are applied last, so stripping cannot undo them):

1. hop-by-hop headers and every header named in ``Connection`` are dropped
   (RFC 9110 §7.6.1);
2. ``Host``, ``Content-Length`` and ``Expect`` are dropped: the client library
   sets the first two for the bytes it actually sends, and 100-continue was
   already answered by our server;
3. forwarding headers (``Forwarded``, ``X-Forwarded-*``, ``X-Real-IP``) are
   dropped: they were about the hop to us, and an upstream such as OpenAI has
   no business seeing our users' addresses;
4. the client's credentials are dropped (``Authorization``, ``api-key``,
   ``x-api-key``, ``x-goog-api-key``, ``Cookie``, ``OpenAI-Organization``,
   ``OpenAI-Project``):
   they are either a proxy key or meant for another account. An upstream with
   ``pass_client_auth: true`` gets the client's ``Authorization`` back;
5. the upstream's ``headers.remove`` then ``headers.set`` are applied.

Response direction (upstream → client): hop-by-hop headers are dropped, and so
are the headers that identify the upstream account (``Set-Cookie``,
``openai-organization``, ``openai-project``) unless the upstream keeps them.
The upstream's CORS headers are always dropped: whether a browser may call the
proxy is the proxy's decision (``server.cors``), not the upstream's.
"""

from __future__ import annotations

from dataclasses import dataclass

from multidict import CIMultiDict, CIMultiDictProxy

from .settings import Upstream

__all__ = [
    "CLIENT_CREDENTIAL_HEADERS",
    "HOP_BY_HOP",
    "RequestHeaderPolicy",
    "ResponseHeaderPolicy",
    "connection_tokens",
]

# RFC 9110 §7.6.1 and RFC 2616 §13.5.1; Proxy-Connection is the non-standard
# one old clients send. Upgrade is handled by the WebSocket path on its own.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

_SET_BY_CLIENT_LIBRARY = frozenset({"host", "content-length", "expect"})

_FORWARDING = frozenset(
    {
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-real-ip",
    }
)

CLIENT_CREDENTIAL_HEADERS = frozenset(
    {
        "authorization",
        "api-key",
        "x-api-key",
        "x-goog-api-key",
        "cookie",
        "proxy-authorization",
        "openai-organization",
        "openai-project",
    }
)

# Headers that name the upstream account; stripped from responses by default.
_UPSTREAM_IDENTITY = frozenset({"set-cookie", "openai-organization", "openai-project"})

# CORS answers are the proxy's own (middlewares.Cors); an upstream's would open
# the proxy to every origin the upstream allows.
_UPSTREAM_CORS = frozenset(
    {
        "access-control-allow-origin",
        "access-control-allow-credentials",
        "access-control-allow-methods",
        "access-control-allow-headers",
        "access-control-allow-private-network",
        "access-control-expose-headers",
        "access-control-max-age",
    }
)


def connection_tokens(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    """Header names listed in every ``Connection`` header (CVE-2021-33197: several,
    an empty first one included)."""
    values = headers.getall("Connection", ())
    if not values:
        return frozenset()
    return frozenset(
        token.strip().lower() for value in values for token in value.split(",") if token.strip()
    )


@dataclass(frozen=True, slots=True)
class RequestHeaderPolicy:
    """Precomputed per upstream at load time, so the hot path only filters."""

    drop: frozenset[str]
    set: tuple[tuple[str, str], ...]
    pass_authorization: bool

    @classmethod
    def for_upstream(cls, upstream: Upstream) -> RequestHeaderPolicy:
        drop = HOP_BY_HOP | _SET_BY_CLIENT_LIBRARY | _FORWARDING | CLIENT_CREDENTIAL_HEADERS
        drop |= upstream.headers.remove
        set_names = frozenset(name.lower() for name, _ in upstream.headers.set)
        return cls(
            drop=drop | set_names,
            set=tuple((name, secret.value) for name, secret in upstream.headers.set),
            pass_authorization=upstream.pass_client_auth
            and "authorization" not in set_names
            and "authorization" not in upstream.headers.remove,
        )

    def build(
        self,
        inbound: CIMultiDictProxy[str],
        request_id: str,
        client_authorization: str | None,
    ) -> CIMultiDict[str]:
        """Headers for the upstream request.

        ``client_authorization`` is the client's ``Authorization`` value when it may
        be passed on (it was not a proxy key); used only with ``pass_client_auth``.
        """
        drop = self.drop
        if "connection" in inbound:
            drop = drop | connection_tokens(inbound)
        out: CIMultiDict[str] = CIMultiDict()
        for name, value in inbound.items():
            if name.lower() not in drop:
                out.add(name, value)
        if self.pass_authorization and client_authorization is not None:
            out["Authorization"] = client_authorization
        for name, value in self.set:
            out[name] = value
        out["X-Request-Id"] = request_id
        return out


@dataclass(frozen=True, slots=True)
class ResponseHeaderPolicy:
    drop: frozenset[str]

    @classmethod
    def for_upstream(cls, upstream: Upstream) -> ResponseHeaderPolicy:
        # Content-Length is set by us from the upstream's value when it has one.
        drop = (
            HOP_BY_HOP
            | {"content-length"}
            | _UPSTREAM_CORS
            | (_UPSTREAM_IDENTITY - upstream.keep_response_headers)
        )
        return cls(drop=frozenset(drop))

    def build(self, upstream_headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
        drop = self.drop
        if "connection" in upstream_headers:
            drop = drop | connection_tokens(upstream_headers)
        out: CIMultiDict[str] = CIMultiDict()
        for name, value in upstream_headers.items():
            if name.lower() not in drop:
                out.add(name, value)
        return out

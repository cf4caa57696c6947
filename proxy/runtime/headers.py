"""Which headers cross the proxy, in each direction.

Request direction (client → upstream), in this order (golang/go#50580: our own
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
   ``pass_client_auth: true`` gets the client's ``Authorization`` back, and
   with it the client's ``OpenAI-Organization`` and ``OpenAI-Project``: they
   scope the client's own key, never the upstream's;
5. the upstream's ``headers.remove`` then ``headers.set`` are applied.

Response direction (upstream → client): hop-by-hop headers are dropped, and so
are the headers that identify the upstream account (``Set-Cookie``,
``openai-organization``, ``openai-project``) unless the upstream keeps them.
The upstream's ``Server`` is replaced by the proxy's own (nginx hides an
upstream's by default too).
The upstream's CORS headers are always dropped: whether a browser may call the
proxy is the proxy's decision (``server.cors``), not the upstream's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from multidict import CIMultiDict, CIMultiDictProxy

from .. import SERVER
from ..config.settings import Upstream

__all__ = [
    "CLIENT_CREDENTIAL_HEADERS",
    "HOP_BY_HOP",
    "RequestHeaderPolicy",
    "ResponseHeaderPolicy",
    "connection_tokens",
]

# RFC 9110 §7.6.1 and RFC 2616 §13.5.1; Proxy-Connection is the non-standard
# one old clients send, HTTP2-Settings the one an h2c upgrade offer carries
# (RFC 7540 §3.2.1). An offered upgrade is never passed on: the proxy answers
# over HTTP/1.1 (RFC 9110 §7.8), and the WebSocket path makes its own.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "http2-settings",
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

# The account scoping that goes with the client's own key (pass_client_auth).
_CLIENT_KEY_SCOPE = ("OpenAI-Organization", "OpenAI-Project")

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
    return _tokens(tuple(values))


def _tokens(values: tuple[str, ...]) -> frozenset[str]:
    return frozenset(
        token.strip().lower() for value in values for token in value.split(",") if token.strip()
    )


# Bounds of the per-policy memos below: header names and Connection values are
# the client's (or the upstream's) to choose, so a flood of new spellings only
# empties a memo, it never grows memory.
_MEMO_LIMIT = 1024


class _NameFilter:
    """Picks the headers whose names are not in ``drop`` (nor listed in
    ``Connection``), in their order, with their spelling.

    The verdict for a name is memoised per spelling: a server sees the same
    few spellings from the same few clients, so the hot path is one dict
    lookup per header instead of a ``lower()`` and a set lookup. The same
    goes for the names a ``Connection`` header lists (usually ``keep-alive``,
    already dropped).
    """

    __slots__ = ("_drop", "_listed", "_verdicts")

    def __init__(self, drop: frozenset[str]) -> None:
        self._drop = drop
        self._verdicts: dict[str, bool] = {}  # name as spelt -> passes
        self._listed: dict[tuple[str, ...], frozenset[str]] = {}  # Connection values -> extra drops

    def passing(self, headers: CIMultiDictProxy[str]) -> list[tuple[str, str]]:
        """The (name, value) pairs that cross, in order (one CIMultiDict built
        from a list costs about half of adding the same pairs one by one)."""
        extra = self._listed_in_connection(headers) if "Connection" in headers else None
        verdicts = self._verdicts
        kept: list[tuple[str, str]] = []
        keep = kept.append
        for pair in headers.items():
            passes = verdicts.get(pair[0])
            if passes is None:
                passes = self._verdict(pair[0])
            if passes and not (extra and pair[0].lower() in extra):
                keep(pair)
        return kept

    def _verdict(self, name: str) -> bool:
        verdicts = self._verdicts
        if len(verdicts) >= _MEMO_LIMIT:
            verdicts.clear()
        passes = verdicts[name] = name.lower() not in self._drop
        return passes

    def _listed_in_connection(self, headers: CIMultiDictProxy[str]) -> frozenset[str]:
        """Names the ``Connection`` headers list that ``drop`` does not already hold."""
        values = tuple(headers.getall("Connection"))
        extra = self._listed.get(values)
        if extra is None:
            if len(self._listed) >= _MEMO_LIMIT:
                self._listed.clear()
            extra = self._listed[values] = _tokens(values) - self._drop
        return extra


@dataclass(frozen=True, slots=True)
class RequestHeaderPolicy:
    """Precomputed per upstream at load time, so the hot path only filters."""

    drop: frozenset[str]
    # The upstream's headers.set, minus X-Request-Id (always ours), one per name.
    set: tuple[tuple[str, str], ...] = field(repr=False)  # values hold keys
    pass_authorization: bool
    # Sent along with a passed Authorization, as the client sent them; none
    # the upstream sets or removes itself.
    pass_with_authorization: tuple[str, ...]
    _filter: _NameFilter = field(repr=False, compare=False)

    @classmethod
    def for_upstream(cls, upstream: Upstream) -> RequestHeaderPolicy:
        drop = HOP_BY_HOP | _SET_BY_CLIENT_LIBRARY | _FORWARDING | CLIENT_CREDENTIAL_HEADERS
        drop |= upstream.headers.remove
        # One value per name, the last one written winning, as assigning them
        # one after another would; X-Request-Id is always the request's own.
        own: dict[str, tuple[str, str]] = {}
        for name, secret in upstream.headers.set:
            own.pop(name.lower(), None)
            own[name.lower()] = (name, secret.value)
        own.pop("x-request-id", None)
        set_names = frozenset(name.lower() for name, _ in upstream.headers.set)
        drop = frozenset(drop | set_names | {"x-request-id"})
        configured = set_names | upstream.headers.remove
        return cls(
            drop=drop,
            set=tuple(own.values()),
            pass_authorization=upstream.pass_client_auth and "authorization" not in configured,
            pass_with_authorization=tuple(
                name for name in _CLIENT_KEY_SCOPE if name.lower() not in configured
            ),
            _filter=_NameFilter(drop),
        )

    def build(
        self,
        inbound: CIMultiDictProxy[str],
        request_id: str,
        client_authorization: str | None,
    ) -> CIMultiDict[str]:
        """Headers for the upstream request.

        ``client_authorization`` is the client's ``Authorization`` value when it may
        be passed on (it was not a proxy key); used only with ``pass_client_auth``,
        and only then are the client's ``OpenAI-Organization`` and
        ``OpenAI-Project`` passed too.
        Every name added here is in ``drop``, so none is duplicated.
        """
        pairs = self._filter.passing(inbound)
        if self.pass_authorization and client_authorization is not None:
            pairs.append(("Authorization", client_authorization))
            for name in self.pass_with_authorization:
                pairs.extend((name, value) for value in inbound.getall(name, ()))
        if self.set:
            pairs.extend(self.set)
        pairs.append(("X-Request-Id", request_id))
        return CIMultiDict(pairs)


@dataclass(frozen=True, slots=True)
class ResponseHeaderPolicy:
    drop: frozenset[str]
    _filter: _NameFilter = field(repr=False, compare=False)

    @classmethod
    def for_upstream(cls, upstream: Upstream) -> ResponseHeaderPolicy:
        # Content-Length is set by us from the upstream's value when it has one.
        drop = frozenset(
            HOP_BY_HOP
            | {"content-length", "server"}
            | _UPSTREAM_CORS
            | (_UPSTREAM_IDENTITY - upstream.keep_response_headers)
        )
        return cls(drop=drop, _filter=_NameFilter(drop))

    def build(self, upstream_headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
        pairs = self._filter.passing(upstream_headers)
        pairs.append(("Server", SERVER))
        return CIMultiDict(pairs)

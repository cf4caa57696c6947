"""Proxy keys: who may use the proxy, and which models.

Keys are held only as SHA-256 digests. A presented key is hashed and compared
with every configured digest using ``hmac.compare_digest``, always all of
them, so the time taken does not depend on which key (if any) matched.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from fnmatch import fnmatchcase

from multidict import CIMultiDictProxy

from ..config.settings import AuthKey

__all__ = ["KeyTable", "presented_key"]


_BROWSER_KEY_PROTOCOL = "openai-insecure-api-key."


# Header carriers read after Authorization, in this order: Azure-style
# clients send api-key, Anthropic's SDKs and Claude Code x-api-key.
_KEY_HEADERS = ("api-key", "x-api-key")


def presented_key(headers: CIMultiDictProxy[str]) -> str | None:
    """The key a client sent: ``Authorization: Bearer <key>``, else ``api-key``,
    else ``x-api-key``, else (browsers cannot set headers on a WebSocket) the
    ``openai-insecure-api-key.<key>`` subprotocol the OpenAI SDKs offer on a
    realtime handshake. The first carrier present decides; a broken one is
    not rescued by another."""
    auth = headers.get("Authorization")
    if auth is not None:
        scheme, _, token = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    for carrier in _KEY_HEADERS:
        key = headers.get(carrier)
        if key is not None:
            return key.strip() or None
    protocols = headers.get("Sec-WebSocket-Protocol")
    if protocols is not None and _BROWSER_KEY_PROTOCOL in protocols:
        for offered in protocols.split(","):
            name = offered.strip()
            if name.startswith(_BROWSER_KEY_PROTOCOL):
                return name[len(_BROWSER_KEY_PROTOCOL) :] or None
    return None


class KeyTable:
    """The configured proxy keys; empty means the proxy is open."""

    def __init__(self, keys: Sequence[AuthKey]) -> None:
        self.keys = tuple(keys)

    def __bool__(self) -> bool:
        return bool(self.keys)

    def authenticate(self, presented: str | None) -> AuthKey | None:
        """The key ``presented`` matches, or ``None``; every digest is compared."""
        if presented is None:
            return None
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        found: AuthKey | None = None
        for key in self.keys:
            if hmac.compare_digest(digest, key.sha256):
                found = key
        return found

    @staticmethod
    def allows(key: AuthKey | None, model: str) -> bool:
        """May ``key`` use ``model``? No key (an open proxy) or no list: yes."""
        if key is None or key.models is None:
            return True
        return any(fnmatchcase(model, pattern) for pattern in key.models)

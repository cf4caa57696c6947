"""Who the client is: the TCP peer, or what a trusted proxy in front says.

``X-Forwarded-For`` is believed only when the peer is one of
``server.trusted_proxies``; then the right-most address that is not itself
trusted is the client. Never the left-most: clients write that one themselves
(docs/faults.md, "Spoofed client addresses"). aiohttp-remotes'
``XForwardedStrict`` reads the header the same way.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from functools import lru_cache

__all__ = ["TrustedNetworks", "client_address", "limit_key", "trusted_networks"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _parse(text: str) -> Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # "[::1]:443" as some proxies write it
        text = text[1 : text.index("]")]
    elif text.count(":") == 1 and "." in text:  # "1.2.3.4:5678"
        text = text.split(":", 1)[0]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


class TrustedNetworks:
    """``server.trusted_proxies``, built once per configuration.

    Hashed by identity, so it is a cheap cache key; the cache holds a reference
    to it, so an identity is never reused while an answer for it is cached.
    """

    __slots__ = ("networks",)

    def __init__(self, networks: Iterable[Network]) -> None:
        self.networks = tuple(networks)

    def __bool__(self) -> bool:
        return bool(self.networks)


@lru_cache(maxsize=16)
def trusted_networks(networks: tuple[Network, ...]) -> TrustedNetworks:
    """One :class:`TrustedNetworks` per distinct list: a reload that keeps the
    list keeps the object, and with it the answers :func:`_classify` cached for
    it (a new object per reload would fill that cache with answers for
    configurations gone, up to its bound)."""
    return TrustedNetworks(networks)


# Parsing an address and testing it against networks costs several µs; a
# server sees the same few peers (and the same nginx hop) over and over, so
# the answer is memoised by the address text. Bounded: a flood of distinct
# addresses only evicts entries, it never grows memory.
@lru_cache(maxsize=8192)
def _classify(text: str, trusted: TrustedNetworks) -> tuple[str, bool] | None:
    """The address in canonical text and whether it is trusted; None if not an address."""
    addr = _parse(text)
    if addr is None:
        return None
    return str(addr), any(addr in net for net in trusted.networks)


def client_address(
    peer: str | None,
    forwarded_for: Iterable[str],
    trusted: TrustedNetworks | Sequence[Network],
) -> str:
    """The client's address as text.

    ``forwarded_for`` holds every ``X-Forwarded-For`` header value in order
    (several headers count as one comma-separated list, RFC 9110 §5.3); empty
    list elements are skipped (RFC 9110 §5.6.1). Walking from the right, each
    address is the client unless it is itself a trusted proxy. An unparsable
    entry stops the walk: what lies left of it cannot be trusted, so the last
    trusted hop (the entry to its right, or the peer) is the client.
    """
    if not isinstance(trusted, TrustedNetworks):
        trusted = TrustedNetworks(trusted)
    peer_info = _classify(peer, trusted) if peer else None
    if peer_info is None:
        return peer or "unknown"
    client, peer_trusted = peer_info
    if not peer_trusted:
        return client
    hops = [h for value in forwarded_for for h in value.split(",")]
    for raw in reversed(hops):
        hop = raw.strip()
        if not hop:
            continue
        info = _classify(hop, trusted)
        if info is None:
            break
        client, hop_trusted = info
        if not hop_trusted:
            break
    return client


@lru_cache(maxsize=8192)
def limit_key(address: str) -> str:
    """The rate-limit bucket of an address: IPv6 clients are limited per /64,
    since one host is usually handed a whole /64 and could rotate through it."""
    if ":" in address:
        try:
            # A zone ("fe80::1%eth0") names the interface, not the host.
            net = ipaddress.IPv6Network(f"{address.partition('%')[0]}/64", strict=False)
        except ValueError:
            return address
        return f"{net.network_address}/64"
    return address

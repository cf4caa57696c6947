"""Who the client is: the TCP peer, or what a trusted proxy in front says.

``X-Forwarded-For`` is believed only when the peer is one of
``server.trusted_proxies``; then the right-most address that is not itself
trusted is the client. Never the left-most: clients write that one themselves
(reliability.md G14, aiohttp-remotes' XForwardedStrict).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from functools import lru_cache

__all__ = ["client_address", "limit_key"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


# Parsing an address costs ~5-10 µs; a server sees the same few peers (and
# the same nginx hop) over and over. Bounded, so a flood of distinct
# addresses only evicts entries; it never grows memory.
@lru_cache(maxsize=8192)
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


@lru_cache(maxsize=8192)
def _trusted(addr: Address, trusted: tuple[Network, ...]) -> bool:
    return any(addr in net for net in trusted)


def client_address(
    peer: str | None, forwarded_for: Iterable[str], trusted: Sequence[Network]
) -> str:
    """The client's address as text.

    ``forwarded_for`` holds every ``X-Forwarded-For`` header value in order
    (several headers count as one comma-separated list, RFC 9110 §5.3); empty
    list elements are skipped (RFC 9110 §5.6.1). Walking from the right, each
    address is the client unless it is itself a trusted proxy. An unparsable
    entry stops the walk: what lies left of it cannot be trusted, so the last
    trusted hop (the entry to its right, or the peer) is the client.
    """
    peer_addr = _parse(peer) if peer else None
    if peer_addr is None:
        return peer or "unknown"
    trusted = tuple(trusted)
    if not trusted or not _trusted(peer_addr, trusted):
        return _text(peer_addr)
    client = peer_addr
    hops = [h for value in forwarded_for for h in value.split(",")]
    for hop in reversed(hops):
        if not hop.strip():
            continue
        addr = _parse(hop)
        if addr is None:
            break
        client = addr
        if not _trusted(addr, trusted):
            break
    return _text(client)


@lru_cache(maxsize=8192)
def _text(addr: Address) -> str:
    return str(addr)


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

"""Who the client is: peer address, trusted X-Forwarded-For, IPv6 per /64."""

from __future__ import annotations

import ipaddress

import pytest

from proxy.admission.clientip import client_address, limit_key

NGINX = [ipaddress.ip_network("127.0.0.1/32")]
CHAIN = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.1/32")]


@pytest.mark.parametrize(
    ("peer", "xff", "trusted", "expected"),
    [
        # No trusted proxies: X-Forwarded-For is the client's own writing, ignored.
        ("203.0.113.7", ["6.6.6.6"], [], "203.0.113.7"),
        # An untrusted peer cannot speak for anyone else either.
        ("203.0.113.7", ["6.6.6.6"], NGINX, "203.0.113.7"),
        # A trusted peer: the address it appended (right-most) is the client.
        ("127.0.0.1", ["198.51.100.9"], NGINX, "198.51.100.9"),
        # The left-most entry is whatever the client sent: never believed.
        ("127.0.0.1", ["6.6.6.6, 198.51.100.9"], NGINX, "198.51.100.9"),
        ("127.0.0.1", ["6.6.6.6", "198.51.100.9"], NGINX, "198.51.100.9"),
        # Through a chain of trusted proxies: the right-most untrusted wins.
        ("127.0.0.1", ["6.6.6.6, 198.51.100.9, 10.1.2.3"], CHAIN, "198.51.100.9"),
        ("127.0.0.1", ["198.51.100.9, 10.1.2.3", "10.9.9.9"], CHAIN, "198.51.100.9"),
        # Everyone in the list is trusted: the left-most (first hop) is the client.
        ("127.0.0.1", ["10.1.2.3, 10.2.3.4"], CHAIN, "10.1.2.3"),
        # Trusted peer, no header: the peer itself.
        ("127.0.0.1", [], NGINX, "127.0.0.1"),
        # Garbage stops the walk; what lies left of it is not believed.
        ("127.0.0.1", ["6.6.6.6, bogus"], NGINX, "127.0.0.1"),
        ("127.0.0.1", ["6.6.6.6, bogus, 198.51.100.9"], NGINX, "198.51.100.9"),
        ("127.0.0.1", ["bogus, 10.1.2.3"], CHAIN, "10.1.2.3"),
        # Empty list elements are skipped (RFC 9110 §5.6.1).
        ("127.0.0.1", ["198.51.100.9, , "], NGINX, "198.51.100.9"),
        ("127.0.0.1", [""], NGINX, "127.0.0.1"),
        # Ports and brackets as some proxies write them.
        ("127.0.0.1", ["198.51.100.9:4711"], NGINX, "198.51.100.9"),
        ("127.0.0.1", ["[2001:db8::1]:443"], NGINX, "2001:db8::1"),
        ("127.0.0.1", ["2001:db8::1"], NGINX, "2001:db8::1"),
        # An IPv4 client seen through a dual-stack socket is the IPv4 client.
        ("::ffff:203.0.113.7", [], [], "203.0.113.7"),
        ("::ffff:127.0.0.1", ["198.51.100.9"], NGINX, "198.51.100.9"),
        ("2001:db8::5", [], [], "2001:db8::5"),
        # No peer address (a Unix socket): a fixed bucket rather than a crash.
        (None, ["6.6.6.6"], NGINX, "unknown"),
    ],
)
def test_client_address(
    peer: str | None,
    xff: list[str],
    trusted: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
    expected: str,
) -> None:
    assert client_address(peer, xff, trusted) == expected


@pytest.mark.parametrize(
    ("address", "bucket"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("unknown", "unknown"),
    ],
)
def test_ipv6_clients_share_a_bucket_per_64(address: str, bucket: str) -> None:
    assert limit_key(address) == bucket

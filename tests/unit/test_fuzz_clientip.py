"""Property tests for the client-address parser (proxy/admission/clientip.py, owned by rate limiting).

Whatever a client writes into ``X-Forwarded-For`` (garbage, ports, brackets,
zones, mapped addresses, empty elements, thousands of hops), ``client_address``
never raises, and it only believes what the trusted chain vouches for: the
answer is the peer, or an entry that lies right of (or at) the right-most
entry no trusted proxy could have written, never further left.
"""

from __future__ import annotations

import ipaddress
import os

from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.admission.clientip import client_address, limit_key

FUZZ = settings(max_examples=int(os.environ.get("OAIMUX_FUZZ_EXAMPLES", "300")), deadline=None)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

v4 = st.ip_addresses(v=4).map(str)
v6 = st.ip_addresses(v=6).map(str)
spellings = (
    v4
    | v6
    | v4.map(lambda a: f"{a}:443")
    | v6.map(lambda a: f"[{a}]:443")
    | v6.map(lambda a: f"[{a}]")
    | v4.map(lambda a: f"::ffff:{a}")
    | v6.map(lambda a: f"{a}%eth0")
    | st.sampled_from(["unknown", "", " ", "_hidden", "1.2.3", "::ffff:", "[", "]", "[]:1", "1.2.3.4:", "1.2.3.4:5:6"])
    | st.text(max_size=20)
)  # fmt: skip
entries = st.lists(spellings, max_size=8)
headers = st.lists(entries.map(", ".join), max_size=3)
networks = st.lists(
    st.sampled_from(
        ["127.0.0.1/32", "10.0.0.0/8", "::1/128", "fd00::/8", "0.0.0.0/0", "::/0", "192.168.0.0/16"]
    ).map(ipaddress.ip_network),
    max_size=3,
)
peers = st.none() | spellings


def parse(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An independent reading of one entry: the same spellings, written differently."""
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        text = text[1:end]
    elif text.count(":") == 1 and "." in text:
        text = text.rsplit(":", 1)[0]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def trusted_by(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, nets: list[Network]) -> bool:
    return any(addr in net for net in nets)


@FUZZ
@given(peers, headers, networks)
@example("127.0.0.1", ["6.6.6.6, 198.51.100.9"], [ipaddress.ip_network("127.0.0.1/32")])
@example(
    "127.0.0.1", ["fe80::1%eth0"], [ipaddress.ip_network("::/0"), ipaddress.ip_network("0.0.0.0/0")]
)
@example("::ffff:127.0.0.1", ["[::ffff:10.0.0.1]:80"], [ipaddress.ip_network("127.0.0.0/8")])
def test_never_raises_and_never_believes_the_untrusted(
    peer: str | None, xff: list[str], trusted: list[Network]
) -> None:
    answer = client_address(peer, xff, trusted)
    assert isinstance(answer, str)
    bucket = limit_key(answer)
    assert isinstance(bucket, str) and bucket

    peer_addr = parse(peer) if peer else None
    if peer_addr is None:
        assert answer == (peer or "unknown")
        return
    if not trusted or not trusted_by(peer_addr, trusted):
        # An untrusted peer speaks only for itself.
        assert answer == str(peer_addr)
        return
    # Walk the chain from the right as a trusted proxy would: every entry up to
    # and including the first untrusted (or unparsable) one was written by
    # someone we trust; anything left of that was written by the client.
    hops = [h for value in xff for h in value.split(",") if h.strip()]
    believable = [str(peer_addr)]
    for hop in reversed(hops):
        addr = parse(hop)
        if addr is None:
            break
        believable.append(str(addr))
        if not trusted_by(addr, trusted):
            break
    assert answer == believable[-1], (answer, believable)
    # Never an IPv4 client dressed as IPv6.
    parsed = ipaddress.ip_address(answer.partition("%")[0])
    assert not (isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None)


@settings(max_examples=20, deadline=None)
@given(st.lists(v4, min_size=1, max_size=5).map(lambda few: few * 600), v4)
def test_thousands_of_hops_cost_one_walk(hops: list[str], client: str) -> None:
    """A flood of spoofed hops left of the real client changes nothing."""
    nginx = [ipaddress.ip_network("127.0.0.1/32")]
    assert client_address("127.0.0.1", [", ".join([*hops, client])], nginx) == client


@FUZZ
@given(v6)
def test_ipv6_clients_share_a_bucket_per_64(address: str) -> None:
    net = ipaddress.IPv6Network(f"{address}/64", strict=False)
    sibling = str(net.network_address + 0xFFFF)
    assert limit_key(address) == limit_key(sibling) == f"{net.network_address}/64"

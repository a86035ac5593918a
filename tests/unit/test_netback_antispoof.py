"""netback's source check (backends/netback/antispoof.py), frame by frame.

Each frame is built byte by byte as a hostile domU kernel could put it on its tx ring; the
check sees its head as netback copied it, and its layout as netback parsed it. A vif with an
``ip`` is a host with that address: what such a host sends passes, and any claim to another MAC
or address is refused. No vif sends a VLAN tag.
"""

from __future__ import annotations

import struct

import pytest

from backends.netback.antispoof import SourceFilter, link_local, parse_mac
from channels.netif import frame_layout

MAC = "00:16:3e:00:00:01"
OURS = parse_mac(MAC)
OTHER = parse_mac("00:16:3e:00:00:99")
BROADCAST = b"\xff" * 6
IP4, OTHER_IP4 = bytes([10, 0, 0, 2]), bytes([10, 0, 0, 3])
IP6 = bytes.fromhex("fd000000000000000000000000000002")
OTHER_IP6 = bytes.fromhex("fd000000000000000000000000000003")
LINK_LOCAL = link_local(OURS)
ALL_NODES = bytes.fromhex("ff020000000000000000000000000001")


def ether(ethertype: int, payload: bytes, src: bytes = OURS, dst: bytes = BROADCAST) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def ipv4(src: bytes, payload: bytes = bytes(8)) -> bytes:
    """A UDP datagram's IPv4 header and ``payload``, with a valid header checksum (a bridge
    with br_netfilter drops a bad one before anyone sees it)."""
    fields = [0x45, 0, 20 + len(payload), 0, 0, 64, 17, 0, src, IP4]
    words = struct.unpack("!10H", struct.pack("!BBHHHBBH4s4s", *fields))
    total = sum(words)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    fields[7] = ~total & 0xFFFF
    return struct.pack("!BBHHHBBH4s4s", *fields) + payload


def arp(op: int, sender_mac: bytes, sender_ip: bytes) -> bytes:
    return struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, sender_mac, sender_ip, bytes(6), IP4)


def ipv6(src: bytes, next_header: int, payload: bytes) -> bytes:
    fixed = struct.pack("!IHBB16s16s", 6 << 28, len(payload), next_header, 255, src, ALL_NODES)
    return fixed + payload


def icmpv6(kind: int, body: bytes = b"") -> bytes:
    return struct.pack("!BBH", kind, 0, 0) + body


def neighbour(kind: int, target: bytes, mac: bytes | None = None) -> bytes:
    """A Neighbor Solicitation (135) or Advertisement (136), with a link-layer option."""
    options = b"" if mac is None else struct.pack("!BB6s", 1 if kind == 135 else 2, 1, mac)
    return icmpv6(kind, bytes(4) + target + options)


HOP_BY_HOP_ROUTER_ALERT = bytes([58, 0, 5, 2, 0, 0, 1, 0])  # then ICMPv6
UNSPECIFIED = bytes(16)
MLD_ROUTERS = bytes.fromhex("ff020000000000000000000000000016")  # where MLDv2 reports go


def icmp(src: bytes, kind: int, body: bytes = bytes(4)) -> bytes:
    """A frame with an ICMPv6 message of type ``kind`` from ``src``."""
    return ether(0x86DD, ipv6(src, 58, icmpv6(kind, body)))


def tagged(ethertype: int, payload: bytes, tag: int = 0x8100, src: bytes = OURS) -> bytes:
    """A frame with one VLAN tag (VLAN 7) before ``ethertype``."""
    return ether(tag, struct.pack("!HH", 7, ethertype) + payload, src=src)


def mld_report(src: bytes, kind: int = 143) -> bytes:
    """An MLD report (v2: 143; v1: 131, done: 132) behind a router alert, as Linux sends it."""
    return ether(
        0x86DD, ipv6(src, 0, HOP_BY_HOP_ROUTER_ALERT + icmpv6(kind, bytes(4) + MLD_ROUTERS))
    )


def judge(sources: SourceFilter, frame: bytes) -> str | None:
    """The check as netback makes it: on the first 128 bytes, laid out by frame_layout."""
    head = frame[:128]
    return sources.refusal(head, frame_layout(head))


V4 = SourceFilter.from_backend(MAC, "10.0.0.2")
V6 = SourceFilter.from_backend(MAC, "fd00::2/64")
ANY_IP = SourceFilter.from_backend(MAC, None)

PASSES = {
    "IPv4 from its address": (V4, ether(0x0800, ipv4(IP4))),
    "ARP request from its MAC and address": (V4, ether(0x0806, arp(1, OURS, IP4))),
    "ARP reply from its MAC and address": (V4, ether(0x0806, arp(2, OURS, IP4))),
    "router solicitation from its link-local": (V4, icmp(LINK_LOCAL, 133)),
    "duplicate-address detection of its link-local from ::": (
        V4,
        ether(0x86DD, ipv6(UNSPECIFIED, 58, neighbour(135, LINK_LOCAL))),
    ),
    "duplicate-address detection of its IPv6 address from ::": (
        V6,
        ether(0x86DD, ipv6(UNSPECIFIED, 58, neighbour(135, IP6))),
    ),
    "MLDv2 report from ::": (V4, mld_report(UNSPECIFIED)),
    "MLDv1 report from ::": (V4, mld_report(UNSPECIFIED, 131)),
    "MLDv1 done from ::": (V4, mld_report(UNSPECIFIED, 132)),
    "MLD report behind a hop-by-hop header": (
        V4,
        ether(0x86DD, ipv6(LINK_LOCAL, 0, HOP_BY_HOP_ROUTER_ALERT + icmpv6(143, bytes(4)))),
    ),
    "advertisement of its link-local with its MAC": (
        V4,
        ether(0x86DD, ipv6(LINK_LOCAL, 58, neighbour(136, LINK_LOCAL, OURS))),
    ),
    "IPv6 from its IPv6 address": (V6, ether(0x86DD, ipv6(IP6, 17, bytes(8)))),
    "advertisement of its IPv6 address": (
        V6,
        ether(0x86DD, ipv6(IP6, 58, neighbour(136, IP6, OURS))),
    ),
    "any address without an ip": (ANY_IP, ether(0x0800, ipv4(OTHER_IP4))),
    "any EtherType without an ip": (ANY_IP, ether(0x88CC, bytes(46))),
}

REFUSED = {
    "another source MAC": (V4, ether(0x0800, ipv4(IP4), src=OTHER), "source MAC"),
    "another source MAC without an ip": (ANY_IP, ether(0x0800, ipv4(IP4), src=OTHER), "source MAC"),
    "IPv4 from another address": (V4, ether(0x0800, ipv4(OTHER_IP4)), "IPv4 source"),
    "IPv4 on a vif whose ip is IPv6": (V6, ether(0x0800, ipv4(IP4)), "IPv4 source"),
    "IPv4 cut short": (V4, ether(0x0800, ipv4(IP4)[:12]), "not an IPv4 header"),
    "IPv4 from its address in an 802.1Q tag": (V4, tagged(0x0800, ipv4(IP4)), "VLAN tag"),
    "IPv6 from its address in an 802.1Q tag": (
        V6,
        tagged(0x86DD, ipv6(IP6, 17, bytes(8))),
        "VLAN tag",
    ),
    "an 802.1Q tag without an ip": (ANY_IP, tagged(0x0800, ipv4(OTHER_IP4)), "VLAN tag"),
    "an 802.1ad tag without an ip": (ANY_IP, tagged(0x0800, ipv4(IP4), 0x88A8), "VLAN tag"),
    "two tags": (V4, tagged(0x8100, struct.pack("!HH", 7, 0x0800) + ipv4(IP4)), "VLAN tag"),
    "a tag cut short": (ANY_IP, ether(0x8100, b"\x00"), "VLAN tag"),
    "ARP reply for another address": (
        V4,
        ether(0x0806, arp(2, OURS, OTHER_IP4)),
        "ARP sender address",
    ),
    "ARP request from another address": (
        V4,
        ether(0x0806, arp(1, OURS, OTHER_IP4)),
        "ARP sender address",
    ),
    "ARP naming another MAC": (V4, ether(0x0806, arp(2, OTHER, IP4)), "ARP sender MAC"),
    "ARP on a vif whose ip is IPv6": (V6, ether(0x0806, arp(2, OURS, IP4)), "ARP sender address"),
    "another EtherType": (V4, ether(0x88CC, bytes(46)), "EtherType 88cc"),
    "IPv6 from a global address not its own": (
        V4,
        ether(0x86DD, ipv6(OTHER_IP6, 17, bytes(8))),
        "IPv6 source",
    ),
    "IPv6 from another link-local": (
        V4,
        ether(0x86DD, ipv6(link_local(OTHER), 17, bytes(8))),
        "IPv6 source",
    ),
    "advertisement of another address": (
        V6,
        ether(0x86DD, ipv6(IP6, 58, neighbour(136, OTHER_IP6, OURS))),
        "Neighbor Advertisement target",
    ),
    "advertisement behind a hop-by-hop header": (
        V6,
        ether(0x86DD, ipv6(IP6, 0, HOP_BY_HOP_ROUTER_ALERT + neighbour(136, OTHER_IP6, OURS))),
        "Neighbor Advertisement target",
    ),
    "advertisement naming another MAC": (
        V6,
        ether(0x86DD, ipv6(IP6, 58, neighbour(136, IP6, OTHER))),
        "neighbour discovery link-layer address",
    ),
    "solicitation naming another MAC": (
        V6,
        ether(0x86DD, ipv6(IP6, 58, neighbour(135, OTHER_IP6, OTHER))),
        "neighbour discovery link-layer address",
    ),
    "a zero-length option": (
        V6,
        ether(0x86DD, ipv6(IP6, 58, neighbour(135, OTHER_IP6) + bytes(8))),
        "malformed neighbour discovery option",
    ),
    "a router advertisement": (V6, icmp(LINK_LOCAL, 134, bytes(12)), "router message"),
    "a redirect": (V6, icmp(LINK_LOCAL, 137, bytes(36)), "router message"),
    "UDP from ::": (V4, ether(0x86DD, ipv6(UNSPECIFIED, 17, bytes(8))), "unspecified IPv6 source"),
    "TCP from :: behind a hop-by-hop header": (
        V4,
        ether(0x86DD, ipv6(UNSPECIFIED, 0, bytes([6, 0]) + bytes(6) + bytes(20))),
        "unspecified IPv6 source",
    ),
    "an echo request from ::": (V4, icmp(UNSPECIFIED, 128), "unspecified IPv6 source"),
    "a router solicitation from ::": (V4, icmp(UNSPECIFIED, 133), "unspecified IPv6 source"),
    "an advertisement from ::": (
        V4,
        ether(0x86DD, ipv6(UNSPECIFIED, 58, neighbour(136, LINK_LOCAL, OURS))),
        "unspecified IPv6 source",
    ),
    "duplicate-address detection of another address": (
        V6,
        ether(0x86DD, ipv6(UNSPECIFIED, 58, neighbour(135, OTHER_IP6))),
        "duplicate-address detection of another address",
    ),
    "extension headers past the head": (
        V4,
        ether(0x86DD, ipv6(LINK_LOCAL, 60, bytes([60, 7]) + bytes(62))),
        "IPv6 extension headers past the copied head",
    ),
}


@pytest.mark.parametrize("case", sorted(PASSES))
def test_what_a_host_with_these_addresses_sends_passes(case: str) -> None:
    sources, frame = PASSES[case]
    assert judge(sources, frame) is None


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_every_claim_to_another_address_is_refused(case: str) -> None:
    sources, frame, reason = REFUSED[case]
    assert judge(sources, frame) == reason


def test_only_the_address_of_an_ip_with_a_prefix_is_allowed() -> None:
    sources = SourceFilter.from_backend(MAC, "10.0.0.2/24")
    assert judge(sources, ether(0x0800, ipv4(IP4))) is None
    assert judge(sources, ether(0x0800, ipv4(OTHER_IP4))) == "IPv4 source"


def test_having_an_ip_is_its_own_field_not_the_presence_of_ipv6_addresses() -> None:
    """An IPv4-only filter still checks addresses: "no ip" is not read from an empty ipv6."""
    assert (ANY_IP.any_address, V4.any_address, V6.any_address) == (True, False, False)
    ipv4_only = SourceFilter(OURS, any_address=False, ipv4=IP4)
    assert judge(ipv4_only, ether(0x0800, ipv4(OTHER_IP4))) == "IPv4 source"
    assert judge(ipv4_only, ether(0x0800, ipv4(IP4))) is None


def test_the_link_local_address_is_the_macs_eui64() -> None:
    assert link_local(OURS) == bytes.fromhex("fe80000000000000 02163efffe000001")


@pytest.mark.parametrize(
    ("mac", "ip", "named"),
    [
        ("", None, "mac ''"),
        ("00:16:3e:00:01", None, "mac"),
        ("zz:16:3e:00:00:01", None, "mac"),
        (MAC, "10.0.0.256", "ip"),
    ],
)
def test_bad_backend_keys_are_refused_naming_the_key(mac: str, ip: str | None, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        SourceFilter.from_backend(mac, ip)

"""A vif's source check: the addresses a domain may send from (Xen's antispoof rules, in netback).

Xen's vif scripts (tools/hotplug/Linux/vif-common.sh, ``handle_iptable``) read ``ip`` from the
vif's backend dir and let through the bridge only IPv4 packets from those addresses. netback
here does the same, and more, on the private copy of every transmitted frame's head
(datapath.TxPath), before the frame reaches the TAP:

- always: the Ethernet source must be the vif's ``mac`` (the backend dir's; the frontend's own
  dir is the guest's to rewrite, so it is never asked);
- with an ``ip``, the vif is a host with that address, so only what such a host sends passes:
  IPv4 from that address; ARP (requests and replies alike) whose sender is that MAC and that
  address; IPv6 from that address, from the vif's link-local address (fe80::/64 with the MAC's
  EUI-64, the one a domU's kernel makes), or from ``::`` (duplicate-address detection), whose
  Neighbor Advertisements name only those addresses and whose neighbour-discovery link-layer
  options name only that MAC, and which carries no Router Advertisement or Redirect (a host is
  not a router on the bridge: RFC 6105's RA guard). One 802.1Q tag is looked through, as
  l4_layout does; any other EtherType, or a frame too short to show what it claims, is dropped.
  A vif has one address (hyper configures it statically), so no DHCP exception: Xen lets UDP
  68 -> 67 through for DHCP, hyper runs no DHCP client in a domain;
- without an ``ip``, any address goes (Xen: "no IP addresses have been specified, so allow
  anything"); that is how a domain that routes for others must be configured.

A frame that fails is dropped and counted (``tx_spoofed``) and the frontend is answered
NETIF_RSP_OKAY: with Xen the filter sits on the bridge, after netback has answered, so the guest
sees what it would see on a wire whose switch drops its frame.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
_ETH_P_IP = b"\x08\x00"
_ETH_P_ARP = b"\x08\x06"
_ETH_P_IPV6 = b"\x86\xdd"
_ETH_P_8021Q = b"\x81\x00"
_ARP_ETHER_IPV4 = bytes.fromhex("0001 0800 06 04")  # htype Ethernet, ptype IPv4, hlen, plen
_UNSPECIFIED = bytes(16)
_IPV6_EXTENSIONS = {0, 43, 60}  # hop-by-hop, routing, destination options: (len + 1) * 8 bytes
_IPPROTO_ICMPV6 = 58
_ND_ROUTER_ADVERT, _ND_NEIGHBOUR_SOLICIT, _ND_NEIGHBOUR_ADVERT, _ND_REDIRECT = 134, 135, 136, 137
_ND_LINK_LAYER_OPTIONS = {1, 2}  # source and target link-layer address


def parse_mac(text: str) -> bytes:
    """A MAC such as "00:16:3e:12:34:56" as 6 bytes (ValueError otherwise)."""
    if not _MAC.fullmatch(text):
        raise ValueError(f"mac {text!r} is not six hex octets")
    return bytes.fromhex(text.replace(":", ""))


def link_local(mac: bytes) -> bytes:
    """fe80::/64 with the modified EUI-64 of ``mac`` (RFC 4291 appendix A), as Linux makes it
    for an interface whose addr_gen_mode is eui64 (a new network namespace's default)."""
    eui = bytes((mac[0] ^ 0x02, mac[1], mac[2], 0xFF, 0xFE, mac[3], mac[4], mac[5]))
    return bytes.fromhex("fe80000000000000") + eui


@dataclass(frozen=True, slots=True)
class SourceFilter:
    """What a vif may send from: its MAC and, when it has an ``ip``, its addresses."""

    mac: bytes
    ipv4: bytes | None = None  # its IPv4 address, if that is its ip
    ipv6: tuple[bytes, ...] = ()  # with an ip: its IPv6 one if that is it, and its link-local

    @classmethod
    def from_backend(cls, mac: str, ip: str | None) -> SourceFilter:
        """From the backend dir's ``mac`` and ``ip`` (an address, or an interface such as
        "10.0.0.2/24", whose address alone is allowed); ValueError names the bad key."""
        ours = parse_mac(mac)
        if not ip:
            return cls(ours)
        try:
            address = ipaddress.ip_interface(ip).ip
        except ValueError as exc:
            raise ValueError(f"ip {ip!r}: {exc}") from exc
        if address.version == 4:
            return cls(ours, address.packed, (link_local(ours),))
        return cls(ours, None, (address.packed, link_local(ours)))

    def refusal(self, head: bytes) -> str | None:
        """Why the frame whose first bytes are ``head`` may not go, or None if it may."""
        if head[6:12] != self.mac:
            return "source MAC"
        if not self.ipv6:
            return None  # no ip: any address
        offset, ethertype = 14, head[12:14]
        if ethertype == _ETH_P_8021Q:
            offset, ethertype = 18, head[16:18]
        if ethertype == _ETH_P_IP:
            return self._ipv4(head, offset)
        if ethertype == _ETH_P_ARP:
            return self._arp(head, offset)
        if ethertype == _ETH_P_IPV6:
            return self._ipv6(head, offset)
        return f"EtherType {ethertype.hex()}"

    def _ipv4(self, head: bytes, offset: int) -> str | None:
        if len(head) < offset + 20 or head[offset] >> 4 != 4:
            return "not an IPv4 header"
        return None if head[offset + 12 : offset + 16] == self.ipv4 else "IPv4 source"

    def _arp(self, head: bytes, offset: int) -> str | None:
        if head[offset : offset + 6] != _ARP_ETHER_IPV4:
            return "not an Ethernet/IPv4 ARP"
        if head[offset + 8 : offset + 14] != self.mac:
            return "ARP sender MAC"
        return None if head[offset + 14 : offset + 18] == self.ipv4 else "ARP sender address"

    def _ipv6(self, head: bytes, offset: int) -> str | None:
        if len(head) < offset + 40 or head[offset] >> 4 != 6:
            return "not an IPv6 header"
        if head[offset + 8 : offset + 24] not in (*self.ipv6, _UNSPECIFIED):
            return "IPv6 source"
        end = offset + 40 + int.from_bytes(head[offset + 4 : offset + 6])  # payload length
        # A fragment header ends the walk: receivers ignore neighbour discovery in a fragment
        # (RFC 6980), and what else a fragment carries is no address claim.
        following, pos = head[offset + 6], offset + 40
        while following in _IPV6_EXTENSIONS and pos + 2 <= len(head):
            following, pos = head[pos], pos + (head[pos + 1] + 1) * 8
        if following in _IPV6_EXTENSIONS:
            return "IPv6 extension headers past the copied head"
        if following == _IPPROTO_ICMPV6:
            return self._neighbour_discovery(head, pos, end)
        return None

    def _neighbour_discovery(self, head: bytes, pos: int, end: int) -> str | None:
        """IPv6's ARP: what a Neighbor Advertisement claims, and every link-layer option."""
        if pos >= len(head):
            return "ICMPv6 past the copied head"
        kind = head[pos]
        if kind in (_ND_ROUTER_ADVERT, _ND_REDIRECT):
            return "router message"
        if kind not in (_ND_NEIGHBOUR_SOLICIT, _ND_NEIGHBOUR_ADVERT):
            return None
        if end > len(head):
            return "neighbour discovery past the copied head"
        if kind == _ND_NEIGHBOUR_ADVERT and head[pos + 8 : pos + 24] not in self.ipv6:
            return "Neighbor Advertisement target"
        option = pos + 24  # the options follow the 24-byte message, up to the payload's end
        while option < end:
            size = head[option + 1] * 8 if option + 1 < end else 0
            if size == 0:
                return "malformed neighbour discovery option"
            if head[option] in _ND_LINK_LAYER_OPTIONS and head[option + 2 : option + 8] != self.mac:
                return "neighbour discovery link-layer address"
            option += size
        return None

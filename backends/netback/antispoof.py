"""A vif's source check: the addresses a domain may send from (Xen's antispoof rules, in netback).

Xen's vif scripts (tools/hotplug/Linux/vif-common.sh, ``handle_iptable``) read ``ip`` from the
vif's backend dir and let through the bridge only IPv4 packets from those addresses. netback
here does the same, and more, on the private copy of every transmitted frame's head
(datapath.TxPath), before the frame reaches the TAP:

- always: the Ethernet source must be the vif's ``mac`` (the backend dir's; the frontend's own
  dir is the guest's to rewrite, so it is never asked), and the frame carries no VLAN tag
  (802.1Q or 802.1ad): hyper's vif config has no VLAN, so a vif is an untagged port of its
  bridge's LAN, and a tag would reach whatever VLAN the host has on that bridge (a VLAN
  sub-interface, a trunk uplink of a bridge hyper found, a VLAN-filtering bridge's other
  VLANs). Xen lets tags through a vif without an ``ip``; hyper does not, since "any address"
  is about the addresses on the vif's LAN, not about reaching other LANs;
- with an ``ip``, the vif is a host with that address, so only what such a host sends passes:
  IPv4 from that address; ARP (requests and replies alike) whose sender is that MAC and that
  address; IPv6 from that address or from the vif's link-local address (fe80::/64 with the
  MAC's EUI-64, the one a domU's kernel makes), whose Neighbor Advertisements name only those
  addresses and whose neighbour-discovery link-layer options name only that MAC, and which
  carries no Router Advertisement or Redirect (a host is not a router on the bridge: RFC 6105's
  RA guard); from ``::`` only what a host sends before it has an address, duplicate-address
  detection of those addresses and MLD reports. Any other EtherType, or a frame too short to
  show what it claims, is dropped. A vif has one address (hyper configures it statically), so
  no DHCP exception: Xen lets UDP 68 -> 67 through for DHCP, hyper runs no DHCP client in a
  domain;
- without an ``ip``, any address goes (Xen: "no IP addresses have been specified, so allow
  anything"); that is how a domain that routes for others must be configured.

The check reads the headers where ``channels.netif.frame_layout`` found them: netback parses
each frame once, for this check and for the virtio-net header. A frame that fails is dropped and
counted (``tx_spoofed``) and the frontend is answered NETIF_RSP_OKAY: with Xen the filter sits
on the bridge, after netback has answered, so the guest sees what it would see on a wire whose
switch drops its frame.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from channels.netif import ETH_HLEN, NO_L4, Layout

_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
_ETH_P_IP, _ETH_P_ARP, _ETH_P_IPV6 = 0x0800, 0x0806, 0x86DD
_VLAN_TAGS = {0x8100, 0x88A8}  # 802.1Q and 802.1ad: what Linux's eth_type_vlan calls a tag
_ARP_ETHER_IPV4 = bytes.fromhex("0001 0800 06 04")  # htype Ethernet, ptype IPv4, hlen, plen
_UNSPECIFIED = bytes(16)
_IPV6_EXTENSIONS = {0, 43, 60}  # hop-by-hop, routing, destination options: (len + 1) * 8 bytes
_IPPROTO_ICMPV6 = 58
_ND_ROUTER_ADVERT, _ND_NEIGHBOUR_SOLICIT, _ND_NEIGHBOUR_ADVERT, _ND_REDIRECT = 134, 135, 136, 137
_ND_LINK_LAYER_OPTIONS = {1, 2}  # source and target link-layer address
#: What a host sends from ``::``, before it has an address: duplicate-address detection's
#: Neighbor Solicitation (RFC 4862), and MLD reports (RFC 3810 5.2.13; Linux's igmp6_send and
#: mld_newpack use ``::`` while no link-local address is ready: v1 report and done, v2 report).
_FROM_UNSPECIFIED = {_ND_NEIGHBOUR_SOLICIT, 131, 132, 143}
# Where the fields checked lie in an untagged frame (a tagged one is refused before any is read):
# the L3 header starts at byte 14.
_SOURCE_MAC = slice(6, 12)
_IPV4_SOURCE = slice(26, 30)
_ARP_FORMAT, _ARP_SENDER_MAC, _ARP_SENDER_IP = slice(14, 20), slice(22, 28), slice(28, 32)
_IPV6_PAYLOAD_LENGTH, _IPV6_SOURCE, _IPV6_PAYLOAD = slice(18, 20), slice(22, 38), 54


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
    any_address: bool = True  # no ip: any address goes (Xen: "allow anything")
    ipv4: bytes | None = None  # its IPv4 address, if that is its ip
    ipv6: tuple[bytes, ...] = ()  # its IPv6 addresses: its ip if that is one, its link-local

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
            return cls(ours, False, address.packed, (link_local(ours),))
        return cls(ours, False, None, (address.packed, link_local(ours)))

    def refusal(self, head: bytes, layout: Layout) -> str | None:
        """Why the frame whose first bytes are ``head``, laid out as ``layout`` (frame_layout's
        parse of ``head``), may not go; None if it may."""
        if head[_SOURCE_MAC] != self.mac:
            return "source MAC"
        ethertype, l3, proto, _ = layout
        # No VLAN tag, with or without an ip (the module's docstring says why).
        if l3 != ETH_HLEN or ethertype in _VLAN_TAGS:
            return "VLAN tag"
        if self.any_address:
            return None
        if ethertype == _ETH_P_IP:
            if proto == NO_L4:
                return "not an IPv4 header"
            return None if head[_IPV4_SOURCE] == self.ipv4 else "IPv4 source"
        if ethertype == _ETH_P_IPV6:
            return self._ipv6(head, layout)
        if ethertype == _ETH_P_ARP:
            return self._arp(head)
        return f"EtherType {ethertype:04x}"

    def _arp(self, head: bytes) -> str | None:
        if head[_ARP_FORMAT] != _ARP_ETHER_IPV4:
            return "not an Ethernet/IPv4 ARP"
        if head[_ARP_SENDER_MAC] != self.mac:
            return "ARP sender MAC"
        return None if head[_ARP_SENDER_IP] == self.ipv4 else "ARP sender address"

    def _ipv6(self, head: bytes, layout: Layout) -> str | None:
        _, _, following, pos = layout
        if following == NO_L4:
            return "not an IPv6 header"
        source = head[_IPV6_SOURCE]
        unspecified = source == _UNSPECIFIED
        if not unspecified and source not in self.ipv6:
            return "IPv6 source"
        # A fragment header ends the walk: receivers ignore neighbour discovery in a fragment
        # (RFC 6980), and what else a fragment carries is no address claim.
        while following in _IPV6_EXTENSIONS and pos + 2 <= len(head):
            following, pos = head[pos], pos + (head[pos + 1] + 1) * 8
        if following in _IPV6_EXTENSIONS:
            return "IPv6 extension headers past the copied head"
        if following != _IPPROTO_ICMPV6:
            return "unspecified IPv6 source" if unspecified else None
        if pos >= len(head):
            return "ICMPv6 past the copied head"
        if unspecified and head[pos] not in _FROM_UNSPECIFIED:
            return "unspecified IPv6 source"
        return self._neighbour_discovery(head, pos, unspecified)

    def _neighbour_discovery(self, head: bytes, pos: int, dad: bool) -> str | None:
        """IPv6's ARP: what a Neighbor Advertisement, or a solicitation from ``::`` (``dad``),
        claims, and every link-layer option."""
        kind = head[pos]
        if kind in (_ND_ROUTER_ADVERT, _ND_REDIRECT):
            return "router message"
        if kind not in (_ND_NEIGHBOUR_SOLICIT, _ND_NEIGHBOUR_ADVERT):
            return None
        end = _IPV6_PAYLOAD + int.from_bytes(head[_IPV6_PAYLOAD_LENGTH])
        if end > len(head):
            return "neighbour discovery past the copied head"
        target = head[pos + 8 : pos + 24]
        if kind == _ND_NEIGHBOUR_ADVERT and target not in self.ipv6:
            return "Neighbor Advertisement target"
        # A host doing duplicate-address detection for an address gives it up when it sees
        # another's solicitation for it from ``::`` (RFC 4862 5.4.3): only for its own addresses.
        if dad and target not in self.ipv6:
            return "duplicate-address detection of another address"
        option = pos + 24  # the options follow the 24-byte message, up to the payload's end
        while option < end:
            size = head[option + 1] * 8 if option + 1 < end else 0
            if size == 0:
                return "malformed neighbour discovery option"
            if head[option] in _ND_LINK_LAYER_OPTIONS and head[option + 2 : option + 8] != self.mac:
                return "neighbour discovery link-layer address"
            option += size
        return None

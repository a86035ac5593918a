"""The headers both netif ends read from a frame (channels/netif.py): ``frame_layout``, parsed
once per frame, and the virtio-net header's checksum offsets made from it."""

from __future__ import annotations

import struct

import pytest

from channels import netif as N
from tests.unit.test_netback_antispoof import (
    HOP_BY_HOP_ROUTER_ALERT,
    IP4,
    IP6,
    arp,
    ether,
    ipv4,
    ipv6,
    tagged,
)

TCP = bytes.fromhex("1f90 0050 00000000 00000000 8018 ffff 0000 0000") + bytes(12)  # 32 bytes
UDP = bytes(8)


def with_protocol(header: bytes, protocol: int) -> bytes:
    """An IPv4 header (from ``ipv4``) carrying ``protocol`` instead of UDP."""
    return header[:9] + bytes([protocol]) + header[10:]


LAYOUTS = {  # frame: (EtherType, L3 offset, protocol, L4 offset)
    "IPv4 TCP": (ether(0x0800, with_protocol(ipv4(IP4, TCP), 6)), (0x0800, 14, 6, 34)),
    "IPv4 with options": (
        ether(0x0800, b"\x46" + ipv4(IP4)[1:20] + bytes(4) + UDP),
        (0x0800, 14, 17, 38),
    ),
    "IPv4 UDP in a tag": (tagged(0x0800, ipv4(IP4, UDP)), (0x0800, 18, 17, 38)),
    "IPv6 TCP": (ether(0x86DD, ipv6(IP6, 6, TCP)), (0x86DD, 14, 6, 54)),
    "IPv6 behind a hop-by-hop header": (
        ether(0x86DD, ipv6(IP6, 0, HOP_BY_HOP_ROUTER_ALERT + bytes(8))),
        (0x86DD, 14, 0, 54),
    ),
    "ARP": (ether(0x0806, arp(1, bytes(6), IP4)), (0x0806, 14, N.NO_L4, 0)),
    "IPv4 cut short": (ether(0x0800, ipv4(IP4)[:19]), (0x0800, 14, N.NO_L4, 0)),
    "IPv4 with an IHL under 5": (ether(0x0800, b"\x44" + ipv4(IP4)[1:]), (0x0800, 14, N.NO_L4, 0)),
    "version 6 under the IPv4 EtherType": (
        ether(0x0800, b"\x65" + ipv4(IP4)[1:]),
        (0x0800, 14, N.NO_L4, 0),
    ),
    "IPv6 cut short": (ether(0x86DD, ipv6(IP6, 6, b"")[:39]), (0x86DD, 14, N.NO_L4, 0)),
    "a tag cut short": (ether(0x8100, b"\x00"), (0x8100, 14, N.NO_L4, 0)),
    "an IPv4 EtherType and nothing after it": (ether(0x0800, b""), (0x0800, 14, N.NO_L4, 0)),
    "an IPv6 EtherType in a tag and nothing after it": (
        tagged(0x86DD, b""),
        (0x86DD, 18, N.NO_L4, 0),
    ),
}


@pytest.mark.parametrize("case", sorted(LAYOUTS))
def test_frame_layout_finds_each_header(case: str) -> None:
    frame, layout = LAYOUTS[case]
    assert N.frame_layout(frame) == layout


CHECKSUMS = {  # frame: (csum_start, csum_offset, hdr_len) of its virtio-net header
    "IPv4 TCP": (34, 16, 34 + 32),
    "IPv4 with options": (38, 6, 46),
    "IPv4 UDP in a tag": (38, 6, 46),
    "IPv6 TCP": (54, 16, 54 + 32),
}


@pytest.mark.parametrize("case", sorted(LAYOUTS))
def test_the_vnet_header_points_at_the_l4_checksum_or_offloads_nothing(case: str) -> None:
    frame, _ = LAYOUTS[case]
    blank = N.Offload(csum_blank=True)
    header = N.vnet_from_offload(blank, frame)
    assert header == N.vnet_from_offload(blank, frame, N.frame_layout(frame))
    flags, gso, hdr_len, gso_size, start, offset = N.VNET_HDR.unpack(header)
    if case in CHECKSUMS:
        assert (flags, gso, gso_size) == (N.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0)
        assert (start, offset, hdr_len) == CHECKSUMS[case]
    else:
        assert header == bytes(N.VNET_HDR.size), "a frame netif cannot parse: no offload"


def test_a_gso_frame_carries_its_size_and_a_plain_one_only_its_validation() -> None:
    frame = LAYOUTS["IPv6 TCP"][0]
    gso = N.Offload(csum_blank=True, gso_type=N.XEN_NETIF_GSO_TYPE_TCPV6, gso_size=1440)
    assert N.VNET_HDR.unpack(N.vnet_from_offload(gso, frame)) == (
        N.VIRTIO_NET_HDR_F_NEEDS_CSUM,
        N.VIRTIO_NET_HDR_GSO_TCPV6,
        54 + 32,
        1440,
        54,
        16,
    )
    validated = N.vnet_from_offload(N.Offload(data_validated=True), frame)
    assert validated == struct.pack("<BBHHHH", N.VIRTIO_NET_HDR_F_DATA_VALID, 0, 0, 0, 0, 0)
    assert N.vnet_from_offload(N.Offload(), frame) == bytes(N.VNET_HDR.size)

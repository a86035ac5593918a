"""netif: the network split-driver protocol (Xen's io/netif.h), declared once for both sides.

Rings (one page each, x86_64 layouts)::

    tx request  12  gref u32, offset u16, flags u16, id u16, size u16     front -> back
    tx response  4  id u16, status s16                                   (slot 12)
    rx request   8  id u16, pad u16, gref u32                            front posts empty pages
    rx response  8  id u16, offset u16, flags u16, status s16            status = bytes, < 0 error
    extra info   8  type u8, flags u8, 6 bytes of union (on tx padded to 12)

A transmitted packet is one first slot whose ``size`` is the *total* length, optional extra
slots (``extra_info`` flag; GSO: MSS and TCPv4/TCPv6), then fragment slots chained by
``more_data``; every slot's ``offset + size`` stays inside its 4 KiB page, and the first slot's
own length is the total minus the other fragments. A received packet fills posted pages the same
way: each rx response's ``status`` is that slot's byte count, ``more_data`` chains, and a GSO
extra overlays the response slot right after the first. Responses keep the slot of the request
they answer (Linux netfront ignores rx response ids).

Store keys. Backend dir (written at probe): ``feature-sg``, ``feature-gso-tcpv4``,
``feature-gso-tcpv6``, ``feature-rx-copy``, plus what the toolstack wrote (``mac``, ``bridge``,
``mtu``, ``rate`` as "bytes,usec", ``handle``, and ``ip``, the address alone, when the vif has
one: the backend's ``mac`` and ``ip`` are what the vif's frames may come from). Frontend dir:
the toolstack writes ``mac``, ``mtu``, ``ip``, ``gateway``; the frontend writes
``tx-ring-ref``, ``rx-ring-ref``, ``event-channel-tx``, ``event-channel-rx``,
``request-rx-copy``, ``feature-rx-notify``, ``feature-sg``, ``feature-gso-tcpv4``/``-tcpv6``
in one transaction before it connects.

Multi-queue, as Xen's netback and netfront negotiate it: the backend offers
``multi-queue-max-queues``; the frontend answers ``multi-queue-num-queues`` (at most that, and
no more than its vcpus) and, for more than one queue, writes each queue's ring refs and event
channels under ``queue-<n>/`` instead of at the top (``queue_path``). Each queue is a pair of
rings with their own channels and pages; the features are the vif's. A frontend that asks for
more queues than offered, or none, is refused (Linux: "guest requested %u queues, exceeding
the maximum of %u").

Handshake (Linux order, unlike blkif)::

    backend  Initialising --probe--> InitWait
    frontend (sees InitWait) publishes rings, event channel, features --> Connected
    backend  (sees Connected) maps rings, binds, starts the data path --> Connected
    teardown: Closing, then Closed, on both sides

Both ends here are TAP devices with ``IFF_VNET_HDR``: each frame comes with a virtio_net_hdr
(``VnetHeader``) whose checksum and GSO fields map onto the netif flags and GSO extra.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from channels.errors import BadInput
from channels.ring import declare_ring

# -- rings ------------------------------------------------------------------------------------

TX_RING = declare_ring("netif-tx", "<IHHHH", "<Hh")
RX_RING = declare_ring("netif-rx", "<HxxI", "<HHHh")
EXTRA = struct.Struct("<BBHBxH")  # type, flags, gso.size, gso.type, pad, gso.features
EXTRA_TX_SLOT = struct.Struct("<BBHBxHxxxx")  # an extra overlaid on a 12-byte tx slot

NETIF_RSP_DROPPED = -2
NETIF_RSP_ERROR = -1
NETIF_RSP_OKAY = 0
NETIF_RSP_NULL = 1  # the response slot of an extra-info request

# tx request flags
NETTXF_csum_blank = 1 << 0
NETTXF_data_validated = 1 << 1
NETTXF_more_data = 1 << 2
NETTXF_extra_info = 1 << 3
# rx response flags (bits 0 and 1 are swapped relative to tx, as in Xen)
NETRXF_data_validated = 1 << 0
NETRXF_csum_blank = 1 << 1
NETRXF_more_data = 1 << 2
NETRXF_extra_info = 1 << 3

XEN_NETIF_EXTRA_TYPE_NONE = 0
XEN_NETIF_EXTRA_TYPE_GSO = 1
XEN_NETIF_EXTRA_TYPE_MCAST_ADD = 2
XEN_NETIF_EXTRA_TYPE_MCAST_DEL = 3
XEN_NETIF_EXTRA_TYPE_HASH = 4
XEN_NETIF_EXTRA_TYPE_MAX = 5
XEN_NETIF_EXTRA_FLAG_MORE = 1 << 0

XEN_NETIF_GSO_TYPE_NONE = 0
XEN_NETIF_GSO_TYPE_TCPV4 = 1
XEN_NETIF_GSO_TYPE_TCPV6 = 2

XEN_NETIF_MAX_TX_SIZE = 0xFFFF
XEN_NETIF_NR_SLOTS_MIN = 18
ETH_HLEN = 14
PAGE_SIZE = 4096

#: The most granted pages one netif connection can have in use at once, so the most a backend
#: maps for one vif (channels/grants.py): the tx and rx ring pages, and one page per slot of
#: each ring (a tx slot names one page of a packet, an rx slot posts one buffer):
#: 2 + 256 + 256 = 514 pages. netfront grants exactly these.
MAX_GRANT_PAGES = 2 + TX_RING.nr_ents(PAGE_SIZE) + RX_RING.nr_ents(PAGE_SIZE)
#: The most queues a vif has (Linux netfront's default cap, xennet_max_queues); each queue
#: can use MAX_GRANT_PAGES.
MAX_QUEUES = 8


def queue_path(queue: int, queues: int, key: str) -> str:
    """Where a frontend writes queue ``queue``'s ``key`` (``tx-ring-ref``, ...) when it has
    ``queues`` queues: at the top for one queue, else under ``queue-<queue>/``."""
    return key if queues == 1 else f"queue-{queue}/{key}"


@dataclass(frozen=True, slots=True)
class Extra:
    type: int
    flags: int
    gso_size: int = 0
    gso_type: int = 0

    @classmethod
    def unpack(cls, data: bytes) -> Extra:
        type_, flags, size, gso_type, _features = EXTRA.unpack_from(data)
        return cls(type_, flags, size, gso_type)

    @classmethod
    def from_tx_slot(cls, slot: tuple[int, ...]) -> Extra:
        """An extra from a tx slot already unpacked as a request: (gref, offset, ...) hold
        type | flags << 8 | gso.size << 16, and gso.type | pad << 8."""
        word, low = slot[0], slot[1]
        return cls(word & 0xFF, (word >> 8) & 0xFF, word >> 16, low & 0xFF)

    @classmethod
    def from_rx_slot(cls, slot: tuple[int, ...]) -> Extra:
        """An extra from an rx slot already unpacked as a response: (id, offset, flags, ...)
        hold type | flags << 8, gso.size, and gso.type | pad << 8."""
        return cls(slot[0] & 0xFF, slot[0] >> 8, slot[1], slot[2] & 0xFF)

    def pack_tx(self) -> bytes:
        return EXTRA_TX_SLOT.pack(self.type, self.flags, self.gso_size, self.gso_type, 0)

    def pack_rx(self) -> bytes:
        return EXTRA.pack(self.type, self.flags, self.gso_size, self.gso_type, 0)


# -- the TAP side: virtio_net_hdr ---------------------------------------------------------------

VNET_HDR = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_ECN = 0x80

_GSO_TO_NETIF = {
    VIRTIO_NET_HDR_GSO_TCPV4: XEN_NETIF_GSO_TYPE_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6: XEN_NETIF_GSO_TYPE_TCPV6,
}
_NETIF_TO_GSO = {v: k for k, v in _GSO_TO_NETIF.items()}


@dataclass(frozen=True, slots=True)
class Offload:
    """What the netif flags and GSO extra say about one packet, side-independent."""

    csum_blank: bool = False  # the L4 checksum is not filled in yet
    data_validated: bool = False  # the checksum was verified already
    gso_type: int = XEN_NETIF_GSO_TYPE_NONE
    gso_size: int = 0


class UnsupportedOffload(BadInput, ValueError):
    """A TAP gave a frame whose offload netif cannot carry (UDP GSO, for one)."""


def offload_from_vnet(header: bytes | bytearray) -> Offload:
    flags, gso_type, _hdr_len, gso_size, _start, _off = VNET_HDR.unpack_from(header)
    base = gso_type & ~VIRTIO_NET_HDR_GSO_ECN
    if base != VIRTIO_NET_HDR_GSO_NONE and base not in _GSO_TO_NETIF:
        raise UnsupportedOffload(f"virtio GSO type {gso_type}")
    return Offload(
        csum_blank=bool(flags & VIRTIO_NET_HDR_F_NEEDS_CSUM),
        data_validated=bool(flags & (VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID)),
        gso_type=_GSO_TO_NETIF.get(base, XEN_NETIF_GSO_TYPE_NONE),
        gso_size=gso_size if base != VIRTIO_NET_HDR_GSO_NONE else 0,
    )


_ETH_P_IP = 0x0800
_ETH_P_IPV6 = 0x86DD
_ETH_P_8021Q = 0x8100
_IPPROTO_TCP = 6
_IPPROTO_UDP = 17

#: Where a frame's headers lie, as ``frame_layout`` finds them: (EtherType, L3 offset, protocol,
#: L4 offset). A plain tuple: it is made for every frame netback transmits.
Layout = tuple[int, int, int, int]
NO_L4 = -1  # the protocol of a frame without a whole IPv4 or IPv6 header


def frame_layout(frame: bytes) -> Layout:
    """Parse a frame's Ethernet, VLAN and IP headers once, for every reader (netback's source
    check, the virtio-net header). ``frame`` holds at least an Ethernet header.

    The EtherType is the one after at most one 802.1Q tag (the L3 offset is then 18, not 14). For
    a whole IPv4 header (version 4, IHL 5 or more) the protocol and L4 offset are its own; for a
    whole IPv6 header, its next header and the offset after it (extension headers are not
    followed). Anything else has protocol NO_L4 and L4 offset 0."""
    ethertype = frame[12] << 8 | frame[13]
    l3 = ETH_HLEN
    if ethertype == _ETH_P_8021Q and len(frame) >= 18:
        ethertype, l3 = frame[16] << 8 | frame[17], 18
    if ethertype == _ETH_P_IP:
        if len(frame) >= l3 + 20 and 0x45 <= frame[l3] <= 0x4F:  # version 4, IHL 5..15
            return ethertype, l3, frame[l3 + 9], l3 + (frame[l3] & 0x0F) * 4
    elif ethertype == _ETH_P_IPV6 and len(frame) >= l3 + 40 and frame[l3] >> 4 == 6:
        return ethertype, l3, frame[l3 + 6], l3 + 40
    return ethertype, l3, NO_L4, 0


_VNET_PLAIN = VNET_HDR.pack(0, 0, 0, 0, 0, 0)
_VNET_DATA_VALID = VNET_HDR.pack(VIRTIO_NET_HDR_F_DATA_VALID, 0, 0, 0, 0, 0)


def vnet_from_offload(offload: Offload, frame_head: bytes, layout: Layout | None = None) -> bytes:
    """The virtio_net_hdr for a frame, given its first bytes (headers) for the checksum offsets,
    and their ``layout`` when the caller has it already (netback, from its source check).

    netif carries no checksum offsets: like Linux netback's skb_checksum_setup we find the L4
    header ourselves. A frame we cannot parse goes out without offload flags (the receiver then
    checks or drops it, as it would any frame with a bad checksum)."""
    if not offload.csum_blank and offload.gso_type == XEN_NETIF_GSO_TYPE_NONE:
        return _VNET_DATA_VALID if offload.data_validated else _VNET_PLAIN
    l4 = l4_layout(frame_head, layout or frame_layout(frame_head))
    if l4 is None:
        return _VNET_PLAIN
    l4_start, csum_offset, header_len = l4
    gso = _NETIF_TO_GSO.get(offload.gso_type, VIRTIO_NET_HDR_GSO_NONE)
    return VNET_HDR.pack(
        VIRTIO_NET_HDR_F_NEEDS_CSUM,
        gso,
        header_len,
        offload.gso_size if gso else 0,
        l4_start,
        csum_offset,
    )


def l4_layout(frame: bytes, layout: Layout) -> tuple[int, int, int] | None:
    """(L4 header offset, checksum field offset within it, total header length) of a TCP or
    UDP frame whose headers lie as ``layout`` says, or None if it is not one."""
    _, _, proto, l4 = layout
    if proto == _IPPROTO_TCP and l4 + 12 < len(frame):
        return l4, 16, l4 + max((frame[l4 + 12] >> 4) * 4, 20)  # data offset: the header's size
    if proto == _IPPROTO_UDP:
        return l4, 6, l4 + 8
    return None

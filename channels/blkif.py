"""blkif: the block split-driver protocol (Xen's io/blkif.h), declared once for both sides.

Ring (one page, or 2**order pages up to ``BLKIF_MAX_RING_PAGE_ORDER``; x86_64 layouts,
little-endian; 112-byte slots, so 32 entries per page and 512 in 16 pages)::

    blkif_request            112  operation u8 @0, nr_segments u8 @1, handle u16 @2, pad u32 @4,
                                  id u64 @8, sector_number u64 @16, seg[11] @24 (8 bytes each)
    blkif_request_segment      8  gref u32 @0, first_sect u8 @4, last_sect u8 @5, pad u16 @6
    blkif_request_discard   (slot) operation u8 @0, flag u8 @1, handle u16 @2, pad u32 @4,
                                  id u64 @8, sector_number u64 @16, nr_sectors u64 @24
    blkif_request_indirect  (slot) operation u8 @0 (=6), indirect_op u8 @1, nr_segments u16 @2,
                                  pad u32 @4, id u64 @8, sector_number u64 @16, handle u16 @24,
                                  pad u16 @26, indirect_grefs[8] u32 @28 (Xen's struct is 64 bytes)
    blkif_response            16  id u64 @0, operation u8 @8, pad u8 @9, status s16 @10, pad @12

``id`` sits at offset 8 in every request layout; the backend echoes it (and the operation; for
INDIRECT, like Linux, the ``indirect_op``) in the response that reuses the request's slot.
``status`` is BLKIF_RSP_OKAY, BLKIF_RSP_ERROR or BLKIF_RSP_EOPNOTSUPP.

Units. ``sector_number``, ``nr_sectors``, ``first_sect`` and ``last_sect`` are always 512-byte
sectors, whatever ``sector-size`` says. A segment covers bytes ``first_sect * 512`` to
``(last_sect + 1) * 512 - 1`` of its granted 4 KiB page, so ``0 <= first_sect <= last_sect <= 7``.
A classic request carries at most 11 segments (44 KiB). An INDIRECT request carries up to
``feature-max-indirect-segments`` segment descriptors (8 bytes, 512 per page) in up to 8 granted
indirect pages named by ``indirect_grefs``; only READ and WRITE may be indirect.

Operations: READ 0, WRITE 1, WRITE_BARRIER 2 (``feature-barrier``, not offered here),
FLUSH_DISKCACHE 3 (``feature-flush-cache``; may carry 0 segments), RESERVED_1 4, DISCARD 5
(``feature-discard``; ``BLKIF_DISCARD_SECURE`` in ``flag`` only with ``discard-secure``),
INDIRECT 6 (``feature-max-indirect-segments``). Any operation may be answered
BLKIF_RSP_EOPNOTSUPP.

Store keys (decimal strings unless noted; devid is the ``virtual-device`` number)::

    backend  /local/domain/0/backend/vbd/<domid>/<devid>/
      toolstack:        params (image path), mode ("r" | "w"), frontend, frontend-id, online,
                        params-owner (hyper's: the uid besides root that the image and its
                        directories may belong to, the user who asked for the disk; absent: 0)
      before InitWait:  feature-max-indirect-segments, max-ring-page-order
      at connect (one transaction, then Connected):
                        sectors (512-byte units), sector-size, physical-sector-size,
                        info (VDISK_CDROM | VDISK_REMOVABLE | VDISK_READONLY bits),
                        feature-flush-cache, feature-discard, discard-granularity and
                        discard-alignment (bytes), feature-persistent
    frontend /local/domain/<domid>/device/vbd/<devid>/
      toolstack:        virtual-device (xen-vbd-interface(7) number), backend, backend-id
      before Initialised (one transaction):
                        ring-ref (one page, no ring-page-order)
                          or ring-page-order + ring-ref0 .. ring-ref<2**order - 1>,
                        event-channel, protocol ("x86_64-abi"), feature-persistent

Defaults when a key is absent: ``protocol`` is x86_64-abi (any other ABI is a fatal error),
no ``ring-page-order`` means one page at ``ring-ref``, features are off, ``sector-size`` is 512,
``physical-sector-size`` is ``sector-size``, ``info`` is 0. One queue only: no
``multi-queue-*`` keys are published or read.

Handshake (blkif.h order, unlike netif)::

    backend  Initialising --opens the device, publishes limits--> InitWait
    frontend (sees InitWait) reads limits, grants the ring pages, allocates the event channel,
             writes ring-ref*, event-channel, protocol, feature-persistent --> Initialised
    backend  (sees Initialised or Connected) checks protocol and ring-page-order <= its max,
             maps the ring, binds the event channel, publishes the device properties --> Connected
    frontend (sees Connected) reads sectors, sector-size, info, features --> Connected
    teardown: Closing, then Closed, on both sides; a frontend that returns to Initialising
    after Closed sends the backend back to InitWait (reconnect)

Request checks blkback makes, on its private copy of each request (the frontend may be buggy or
malicious; a failed check answers that request BLKIF_RSP_ERROR and processing continues)::

    * operation known, else BLKIF_RSP_EOPNOTSUPP (WRITE_BARRIER too, since it is not offered);
      a DISCARD with BLKIF_DISCARD_SECURE (discard-secure is never offered) is EOPNOTSUPP as
      well
    * READ/WRITE: 1 <= nr_segments <= BLKIF_MAX_SEGMENTS_PER_REQUEST; FLUSH_DISKCACHE also 0
    * INDIRECT: indirect_op READ or WRITE; 1 <= nr_segments <= the advertised
      feature-max-indirect-segments; the segment descriptors are copied out of the mapped
      indirect pages once, then checked like the classic ones
    * every segment: first_sect <= last_sect < SECTORS_PER_PAGE; its gref maps (a map failure
      fails the whole request)
    * sector_number and each segment's sector count aligned to sector-size / 512
    * sector_number + total sectors <= sectors ("access beyond end of device")
    * mode "r": WRITE, WRITE_BARRIER, FLUSH_DISKCACHE and DISCARD refused with
      BLKIF_RSP_ERROR, as Linux does (a read-only vbd also publishes feature-discard 0)
    * DISCARD: the range lies within the device (and is aligned, as above)
    * the response is packed field by field into a zeroed slot (no stale bytes reach the peer)

The frontend in turn copies each response once and accepts it only if ``id`` names a request it
has outstanding and ``status`` is one of the three above; otherwise the device is broken.
"""

from __future__ import annotations

import functools
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from channels.ring import PAGE_SIZE, declare_ring

# -- constants (Xen's names and values) -------------------------------------------------------

BLKIF_OP_READ = 0
BLKIF_OP_WRITE = 1
BLKIF_OP_WRITE_BARRIER = 2
BLKIF_OP_FLUSH_DISKCACHE = 3
BLKIF_OP_RESERVED_1 = 4  # SLES-specific in Xen; unknown to us
BLKIF_OP_DISCARD = 5
BLKIF_OP_INDIRECT = 6

BLKIF_RSP_EOPNOTSUPP = -2
BLKIF_RSP_ERROR = -1
BLKIF_RSP_OKAY = 0

BLKIF_MAX_SEGMENTS_PER_REQUEST = 11
BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST = 8
SEGS_PER_INDIRECT_FRAME = 512  # 8-byte descriptors in one 4 KiB page
MAX_INDIRECT_SEGMENTS = 256  # what blkback advertises (Linux's value): 1 MiB per request

SECTOR_SIZE = 512  # the protocol's unit, whatever the device's sector-size
SECTORS_PER_PAGE = PAGE_SIZE // SECTOR_SIZE  # 8: last_sect must stay below this

VDISK_CDROM = 1
VDISK_REMOVABLE = 2
VDISK_READONLY = 4

BLKIF_DISCARD_SECURE = 1

XEN_IO_PROTO_ABI_X86_64 = "x86_64-abi"  # the only ABI we speak (io/protocols.h)
BLKIF_MAX_RING_PAGE_ORDER = 4  # 16 pages, 512 requests in flight


class BlkifKey(StrEnum):
    """The blkif-specific store keys (the shared ones are channels.xenbus.Key)."""

    PARAMS = "params"
    PARAMS_OWNER = "params-owner"
    MODE = "mode"
    SECTORS = "sectors"
    SECTOR_SIZE = "sector-size"
    PHYSICAL_SECTOR_SIZE = "physical-sector-size"
    INFO = "info"
    FEATURE_FLUSH_CACHE = "feature-flush-cache"
    FEATURE_DISCARD = "feature-discard"
    DISCARD_GRANULARITY = "discard-granularity"
    DISCARD_ALIGNMENT = "discard-alignment"
    DISCARD_SECURE = "discard-secure"
    FEATURE_PERSISTENT = "feature-persistent"
    FEATURE_MAX_INDIRECT_SEGMENTS = "feature-max-indirect-segments"
    MAX_RING_PAGE_ORDER = "max-ring-page-order"
    RING_PAGE_ORDER = "ring-page-order"
    RING_REF = "ring-ref"
    EVENT_CHANNEL = "event-channel"
    PROTOCOL = "protocol"
    VIRTUAL_DEVICE = "virtual-device"


# -- the ring and the structs overlaid on its slots -------------------------------------------

_SEGMENT_FORMAT = "IBB2x"
BLK_RING = declare_ring(
    "blkif",
    "<BBH4xQQ" + _SEGMENT_FORMAT * BLKIF_MAX_SEGMENTS_PER_REQUEST,
    "<QBxh4x",
)
REQUEST = BLK_RING.request  # blkif_request: the read/write/barrier/flush layout
RESPONSE = BLK_RING.response  # blkif_response: (id, operation, status)
SLOT_SIZE = BLK_RING.slot_size
SEGMENT = struct.Struct("<" + _SEGMENT_FORMAT)  # blkif_request_segment
# The variants are padded to the whole slot so that unpack() checks the length of every layout.
DISCARD_SLOT = struct.Struct("<BBH4xQQQ80x")  # blkif_request_discard
INDIRECT_SLOT = struct.Struct(f"<BBH4xQQH2x{BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST}I52x")

_SEGMENT_OPS = frozenset(
    {BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_OP_FLUSH_DISKCACHE}
)


def ring_pages_for_order(order: int) -> int:
    """Pages in a ring of ``ring-page-order`` `order`; ValueError beyond what we support."""
    if not 0 <= order <= BLKIF_MAX_RING_PAGE_ORDER:
        raise ValueError(f"blkif ring-page-order {order} is outside 0..{BLKIF_MAX_RING_PAGE_ORDER}")
    return 1 << order


def nr_ents(order: int) -> int:
    """RING_SIZE of a blkif ring of 2**order pages: 32 for one page, 512 for 16."""
    return BLK_RING.nr_ents(PAGE_SIZE * ring_pages_for_order(order))


def ring_ref_keys(order: int | None) -> tuple[str, ...]:
    """The frontend keys naming the ring's grant refs: ``ring-ref`` when no ``ring-page-order``
    is written (None), else ``ring-ref0`` .. ``ring-ref<2**order - 1>``."""
    if order is None:
        return (BlkifKey.RING_REF.value,)
    return tuple(f"{BlkifKey.RING_REF.value}{i}" for i in range(ring_pages_for_order(order)))


# -- requests -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Segment:
    """One blkif_request_segment: sectors first_sect..last_sect of the page granted as gref."""

    gref: int
    first_sect: int
    last_sect: int

    @property
    def nr_sects(self) -> int:
        return self.last_sect - self.first_sect + 1

    @property
    def nbytes(self) -> int:
        return self.nr_sects * SECTOR_SIZE

    @property
    def offset(self) -> int:
        """Byte offset of the segment's data in its page."""
        return self.first_sect * SECTOR_SIZE


@dataclass(frozen=True, slots=True)
class Request:
    """A blkif request, decoded from (or to be packed into) one 112-byte slot.

    READ/WRITE/WRITE_BARRIER/FLUSH_DISKCACHE use ``segments``; DISCARD uses ``flag`` and
    ``nr_sectors`` (``nr_segments`` is 0); INDIRECT uses ``indirect_op``, a 16-bit
    ``nr_segments`` and ``indirect_grefs`` (its segments live in the indirect pages). An unknown
    operation decodes only the common header, enough to answer it by ``id``.
    """

    operation: int
    nr_segments: int
    handle: int
    id: int
    sector_number: int
    segments: tuple[Segment, ...] = ()
    nr_sectors: int = 0
    flag: int = 0
    indirect_op: int = 0
    indirect_grefs: tuple[int, ...] = ()

    @classmethod
    def rw(
        cls,
        operation: int,
        id: int,
        sector_number: int,
        segments: Sequence[Segment],
        handle: int = 0,
    ) -> Request:
        """A READ, WRITE, WRITE_BARRIER or FLUSH_DISKCACHE over `segments`."""
        return cls(operation, len(segments), handle, id, sector_number, tuple(segments))

    @classmethod
    def discard(
        cls, id: int, sector_number: int, nr_sectors: int, secure: bool = False, handle: int = 0
    ) -> Request:
        """A DISCARD of nr_sectors from sector_number."""
        flag = BLKIF_DISCARD_SECURE if secure else 0
        return cls(BLKIF_OP_DISCARD, 0, handle, id, sector_number, nr_sectors=nr_sectors, flag=flag)

    @classmethod
    def indirect(
        cls,
        indirect_op: int,
        id: int,
        sector_number: int,
        nr_segments: int,
        indirect_grefs: Sequence[int],
        handle: int = 0,
    ) -> Request:
        """An INDIRECT READ or WRITE whose nr_segments descriptors fill the granted pages."""
        return cls(
            BLKIF_OP_INDIRECT,
            nr_segments,
            handle,
            id,
            sector_number,
            indirect_op=indirect_op,
            indirect_grefs=tuple(indirect_grefs),
        )

    @classmethod
    def unpack(cls, raw: bytes | bytearray | memoryview) -> Request:
        """Decode one slot. Total: any 112 bytes decode (struct.error only for another length),
        and no count in them can make it read past the slot. It checks nothing else: every
        field may be hostile, and validating them is the backend's job."""
        raw = bytes(raw)  # fields are read from one private copy, never twice from shared memory
        fields = REQUEST.unpack(raw)
        operation = fields[0]
        if operation == BLKIF_OP_DISCARD:
            return cls._unpack_discard(raw)
        if operation == BLKIF_OP_INDIRECT:
            return cls._unpack_indirect(raw)
        operation, nr_segments, handle, id_, sector_number = fields[:5]
        if operation not in _SEGMENT_OPS:
            return cls(operation, nr_segments, handle, id_, sector_number)
        count = min(
            nr_segments, BLKIF_MAX_SEGMENTS_PER_REQUEST
        )  # a hostile count stays in the slot
        flat = fields[5 : 5 + 3 * count]
        segments = tuple(Segment(*flat[i : i + 3]) for i in range(0, len(flat), 3))
        return cls(operation, nr_segments, handle, id_, sector_number, segments)

    @classmethod
    def _unpack_discard(cls, raw: bytes) -> Request:
        operation, flag, handle, id_, sector_number, nr_sectors = DISCARD_SLOT.unpack(raw)
        return cls(operation, 0, handle, id_, sector_number, nr_sectors=nr_sectors, flag=flag)

    @classmethod
    def _unpack_indirect(cls, raw: bytes) -> Request:
        operation, indirect_op, nr_segments, id_, sector_number, handle, *grefs = (
            INDIRECT_SLOT.unpack(raw)
        )
        pages = min(indirect_pages(nr_segments), BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST)
        return cls(
            operation,
            nr_segments,
            handle,
            id_,
            sector_number,
            indirect_op=indirect_op,
            indirect_grefs=tuple(grefs[:pages]),
        )

    def pack(self) -> bytes:
        """The 112-byte slot for this request (the inverse of unpack); ValueError if a field
        does not fit its layout."""
        try:
            if self.operation == BLKIF_OP_DISCARD:
                return self._pack_discard()
            if self.operation == BLKIF_OP_INDIRECT:
                return self._pack_indirect()
            return self._pack_segments()
        except struct.error as e:
            raise ValueError(f"blkif request id {self.id}: cannot pack {self!r}") from e

    def _pack_discard(self) -> bytes:
        return DISCARD_SLOT.pack(
            self.operation, self.flag, self.handle, self.id, self.sector_number, self.nr_sectors
        )

    def _pack_indirect(self) -> bytes:
        grefs = self.indirect_grefs
        spare = BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST - len(grefs)
        if spare < 0:
            raise ValueError(f"blkif request id {self.id}: {len(grefs)} indirect_grefs exceed 8")
        return INDIRECT_SLOT.pack(
            self.operation,
            self.indirect_op,
            self.nr_segments,
            self.id,
            self.sector_number,
            self.handle,
            *grefs,
            *(0,) * spare,
        )

    def _pack_segments(self) -> bytes:
        spare = BLKIF_MAX_SEGMENTS_PER_REQUEST - len(self.segments)
        if spare < 0:
            raise ValueError(
                f"blkif request id {self.id}: {len(self.segments)} segments exceed "
                f"{BLKIF_MAX_SEGMENTS_PER_REQUEST}"
            )
        flat = [v for s in self.segments for v in (s.gref, s.first_sect, s.last_sect)]
        return REQUEST.pack(
            self.operation,
            self.nr_segments,
            self.handle,
            self.id,
            self.sector_number,
            *flat,
            *(0,) * (3 * spare),
        )


# -- indirect pages -----------------------------------------------------------------------------


def indirect_pages(nr_segments: int) -> int:
    """INDIRECT_PAGES: indirect pages needed to hold nr_segments descriptors."""
    return -(-max(nr_segments, 0) // SEGS_PER_INDIRECT_FRAME)


#: The most granted pages one blkif connection can have in use at once, so the most a backend
#: maps for one vbd (channels/grants.py): its ring page (blkback offers ring-page-order 0 only)
#: and every slot of the ring holding a request at its largest, MAX_INDIRECT_SEGMENTS data
#: pages and the indirect pages naming them: 1 + 32 * (256 + 1) = 8225 pages, 32 MiB.
#: blkfront grants 1 + 1024 + 32 of them.
MAX_GRANT_PAGES = 1 + nr_ents(0) * (MAX_INDIRECT_SEGMENTS + indirect_pages(MAX_INDIRECT_SEGMENTS))


def pack_indirect_frames(segments: Sequence[Segment]) -> list[bytes]:
    """The indirect pages (4096 bytes each, zero-padded) holding `segments` in order."""
    frames = []
    for start in range(0, len(segments), SEGS_PER_INDIRECT_FRAME):
        page = bytearray(PAGE_SIZE)
        chunk = segments[start : start + SEGS_PER_INDIRECT_FRAME]
        pack_segments_into(page, [v for s in chunk for v in (s.gref, s.first_sect, s.last_sect)])
        frames.append(bytes(page))
    return frames


def pack_segments_into(frame: bytearray | memoryview, flat: Sequence[int]) -> None:
    """Write segment descriptors, given as one flat run of (gref, first_sect, last_sect), at the
    start of an indirect page, in one call (a frontend's hot path: 256 of them per MiB)."""
    _segments_struct(len(flat) // 3).pack_into(frame, 0, *flat)


@functools.cache
def _segments_struct(count: int) -> struct.Struct:
    if not 0 < count <= SEGS_PER_INDIRECT_FRAME:
        raise ValueError(f"{count} segments do not fit one indirect page")
    return struct.Struct("<" + SEGMENT.format.lstrip("<") * count)


def unpack_indirect_frame(
    frame: bytes | bytearray | memoryview, count: int
) -> list[tuple[int, int, int]]:
    """Copy the first `count` descriptors out of one indirect page as (gref, first_sect,
    last_sect), each read once. Total: `count` is clamped to what the page holds, so a hostile
    count cannot read past it. Plain tuples, not Segments: a backend reads 256 per MiB."""
    n = max(0, min(count, SEGS_PER_INDIRECT_FRAME, len(frame) // SEGMENT.size))
    return list(SEGMENT.iter_unpack(bytes(frame[: n * SEGMENT.size])))


# -- virtual-device numbers (xen-vbd-interface(7)) ----------------------------------------------

XENVBD_MAJOR = 202  # 202 << 8 | disk << 4 | partition: xvd disks 0..15
VDEV_EXTENDED = 1 << 28  # 1 << 28 | disk << 8 | partition: any xvd disk below 2**20
_MAX_DISK = (1 << 20) - 1
_XVD = re.compile(r"xvd([a-z]+)")
_XVD_PARTITION = re.compile(r"xvd[a-z]+[0-9]+")


def parse_vdev(name: str) -> int:
    """The disk index of a whole-disk xvd name: xvda 0, xvdz 25, xvdaa 26, xvdzz 701, ...

    ValueError, naming the vdev, for anything else (other prefixes, partitions, capitals)."""
    if not isinstance(name, str) or not name.startswith("xvd"):
        raise ValueError(f"vdev {name!r}: only xvd names (xvda, xvdb, ...) are supported")
    if _XVD_PARTITION.fullmatch(name):
        raise ValueError(f"vdev {name!r}: partitions are not supported, name a whole disk")
    match = _XVD.fullmatch(name)
    if match is None:
        raise ValueError(f"vdev {name!r} is not a disk name like xvda, xvdb, ..., xvdz, xvdaa")
    disk = 0
    for letter in match[1]:  # bijective base 26: a..z, then aa..zz, aaa..
        disk = disk * 26 + (ord(letter) - ord("a") + 1)
        if disk - 1 > _MAX_DISK:
            raise ValueError(f"vdev {name!r}: disk number beyond the limit {_MAX_DISK}")
    return disk - 1


def vdev_number(name: str) -> int:
    """The ``virtual-device`` number of an xvd name: 202 format below 16 disks, else extended."""
    disk = parse_vdev(name)
    if disk < 16:
        return (XENVBD_MAJOR << 8) | (disk << 4)
    return VDEV_EXTENDED | (disk << 8)


def vdev_name(number: int) -> str:
    """The xvd name of a whole-disk ``virtual-device`` number (either format); ValueError for
    partitions, other majors and reserved values."""
    if number >> 28 == 1:
        disk, partition = (number >> 8) & _MAX_DISK, number & 0xFF
    elif number >> 8 == XENVBD_MAJOR:
        disk, partition = (number >> 4) & 0xF, number & 0xF
    else:
        raise ValueError(f"virtual-device {number}: not an xvd disk number")
    if partition:
        raise ValueError(f"virtual-device {number}: partition {partition} is not supported")
    letters = ""
    disk += 1
    while disk:
        disk, rem = divmod(disk - 1, 26)
        letters = chr(ord("a") + rem) + letters
    return "xvd" + letters

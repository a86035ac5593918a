"""channels.blkif: layouts against the reference offsets, round trips, hostile slots, vdev names."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from channels.blkif import (
    BLK_RING,
    BLKIF_DISCARD_SECURE,
    BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_RESERVED_1,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    SEGS_PER_INDIRECT_FRAME,
    SLOT_SIZE,
    Request,
    Segment,
    indirect_pages,
    nr_ents,
    pack_indirect_frames,
    pack_segments_into,
    parse_vdev,
    ring_pages_for_order,
    ring_ref_keys,
    unpack_indirect_frame,
    vdev_name,
    vdev_number,
)
from channels.ring import PAGE_SIZE, BackRing, FrontRing

U16, S16, U32, U64 = (struct.Struct(f) for f in ("<H", "<h", "<I", "<Q"))

ID = 0x1122334455667788
SECTOR = 0x0102030405060708
HANDLE = 0xBEEF
SEGMENT_OPS = (BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_OP_FLUSH_DISKCACHE)


def field(raw: bytes, offset: int, fmt: struct.Struct) -> int:
    return fmt.unpack_from(raw, offset)[0]


# --- layouts against the reference (§5.2) ------------------------------------------------------


def test_slot_is_the_112_byte_request_and_the_response_is_16() -> None:
    assert BLK_RING.request.size == 112
    assert BLK_RING.response.size == 16
    assert SLOT_SIZE == BLK_RING.slot_size == 112


def test_read_write_request_offsets() -> None:
    segments = [Segment(0xA0A1A2A3 + i, i % 8, 7) for i in range(BLKIF_MAX_SEGMENTS_PER_REQUEST)]
    raw = Request.rw(BLKIF_OP_WRITE, ID, SECTOR, segments, handle=HANDLE).pack()

    assert len(raw) == 112
    assert raw[0] == BLKIF_OP_WRITE
    assert raw[1] == 11  # nr_segments
    assert field(raw, 2, U16) == HANDLE
    assert raw[4:8] == bytes(4)  # pad
    assert field(raw, 8, U64) == ID
    assert field(raw, 16, U64) == SECTOR
    for i, seg in enumerate(segments):
        at = 24 + 8 * i
        assert field(raw, at, U32) == seg.gref
        assert raw[at + 4] == seg.first_sect
        assert raw[at + 5] == seg.last_sect
        assert raw[at + 6 : at + 8] == bytes(2)


def test_unused_segment_slots_are_zero() -> None:
    raw = Request.rw(BLKIF_OP_READ, ID, SECTOR, [Segment(0xFFFFFFFF, 7, 7)]).pack()
    assert raw[24:32] == b"\xff\xff\xff\xff\x07\x07\x00\x00"
    assert raw[32:] == bytes(112 - 32)


def test_discard_request_offsets() -> None:
    raw = Request.discard(ID, SECTOR, 0x0A0B0C0D0E0F1011, secure=True, handle=HANDLE).pack()

    assert len(raw) == 112
    assert raw[0] == BLKIF_OP_DISCARD
    assert raw[1] == BLKIF_DISCARD_SECURE  # flag
    assert field(raw, 2, U16) == HANDLE
    assert field(raw, 8, U64) == ID
    assert field(raw, 16, U64) == SECTOR
    assert field(raw, 24, U64) == 0x0A0B0C0D0E0F1011  # nr_sectors
    assert raw[4:8] == bytes(4)
    assert raw[32:] == bytes(80)


def test_indirect_request_offsets() -> None:
    grefs = [0xC0C1C2C3 + i for i in range(BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST)]
    raw = Request.indirect(BLKIF_OP_READ, ID, SECTOR, 0xFFFF, grefs, handle=HANDLE).pack()

    assert len(raw) == 112
    assert raw[0] == BLKIF_OP_INDIRECT
    assert raw[1] == BLKIF_OP_READ  # indirect_op
    assert field(raw, 2, U16) == 0xFFFF  # nr_segments is 16-bit here
    assert field(raw, 8, U64) == ID
    assert field(raw, 16, U64) == SECTOR
    assert field(raw, 24, U16) == HANDLE
    assert raw[26:28] == bytes(2)
    assert [field(raw, 28 + 4 * i, U32) for i in range(8)] == grefs
    assert raw[60:] == bytes(52)


def test_response_offsets() -> None:
    raw = BLK_RING.response.pack(ID, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_RSP_EOPNOTSUPP)

    assert len(raw) == 16
    assert field(raw, 0, U64) == ID
    assert raw[8] == BLKIF_OP_FLUSH_DISKCACHE
    assert raw[9] == 0
    assert field(raw, 10, S16) == -2
    assert raw[12:] == bytes(4)


def test_constants_are_xens() -> None:
    assert SEGMENT_OPS == (0, 1, 2, 3)
    assert (BLKIF_OP_RESERVED_1, BLKIF_OP_DISCARD, BLKIF_OP_INDIRECT) == (4, 5, 6)
    assert (BLKIF_RSP_OKAY, BLKIF_RSP_ERROR, BLKIF_RSP_EOPNOTSUPP) == (0, -1, -2)


# --- ring size --------------------------------------------------------------------------------


@pytest.mark.parametrize(("order", "pages", "entries"), [(0, 1, 32), (1, 2, 64), (4, 16, 512)])
def test_ring_entries_per_order(order: int, pages: int, entries: int) -> None:
    assert ring_pages_for_order(order) == pages
    assert nr_ents(order) == entries
    assert BLK_RING.nr_ents(pages * PAGE_SIZE) == entries


@pytest.mark.parametrize("order", [-1, 5, 20])
def test_ring_page_order_beyond_our_maximum_is_refused(order: int) -> None:
    with pytest.raises(ValueError, match=rf"ring-page-order {order} is outside 0\.\.4"):
        ring_pages_for_order(order)
    with pytest.raises(ValueError, match="ring-page-order"):
        nr_ents(order)


def test_ring_ref_keys() -> None:
    assert ring_ref_keys(None) == ("ring-ref",)
    assert ring_ref_keys(0) == ("ring-ref0",)
    assert ring_ref_keys(2) == ("ring-ref0", "ring-ref1", "ring-ref2", "ring-ref3")
    with pytest.raises(ValueError, match="ring-page-order 5"):
        ring_ref_keys(5)


def test_request_and_response_cross_a_real_ring() -> None:
    area = memoryview(bytearray(PAGE_SIZE))
    front = FrontRing.init(BLK_RING, area)
    back = BackRing.attach(BLK_RING, area)
    request = Request.rw(BLKIF_OP_READ, 42, 8, [Segment(7, 0, 7), Segment(8, 2, 5)])

    front.put_request_raw(request.pack())
    front.push_requests()
    assert Request.unpack(back.get_request_raw()) == request

    back.put_response((request.id, request.operation, BLKIF_RSP_OKAY))
    back.push_responses()
    assert front.get_response() == (42, BLKIF_OP_READ, BLKIF_RSP_OKAY)


# --- round trips ------------------------------------------------------------------------------

u8, u16 = st.integers(0, 0xFF), st.integers(0, 0xFFFF)
u32, u64 = st.integers(0, 0xFFFFFFFF), st.integers(0, 2**64 - 1)
segments = st.builds(Segment, u32, st.integers(0, 7), st.integers(0, 7))


@given(
    st.sampled_from(SEGMENT_OPS),
    u64,
    u64,
    st.lists(segments, max_size=BLKIF_MAX_SEGMENTS_PER_REQUEST),
    u16,
)
def test_segment_request_round_trip(
    op: int, id_: int, sector: int, segs: list[Segment], handle: int
) -> None:
    request = Request.rw(op, id_, sector, segs, handle=handle)
    assert Request.unpack(request.pack()) == request


@given(u64, u64, u64, st.booleans(), u16)
def test_discard_round_trip(id_: int, sector: int, nr_sectors: int, secure: bool, h: int) -> None:
    request = Request.discard(id_, sector, nr_sectors, secure=secure, handle=h)
    decoded = Request.unpack(request.pack())
    assert decoded == request
    assert decoded.flag == (BLKIF_DISCARD_SECURE if secure else 0)


@given(st.data(), st.sampled_from([BLKIF_OP_READ, BLKIF_OP_WRITE]), u64, u64, u16)
def test_indirect_round_trip(data: st.DataObject, op: int, id_: int, sector: int, h: int) -> None:
    nr_segments = data.draw(st.integers(1, 8 * SEGS_PER_INDIRECT_FRAME))
    grefs = data.draw(st.lists(u32, min_size=indirect_pages(nr_segments), max_size=8).map(tuple))
    grefs = grefs[: indirect_pages(nr_segments)]  # the frontend grants only the pages it fills
    request = Request.indirect(op, id_, sector, nr_segments, grefs, handle=h)
    assert Request.unpack(request.pack()) == request


def test_unknown_operation_decodes_only_the_header() -> None:
    raw = bytearray(Request.rw(BLKIF_OP_READ, ID, SECTOR, [Segment(1, 0, 7)], HANDLE).pack())
    raw[0] = BLKIF_OP_RESERVED_1
    request = Request.unpack(bytes(raw))
    assert request == Request(BLKIF_OP_RESERVED_1, 1, HANDLE, ID, SECTOR)  # enough to answer it


@pytest.mark.parametrize(
    "request_",
    [
        Request.rw(BLKIF_OP_READ, 1, 0, [Segment(1, 0, 7)] * 12),
        Request.rw(BLKIF_OP_READ, 1, 0, [Segment(2**32, 0, 7)]),
        Request.rw(BLKIF_OP_WRITE, 2**64, 0, []),
        Request.discard(1, -1, 8),
        Request.indirect(BLKIF_OP_WRITE, 1, 0, 4096, list(range(9))),
        Request.indirect(BLKIF_OP_WRITE, 1, 0, 2**16, [1]),
    ],
)
def test_pack_refuses_what_does_not_fit(request_: Request) -> None:
    with pytest.raises(ValueError, match=f"blkif request id {request_.id}"):
        request_.pack()


# --- hostile slots ----------------------------------------------------------------------------


@given(st.binary(min_size=112, max_size=112))
def test_unpack_takes_any_slot_and_stays_inside_it(raw: bytes) -> None:
    request = Request.unpack(raw)

    assert request.operation == raw[0]
    assert request.id == field(raw, 8, U64)  # always there, so any request can be answered
    assert len(request.segments) <= BLKIF_MAX_SEGMENTS_PER_REQUEST
    assert len(request.indirect_grefs) <= BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST
    if request.operation in SEGMENT_OPS:
        assert len(request.segments) == min(raw[1], BLKIF_MAX_SEGMENTS_PER_REQUEST)
    assert Request.unpack(request.pack()) == request  # what was decoded re-encodes exactly


def test_hostile_segment_count_is_kept_but_not_followed() -> None:
    raw = bytearray(Request.rw(BLKIF_OP_WRITE, ID, 0, [Segment(9, 0, 7)] * 11).pack())
    raw[1] = 255
    request = Request.unpack(bytes(raw))
    assert request.nr_segments == 255  # left for blkback to reject
    assert request.segments == (Segment(9, 0, 7),) * 11


def test_hostile_indirect_count_names_at_most_eight_pages() -> None:
    grefs = list(range(100, 108))
    raw = Request.indirect(BLKIF_OP_READ, ID, 0, 0xFFFF, grefs).pack()
    assert Request.unpack(raw).indirect_grefs == tuple(grefs)
    raw = Request.indirect(BLKIF_OP_READ, ID, 0, 513, grefs[:2]).pack()
    assert Request.unpack(raw).indirect_grefs == (100, 101)
    raw = Request.indirect(BLKIF_OP_READ, ID, 0, 0, []).pack()
    assert Request.unpack(raw).indirect_grefs == ()


@pytest.mark.parametrize("size", [0, 111, 113, 4096])
def test_unpack_of_a_wrong_length_is_a_struct_error(size: int) -> None:
    with pytest.raises(struct.error):
        Request.unpack(bytes(size))


def test_unpack_reads_a_private_copy_of_a_shared_view() -> None:
    shared = bytearray(Request.rw(BLKIF_OP_READ, ID, 0, [Segment(3, 0, 7)]).pack())
    request = Request.unpack(memoryview(shared))
    shared[:] = bytes(112)  # the peer rewrites the slot after we copied it
    assert request.id == ID
    assert request.segments == (Segment(3, 0, 7),)


# --- segments and indirect pages --------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "last", "offset", "nbytes"), [(0, 7, 0, 4096), (2, 3, 1024, 1024), (7, 7, 3584, 512)]
)
def test_segment_offset_and_nbytes(first: int, last: int, offset: int, nbytes: int) -> None:
    segment = Segment(1, first, last)
    assert segment.offset == offset
    assert segment.nbytes == nbytes
    assert segment.nr_sects == nbytes // 512


@pytest.mark.parametrize(("count", "pages"), [(0, 0), (1, 1), (512, 1), (513, 2), (4096, 8)])
def test_indirect_pages(count: int, pages: int) -> None:
    assert indirect_pages(count) == pages


def test_indirect_frames_round_trip() -> None:
    segs = [Segment(1000 + i, i % 8, 7) for i in range(600)]
    frames = pack_indirect_frames(segs)

    assert [len(f) for f in frames] == [PAGE_SIZE, PAGE_SIZE]
    assert field(frames[0], 8, U32) == 1001  # descriptor 1 at byte 8: 512 per page
    assert frames[1][88 * 8 :] == bytes(PAGE_SIZE - 88 * 8)
    assert unpack_indirect_frame(frames[0], 512) + unpack_indirect_frame(frames[1], 88) == [
        (s.gref, s.first_sect, s.last_sect) for s in segs
    ]


@pytest.mark.parametrize(("count", "decoded"), [(-5, 0), (0, 0), (3, 3), (10**6, 512)])
def test_indirect_frame_count_is_clamped_to_the_page(count: int, decoded: int) -> None:
    page = memoryview(bytearray(b"\xff" * PAGE_SIZE))
    assert len(unpack_indirect_frame(page, count)) == decoded
    assert len(unpack_indirect_frame(page[:100], count)) == min(decoded, 12)


# --- vdev names (xen-vbd-interface(7)) --------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "disk", "number"),
    [
        ("xvda", 0, 202 << 8),
        ("xvdb", 1, (202 << 8) | (1 << 4)),
        ("xvdp", 15, (202 << 8) | (15 << 4)),
        ("xvdq", 16, (1 << 28) | (16 << 8)),
        ("xvdz", 25, (1 << 28) | (25 << 8)),
        ("xvdaa", 26, (1 << 28) | (26 << 8)),
        ("xvdzz", 701, (1 << 28) | (701 << 8)),
        ("xvdaaa", 702, (1 << 28) | (702 << 8)),
    ],
)
def test_vdev_encoding(name: str, disk: int, number: int) -> None:
    assert parse_vdev(name) == disk
    assert vdev_number(name) == number
    assert vdev_name(number) == name


@given(st.integers(0, 2**20 - 1))
def test_vdev_name_and_number_are_inverse(disk: int) -> None:
    number = (202 << 8) | (disk << 4) if disk < 16 else (1 << 28) | (disk << 8)
    name = vdev_name(number)
    assert parse_vdev(name) == disk
    assert vdev_number(name) == number


def test_extended_format_is_read_for_low_disks_too() -> None:
    assert vdev_name((1 << 28) | (1 << 8)) == "xvdb"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("hda", "vdev 'hda': only xvd names"),
        ("sda1", "vdev 'sda1': only xvd names"),
        ("", "vdev '': only xvd names"),
        ("xvda1", "vdev 'xvda1': partitions are not supported"),
        ("xvd", "vdev 'xvd' is not a disk name like xvda"),
        ("xvdA", "vdev 'xvdA' is not a disk name like xvda"),
        ("xvd-a", "vdev 'xvd-a' is not a disk name like xvda"),
        ("xvda ", "vdev 'xvda ' is not a disk name like xvda"),
        ("xvdzzzzz", "vdev 'xvdzzzzz': disk number beyond the limit 1048575"),
    ],
)
def test_bad_vdev_names(name: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_vdev(name)
    assert str(info.value).startswith(message)
    with pytest.raises(ValueError):
        vdev_number(name)


@pytest.mark.parametrize(
    ("number", "message"),
    [
        ((202 << 8) | 1, "partition 1 is not supported"),
        ((1 << 28) | (20 << 8) | 3, "partition 3 is not supported"),
        (8 << 8, "not an xvd disk number"),  # sda
        (3 << 8, "not an xvd disk number"),  # hda
        (2 << 28, "not an xvd disk number"),  # reserved
        (-1, "not an xvd disk number"),
    ],
)
def test_bad_vdev_numbers(number: int, message: str) -> None:
    with pytest.raises(ValueError, match=f"virtual-device {number}: {message}"):
        vdev_name(number)


def test_segments_pack_straight_into_a_page_and_refuse_what_does_not_fit() -> None:
    page = bytearray(b"\xee" * PAGE_SIZE)
    pack_segments_into(page, [7, 0, 7, 8, 2, 5])
    assert unpack_indirect_frame(page, 2) == [(7, 0, 7), (8, 2, 5)]
    assert page[16:] == b"\xee" * (PAGE_SIZE - 16)  # nothing written past the descriptors
    with pytest.raises(ValueError, match="513 segments"):
        pack_segments_into(bytearray(PAGE_SIZE * 2), [1, 0, 7] * 513)

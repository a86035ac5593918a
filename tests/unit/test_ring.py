"""channels.ring: layout, RING_SIZE, wrap-around, notification suppression, hostile peers."""

from __future__ import annotations

import struct

import pytest

from channels.errors import ProtocolViolation
from channels.ring import (
    HEADER_SIZE,
    MASK32,
    PAGE_SIZE,
    REQ_EVENT_OFFSET,
    REQ_PROD_OFFSET,
    RSP_EVENT_OFFSET,
    RSP_PROD_OFFSET,
    BackRing,
    FrontRing,
    RingError,
    RingType,
    declare_ring,
)

U32 = struct.Struct("<I")
ECHO = declare_ring("echo", "<QI4x", "<QI4x")  # 16-byte slots: 128 per page


def u32(area: memoryview, offset: int) -> int:
    return U32.unpack_from(area, offset)[0]


def set_u32(area: memoryview, offset: int, value: int) -> None:
    U32.pack_into(area, offset, value & MASK32)


def make_pair(
    rtype: RingType = ECHO, start: int = 0, area_bytes: int = PAGE_SIZE
) -> tuple[memoryview, FrontRing, BackRing]:
    area = memoryview(bytearray(b"\xaa" * area_bytes))
    front = FrontRing.init(rtype, area, start=start)
    back = BackRing.attach(rtype, area)
    return area, front, back


# --- layout and RING_SIZE --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_format", "response_format", "slot", "pages", "ring_size"),
    [
        ("<112x", "<QBxh4x", 112, 1, 32),  # blkif: 36 slots fit, rounded down
        ("<112x", "<QBxh4x", 112, 16, 512),  # blkif order 4: 584 fit
        ("<IHHHH", "<Hh", 12, 1, 256),  # netif tx: the request is the larger
        ("<H2xI", "<HhHh", 8, 1, 256),  # netif rx
        ("<HH3I", "<HHII", 16, 1, 128),  # netif ctrl
        ("<I", "<QQ", 16, 1, 128),  # the response is the larger
    ],
)
def test_ring_size_rounds_slots_down_to_a_power_of_two(
    request_format: str, response_format: str, slot: int, pages: int, ring_size: int
) -> None:
    rtype = declare_ring("t", request_format, response_format)
    assert rtype.slot_size == slot
    assert rtype.nr_ents(pages * PAGE_SIZE) == ring_size


def test_declare_ring_rejects_native_or_broken_formats() -> None:
    with pytest.raises(ValueError, match="must start with '<'"):
        declare_ring("bad", "QH", "<Q")
    with pytest.raises(ValueError, match="bad response format"):
        declare_ring("bad", "<Q", "<Z")


def test_area_too_small_for_one_slot_is_refused() -> None:
    with pytest.raises(ValueError, match="holds no 16-byte slot"):
        FrontRing.init(ECHO, memoryview(bytearray(HEADER_SIZE + 15)))


def test_a_misaligned_area_is_refused() -> None:
    with pytest.raises(ValueError, match="not 4-byte aligned"):
        FrontRing.init(ECHO, memoryview(bytearray(PAGE_SIZE + 1))[1:])


def test_init_writes_the_shared_header_and_zeroes_pad_and_slots() -> None:
    area, front, _ = make_pair(start=1000)
    assert struct.unpack_from("<IIII", area, 0) == (1000, 1001, 1000, 1001)
    assert bytes(area[16:HEADER_SIZE]) == bytes(48)
    assert bytes(area[HEADER_SIZE : HEADER_SIZE + 128 * 16]) == bytes(128 * 16)
    assert front.nr_ents == 128
    assert front.free_requests() == 128


def test_request_and_response_share_a_slot() -> None:
    area, front, back = make_pair()
    front.put_request((0x1122334455667788, 7))
    front.push_requests()
    slot = bytes(area[HEADER_SIZE : HEADER_SIZE + 16])
    assert slot == struct.pack("<QI4x", 0x1122334455667788, 7)

    assert back.get_request() == (0x1122334455667788, 7)
    back.put_response((0x1122334455667788, 99))
    back.push_responses()
    assert bytes(area[HEADER_SIZE : HEADER_SIZE + 16]) == struct.pack(
        "<QI4x", 0x1122334455667788, 99
    )
    assert front.get_response() == (0x1122334455667788, 99)


def test_backend_cannot_answer_a_request_it_has_not_consumed() -> None:
    _, front, back = make_pair()
    front.put_request((1, 1))
    front.push_requests()
    with pytest.raises(RingError, match="0 requests consumed"):
        back.put_response((1, 1))
    back.get_request()
    back.put_response((1, 1))
    with pytest.raises(RingError, match="0 requests consumed"):
        back.put_response((2, 2))


def test_full_and_empty_rings_raise_ring_error() -> None:
    _, front, back = make_pair()
    front.put_requests([(i, i) for i in range(front.nr_ents)])
    assert front.full
    with pytest.raises(RingError, match="only 0 free"):
        front.put_request((0, 0))
    with pytest.raises(RingError, match="no unconsumed request"):
        back.get_request()  # nothing pushed yet
    with pytest.raises(RingError, match="no unconsumed response"):
        front.get_response()


def test_batch_put_is_all_or_nothing() -> None:
    _, front, _ = make_pair()
    front.put_requests([(i, i) for i in range(120)])
    with pytest.raises(RingError, match="9 requests but only 8 free"):
        front.put_requests([(i, i) for i in range(9)])
    assert front.free_requests() == 8
    with pytest.raises(ValueError, match="cannot pack"):
        front.put_requests([(1, 1), (1, -1)])
    assert front.free_requests() == 8


# --- wrap-around -----------------------------------------------------------------------------


def test_indices_wrap_at_2_32_without_losing_order() -> None:
    start = 2**32 - 50
    area, front, back = make_pair(start=start)
    seq = 0
    for batch in (100, 128, 7, 128, 128):  # 491 items: crosses 2**32 and every slot
        front.put_requests([(seq + i, (seq + i) & 0xFFFF) for i in range(batch)])
        front.push_requests()
        requests = back.get_requests()
        assert [r[0] for r in requests] == list(range(seq, seq + batch))
        back.put_responses([(n, v + 1) for n, v in requests])
        back.push_responses()
        assert front.get_responses() == [(n, v + 1) for n, v in requests]
        seq += batch
    assert front.req_prod_pvt == front.rsp_cons == back.req_cons == (start + seq) & MASK32
    assert u32(area, REQ_PROD_OFFSET) == u32(area, RSP_PROD_OFFSET) == (start + seq) & MASK32
    assert front.req_prod_pvt < start  # it really wrapped


def test_free_requests_across_the_wrap() -> None:
    _, front, back = make_pair(start=2**32 - 3)
    front.put_requests([(i, i) for i in range(10)])
    front.push_requests()
    assert front.free_requests() == 118
    assert back.unconsumed_requests() == 10
    back.get_requests(4)
    back.put_responses([(0, 0)] * 4)
    back.push_responses()
    assert front.unconsumed_responses() == 4
    front.get_responses()
    assert front.free_requests() == 122


# --- notification suppression and final checks ------------------------------------------------


def test_first_push_notifies_then_a_busy_backend_suppresses_notifications() -> None:
    _, front, back = make_pair(start=2**32 - 1)
    front.put_request((1, 1))
    assert front.push_requests() is True  # req_event = start + 1 was armed by init
    front.put_request((2, 2))
    assert front.push_requests() is False  # the backend has not re-armed: it is awake
    assert back.get_requests() == [(1, 1), (2, 2)]
    front.put_request((3, 3))
    assert front.push_requests() is False  # still awake (no final check yet)
    assert back.final_check_for_requests() is True  # sees request 3, does not arm
    back.get_request()
    assert back.final_check_for_requests() is False  # arms req_event = req_cons + 1
    front.put_requests([(4, 4), (5, 5), (6, 6)])
    assert front.push_requests() is True  # one notification for the whole batch


def test_push_notifies_only_when_the_batch_crosses_the_event_index() -> None:
    area, front, _ = make_pair(start=2**32 - 2)
    base = front.req_prod_pvt
    set_u32(area, REQ_EVENT_OFFSET, base + 4)  # a batching consumer: "wake me at the 4th"
    front.put_requests([(0, 0)] * 2)
    assert front.push_requests() is False  # (base, base+2] does not contain base+4
    front.put_request((0, 0))
    assert front.push_requests() is False  # (base+2, base+3]
    front.put_requests([(0, 0)] * 3)
    assert front.push_requests() is True  # (base+3, base+6] contains base+4
    assert front.push_requests() is False  # nothing new to publish


def test_final_check_for_requests_arms_event_only_when_idle() -> None:
    area, front, back = make_pair(start=500)
    set_u32(area, REQ_EVENT_OFFSET, 0)
    front.put_request((1, 1))
    front.push_requests()
    assert back.final_check_for_requests() is True
    assert u32(area, REQ_EVENT_OFFSET) == 0  # work pending: event untouched
    back.get_request()
    assert back.final_check_for_requests() is False
    assert u32(area, REQ_EVENT_OFFSET) == 502  # req_cons + 1


def test_final_check_for_responses_arms_event_only_when_idle() -> None:
    area, front, back = make_pair(start=2**32 - 1)
    set_u32(area, RSP_EVENT_OFFSET, 12345)
    front.put_request((1, 1))
    front.push_requests()
    assert front.final_check_for_responses() is False
    assert u32(area, RSP_EVENT_OFFSET) == 0  # rsp_cons + 1, wrapped
    back.get_request()
    back.put_response((1, 2))
    assert back.push_responses() is True
    assert front.final_check_for_responses() is True
    assert front.get_responses() == [(1, 2)]


# --- raw slots ------------------------------------------------------------------------------


def test_raw_response_zeroes_the_rest_of_the_slot() -> None:
    area, front, back = make_pair()
    front.put_request_raw(b"\xff" * 16)
    front.push_requests()
    assert back.get_request_raw() == b"\xff" * 16
    back.put_response_raw(b"\x01\x02")
    back.push_responses()
    assert bytes(area[HEADER_SIZE : HEADER_SIZE + 16]) == b"\x01\x02" + bytes(14)
    assert front.get_response_raw() == b"\x01\x02" + bytes(14)


def test_raw_request_zeroes_stale_response_bytes() -> None:
    area, front, back = make_pair()
    front.put_request((1, 1))
    front.push_requests()
    back.get_request()
    back.put_response_raw(b"\xee" * 16)
    back.push_responses()
    front.get_response()
    for _ in range(front.nr_ents - 1):  # walk back round to slot 0
        front.put_request((0, 0))
        front.push_requests()
        back.get_request()
        back.put_response((0, 0))
        back.push_responses()
        front.get_response()
    front.put_request_raw(b"\x05")
    assert bytes(area[HEADER_SIZE : HEADER_SIZE + 16]) == b"\x05" + bytes(15)


def test_raw_copies_are_private() -> None:
    area, front, back = make_pair()
    front.put_request_raw(b"A" * 16)
    front.push_requests()
    data = back.get_request_raw()
    area[HEADER_SIZE : HEADER_SIZE + 16] = b"B" * 16  # the frontend rewrites the slot
    assert data == b"A" * 16
    assert isinstance(data, bytes)


def test_raw_data_larger_than_a_slot_is_refused() -> None:
    _, front, _ = make_pair()
    with pytest.raises(ValueError, match="17 bytes exceed the 16-byte slot"):
        front.put_request_raw(bytes(17))
    assert front.free_requests() == front.nr_ents


# --- block (fast-path) copies and packers ------------------------------------------------------

NARROW = declare_ring("narrow", "<IHH", "<Hh")  # an 8-byte request, a 4-byte response


def test_block_round_trip_across_the_wrap_matches_the_per_item_api() -> None:
    _, front, back = make_pair(NARROW, start=2**32 - 5)
    ring_end = front.nr_ents - 3  # start far enough in that the second batch wraps the slots
    front.put_requests_flat([v for i in range(ring_end) for v in (i, i & 0xFFFF, 7)])
    front.push_requests()
    assert back.get_requests(ring_end) == [(i, i & 0xFFFF, 7) for i in range(ring_end)]
    back.put_responses_flat([v for i in range(ring_end) for v in (i & 0xFFFF, 0)])
    back.push_responses()
    front.get_responses()
    front.put_requests_flat([v for i in range(10) for v in (1000 + i, i, 1)])
    front.push_requests()
    block = back.get_requests_block()
    assert len(block) == 10 * NARROW.slot_size
    assert list(NARROW.request_slot.iter_unpack(block)) == [(1000 + i, i, 1) for i in range(10)]
    back.put_responses_flat([v for i in range(10) for v in (i, -i)])
    back.push_responses()
    rsp = front.get_responses_block()
    assert list(NARROW.response_slot.iter_unpack(rsp)) == [(i, -i) for i in range(10)]
    assert front.free_requests() == front.nr_ents


def test_block_copy_honours_its_limit_and_is_private() -> None:
    area, front, back = make_pair()
    front.put_requests_flat([v for i in range(6) for v in (i, i)])
    front.push_requests()
    block = back.get_requests_block(4)
    area[HEADER_SIZE : HEADER_SIZE + 16] = b"B" * 16  # the frontend rewrites a consumed slot
    assert isinstance(block, bytes)
    assert list(ECHO.request_slot.iter_unpack(block)) == [(i, i) for i in range(4)]
    assert back.unconsumed_requests() == 2


def test_flat_packers_zero_the_padding_of_every_slot() -> None:
    area, front, back = make_pair(NARROW)
    front.put_requests_flat([1, 2, 3, 4, 5, 6])
    front.push_requests()
    back.get_requests_block()
    back.put_responses_flat([7, -1, 8, -2])
    slots = bytes(area[HEADER_SIZE : HEADER_SIZE + 16])
    assert slots == struct.pack("<Hh4xHh4x", 7, -1, 8, -2)  # no request bytes left behind


def test_flat_packers_refuse_partial_items_and_bad_values_without_claiming() -> None:
    _, front, _ = make_pair(NARROW)
    with pytest.raises(ValueError, match="not whole items"):
        front.put_requests_flat([1, 2])
    with pytest.raises(ValueError, match="cannot pack"):
        front.put_requests_flat([1, 2, -3])
    with pytest.raises(RingError, match="only"):
        front.put_requests_flat([0] * 3 * (front.nr_ents + 1))
    assert front.free_requests() == front.nr_ents


# --- hostile peers --------------------------------------------------------------------------


def test_backend_detects_impossible_req_prod_and_stays_broken() -> None:
    area, front, back = make_pair(start=2**32 - 5)
    front.put_requests([(1, 1), (2, 2)])
    front.push_requests()
    assert back.get_request() == (1, 1)
    bogus = (back.rsp_prod_pvt + back.nr_ents + 1) & MASK32
    set_u32(area, REQ_PROD_OFFSET, bogus)
    with pytest.raises(ProtocolViolation) as info:
        back.unconsumed_requests()
    message = str(info.value)
    assert "echo ring" in message
    assert f"req_prod {bogus}" in message
    assert f"rsp_prod_pvt {back.rsp_prod_pvt}" in message

    set_u32(area, REQ_PROD_OFFSET, back.req_cons)  # even a now-sane page does not revive it
    for call in (
        back.unconsumed_requests,
        back.get_request,
        back.get_requests,
        back.final_check_for_requests,
        back.push_responses,
        lambda: back.put_response((0, 0)),
    ):
        with pytest.raises(ProtocolViolation, match="ring halted"):
            call()
    assert back.broken


def test_a_closed_ring_says_so_and_a_broken_one_stays_broken() -> None:
    area, front, back = make_pair()
    front.close()
    front.close()
    with pytest.raises(RingError, match="echo ring: closed") as info:
        front.free_requests()
    assert not isinstance(info.value, ProtocolViolation)
    set_u32(area, REQ_PROD_OFFSET, 1000)
    with pytest.raises(ProtocolViolation):
        back.unconsumed_requests()
    back.close()
    with pytest.raises(ProtocolViolation):  # the peer's fault is not forgotten by closing
        back.get_request()


def test_backend_detects_req_prod_moving_backwards() -> None:
    area, front, back = make_pair(start=2**32 - 2)
    front.put_requests([(i, i) for i in range(5)])
    front.push_requests()
    back.get_requests()
    set_u32(area, REQ_PROD_OFFSET, back.req_cons - 3)  # within RING_SIZE of rsp_prod_pvt
    with pytest.raises(ProtocolViolation, match="moved back behind req_cons"):
        back.final_check_for_requests()


def test_backend_refuses_to_attach_to_an_impossible_page() -> None:
    area = memoryview(bytearray(PAGE_SIZE))
    FrontRing.init(ECHO, area, start=10)
    set_u32(area, REQ_PROD_OFFSET, 10 + 129)
    with pytest.raises(ProtocolViolation, match="impossible req_prod 139"):
        BackRing.attach(ECHO, area)


def test_frontend_detects_impossible_rsp_prod_and_stays_broken() -> None:
    area, front, _ = make_pair(start=2**32 - 1)
    front.put_request((1, 1))
    front.push_requests()
    bogus = (front.rsp_cons + front.nr_ents + 1) & MASK32
    set_u32(area, RSP_PROD_OFFSET, bogus)  # RING_RESPONSE_PROD_OVERFLOW
    with pytest.raises(ProtocolViolation) as info:
        front.get_responses()
    assert f"impossible rsp_prod {bogus}" in str(info.value)
    assert f"rsp_cons {front.rsp_cons}" in str(info.value)
    for call in (
        front.unconsumed_responses,
        front.get_response,
        front.final_check_for_responses,
        front.free_requests,
        front.push_requests,
        lambda: front.put_request((0, 0)),
    ):
        with pytest.raises(ProtocolViolation):
            call()


def test_frontend_refuses_more_responses_than_outstanding_requests() -> None:
    area, front, _ = make_pair()
    front.put_requests([(1, 1), (2, 2)])
    front.push_requests()
    front.put_request((3, 3))  # not yet published: the backend cannot have answered it
    set_u32(area, RSP_PROD_OFFSET, front.rsp_cons + 3)
    with pytest.raises(ProtocolViolation, match="2 requests outstanding"):
        front.final_check_for_responses()


def test_backend_reads_req_prod_once_per_batch() -> None:
    area, front, back = make_pair()
    front.put_requests([(i, i) for i in range(3)])
    front.push_requests()
    assert back.unconsumed_requests() == 3  # snapshot: 3 validated requests
    set_u32(area, REQ_PROD_OFFSET, 10_000)  # the frontend turns hostile mid-batch
    assert [back.get_request() for _ in range(3)] == [(0, 0), (1, 1), (2, 2)]
    with pytest.raises(ProtocolViolation, match="impossible req_prod 10000"):
        back.get_request()  # the snapshot is used up: the next one is checked


def test_get_requests_honours_its_limit() -> None:
    _, front, back = make_pair()
    front.put_requests([(i, i) for i in range(6)])
    front.push_requests()
    assert back.get_requests(limit=2) == [(0, 0), (1, 1)]
    assert back.get_requests() == [(2, 2), (3, 3), (4, 4), (5, 5)]
    assert back.get_requests() == []
    with pytest.raises(ValueError, match="negative batch limit"):
        back.get_requests(-1)
    assert back.req_cons == 6

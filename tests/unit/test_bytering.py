"""channels.bytering: wrap-around, partial writes, hostile indices, the two page layouts."""

from __future__ import annotations

import struct

import pytest

from channels.bytering import (
    CONSOLE_PAGE_SIZE,
    XENCONS_IN_CONS_OFFSET,
    XENCONS_IN_PROD_OFFSET,
    XENCONS_OUT_CONS_OFFSET,
    XENCONS_OUT_OFFSET,
    XENCONS_OUT_PROD_OFFSET,
    XENSTORE_PAGE_SIZE,
    XENSTORE_REQ_PROD_OFFSET,
    XENSTORE_RSP_CONS_OFFSET,
    XENSTORE_RSP_PROD_OFFSET,
    ByteRing,
    console_rings,
    xenstore_rings,
)
from channels.errors import ProtocolViolation
from channels.ring import MASK32, RingError

U32 = struct.Struct("<I")
DATA, SIZE, CONS, PROD = 8, 16, 0, 4  # a 16-byte ring after two indices


def u32(area: memoryview, offset: int) -> int:
    return U32.unpack_from(area, offset)[0]


def small_ring(start: int = 0) -> tuple[memoryview, ByteRing]:
    area = memoryview(bytearray(DATA + SIZE))
    U32.pack_into(area, CONS, start & MASK32)
    U32.pack_into(area, PROD, start & MASK32)
    return area, ByteRing(area, DATA, SIZE, CONS, PROD, name="test ring")


def test_bytes_round_trip_and_indices_advance() -> None:
    area, ring = small_ring()
    assert ring.write(b"hello") == 5
    assert (u32(area, CONS), u32(area, PROD)) == (0, 5)
    assert bytes(area[DATA : DATA + 5]) == b"hello"
    assert ring.available() == 5
    assert ring.read() == b"hello"
    assert (u32(area, CONS), ring.available(), ring.free()) == (5, 0, SIZE)


def test_wrap_around_the_data_and_the_2_32_indices() -> None:
    area, ring = small_ring(start=2**32 - 3)
    ring.write(b"0123456789")  # byte x at x mod 16: starts at offset 13, wraps after 3
    assert bytes(area[DATA + 13 : DATA + 16]) == b"012"
    assert bytes(area[DATA : DATA + 7]) == b"3456789"
    assert u32(area, PROD) == 7  # 2**32 - 3 + 10, wrapped
    assert ring.read(4) == b"0123"
    assert ring.read() == b"456789"
    assert u32(area, CONS) == 7


def test_partial_write_when_nearly_full_then_zero() -> None:
    _, ring = small_ring(start=5)
    assert ring.write(b"x" * 20) == SIZE
    assert ring.free() == 0
    assert ring.write(b"more") == 0
    assert ring.read(6) == b"x" * 6
    assert ring.write(b"abcdefgh") == 6
    assert ring.read() == b"x" * 10 + b"abcdef"


def test_peek_does_not_consume() -> None:
    area, ring = small_ring(start=2**32 - 2)
    ring.write(b"abcd")
    assert ring.peek(3) == b"abc"
    assert ring.peek() == b"abcd"
    assert ring.available() == 4
    assert u32(area, CONS) == 2**32 - 2


def test_write_accepts_memoryviews_of_any_format() -> None:
    _, ring = small_ring()
    assert ring.write(memoryview(struct.pack("<HH", 1, 2)).cast("H")) == 4
    assert ring.read() == struct.pack("<HH", 1, 2)


@pytest.mark.parametrize(
    ("cons", "prod"),
    [(0, SIZE + 1), (10, 9), (2**32 - 1, SIZE)],  # too far ahead, backwards, ahead across wrap
)
def test_impossible_indices_break_the_ring_for_good(cons: int, prod: int) -> None:
    area, ring = small_ring()
    U32.pack_into(area, CONS, cons)
    U32.pack_into(area, PROD, prod)
    with pytest.raises(ProtocolViolation) as info:
        ring.available()
    assert f"test ring: impossible indices cons {cons} prod {prod}" in str(info.value)
    assert ring.broken
    U32.pack_into(area, PROD, cons)  # sane again: still broken
    for call in (ring.available, ring.free, ring.read, ring.peek, lambda: ring.write(b"x")):
        with pytest.raises(ProtocolViolation):
            call()


def test_a_closed_ring_says_so() -> None:
    _, ring = small_ring()
    ring.close()
    ring.close()
    with pytest.raises(RingError, match="test ring: closed"):
        ring.write(b"x")
    assert not ring.broken


def test_full_ring_is_possible_not_broken() -> None:
    area, ring = small_ring()
    U32.pack_into(area, PROD, SIZE)
    assert ring.available() == SIZE
    assert ring.free() == 0


def test_layout_checks() -> None:
    area = memoryview(bytearray(64))
    with pytest.raises(ValueError, match="not a power of two"):
        ByteRing(area, 8, 12, 0, 4)
    with pytest.raises(ValueError, match="outside"):
        ByteRing(area, 40, 32, 0, 4)
    with pytest.raises(ValueError, match="overlaps the data"):
        ByteRing(area, 0, 32, 16, 40)
    with pytest.raises(ValueError, match="aligned u32"):
        ByteRing(area, 0, 32, 34, 40)


def test_a_misaligned_index_is_refused() -> None:
    area = memoryview(bytearray(64))[2:]
    with pytest.raises(ValueError, match="not 4-byte aligned"):
        ByteRing(area, 16, 32, 0, 4)


def test_xenstore_page_layout() -> None:
    page = memoryview(bytearray(XENSTORE_PAGE_SIZE))
    req, rsp = xenstore_rings(page)
    req.write(b"req")
    rsp.write(b"rsp!")
    assert bytes(page[0:3]) == b"req"
    assert bytes(page[1024:1028]) == b"rsp!"
    assert struct.unpack_from("<IIII", page, 2048) == (0, 3, 0, 4)
    assert XENSTORE_REQ_PROD_OFFSET == 2052
    assert (XENSTORE_RSP_CONS_OFFSET, XENSTORE_RSP_PROD_OFFSET) == (2056, 2060)
    assert req.size == rsp.size == 1024
    rsp.read(1)
    assert u32(page, 2056) == 1


def test_console_page_layout() -> None:
    page = memoryview(bytearray(CONSOLE_PAGE_SIZE))
    in_, out = console_rings(page)
    assert (in_.size, out.size) == (1024, 2048)
    in_.write(b"keys")
    out.write(b"output")
    assert bytes(page[0:4]) == b"keys"
    assert bytes(page[XENCONS_OUT_OFFSET : XENCONS_OUT_OFFSET + 6]) == b"output"
    assert XENCONS_OUT_OFFSET == 1024
    assert u32(page, XENCONS_IN_PROD_OFFSET) == 4
    assert u32(page, XENCONS_OUT_PROD_OFFSET) == 6
    assert out.read() == b"output"
    assert u32(page, XENCONS_OUT_CONS_OFFSET) == 6
    assert u32(page, XENCONS_IN_CONS_OFFSET) == 0
    assert (XENCONS_IN_CONS_OFFSET, XENCONS_OUT_CONS_OFFSET) == (3072, 3080)

"""blkback's data path against a hostile frontend, with real rings, grants and doorbells.

The test plays the frontend: it packs blkif requests into a real ring on shared memory, grants
pages from a real grant pool and rings a real doorbell. VbdPath runs as it does in the vbd's
worker process, except that its device is a 4 MiB image file in tmp_path (filled with a known
pattern) and its hypercalls come from a table. Every bad request must be answered ERROR or
EOPNOTSUPP and counted, with the image and the frontend's pages untouched; a protocol violation
must fail the vbd (``on_fatal``, once) and nothing else.

Every test runs twice (``both_pumps``): with the native pump (channels._blkpump) and with the
Python reference. Device calls are recorded by wrapping Python's functions, so they are seen
only where Python makes them (the Python path, and what the native pump hands back to it:
FLUSH, DISCARD, grant refs it cannot look up); under the native pump the image's and the pages'
contents say what reached the device.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from backends.blkback import datapath
from backends.blkback.datapath import COUNTER_FIELDS, Counters, VbdPath
from backends.datapath_worker import ring_figures
from channels.blkif import (
    BLK_RING,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_READ,
    BLKIF_OP_RESERVED_1,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    MAX_GRANT_PAGES,
    SECTOR_SIZE,
    Request,
    Segment,
    pack_indirect_frames,
)
from channels.doorbell import Doorbell, create_doorbell, unlink_doorbell
from channels.evtchn import from_status
from channels.gnttab import GrantPool, pool_bytes
from channels.grants import BAD_GREF_BUDGET, DeviceGrants, GrantMapper
from channels.ring import (
    FIG_RESPONSES,
    PAGE_SIZE,
    RING_FIGURES,
    BackRing,
    FrontRing,
    u32_view,
)
from channels.shm import attach, create_segment, unlink_segment
from tests.unit.backend_hypercalls import Hypercalls, storm
from tests.unit.pumps import both_pumps  # noqa: F401  (runs each test with both)

FRONT = 5
GREF_BASE = 8
POOL_PAGES = 320  # 256 data pages for a 1 MiB indirect request, and room to spare
INDIRECT = 300  # first page used for indirect descriptors
RO_PAGE = POOL_PAGES - 2  # granted read-only
NO_POOL = 9999  # a gref in no pool: a bad gref (channels/grants.py)
UNGRANTED = POOL_PAGES - 1  # in the pool, never granted
MARKED = 8  # pages 0..7 start with a mark of their own, to see that nothing touched them
IMAGE_SECTORS = 8192  # 4 MiB
U64_MAX = (1 << 64) - 1
_ids = itertools.count()


def pattern(sector: int, count: int = 1) -> bytes:
    """The image's initial content: each sector is its own number (never zero) repeated."""
    return b"".join(
        struct.pack("<Q", s ^ 0xA5A5_A5A5_A5A5_A5A5) * 64 for s in range(sector, sector + count)
    )


IMAGE = pattern(0, IMAGE_SECTORS)


def mark(index: int) -> bytes:
    return bytes([0xC0 + index]) * PAGE_SIZE


Response = tuple[int, int, int]  # (id, operation, status)


@dataclass
class Vbd:
    front: FrontRing
    back: BackRing
    pool: GrantPool
    path: VbdPath
    counters: Counters
    counter_page: bytearray
    image: Path
    doorbell: Doorbell  # the backend's, as the frontend rings it
    fatal: list[str] = field(default_factory=list)
    fatal_event: threading.Event = field(default_factory=threading.Event)

    def gref(self, index: int) -> int:
        return GREF_BASE + index

    def fill(self, index: int, data: bytes) -> int:
        self.pool.page(index)[: len(data)] = data
        return self.gref(index)

    def page(self, index: int) -> bytes:
        return bytes(self.pool.page(index))

    def full(self, index: int) -> Segment:
        """A segment covering the whole of page `index`."""
        return Segment(self.gref(index), 0, 7)

    def frame(self, index: int, segments: Sequence[Segment]) -> int:
        """Write `segments` as indirect descriptors from page `index`; its gref."""
        for i, page in enumerate(pack_indirect_frames(segments)):
            self.fill(index + i, page)
        return self.gref(index)

    def submit(self, *requests: Request | bytes) -> None:
        for request in requests:
            raw = request if isinstance(request, bytes) else request.pack()
            self.front.put_request_raw(raw)
        if self.front.push_requests():  # an honest frontend rings only when asked to
            self.doorbell.ring()

    def responses(self, count: int, timeout: float = 10.0) -> list[Response]:
        got: list[Response] = []
        deadline = time.monotonic() + timeout
        pause = threading.Event()
        while len(got) < count and time.monotonic() < deadline:
            got += self.front.get_responses()
            pause.wait(0.005)
        got += self.front.get_responses()
        assert len(got) == count, f"wanted {count} responses, got {got}"
        return got

    def answer(self, request: Request | bytes) -> Response:
        self.submit(request)
        return self.responses(1)[0]

    def image_bytes(self, sector: int, count: int) -> bytes:
        return self.image.read_bytes()[sector * SECTOR_SIZE : (sector + count) * SECTOR_SIZE]

    def sha256(self) -> str:
        return hashlib.sha256(self.image.read_bytes()).hexdigest()


MakeVbd = Callable[..., Vbd]


def _build(
    stack: contextlib.ExitStack,
    tmp_path: Path,
    *,
    readonly: bool = False,
    io_threads: int = 8,  # VbdPath's default: 32 requests outstanding, a whole one-page ring
    sectors: int = IMAGE_SECTORS,
    flags: int = os.O_RDWR,
    bad_gref_budget: int = BAD_GREF_BUDGET,
    faults: str = "",
) -> Vbd:
    tag = f"hyper-test-blkback-{os.getpid()}-{next(_ids)}"
    ring_name, pool_name, bells = f"{tag}-ring", f"{tag}-pool", (f"{tag}-b", f"{tag}-f")
    create_segment(ring_name, PAGE_SIZE)
    stack.callback(unlink_segment, ring_name)
    create_segment(pool_name, pool_bytes(POOL_PAGES))
    stack.callback(unlink_segment, pool_name)
    for bell in bells:
        create_doorbell(bell)
        stack.callback(unlink_doorbell, bell)
    ring_segment = attach(ring_name)
    stack.callback(ring_segment.close)
    front = FrontRing.init(BLK_RING, ring_segment.buf)
    stack.callback(front.close)
    back = BackRing.attach(BLK_RING, ring_segment.buf)
    stack.callback(back.close)
    pool = GrantPool.open(pool_name, GREF_BASE, POOL_PAGES)
    stack.callback(pool.close)
    for i in range(UNGRANTED):
        pool.grant(i, 0, readonly=i == RO_PAGE)
    for i in range(MARKED):
        pool.page(i)[:] = mark(i)
    counter_page = bytearray(PAGE_SIZE)
    counters = Counters(memoryview(counter_page))
    stack.callback(counters.release)
    (figures,) = ring_figures(memoryview(counter_page), len(COUNTER_FIELDS), 1, 1)
    back.figures = figures.page
    calls = Hypercalls([(pool_name, GREF_BASE, POOL_PAGES)], bells)
    grants = GrantMapper(
        calls,
        DeviceGrants(FRONT, "vbd/51712", MAX_GRANT_PAGES),
        counters=counters,
        bad_gref_budget=bad_gref_budget,
    )
    stack.callback(grants.close)
    image = tmp_path / f"{tag}.img"
    image.write_bytes(IMAGE)
    fd = os.open(image, flags)
    stack.callback(os.close, fd)
    evtchn = from_status(calls, 1)
    stack.callback(evtchn.close)
    doorbell = Doorbell(bells[0])
    stack.callback(doorbell.close)
    fatal: list[str] = []
    fatal_event = threading.Event()

    def on_fatal(message: str) -> None:
        fatal.append(message)
        fatal_event.set()

    path = VbdPath(
        back,
        evtchn,
        grants,
        fd,
        sectors,
        readonly=readonly,
        counters=counters,
        on_fatal=on_fatal,
        io_threads=io_threads,
        faults=faults,
    )
    path.late_eoi.figures = back.figures  # as the worker has them counted
    vbd = Vbd(front, back, pool, path, counters, counter_page, image, doorbell, fatal, fatal_event)
    path.start()
    stack.callback(_stop, vbd)
    return vbd


def _stop(vbd: Vbd) -> None:
    vbd.path.stop()
    # Should stop() ever leave the dispatcher asleep, wake it before its doorbell is closed
    # (a semaphore closed under a waiter crashes the process instead of failing one test).
    for thread in vbd.path.threads:
        if thread.is_alive():
            vbd.doorbell.ring()
            thread.join(15)


@pytest.fixture
def make_vbd(tmp_path: Path) -> Iterator[MakeVbd]:
    with contextlib.ExitStack() as stack:
        yield lambda **kwargs: _build(stack, tmp_path, **kwargs)


@pytest.fixture
def vbd(make_vbd: MakeVbd) -> Vbd:
    return make_vbd()


def counts(vbd: Vbd, **expected: int) -> dict[str, int]:
    """What the counters should read: `expected`, and 0 everywhere else."""
    return {name: expected.get(name, 0) for name in COUNTER_FIELDS}


# -- good requests -------------------------------------------------------------------------------


def test_a_read_fills_the_page_from_the_right_sectors(vbd: Vbd) -> None:
    assert vbd.answer(Request.rw(BLKIF_OP_READ, 7, 10, [vbd.full(0)])) == (
        7,
        BLKIF_OP_READ,
        BLKIF_RSP_OKAY,
    )
    assert vbd.page(0) == pattern(10, 8)
    assert vbd.counters.as_dict() == counts(vbd, rd_req=1, rd_sect=8)


def test_the_counters_live_in_the_page_dom0_reads(vbd: Vbd) -> None:
    vbd.answer(Request.rw(BLKIF_OP_READ, 1, 0, [vbd.full(0)]))
    assert struct.unpack_from("<8Q", vbd.counter_page) == (1, 8, 0, 0, 0, 0, 0, 0)


def test_the_ring_figures_count_each_request_and_response(vbd: Vbd) -> None:
    for i in range(4):
        vbd.answer(Request.rw(BLKIF_OP_READ, i, 0, [vbd.full(0)]))
    assert vbd.back.figures is not None
    figures = vbd.back.figures
    deadline = time.monotonic() + 5  # counted just after the push the frontend saw
    while figures[FIG_RESPONSES] < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    counted = dict(zip(RING_FIGURES, figures.tolist(), strict=True))
    assert (counted["requests"], counted["responses"]) == (4, 4)
    assert counted["notify_sent"] >= 1  # FrontRing.init armed rsp_event at 1
    assert counted["wakeups"] >= 1  # the frontend rang for its first request at least


def test_a_write_lands_at_the_right_byte_offset_of_the_image(vbd: Vbd) -> None:
    data = os.urandom(PAGE_SIZE)
    vbd.fill(10, data)
    assert vbd.answer(Request.rw(BLKIF_OP_WRITE, 8, 100, [vbd.full(10)])) == (
        8,
        BLKIF_OP_WRITE,
        BLKIF_RSP_OKAY,
    )
    expected = bytearray(IMAGE)
    expected[100 * SECTOR_SIZE : 100 * SECTOR_SIZE + PAGE_SIZE] = data
    assert vbd.image.read_bytes() == expected
    assert vbd.counters.as_dict() == counts(vbd, wr_req=1, wr_sect=8)


def test_a_write_may_come_from_a_read_only_grant(vbd: Vbd) -> None:
    data = os.urandom(PAGE_SIZE)
    vbd.pool.page(RO_PAGE)[:] = data
    request = Request.rw(BLKIF_OP_WRITE, 9, 16, [vbd.full(RO_PAGE)])
    assert vbd.answer(request)[2] == BLKIF_RSP_OKAY
    assert vbd.image_bytes(16, 8) == data


def test_partial_segments_are_one_contiguous_run_on_the_device(vbd: Vbd) -> None:
    pages = [os.urandom(PAGE_SIZE) for _ in range(3)]
    for i, data in enumerate(pages):
        vbd.fill(10 + i, data)
    segments = [
        Segment(vbd.gref(10), 3, 7),
        Segment(vbd.gref(11), 0, 1),
        Segment(vbd.gref(12), 2, 2),
    ]
    assert vbd.answer(Request.rw(BLKIF_OP_WRITE, 1, 200, segments))[2] == BLKIF_RSP_OKAY
    written = pages[0][3 * 512 :] + pages[1][: 2 * 512] + pages[2][2 * 512 : 3 * 512]
    assert vbd.image_bytes(200, 8) == written
    assert vbd.image_bytes(192, 8) == pattern(192, 8)  # its neighbours are untouched
    assert vbd.image_bytes(208, 8) == pattern(208, 8)

    # Read the 8 sectors back into two pages at other offsets; the rest of each page stays.
    vbd.fill(20, b"\xee" * PAGE_SIZE)
    vbd.fill(21, b"\xee" * PAGE_SIZE)
    segments = [Segment(vbd.gref(20), 1, 5), Segment(vbd.gref(21), 5, 7)]
    assert vbd.answer(Request.rw(BLKIF_OP_READ, 2, 200, segments))[2] == BLKIF_RSP_OKAY
    assert vbd.page(20) == b"\xee" * 512 + written[: 5 * 512] + b"\xee" * 1024
    assert vbd.page(21) == b"\xee" * 5 * 512 + written[5 * 512 :]
    assert vbd.counters.as_dict() == counts(vbd, rd_req=1, rd_sect=8, wr_req=1, wr_sect=8)


def test_a_flush_without_segments_syncs_the_device(
    vbd: Vbd, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    flush = Request.rw(BLKIF_OP_FLUSH_DISKCACHE, 3, 0, [])
    assert vbd.answer(flush) == (3, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_RSP_OKAY)
    assert synced == [vbd.path.fd]
    assert vbd.counters.as_dict() == counts(vbd, flush_req=1)


def test_a_flush_with_segments_writes_them_then_syncs(vbd: Vbd) -> None:
    data = os.urandom(PAGE_SIZE)
    vbd.fill(10, data)
    flush = Request.rw(BLKIF_OP_FLUSH_DISKCACHE, 4, 64, [vbd.full(10)])
    assert vbd.answer(flush) == (4, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_RSP_OKAY)
    assert vbd.image_bytes(64, 8) == data
    assert vbd.counters.as_dict() == counts(vbd, flush_req=1, wr_sect=8)


def test_a_discard_punches_a_hole_that_reads_back_as_zeros(vbd: Vbd) -> None:
    os.fsync(vbd.path.fd)  # every block of the image allocated on disk
    before = os.stat(vbd.image).st_blocks
    discard = Request.discard(5, 2048, 2048)  # 1 MiB from 1 MiB
    assert vbd.answer(discard) == (5, BLKIF_OP_DISCARD, BLKIF_RSP_OKAY)
    assert os.stat(vbd.image).st_blocks < before
    assert os.stat(vbd.image).st_size == len(IMAGE)
    assert vbd.image_bytes(2048, 2048) == bytes(2048 * SECTOR_SIZE)
    assert vbd.image_bytes(2040, 8) == pattern(2040, 8)
    assert vbd.image_bytes(4096, 8) == pattern(4096, 8)
    assert vbd.answer(Request.rw(BLKIF_OP_READ, 6, 3000, [vbd.full(0)]))[2] == BLKIF_RSP_OKAY
    assert vbd.page(0) == bytes(PAGE_SIZE)
    assert vbd.counters.as_dict() == counts(vbd, discard_req=1, rd_req=1, rd_sect=8)


def test_a_discard_the_kernel_cannot_do_is_eopnotsupp(
    vbd: Vbd, monkeypatch: pytest.MonkeyPatch
) -> None:
    def punch_hole(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "not on this file system")

    monkeypatch.setattr(datapath, "punch_hole", punch_hole)
    discard = Request.discard(5, 0, 8)
    assert vbd.answer(discard) == (5, BLKIF_OP_DISCARD, BLKIF_RSP_EOPNOTSUPP)
    assert vbd.counters.as_dict() == counts(vbd, errors=1)


def test_an_indirect_write_and_read_move_one_mebibyte(vbd: Vbd) -> None:
    data = os.urandom(256 * PAGE_SIZE)
    for i in range(256):
        vbd.fill(i, data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE])
    # The descriptors are only read: a read-only grant of their page is enough.
    frame = vbd.frame(RO_PAGE, [vbd.full(i) for i in range(256)])
    write = Request.indirect(BLKIF_OP_WRITE, 11, 4096, 256, [frame])
    assert vbd.answer(write) == (11, BLKIF_OP_WRITE, BLKIF_RSP_OKAY)  # indirect_op echoed
    assert vbd.image_bytes(4096, 2048) == data
    assert vbd.image_bytes(4088, 8) == pattern(4088, 8)
    assert vbd.image_bytes(6144, 8) == pattern(6144, 8)

    for i in range(256):
        vbd.fill(i, bytes(PAGE_SIZE))
    read = Request.indirect(BLKIF_OP_READ, 12, 4096, 256, [frame])
    assert vbd.answer(read) == (12, BLKIF_OP_READ, BLKIF_RSP_OKAY)
    assert b"".join(vbd.page(i) for i in range(256)) == data
    assert vbd.counters.as_dict() == counts(vbd, rd_req=1, rd_sect=2048, wr_req=1, wr_sect=2048)


class Gate:
    """Stands in for os.preadv: holds every read until opened, counting those waiting."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.waiting = 0
        self._lock = threading.Lock()
        self._preadv = os.preadv

    def __call__(self, fd: int, views: list[memoryview], offset: int) -> int:
        with self._lock:
            self.waiting += 1
        self.open.wait(10)
        return self._preadv(fd, views, offset)

    def wait_for(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition() and time.monotonic() < deadline:
            self.open.wait(0.005)


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch, both_pumps: str) -> Iterator[Gate]:  # noqa: F811
    if both_pumps == "native":
        pytest.skip("holds reads by replacing os.preadv: the Python I/O threads' hand-off")
    gate = Gate()
    monkeypatch.setattr(os, "preadv", gate)
    yield gate
    gate.open.set()  # even if the test failed, no I/O thread stays held


def test_many_requests_in_flight_are_all_answered_by_id(vbd: Vbd, gate: Gate) -> None:
    ids = [(1 << 63) + i * 977 for i in range(vbd.front.nr_ents)]  # the whole ring
    vbd.submit(
        *(Request.rw(BLKIF_OP_READ, rid, i * 24, [vbd.full(i)]) for i, rid in enumerate(ids))
    )
    gate.wait_for(lambda: gate.waiting == 8)
    assert gate.waiting == 8, "every I/O thread should hold a read at once"
    gate.open.set()
    answers = vbd.responses(len(ids))
    assert sorted(answers) == sorted((rid, BLKIF_OP_READ, BLKIF_RSP_OKAY) for rid in ids)
    for i in range(len(ids)):
        assert vbd.page(i) == pattern(i * 24, 8), f"page {i}"
    assert vbd.counters.as_dict() == counts(vbd, rd_req=len(ids), rd_sect=8 * len(ids))


def test_the_ring_is_left_alone_while_every_io_slot_is_busy(make_vbd: MakeVbd, gate: Gate) -> None:
    vbd = make_vbd(io_threads=2)  # at most 2 * 4 = 8 requests outstanding
    ids = list(range(100, 100 + vbd.front.nr_ents))
    vbd.submit(*(Request.rw(BLKIF_OP_READ, rid, 0, [vbd.full(rid % 64)]) for rid in ids))
    gate.wait_for(lambda: vbd.counters.oo_req > 0 and gate.waiting == 2)
    assert vbd.counters.oo_req == 1, "the backend never found its I/O slots full"
    assert gate.waiting == 2
    assert vbd.back.req_cons == 8  # it consumed what it could serve, and no more
    assert vbd.front.get_responses() == []
    gate.open.set()
    assert sorted(vbd.responses(len(ids))) == [(rid, BLKIF_OP_READ, BLKIF_RSP_OKAY) for rid in ids]
    assert vbd.counters.oo_req >= 1


# -- bad requests --------------------------------------------------------------------------------

END = IMAGE_SECTORS
BadCase = Callable[[Vbd], tuple[Request | bytes, int, int]]  # -> (request, status, op echoed)


def with_nr_segments(request: Request, nr_segments: int) -> bytes:
    """A classic request whose nr_segments byte lies (pack() refuses to)."""
    raw = bytearray(request.pack())
    raw[1] = nr_segments
    return bytes(raw)


def w(*segments: Segment, sector: int = 0) -> Request:
    return Request.rw(BLKIF_OP_WRITE, 1, sector, segments)


def r(*segments: Segment, sector: int = 0) -> Request:
    return Request.rw(BLKIF_OP_READ, 1, sector, segments)


def indirect(v: Vbd, op: int, segments: Sequence[Segment], sector: int = 0) -> Request:
    return Request.indirect(op, 1, sector, len(segments), [v.frame(INDIRECT, segments)])


ERR, NOTSUPP = BLKIF_RSP_ERROR, BLKIF_RSP_EOPNOTSUPP
RD, WR = BLKIF_OP_READ, BLKIF_OP_WRITE

BAD: dict[str, BadCase] = {
    "unknown operation": lambda v: (Request.rw(9, 1, 0, [v.full(0)]), NOTSUPP, 9),
    "RESERVED_1": lambda v: (Request.rw(BLKIF_OP_RESERVED_1, 1, 0, [v.full(0)]), NOTSUPP, 4),
    "WRITE_BARRIER (not offered)": lambda v: (
        Request.rw(BLKIF_OP_WRITE_BARRIER, 1, 0, [v.full(0)]),
        NOTSUPP,
        BLKIF_OP_WRITE_BARRIER,
    ),
    "secure DISCARD (not offered)": lambda v: (
        Request.discard(1, 0, 8, secure=True),
        NOTSUPP,
        BLKIF_OP_DISCARD,
    ),
    "READ with no segment": lambda v: (r(), ERR, RD),
    "WRITE with no segment": lambda v: (w(), ERR, WR),
    "WRITE claiming 12 segments": lambda v: (
        with_nr_segments(w(*(v.full(i % 8) for i in range(11))), 12),
        ERR,
        WR,
    ),
    "READ claiming 255 segments": lambda v: (with_nr_segments(r(v.full(0)), 255), ERR, RD),
    "FLUSH claiming 12 segments": lambda v: (
        with_nr_segments(Request.rw(BLKIF_OP_FLUSH_DISKCACHE, 1, 0, [v.full(0)] * 11), 12),
        ERR,
        BLKIF_OP_FLUSH_DISKCACHE,
    ),
    "first_sect after last_sect": lambda v: (w(Segment(v.gref(0), 5, 4)), ERR, WR),
    "last_sect past the page": lambda v: (w(Segment(v.gref(0), 0, 8)), ERR, WR),
    "READ with last_sect 255": lambda v: (r(Segment(v.gref(0), 0, 255)), ERR, RD),
    "FLUSH with a bad segment": lambda v: (
        Request.rw(BLKIF_OP_FLUSH_DISKCACHE, 1, 0, [Segment(v.gref(0), 3, 2)]),
        ERR,
        BLKIF_OP_FLUSH_DISKCACHE,
    ),
    "WRITE running past the end": lambda v: (w(v.full(0), sector=END - 4), ERR, WR),
    "READ starting at the end": lambda v: (r(Segment(v.gref(0), 0, 0), sector=END), ERR, RD),
    "WRITE whose end wraps a u64": lambda v: (w(v.full(0), sector=U64_MAX - 3), ERR, WR),
    "gref outside any pool": lambda v: (r(Segment(NO_POOL, 0, 7)), ERR, RD),
    "gref in the pool, not granted": lambda v: (w(v.full(UNGRANTED)), ERR, WR),
    "READ into a read-only grant": lambda v: (r(v.full(RO_PAGE)), ERR, RD),
    "WRITE with a bad gref in its third segment": lambda v: (
        w(v.full(0), v.full(1), Segment(NO_POOL, 0, 7)),
        ERR,
        WR,
    ),
    "DISCARD of 0 sectors": lambda v: (Request.discard(1, 0, 0), ERR, BLKIF_OP_DISCARD),
    "DISCARD past the end": lambda v: (Request.discard(1, END - 8, 16), ERR, BLKIF_OP_DISCARD),
    "DISCARD whose end wraps a u64": lambda v: (
        Request.discard(1, U64_MAX - 7, 16),
        ERR,
        BLKIF_OP_DISCARD,
    ),
    "INDIRECT FLUSH": lambda v: (
        indirect(v, BLKIF_OP_FLUSH_DISKCACHE, [v.full(0)]),
        ERR,
        BLKIF_OP_FLUSH_DISKCACHE,
    ),
    "INDIRECT of unknown operation 9": lambda v: (indirect(v, 9, [v.full(0)]), ERR, 9),
    "INDIRECT of 0 segments": lambda v: (indirect(v, WR, []), ERR, WR),
    "INDIRECT of 257 segments": lambda v: (
        indirect(v, WR, [v.full(i % 8) for i in range(257)]),
        ERR,
        WR,
    ),
    "INDIRECT page outside any pool": lambda v: (
        Request.indirect(WR, 1, 0, 1, [NO_POOL]),
        ERR,
        WR,
    ),
    "INDIRECT page not granted": lambda v: (
        Request.indirect(RD, 1, 0, 1, [v.gref(UNGRANTED)]),
        ERR,
        RD,
    ),
    "INDIRECT segment past its page": lambda v: (
        indirect(v, WR, [v.full(0), Segment(v.gref(1), 0, 8)]),
        ERR,
        WR,
    ),
    "INDIRECT segment with a bad gref": lambda v: (
        indirect(v, WR, [v.full(0), Segment(NO_POOL, 0, 7)]),
        ERR,
        WR,
    ),
    "INDIRECT running past the end": lambda v: (
        indirect(v, WR, [v.full(i % 8) for i in range(16)], sector=END - 8),
        ERR,
        WR,
    ),
    "INDIRECT READ into a read-only grant": lambda v: (
        indirect(v, RD, [v.full(0), v.full(RO_PAGE)]),
        ERR,
        RD,
    ),
}


IN_NO_POOL = {case for case in BAD if "outside any pool" in case or "a bad gref" in case}


class DeviceCalls:
    """Records every call blkback's Python code makes on the device, and passes it on."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
        self.native = native  # the native pump's own I/O is not seen here
        self.calls: list[str] = []
        for module, name in (
            (os, "preadv"),
            (os, "pwritev"),
            (os, "fdatasync"),
            (datapath, "punch_hole"),
            (datapath, "blk_discard"),
        ):
            monkeypatch.setattr(module, name, self._recorder(name, getattr(module, name)))

    def _recorder(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            self.calls.append(name)
            return real(*args)

        return call

    def python_made(self, *names: str) -> bool:
        """The calls recorded are `names`, in any order (always so under the native pump,
        whose I/O the image and the pages show instead)."""
        return self.native or sorted(self.calls) == sorted(names)


@pytest.fixture
def device(monkeypatch: pytest.MonkeyPatch, both_pumps: str) -> DeviceCalls:  # noqa: F811
    return DeviceCalls(monkeypatch, both_pumps == "native")


@pytest.mark.parametrize("case", list(BAD))
def test_each_bad_request_is_refused_and_counted(vbd: Vbd, device: DeviceCalls, case: str) -> None:
    request, status, op = BAD[case](vbd)
    sha = vbd.sha256()
    assert vbd.answer(request) == (1, op, status)
    assert device.calls == [], "a refused request reached the device"
    bad_grefs = int(case in IN_NO_POOL)
    assert vbd.counters.as_dict() == counts(vbd, errors=1, bad_grefs=bad_grefs)
    assert vbd.counters.bad_grefs == bad_grefs
    assert vbd.sha256() == sha, "the image changed"
    assert all(vbd.page(i) == mark(i) for i in range(MARKED)), "a page was written"
    assert not vbd.fatal
    # The vbd still works afterwards.
    assert vbd.answer(r(vbd.full(0), sector=8)) == (1, RD, BLKIF_RSP_OKAY)
    assert vbd.page(0) == pattern(8, 8)
    assert device.python_made("preadv")


def test_a_read_only_vbd_refuses_writes_flushes_and_discards(make_vbd: MakeVbd) -> None:
    vbd = make_vbd(readonly=True)
    sha = vbd.sha256()
    vbd.fill(10, os.urandom(PAGE_SIZE))
    refused = [
        Request.rw(WR, 1, 0, [vbd.full(10)]),
        Request.rw(BLKIF_OP_FLUSH_DISKCACHE, 2, 0, []),
        Request.rw(BLKIF_OP_FLUSH_DISKCACHE, 3, 0, [vbd.full(10)]),
        Request.discard(4, 0, 8),
        Request.indirect(WR, 5, 0, 1, [vbd.frame(INDIRECT, [vbd.full(10)])]),
    ]
    vbd.submit(*refused, Request.rw(RD, 6, 8, [vbd.full(0)]))
    answers = {rid: status for rid, _op, status in vbd.responses(6)}
    assert answers == {1: ERR, 2: ERR, 3: ERR, 4: ERR, 5: ERR, 6: BLKIF_RSP_OKAY}
    assert vbd.page(0) == pattern(8, 8)
    assert vbd.sha256() == sha
    assert vbd.counters.as_dict() == counts(vbd, errors=5, rd_req=1, rd_sect=8)


def test_a_short_read_is_an_error(make_vbd: MakeVbd) -> None:
    vbd = make_vbd(sectors=IMAGE_SECTORS + 64)  # the device claims more than the file holds
    assert vbd.answer(r(vbd.full(0), sector=IMAGE_SECTORS + 8)) == (1, RD, ERR)
    assert vbd.page(0) == mark(0)
    assert vbd.counters.as_dict() == counts(vbd, errors=1)


def test_a_write_the_device_refuses_is_an_error(make_vbd: MakeVbd) -> None:
    vbd = make_vbd(flags=os.O_RDONLY)  # pwritev fails with EBADF
    sha = vbd.sha256()
    assert vbd.answer(w(vbd.full(0))) == (1, WR, ERR)
    assert vbd.sha256() == sha
    assert vbd.counters.as_dict() == counts(vbd, errors=1)


# -- protocol violations and lifecycle -----------------------------------------------------------


def test_an_impossible_req_prod_fails_that_vbd_once_and_nothing_else(make_vbd: MakeVbd) -> None:
    victim, bystander = make_vbd(), make_vbd()
    sha = victim.sha256()
    req_prod = u32_view(victim.front._area, 0)
    req_prod[0] = (req_prod[0] + 1000) & 0xFFFFFFFF
    req_prod.release()
    victim.doorbell.ring()
    assert victim.fatal_event.wait(10), "the vbd must be failed"
    dispatcher = victim.path.threads[0]
    dispatcher.join(10)
    assert not dispatcher.is_alive(), "the dispatcher must stop"
    victim.doorbell.ring()  # later notifications find nobody to report again
    victim.path.stop()
    assert len(victim.fatal) == 1 and "req_prod" in victim.fatal[0]
    assert victim.sha256() == sha
    assert victim.counters.as_dict() == counts(victim)
    assert bystander.answer(r(bystander.full(0))) == (1, RD, BLKIF_RSP_OKAY)
    assert not bystander.fatal


def test_a_grant_violation_mid_batch_answers_what_came_before_and_runs_nothing_after(
    make_vbd: MakeVbd, device: DeviceCalls
) -> None:
    """One batch: a READ and a WRITE, then a READ into a gref in no pool past the budget of
    bad grefs (0 here: the first one is a violation), then another WRITE. The requests before
    the violation were consumed and checked: they are done and answered. The vbd is failed
    once, and nothing after the violation reaches the device."""
    vbd = make_vbd(bad_gref_budget=0)
    sha = vbd.sha256()
    vbd.fill(1, b"B" * PAGE_SIZE)
    vbd.fill(2, b"C" * PAGE_SIZE)
    vbd.submit(
        Request.rw(BLKIF_OP_READ, 1, 8, [vbd.full(0)]),
        Request.rw(BLKIF_OP_WRITE, 2, 16, [vbd.full(1)]),
        Request.rw(BLKIF_OP_READ, 3, 0, [Segment(NO_POOL, 0, 7)]),
        Request.rw(BLKIF_OP_WRITE, 4, 24, [vbd.full(2)]),
    )
    assert vbd.fatal_event.wait(10), "the vbd must be failed"
    vbd.path.stop()  # every thread joined: whatever was to be done is done
    assert sorted(vbd.front.get_responses()) == [
        (1, BLKIF_OP_READ, BLKIF_RSP_OKAY),
        (2, BLKIF_OP_WRITE, BLKIF_RSP_OKAY),
    ]
    assert len(vbd.fatal) == 1 and "grefs in none of its pools" in vbd.fatal[0]
    assert vbd.page(0) == pattern(8, 8)
    assert vbd.image_bytes(16, 8) == b"B" * PAGE_SIZE
    assert vbd.image_bytes(24, 8) == IMAGE[24 * SECTOR_SIZE : 32 * SECTOR_SIZE], "WRITE 4 ran"
    assert device.python_made("preadv", "pwritev")
    assert vbd.sha256() != sha


def test_stop_on_an_idle_path_ends_every_thread(vbd: Vbd) -> None:
    vbd.answer(r(vbd.full(0)))  # served, and then idle
    vbd.path.stop()
    assert [t.name for t in vbd.path.threads if t.is_alive()] == []
    vbd.path.stop()  # idempotent


def test_a_doorbell_storm_on_an_empty_ring_costs_a_few_wakeups(vbd: Vbd) -> None:
    """XSA-332: a frontend ringing in a tight loop must not buy itself a dom0 CPU. Spurious
    wakeups slow the dispatcher down (late EOI), and it still serves the next real request."""
    rings = storm(vbd.doorbell.ring, 1.0)
    assert rings > 1000
    assert vbd.path.late_eoi.spurious < 64, f"{vbd.path.late_eoi.spurious} wakeups for nothing"
    vbd.fill(0, pattern(5))
    assert vbd.answer(w(vbd.full(0), sector=5))[2] == BLKIF_RSP_OKAY

"""blkfront's data path against the real blkback data path, over real rings, grants and
doorbells in shared memory, with an image file as the disk (no root, no FUSE): what a program
reads and writes through /dev/xvdX, minus the FUSE layer."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import os
import random
import struct
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from channels import blkif as B
from channels.doorbell import DoorbellPair, create_doorbell, unlink_doorbell
from channels.evtchn import EventChannel, from_status
from channels.gnttab import GrantPool, pool_bytes
from channels.grants import DeviceGrants, GrantMapper
from channels.ring import BackRing, FrontRing
from channels.shm import create_segment, unlink_segment
from dom0.blkback.datapath import Counters, VbdPath
from domu.blkfront.datapath import DiskPath, Extents
from tests.unit.backend_hypercalls import Hypercalls, storm

DATA_PAGES = 512
INDIRECT_PAGES = 32
DISK = 8 << 20
_ids = itertools.count()


# -- the page allocator ---------------------------------------------------------------------------


def test_extents_hand_out_aligned_contiguous_runs_and_merge_them_back() -> None:
    extents = Extents(16)
    a = extents.take(1)
    b = extents.take(3)  # rounded up to 4
    c = extents.take(8)
    assert a is not None and b is not None and c is not None
    assert b % 4 == 0 and c % 8 == 0
    runs = {range(a, a + 1), range(b, b + 4), range(c, c + 8)}
    assert len(set().union(*map(set, runs))) == 13, "runs never overlap"
    assert extents.take(8) is None
    assert extents.free_pages() == 3
    for first, count in ((a, 1), (b, 3), (c, 8)):
        extents.give(first, count)
    assert extents.free_pages() == 16
    assert extents.take(16) == 0, "every buddy merged back into the whole pool"


def test_extents_refuse_a_pool_that_is_not_a_power_of_two() -> None:
    with pytest.raises(ValueError, match="power of two"):
        Extents(12)


def test_extents_survive_random_use() -> None:
    extents, held, rng = Extents(64), [], random.Random(5)
    for _ in range(2000):
        if held and rng.random() < 0.5:
            extents.give(*held.pop(rng.randrange(len(held))))
            continue
        count = rng.choice((1, 1, 2, 3, 8, 17))
        first = extents.take(count)
        if first is not None:
            held.append((first, count))
    taken = [p for first, count in held for p in range(first, first + count)]
    assert len(taken) == len(set(taken))
    for run in held:
        extents.give(*run)
    assert extents.take(64) == 0


# -- the disk over a real ring ------------------------------------------------------------------


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[tuple[DiskPath, Path, Counters]]:
    with contextlib.ExitStack() as stack:
        rig = _connect(stack, tmp_path, serve=True)
        yield rig.path, rig.image, rig.counters


@dataclass
class Rig:
    path: DiskPath
    image: Path
    counters: Counters
    back: BackRing  # the backend's end of the ring: served by VbdPath, or by the test
    evtchn: EventChannel  # the backend's end of the event channel
    ring_page: memoryview  # the shared ring page, for a test that forges its indices
    broken: list[str]  # what on_broken was told
    data_page: Callable[[int], memoryview]  # a data page by its gref, as the backend maps it


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[Rig]:
    """A disk whose backend is the test itself: it answers as it likes."""
    with contextlib.ExitStack() as stack:
        yield _connect(stack, tmp_path, serve=False)


def _connect(stack: contextlib.ExitStack, tmp_path: Path, *, serve: bool) -> Rig:
    tag = f"hyper-test-blkfront-{os.getpid()}-{next(_ids)}"
    names = {kind: f"{tag}-{kind}" for kind in ("ring", "data", "indirect")}
    sizes = {"ring": 1, "data": DATA_PAGES, "indirect": INDIRECT_PAGES}
    bases = {"ring": 8, "data": 9, "indirect": 9 + DATA_PAGES}
    for kind, name in names.items():
        create_segment(name, pool_bytes(sizes[kind]))
        stack.callback(unlink_segment, name)
    bells = (f"{tag}-back", f"{tag}-front")
    for bell in bells:
        create_doorbell(bell)
        stack.callback(unlink_doorbell, bell)
    pools = {k: GrantPool.open(names[k], bases[k], sizes[k]) for k in names}
    for kind, pool in pools.items():
        stack.callback(pool.close)
        for i in range(pool.pages):
            pool.grant(i, 0, readonly=kind == "indirect")
    front = FrontRing.init(B.BLK_RING, pools["ring"].page(0))
    stack.callback(front.close)

    calls = Hypercalls([(names[k], bases[k], sizes[k]) for k in names], bells)
    grants = GrantMapper(calls, DeviceGrants(5, "vbd/51712", B.MAX_GRANT_PAGES))  # type: ignore[arg-type]
    stack.callback(grants.close)
    back = BackRing.attach(B.BLK_RING, grants.resolve(8, write=True))
    stack.callback(back.close)
    image = tmp_path / f"{tag}.img"
    image.write_bytes(bytes(DISK))
    fd = os.open(image, os.O_RDWR)
    stack.callback(os.close, fd)
    counters = Counters()
    evtchn = from_status(calls, 1)  # type: ignore[arg-type]
    backend = VbdPath(
        back,
        evtchn,
        grants,
        fd,
        DISK // 512,
        readonly=False,
        counters=counters,
        on_fatal=lambda message: None,
    )
    stack.callback(evtchn.close)
    if serve:
        backend.start()
        stack.callback(backend.stop)
    broken: list[str] = []
    path = DiskPath(
        front,
        DoorbellPair(bells[1], bells[0]),
        pools["data"],
        [bases["data"] + i for i in range(DATA_PAGES)],
        pools["indirect"],
        [bases["indirect"] + i for i in range(INDIRECT_PAGES)],
        sectors=DISK // 512,
        max_segments=256,
        on_broken=broken.append,
    )
    stack.callback(path.stop)

    def data_page(gref: int) -> memoryview:
        return pools["data"].page(gref - bases["data"])

    return Rig(path, image, counters, back, evtchn, pools["ring"].page(0), broken, data_page)


def test_a_large_write_crosses_in_whole_requests_and_reads_back(
    disk: tuple[DiskPath, Path, Counters],
) -> None:
    path, image, counters = disk
    data = random.Random(1).randbytes(3 << 20)
    assert path.write(1 << 20, data) == len(data)
    assert image.read_bytes()[1 << 20 : 4 << 20] == data
    assert path.read(1 << 20, len(data)) == data
    assert counters.wr_req == 3, "one indirect request per MiB"
    assert counters.errors == 0


def test_unaligned_writes_read_modify_write_their_sectors(
    disk: tuple[DiskPath, Path, Counters],
) -> None:
    path, image, _ = disk
    path.write(0, b"\xaa" * 2048)
    path.write(5, b"hello")
    path.write(1000, b"x" * 100)
    expected = bytearray(b"\xaa" * 2048)
    expected[5:10] = b"hello"
    expected[1000:1100] = b"x" * 100
    assert image.read_bytes()[:2048] == expected
    assert path.read(3, 10) == bytes(expected[3:13])


def test_addresses_are_read_into_and_written_from_directly(
    disk: tuple[DiskPath, Path, Counters],
) -> None:
    path, image, _ = disk
    source = ctypes.create_string_buffer(random.Random(2).randbytes(64 << 10), 64 << 10)
    assert path.write_from(ctypes.addressof(source), 64 << 10, 4096) == 64 << 10
    target = ctypes.create_string_buffer(64 << 10)
    assert path.read_into(ctypes.addressof(target), 64 << 10, 4096) == 64 << 10
    assert target.raw == source.raw == image.read_bytes()[4096 : 4096 + (64 << 10)]
    tail = ctypes.create_string_buffer(8192)
    assert path.read_into(ctypes.addressof(tail), 8192, DISK - 4096) == 4096, "cut at the end"


def test_many_callers_at_once_each_get_their_own_data(
    disk: tuple[DiskPath, Path, Counters],
) -> None:
    path, _, counters = disk
    blocks = {i: random.Random(i).randbytes(4096 * (1 + i % 5)) for i in range(64)}

    def write_then_read(i: int) -> bool:
        offset = i * (64 << 10)
        path.write(offset, blocks[i])
        return path.read(offset, len(blocks[i])) == blocks[i]

    with ThreadPoolExecutor(16) as pool:
        assert all(pool.map(write_then_read, blocks))
    assert counters.errors == 0


def test_partial_writes_to_one_sector_at_once_all_land(
    disk: tuple[DiskPath, Path, Counters],
) -> None:
    path, image, _ = disk
    pieces = {i: bytes([0x41 + i]) * 30 for i in range(16)}  # 480 bytes across sectors 0-1

    def write(i: int) -> int:
        return path.write(100 + 30 * i, pieces[i])

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(write, pieces)) == [30] * 16
    assert image.read_bytes()[100:580] == b"".join(pieces.values())


def test_flush_and_discard_reach_the_image(disk: tuple[DiskPath, Path, Counters]) -> None:
    path, image, counters = disk
    path.write(0, b"\xff" * (1 << 20))
    path.flush()
    path.discard(4096, 8192)
    assert image.read_bytes()[4096 : 4096 + 8192] == bytes(8192)
    assert image.read_bytes()[:4096] == b"\xff" * 4096
    assert counters.flush_req == 1 and counters.discard_req == 1


def test_writing_past_the_end_fails_and_the_disk_keeps_working(
    disk: tuple[DiskPath, Path, Counters],
) -> None:
    path, _, _ = disk
    with pytest.raises(OSError) as raised:
        path.write(DISK - 512, bytes(1024))
    assert raised.value.errno == errno.ENOSPC
    assert path.read(DISK - 512, 1024) == bytes(512)


# -- a hostile backend ----------------------------------------------------------------------------

WAIT = 10.0  # seconds a test waits for the frontend's requests


def _requests(rig: Rig, count: int, timeout: float = WAIT) -> list[B.Request]:
    """The next ``count`` requests the frontend posts, decoded; fewer if none comes for
    ``timeout`` seconds."""
    slot = B.BLK_RING.request_slot.size
    taken: list[B.Request] = []
    while len(taken) < count:
        block = rig.back.get_requests_block()
        taken += [B.Request.unpack(block[i : i + slot]) for i in range(0, len(block), slot)]
        waiting = len(taken) < count and not rig.back.final_check_for_requests()
        if waiting and not rig.evtchn.wait(timeout):
            break
    return taken


def _take_requests(rig: Rig, count: int) -> list[tuple[int, int]]:
    """Wait until the frontend has posted ``count`` requests; their (id, operation)."""
    taken = _requests(rig, count)
    assert len(taken) == count, f"only {len(taken)} of {count} requests came"
    return [(request.id, request.operation) for request in taken]


def _answer(rig: Rig, *responses: tuple[int, int, int]) -> None:
    rig.back.put_responses_flat([v for response in responses for v in response])
    rig.back.push_responses()
    rig.evtchn.notify()


def _fails_with_eio(call: Future[bytes]) -> None:
    with pytest.raises(OSError) as raised:
        call.result(timeout=WAIT)
    assert raised.value.errno == errno.EIO


def test_a_response_for_an_id_not_in_flight_breaks_the_disk(hostile: Rig) -> None:
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(hostile.path.read, 0, 4096)
        [(rid, op)] = _take_requests(hostile, 1)
        _answer(hostile, (rid + 1, op, B.BLKIF_RSP_OKAY))
        _fails_with_eio(call)
    assert len(hostile.broken) == 1 and "not in flight" in hostile.broken[0]
    with pytest.raises(OSError) as later:
        hostile.path.read(0, 4096)
    assert later.value.errno == errno.EIO, "a broken disk stays broken"


def test_a_duplicate_response_fails_every_caller_still_waiting(hostile: Rig) -> None:
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(hostile.path.read, 0, 4096)
        second = pool.submit(hostile.path.read, 8192, 4096)
        (rid, op), _ = _take_requests(hostile, 2)
        _answer(hostile, (rid, op, B.BLKIF_RSP_OKAY), (rid, op, B.BLKIF_RSP_OKAY))
        results = []
        for call in (first, second):
            try:
                results.append(call.result(timeout=WAIT))
            except OSError as exc:
                results.append(exc.errno)
    # The first answer completes its caller; the duplicate breaks the disk, and the caller
    # still waiting fails instead of hanging.
    assert sorted(results, key=str) == sorted([bytes(4096), errno.EIO], key=str), results
    assert len(hostile.broken) == 1 and f"id {rid}" in hostile.broken[0]


def test_a_response_naming_another_operation_breaks_the_disk(hostile: Rig) -> None:
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(hostile.path.read, 0, 4096)
        [(rid, _)] = _take_requests(hostile, 1)
        _answer(hostile, (rid, B.BLKIF_OP_WRITE, B.BLKIF_RSP_OKAY))
        _fails_with_eio(call)
    assert "names operation" in hostile.broken[0]


def test_an_unknown_status_breaks_the_disk(hostile: Rig) -> None:
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(hostile.path.read, 0, 4096)
        [(rid, op)] = _take_requests(hostile, 1)
        _answer(hostile, (rid, op, 7))
        _fails_with_eio(call)
    assert "unknown status" in hostile.broken[0]


def test_an_impossible_rsp_prod_breaks_the_disk(hostile: Rig) -> None:
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(hostile.path.read, 0, 4096)
        _take_requests(hostile, 1)
        struct.pack_into("<I", hostile.ring_page, 8, 1000)  # rsp_prod far past any request
        hostile.evtchn.notify()
        _fails_with_eio(call)
    assert len(hostile.broken) == 1


def test_a_notification_storm_costs_a_few_wakeups_and_the_answer_still_comes(
    hostile: Rig,
) -> None:
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(hostile.path.read, 0, 4096)
        [(rid, op)] = _take_requests(hostile, 1)
        rings = storm(hostile.evtchn.notify, 1.0)
        spurious = hostile.path.late_eoi.spurious
        _answer(hostile, (rid, op, B.BLKIF_RSP_OKAY))  # before any assert: the call must end
        assert call.result(timeout=WAIT) == bytes(4096)
    assert rings > 1000
    assert spurious < 64, f"{spurious} wakeups for nothing"
    assert not hostile.broken


def test_error_statuses_fail_only_their_own_call(hostile: Rig) -> None:
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(hostile.path.read, 0, 4096)
        [(rid, op)] = _take_requests(hostile, 1)
        _answer(hostile, (rid, op, B.BLKIF_RSP_EOPNOTSUPP))
        with pytest.raises(OSError) as raised:
            call.result(timeout=WAIT)
        assert raised.value.errno == errno.EOPNOTSUPP
        again = pool.submit(hostile.path.read, 0, 4096)
        [(rid, op)] = _take_requests(hostile, 1)
        _answer(hostile, (rid, op, B.BLKIF_RSP_OKAY))
        assert again.result(timeout=WAIT) == bytes(4096)
    assert hostile.broken == []


def test_a_restarted_backend_gets_every_unanswered_request_again(hostile: Rig) -> None:
    slot = B.BLK_RING.request_slot.size
    with ThreadPoolExecutor(3) as pool:
        calls = [pool.submit(hostile.path.write, i << 12, bytes([i + 1]) * 4096) for i in range(3)]
        posted = _take_requests(hostile, 3)
        before = bytes(hostile.ring_page[64 : 64 + 3 * slot])  # the three slots as posted
        # The old backend publishes one answer (and dies before notifying).
        answered = posted[0]
        hostile.back.put_responses_flat([*answered, B.BLKIF_RSP_OKAY])
        hostile.back.push_responses()

        assert hostile.path.reset() == 2
        fresh = BackRing.attach(B.BLK_RING, hostile.ring_page)
        assert fresh.get_requests_block() == before[slot:], "the other two, byte for byte"
        fresh.put_responses_flat([v for r in posted[1:] for v in (*r, B.BLKIF_RSP_OKAY)])
        fresh.push_responses()
        hostile.evtchn.notify()
        assert [call.result(timeout=WAIT) for call in calls] == [4096] * 3
    assert hostile.broken == []


# -- a read-modify-write and a write to the same sector ------------------------------------------

HOLD = 0.5  # seconds the backend holds a write-back waiting for a write that should not come
#            (unguarded, that write is posted within microseconds)


def _serve(rig: Rig, image: bytearray, request: B.Request) -> None:
    """Do a READ or WRITE on ``image`` through the request's granted pages, and answer it."""
    at = request.sector_number * B.SECTOR_SIZE
    for segment in request.segments:
        end = segment.offset + segment.nbytes
        with rig.data_page(segment.gref)[segment.offset : end] as page:
            if request.operation == B.BLKIF_OP_READ:
                page[:] = image[at : at + segment.nbytes]
            else:
                image[at : at + segment.nbytes] = page
        at += segment.nbytes
    _answer(rig, (request.id, request.operation, B.BLKIF_RSP_OKAY))


def test_a_write_answered_during_a_read_modify_write_of_its_sector_is_not_undone(
    hostile: Rig,
) -> None:
    image = bytearray(DISK)
    with ThreadPoolExecutor(2) as pool:
        partial = pool.submit(hostile.path.write, 100, b"r" * 10)  # inside sector 0
        [read] = _requests(hostile, 1)
        assert read.operation == B.BLKIF_OP_READ and read.sector_number == 0
        _serve(hostile, image, read)
        [write_back] = _requests(hostile, 1)
        assert write_back.operation == B.BLKIF_OP_WRITE and write_back.sector_number == 0

        # The backend holds the write-back. A write of the whole sector, answered now, would
        # be undone by it: the write-back carries the sector as it was before.
        whole = pool.submit(hostile.path.write, 0, b"w" * 512)
        early = _requests(hostile, 1, timeout=HOLD)
        for request in early:
            _serve(hostile, image, request)
        _serve(hostile, image, write_back)
        for request in _requests(hostile, 1 - len(early)):
            _serve(hostile, image, request)
        assert partial.result(timeout=WAIT) == 10 and whole.result(timeout=WAIT) == 512

    partial_first = b"w" * 512
    whole_first = b"w" * 100 + b"r" * 10 + b"w" * 402
    assert bytes(image[:512]) in (partial_first, whole_first), "one write after the other"
    assert hostile.broken == []

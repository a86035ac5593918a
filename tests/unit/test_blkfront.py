"""blkfront's data path against the real blkback data path, over real rings, grants and
doorbells in shared memory, with an image file as the disk (no root, no FUSE): what a program
reads and writes through /dev/xvdX, minus the FUSE layer."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import os
import random
import socket
import stat
import struct
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from backends.blkback.datapath import Counters, VbdPath
from channels import blkif as B
from channels import pumps
from channels.doorbell import DoorbellPair, create_doorbell, unlink_doorbell
from channels.evtchn import EventChannel, from_status
from channels.gnttab import GrantPool, pool_bytes
from channels.grants import DeviceGrants, GrantMapper
from channels.ring import BackRing, FrontRing
from channels.shm import create_segment, unlink_segment
from domu.blkfront import fuse_wire as F
from domu.blkfront.datapath import DiskPath, Extents, Run
from domu.blkfront.native import NativeDisk, make_pump
from domu.blkfront.server import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FuseSession,
    NativeSession,
)
from tests.unit.backend_hypercalls import Hypercalls, storm

DATA_PAGES = 512
INDIRECT_PAGES = 32
DISK = 8 << 20
_ids = itertools.count()


# -- the page allocator ---------------------------------------------------------------------------


def test_extents_hand_out_aligned_runs_largest_first_and_merge_them_back() -> None:
    extents = Extents(16)
    a = extents.take_runs(1)
    b = extents.take_runs(3)  # a run of 2 and a run of 1: no page wasted
    c = extents.take_runs(8)
    assert a is not None and b is not None and c is not None
    assert [n for _, n in b] == [2, 1] and [n for _, n in c] == [8]
    runs = [*a, *b, *c]
    assert all(first % count == 0 for first, count in runs), "every run an aligned block"
    pages = [p for first, count in runs for p in range(first, first + count)]
    assert len(pages) == len(set(pages)) == 12, "runs never overlap"
    assert extents.take_runs(5) is None, "only 4 pages are free"
    assert extents.free_pages() == extents.free == 4
    last = extents.take_runs(4)
    assert last is not None and [n for _, n in last] == [4]
    for first, count in runs + last:
        extents.give(first, count)
    assert extents.take_runs(16) == [(0, 16)], "every buddy merged back into the whole pool"


def test_extents_refuse_a_pool_that_is_not_a_power_of_two() -> None:
    with pytest.raises(ValueError, match="power of two"):
        Extents(12)


def test_a_split_run_is_aligned_blocks_each_freed_on_its_own() -> None:
    extents = Extents(16)
    [run] = extents.take_runs(16) or []
    head, tail = Extents.split(run, 5)
    assert sum(n for _, n in head) == 5 and sum(n for _, n in tail) == 11
    assert [p for first, n in head + tail for p in range(first, first + n)] == list(range(16))
    for first, count in tail + head:
        assert first % count == 0
        extents.give(first, count)
    assert extents.take_runs(16) == [(0, 16)], "every buddy merged back into the whole pool"


def test_extents_survive_random_use() -> None:
    extents, rng = Extents(64), random.Random(5)
    held: list[list[Run]] = []
    for _ in range(2000):
        if held and rng.random() < 0.5:
            for first, count in held.pop(rng.randrange(len(held))):
                extents.give(first, count)
            continue
        runs = extents.take_runs(rng.choice((1, 1, 2, 3, 8, 17)))
        if runs is not None:
            held.append(runs)
    taken = [p for runs in held for first, count in runs for p in range(first, first + count)]
    assert len(taken) == len(set(taken)) == 64 - extents.free
    for runs in held:
        for first, count in runs:
            extents.give(first, count)
    assert extents.take_runs(64) == [(0, 64)]


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
    native: Callable[[int, bool], NativeDisk]  # the native pump's disk over a /dev/fuse fd


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[Rig]:
    """A disk whose backend is the test itself: it answers as it likes."""
    with contextlib.ExitStack() as stack:
        yield _connect(stack, tmp_path, serve=False)


def _connect(
    stack: contextlib.ExitStack, tmp_path: Path, *, serve: bool, start: bool = True
) -> Rig:
    """The disk and its backend; ``start``: DiskPath takes the responses (else the native
    pump will: ``Rig.native``)."""
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
    grants = GrantMapper(calls, DeviceGrants(5, "vbd/51712", B.MAX_GRANT_PAGES))
    stack.callback(grants.close)
    back = BackRing.attach(B.BLK_RING, grants.resolve(8, write=True))
    stack.callback(back.close)
    image = tmp_path / f"{tag}.img"
    image.write_bytes(bytes(DISK))
    fd = os.open(image, os.O_RDWR)
    stack.callback(os.close, fd)
    counters = Counters()
    evtchn = from_status(calls, 1)
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
    if start:
        path.start()
    stack.callback(path.stop)

    def data_page(gref: int) -> memoryview:
        return pools["data"].page(gref - bases["data"])

    def native(fd: int, readonly: bool) -> NativeDisk:
        bell = DoorbellPair(bells[1], bells[0])
        stack.callback(bell.close)
        pump = make_pump(
            fd,
            front,
            bell,
            pools["data"],
            pools["indirect"],
            sectors=DISK // 512,
            max_segments=256,
            readonly=readonly,
        )
        if pump is None:
            pytest.skip(pumps.describe())
        disk = NativeDisk(pump, sectors=DISK // 512, on_broken=broken.append)
        disk.start()
        stack.callback(disk.stop)
        return disk

    ring_page = pools["ring"].page(0)
    return Rig(path, image, counters, back, evtchn, ring_page, broken, data_page, native)


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


def _post(path: DiskPath, operation: int, offset: int, runs: list[Run], nbytes: int) -> int:
    """Post a transfer and wait for its answer; the status."""
    answers: list[int] = []
    answered = threading.Event()

    def done(status: int) -> None:
        answers.append(status)
        answered.set()

    path.post(operation, offset, runs, nbytes, done)
    assert answered.wait(WAIT), "the transfer was never answered"
    return answers[0]


def test_posted_transfers_move_data_straight_between_the_pages_and_the_disk(
    disk: tuple[DiskPath, Path, Counters],
) -> None:
    path, image, counters = disk
    data = random.Random(2).randbytes(64 << 10)
    runs = path.take_pages(16)
    assert runs is not None
    [pages] = path.views(runs, len(data))  # a fresh pool: one run
    pages[:] = data
    assert _post(path, B.BLKIF_OP_WRITE, 4096, runs, len(data)) == B.BLKIF_RSP_OKAY
    assert image.read_bytes()[4096 : 4096 + len(data)] == data

    pages[:] = bytes(len(data))
    assert _post(path, B.BLKIF_OP_READ, 4096, runs, len(data)) == B.BLKIF_RSP_OKAY
    assert bytes(pages) == data
    path.give_pages(runs)
    assert counters.wr_req == counters.rd_req == 1, "one request each way"


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
        results: list[bytes | int | None] = []  # the data, or the errno
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


# -- the FUSE session -----------------------------------------------------------------------------

ALL_INIT_FLAGS = (1 << 32) - 1  # a kernel offering everything: the server takes what it wants


class FakeKernel:
    """The kernel's end of /dev/fuse: one request per message, one reply per message (a
    SOCK_SEQPACKET socket pair keeps each message whole, as /dev/fuse does)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._uniques = itertools.count(2, 2)

    def send(self, opcode: int, args: bytes = b"", data: bytes = b"") -> int:
        unique = next(self._uniques)
        size = F.IN_HEADER.size + len(args) + len(data)
        header = F.IN_HEADER.pack(size, opcode, unique, F.FUSE_ROOT_ID, 1000, 1000, 42, 0, 0)
        self.sock.send(header + args + data)
        return unique

    def reply(self) -> tuple[int, int, bytes]:
        """The next reply: (unique, error, payload)."""
        self.sock.settimeout(WAIT)
        message = self.sock.recv(2 << 20)
        length, error, unique = F.OUT_HEADER.unpack_from(message)
        assert length == len(message), "a reply's header gives its length"
        return unique, error, message[F.OUT_HEADER.size :]

    def call(self, opcode: int, args: bytes = b"", data: bytes = b"") -> tuple[int, bytes]:
        """A request and its reply: (error, payload)."""
        unique = self.send(opcode, args, data)
        answered, error, payload = self.reply()
        assert answered == unique
        return error, payload

    def read(self, offset: int, size: int) -> tuple[int, bytes]:
        return self.call(F.FUSE_READ, F.READ_IN.pack(0, offset, size, 0, 0, os.O_RDWR, 0))

    def write(self, offset: int, data: bytes, flags: int = os.O_RDWR) -> tuple[int, bytes]:
        args = F.WRITE_IN.pack(0, offset, len(data), 0, 0, flags, 0)
        return self.call(F.FUSE_WRITE, args, data)

    def init(self, flags: int = ALL_INIT_FLAGS) -> bytes:
        """INIT as a 7.38 kernel sends it; the server's INIT_OUT."""
        error, payload = self.call(F.FUSE_INIT, F.INIT_IN.pack(7, 38, 128 << 10, flags) + bytes(48))
        assert error == 0
        return payload


@dataclass
class Session:
    kernel: FakeKernel
    rig: Rig
    mounted: threading.Event
    thread: threading.Thread
    disk: DiskPath | NativeDisk  # what the session serves from (its reset replays)


def _session(
    stack: contextlib.ExitStack, rig: Rig, *, native: bool, readonly: bool = False
) -> Session:
    """A FuseSession over ``rig``'s disk (or the native pump's NativeSession), served by one
    thread, and the kernel's end of it."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stack.callback(theirs.close)
    mounted = threading.Event()
    kw = {"readonly": readonly, "uid": 1000, "gid": 1000, "on_mounted": mounted.set}
    fd = theirs.fileno()
    disk: DiskPath | NativeDisk = rig.native(fd, readonly) if native else rig.path
    kind = NativeSession if native else FuseSession
    session = kind(fd, disk, **kw)  # type: ignore[arg-type]
    thread = threading.Thread(target=session.run, name="fuse-session")
    thread.start()
    stack.callback(thread.join, WAIT)
    stack.callback(ours.close)  # the connection ends: the session returns
    return Session(FakeKernel(ours), rig, mounted, thread, disk)


@pytest.fixture(params=["python", "native"])
def native(request: pytest.FixtureRequest) -> bool:
    """Each FUSE session test runs with the Python reference and with the native pump
    (channels._fusepump): the same requests must get the same answers and leave the same
    disk. Where the extension is not built the native run is skipped, except under CI."""
    if request.param == "native":
        _need_native()
    return bool(request.param == "native")


def _need_native() -> None:
    if pumps.native(pumps.FUSEPUMP) is None:
        if os.environ.get("CI"):
            pytest.fail(f"the native pumps are not built: {pumps.describe()}")
        pytest.skip(pumps.describe())


def test_the_native_pump_ends_as_channels_pumps_numbers_it() -> None:
    _need_native()
    module = pumps.native(pumps.FUSEPUMP)
    for name in ("STOPPED", "PYTHON", "ENDED", "BROKEN", "ERROR"):
        assert getattr(module, name) == getattr(pumps, f"FUSE_{name}"), name


@contextlib.contextmanager
def _mounted(
    tmp_path: Path, *, serve: bool, native: bool, readonly: bool = False
) -> Iterator[Session]:
    """A session past INIT; its backend the real blkback data path, or the test."""
    with contextlib.ExitStack() as stack:
        rig = _connect(stack, tmp_path, serve=serve, start=not native)
        session = _session(stack, rig, native=native, readonly=readonly)
        session.kernel.init()
        yield session


@pytest.fixture
def fuse(tmp_path: Path, native: bool) -> Iterator[Session]:
    with _mounted(tmp_path, serve=True, native=native) as session:
        yield session


@pytest.fixture
def hostile_fuse(tmp_path: Path, native: bool) -> Iterator[Session]:
    with _mounted(tmp_path, serve=False, native=native) as session:
        yield session


def test_init_takes_what_a_disk_needs_and_then_the_file_is_the_disk(
    tmp_path: Path, native: bool
) -> None:
    with contextlib.ExitStack() as stack:
        rig = _connect(stack, tmp_path, serve=True, start=not native)
        session = _session(stack, rig, native=native)
        kernel = session.kernel
        assert kernel.call(F.FUSE_GETATTR, F.GETATTR_IN.pack(0, 0, 0))[0] == -errno.EIO
        assert not session.mounted.is_set(), "nothing is served before INIT"

        out = F.INIT_OUT.unpack(kernel.init())
        major, minor, _, flags, background, _, max_write, _, max_pages, _, _ = out
        assert (major, minor) == (7, F.FUSE_KERNEL_MINOR_VERSION)
        assert flags == F.FUSE_ASYNC_READ | F.FUSE_BIG_WRITES | F.FUSE_ASYNC_DIO | F.FUSE_MAX_PAGES
        assert (max_write, max_pages, background) == (1 << 20, 256, 64)
        assert session.mounted.wait(WAIT), "the kernel is told once INIT is answered"

        error, attr = kernel.call(F.FUSE_GETATTR, F.GETATTR_IN.pack(0, 0, 0))
        fields = F.ATTR_OUT.unpack(attr)
        assert error == 0 and fields[3:5] == (F.FUSE_ROOT_ID, DISK)  # ino, size
        assert fields[12:16] == (stat.S_IFREG | 0o600, 1, 1000, 1000)  # mode, nlink, uid, gid
        error, opened = kernel.call(F.FUSE_OPEN, F.OPEN_IN.pack(os.O_RDWR, 0))
        assert error == 0 and F.OPEN_OUT.unpack(opened)[1] & F.FOPEN_DIRECT_IO
        assert kernel.call(F.FUSE_LOOKUP, data=b"name\0")[0] == -errno.ENOENT
        assert kernel.call(9, F.IN_HEADER.pack(0, 0, 0, 0, 0, 0, 0, 0, 0)[:16])[0] == -errno.ENOSYS
        kernel.send(F.FUSE_FORGET, struct.pack("<Q", 1))  # takes no reply
        assert kernel.call(F.FUSE_STATFS)[0] == 0, "the reply after is the STATFS's"


def test_writes_and_reads_go_through_the_ring_to_the_image(fuse: Session) -> None:
    kernel, image = fuse.kernel, fuse.rig.image
    data = random.Random(3).randbytes(64 << 10)
    assert kernel.write(8192, data) == (0, F.write_out(len(data)))
    assert image.read_bytes()[8192 : 8192 + len(data)] == data
    assert kernel.read(8192, len(data)) == (0, data)
    assert kernel.read(DISK - 4096, 8192) == (0, data[:0] + image.read_bytes()[-4096:]), "cut"
    assert kernel.read(DISK, 4096) == (0, b"")
    assert kernel.write(DISK, bytes(512))[0] == -errno.ENOSPC
    assert fuse.rig.counters.errors == 0


def test_part_sectors_are_read_modified_and_written_back(fuse: Session) -> None:
    kernel, image = fuse.kernel, fuse.rig.image
    assert kernel.write(0, b"\xaa" * 2048)[0] == 0
    assert kernel.write(5, b"hello") == (0, F.write_out(5))
    assert kernel.write(1000, b"x" * 100) == (0, F.write_out(100))
    expected = bytearray(b"\xaa" * 2048)
    expected[5:10] = b"hello"
    expected[1000:1100] = b"x" * 100
    assert image.read_bytes()[:2048] == expected
    assert kernel.read(3, 10) == (0, bytes(expected[3:13]))


def test_sync_writes_fsync_and_punched_holes_reach_the_backend(fuse: Session) -> None:
    kernel, image, counters = fuse.kernel, fuse.rig.image, fuse.rig.counters
    assert kernel.write(0, b"\xff" * (64 << 10), flags=os.O_RDWR | os.O_DSYNC)[0] == 0
    assert counters.flush_req == 1, "an O_DSYNC write is followed by a flush"
    assert kernel.call(F.FUSE_FSYNC, F.FSYNC_IN.pack(0, 0, 0))[0] == 0
    assert counters.flush_req == 2
    punch = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    assert kernel.call(F.FUSE_FALLOCATE, F.FALLOCATE_IN.pack(0, 4096, 8192, punch, 0))[0] == 0
    assert counters.discard_req == 1
    assert image.read_bytes()[:16384] == b"\xff" * 4096 + bytes(8192) + b"\xff" * 4096
    assert kernel.call(F.FUSE_FALLOCATE, F.FALLOCATE_IN.pack(0, 0, 4096, 0, 0))[0] == 0
    zero_range = 0x10
    unsupported = F.FALLOCATE_IN.pack(0, 0, 4096, zero_range, 0)
    assert kernel.call(F.FUSE_FALLOCATE, unsupported)[0] == -errno.EOPNOTSUPP


def test_a_truncation_keeps_the_size_and_the_owner_cannot_change(fuse: Session) -> None:
    kernel = fuse.kernel

    def setattr_(valid: int, size: int = 0, mode: int = 0) -> tuple[int, bytes]:
        fields = [valid, 0, 0, size, 0, 0, 0, 0, 0, 0, 0, mode, 0, 0, 0, 0]
        return kernel.call(F.FUSE_SETATTR, F.SETATTR_IN.pack(*fields))

    error, attr = setattr_(F.FATTR_SIZE)
    assert error == 0 and F.ATTR_OUT.unpack(attr)[4] == DISK
    assert setattr_(F.FATTR_MODE, mode=0o777)[0] == -errno.EPERM


def test_a_read_only_disk_refuses_writes(tmp_path: Path, native: bool) -> None:
    with _mounted(tmp_path, serve=True, native=native, readonly=True) as session:
        kernel = session.kernel
        assert kernel.write(0, bytes(4096))[0] == -errno.EROFS
        assert F.ATTR_OUT.unpack(kernel.call(F.FUSE_GETATTR, bytes(16))[1])[12] & 0o777 == 0o400
        assert kernel.read(0, 4096) == (0, bytes(4096))
        assert session.rig.counters.wr_req == 0


def test_one_thread_puts_every_request_on_the_ring_before_any_is_answered(
    hostile_fuse: Session,
) -> None:
    kernel, rig = hostile_fuse.kernel, hostile_fuse.rig
    image = bytearray(random.Random(4).randbytes(64 * 4096)) + bytearray(DISK - 64 * 4096)
    uniques = {
        kernel.send(F.FUSE_READ, F.READ_IN.pack(0, i * 4096, 4096, 0, 0, os.O_RDWR, 0)): i
        for i in range(32)
    }
    requests = _requests(rig, 32)
    assert len(requests) == 32, "all 32 on the ring, none answered yet"
    helpers = [t.name for t in threading.enumerate() if t.name.startswith("blkfront-slow")]
    assert helpers == [], "the session thread posted them all itself"
    for request in reversed(requests):
        _serve(rig, image, request)
    for _ in range(32):
        unique, error, payload = kernel.reply()
        i = uniques.pop(unique)
        assert error == 0 and payload == image[i * 4096 : (i + 1) * 4096]
    assert uniques == {}


def test_a_backend_that_breaks_the_protocol_fails_the_disk_with_eio(hostile_fuse: Session) -> None:
    kernel, rig = hostile_fuse.kernel, hostile_fuse.rig
    unique = kernel.send(F.FUSE_READ, F.READ_IN.pack(0, 0, 4096, 0, 0, os.O_RDWR, 0))
    [request] = _requests(rig, 1)
    _answer(rig, (request.id + 1, request.operation, B.BLKIF_RSP_OKAY))
    assert kernel.reply() == (unique, -errno.EIO, b"")
    assert kernel.write(0, bytes(4096))[0] == -errno.EIO, "a broken disk stays broken"
    assert len(rig.broken) == 1 and "not in flight" in rig.broken[0]


def _read_4k(kernel: FakeKernel, offset: int) -> int:
    return kernel.send(F.FUSE_READ, F.READ_IN.pack(0, offset, 4096, 0, 0, os.O_RDWR, 0))


VIOLATIONS = {
    # what the backend writes for the first of two READs in flight: (responses, reason)
    "a duplicate answer": (lambda first: [(first.id, 0, 0), (first.id, 0, 0)], "not in flight"),
    "another operation": (lambda first: [(first.id, B.BLKIF_OP_WRITE, 0)], "names operation"),
    "an unknown status": (lambda first: [(first.id, 0, 7)], "unknown status"),
}


@pytest.mark.parametrize("violation", VIOLATIONS)
def test_every_protocol_violation_fails_what_is_in_flight_and_what_comes(
    hostile_fuse: Session, violation: str
) -> None:
    kernel, rig = hostile_fuse.kernel, hostile_fuse.rig
    responses, reason = VIOLATIONS[violation]
    first, second = _read_4k(kernel, 0), _read_4k(kernel, 4096)
    posted = _requests(rig, 2)
    request = next(r for r in posted if r.sector_number == 0)
    _answer(rig, *responses(request))
    replies = {kernel.reply()[:2], kernel.reply()[:2]}
    if violation == "a duplicate answer":  # the first answer was good; the second is not
        assert replies == {(first, 0), (second, -errno.EIO)}
    else:
        assert replies == {(first, -errno.EIO), (second, -errno.EIO)}
    assert kernel.write(0, bytes(4096))[0] == -errno.EIO, "a broken disk stays broken"
    assert len(rig.broken) == 1 and reason in rig.broken[0]


def test_an_impossible_rsp_prod_fails_the_disk(hostile_fuse: Session) -> None:
    kernel, rig = hostile_fuse.kernel, hostile_fuse.rig
    unique = _read_4k(kernel, 0)
    assert len(_requests(rig, 1)) == 1
    struct.pack_into("<I", rig.ring_page, 8, 1000)  # rsp_prod far past any request
    rig.evtchn.notify()
    assert kernel.reply() == (unique, -errno.EIO, b"")
    assert len(rig.broken) == 1 and "impossible rsp_prod" in rig.broken[0]


def test_after_a_backend_restart_the_unanswered_requests_are_posted_again(
    hostile_fuse: Session,
) -> None:
    kernel, rig = hostile_fuse.kernel, hostile_fuse.rig
    image = bytearray(random.Random(5).randbytes(3 * 4096)) + bytearray(DISK - 3 * 4096)
    uniques = [_read_4k(kernel, i * 4096) for i in range(3)]
    posted = _requests(rig, 3)
    slot = B.BLK_RING.request_slot.size
    first = next(r for r in posted if r.sector_number == 0)
    _serve(rig, image, first)  # answered before the backend dies
    assert kernel.reply()[:2] == (uniques[0], 0)
    others = [r for r in posted if r is not first]
    as_posted = [bytes(rig.ring_page[64 + i * slot : 64 + (i + 1) * slot]) for i in range(3)]
    unanswered = [raw for raw, r in zip(as_posted, posted, strict=True) if r is not first]

    assert hostile_fuse.disk.reset() == 2
    fresh = BackRing.attach(B.BLK_RING, rig.ring_page)
    assert fresh.get_requests_block() == b"".join(unanswered), "byte for byte, in order"
    restarted = dataclasses.replace(rig, back=fresh)
    for request in others:
        _serve(restarted, image, request)
    answers = {kernel.reply()[:3] for _ in others}
    assert answers == {
        (u, 0, bytes(image[i * 4096 : (i + 1) * 4096])) for i, u in enumerate(uniques) if i
    }
    assert rig.broken == []


def test_a_write_to_a_sector_being_patched_waits_without_holding_up_other_requests(
    tmp_path: Path,
) -> None:
    with _mounted(tmp_path, serve=False, native=False) as session:
        _patch_beside_other_requests(session)


def _patch_beside_other_requests(hostile_fuse: Session) -> None:
    """The Python path (SectorGate): only writes to the patched sector wait."""
    kernel, rig = hostile_fuse.kernel, hostile_fuse.rig
    image = bytearray(DISK)
    patch = kernel.send(F.FUSE_WRITE, F.WRITE_IN.pack(0, 100, 5, 0, 0, os.O_RDWR, 0), b"hello")
    [read] = _requests(rig, 1)
    assert (read.operation, read.sector_number) == (B.BLKIF_OP_READ, 0), "the patch reads first"

    whole = kernel.send(F.FUSE_WRITE, F.WRITE_IN.pack(0, 0, 512, 0, 0, os.O_RDWR, 0), b"w" * 512)
    other = kernel.send(F.FUSE_READ, F.READ_IN.pack(0, 8192, 4096, 0, 0, os.O_RDWR, 0))
    [elsewhere] = _requests(rig, 1)
    assert elsewhere.sector_number == 16, "the write to sector 0 waits; the READ behind it does not"
    _serve(rig, image, elsewhere)
    assert kernel.reply()[:2] == (other, 0)

    _serve(rig, image, read)
    [write_back] = _requests(rig, 1)
    assert (write_back.operation, write_back.sector_number) == (B.BLKIF_OP_WRITE, 0)
    _serve(rig, image, write_back)
    [held] = _requests(rig, 1)  # posted as the patch lets go of the sector
    assert (held.operation, held.sector_number) == (B.BLKIF_OP_WRITE, 0)
    _serve(rig, image, held)
    answers = {kernel.reply()[:2], kernel.reply()[:2]}
    assert answers == {(patch, 0), (whole, 0)}
    assert bytes(image[:512]) == b"w" * 512, "the whole-sector write came after the patch"


def test_with_the_native_pump_a_patch_has_the_ring_to_itself_and_later_writes_follow_it(
    tmp_path: Path,
) -> None:
    _need_native()
    with _mounted(tmp_path, serve=False, native=True) as session:
        _patch_alone(session)


def _patch_alone(hostile_fuse: Session) -> None:
    """The native pump: a patch waits for the ring to empty, and everything after it waits."""
    kernel, rig = hostile_fuse.kernel, hostile_fuse.rig
    image = bytearray(DISK)
    first = kernel.send(F.FUSE_WRITE, F.WRITE_IN.pack(0, 0, 512, 0, 0, os.O_RDWR, 0), b"a" * 512)
    [earlier] = _requests(rig, 1)
    patch = kernel.send(F.FUSE_WRITE, F.WRITE_IN.pack(0, 100, 5, 0, 0, os.O_RDWR, 0), b"hello")
    whole = kernel.send(F.FUSE_WRITE, F.WRITE_IN.pack(0, 0, 512, 0, 0, os.O_RDWR, 0), b"w" * 512)
    assert _requests(rig, 1, timeout=HOLD) == [], "the patch waits for the write in flight"
    _serve(rig, image, earlier)
    assert kernel.reply()[:2] == (first, 0)

    [read] = _requests(rig, 1)
    assert (read.operation, read.sector_number) == (B.BLKIF_OP_READ, 0), "the patch reads first"
    assert _requests(rig, 1, timeout=HOLD) == [], "nothing else is posted meanwhile"
    _serve(rig, image, read)
    [write_back] = _requests(rig, 1)
    assert (write_back.operation, write_back.sector_number) == (B.BLKIF_OP_WRITE, 0)
    _serve(rig, image, write_back)
    assert kernel.reply()[:2] == (patch, 0)
    assert bytes(image[100:105]) == b"hello" and bytes(image[:100]) == b"a" * 100

    [later] = _requests(rig, 1)
    assert (later.operation, later.sector_number) == (B.BLKIF_OP_WRITE, 0)
    _serve(rig, image, later)
    assert kernel.reply()[:2] == (whole, 0)
    assert bytes(image[:512]) == b"w" * 512, "the whole-sector write came after the patch"

"""blkfront's data path: byte-range reads and writes turned into blkif requests on the ring.

Callers are the FUSE handler threads serving ``/dev/xvdX``; each call blocks until the backend
has answered every request it took. Many calls run at once (the kernel sends FUSE requests
from many programs and from its own readahead), so many requests are in flight on the ring.

Memory: a pool of data pages and one indirect page per ring slot, all granted to the backend
once when the disk connects (persistent grants: the backend's checks are done once per page).
A call takes the pages it needs from a free list, waiting when the pool is exhausted; a request
spans at most ``max_segments`` pages (11 in the request itself, up to 256 through an indirect
page when the backend offers ``feature-max-indirect-segments``), and a larger call is split.
Reads copy the answered pages out; writes copy the data in before the request is posted.
A write of part of a sector reads the sector, changes the part and writes it back whole; while
it does, no other write to that sector is in flight (SectorGate), so none is undone by it.

Responses are reaped by the callers themselves, leader/follower style: of the callers waiting
for an answer, one (the leader) sleeps on the event channel and, when woken, takes every
response the ring holds, finishing their requests and waking their callers; when its own
request is answered it hands the lead to another waiting caller (or to none, if nobody waits:
then the next caller to wait leads). The caller whose request was answered is the one woken by
the backend's notification, with no reaper thread in between: one wakeup less per round trip,
and an idle disk has no thread at all on the event channel.

A backend that restarts (its process was killed; xen-split-driver.md §6.9) comes back with
no memory of the ring: ``reset`` starts the ring over and puts every request not yet answered
on it again (Linux's blkif_recover replays its shadow copies the same way). Their callers just
wait longer. Replaying is safe because a request's pages stay untouched until it is answered:
a write carries the same data to the same sectors, a read fills the same pages again.

The backend is not trusted (xen-split-driver.md §1.8): responses are copied out once; an id
that names no request in flight, an impossible ``rsp_prod`` or an unknown status marks the disk
broken (``on_broken``: an ``error`` node, Closing), and every call in progress or to come fails
with EIO. Nothing it writes can make the frontend crash or spin.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator

from channels import blkif as B
from channels.evtchn import EventChannel, LateEoi
from channels.gnttab import GrantPool
from channels.ring import FrontRing, RingBroken, RingError

log = logging.getLogger(__name__)

HEAL_TIMEOUT = 10.0
PAGE_SIZE = 4096
SECTORS_PER_PAGE = PAGE_SIZE // B.SECTOR_SIZE
_RESPONSE = B.BLK_RING.response_slot
_STATUS_ERRNO = {B.BLKIF_RSP_ERROR: errno.EIO, B.BLKIF_RSP_EOPNOTSUPP: errno.EOPNOTSUPP}


#: Moves n bytes between the caller's memory (at byte ``done`` of its transfer) and ``region``.
_Copy = Callable[[int, memoryview, int], None]


def _into_view(view: memoryview) -> _Copy:
    def copy(done: int, region: memoryview, n: int) -> None:
        view[done : done + n] = region[:n]

    return copy


def _from_view(view: memoryview) -> _Copy:
    def copy(done: int, region: memoryview, n: int) -> None:
        region[:n] = view[done : done + n]

    return copy


def _address_of(region: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(region))


def _into_address(address: int) -> _Copy:
    def copy(done: int, region: memoryview, n: int) -> None:
        ctypes.memmove(address + done, _address_of(region), n)

    return copy


def _from_address(address: int) -> _Copy:
    def copy(done: int, region: memoryview, n: int) -> None:
        ctypes.memmove(_address_of(region), address + done, n)

    return copy


class Extents:
    """A buddy allocator of contiguous page runs in a pool of ``pages`` (a power of two): a
    request's pages are one region, copied with one ``memmove`` and named by consecutive grefs.
    A run of n pages takes the next power of two; freeing merges buddies back."""

    def __init__(self, pages: int) -> None:
        if pages <= 0 or pages & (pages - 1):
            raise ValueError(f"a pool of {pages} pages is not a power of two")
        self.pages = pages
        self.top = pages.bit_length() - 1
        self._free: list[set[int]] = [set() for _ in range(self.top + 1)]
        self._free[self.top].add(0)

    @staticmethod
    def order(count: int) -> int:
        return (count - 1).bit_length()

    def take(self, count: int) -> int | None:
        """The first page of a free run of at least ``count`` pages, or None."""
        want = self.order(count)
        for order in range(want, self.top + 1):
            if self._free[order]:
                first = self._free[order].pop()
                while order > want:  # split, keeping the upper halves free
                    order -= 1
                    self._free[order].add(first + (1 << order))
                return first
        return None

    def give(self, first: int, count: int) -> None:
        order = self.order(count)
        while order < self.top:
            buddy = first ^ (1 << order)
            if buddy not in self._free[order]:
                break
            self._free[order].remove(buddy)
            first = min(first, buddy)
            order += 1
        self._free[order].add(first)

    def free_pages(self) -> int:
        return sum(len(runs) << order for order, runs in enumerate(self._free))


class SectorGate:
    """Keeps each read-modify-write apart from every write to its sectors (a range lock).

    A write of part of a sector reads the sector, changes the part and writes the whole sector
    back. A write to that sector answered between the read and the write-back would be undone
    by it, after its caller was told it was done. So writes (whole-sector writes and discards)
    hold their range while in flight; a read-modify-write first claims its range (later writes
    to it wait), then waits for the writes in flight there to be answered, and only then reads.
    Two read-modify-writes that share a sector take turns. Writes elsewhere never wait, and a
    write pays one uncontended lock round trip going in and one going out, which is cheap next
    to its trip across the ring. Ordering by *answers* also keeps the replay after a backend
    restart safe: a read-modify-write's write-back is posted only after every write it overlaps
    was answered, so a replay never puts them in the other order. (Two whole-sector writes to
    the same sectors are both in flight, unordered, as on any disk: the caller of neither was
    told the other was done.)

    Ranges are byte offsets of whole sectors, ``[start, end)``.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition(threading.Lock())
        self._writes: dict[int, tuple[int, int]] = {}  # in flight, by token
        self._claims: list[tuple[int, int]] = []  # read-modify-writes in progress or waiting
        self._tokens = itertools.count()

    def enter_write(self, start: int, end: int) -> int:
        """Wait until no read-modify-write claims a sector in ``[start, end)``; the token for
        ``leave_write``."""
        with self._changed:
            while self._claims and _overlaps(self._claims, start, end):
                self._changed.wait()
            token = next(self._tokens)
            self._writes[token] = (start, end)
            return token

    def leave_write(self, token: int) -> None:
        """The write ``token`` is answered (or failed)."""
        with self._changed:
            del self._writes[token]
            if self._claims:
                self._changed.notify_all()

    @contextlib.contextmanager
    def read_modify_write(self, start: int, end: int) -> Iterator[None]:
        """Own ``[start, end)``: no write to it is in flight or starts until the block ends."""
        claim = (start, end)
        with self._changed:
            self._changed.wait_for(lambda: not _overlaps(self._claims, start, end))
            self._claims.append(claim)
            self._changed.wait_for(lambda: not _overlaps(self._writes.values(), start, end))
        try:
            yield
        finally:
            with self._changed:
                self._claims.remove(claim)
                self._changed.notify_all()


def _overlaps(ranges: Iterable[tuple[int, int]], start: int, end: int) -> bool:
    return any(first < end and start < last for first, last in ranges)


class DiskBroken(OSError):
    """The backend broke the protocol: every I/O on this disk fails with EIO from now on."""

    def __init__(self, reason: str) -> None:
        super().__init__(errno.EIO, f"disk broken: {reason}")


class _InFlight:
    """One request on the ring, and its caller. A sleeping caller blocks on ``wake``, a bare
    lock held from the start (an Event would make a Condition and a new lock at every wait);
    whoever clears ``sleeping`` releases it, once, under DiskPath's lock."""

    __slots__ = ("answers", "finished", "request", "sleeping", "status", "wake")

    def __init__(self, request: bytes, answers: frozenset[int]) -> None:
        self.request = request  # the slot as posted: replayed after a backend restart
        self.answers = answers
        self.status = B.BLKIF_RSP_OKAY
        self.finished = False
        self.sleeping = False
        self.wake = threading.Lock()
        self.wake.acquire()

    def finish(self, status: int) -> None:
        """Called once, by whoever takes the request out of the in-flight table (lock held)."""
        self.status = status
        self.finished = True
        if self.sleeping:
            self.sleeping = False
            self.wake.release()


class DiskPath:
    """One connected disk: the ring, its event channel and its granted pages."""

    def __init__(
        self,
        ring: FrontRing,
        evtchn: EventChannel,
        data: GrantPool,
        data_grefs: list[int],
        indirect: GrantPool | None,
        indirect_grefs: list[int],
        *,
        sectors: int,
        max_segments: int,
        on_broken: Callable[[str], None],
    ) -> None:
        self.ring = ring
        self.evtchn = evtchn
        self.late_eoi = LateEoi()  # a backend ringing for nothing (a storm) is slowed down
        self.sectors = sectors
        self.max_segments = max_segments
        self.on_broken = on_broken
        # The data pages are contiguous in the pool: a run of them is one region to copy.
        self._data = data.region()
        self._grefs = data_grefs
        self._indirect = [indirect.page(i) for i in range(len(indirect_grefs))] if indirect else []
        self._indirect_grefs = indirect_grefs
        self._room = threading.Condition()  # pages or ring slots were freed
        self._gate = SectorGate()
        self._extents = Extents(len(data_grefs))
        self._free_ids = list(range(ring.nr_ents))  # request id = index of its indirect page
        self._in_flight: dict[int, _InFlight] = {}
        self._leader: _InFlight | None = None  # the caller reaping responses, if any
        self._broken: str | None = None

    # -- the calls ------------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` (cut at the end of the disk)."""
        size = max(0, min(size, self.sectors * B.SECTOR_SIZE - offset))
        if size == 0:
            return b""
        start = offset - offset % B.SECTOR_SIZE
        end = -(-(offset + size) // B.SECTOR_SIZE) * B.SECTOR_SIZE
        out = bytearray(end - start)
        view = memoryview(out)
        self._transfer(B.BLKIF_OP_READ, start, len(out), _into_view(view))
        return bytes(view[offset - start : offset - start + size])

    def read_into(self, address: int, size: int, offset: int) -> int:
        """Read up to ``size`` bytes at ``offset`` straight into memory at ``address`` (one
        copy, from the granted pages); returns the bytes read (cut at the end of the disk)."""
        size = max(0, min(size, self.sectors * B.SECTOR_SIZE - offset))
        if offset % B.SECTOR_SIZE or size % B.SECTOR_SIZE:
            data = self.read(offset, size)
            ctypes.memmove(address, data, len(data))
            return len(data)
        self._transfer(B.BLKIF_OP_READ, offset, size, _into_address(address))
        return size

    def write(self, offset: int, data: bytes | memoryview) -> int:
        """Write ``data`` at ``offset``; a partial sector is read, modified and written back."""
        size = len(data)
        if offset + size > self.sectors * B.SECTOR_SIZE:
            raise OSError(errno.ENOSPC, "write past the end of the disk")
        start = offset - offset % B.SECTOR_SIZE
        end = -(-(offset + size) // B.SECTOR_SIZE) * B.SECTOR_SIZE
        if start == offset and end == offset + size:
            self._write(start, size, _from_view(memoryview(data)))
            return size
        with self._gate.read_modify_write(start, end):
            buf = bytearray(self.read(start, end - start))
            buf[offset - start : offset - start + size] = data
            self._transfer(B.BLKIF_OP_WRITE, start, len(buf), _from_view(memoryview(buf)))
        return size

    def write_from(self, address: int, size: int, offset: int) -> int:
        """Write ``size`` bytes from memory at ``address`` to ``offset`` (one copy, into the
        granted pages)."""
        if offset + size > self.sectors * B.SECTOR_SIZE:
            raise OSError(errno.ENOSPC, "write past the end of the disk")
        if offset % B.SECTOR_SIZE or size % B.SECTOR_SIZE:
            return self.write(offset, ctypes.string_at(address, size))
        self._write(offset, size, _from_address(address))
        return size

    def _write(self, offset: int, nbytes: int, copy: _Copy) -> None:
        """A write of whole sectors, kept apart from read-modify-writes of them (SectorGate)."""
        token = self._gate.enter_write(offset, offset + nbytes)
        try:
            self._transfer(B.BLKIF_OP_WRITE, offset, nbytes, copy)
        finally:
            self._gate.leave_write(token)

    def flush(self) -> None:
        """FLUSH_DISKCACHE: every write answered so far is durable once this returns."""
        op = self._submit(lambda rid: B.Request.rw(B.BLKIF_OP_FLUSH_DISKCACHE, rid, 0, ()))
        self._wait(op)

    def discard(self, offset: int, length: int) -> None:
        """DISCARD the whole sectors inside [offset, offset + length)."""
        first = -(-offset // B.SECTOR_SIZE)
        last = min((offset + length) // B.SECTOR_SIZE, self.sectors)
        if last <= first:
            return
        # A discard is a write of zeros, as far as a read-modify-write is concerned.
        token = self._gate.enter_write(first * B.SECTOR_SIZE, last * B.SECTOR_SIZE)
        try:
            op = self._submit(lambda rid: B.Request.discard(rid, first, last - first))
            self._wait(op)
        finally:
            self._gate.leave_write(token)

    # -- requests -------------------------------------------------------------------------------

    def _transfer(self, operation: int, offset: int, nbytes: int, copy: _Copy) -> None:
        """Move ``nbytes`` (whole sectors) to or from the disk at ``offset`` in requests of at
        most ``max_segments`` pages, each over one run of contiguous pages, posted as fast as
        pages allow (when the pool is short, the oldest request is finished first).
        ``copy(done, region, n)`` moves n bytes between the caller's memory at ``done`` and
        ``region``, a view of the run: in before a write, out after a read."""
        chunk = self.max_segments * PAGE_SIZE
        posted: deque[tuple[_InFlight, int, int, int]] = deque()  # (request, first, pages, done)
        failure: OSError | None = None

        def finish() -> None:
            nonlocal failure
            op, first, count, done = posted.popleft()
            try:
                self._wait(op)
                if operation == B.BLKIF_OP_READ:
                    n = min(chunk, nbytes - done)
                    copy(done, self._region(first, n), n)
            except OSError as exc:
                failure = failure or exc
            finally:
                self._give_pages(first, count)

        try:
            for done in range(0, nbytes, chunk):
                n = min(chunk, nbytes - done)
                count = -(-n // PAGE_SIZE)
                first = self._take_pages(count, wait=not posted)
                while first is None:
                    finish()
                    first = self._take_pages(count, wait=not posted)
                try:
                    if operation == B.BLKIF_OP_WRITE:
                        copy(done, self._region(first, n), n)
                    sector = (offset + done) // B.SECTOR_SIZE
                    op = self._post_rw(operation, sector, first, n)
                except BaseException:
                    self._give_pages(first, count)
                    raise
                posted.append((op, first, count, done))
        finally:
            while posted:
                finish()
        if failure is not None:
            raise failure

    def _region(self, first: int, nbytes: int) -> memoryview:
        return self._data[first * PAGE_SIZE : first * PAGE_SIZE + nbytes]

    def _post_rw(self, operation: int, sector: int, first: int, nbytes: int) -> _InFlight:
        """One request over the contiguous pages from ``first``: every segment a whole page
        but the last; in the request itself up to 11, else through the slot's indirect page."""
        sectors = nbytes // B.SECTOR_SIZE
        count = -(-sectors // SECTORS_PER_PAGE)
        last_sect = (sectors - 1) % SECTORS_PER_PAGE
        grefs = self._grefs[first : first + count]
        if count <= B.BLKIF_MAX_SEGMENTS_PER_REQUEST:
            segments = [B.Segment(gref, 0, SECTORS_PER_PAGE - 1) for gref in grefs]
            segments[-1] = B.Segment(grefs[-1], 0, last_sect)
            return self._submit(lambda rid: B.Request.rw(operation, rid, sector, segments))

        def indirect(rid: int) -> B.Request:
            flat = [v for gref in grefs for v in (gref, 0, SECTORS_PER_PAGE - 1)]
            flat[-1] = last_sect
            B.pack_segments_into(self._indirect[rid], flat)
            return B.Request.indirect(operation, rid, sector, count, [self._indirect_grefs[rid]])

        return self._submit(indirect)

    def _submit(self, build: Callable[[int], B.Request]) -> _InFlight:
        with self._room:
            self._room.wait_for(lambda: self._free_ids or self._broken is not None)
            self._check()
            rid = self._free_ids.pop()
            request = build(rid)
            # Responses name the operation they answer; an indirect one names its indirect_op.
            answers = {request.operation}
            if request.operation == B.BLKIF_OP_INDIRECT:
                answers.add(request.indirect_op)
            op = _InFlight(request.pack(), frozenset(answers))
            self._in_flight[rid] = op
            try:
                self.ring.put_request_raw(op.request)
                notify = self.ring.push_requests()
            except RingError as exc:
                self._in_flight.pop(rid, None)
                self._free_ids.append(rid)
                raise DiskBroken(str(exc)) from exc
        if notify:
            self.evtchn.notify()
        return op

    def _wait(self, op: _InFlight) -> None:
        """Until ``op`` is answered: lead (reap responses) when nobody does, else sleep until
        the leader finishes ``op`` or hands this caller the lead."""
        while True:
            with self._room:
                if op.finished:
                    break
                if self._leader is None:
                    self._leader = op
                leading = self._leader is op
                op.sleeping = not leading
            if leading:
                self._lead(op)
            else:
                op.wake.acquire()
        if op.status != B.BLKIF_RSP_OKAY:
            code = _STATUS_ERRNO.get(op.status, errno.EIO)
            raise OSError(code, f"the backend answered {op.status}")

    def _take_pages(self, count: int, *, wait: bool) -> int | None:
        """The first of ``count`` contiguous free data pages; while none are free, wait (or
        return None at once when not ``wait``)."""
        if count > self._extents.pages:
            raise OSError(errno.EINVAL, f"a request of {count} pages exceeds the pool")
        with self._room:
            self._check()
            first = self._extents.take(count)
            while first is None and wait:
                self._room.wait()
                self._check()
                first = self._extents.take(count)
            return first

    def _give_pages(self, first: int, count: int) -> None:
        with self._room:
            self._extents.give(first, count)
            self._room.notify_all()

    def _check(self) -> None:
        if self._broken is not None:
            raise DiskBroken(self._broken)

    # -- responses ------------------------------------------------------------------------------

    def stop(self) -> None:
        """The disk is going away: every call waiting, and every call to come, fails with EIO
        (the leader is woken to see it)."""
        self._fail_all("the disk was disconnected")
        self.late_eoi.stop()
        self.evtchn.kick()

    def reset(self) -> int:
        """The backend restarted: take what it answered, start the ring over, and post every
        request still in flight again, in the order first posted. Returns how many."""
        with self._room:
            self._check()
            try:
                self._reap()
                ring = FrontRing.init(B.BLK_RING, self.ring.area, name=self.ring.name)
                for op in self._in_flight.values():
                    ring.put_request_raw(op.request)
                ring.push_requests()  # nobody to notify: the new backend looks when it starts
            except (RingBroken, DiskBroken) as exc:
                self._fail_all(str(exc), report=True)
                raise DiskBroken(str(exc)) from exc
            self.ring.close()
            self.ring = ring
            replayed = len(self._in_flight)
        self.evtchn.kick()  # a leader whose request the reap above answered: look again
        return replayed

    def _lead(self, op: _InFlight) -> None:
        """Reap responses until ``op`` is answered, then hand the lead to a sleeping caller."""
        try:
            self.late_eoi.serve(
                self._reap,
                self._final_check,
                self.evtchn.wait,
                lambda: not op.finished,
                HEAL_TIMEOUT,
            )
        except (RingBroken, DiskBroken) as exc:
            self._fail_all(str(exc), report=True)
        except RingError:
            self._fail_all("the ring was closed")
        finally:
            with self._room:
                self._leader = next((o for o in self._in_flight.values() if o.sleeping), None)
                if self._leader is not None:
                    self._leader.sleeping = False
                    self._leader.wake.release()

    def _final_check(self) -> bool:
        with self._room:  # the ring is replaced under this lock (reset)
            return self.ring.final_check_for_responses()

    def _reap(self) -> bool:
        with self._room:
            block = self.ring.get_responses_block()
            if not block:
                return False
            for rid, operation, status in _RESPONSE.iter_unpack(block):
                op = self._in_flight.get(rid)
                if op is None:
                    raise DiskBroken(f"response for id {rid}, which is not in flight")
                if operation not in op.answers:
                    raise DiskBroken(f"response for id {rid} names operation {operation}")
                if status not in (B.BLKIF_RSP_OKAY, *_STATUS_ERRNO):
                    raise DiskBroken(f"response for id {rid} has unknown status {status}")
                # Only a good response leaves the table: after a bad one, _fail_all still
                # finds (and fails) its request, so its caller never waits forever.
                del self._in_flight[rid]
                op.finish(status)
                self._free_ids.append(rid)
            self._room.notify_all()
        return True

    def _fail_all(self, reason: str, *, report: bool = False) -> None:
        """Break the disk (the first reason stays); ``report`` tells ``on_broken``, once."""
        with self._room:
            first = self._broken is None
            self._broken = self._broken or reason
            for op in self._in_flight.values():
                op.finish(B.BLKIF_RSP_ERROR)
            self._in_flight.clear()
            self._room.notify_all()
        if report and first:
            self.on_broken(reason)

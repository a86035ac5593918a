"""blkfront's data path: byte ranges of the disk turned into blkif requests on the ring.

Requests are posted as they come and answered as the backend answers them: ``post`` puts a
READ or WRITE on the ring and returns at once, and ``done(status)`` is called when the backend
has answered it, so one thread can keep the whole ring busy. That is how the FUSE session
(domu/blkfront/server.py) serves ``/dev/xvdX``: one thread reads requests from ``/dev/fuse``
and posts them, the reaper thread here takes responses and hands each to its ``done``, which
writes the answer back to the kernel. The only waits are for room: a free ring slot, or free
data pages. Blocking calls (``read``, ``write``, ``flush``, ``discard``) are built on the same
posts, for what is rare (a read or write of part of a sector) and for the tests.

Memory: a pool of data pages and one indirect page per ring slot, all granted to the backend
once when the disk connects (persistent grants: the backend's checks are done once per page).
Pages are handed out in runs (Extents, a buddy allocator: a run is an aligned power-of-two
block, so requests mostly cover consecutive pages and grefs); a transfer takes a list of runs,
and the pages need not be contiguous. A request spans at most ``max_segments`` pages (11 in
the request itself, up to 256 through an indirect page when the backend offers
``feature-max-indirect-segments``); a larger transfer becomes several requests, answered
together.

A write of part of a sector reads the sector into a page, changes the part and writes the page
back; meanwhile no other write to that sector is in flight (SectorGate), so none is undone by
it. A write that comes during one waits in the gate without blocking its poster.

The reaper takes every response the ring holds after each wakeup, hands them on, arms the ring
(``rsp_event``) and sleeps on the event channel; a wakeup that finds nothing is slowed down
(LateEoi), so a backend ringing in a loop costs a few wakeups a second. An idle disk costs the
reaper one wakeup per ``HEAL_TIMEOUT``.

A backend that restarts (its process was killed; xen-split-driver.md §6.9) comes back with
no memory of the ring: ``reset`` starts the ring over and puts every request not yet answered
on it again (Linux's blkif_recover replays its shadow copies the same way). Their callers just
wait longer. Replaying is safe because a request's pages stay untouched until it is answered:
a write carries the same data to the same sectors, a read fills the same pages again.

The backend is not trusted (xen-split-driver.md §1.8): responses are copied out once; an id
that names no request in flight, a response naming another operation, an impossible
``rsp_prod`` or an unknown status marks the disk broken (``on_broken``: an ``error`` node,
Closing), and every request in flight or to come is answered BLKIF_RSP_ERROR (EIO). Nothing
it writes can make the frontend crash or spin.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence

from channels import blkif as B
from channels.errors import ProtocolViolation
from channels.evtchn import Doorbells, LateEoi
from channels.gnttab import GrantPool
from channels.ring import FrontRing, RingError

log = logging.getLogger(__name__)

HEAL_TIMEOUT = 10.0
JOIN_TIMEOUT = 5.0
PAGE_SIZE = 4096
SECTORS_PER_PAGE = PAGE_SIZE // B.SECTOR_SIZE
_RESPONSE = B.BLK_RING.response_slot
_STATUS_ERRNO = {B.BLKIF_RSP_ERROR: errno.EIO, B.BLKIF_RSP_EOPNOTSUPP: errno.EOPNOTSUPP}
_NO_SEGMENTS = [0] * (3 * B.BLKIF_MAX_SEGMENTS_PER_REQUEST)

#: A run of data pages: (first page, pages), an aligned power-of-two block of the pool.
Run = tuple[int, int]
#: Called once with the status of a transfer (the first that is not BLKIF_RSP_OKAY, if any).
Done = Callable[[int], None]


def status_errno(status: int) -> int:
    """The errno a program sees for a status other than BLKIF_RSP_OKAY."""
    return _STATUS_ERRNO.get(status, errno.EIO)


class Extents:
    """A buddy allocator of page runs in a pool of ``pages`` (a power of two). ``take_runs``
    hands out the largest free blocks first, so a transfer is mostly one run (one region to
    copy or hand to readv, consecutive grefs); freeing merges buddies back."""

    def __init__(self, pages: int) -> None:
        if pages <= 0 or pages & (pages - 1):
            raise ValueError(f"a pool of {pages} pages is not a power of two")
        self.pages = pages
        self.free = pages
        self.top = pages.bit_length() - 1
        self._free: list[set[int]] = [set() for _ in range(self.top + 1)]
        self._free[self.top].add(0)

    def take_runs(self, count: int) -> list[Run] | None:
        """Runs holding exactly ``count`` pages in all, largest first; None if fewer are free."""
        if count > self.free:
            return None
        runs = []
        while count:
            first, order = self._block(count.bit_length() - 1)
            runs.append((first, 1 << order))
            count -= 1 << order
        self.free -= sum(n for _, n in runs)
        return runs

    def _block(self, order: int) -> tuple[int, int]:
        """A free block of ``2**order`` pages, split off a larger one if need be; failing
        that, the largest smaller one (the caller checked that enough pages are free)."""
        for have in range(order, self.top + 1):
            if self._free[have]:
                first = self._free[have].pop()
                while have > order:  # split, keeping the upper halves free
                    have -= 1
                    self._free[have].add(first + (1 << have))
                return first, order
        for have in range(order - 1, -1, -1):
            if self._free[have]:
                return self._free[have].pop(), have
        raise AssertionError("Extents: fewer pages free than counted")

    def give(self, first: int, count: int) -> None:
        """Free the run ``(first, count)``, as taken or split (``split``)."""
        self.free += count
        order = count.bit_length() - 1
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

    @staticmethod
    def split(run: Run, count: int) -> tuple[list[Run], list[Run]]:
        """Cut ``run`` after its first ``count`` pages: (runs of those, runs of the rest),
        each an aligned block again, so each may be freed on its own."""
        first, pages = run
        if count >= pages:
            return [run], []
        if count <= 0:
            return [], [run]
        half = pages // 2
        if count <= half:
            head, tail = Extents.split((first, half), count)
            return head, [*tail, (first + half, half)]
        head, tail = Extents.split((first + half, half), count - half)
        return [(first, half), *head], tail


class SectorGate:
    """Keeps each read-modify-write apart from every write to its sectors (a range lock).

    A write of part of a sector reads the sector, changes the part and writes the whole sector
    back. A write to that sector answered between the read and the write-back would be undone
    by it, after its caller was told it was done. So writes (whole-sector writes and discards)
    hold their range while in flight; a read-modify-write first claims its range (later writes
    to it wait), then waits for the writes in flight there to be answered, and only then reads.
    A write that finds its range claimed is held, and posted by the read-modify-write as it
    lets go: its poster never waits. Two read-modify-writes that share a sector take
    turns. Writes elsewhere pay one uncontended lock round trip going in and one going out.
    Ordering by *answers* also keeps the replay after a backend restart safe: a
    read-modify-write's write-back is posted only after every write it overlaps was answered,
    so a replay never puts them in the other order. (Two whole-sector writes to the same
    sectors are both in flight, unordered, as on any disk: the caller of neither was told the
    other was done.)

    Ranges are byte offsets of whole sectors, ``[start, end)``.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition(threading.Lock())
        self._writes: dict[int, tuple[int, int]] = {}  # in flight, by token
        self._claims: list[tuple[int, int]] = []  # read-modify-writes in progress or waiting
        self._held: deque[tuple[int, int, Callable[[int], None]]] = deque()  # writes kept
        self._tokens = itertools.count()

    def write(self, start: int, end: int, go: Callable[[int], None]) -> None:
        """Call ``go(token)`` once no read-modify-write claims a sector in ``[start, end)``:
        now, or from the read-modify-write that lets go. ``leave_write(token)`` when answered."""
        with self._changed:
            if self._claims and _overlaps(self._claims, start, end):
                self._held.append((start, end, go))
                return
            token = next(self._tokens)
            self._writes[token] = (start, end)
        go(token)

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
                released = self._release()
                self._changed.notify_all()
            for token, go in released:
                go(token)

    def _release(self) -> list[tuple[int, Callable[[int], None]]]:
        """The held writes no claim stops any more, in the order they came, now in flight
        (lock held)."""
        released: list[tuple[int, Callable[[int], None]]] = []
        still: deque[tuple[int, int, Callable[[int], None]]] = deque()
        for start, end, go in self._held:
            if _overlaps(self._claims, start, end):
                still.append((start, end, go))
                continue
            token = next(self._tokens)
            self._writes[token] = (start, end)
            released.append((token, go))
        self._held = still
        return released


def sector_span(offset: int, size: int) -> tuple[int, int]:
    """The whole sectors holding ``size`` bytes at ``offset``: [start, end) in bytes."""
    start = offset - offset % B.SECTOR_SIZE
    return start, -(-(offset + size) // B.SECTOR_SIZE) * B.SECTOR_SIZE


def sector_pieces(offset: int, size: int) -> tuple[int, int]:
    """A write of ``size`` bytes at ``offset`` as (bytes before its first whole sector, bytes of
    whole sectors after them); what follows is part of one last sector."""
    head = min(size, -offset % B.SECTOR_SIZE)
    return head, (size - head) - (size - head) % B.SECTOR_SIZE


def _overlaps(ranges: Iterable[tuple[int, int]], start: int, end: int) -> bool:
    return any(first < end and start < last for first, last in ranges)


class DiskBroken(OSError):
    """The backend broke the protocol: every I/O on this disk fails with EIO from now on."""

    def __init__(self, reason: str) -> None:
        super().__init__(errno.EIO, f"disk broken: {reason}")


class _InFlight:
    """One request on the ring: the slot as posted (replayed after a backend restart), the
    operations its response may name (an indirect one's may name its ``indirect_op``), and
    whom to tell."""

    __slots__ = ("done", "indirect_op", "operation", "request")

    def __init__(self, request: bytes, operation: int, indirect_op: int, done: Done) -> None:
        self.request = request
        self.operation = operation
        self.indirect_op = indirect_op
        self.done = done


class _Waiter:
    """What a blocking call waits on: a bare lock held from the start (an Event would make a
    Condition and a new lock at every wait), released once by ``done``."""

    __slots__ = ("_lock", "status")

    def __init__(self) -> None:
        self.status = B.BLKIF_RSP_OKAY
        self._lock = threading.Lock()
        self._lock.acquire()

    def done(self, status: int) -> None:
        self.status = status
        self._lock.release()

    def wait(self) -> None:
        """Until answered; then an OSError for a status other than BLKIF_RSP_OKAY."""
        self._lock.acquire()
        if self.status != B.BLKIF_RSP_OKAY:
            raise OSError(status_errno(self.status), f"the backend answered {self.status}")


def _gather(count: int, done: Done) -> Done:
    """A ``done`` for each of ``count`` requests, calling ``done`` once when all are answered,
    with the first status that is not BLKIF_RSP_OKAY."""
    if count == 1:
        return done
    lock = threading.Lock()
    left, worst = [count], [B.BLKIF_RSP_OKAY]

    def one(status: int) -> None:
        with lock:
            left[0] -= 1
            if worst[0] == B.BLKIF_RSP_OKAY:
                worst[0] = status
            last = left[0] == 0
        if last:
            done(worst[0])

    return one


class DiskPath:
    """One connected disk: the ring, its event channel and its granted pages."""

    def __init__(
        self,
        ring: FrontRing,
        evtchn: Doorbells,
        data: GrantPool,
        data_grefs: Sequence[int],
        indirect: GrantPool | None,
        indirect_grefs: Sequence[int],
        *,
        sectors: int,
        max_segments: int,
        on_broken: Callable[[str], None],
    ) -> None:
        self.ring = ring
        self.evtchn = evtchn
        self.late_eoi = LateEoi()  # a backend ringing for nothing (a storm) is slowed down
        self.sectors = sectors
        self.size = sectors * B.SECTOR_SIZE
        self.max_segments = max_segments
        self.on_broken = on_broken
        self._data = data.region()  # the data pages, contiguous: a run is one slice
        self._grefs = data_grefs
        self._indirect = [indirect.page(i) for i in range(len(indirect_grefs))] if indirect else []
        self._indirect_grefs = indirect_grefs
        self._room = threading.Condition()  # pages or ring slots were freed
        self._gate = SectorGate()
        self._extents = Extents(len(data_grefs))
        self._free_ids = list(range(ring.nr_ents))  # request id = index of its indirect page
        self._in_flight: dict[int, _InFlight] = {}
        self._broken: str | None = None
        self._running = True
        self._reaper = threading.Thread(target=self._serve, name="blkfront-reaper", daemon=True)

    def start(self) -> None:
        """Start taking responses (the reaper thread)."""
        self._reaper.start()

    # -- pages ----------------------------------------------------------------------------------

    def take_pages(self, count: int, *, wait: bool = True) -> list[Run] | None:
        """Runs of ``count`` data pages in all; while fewer are free, wait (or return None at
        once when not ``wait``)."""
        if count > self._extents.pages:
            raise OSError(errno.EINVAL, f"a transfer of {count} pages exceeds the pool")
        with self._room:
            runs = self._extents.take_runs(count)
            while runs is None and wait:
                self._room.wait()
                runs = self._extents.take_runs(count)
            return runs

    def give_pages(self, runs: Iterable[Run]) -> None:
        with self._room:
            for first, count in runs:
                self._extents.give(first, count)
            self._room.notify_all()

    def views(self, runs: Iterable[Sequence[int]], nbytes: int) -> list[memoryview]:
        """The first ``nbytes`` of the pages of ``runs``, one view per run: each a Run, or any
        other (first, count) pair (a landing's stretch)."""
        out = []
        for first, count in runs:
            if nbytes <= 0:
                break
            n = min(count * PAGE_SIZE, nbytes)
            out.append(self._data[first * PAGE_SIZE : first * PAGE_SIZE + n])
            nbytes -= n
        return out

    # -- posting --------------------------------------------------------------------------------

    def post(
        self, operation: int, offset: int, runs: Sequence[Run], nbytes: int, done: Done
    ) -> None:
        """READ or WRITE ``nbytes`` (whole sectors) at byte ``offset`` of the disk into or out of
        the pages of ``runs``, in order; ``done(status)`` once the backend answered all of it
        (from the reaper thread; at once, from this one, if the disk is broken). A WRITE into
        sectors a read-modify-write holds waits in the gate, without blocking this thread."""
        if operation != B.BLKIF_OP_WRITE:
            self._post(operation, offset, runs, nbytes, done)
            return
        self._through_gate(
            offset,
            offset + nbytes,
            lambda answered: self._post(operation, offset, runs, nbytes, answered),
            done,
        )

    def post_flush(self, done: Done) -> None:
        """FLUSH_DISKCACHE: every write answered before it is durable once it is answered."""
        flush = B.BLKIF_OP_FLUSH_DISKCACHE
        self._submit(lambda rid: B.Request.rw(flush, rid, 0, ()).pack(), flush, done)

    def post_discard(self, first: int, count: int, done: Done) -> None:
        """DISCARD ``count`` sectors from sector ``first`` (a write of zeros, to the gate)."""

        def pack(rid: int) -> bytes:
            return B.Request.discard(rid, first, count).pack()

        def send(answered: Done) -> None:
            self._submit(pack, B.BLKIF_OP_DISCARD, answered)

        start = first * B.SECTOR_SIZE
        self._through_gate(start, start + count * B.SECTOR_SIZE, send, done)

    def _through_gate(self, start: int, end: int, send: Callable[[Done], None], done: Done) -> None:
        """``send(answered)`` once the gate lets a write of ``[start, end)`` through;
        ``answered`` lets go of the gate, then calls ``done``."""

        def go(token: int) -> None:
            def answered(status: int) -> None:
                self._gate.leave_write(token)
                done(status)

            send(answered)

        self._gate.write(start, end, go)

    def _post(
        self, operation: int, offset: int, runs: Sequence[Run], nbytes: int, done: Done
    ) -> None:
        """As ``post``, past the gate: requests of at most ``max_segments`` pages."""
        npages = -(-nbytes // PAGE_SIZE)
        if len(runs) == 1 and npages <= self.max_segments:  # one request over one run
            first = runs[0][0]
            self._post_rw(operation, offset, range(first, first + npages), nbytes, done)
            return
        pages = [p for first, count in runs for p in range(first, first + count)][:npages]
        step = self.max_segments
        parts = range(0, npages, step)
        done = _gather(len(parts), done)
        for i in parts:
            n = min(step * PAGE_SIZE, nbytes - i * PAGE_SIZE)
            self._post_rw(operation, offset + i * PAGE_SIZE, pages[i : i + step], n, done)

    def _post_rw(
        self, operation: int, offset: int, pages: Sequence[int], nbytes: int, done: Done
    ) -> None:
        """One request over ``pages``: every segment a whole page but the last; in the request
        itself up to 11, else through the slot's indirect page."""
        sector = offset // B.SECTOR_SIZE
        count = len(pages)
        # (gref, first_sect, last_sect) of each segment: every page whole but the last
        flat = [v for p in pages for v in (self._grefs[p], 0, SECTORS_PER_PAGE - 1)]
        flat[-1] = (nbytes // B.SECTOR_SIZE - 1) % SECTORS_PER_PAGE
        if count <= B.BLKIF_MAX_SEGMENTS_PER_REQUEST:
            # The slot packed in one call (Request.rw(...).pack() would make an object per
            # segment: a third of a 4 KiB request's time here).
            flat += _NO_SEGMENTS[len(flat) :]

            def classic(rid: int) -> bytes:
                return B.REQUEST.pack(operation, count, 0, rid, sector, *flat)

            self._submit(classic, operation, done)
            return

        def indirect(rid: int) -> bytes:
            B.pack_segments_into(self._indirect[rid], flat)
            grefs = [self._indirect_grefs[rid]]
            return B.Request.indirect(operation, rid, sector, count, grefs).pack()

        self._submit(indirect, B.BLKIF_OP_INDIRECT, done, indirect_op=operation)

    def _submit(
        self, build: Callable[[int], bytes], operation: int, done: Done, indirect_op: int = -1
    ) -> None:
        """Put the request ``build(id)`` packs on the ring (waiting for a free slot) and ring
        the backend if it asked; on a broken disk, answer ``done`` with an error at once."""
        failure: Exception | None = None
        posted = notify = False
        with self._room:
            if not self._free_ids:
                self._room.wait_for(lambda: self._free_ids or self._broken is not None)
            if self._broken is None:
                rid = self._free_ids.pop()
                op = _InFlight(build(rid), operation, indirect_op, done)
                self._in_flight[rid] = op
                try:
                    self.ring.put_request_raw(op.request)
                    notify = self.ring.push_requests()
                    posted = True
                except (RingError, ProtocolViolation) as exc:
                    self._in_flight.pop(rid, None)
                    self._free_ids.append(rid)
                    failure = exc
        if notify:
            self.evtchn.notify()
        if posted:
            return  # answered by whoever takes it out of the table: the reaper, or _fail_all
        if failure is not None:
            self._fail_all(str(failure), report=isinstance(failure, ProtocolViolation))
        done(B.BLKIF_RSP_ERROR)

    # -- blocking calls -------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` (cut at the end of the disk)."""
        size = max(0, min(size, self.size - offset))
        if size == 0:
            return b""
        start, end = sector_span(offset, size)
        out = bytearray(end - start)
        self._transfer(B.BLKIF_OP_READ, start, memoryview(out))
        return bytes(out[offset - start : offset - start + size])

    def write(self, offset: int, data: bytes | memoryview) -> int:
        """Write ``data`` at ``offset``; a partial sector is read, modified and written back."""
        size = len(data)
        if offset + size > self.size:
            raise OSError(errno.ENOSPC, "write past the end of the disk")
        view = memoryview(data)
        head, whole = sector_pieces(offset, size)
        if head:
            self._patch(offset, view[:head])
        if whole:
            self._transfer(B.BLKIF_OP_WRITE, offset + head, view[head : head + whole])
        if head + whole < size:
            self._patch(offset + head + whole, view[head + whole :])
        return size

    def flush(self) -> None:
        """FLUSH_DISKCACHE: every write answered so far is durable once this returns."""
        waiter = _Waiter()
        self.post_flush(waiter.done)
        waiter.wait()

    def discard(self, offset: int, length: int) -> None:
        """DISCARD the whole sectors inside [offset, offset + length)."""
        first = -(-offset // B.SECTOR_SIZE)
        last = min((offset + length) // B.SECTOR_SIZE, self.sectors)
        if last > first:
            waiter = _Waiter()
            self.post_discard(first, last - first, waiter.done)
            waiter.wait()

    def _patch(self, offset: int, data: memoryview) -> None:
        """Write ``data`` inside one sector: read it into a page, change the part, write the
        page back, holding the sector (SectorGate). The page is taken before the claim, so a
        claim never waits for pages that writes held back by it would free."""
        start = offset - offset % B.SECTOR_SIZE
        runs = self.take_pages(1)
        assert runs is not None
        try:
            with self._gate.read_modify_write(start, start + B.SECTOR_SIZE):
                for operation in (B.BLKIF_OP_READ, B.BLKIF_OP_WRITE):
                    waiter = _Waiter()
                    self._post(operation, start, runs, B.SECTOR_SIZE, waiter.done)
                    waiter.wait()
                    if operation == B.BLKIF_OP_READ:
                        at = offset - start
                        self.views(runs, B.SECTOR_SIZE)[0][at : at + len(data)] = data
        finally:
            self.give_pages(runs)

    def _transfer(self, operation: int, offset: int, buf: memoryview) -> None:
        """Move ``buf`` (whole sectors) to or from the disk at ``offset`` in requests of at most
        ``max_segments`` pages, posted as fast as pages allow (when the pool is short, the
        oldest request is finished first): copied into the pages before a write, out of them
        after a read."""
        chunk = self.max_segments * PAGE_SIZE
        posted: deque[tuple[_Waiter, list[Run], int]] = deque()  # (answer, pages, done)
        failure: OSError | None = None

        def finish() -> None:
            nonlocal failure
            waiter, runs, done = posted.popleft()
            try:
                waiter.wait()
                if operation == B.BLKIF_OP_READ:
                    _copy(self.views(runs, chunk), buf[done : done + chunk], out=True)
            except OSError as exc:
                failure = failure or exc
            finally:
                self.give_pages(runs)

        try:
            for done in range(0, len(buf), chunk):
                n = min(chunk, len(buf) - done)
                count = -(-n // PAGE_SIZE)
                runs = self.take_pages(count, wait=not posted)
                while runs is None:
                    finish()
                    runs = self.take_pages(count, wait=not posted)
                if operation == B.BLKIF_OP_WRITE:
                    _copy(self.views(runs, n), buf[done : done + n], out=False)
                waiter = _Waiter()
                posted.append((waiter, runs, done))
                self.post(operation, offset + done, runs, n, waiter.done)
        finally:
            while posted:
                finish()
        if failure is not None:
            raise failure

    # -- responses ------------------------------------------------------------------------------

    def stop(self) -> None:
        """The disk is going away: every request in flight, and every one to come, is answered
        with an error; the reaper ends."""
        self._running = False
        self._fail_all("the disk was disconnected")
        self.late_eoi.stop()
        self.evtchn.kick()
        if self._reaper.is_alive() and self._reaper is not threading.current_thread():
            self._reaper.join(JOIN_TIMEOUT)

    def reset(self) -> int:
        """The backend restarted: take what it answered, start the ring over, and post every
        request still in flight again, in the order first posted. Returns how many."""
        answered: list[tuple[Done, int]] = []
        failure: Exception | None = None
        try:
            with self._room:
                if self._broken is not None:
                    raise DiskBroken(self._broken)
                try:
                    self._take_responses(answered)
                    ring = FrontRing.init(B.BLK_RING, self.ring.area, name=self.ring.name)
                    for op in self._in_flight.values():
                        ring.put_request_raw(op.request)
                    ring.push_requests()  # nobody to notify: the new backend looks when it starts
                except (ProtocolViolation, DiskBroken) as exc:
                    failure = exc
                else:
                    self.ring.close()
                    self.ring = ring
                    replayed = len(self._in_flight)
        finally:
            _tell(answered)
        if failure is not None:
            self._fail_all(str(failure), report=True)
            raise DiskBroken(str(failure)) from failure
        self.evtchn.kick()  # the reaper looks at the new ring
        return replayed

    def _serve(self) -> None:
        """The reaper: responses until the disk stops or breaks."""
        try:
            self.late_eoi.serve(
                self._reap,
                self._final_check,
                self.evtchn.wait,
                lambda: self._running and self._broken is None,
                HEAL_TIMEOUT,
            )
        except (ProtocolViolation, DiskBroken) as exc:
            self._fail_all(str(exc), report=True)
        except RingError:
            self._fail_all("the ring was closed")

    def _final_check(self) -> bool:
        with self._room:  # the ring is replaced under this lock (reset)
            return self.ring.final_check_for_responses()

    def _reap(self) -> bool:
        """Take every response the ring holds and hand each to its ``done``; True if any."""
        answered: list[tuple[Done, int]] = []
        try:
            with self._room:
                self._take_responses(answered)
        finally:
            _tell(answered)  # the good ones before a bad one are answered all the same
        return bool(answered)

    def _take_responses(self, answered: list[tuple[Done, int]]) -> None:
        """Check each response on its copy and move its request out of the table, onto
        ``answered`` (lock held)."""
        block = self.ring.get_responses_block()
        if not block:
            return
        for rid, operation, status in _RESPONSE.iter_unpack(block):
            op = self._in_flight.get(rid)
            if op is None:
                raise DiskBroken(f"response for id {rid}, which is not in flight")
            if operation != op.operation and operation != op.indirect_op:
                raise DiskBroken(f"response for id {rid} names operation {operation}")
            if status not in (B.BLKIF_RSP_OKAY, *_STATUS_ERRNO):
                raise DiskBroken(f"response for id {rid} has unknown status {status}")
            # Only a good response leaves the table: after a bad one, _fail_all still
            # finds (and fails) its request, so its caller is always answered.
            del self._in_flight[rid]
            self._free_ids.append(rid)
            answered.append((op.done, status))
        self._room.notify_all()

    def _fail_all(self, reason: str, *, report: bool = False) -> None:
        """Break the disk (the first reason stays) and answer every request in flight with an
        error; ``report`` tells ``on_broken``, once."""
        with self._room:
            first = self._broken is None
            self._broken = self._broken or reason
            failed = [(op.done, B.BLKIF_RSP_ERROR) for op in self._in_flight.values()]
            self._in_flight.clear()
            self._room.notify_all()
        if report and first:
            self.on_broken(reason)  # before any caller hears of it
        _tell(failed)


def _tell(answered: list[tuple[Done, int]]) -> None:
    """Hand each answer on. A ``done`` that raises is a bug of its own: it must not stop the
    others, nor the reaper."""
    for done, status in answered:
        try:
            done(status)
        except Exception:
            log.exception("blkfront: answering a request failed")


def _copy(pages: list[memoryview], buf: memoryview, *, out: bool) -> None:
    """Between the views of a transfer's pages, in order, and ``buf``."""
    at = 0
    for page in pages:
        n = min(len(page), len(buf) - at)
        if out:
            buf[at : at + n] = page[:n]
        else:
            page[:n] = buf[at : at + n]
        at += n

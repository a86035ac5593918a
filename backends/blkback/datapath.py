"""blkback's data path for one vbd: blkif requests from the ring, I/O on the device fd.

It runs inside the vbd's worker process (backends/blkback/worker.py), over the ring, event channel
and grants of one frontend connection, and the device fd (the loop device) dom0 opened for it.

Two implementations. Where the native pump is built (channels._blkpump, from
channels/native/blkpump.c; channels.pumps decides, ``HYPER_PUMPS=python`` forces this one), the
dispatcher thread runs it: one C loop, GIL released, that checks READ and WRITE requests (classic
and indirect) exactly as below and puts them on the device with Linux AIO, answering each as it
completes. It hands FLUSH, DISCARD and a grant ref in no mapped pool back here before consuming
them; ``_work`` does that one request, and the pump goes on. Everything below is the reference
it follows, and runs wherever the pump does not (tests/unit/test_native_blkpump.py requires the
same answers, device contents and counters from both).

Threads. One dispatcher takes every published request in one batch (``get_requests_block``),
decodes each from its private copy (``blkif.Request.unpack``), validates it, answers a bad one
at once and hands the good ones to a pool of ``io_threads`` I/O threads, so that many requests
are on the device at once (a frontend running fio at iodepth 32 keeps 32 there). The work is
bounded: at most ``io_threads * 4`` requests are outstanding; when that many are, the
dispatcher stops consuming the ring (counted in ``oo_req``) until completions free room, so
the frontend's own ring is the only queue a guest can fill. Requests complete in any order
(blkif matches responses by ``id``); one lock serialises every use of the BackRing (consuming,
producing, pushing) and of the counters. When the ring is empty the dispatcher arms
``req_event`` (final_check_for_requests) and sleeps on the event channel, with a timeout that
heals a lost wakeup; it never polls. Wakeups that find nothing to do slow it down (LateEoi), so
a frontend ringing in a loop costs dom0 a few wakeups a second.

I/O. One syscall per request, straight between the device and the granted pages: a READ or
WRITE is one ``preadv``/``pwritev`` of the segments' slices of their pages (the segments of a
request are consecutive sector runs from ``sector_number``); every slice is 512-byte aligned in
address and length, as O_DIRECT wants. FLUSH_DISKCACHE is ``fdatasync`` (after writing its
segments, if it carries any: Linux blkfront sends FUA writes that way). DISCARD punches a hole
in a regular file (``fallocate``) or is BLKDISCARD on a block device. A short transfer or an
OSError is answered BLKIF_RSP_ERROR (a kernel EOPNOTSUPP on DISCARD: BLKIF_RSP_EOPNOTSUPP).

Checks (xen-split-driver.md §1.7, §5.5; the full list is in channels/blkif.py). The frontend
may be buggy or malicious, so every field is checked on the private copy before any of it
reaches the device: the operation (WRITE_BARRIER, RESERVED_1, unknown ones and secure DISCARD
are BLKIF_RSP_EOPNOTSUPP), segment counts, each segment's first_sect <= last_sect < 8, the
sector range (within ``sectors``, and no u64 wrap), writes to a read-only vbd, every grant ref
(mapped writable for READ, read-only otherwise), the indirect pages (copied out once, then their
descriptors checked like classic segments). A request that fails a check is answered
BLKIF_RSP_ERROR (or EOPNOTSUPP), counted in ``errors``, and processing goes on. A protocol
violation (an impossible ``req_prod``; grant refs past the budget of bad ones, or pools past
the frontend's grant budget: channels/grants.py) calls ``on_fatal`` once and stops the dispatcher;
the requests of its batch before the violation are still done and answered, none after it. The
device's logical sector size is taken to be 512 bytes (what dom0 publishes as sector-size).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import queue
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from backends.datapath_worker import CounterPage
from channels import blkif as B
from channels import kinds, pumps
from channels.errors import BadInput, ProtocolViolation
from channels.evtchn import Doorbells, LateEoi
from channels.faults import BlockDecision, BlockDice, BlockFaults, parse_block
from channels.gnttab import GrantError
from channels.grants import GrantMapper
from channels.ring import BackRing, RingError
from channels.threadname import NamedThread

log = logging.getLogger(__name__)

HEAL_TIMEOUT = 10.0  # seconds asleep before re-checking the ring without a notification
JOIN_TIMEOUT = 5.0  # seconds stop() waits for each thread
REQUESTS_PER_THREAD = 4  # outstanding requests allowed per I/O thread
U64_MAX = (1 << 64) - 1

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
BLKDISCARD = 0x1277  # _IO(0x12, 119): arg is u64 {start, length} in bytes

_SLOT = B.SLOT_SIZE
_RW_OPS = (B.BLKIF_OP_READ, B.BLKIF_OP_WRITE)


#: The order the native pump keeps them in too (channels/kinds.py declares them).
COUNTER_FIELDS = kinds.VBD.counters
#: ``_execute``'s status for a request an injected fault failed: answered BLKIF_RSP_ERROR.
FAULTED = -1000


class Counters(CounterPage):
    """Per vbd, Linux blkback's statistics. Each answered request counts once: an OKAY one in
    its operation's fields (``*_sect`` in 512-byte sectors; a FLUSH carrying data adds its
    sectors to ``wr_sect``), any other in ``errors``. ``oo_req`` counts the times the ring held
    requests but every I/O slot was taken. ``bad_grefs`` counts the grant refs in no pool the
    frontend set up (a request naming one is also in ``errors``).

    The values live in ``buf`` (native u64s), so the worker counts in a page dom0 reads
    whenever asked; without a buffer, in memory. VbdPath updates them under its lock, but for
    ``bad_grefs``, which the grant mapper counts under its own."""

    FIELDS = COUNTER_FIELDS
    # Declared for type checkers; CounterPage makes each a property over the page.
    rd_req: int
    rd_sect: int
    wr_req: int
    wr_sect: int
    flush_req: int
    discard_req: int
    oo_req: int
    errors: int
    bad_grefs: int  # of the errors, refs in no pool the frontend set up (channels/grants.py)
    faults: int  # of the errors, requests failed on purpose (channels/faults.py); Python's


class BadRequest(BadInput):
    """One request is refused (answered `status`); the vbd carries on."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(slots=True)
class _Job:
    """A validated request, ready for an I/O thread."""

    id: int
    operation: int  # echoed in the response
    kind: int  # BLKIF_OP_READ, _WRITE, _FLUSH_DISKCACHE or _DISCARD
    offset: int  # bytes from the start of the device
    nbytes: int
    views: list[memoryview]  # slices of granted pages, in device order
    fault: BlockDecision | None = None  # what the injected faults do to it, decided in order
    started: float = 0.0  # when it was taken off the ring, while the vbd is traced


# -- discard ------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate `length` bytes at `offset` of a regular file, keeping its size (reads give
    zeros). os.posix_fallocate has no mode argument, hence libc through ctypes."""
    while _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(
                err, f"fallocate(PUNCH_HOLE) of {length} bytes at {offset}: {os.strerror(err)}"
            )


def blk_discard(fd: int, offset: int, length: int) -> None:
    """BLKDISCARD `length` bytes at `offset` of a block device."""
    fcntl.ioctl(fd, BLKDISCARD, struct.pack("=QQ", offset, length))


# -- the data path ------------------------------------------------------------------------------


def _response_op(req: B.Request) -> int:
    # Like Linux, an INDIRECT request is answered with its indirect_op.
    return req.indirect_op if req.operation == B.BLKIF_OP_INDIRECT else req.operation


class VbdPath:
    """The dispatcher and I/O threads of one vbd; ``start()`` once, ``stop()`` any time."""

    def __init__(
        self,
        ring: BackRing,
        evtchn: Doorbells,
        grants: GrantMapper,
        fd: int,
        sectors: int,
        *,
        readonly: bool,
        counters: Counters,
        on_fatal: Callable[[str], None],
        io_threads: int = 8,
        faults: str = "",
    ) -> None:
        """``faults``: a disk's fault spec (channels/faults.py), as dom0 checked it; a path
        with faults runs the Python path, which applies them (``set_faults`` changes them)."""
        if io_threads < 1:
            raise ValueError(f"blkback: io_threads must be at least 1, not {io_threads}")
        if not 0 <= sectors <= U64_MAX:
            raise ValueError(f"blkback: {sectors} sectors is not a u64 disk size")
        self.ring = ring
        self.evtchn = evtchn
        self.grants = grants
        self.fd = fd
        self.sectors = sectors
        self.readonly = readonly
        self.counters = counters
        self.on_fatal = on_fatal
        self._blockdev = stat.S_ISBLK(os.fstat(fd).st_mode)
        self._max_outstanding = io_threads * REQUESTS_PER_THREAD
        self._outstanding = 0  # requests handed to the I/O threads and not yet answered
        self._lock = threading.Lock()  # the BackRing, the counters, _outstanding, _fatal_sent
        self._room = threading.Condition(self._lock)  # notified as requests complete
        # Unbounded as a type, bounded in use: the dispatcher never has more than
        # _max_outstanding jobs out (plus one None per I/O thread at stop).
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._stopping = False
        self._stopped = False
        self._fatal_sent = False
        self._dice: BlockDice | None = None
        self._trace: Callable[[dict[str, Any]], None] | None = None
        self.late_eoi = LateEoi()
        self.native = pumps.NativePump(self.late_eoi, pumps.BLKPUMP)
        self.set_faults(faults)
        name = f"blkback {ring.name}"
        # Kernel names shared by all threads of a kind: per-thread figures add them up.
        self.threads = [
            NamedThread(target=self._dispatch, name=f"{name} dispatch", native_name="blkback-disp")
        ]
        self.threads += [
            NamedThread(target=self._serve, name=f"{name} io{i}", native_name="blkback-io")
            for i in range(io_threads)
        ]
        for thread in self.threads:
            thread.daemon = True

    def start(self) -> None:
        """Start the dispatcher; it starts the I/O threads if the Python path runs."""
        self.threads[0].start()

    def set_faults(self, spec: str) -> None:
        """Inject the faults of ``spec`` (none if empty) into the requests taken from now on.
        The native pump, running, hands the ring to the Python path, which applies them; a
        path that went to Python for faults stays there until its device reconnects."""
        faults = parse_block(spec) if spec else BlockFaults()
        self._dice = BlockDice(faults) if faults else None
        if self._dice is not None:
            self.native.interrupt()

    def set_trace(self, sink: Callable[[dict[str, Any]], None] | None) -> None:
        """Tell ``sink`` each request as it is taken off the ring and each response as it is
        put on (``trace_req``, ``trace_rsp``), from now on; None stops. As with faults, a
        native pump running hands the ring to the Python path, which stays."""
        self._trace = sink
        if sink is not None:
            self.native.interrupt()

    def stop(self) -> None:
        """Stop the dispatcher, let the I/O threads finish (and answer) what they hold, join
        everything; idempotent. Works on an idle path: the kick wakes the dispatcher."""
        if self._stopped:
            return
        self._stopped = True
        with self._room:
            self._stopping = True
            self._room.notify_all()
        self.native.stop()
        self.late_eoi.stop()
        self.evtchn.kick()
        dispatcher, io = self.threads[0], self.threads[1:]
        _join(dispatcher)
        for _ in io:
            self._jobs.put(None)  # after the dispatcher: no job can follow a None
        for thread in io:
            _join(thread)

    # -- the dispatcher -------------------------------------------------------------------------

    def _dispatch(self) -> None:
        with self._guard():
            if self._dice is None and self._trace is None and self._run_native() and self._stopping:
                return
            for thread in self.threads[1:]:
                thread.start()
            self.late_eoi.serve(
                self._work,
                self._final_check,
                self.evtchn.wait,
                lambda: not self._stopping,
                HEAL_TIMEOUT,
            )

    def _run_native(self) -> bool:
        """Serve the ring with the native pump until stopped; False if it does not run here.
        A request it hands back (FLUSH, DISCARD, a grant ref it cannot look up) is done by
        ``_work``, alone and inline (the pump has nothing in flight by then), and the pump
        carries on where Python left the ring, with the mapper's pools if they moved."""
        pump = self.native.start_backend(
            pumps.BLKBACK,
            self.ring,
            self.fd,
            self.evtchn,
            self.counters,
            self.grants,
            sectors=self.sectors,
            readonly=self.readonly,
            outstanding=self._max_outstanding,
        )
        if pump is None:
            return False
        self.native.serve_backend(
            pump,
            self.ring,
            self.grants,
            lambda: self._stopping or self._dice is not None or self._trace is not None,
            RuntimeError,
            self._take_back,
        )
        return True

    def _take_back(self, result: tuple[int, str, int]) -> None:
        """The request the pump left in the ring (FALLBACK, MISS), done here. An honest
        frontend never takes a published request back; one that does would have the two of
        us hand it back and forth with no doorbell between."""
        if not self._work(limit=1) and not self._stopping:
            self.ring.broke("req_prod moved back under a published request")

    def _final_check(self) -> bool:
        with self._lock:
            return self.ring.final_check_for_requests()

    def _work(self, limit: int | None = None) -> bool:
        """Take what the ring holds (up to the free I/O slots, and ``limit``), refuse the bad
        requests, hand the good ones to the I/O threads. False when there was nothing to take.
        A protocol violation (ProtocolViolation) is raised once the requests before it are handed
        on and answered: they were consumed and checked; the ones after it are never looked
        at."""
        room = self._wait_for_room()
        if not room:
            return False
        with self._lock:
            block = self.ring.get_requests_block(room if limit is None else min(room, limit))
        if not block:
            return False
        jobs: list[_Job] = []
        replies: list[int] = []  # flat (id, operation, status) of the refused requests
        violation: ProtocolViolation | None = None
        for start in range(0, len(block), _SLOT):
            req = B.Request.unpack(block[start : start + _SLOT])
            try:
                job = self._prepare(req)
                if (dice := self._dice) is not None:  # decided here: in the ring's order
                    flush = job.kind == B.BLKIF_OP_FLUSH_DISKCACHE
                    sectors = job.nbytes // B.SECTOR_SIZE
                    job.fault = dice.request(flush, job.offset // B.SECTOR_SIZE, sectors)
                if (trace := self._trace) is not None:
                    job.started = time.monotonic()
                    trace(trace_req(job))
                jobs.append(job)
            except BadRequest as exc:
                log.debug("%s: request id %d refused: %s", self.ring.name, req.id, exc.reason)
                replies += (req.id, _response_op(req), exc.status)
                if (trace := self._trace) is not None:
                    trace(trace_refused(req, exc.status))
            except ProtocolViolation as exc:
                violation = exc
                break
        self._hand_on(jobs, replies)
        if violation is not None:
            try:
                raise violation
            finally:
                # No cycle (exception -> traceback -> this frame -> exception): the frames it
                # holds, and the native pump's buffers in them, go when the thread handles it.
                del violation
        return True

    def _hand_on(self, jobs: list[_Job], replies: list[int]) -> None:
        """Answer the refused requests and give the jobs to the I/O threads (or do the one
        job here)."""
        with self._lock:
            # One request alone on an idle vbd (a program waiting on each I/O, as at queue depth
            # 1) is done here: handing it to an I/O thread would add a wakeup to its latency.
            inline = len(jobs) == 1 and self._outstanding == 0
            self._outstanding += len(jobs)  # before any of them can complete
            self.counters.errors += len(replies) // 3
            notify = self._respond(replies)
        if notify:
            self.evtchn.notify()
        if inline:
            job = jobs[0]
            status = self._execute(job)
            job.views.clear()
            self._complete(job, status)
            return
        for job in jobs:
            self._jobs.put(job)

    def _wait_for_room(self) -> int:
        """Free I/O slots. With none free: 0 if the ring is empty too (go to sleep), else count
        oo_req and wait for a completion, leaving the requests in the ring meanwhile."""
        with self._room:
            if self._outstanding >= self._max_outstanding:
                if not self.ring.unconsumed_requests():
                    return 0
                self.counters.oo_req += 1
                while self._outstanding >= self._max_outstanding and not self._stopping:
                    self._room.wait(HEAL_TIMEOUT)
            return 0 if self._stopping else self._max_outstanding - self._outstanding

    # -- checks (on the private copy; nothing here touches the device) ---------------------------

    def _prepare(self, req: B.Request) -> _Job:
        op = req.operation
        if op == B.BLKIF_OP_INDIRECT:
            return self._prepare_indirect(req)
        if op == B.BLKIF_OP_DISCARD:
            return self._prepare_discard(req)
        if op not in (*_RW_OPS, B.BLKIF_OP_FLUSH_DISKCACHE):
            # WRITE_BARRIER is not offered (no feature-barrier); RESERVED_1 and unknown codes.
            raise BadRequest(B.BLKIF_RSP_EOPNOTSUPP, f"operation {op} not supported")
        least = 0 if op == B.BLKIF_OP_FLUSH_DISKCACHE else 1
        if not least <= req.nr_segments <= B.BLKIF_MAX_SEGMENTS_PER_REQUEST:
            raise BadRequest(B.BLKIF_RSP_ERROR, f"{req.nr_segments} segments")
        segments = [(seg.gref, seg.first_sect, seg.last_sect) for seg in req.segments]
        return self._prepare_data(req.id, op, req.sector_number, segments)

    def _prepare_indirect(self, req: B.Request) -> _Job:
        op = req.indirect_op
        if op not in _RW_OPS:
            raise BadRequest(B.BLKIF_RSP_ERROR, f"indirect operation {op}")
        if not 1 <= req.nr_segments <= B.MAX_INDIRECT_SEGMENTS:
            raise BadRequest(B.BLKIF_RSP_ERROR, f"{req.nr_segments} indirect segments")
        if op == B.BLKIF_OP_WRITE and self.readonly:  # before mapping anything
            raise BadRequest(B.BLKIF_RSP_ERROR, "write to a read-only vbd")
        segments: list[tuple[int, int, int]] = []
        remaining = req.nr_segments
        for gref in req.indirect_grefs:  # unpack kept exactly the pages nr_segments needs
            count = min(remaining, B.SEGS_PER_INDIRECT_FRAME)
            # One copy of the descriptors; the frontend may rewrite the page meanwhile.
            segments += B.unpack_indirect_frame(self._resolve(gref, write=False), count)
            remaining -= count
        return self._prepare_data(req.id, op, req.sector_number, segments)

    def _prepare_data(
        self, rid: int, op: int, sector_number: int, segments: Sequence[tuple[int, int, int]]
    ) -> _Job:
        """A READ, WRITE or FLUSH_DISKCACHE over `segments` (gref, first_sect, last_sect),
        consecutive on the device."""
        if op != B.BLKIF_OP_READ and self.readonly:
            # Linux (xen_vbd_translate) refuses every operation but READ on a read-only vbd
            # with -EACCES, answered BLKIF_RSP_ERROR: a FLUSH too, so we do the same.
            raise BadRequest(B.BLKIF_RSP_ERROR, f"operation {op} on a read-only vbd")
        nsect = 0
        for _gref, first, last in segments:
            if not first <= last < B.SECTORS_PER_PAGE:
                raise BadRequest(B.BLKIF_RSP_ERROR, f"segment sectors {first}..{last}")
            nsect += last - first + 1
        if nsect:  # a FLUSH without data names no sectors (Linux skips the check too)
            self._check_range(sector_number, nsect)
        write_page = op == B.BLKIF_OP_READ  # we write into the frontend's pages on READ only
        views = [
            self._resolve(gref, write=write_page)[
                first * B.SECTOR_SIZE : (last + 1) * B.SECTOR_SIZE
            ]
            for gref, first, last in segments
        ]
        return _Job(rid, op, op, sector_number * B.SECTOR_SIZE, nsect * B.SECTOR_SIZE, views)

    def _prepare_discard(self, req: B.Request) -> _Job:
        if req.flag & B.BLKIF_DISCARD_SECURE:
            raise BadRequest(B.BLKIF_RSP_EOPNOTSUPP, "secure discard not offered")
        if self.readonly:
            raise BadRequest(B.BLKIF_RSP_ERROR, "discard on a read-only vbd")
        if req.nr_sectors == 0:
            raise BadRequest(B.BLKIF_RSP_ERROR, "discard of 0 sectors")
        self._check_range(req.sector_number, req.nr_sectors)
        return _Job(
            req.id,
            B.BLKIF_OP_DISCARD,
            B.BLKIF_OP_DISCARD,
            req.sector_number * B.SECTOR_SIZE,
            req.nr_sectors * B.SECTOR_SIZE,
            [],
        )

    def _check_range(self, sector_number: int, nsect: int) -> None:
        end = sector_number + nsect
        # A C backend's u64 sum would wrap to a small, "valid" end here; Python's does not
        # wrap, but refuse it by name so the rule is visible.
        if end > U64_MAX:
            raise BadRequest(B.BLKIF_RSP_ERROR, f"sector {sector_number} + {nsect} wraps a u64")
        if end > self.sectors:
            raise BadRequest(
                B.BLKIF_RSP_ERROR,
                f"access beyond end of device: sectors {sector_number}+{nsect} of {self.sectors}",
            )

    def _resolve(self, gref: int, *, write: bool) -> memoryview:
        try:
            return self.grants.resolve(gref, write=write)
        except GrantError as exc:
            raise BadRequest(B.BLKIF_RSP_ERROR, f"gref {gref}: {exc}") from exc

    # -- the I/O threads ------------------------------------------------------------------------

    def _serve(self) -> None:
        with self._guard():
            while (job := self._jobs.get()) is not None:
                status = self._execute(job)
                job.views.clear()  # done with the frontend's pages
                self._complete(job, status)

    def _execute(self, job: _Job) -> int:
        """Do one request's I/O (one syscall, and fdatasync for a FLUSH); its status. A request
        an injected fault fails does no I/O; one it delays waits first."""
        if job.fault is not None:
            if job.fault.delay:
                time.sleep(job.fault.delay)
            if job.fault.fail:
                return FAULTED
        try:
            if job.kind == B.BLKIF_OP_DISCARD:
                (blk_discard if self._blockdev else punch_hole)(self.fd, job.offset, job.nbytes)
                return B.BLKIF_RSP_OKAY
            if job.views:
                transfer = os.preadv if job.kind == B.BLKIF_OP_READ else os.pwritev
                done = transfer(self.fd, job.views, job.offset)
                if done != job.nbytes:
                    log.debug(
                        "%s: request id %d: %d of %d bytes at byte %d",
                        self.ring.name,
                        job.id,
                        done,
                        job.nbytes,
                        job.offset,
                    )
                    return B.BLKIF_RSP_ERROR
            if job.kind == B.BLKIF_OP_FLUSH_DISKCACHE:
                os.fdatasync(self.fd)
            return B.BLKIF_RSP_OKAY
        except OSError as exc:
            log.debug("%s: request id %d (operation %d): %s", self.ring.name, job.id, job.kind, exc)
            if job.kind == B.BLKIF_OP_DISCARD and exc.errno == errno.EOPNOTSUPP:
                return B.BLKIF_RSP_EOPNOTSUPP
            return B.BLKIF_RSP_ERROR

    def _complete(self, job: _Job, status: int) -> None:
        with self._room:
            self._count(job, status)
            self._outstanding -= 1
            self._room.notify()
            answer = B.BLKIF_RSP_ERROR if status == FAULTED else status
            notify = self._respond((job.id, job.operation, answer))
        if notify:
            self.evtchn.notify()
        if job.started and (trace := self._trace) is not None:
            trace(trace_rsp(job, status))

    def _count(self, job: _Job, status: int) -> None:
        c = self.counters
        if status == FAULTED:
            c.faults += 1
        if status != B.BLKIF_RSP_OKAY:
            c.errors += 1
            return
        sectors = job.nbytes // B.SECTOR_SIZE
        if job.kind == B.BLKIF_OP_READ:
            c.rd_req += 1
            c.rd_sect += sectors
        elif job.kind == B.BLKIF_OP_WRITE:
            c.wr_req += 1
            c.wr_sect += sectors
        elif job.kind == B.BLKIF_OP_FLUSH_DISKCACHE:
            c.flush_req += 1
            c.wr_sect += sectors
        else:
            c.discard_req += 1

    # -- shared by both ---------------------------------------------------------------------------

    def _respond(self, values: Sequence[int]) -> bool:
        """Put flat (id, operation, status) responses and push them (the lock is held); True
        if the frontend asked to be notified."""
        if not values:
            return False
        try:
            self.ring.put_responses_flat(values)
            return self.ring.push_responses()
        except (RingError, ProtocolViolation):
            # Broken (the dispatcher reported it) or closed under us: nobody reads answers now.
            return False

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """How a thread ends: a protocol violation (or our own bug) fails the vbd; a ring
        closed under us means the vbd is already going away."""
        try:
            yield
        except ProtocolViolation as exc:
            self._fatal(str(exc))
        except RingError:
            pass
        except Exception as exc:
            log.exception("%s failed", threading.current_thread().name)
            self._fatal(f"internal error: {exc}")

    def _fatal(self, message: str) -> None:
        with self._lock:
            if self._fatal_sent:
                return
            self._fatal_sent = True
        self.on_fatal(message)


# -- tracing (`hyperctl trace`: backends/datapath_worker.py's TRACE_FIELDS) ----------------------

_OP_NAMES = {
    B.BLKIF_OP_READ: "read",
    B.BLKIF_OP_WRITE: "write",
    B.BLKIF_OP_FLUSH_DISKCACHE: "flush",
    B.BLKIF_OP_DISCARD: "discard",
}
_STATUS_NAMES = {
    B.BLKIF_RSP_OKAY: "ok",
    B.BLKIF_RSP_ERROR: "error",
    B.BLKIF_RSP_EOPNOTSUPP: "eopnotsupp",
    FAULTED: "fault",  # an injected fault's, answered BLKIF_RSP_ERROR
}


def trace_req(job: _Job) -> dict[str, Any]:
    """A request as it is taken off the ring."""
    return {
        "ev": "req",
        "op": _OP_NAMES.get(job.kind, "other"),
        "id": job.id,
        "sector": job.offset // B.SECTOR_SIZE,
        "count": job.nbytes // B.SECTOR_SIZE,
        "t": time.time(),
    }


def trace_rsp(job: _Job, status: int) -> dict[str, Any]:
    """Its response as it is put on the ring, with the time between."""
    return {
        **trace_req(job),
        "ev": "rsp",
        "status": _STATUS_NAMES.get(status, "error"),
        "latency_us": int((time.monotonic() - job.started) * 1e6),
    }


def trace_refused(req: B.Request, status: int) -> dict[str, Any]:
    """A request refused at once (its response with it): what the copy of it said."""
    return {
        "ev": "rsp",
        "op": _OP_NAMES.get(_response_op(req), "other"),
        "id": req.id,
        "sector": req.sector_number,
        "count": 0,
        "status": _STATUS_NAMES.get(status, "error"),
        "latency_us": 0,
        "t": time.time(),
    }


def _join(thread: threading.Thread) -> None:
    if thread.ident is not None:  # started
        thread.join(JOIN_TIMEOUT)
        if thread.is_alive():
            log.warning("%s did not stop within %.0f s", thread.name, JOIN_TIMEOUT)

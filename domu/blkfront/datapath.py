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

The backend is not trusted (xen-split-driver.md §1.8): responses are copied out once; an id
that names no request in flight, an impossible ``rsp_prod`` or an unknown status marks the disk
broken (``on_broken``: an ``error`` node, Closing), and every call in progress or to come fails
with EIO. Nothing it writes can make the frontend crash or spin.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from channels import blkif as B
from channels.evtchn import EventChannel
from channels.gnttab import GrantPool
from channels.ring import FrontRing, RingBroken, RingError

log = logging.getLogger(__name__)

HEAL_TIMEOUT = 10.0
PAGE_SIZE = 4096
SECTORS_PER_PAGE = PAGE_SIZE // B.SECTOR_SIZE
_RESPONSE = B.BLK_RING.response_slot
_STATUS_ERRNO = {B.BLKIF_RSP_ERROR: errno.EIO, B.BLKIF_RSP_EOPNOTSUPP: errno.EOPNOTSUPP}


class DiskBroken(OSError):
    """The backend broke the protocol: every I/O on this disk fails with EIO from now on."""

    def __init__(self, reason: str) -> None:
        super().__init__(errno.EIO, f"disk broken: {reason}")


@dataclass
class _InFlight:
    answers: frozenset[int]
    done: threading.Event = field(default_factory=threading.Event)
    status: int = B.BLKIF_RSP_OKAY


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
        self.sectors = sectors
        self.max_segments = max_segments
        self.on_broken = on_broken
        self._pages = [data.page(i) for i in range(len(data_grefs))]
        self._grefs = data_grefs
        self._indirect = [indirect.page(i) for i in range(len(indirect_grefs))] if indirect else []
        self._indirect_grefs = indirect_grefs
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # pages or ring slots were freed
        self._rmw = threading.Lock()
        self._free_pages = list(range(len(data_grefs)))
        self._free_ids = list(range(ring.nr_ents))  # request id = index of its indirect page
        self._in_flight: dict[int, _InFlight] = {}
        self._broken: str | None = None
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="blkfront", daemon=True)

    # -- the calls ------------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` (cut at the end of the disk)."""
        size = max(0, min(size, self.sectors * B.SECTOR_SIZE - offset))
        start = offset - offset % B.SECTOR_SIZE
        end = -(-(offset + size) // B.SECTOR_SIZE) * B.SECTOR_SIZE
        if size == 0:
            return b""
        out = bytearray(end - start)
        self._transfer(B.BLKIF_OP_READ, start, memoryview(out))
        return bytes(out[offset - start : offset - start + size])

    def write(self, offset: int, data: bytes | memoryview) -> int:
        """Write ``data`` at ``offset``; a partial sector is read, modified and written back."""
        size = len(data)
        if offset + size > self.sectors * B.SECTOR_SIZE:
            raise OSError(errno.ENOSPC, "write past the end of the disk")
        start = offset - offset % B.SECTOR_SIZE
        end = -(-(offset + size) // B.SECTOR_SIZE) * B.SECTOR_SIZE
        if start == offset and end == offset + size:
            self._transfer(B.BLKIF_OP_WRITE, start, memoryview(data))
            return size
        with self._rmw:  # two partial writes to one sector must not interleave
            buf = bytearray(self.read(start, end - start))
            buf[offset - start : offset - start + size] = data
            self._transfer(B.BLKIF_OP_WRITE, start, memoryview(buf))
        return size

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
        op = self._submit(lambda rid: B.Request.discard(rid, first, last - first))
        self._wait(op)

    # -- requests -------------------------------------------------------------------------------

    def _transfer(self, operation: int, offset: int, buf: memoryview) -> None:
        """Move ``buf`` (whole sectors) to or from the disk at ``offset``, in requests of at
        most ``max_segments`` pages, all posted before any is waited for."""
        chunk = self.max_segments * PAGE_SIZE
        posted: list[tuple[_InFlight, list[int], memoryview]] = []
        try:
            for start in range(0, len(buf), chunk):
                part = buf[start : start + chunk]
                pages = self._take_pages(-(-len(part) // PAGE_SIZE))
                if operation == B.BLKIF_OP_WRITE:
                    for i, page in enumerate(pages):
                        piece = part[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
                        self._pages[page][: len(piece)] = piece
                sector = (offset + start) // B.SECTOR_SIZE
                try:
                    op = self._post_rw(operation, sector, pages, len(part))
                except BaseException:
                    self._give_pages(pages)
                    raise
                posted.append((op, pages, part))
        finally:
            failure: OSError | None = None
            for op, pages, part in posted:
                try:
                    self._wait(op)
                    if operation == B.BLKIF_OP_READ:
                        for i, page in enumerate(pages):
                            piece = part[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
                            piece[:] = self._pages[page][: len(piece)]
                except OSError as exc:
                    failure = failure or exc
                finally:
                    self._give_pages(pages)
            if failure is not None:
                raise failure

    def _post_rw(self, operation: int, sector: int, pages: list[int], nbytes: int) -> _InFlight:
        sectors = nbytes // B.SECTOR_SIZE
        segments = [
            B.Segment(self._grefs[page], 0, min(SECTORS_PER_PAGE, sectors - i * 8) - 1)
            for i, page in enumerate(pages)
        ]
        if len(segments) <= B.BLKIF_MAX_SEGMENTS_PER_REQUEST:
            return self._submit(lambda rid: B.Request.rw(operation, rid, sector, segments))

        def indirect(rid: int) -> B.Request:
            frame = B.pack_indirect_frames(segments)[0]
            self._indirect[rid][:] = frame
            grefs = [self._indirect_grefs[rid]]
            return B.Request.indirect(operation, rid, sector, len(segments), grefs)

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
            op = _InFlight(frozenset(answers))
            self._in_flight[rid] = op
            try:
                self.ring.put_request_raw(request.pack())
                notify = self.ring.push_requests()
            except RingError as exc:
                self._in_flight.pop(rid, None)
                self._free_ids.append(rid)
                raise DiskBroken(str(exc)) from exc
        if notify:
            self.evtchn.notify()
        return op

    def _wait(self, op: _InFlight) -> None:
        op.done.wait()
        if op.status != B.BLKIF_RSP_OKAY:
            code = _STATUS_ERRNO.get(op.status, errno.EIO)
            raise OSError(code, f"the backend answered {op.status}")

    def _take_pages(self, count: int) -> list[int]:
        if count > len(self._pages):
            raise OSError(errno.EINVAL, f"a request of {count} pages exceeds the pool")
        with self._room:
            self._room.wait_for(lambda: len(self._free_pages) >= count or self._broken is not None)
            self._check()
            taken = self._free_pages[-count:]
            del self._free_pages[-count:]
            return taken

    def _give_pages(self, pages: list[int]) -> None:
        with self._room:
            self._free_pages += pages
            self._room.notify_all()

    def _check(self) -> None:
        if self._broken is not None:
            raise DiskBroken(self._broken)

    # -- responses ------------------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Stop reaping; calls still waiting fail with EIO (the disk is going away)."""
        self.stopping = True
        self.evtchn.kick()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=5.0)
        self._fail_all("the disk was disconnected")

    def _run(self) -> None:
        try:
            while not self.stopping:
                if not self._reap() and not self.ring.final_check_for_responses():
                    self.evtchn.wait(HEAL_TIMEOUT)
        except (RingBroken, DiskBroken) as exc:
            self._fail_all(str(exc))
            self.on_broken(str(exc))
        except RingError:
            self._fail_all("the ring was closed")

    def _reap(self) -> bool:
        block = self.ring.get_responses_block()
        if not block:
            return False
        with self._room:
            for rid, operation, status in _RESPONSE.iter_unpack(block):
                op = self._in_flight.pop(rid, None)
                if op is None:
                    raise DiskBroken(f"response for id {rid}, which is not in flight")
                if operation not in op.answers:
                    raise DiskBroken(f"response for id {rid} names operation {operation}")
                if status not in (B.BLKIF_RSP_OKAY, *_STATUS_ERRNO):
                    raise DiskBroken(f"response for id {rid} has unknown status {status}")
                op.status = status
                op.done.set()
                self._free_ids.append(rid)
            self._room.notify_all()
        return True

    def _fail_all(self, reason: str) -> None:
        with self._room:
            self._broken = self._broken or reason
            for op in self._in_flight.values():
                op.status = B.BLKIF_RSP_ERROR
                op.done.set()
            self._in_flight.clear()
            self._room.notify_all()

"""blkfront's native pump in the FUSE server: ``channels._fusepump`` (channels/native/fusepump.c).

When the extension is built (and ``HYPER_PUMPS=python`` is not set: channels/pumps.py), the
server (domu/blkfront/server.py) serves its disk with :class:`NativeSession` over a
:class:`NativeDisk` instead of FuseSession over DiskPath. The pump owns the ring, its request
ids and the data pages. Its reader, on the session's thread, puts every READ and WRITE of
whole sectors from ``/dev/fuse`` on the ring itself; its reaper, on the disk's thread, answers
them from the responses. Both run with the GIL released.

What the reader hands back is Python's, served by FuseSession's own handlers: INIT and every
other opcode, messages fuse_wire.parse refuses, and reads and writes of part of a sector. Those
reach the disk through :class:`NativeDisk`'s blocking calls, one pump transfer (``io``) at a
time. A write of part of a sector is done on the session's thread after the ring has
emptied (``quiesce``): only that thread posts READs and WRITEs, so nothing else is in flight
on its sectors while it reads, patches and writes them back (what SectorGate gives the Python
path without stopping the others). Flushes go on helper threads, as FuseSession posts them.

The Python path stays the reference (tests/unit/test_blkfront.py runs its FUSE session tests
with both, against the real blkback and against a hostile backend).
"""

from __future__ import annotations

import contextlib
import errno
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from channels import blkif as B
from channels import pumps
from channels.doorbell import DoorbellPair
from channels.gnttab import GrantPool
from channels.ring import FrontRing
from domu.blkfront.datapath import (
    JOIN_TIMEOUT,
    PAGE_SIZE,
    DiskBroken,
    Done,
    sector_pieces,
    sector_span,
    status_errno,
)

CHUNK = 256 * PAGE_SIZE  # the most one pump transfer carries (fusepump.c's MAX_PAGES)
FLUSH_THREADS = 2  # fsyncs waited for at once (each blocks its thread until answered)


def make_pump(
    fd: int,
    ring: FrontRing,
    evtchn: DoorbellPair,
    data: GrantPool,
    indirect: GrantPool | None,
    *,
    sectors: int,
    max_segments: int,
    readonly: bool,
) -> Any:
    """The native pump over the session's ``/dev/fuse`` descriptor and the disk's ring, pools
    and doorbells; None when the Python path must run (not built, or not wanted)."""
    module = pumps.native(pumps.FUSEPUMP)
    if module is None:
        return None
    return module.Pump(
        fd,
        ring.area,
        ring.nr_ents,
        *ring.indices(),
        data.region(),
        data.gref_base,
        indirect.region() if indirect else None,
        indirect.gref_base if indirect else 0,
        sectors,
        max_segments,
        readonly,
        *evtchn.doorbell_names(),
    )


class NativeDisk:
    """What FuseSession and the kernel's commands ask of a disk (DiskPath's blocking calls,
    ``post_flush``, ``post_discard``, ``reset``, ``stop``), over a native pump."""

    def __init__(self, pump: Any, *, sectors: int, on_broken: Callable[[str], None]) -> None:
        self.pump = pump
        self.sectors = sectors
        self.size = sectors * B.SECTOR_SIZE
        self.on_broken = on_broken
        self._reported = threading.Lock()
        self._told = False
        self._reaper = threading.Thread(target=self._serve, name="blkfront-reaper", daemon=True)
        self._flushes = ThreadPoolExecutor(FLUSH_THREADS, thread_name_prefix="blkfront-flush")

    def start(self) -> None:
        self._reaper.start()

    def stop(self) -> None:
        """Every transfer in flight, or to come, fails; the reaper ends; once the session's
        reader has returned too, the pump lets go of the ring and pools."""
        self.pump.stop()
        self._flushes.shutdown(wait=False, cancel_futures=True)
        if self._reaper.is_alive() and self._reaper is not threading.current_thread():
            self._reaper.join(JOIN_TIMEOUT)
        with contextlib.suppress(RuntimeError):  # still reading: dropped with the pump
            self.pump.close()

    def reset(self) -> int:
        """The backend restarted: the pump posts every request not yet answered again."""
        replayed: int = self.pump.reset()
        if replayed < 0:
            self._report(self.pump.why)
            raise DiskBroken(self.pump.why)
        return replayed

    def _serve(self) -> None:
        code, why = self.pump.reap()
        if code == pumps.FUSE_BROKEN:
            self._report(why)

    def _report(self, why: str) -> None:
        """Tell ``on_broken`` once, whoever saw it first (the reaper, or a reset)."""
        with self._reported:
            told, self._told = self._told, True
        if not told:
            self.on_broken(why)

    # -- transfers ------------------------------------------------------------------------------

    def _io(self, operation: int, offset: int, length: int, data: bytes | None = None) -> bytes:
        args = (operation, offset, length) if data is None else (operation, offset, length, data)
        status, out = self.pump.io(*args)
        if status != B.BLKIF_RSP_OKAY:
            raise OSError(status_errno(status), f"the backend answered {status}")
        return out or b""

    def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` (cut at the end of the disk), as DiskPath.read."""
        size = max(0, min(size, self.size - offset))
        if size == 0:
            return b""
        start, end = sector_span(offset, size)
        out = b"".join(
            self._io(B.BLKIF_OP_READ, at, min(CHUNK, end - at)) for at in range(start, end, CHUNK)
        )
        return out[offset - start : offset - start + size]

    def write(self, offset: int, data: bytes | memoryview) -> int:
        """Write ``data`` at ``offset``, as DiskPath.write; alone on the ring (see above)."""
        size = len(data)
        if offset + size > self.size:
            raise OSError(errno.ENOSPC, "write past the end of the disk")
        self.pump.quiesce()
        view = memoryview(data)
        head, whole = sector_pieces(offset, size)
        if head:
            self._patch(offset, view[:head])
        for at in range(0, whole, CHUNK):
            piece = bytes(view[head + at : head + min(whole, at + CHUNK)])
            self._io(B.BLKIF_OP_WRITE, offset + head + at, len(piece), piece)
        if head + whole < size:
            self._patch(offset + head + whole, view[head + whole :])
        return size

    def _patch(self, offset: int, data: memoryview) -> None:
        """Write ``data`` inside one sector: read it, change the part, write it back."""
        start = offset - offset % B.SECTOR_SIZE
        sector = bytearray(self._io(B.BLKIF_OP_READ, start, B.SECTOR_SIZE))
        sector[offset - start : offset - start + len(data)] = data
        self._io(B.BLKIF_OP_WRITE, start, B.SECTOR_SIZE, bytes(sector))

    def flush(self) -> None:
        self._io(B.BLKIF_OP_FLUSH_DISKCACHE, 0, 0)

    def post_flush(self, done: Done) -> None:
        """A flush waited for on a helper thread: ``done(status)`` when answered, as
        DiskPath.post_flush calls it from its reaper."""
        self._flushes.submit(lambda: done(self.pump.io(B.BLKIF_OP_FLUSH_DISKCACHE, 0, 0)[0]))

    def post_discard(self, first: int, count: int, done: Done) -> None:
        """DISCARD ``count`` sectors from ``first``, on the session's thread (a write: it must
        not overtake a read-modify-write, which runs there too)."""
        length = count * B.SECTOR_SIZE
        done(self.pump.io(B.BLKIF_OP_DISCARD, first * B.SECTOR_SIZE, length)[0])

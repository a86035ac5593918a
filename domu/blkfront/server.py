"""A disk's FUSE server: ``python -m domu.blkfront.server``, one process per connected disk.

The domain kernel negotiates the disk (XenBus, grant pools, the event channel) and then starts
this process in its own namespaces, as the domain's root, with one JSON object on stdin: the
disk's name and mount point (``/dev/xvda``), its size, whether it is read-only, the largest
request the backend takes, the shared objects to open (ring page, data pages, indirect pages:
pool name, first gref, pages) and the two doorbells. It opens ``/dev/fuse``, mounts it over
the regular file the kernel made at the mount point (mount(2) itself, as the root of the
domain's user namespace, which FUSE allows; no fusermount, no libfuse), speaks the kernel's
FUSE protocol (domu/blkfront/fuse_wire.py) for a file system whose root *is* the disk, and
serves it until its stdin closes (the kernel disconnects the disk: it unmounts) or the file
system is unmounted. While it serves, the kernel may send ``reset`` on stdin: the backend
restarted, and the ring starts over (DiskPath.reset).

Threads, and why no thread waits for a ring round trip:

* the session (the main thread) reads one request at a time from ``/dev/fuse``, each with one
  readv into a header buffer and then granted data pages (the landing): a WRITE's data lands
  in pages that go to the ring as they are. It puts each READ and WRITE on the ring (into pages
  of its own for a READ) and goes back for the next request: as many are in flight as the
  kernel sends, up to the ring's slots and the pool's pages, which are all it ever waits for;
* the reaper (DiskPath's) takes the backend's responses and writes each answer back: a READ's
  is one writev of the reply header and the granted pages;
* the kernel's commands (stdin);
* up to ``SLOW_THREADS`` helpers, started when needed, for what must wait in between: a read or
  write of part of a sector (read-modify-write), the flush after an ``O_DSYNC`` write.

The file: mode 0600 and the workload user as owner (0400 and a read-only mount for an ``ro``
disk, so writes fail with EROFS). Mount options ``allow_other`` (the workload is another uid of
the domain's user namespace) and ``default_permissions`` (the kernel checks the mode). Every
open gets ``FOPEN_DIRECT_IO``: no page cache in the domain, each read and write becomes blkif
requests at once, up to 1 MiB. An ``O_DSYNC`` write is followed by a flush, as a disk honours
FUA; fsync is a flush; fallocate's punch hole is a discard; the size never changes (a
truncation is accepted and ignored, as ``dd`` without ``conv=notrunc`` asks for one).

With the native pump built (channels._fusepump), the session's thread runs the pump's reader
and the reaper is the pump's: READ and WRITE of whole sectors never reach Python, and the
session serves only what the pump returns to it (NativeSession; domu/blkfront/native.py).

A process of its own, not a thread of the kernel: the requests and the copies into the granted
pages get an interpreter (and a GIL) of their own, and a server that dies takes only its disk
with it (the kernel then unmounts it).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from channels import blkif as B
from channels import linux, pumps
from channels.doorbell import DoorbellPair
from channels.gnttab import GrantPool
from channels.ring import FrontRing
from domu.blkfront import fuse_wire as F
from domu.blkfront.datapath import PAGE_SIZE, DiskBroken, DiskPath, Extents, Run, status_errno
from domu.blkfront.native import NativeDisk, make_pump

log = logging.getLogger("blkfront")

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
SLOW_THREADS = 4
ATTR_VALID = 3600  # seconds the kernel may cache the file's attributes: only we change them
FUSE_DEVICE = "/dev/fuse"


class Landing:
    """What each request is read into: a header buffer of ``HEAD_ROOM`` bytes (a WRITE's
    in_header and write_in, so its data starts in the next buffer), then at least ``pages``
    granted data pages, as runs of the pool. A WRITE takes the pages its data landed in; before
    the next read the landing tops itself up from the pool (the kernel refuses a read into less
    room than its largest WRITE), ``REFILL`` pages or more at a time.

    Why in blocks: a 4 KiB write takes one page off the front; topped up a page at a time, the
    landing would soon be 256 pages from all over the pool, a readv of 257 buffers. Taken 64 at
    a time, and with adjacent runs merged into one buffer, it stays a handful of buffers, and
    the pages it hands out come back to the pool together, as blocks the buddy allocator merges.
    """

    REFILL = 64

    def __init__(self, disk: DiskPath, pages: int) -> None:
        self.disk = disk
        self.pages = pages
        self.head = bytearray(F.HEAD_ROOM)
        self.buffers: list[bytearray | memoryview] = [self.head]
        self._runs: deque[Run] = deque()  # as the pool handed them out: each freed on its own
        self._stretches: list[list[int]] = []  # [first, pages] of adjacent runs: one buffer each
        self._held = 0

    def fill(self) -> None:
        """Back to ``pages`` pages, waiting for the pool if it is short."""
        if self._held >= self.pages:
            return
        for first, count in self.disk.take_pages(max(self.REFILL, self.pages - self._held)) or ():
            self._runs.append((first, count))
            self._held += count
            last = self._stretches[-1] if self._stretches else None
            if last is not None and last[0] + last[1] == first:
                last[1] += count
            else:
                self._stretches.append([first, count])
        self._rebuild()

    def take(self, nbytes: int) -> list[Run]:
        """The runs holding the first ``nbytes`` after the header: they are the caller's now."""
        count = -(-nbytes // PAGE_SIZE)
        self._held -= count
        taken: list[Run] = []
        left = count
        while left > 0:
            head, tail = Extents.split(self._runs.popleft(), left)
            taken += head
            left -= sum(n for _, n in head)
            self._runs.extendleft(reversed(tail))
        while count > 0:
            stretch = self._stretches[0]
            if stretch[1] <= count:
                count -= self._stretches.pop(0)[1]
            else:
                stretch[0] += count
                stretch[1] -= count
                count = 0
        self._rebuild()
        return taken

    def peek(self, nbytes: int) -> bytes:
        """A copy of the first ``nbytes`` after the header."""
        return b"".join(bytes(view) for view in self.disk.views(self._runs, nbytes))

    def release(self) -> None:
        self.disk.give_pages(self._runs)
        self._runs.clear()
        self._stretches = []
        self._held = 0
        self.buffers = [self.head]

    def _rebuild(self) -> None:
        self.buffers = [self.head, *self.disk.views(self._stretches, self._held * PAGE_SIZE)]


class FuseSession:
    """One mounted disk's ``/dev/fuse`` descriptor, served (see the module docstring)."""

    def __init__(
        self,
        fd: int,
        disk: DiskPath,
        *,
        readonly: bool,
        uid: int,
        gid: int,
        on_mounted: Callable[[], None],
    ) -> None:
        self.fd = fd
        self.disk = disk
        self.readonly = readonly
        mode = stat.S_IFREG | (0o400 if readonly else 0o600)
        self.attr = F.Attr(disk.size, mode, uid, gid, time.time_ns())
        self.on_mounted = on_mounted
        self.landing = Landing(disk, F.MAX_PAGES)
        self.max_read = F.MAX_READ
        self.initialized = False
        self._slow = ThreadPoolExecutor(SLOW_THREADS, thread_name_prefix="blkfront-slow")
        self._handlers: dict[int, Callable[[F.Request], None]] = {
            F.FUSE_INIT: self._init,
            F.FUSE_LOOKUP: self._lookup,
            F.FUSE_GETATTR: self._getattr,
            F.FUSE_SETATTR: self._setattr,
            F.FUSE_OPEN: self._open,
            F.FUSE_READ: self._read,
            F.FUSE_WRITE: self._write,
            F.FUSE_STATFS: self._statfs,
            F.FUSE_FLUSH: self._ok,  # close(2) of one descriptor, not a disk cache flush
            F.FUSE_RELEASE: self._ok,
            F.FUSE_FSYNC: self._fsync,
            F.FUSE_FALLOCATE: self._fallocate,
            F.FUSE_DESTROY: self._ok,
        }

    def run(self) -> None:
        """Serve until the kernel ends the connection (unmounted: ENODEV) or the fd is closed."""
        try:
            while self._serve_one():
                pass
        finally:
            self._slow.shutdown(wait=False, cancel_futures=True)
            self.landing.release()

    def _serve_one(self) -> bool:
        self.landing.fill()
        try:
            length = os.readv(self.fd, self.landing.buffers)
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                return False
            if exc.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                return True  # ENOENT: the request was interrupted before it was read
            raise
        if length == 0:
            return False
        head = self.landing.head
        if length > F.HEAD_ROOM and F.opcode_of(head) != F.FUSE_WRITE:
            message = bytes(head) + self.landing.peek(length - F.HEAD_ROOM)  # e.g. INIT's
        else:
            message = bytes(head[:length])
        self._serve_message(message, length)
        return True

    def _serve_message(self, message: bytes, length: int) -> None:
        """One request, read whole (``message`` may stop after a WRITE's fixed part)."""
        request = F.parse(message, length, max_read=self.max_read)
        if isinstance(request, F.Rejected):
            log.warning("FUSE request refused: %s", request.reason)
            if request.unique is not None and request.opcode not in F.NO_REPLY:
                self._error(request.unique, request.errno)
        else:
            self._dispatch(request)

    def _dispatch(self, request: F.Request) -> None:
        if request.opcode in F.NO_REPLY:
            return  # FORGET, BATCH_FORGET; INTERRUPT: the request ends when the disk answers
        handler = self._handlers.get(request.opcode)
        if handler is None:
            self._error(request.unique, errno.ENOSYS)
            return
        if not self.initialized and request.opcode != F.FUSE_INIT:
            self._error(request.unique, errno.EIO)
            return
        try:
            handler(request)
        except OSError as exc:
            self._error(request.unique, exc.errno or errno.EIO)

    # -- answers --------------------------------------------------------------------------------

    def _send(self, *buffers: bytes | memoryview) -> None:
        """One reply, in one write. ENOENT: the kernel no longer waits for it (interrupted);
        ENODEV: the connection is gone."""
        try:
            os.writev(self.fd, buffers)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENODEV, errno.EBADF):
                log.warning("a FUSE reply failed: %s", exc)

    def _error(self, unique: int, code: int) -> None:
        self._send(F.reply_error(unique, code))

    def _answer(self, unique: int, status: int, payload: bytes = b"") -> None:
        if status == B.BLKIF_RSP_OKAY:
            self._send(F.reply(unique, payload))
        else:
            self._error(unique, status_errno(status))

    def _aside(self, unique: int, work: Callable[[], bytes]) -> None:
        """Run ``work`` on a helper thread and answer with what it returns (or its errno)."""
        self._slow.submit(self._answer_with, unique, work)

    def _answer_with(self, unique: int, work: Callable[[], bytes]) -> None:
        try:
            self._send(F.reply(unique, work()))
        except OSError as exc:
            self._error(unique, exc.errno or errno.EIO)

    # -- the operations -------------------------------------------------------------------------

    def _init(self, request: F.Request) -> None:
        assert isinstance(request.args, F.Init)
        outcome = F.negotiate(request.args)
        if outcome.payload is None:
            log.error("FUSE INIT: the kernel speaks %d.%d", request.args.major, request.args.minor)
            self._error(request.unique, outcome.error)
            return
        self._send(F.reply(request.unique, outcome.payload))
        if outcome.done:
            self._negotiated(outcome.max_pages)

    def _negotiated(self, max_pages: int) -> None:
        """INIT is done: READ and WRITE of up to ``max_pages`` pages may come."""
        self.max_read = max_pages * PAGE_SIZE
        self.initialized = True
        self.on_mounted()

    def _lookup(self, request: F.Request) -> None:
        self._error(request.unique, errno.ENOENT)  # the root is the disk: no names below it

    def _getattr(self, request: F.Request) -> None:
        self._send(F.reply(request.unique, self.attr.pack_out(ATTR_VALID)))

    def _setattr(self, request: F.Request) -> None:
        assert isinstance(request.args, F.SetAttr)
        if request.args.valid & (F.FATTR_MODE | F.FATTR_UID | F.FATTR_GID):
            self._error(request.unique, errno.EPERM)
            return
        # A new size or new times: accepted and ignored (a disk keeps its size; an O_TRUNC
        # open comes this way), and the kernel learns the size it keeps from the reply.
        self._getattr(request)

    def _open(self, request: F.Request) -> None:
        flags = F.FOPEN_DIRECT_IO | F.FOPEN_PARALLEL_DIRECT_WRITES
        self._send(F.reply(request.unique, F.open_out(flags)))

    def _ok(self, request: F.Request) -> None:
        self._send(F.reply(request.unique))

    def _statfs(self, request: F.Request) -> None:
        self._send(F.reply(request.unique, F.statfs_out(self.disk.size)))

    def _read(self, request: F.Request) -> None:
        args, unique, disk = request.args, request.unique, self.disk
        assert isinstance(args, F.Read)
        offset = args.offset
        size = max(0, min(args.size, disk.size - offset))
        if size == 0:
            self._send(F.reply(unique))
            return
        if offset % B.SECTOR_SIZE or size % B.SECTOR_SIZE:
            self._aside(unique, lambda: disk.read(offset, size))
            return
        runs = disk.take_pages(-(-size // PAGE_SIZE))
        assert runs is not None

        def answered(status: int) -> None:
            try:
                if status == B.BLKIF_RSP_OKAY:
                    self._send(F.reply_header(unique, size), *disk.views(runs, size))
                else:
                    self._error(unique, status_errno(status))
            finally:
                disk.give_pages(runs)

        disk.post(B.BLKIF_OP_READ, offset, runs, size, answered)

    def _write(self, request: F.Request) -> None:
        args, unique, disk = request.args, request.unique, self.disk
        assert isinstance(args, F.Write)
        if self.readonly:
            raise OSError(errno.EROFS, "read-only disk")
        offset = args.offset
        if offset >= disk.size:
            raise OSError(errno.ENOSPC, "write past the end of the disk")
        size = min(args.size, disk.size - offset)
        reply = F.write_out(size)
        if size == 0:
            self._send(F.reply(unique, reply))
            return
        dsync = bool(args.flags & os.O_DSYNC)  # O_SYNC includes it
        if offset % B.SECTOR_SIZE or size % B.SECTOR_SIZE:
            data = self._written(size)

            def patch() -> bytes:
                disk.write(offset, data)
                if dsync:
                    disk.flush()
                return reply

            self._aside(unique, patch)
            return
        runs = self.landing.take(args.size)

        def answered(status: int) -> None:
            try:
                if status == B.BLKIF_RSP_OKAY and dsync:
                    self._slow.submit(lambda: self._answer(unique, _flushed(disk), reply))
                else:
                    self._answer(unique, status, reply)
            finally:
                disk.give_pages(runs)

        disk.post(B.BLKIF_OP_WRITE, offset, runs, size, answered)

    def _written(self, size: int) -> bytes:
        """The first ``size`` bytes of the WRITE being served."""
        return self.landing.peek(size)

    def _fsync(self, request: F.Request) -> None:
        unique = request.unique
        if self.readonly:
            self._send(F.reply(unique))
            return
        self.disk.post_flush(lambda status: self._answer(unique, status))

    def _fallocate(self, request: F.Request) -> None:
        args, unique = request.args, request.unique
        assert isinstance(args, F.Fallocate)
        if self.readonly:
            raise OSError(errno.EROFS, "read-only disk")
        end = args.offset + args.length
        if args.mode == FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE:
            first = -(-args.offset // B.SECTOR_SIZE)  # the whole sectors inside the range
            last = min(end // B.SECTOR_SIZE, self.disk.sectors)
            if last <= first:
                self._send(F.reply(unique))
                return
            self.disk.post_discard(first, last - first, lambda st: self._answer(unique, st))
        elif args.mode in (0, FALLOC_FL_KEEP_SIZE) and end <= self.disk.size:
            self._send(F.reply(unique))  # a disk is always fully allocated
        else:
            raise OSError(errno.EOPNOTSUPP, f"fallocate mode {args.mode}")


class NativeSession(FuseSession):
    """FuseSession with the pump's reader in its loop: Python sees only what the pump leaves."""

    # A NativeDisk stands in for FuseSession's DiskPath without being one: it has no pages
    # (take_pages, views, post), and FuseSession asks for them only to serve a READ or WRITE of
    # whole sectors, which the pump serves itself and never hands to Python.
    disk: NativeDisk  # type: ignore[assignment]  # NativeDisk is not a DiskPath (see above)

    def __init__(self, fd: int, disk: NativeDisk, **kw: Any) -> None:
        super().__init__(fd, disk, **kw)  # type: ignore[arg-type]  # as for ``disk`` above
        self._message = b""

    def run(self) -> None:
        """Serve until the kernel ends the connection (unmounted) or the fd is closed."""
        pump = self.disk.pump
        try:
            while True:
                code, message = pump.read()
                if code == pumps.FUSE_ENDED:
                    return
                if code == pumps.FUSE_ERROR:
                    raise OSError(message, f"reading /dev/fuse: errno {message}")
                self._message = message
                self._serve_message(message, len(message))
        finally:
            self._slow.shutdown(wait=False, cancel_futures=True)

    def _written(self, size: int) -> bytes:
        return self._message[F.HEAD_ROOM : F.HEAD_ROOM + size]

    def _aside(self, unique: int, work: Callable[[], bytes]) -> None:
        """Part-sector reads and writes run here, on the session's thread (see above)."""
        self._answer_with(unique, work)

    def _negotiated(self, max_pages: int) -> None:
        super()._negotiated(max_pages)
        self.disk.pump.configure(max_pages)


def _flushed(disk: DiskPath | NativeDisk) -> int:
    """Flush the disk; its status."""
    try:
        disk.flush()
    except OSError:
        return B.BLKIF_RSP_ERROR
    return B.BLKIF_RSP_OKAY


# -- the process ----------------------------------------------------------------------------------

_stdout_lock = threading.Lock()


def _say(line: str) -> None:
    """One line to the kernel, which reads our stdout."""
    with _stdout_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def _report_broken(reason: str) -> None:
    """The backend broke the protocol: the kernel, reading our stdout, writes the device's
    ``error`` node and closes it (we hold no store connection of our own)."""
    log.error("disk broken: %s", reason)
    _say("broken " + " ".join(reason.split())[:400])


def _follow_the_kernel(disk: DiskPath | NativeDisk, mountpoint: str) -> None:
    """The kernel's commands, a line each on stdin. ``reset``: the backend restarted, so start
    the ring over with every unanswered request on it again (answered ``reset``). stdin
    closing disconnects the disk: unmount, which ends the session (lazily if a program still
    has the disk open: the session ends when it closes it)."""
    with contextlib.suppress(OSError, ValueError):
        for line in sys.stdin:
            if line.strip() != "reset":
                continue
            try:
                replayed = disk.reset()
            except DiskBroken:
                continue  # on_broken has told the kernel
            log.info("the backend restarted: %d requests posted again", replayed)
            _say("reset")
    try:
        linux.umount(mountpoint)
    except OSError:
        with contextlib.suppress(OSError):
            linux.umount(mountpoint, linux.MNT_DETACH)


def mount(mountpoint: str, *, readonly: bool, fsname: str) -> int:
    """Open /dev/fuse and mount it over the regular file ``mountpoint``, as libfuse would;
    the descriptor to serve (the kernel sends INIT on it first)."""
    fd = os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    options = (
        f"fd={fd},rootmode={stat.S_IFREG:o},user_id={os.getuid()},group_id={os.getgid()},"
        "allow_other,default_permissions"
    )
    flags = linux.MS_NOSUID | linux.MS_NODEV | (linux.MS_RDONLY if readonly else 0)
    try:
        linux.mount(fsname, mountpoint, "fuse", flags, options)
    except OSError:
        os.close(fd)
        raise
    return fd


def serve(params: dict[str, Any]) -> None:
    pools = {
        kind: GrantPool.open(spec["name"], spec["gref_base"], spec["pages"])
        for kind, spec in params["pools"].items()
    }
    # The kernel initialised the ring (indices 0) before publishing it: a fresh front end
    # over the page starts where it left off.
    ring = FrontRing(B.BLK_RING, pools["ring"].page(0), name=params["name"])
    evtchn = DoorbellPair(*params["doorbells"])
    mountpoint, readonly = params["mountpoint"], params["readonly"]
    # The descriptor stays open until the process exits: a helper thread answering late
    # writes to it, and never to another file that took its number.
    fd = mount(mountpoint, readonly=readonly, fsname=f"xvd:{params['name']}")
    disk = _disk(fd, ring, evtchn, pools, params)
    disk.start()
    threading.Thread(target=_follow_the_kernel, args=(disk, mountpoint), daemon=True).start()
    try:
        options: dict[str, Any] = {
            "readonly": readonly,
            "uid": params["uid"],
            "gid": params["gid"],
            "on_mounted": lambda: _say("mounted"),
        }
        session = (
            NativeSession(fd, disk, **options)
            if isinstance(disk, NativeDisk)
            else FuseSession(fd, disk, **options)
        )
        session.run()
    finally:
        disk.stop()


def _disk(
    fd: int,
    ring: FrontRing,
    evtchn: DoorbellPair,
    pools: dict[str, GrantPool],
    params: dict[str, Any],
) -> DiskPath | NativeDisk:
    """The disk's data path: the native pump when it runs (domu/blkfront/native.py), else
    DiskPath."""
    data, indirect = pools["data"], pools.get("indirect")
    sectors, max_segments = params["sectors"], params["max_segments"]
    try:
        pump = make_pump(
            fd,
            ring,
            evtchn,
            data,
            indirect,
            sectors=sectors,
            max_segments=max_segments,
            readonly=params["readonly"],
        )
    except (OSError, ValueError) as exc:
        log.warning("%s: native pump unavailable, the Python path runs: %s", ring.name, exc)
        pump = None
    if pump is not None:
        return NativeDisk(pump, sectors=sectors, on_broken=_report_broken)
    return DiskPath(
        ring,
        evtchn,
        data,
        [data.gref_base + i for i in range(data.pages)],
        indirect,
        [indirect.gref_base + i for i in range(indirect.pages)] if indirect else [],
        sectors=sectors,
        max_segments=max_segments,
        on_broken=_report_broken,
    )


def main(argv: list[str] | None = None) -> int:
    """The entry point the kernel's fork server runs: the parameters come on stdin."""
    linux.set_comm("hyper-blkfront")  # what ps shows inside the domain
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    serve(json.loads(sys.stdin.readline()))
    os._exit(0)  # no interpreter teardown over shared memory a peer may have broken


if __name__ == "__main__":
    sys.exit(main())

"""A disk's FUSE server: ``python -m domu.blkfront.server``, one process per connected disk.

The domain kernel negotiates the disk (XenBus, grant pools, the event channel) and then starts
this process in its own namespaces, as the domain's root, with one JSON object on stdin: the
disk's name and mount point (``/dev/xvda``), its size, whether it is read-only, the largest
request the backend takes, the shared objects to open (ring page, data pages, indirect pages:
pool name, first gref, pages) and the two doorbells. It mounts a FUSE file system whose root
*is* the disk, over the regular file the kernel made at the mount point, with mfusepy (ctypes
over libfuse3's multi-threaded loop), and serves it until its stdin closes (the kernel
disconnects the disk) or the file system is unmounted. While it serves, the kernel may send
``reset`` on stdin: the backend restarted, and the ring starts over (DiskPath.reset).

A process of its own, not a thread of the kernel: FUSE callbacks and the copies into the
granted pages get an interpreter (and a GIL) of their own, libfuse's signal handling stays out
of the kernel, and a server that dies takes only its disk with it.

Mount options: ``allow_other`` (the workload is another uid of the domain's user namespace;
the kernel allows it there, fuse.conf matters only to fusermount) with ``default_permissions``,
so the file's owner and mode decide: the workload user owns its disks, mode 0600 (0400 and a
read-only mount for an ``ro`` disk, so writes fail with EROFS). Every open gets ``direct_io``:
no page cache in the domain, each read and write becomes blkif requests at once, up to 1 MiB.
An ``O_DSYNC`` write (which direct I/O delivers without a separate fsync) is followed by a
flush, as a disk honours FUA.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import stat
import sys
import threading
import time
from typing import Any

os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")  # mfusepy prefers libfuse2 when both exist
import mfusepy

from channels import blkif as B
from channels.doorbell import DoorbellPair
from channels.gnttab import GrantPool
from channels.ring import FrontRing
from domu import linux
from domu.blkfront.datapath import DiskBroken, DiskPath

log = logging.getLogger("blkfront")

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
MNT_DETACH = 2
FUSE_THREADS = 32

_libc = ctypes.CDLL(None, use_errno=True)
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class DiskOps(mfusepy.Operations):  # type: ignore[misc]
    """The FUSE file system: one regular file, the disk, at the root."""

    use_ns = True

    def __init__(self, disk: DiskPath, *, readonly: bool, uid: int, gid: int) -> None:
        self.disk = disk
        self.readonly = readonly
        self.uid, self.gid = uid, gid
        self.size = disk.sectors * B.SECTOR_SIZE
        self.born = time.time_ns()

    def init_with_config(self, conn: Any, config: Any) -> None:
        """FUSE_INIT: the file system is mounted. Tune it, and tell the kernel (it waits for
        this line before it goes Connected)."""
        if conn is not None:
            conn.max_background = 64  # requests the kernel may queue (readahead, async I/O)
            conn.congestion_threshold = 48
        if config is not None:
            config.direct_io = 1
            config.nullpath_ok = 1
            config.attr_timeout = config.entry_timeout = 3600.0
        _say("mounted")

    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, int]:
        if path not in ("/", None):
            raise mfusepy.FuseOSError(errno.ENOENT)
        t = self.born
        mode = 0o400 if self.readonly else 0o600
        return {
            "st_mode": stat.S_IFREG | mode,
            "st_nlink": 1,
            "st_size": self.size,
            "st_uid": self.uid,
            "st_gid": self.gid,
            "st_blksize": 4096,
            "st_blocks": self.size // B.SECTOR_SIZE,
            "st_atime": t,
            "st_mtime": t,
            "st_ctime": t,
        }

    def open(self, path: str, fi: Any) -> int:
        fi.direct_io = 1
        fi.keep_cache = 0
        return 0

    # mfusepy installs a read or write callback only for an operation defined here; DiskFuse
    # serves both through read_into and write_from, so these two are never called.
    def read(self, path: str | None, size: int, offset: int, fi: Any) -> bytes:
        raise NotImplementedError("DiskFuse reads through read_into")

    def write(self, path: str | None, data: bytes, offset: int, fi: Any) -> int:
        raise NotImplementedError("DiskFuse writes through write_from")

    def read_into(self, buf: Any, size: int, offset: int) -> int:
        """The read callback's fast path: straight from the granted pages into libfuse's
        buffer (see DiskFuse)."""
        address = ctypes.cast(buf, ctypes.c_void_p).value or 0
        return int(self._io(lambda: self.disk.read_into(address, size, offset)))

    def write_from(self, buf: Any, size: int, offset: int, fi: Any) -> int:
        if offset >= self.size:
            raise mfusepy.FuseOSError(errno.ENOSPC)
        size = min(size, self.size - offset)
        address = ctypes.cast(buf, ctypes.c_void_p).value or 0
        written = int(self._io(lambda: self.disk.write_from(address, size, offset)))
        if fi.flags & os.O_DSYNC:  # O_SYNC includes it
            self._io(self.disk.flush)
        return written

    def fsync(self, path: str | None, datasync: int, fi: Any) -> int:
        if not self.readonly:
            self._io(self.disk.flush)
        return 0

    def flush(self, path: str | None, fi: Any) -> int:
        return 0  # close(2) of one descriptor, not a disk cache flush

    def fallocate(self, path: str | None, mode: int, offset: int, length: int, fi: Any) -> int:
        if mode == FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE:
            self._io(lambda: self.disk.discard(offset, length))
            return 0
        if mode in (0, FALLOC_FL_KEEP_SIZE) and offset + length <= self.size:
            return 0  # a disk is always fully allocated
        raise mfusepy.FuseOSError(errno.EOPNOTSUPP)

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        return 0  # a disk keeps its size (dd without conv=notrunc asks for 0)

    def chmod(self, path: str | None, mode: int) -> int:
        raise mfusepy.FuseOSError(errno.EPERM)

    def chown(self, path: str | None, uid: int, gid: int) -> int:
        raise mfusepy.FuseOSError(errno.EPERM)

    def utimens(self, path: str | None, times: Any = None) -> int:
        return 0

    def release(self, path: str | None, fi: Any) -> int:
        return 0

    @staticmethod
    def _io(call: Any) -> Any:
        try:
            return call()
        except OSError as exc:
            raise mfusepy.FuseOSError(exc.errno or errno.EIO) from exc


class DiskFuse(mfusepy.FUSE):  # type: ignore[misc]
    """mfusepy's FUSE, with read and write callbacks that copy between libfuse's buffer and
    the granted pages directly: mfusepy's own would make a Python bytes object of every block
    (and copy it once more)."""

    def read(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
        return int(self.operations.read_into(buf, size, offset))

    def write(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
        return int(self.operations.write_from(buf, size, offset, fip.contents))


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


def _follow_the_kernel(disk: DiskPath, mountpoint: str) -> None:
    """The kernel's commands, a line each on stdin. ``reset``: the backend restarted, so start
    the ring over with every unanswered request on it again (answered ``reset``). stdin
    closing disconnects the disk: unmount, which ends the FUSE loop (lazily if a program
    still has the disk open: the loop ends when it closes it)."""
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
    if _libc.umount2(mountpoint.encode(), 0) != 0:
        _libc.umount2(mountpoint.encode(), MNT_DETACH)


def serve(params: dict[str, Any]) -> None:
    pools = {
        kind: GrantPool.open(spec["name"], spec["gref_base"], spec["pages"])
        for kind, spec in params["pools"].items()
    }
    # The kernel initialised the ring (indices 0) before publishing it: a fresh front end
    # over the page starts where it left off.
    ring = FrontRing(B.BLK_RING, pools["ring"].page(0), name=params["name"])
    evtchn = DoorbellPair(*params["doorbells"])
    indirect = pools.get("indirect")
    disk = DiskPath(
        ring,
        evtchn,
        pools["data"],
        [pools["data"].gref_base + i for i in range(pools["data"].pages)],
        indirect,
        [indirect.gref_base + i for i in range(indirect.pages)] if indirect else [],
        sectors=params["sectors"],
        max_segments=params["max_segments"],
        on_broken=_report_broken,
    )
    mountpoint = params["mountpoint"]
    threading.Thread(target=_follow_the_kernel, args=(disk, mountpoint), daemon=True).start()
    try:
        mount(
            disk,
            mountpoint,
            readonly=params["readonly"],
            uid=params["uid"],
            gid=params["gid"],
            fsname=f"xvd:{params['name']}",
        )
    finally:
        disk.stop()


def mount(disk: Any, mountpoint: str, *, readonly: bool, uid: int, gid: int, fsname: str) -> None:
    """Serve ``disk`` as the regular file at ``mountpoint`` until it is unmounted. ``disk`` is
    a DiskPath, or anything with its interface (``sectors``, ``read``, ``read_into``,
    ``write_from``, ``flush``, ``discard``): bench/fuse_passthrough.py serves a loop device
    through this same FUSE layer, to measure it without the rings."""
    ops = DiskOps(disk, readonly=readonly, uid=uid, gid=gid)
    options: dict[str, Any] = {"allow_other": True, "default_permissions": True}
    if readonly:
        options["ro"] = True
    try:
        DiskFuse(
            ops,
            mountpoint,
            foreground=True,
            raw_fi=True,
            fsname=fsname,
            max_threads=FUSE_THREADS,
            **options,
        )
    except RuntimeError as exc:  # libfuse's own SIGTERM handling ends the loop this way
        log.info("%s: FUSE loop ended: %s", fsname, exc)


def main() -> None:
    linux.set_comm("hyper-blkfront")  # what ps shows inside the domain
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    serve(json.loads(sys.stdin.readline()))
    os._exit(0)  # no interpreter teardown over shared memory a peer may have broken


if __name__ == "__main__":
    main()

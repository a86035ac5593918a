"""A plain FUSE passthrough of one block device: what FUSE in Python does without rings.

Run by ``bench/blk.py`` as ``python3 -m bench.fuse_passthrough DEVICE MOUNTPOINT``, as root.
It mounts a FUSE file system whose root *is* one regular file, over the regular file
MOUNTPOINT (libfuse takes the root's type from the mount point), and serves each read and
write with one ``preadv``/``pwritev`` on DEVICE opened ``O_DIRECT``. It prints ``mounted`` on
stdout once the kernel's FUSE_INIT is answered, and serves until the file system is unmounted
(or SIGTERM, which libfuse turns into an unmount).

It is the ceiling of FUSE in Python without rings: the same binding as hyper's disk server
(``domu/blkfront/server.py``: mfusepy, ctypes over libfuse3's multi-threaded loop), the same
mount options (``allow_other``, ``default_permissions``) and ``direct_io`` on every open, but
tuned for itself: 8 threads and ``max_background`` 32 serve it best (hyper's server runs 32
threads, because its requests wait on the ring; served through that layer, this passthrough
fell from ~16-25k to ~10k IOPS at queue depth 32). Between the kernel's buffers and the
device, data goes through page-aligned bounce buffers (``O_DIRECT`` needs aligned memory, and
mfusepy hands over ``bytes``) taken from a pool made once: ctypes callbacks run each request on
a fresh Python thread state, so thread-locals would be made again on every request.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import mmap
import os
import queue
import stat
import struct
import sys
import time
from typing import Any

os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")  # mfusepy prefers libfuse2 when both exist
import mfusepy

FUSE_THREADS = 8  # its best; see the module docstring
MAX_BACKGROUND = 32
BOUNCE_SIZE = 1 << 20  # the largest FUSE request (256 pages)
BOUNCE_COUNT = 2 * FUSE_THREADS  # more than can be in flight: take() never waits
BLKSSZGET = 0x1268  # _IO(0x12, 104): the device's logical block size, an int


class BouncePool:
    """Page-aligned buffers cut from one anonymous mapping, lent one per request."""

    def __init__(self, count: int, size: int) -> None:
        self._map = mmap.mmap(-1, count * size)  # page aligned, so is every multiple of size
        self._free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        whole = memoryview(self._map)
        for i in range(count):
            self._free.put(whole[i * size : (i + 1) * size])
        self.size = size

    def take(self) -> memoryview:
        return self._free.get()

    def give(self, buf: memoryview) -> None:
        self._free.put(buf)


class Passthrough(mfusepy.Operations):
    """One regular file at the root: the device, byte for byte."""

    use_ns = True

    def __init__(self, device: str) -> None:
        flags = os.O_RDWR | os.O_CLOEXEC
        self.fd = os.open(device, flags | os.O_DIRECT)
        # Requests that O_DIRECT refuses (unaligned; none from dd or fio here) go through the
        # page cache instead of failing.
        self.fd_buffered = os.open(device, flags)
        self.size = os.lseek(self.fd, 0, os.SEEK_END)
        raw = fcntl.ioctl(self.fd, BLKSSZGET, b"\0" * 4)
        self.align = int(struct.unpack("i", raw)[0])
        self.pool = BouncePool(BOUNCE_COUNT, BOUNCE_SIZE)
        self.born = time.time_ns()

    def init_with_config(self, conn: Any, config: Any) -> None:
        if conn is not None:
            conn.max_background = MAX_BACKGROUND
            conn.congestion_threshold = MAX_BACKGROUND * 3 // 4
        if config is not None:
            config.direct_io = 1
            config.nullpath_ok = 1
            config.attr_timeout = config.entry_timeout = 3600.0
        sys.stdout.write("mounted\n")
        sys.stdout.flush()

    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, int]:
        if path not in ("/", None):
            raise mfusepy.FuseOSError(errno.ENOENT)
        t = self.born
        return {
            "st_mode": stat.S_IFREG | 0o600,
            "st_nlink": 1,
            "st_size": self.size,
            "st_blksize": 4096,
            "st_blocks": self.size // 512,
            "st_atime": t,
            "st_mtime": t,
            "st_ctime": t,
        }

    def open(self, path: str, fi: Any) -> int:
        fi.direct_io = 1
        fi.keep_cache = 0
        return 0

    def _direct(self, offset: int, size: int) -> bool:
        return offset % self.align == 0 and size % self.align == 0 and size <= self.pool.size

    def read(self, path: str | None, size: int, offset: int, fi: Any) -> bytes:
        size = max(0, min(size, self.size - offset))
        if not self._direct(offset, size):
            return os.pread(self.fd_buffered, size, offset)
        buf = self.pool.take()
        try:
            done = os.preadv(self.fd, [buf[:size]], offset)
            return bytes(buf[:done])
        finally:
            self.pool.give(buf)

    def write(self, path: str | None, data: bytes, offset: int, fi: Any) -> int:
        if offset >= self.size:
            raise mfusepy.FuseOSError(errno.ENOSPC)
        size = min(len(data), self.size - offset)
        if not self._direct(offset, size):
            return os.pwrite(self.fd_buffered, data[:size], offset)
        buf = self.pool.take()
        try:
            buf[:size] = data[:size]
            return os.pwritev(self.fd, [buf[:size]], offset)
        finally:
            self.pool.give(buf)

    def fsync(self, path: str | None, datasync: int, fi: Any) -> int:
        os.fsync(self.fd)
        return 0

    def flush(self, path: str | None, fi: Any) -> int:
        return 0  # close(2) of one descriptor, not a cache flush

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        return 0  # a device keeps its size

    def utimens(self, path: str | None, times: Any = None) -> int:
        return 0

    def release(self, path: str | None, fi: Any) -> int:
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("device", help="the block device to serve (opened O_DIRECT)")
    parser.add_argument("mountpoint", help="a regular file to mount the FUSE file over")
    parser.add_argument("--threads", type=int, default=FUSE_THREADS, help="FUSE threads (8)")
    args = parser.parse_args()
    try:
        mfusepy.FUSE(
            Passthrough(args.device),
            args.mountpoint,
            foreground=True,
            raw_fi=True,
            fsname=f"passthrough:{os.path.basename(args.device)}",
            max_threads=args.threads,
            allow_other=True,
            default_permissions=True,
        )
    except RuntimeError as exc:  # libfuse's own SIGTERM handling ends the loop this way
        print(f"FUSE loop ended: {exc}", file=sys.stderr)
    except OSError as exc:
        print(f"{args.device}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A 9pfs share's FUSE file system: ``python -m domu.p9front.fs``, one process per share.

The domain kernel negotiates the device (domu/p9front/xenbus.py) and starts this process as the
domain's root with one JSON object on stdin: the share's tag and mount point (``/mnt/<tag>``),
the grant pools holding the ring (``ring``: the interface page, then the ``in`` pages; ``out``:
the ``out`` pages), the ring order, and the event channel's two doorbells. It attaches a 9P
client (domu/p9front/client.py) to the ring, negotiates msize, attaches fid 0 to the share's
root, mounts the file system through libfuse3 (mfusepy; as root of the domain's user namespace
it may mount FUSE itself), says ``mounted`` on stdout, and serves until its stdin closes (the
kernel disconnects the device: it unmounts) or the file system is unmounted. A backend that
breaks the protocol is reported as ``broken <reason>``, and every call fails with EIO.

What programs see: every file owned by the workload user (``WORKLOAD_UID``/``WORKLOAD_GID``)
whatever its owner on the host, with the host's permission bits (the share's files are the
workload's files); mount options ``allow_other`` (the workload is another uid than the
mounter) and ``default_permissions`` (the kernel checks those bits). Each FUSE operation walks
from the root fid (16 names per Twalk) to a fid of its own and clunks it after; an open file or
directory keeps its opened fid as the FUSE handle until released. A read-only share refuses
writes in the backend (EROFS), which is where they are refused.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from channels import linux
from channels import p9fs as P
from channels.doorbell import DoorbellPair
from channels.gnttab import GrantPool
from channels.ids import WORKLOAD_GID, WORKLOAD_UID
from channels.ring import PAGE_SIZE
from domu.p9front.client import P9Client

os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")  # mfusepy prefers libfuse2 when both exist
import mfusepy

log = logging.getLogger("p9front")

MSIZE = 512 << 10  # asked for; the ring and the backend may allow less
FUSE_THREADS = 8
T = TypeVar("T")
_OPEN_FLAGS = (
    P.P9_DOTL_ACCMODE | P.P9_DOTL_TRUNC | P.P9_DOTL_APPEND | P.P9_DOTL_DSYNC | P.P9_DOTL_SYNC
)


def _split(path: str) -> list[str]:
    return [name for name in path.split("/") if name]


class P9Fs(mfusepy.Operations):  # type: ignore[misc]  # mfusepy has no types: a base of Any
    """The share through one client; paths are FUSE's, relative to the mount point."""

    use_ns = True

    def __init__(self, client: P9Client, *, on_mounted: Callable[[], None] = lambda: None):
        self.client = client
        self.on_mounted = on_mounted

    # -- fids -----------------------------------------------------------------------------------

    def walk(self, names: list[str]) -> int:
        """A new fid for the file ``names`` leads to from the root (ENOENT if one is missing)."""
        fid = self.client.new_fid()
        chunks = [names[i : i + P.MAXWELEM] for i in range(0, len(names), P.MAXWELEM)] or [[]]
        start = 0  # the root's fid
        for chunk in chunks:
            try:
                qids = self.client.walk(start, fid, chunk)
            except OSError:
                self._drop(fid, made=start == fid)
                raise
            if len(qids) != len(chunk):  # a partial walk: newfid was not made (or moved)
                self._drop(fid, made=start == fid)
                raise OSError(errno.ENOENT, "/".join(names))
            start = fid
        return fid

    def _drop(self, fid: int, *, made: bool) -> None:
        if made:
            self.client.clunk(fid)
        else:
            self.client.forget_fid(fid)

    def _with(self, path: str, action: Callable[[int], T]) -> T:
        fid = self.walk(_split(path))
        try:
            return action(fid)
        finally:
            self.client.clunk(fid)

    def _in_parent(self, path: str, action: Callable[[int, str], T]) -> T:
        names = _split(path)
        if not names:
            raise OSError(errno.EINVAL, "the root")
        return self._with("/".join(names[:-1]), lambda dfid: action(dfid, names[-1]))

    # -- FUSE operations ------------------------------------------------------------------------

    def init(self, path: str) -> None:
        self.on_mounted()

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        attr = self.client.getattr(fh) if fh is not None else self._with(path, self.client.getattr)
        return {
            "st_mode": attr.mode,
            "st_ino": attr.qid.path,
            "st_nlink": attr.nlink,
            "st_uid": WORKLOAD_UID,
            "st_gid": WORKLOAD_GID,
            "st_size": attr.size,
            "st_blksize": attr.blksize,
            "st_blocks": attr.blocks,
            "st_atime": attr.atime_sec * 1_000_000_000 + attr.atime_nsec,
            "st_mtime": attr.mtime_sec * 1_000_000_000 + attr.mtime_nsec,
            "st_ctime": attr.ctime_sec * 1_000_000_000 + attr.ctime_nsec,
        }

    def _open(self, path: str, flags: int) -> int:
        fid = self.walk(_split(path))
        try:
            self.client.lopen(fid, flags)
        except OSError:
            self.client.clunk(fid)
            raise
        return fid

    def open(self, path: str, flags: int) -> int:
        return self._open(path, flags & _OPEN_FLAGS)

    def opendir(self, path: str) -> int:
        return self._open(path, P.P9_DOTL_RDONLY)

    def create(self, path: str, mode: int, flags: int = os.O_RDWR) -> int:
        names = _split(path)
        fid = self.walk(names[:-1])  # lcreate turns the directory's fid into the file's
        try:
            flags = (flags & _OPEN_FLAGS) | P.P9_DOTL_CREATE | P.P9_DOTL_EXCL
            self.client.lcreate(fid, names[-1], flags, stat.S_IMODE(mode), WORKLOAD_GID)
        except OSError:
            self.client.clunk(fid)
            raise
        return fid

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        parts: list[bytes] = []
        while size > 0:
            data = self.client.read(fh, offset, size)
            if not data:
                break
            parts.append(data)
            size -= len(data)
            offset += len(data)
        return b"".join(parts)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        done, chunk = 0, self.client.msize - P.IOHDRSZ
        while done < len(data):
            n = self.client.write(fh, offset + done, data[done : done + chunk])
            if n == 0:
                raise OSError(errno.EIO, "9pfs: a write of 0 bytes")
            done += n
        return done

    def release(self, path: str, fh: int) -> int:
        self.client.clunk(fh)
        return 0

    def releasedir(self, path: str, fh: int) -> int:
        self.client.clunk(fh)
        return 0

    def readdir(self, path: str, fh: int) -> list[str]:
        names: list[str] = []
        offset = 0
        while entries := self.client.readdir(fh, offset):
            names += (entry.name for entry in entries)
            offset = entries[-1].offset
        return names

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        if fh is not None:
            self.client.setattr(fh, P.P9_ATTR_SIZE, size=length)
        else:
            self._with(path, lambda fid: self.client.setattr(fid, P.P9_ATTR_SIZE, size=length))
        return 0

    def chmod(self, path: str, mode: int) -> int:
        self._with(path, lambda fid: self.client.setattr(fid, P.P9_ATTR_MODE, mode=mode))
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        return 0  # every file is the workload user's (see the module docstring)

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        if times is None:
            valid, fields = P.P9_ATTR_ATIME | P.P9_ATTR_MTIME, {}
        else:
            valid = P.P9_ATTR_ATIME | P.P9_ATTR_MTIME | P.P9_ATTR_ATIME_SET | P.P9_ATTR_MTIME_SET
            (asec, ansec), (msec, mnsec) = (divmod(t, 1_000_000_000) for t in times)
            fields = {"atime_sec": asec, "atime_nsec": ansec, "mtime_sec": msec}
            fields["mtime_nsec"] = mnsec
        self._with(path, lambda fid: self.client.setattr(fid, valid, **fields))
        return 0

    def mkdir(self, path: str, mode: int) -> int:
        self._in_parent(
            path, lambda dfid, name: self.client.mkdir(dfid, name, stat.S_IMODE(mode), WORKLOAD_GID)
        )
        return 0

    def unlink(self, path: str) -> int:
        self._in_parent(path, lambda dfid, name: self.client.unlinkat(dfid, name))
        return 0

    def rmdir(self, path: str) -> int:
        self._in_parent(path, lambda dfid, name: self.client.unlinkat(dfid, name, P.AT_REMOVEDIR))
        return 0

    def rename(self, old: str, new: str) -> int:
        def into(new_dfid: int, new_name: str) -> None:
            self._in_parent(
                old, lambda dfid, name: self.client.renameat(dfid, name, new_dfid, new_name)
            )

        self._in_parent(new, into)
        return 0

    def symlink(self, target: str, source: str) -> int:
        """mfusepy's names: the link is ``target``, its content ``source``."""
        self._in_parent(
            target, lambda dfid, name: self.client.symlink(dfid, name, source, WORKLOAD_GID)
        )
        return 0

    def readlink(self, path: str) -> str:
        return self._with(path, self.client.readlink)

    def statfs(self, path: str) -> dict[str, int]:
        s = self.client.statfs(0)
        return {
            "f_bsize": s.bsize,
            "f_frsize": s.bsize,
            "f_blocks": s.blocks,
            "f_bfree": s.bfree,
            "f_bavail": s.bavail,
            "f_files": s.files,
            "f_ffree": s.ffree,
            "f_namemax": s.namelen,
        }

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        self.client.fsync(fh, bool(datasync))
        return 0

    def flush(self, path: str, fh: int) -> int:
        return 0  # close(2) of one descriptor: nothing to send

    def access(self, path: str, amode: int) -> int:
        return 0  # default_permissions: the kernel checks


# -- the process --------------------------------------------------------------------------------


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def connect(params: dict[str, Any]) -> tuple[P9Client, list[GrantPool], DoorbellPair]:
    """The client over the ring the kernel set up (the pools and doorbells it names)."""
    pools = [GrantPool.open(p["name"], p["gref_base"], p["pages"]) for p in params["pools"]]
    ring, out = pools
    half = 1 << params["order"] >> 1
    intf = P.DataIntf(ring.page(0))
    in_pages = [ring.page(1 + i) for i in range(half)]
    out_pages = [out.page(i) for i in range(half)]
    in_ring, out_ring = P.flex_rings(intf, in_pages + out_pages, backend=False, name=params["tag"])
    channel = DoorbellPair(*params["doorbells"])
    client = P9Client(
        in_ring,
        out_ring,
        channel,
        name=f"9pfs {params['tag']}",
        on_broken=lambda r: _say(f"broken {r}"),
    )
    return client, pools, channel


def _follow_the_kernel(mountpoint: str) -> None:
    """The kernel closes our stdin to disconnect the share: unmount, which ends the loop."""
    while sys.stdin.readline():
        pass
    try:
        linux.umount(mountpoint)
    except OSError:
        linux.umount(mountpoint, linux.MNT_DETACH)


def main(argv: list[str] | None = None) -> int:
    """The entry point the kernel's fork server runs: the parameters come on stdin."""
    linux.set_comm("hyper-p9front")  # what ps shows inside the domain
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    params = json.loads(sys.stdin.readline())
    assert PAGE_SIZE == 4096
    client, pools, channel = connect(params)
    client.version(MSIZE)
    client.attach(0)
    threading.Thread(target=_follow_the_kernel, args=(params["mountpoint"],), daemon=True).start()
    try:
        mfusepy.FUSE(
            P9Fs(client, on_mounted=lambda: _say("mounted")),
            params["mountpoint"],
            foreground=True,
            fsname=f"9pfs:{params['tag']}",
            max_threads=FUSE_THREADS,
            allow_other=True,
            default_permissions=True,
        )
    except RuntimeError as exc:  # libfuse's own signal handling ends the loop this way
        log.info("FUSE loop ended: %s", exc)
    finally:
        client.close()
        channel.close()
        for pool in pools:
            pool.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

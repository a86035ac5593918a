"""p9back's file server: 9P2000.L over one shared host directory, for one connection.

The server answers decoded requests (channels/p9fs.py) on a directory it holds as an fd
(``root_fd``, opened ``O_PATH | O_DIRECTORY`` by dom0). It is the one module of p9back that
touches the host's files, and every path it touches is resolved beneath that fd by the kernel:
``openat2(root_fd, path, flags, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)``, which refuses an
absolute symlink, a ``..`` that climbs above the root and a magic link anywhere on the way
(EXDEV, answered EACCES), whatever the frontend or a racing host process does. Operations on a
name in a directory (mkdir, unlink, rename, symlink, readlink) use the directory's resolved fd
and a single component (no ``/``), never a path.

A fid names a path (components below the root), not an open file: so an unopened fid costs no
fd, and a connection may hold ``max_fids`` of them (Linux's client keeps one per cached
dentry), of which at most ``max_open`` opened (each an fd); past either, EMFILE. Walk names are
single components: ``/``, NUL, ``.`` and the empty name are EINVAL; ``..`` goes one component
up and, at the root, stays at the root (as QEMU's 9p server does), so no walk leaves the share.
A walk never goes through a symlink (ENOTDIR): the client reads the link and walks its target
itself, and the target is resolved in the *client's* namespace, never here. Opening a symlink,
a device, a FIFO or a socket is refused (``O_NOFOLLOW``, and only regular files and directories
are opened); opens never block (``O_NONBLOCK``).

Credentials (security_model "none"): files are created as whoever runs the server, modes are
masked to ``0o1777`` (no set-uid or set-gid file reaches the host), and a chown (Tsetattr's
uid/gid) is accepted and ignored. A read-only share (``readonly``) answers EROFS to every
request that would change it (lcreate, mkdir, symlink, unlinkat, renameat, setattr, and lopen
for writing or truncation).

Sizes: the negotiated msize is at most ``max_msize`` (the ring's size) and at least
``MIN_MSIZE``; a read or readdir count is clamped so the reply fits msize. Every failure is an
Rlerror: an OSError's errno, EINVAL for a value no syscall takes (an offset past 2**63, a NUL
in a name), EBADF for an unknown fid, EOPNOTSUPP for a message we do not serve. Nothing a
request does raises out of ``answer``/``handle``.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from channels import linux
from channels import p9fs as P

log = logging.getLogger(__name__)

MIN_MSIZE = 4096
MAX_FIDS = 8192
MAX_OPEN = 256
NAME_MAX = 255
PATH_MAX = 4096
MODE_MASK = 0o1777  # no set-uid, no set-gid on the host
I64_MAX = (1 << 63) - 1

RESOLVE = linux.RESOLVE_BENEATH | linux.RESOLVE_NO_MAGICLINKS


def openat2(dirfd: int, path: str, flags: int, mode: int = 0) -> int:
    """openat2(2) of ``path`` beneath ``dirfd`` (RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS),
    close-on-exec. An escape (EXDEV) is PermissionError(EACCES): that is what it means to the
    client."""
    try:
        return linux.openat2(dirfd, path, flags | os.O_CLOEXEC, RESOLVE, mode)
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            raise PermissionError(errno.EACCES, f"{path}: leaves the share") from exc
        raise


Path = tuple[str, ...]  # components below the root; () is the root


def _rel(path: Path) -> str:
    return "/".join(path) or "."


def _check_name(name: str) -> str:
    """A name created or removed in a directory: one component, never . or .."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise OSError(errno.EINVAL, f"bad name {name!r}")
    if len(os.fsencode(name)) > NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, "name too long")
    return name


def _step(path: Path, name: str) -> Path:
    """One walk element from ``path``: ``..`` goes up, and stays at the root."""
    if name == "..":
        return path[:-1]
    return (*path, _check_name(name))


def qid_of(st: os.stat_result) -> P.Qid:
    kind = P.QTDIR if stat.S_ISDIR(st.st_mode) else P.QTFILE
    if stat.S_ISLNK(st.st_mode):
        kind = P.QTSYMLINK
    return P.Qid(kind, int(st.st_mtime_ns) & 0xFFFFFFFF, st.st_ino)


def _dt(entry: os.DirEntry[str]) -> int:
    if entry.is_dir(follow_symlinks=False):
        return 4  # DT_DIR
    if entry.is_symlink():
        return 10  # DT_LNK
    return 8 if entry.is_file(follow_symlinks=False) else 0  # DT_REG, DT_UNKNOWN


@dataclass
class Fid:
    path: Path
    fd: int | None = None  # open file or directory
    accmode: int = os.O_RDONLY
    is_dir: bool = False
    listing: list[P.Dirent] | None = None  # a directory's entries, from readdir at offset 0


class P9Server:
    """One connection's fids and msize over one share. Thread-safe (one request at a time)."""

    def __init__(
        self,
        root_fd: int,
        *,
        readonly: bool,
        max_msize: int,
        max_fids: int = MAX_FIDS,
        max_open: int = MAX_OPEN,
    ) -> None:
        if max_msize < MIN_MSIZE:
            raise ValueError(f"9pfs: max msize {max_msize} below {MIN_MSIZE}")
        self.root_fd = root_fd
        self.readonly = readonly
        self.max_msize = max_msize
        self.msize = max_msize
        self.max_fids = max_fids
        self.max_open = max_open
        self.fids: dict[int, Fid] = {}
        self.versioned = False
        self._lock = threading.Lock()
        self._ops: dict[type[P.Message], Callable[[Any], P.Message]] = {
            P.Tversion: self._version,
            P.Tattach: self._attach,
            P.Tflush: lambda m: P.Rflush(),
            P.Twalk: self._walk,
            P.Tlopen: self._lopen,
            P.Tlcreate: self._lcreate,
            P.Tread: self._read,
            P.Twrite: self._write,
            P.Tclunk: self._clunk,
            P.Tgetattr: self._getattr,
            P.Tsetattr: self._setattr,
            P.Treaddir: self._readdir,
            P.Tmkdir: self._mkdir,
            P.Tunlinkat: self._unlinkat,
            P.Trenameat: self._renameat,
            P.Tstatfs: self._statfs,
            P.Tfsync: self._fsync,
            P.Tsymlink: self._symlink,
            P.Treadlink: self._readlink,
        }

    def limit_msize(self, ring_size: int) -> None:
        """A message must fit its ring whole: msize never exceeds the smallest ring's size."""
        self.max_msize = min(self.max_msize, ring_size)
        self.msize = min(self.msize, self.max_msize)

    # -- entry points ---------------------------------------------------------------------------

    def handle(self, raw: bytes) -> bytes:
        """The encoded reply to one whole request (a private copy, framed by the caller)."""
        try:
            tag, request = P.decode(raw)
        except P.P9Error as exc:
            known = exc.type is None or exc.type in P.MESSAGES
            code = errno.EINVAL if known else errno.EOPNOTSUPP
            return P.encode(P.NOTAG if exc.tag is None else exc.tag, P.Rlerror(code))
        return P.encode(tag, self.answer(request))

    def answer(self, request: P.Message) -> P.Message:
        """The reply to one decoded request; never raises."""
        op = self._ops.get(type(request))
        if op is None:
            return P.Rlerror(errno.EOPNOTSUPP)
        if not self.versioned and not isinstance(request, P.Tversion):
            return P.Rlerror(errno.EPROTO)
        try:
            with self._lock:
                return op(request)
        except OSError as exc:
            return P.Rlerror(exc.errno or errno.EIO)
        except (ValueError, OverflowError, UnicodeError):
            return P.Rlerror(errno.EINVAL)
        except Exception:
            log.exception("9pfs: %s failed", type(request).__name__)
            return P.Rlerror(errno.EIO)

    def close(self) -> None:
        with self._lock:
            self._clunk_all()

    # -- fids -----------------------------------------------------------------------------------

    def _fid(self, fid: int) -> Fid:
        found = self.fids.get(fid)
        if found is None:
            raise OSError(errno.EBADF, f"unknown fid {fid}")
        return found

    def _new_fid(self, fid: int, path: Path) -> None:
        if fid in self.fids:
            raise OSError(errno.EEXIST, f"fid {fid} in use")
        if fid == P.NOFID:
            raise OSError(errno.EINVAL, "NOFID")
        if len(self.fids) >= self.max_fids:
            raise OSError(errno.EMFILE, f"more than {self.max_fids} fids")
        self.fids[fid] = Fid(path)

    def _open_count(self) -> int:
        return sum(1 for f in self.fids.values() if f.fd is not None)

    def _clunk_all(self) -> None:
        for fid in self.fids.values():
            if fid.fd is not None:
                os.close(fid.fd)
        self.fids.clear()

    def _writing(self) -> None:
        if self.readonly:
            raise OSError(errno.EROFS, "read-only share")

    # -- resolution -----------------------------------------------------------------------------

    def _open(self, path: Path, flags: int, mode: int = 0) -> int:
        return openat2(self.root_fd, _rel(path), flags, mode)

    def _lstat(self, path: Path) -> os.stat_result:
        fd = self._open(path, os.O_PATH | os.O_NOFOLLOW)
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def _stat(self, fid: Fid) -> os.stat_result:
        return os.fstat(fid.fd) if fid.fd is not None else self._lstat(fid.path)

    def _dir(self, fid: Fid) -> int:
        """An O_PATH fd of the directory ``fid`` names (ENOTDIR if it is none)."""
        return self._open(fid.path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)

    def _in_dir(self, fid: Fid, action: Callable[[int], Any]) -> Any:
        fd = self._dir(fid)
        try:
            return action(fd)
        finally:
            os.close(fd)

    def _object(self, path: Path, action: Callable[[int], Any]) -> Any:
        """``action`` on an fd of the object itself (fchmod and futimens need more than
        O_PATH), opened without following a symlink or blocking."""
        st = self._lstat(path)
        if stat.S_ISDIR(st.st_mode):
            flags = [os.O_RDONLY | os.O_DIRECTORY]
        elif stat.S_ISREG(st.st_mode):
            flags = [os.O_RDONLY, os.O_WRONLY]  # an unreadable file may still be writable
        else:
            raise OSError(errno.EOPNOTSUPP, "not a regular file or directory")
        for i, flag in enumerate(flags):
            try:
                fd = self._open(path, flag | os.O_NOFOLLOW | os.O_NONBLOCK)
            except PermissionError:
                if i + 1 == len(flags):
                    raise
                continue
            try:
                return action(fd)
            finally:
                os.close(fd)
        raise AssertionError("unreachable")

    def _iounit(self) -> int:
        return self.msize - P.IOHDRSZ

    # -- session --------------------------------------------------------------------------------

    def _version(self, m: P.Tversion) -> P.Message:
        self._clunk_all()  # a Tversion starts the session over
        if m.msize < MIN_MSIZE:
            return P.Rlerror(errno.EINVAL)
        self.msize = min(m.msize, self.max_msize)
        if m.version != P.VERSION_9P2000_L:
            self.versioned = False
            return P.Rversion(self.msize, "unknown")
        self.versioned = True
        return P.Rversion(self.msize, P.VERSION_9P2000_L)

    def _attach(self, m: P.Tattach) -> P.Message:
        # afid: no authentication; aname and the user: security_model "none" serves the share
        # as its server runs, to whoever attaches.
        self._new_fid(m.fid, ())
        return P.Rattach(qid_of(os.fstat(self.root_fd)))

    def _walk(self, m: P.Twalk) -> P.Message:
        fid = self._fid(m.fid)
        if m.newfid != m.fid:
            self._new_fid(m.newfid, fid.path)
            self.fids.pop(m.newfid)  # made only if the whole walk succeeds
        path, qids = fid.path, list[P.Qid]()
        is_dir = fid.is_dir or stat.S_ISDIR(self._stat(fid).st_mode) if m.wnames else True
        for name in m.wnames:
            try:
                if not is_dir:
                    raise OSError(errno.ENOTDIR, "walk through a non-directory")
                step = _step(path, name)
                st = self._lstat(step)
            except OSError:
                if not qids:
                    raise
                break
            qids.append(qid_of(st))
            path, is_dir = step, stat.S_ISDIR(st.st_mode)
        if len(qids) == len(m.wnames):
            if m.newfid == m.fid:
                if fid.fd is not None:
                    raise OSError(errno.EBUSY, "walk of an open fid")
                fid.path = path
            else:
                self.fids[m.newfid] = Fid(path)
        return P.Rwalk(tuple(qids))

    def _clunk(self, m: P.Tclunk) -> P.Message:
        fid = self.fids.pop(m.fid, None)
        if fid is None:
            raise OSError(errno.EBADF, f"unknown fid {m.fid}")
        if fid.fd is not None:
            os.close(fid.fd)
        return P.Rclunk()

    # -- files ----------------------------------------------------------------------------------

    def _open_flags(self, flags: int) -> int:
        accmode = flags & P.P9_DOTL_ACCMODE
        if accmode not in (P.P9_DOTL_RDONLY, P.P9_DOTL_WRONLY, P.P9_DOTL_RDWR):
            raise OSError(errno.EINVAL, "bad access mode")
        if accmode != P.P9_DOTL_RDONLY or flags & P.P9_DOTL_TRUNC:
            self._writing()
        out = accmode | os.O_NOFOLLOW | os.O_NONBLOCK
        for dotl, mine in (
            (P.P9_DOTL_TRUNC, os.O_TRUNC),
            (P.P9_DOTL_APPEND, os.O_APPEND),
            (P.P9_DOTL_DSYNC, os.O_DSYNC),
            (P.P9_DOTL_SYNC, os.O_SYNC),
        ):
            if flags & dotl:
                out |= mine
        return out

    def _opened(self, fid: Fid, fd: int, flags: int) -> os.stat_result:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            os.close(fd)
            raise OSError(errno.EOPNOTSUPP, "not a regular file or directory")
        fid.fd, fid.accmode, fid.is_dir = fd, flags & os.O_ACCMODE, stat.S_ISDIR(st.st_mode)
        return st

    def _check_open(self, fid: Fid) -> None:
        if fid.fd is not None:
            raise OSError(errno.EBUSY, "fid already open")
        if self._open_count() >= self.max_open:
            raise OSError(errno.EMFILE, f"more than {self.max_open} open fids")

    def _lopen(self, m: P.Tlopen) -> P.Message:
        fid = self._fid(m.fid)
        self._check_open(fid)
        flags = self._open_flags(m.flags)
        st = self._lstat(fid.path)
        if stat.S_ISDIR(st.st_mode):
            if flags & os.O_ACCMODE != os.O_RDONLY:
                raise OSError(errno.EISDIR, "a directory opened for writing")
            flags |= os.O_DIRECTORY
        elif stat.S_ISLNK(st.st_mode):
            raise OSError(errno.ELOOP, "a symlink is never opened here")
        elif not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EOPNOTSUPP, "not a regular file or directory")
        st = self._opened(fid, self._open(fid.path, flags), flags)
        return P.Rlopen(qid_of(st), self._iounit())

    def _lcreate(self, m: P.Tlcreate) -> P.Message:
        fid = self._fid(m.fid)
        self._writing()
        self._check_open(fid)
        path = (*fid.path, _check_name(m.name))
        flags = self._open_flags(m.flags) | os.O_CREAT
        if m.flags & P.P9_DOTL_EXCL:
            flags |= os.O_EXCL
        st = self._opened(fid, self._open(path, flags, m.mode & MODE_MASK), flags)
        fid.path = path
        return P.Rlcreate(qid_of(st), self._iounit())

    def _io_fd(self, fid: Fid, *, write: bool) -> int:
        if fid.fd is None:
            raise OSError(errno.EBADF, "fid not open")
        if fid.is_dir:
            raise OSError(errno.EISDIR, "a directory")
        allowed = (os.O_WRONLY, os.O_RDWR) if write else (os.O_RDONLY, os.O_RDWR)
        if fid.accmode not in allowed:
            raise OSError(errno.EBADF, "fid not open for that")
        return fid.fd

    def _read(self, m: P.Tread) -> P.Message:
        fd = self._io_fd(self._fid(m.fid), write=False)
        if m.offset > I64_MAX:
            raise OSError(errno.EINVAL, "offset")
        count = min(m.count, self.msize - P.RREAD_HEADER)
        return P.Rread(os.pread(fd, count, m.offset))

    def _write(self, m: P.Twrite) -> P.Message:
        fd = self._io_fd(self._fid(m.fid), write=True)
        if m.offset > I64_MAX:
            raise OSError(errno.EINVAL, "offset")
        return P.Rwrite(os.pwrite(fd, m.data, m.offset))

    def _fsync(self, m: P.Tfsync) -> P.Message:
        fid = self._fid(m.fid)
        if fid.fd is None:
            raise OSError(errno.EBADF, "fid not open")
        (os.fdatasync if m.datasync else os.fsync)(fid.fd)
        return P.Rfsync()

    # -- attributes -----------------------------------------------------------------------------

    def _getattr(self, m: P.Tgetattr) -> P.Message:
        st = self._stat(self._fid(m.fid))
        (asec, ansec), (msec, mnsec), (csec, cnsec) = (
            divmod(t, 1_000_000_000) for t in (st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)
        )
        return P.Rgetattr(
            valid=P.P9_GETATTR_BASIC,
            qid=qid_of(st),
            mode=st.st_mode,
            uid=st.st_uid,
            gid=st.st_gid,
            nlink=st.st_nlink,
            rdev=st.st_rdev,
            size=st.st_size,
            blksize=st.st_blksize,
            blocks=st.st_blocks,
            atime_sec=asec,
            atime_nsec=ansec,
            mtime_sec=msec,
            mtime_nsec=mnsec,
            ctime_sec=csec,
            ctime_nsec=cnsec,
            btime_sec=0,
            btime_nsec=0,
            gen=0,
            data_version=0,
        )

    def _setattr(self, m: P.Tsetattr) -> P.Message:
        fid = self._fid(m.fid)
        self._writing()
        if m.valid & P.P9_ATTR_SIZE:
            self._truncate(fid, m.size)
        if m.valid & P.P9_ATTR_MODE:
            self._object(fid.path, lambda fd: os.fchmod(fd, m.mode & MODE_MASK))
        if m.valid & (P.P9_ATTR_ATIME | P.P9_ATTR_MTIME):
            self._object(fid.path, lambda fd: os.utime(fd, ns=_times(m, os.fstat(fd))))
        # P9_ATTR_UID / GID: security_model "none" keeps the server's own (see the docstring).
        return P.Rsetattr()

    def _truncate(self, fid: Fid, size: int) -> None:
        if size > I64_MAX:
            raise OSError(errno.EFBIG, "size")
        if fid.fd is not None and fid.accmode in (os.O_WRONLY, os.O_RDWR):
            os.ftruncate(fid.fd, size)
            return
        if not stat.S_ISREG(self._lstat(fid.path).st_mode):
            raise OSError(errno.EINVAL, "truncate of a non-regular file")
        fd = self._open(fid.path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)

    def _statfs(self, m: P.Tstatfs) -> P.Message:
        fid = self._fid(m.fid)
        fd = self._open(fid.path, os.O_PATH | os.O_NOFOLLOW)
        try:
            s = os.fstatvfs(fd)
        finally:
            os.close(fd)
        fsid = int(s.f_fsid) & 0xFFFFFFFFFFFFFFFF
        return P.Rstatfs(
            P.V9FS_MAGIC,
            s.f_bsize,
            s.f_blocks,
            s.f_bfree,
            s.f_bavail,
            s.f_files,
            s.f_ffree,
            fsid,
            s.f_namemax,
        )

    # -- directories ----------------------------------------------------------------------------

    def _readdir(self, m: P.Treaddir) -> P.Message:
        fid = self._fid(m.fid)
        if fid.fd is None or not fid.is_dir:
            raise OSError(errno.EBADF if fid.fd is None else errno.ENOTDIR, "not an open dir")
        if m.offset == 0 or fid.listing is None:
            fid.listing = self._list(fid)
        count = min(m.count, self.msize - P.RREAD_HEADER)
        out: list[bytes] = []
        used = 0
        for entry in fid.listing[min(m.offset, len(fid.listing)) :]:
            packed = entry.pack()
            if used + len(packed) > count:
                if not out:
                    raise OSError(errno.EINVAL, "count below one entry")
                break
            out.append(packed)
            used += len(packed)
        return P.Rreaddir(b"".join(out))

    def _list(self, fid: Fid) -> list[P.Dirent]:
        assert fid.fd is not None
        here = os.fstat(fid.fd)
        up = here if not fid.path else self._lstat(fid.path[:-1])
        entries = [
            P.Dirent(qid_of(here), 1, 4, "."),
            P.Dirent(qid_of(up), 2, 4, ".."),
        ]
        os.lseek(fid.fd, 0, os.SEEK_SET)
        with os.scandir(fid.fd) as it:
            for entry in it:
                kind = _dt(entry)
                qtype = {4: P.QTDIR, 10: P.QTSYMLINK}.get(kind, P.QTFILE)
                qid = P.Qid(qtype, 0, entry.inode())
                entries.append(P.Dirent(qid, len(entries) + 1, kind, entry.name))
        return entries

    def _mkdir(self, m: P.Tmkdir) -> P.Message:
        fid = self._fid(m.dfid)
        self._writing()
        name = _check_name(m.name)

        def make(dirfd: int) -> os.stat_result:
            os.mkdir(name, m.mode & MODE_MASK, dir_fd=dirfd)
            return os.stat(name, dir_fd=dirfd, follow_symlinks=False)

        return P.Rmkdir(qid_of(self._in_dir(fid, make)))

    def _symlink(self, m: P.Tsymlink) -> P.Message:
        fid = self._fid(m.fid)
        self._writing()
        name = _check_name(m.name)
        if not m.symtgt or len(os.fsencode(m.symtgt)) >= PATH_MAX:
            raise OSError(errno.EINVAL, "symlink target")

        def make(dirfd: int) -> os.stat_result:
            # Only a string: whoever follows it resolves it in its own namespace (the client),
            # or beneath the root (this server, which never follows one anyway).
            os.symlink(m.symtgt, name, dir_fd=dirfd)
            return os.stat(name, dir_fd=dirfd, follow_symlinks=False)

        return P.Rsymlink(qid_of(self._in_dir(fid, make)))

    def _readlink(self, m: P.Treadlink) -> P.Message:
        fid = self._fid(m.fid)
        if not fid.path:
            raise OSError(errno.EINVAL, "the root is no symlink")
        parent, name = Fid(fid.path[:-1]), fid.path[-1]
        target: str = self._in_dir(parent, lambda dirfd: os.readlink(name, dir_fd=dirfd))
        return P.Rreadlink(target)

    def _unlinkat(self, m: P.Tunlinkat) -> P.Message:
        fid = self._fid(m.dirfid)
        self._writing()
        name = _check_name(m.name)
        remove = os.rmdir if m.flags & P.AT_REMOVEDIR else os.unlink
        self._in_dir(fid, lambda dirfd: remove(name, dir_fd=dirfd))
        return P.Runlinkat()

    def _renameat(self, m: P.Trenameat) -> P.Message:
        old, new = self._fid(m.olddirfid), self._fid(m.newdirfid)
        self._writing()
        oldname, newname = _check_name(m.oldname), _check_name(m.newname)
        src = self._dir(old)
        try:
            self._in_dir(
                new, lambda dst: os.rename(oldname, newname, src_dir_fd=src, dst_dir_fd=dst)
            )
        finally:
            os.close(src)
        self._moved((*old.path, oldname), (*new.path, newname))
        return P.Rrenameat()

    def _moved(self, old: Path, new: Path) -> None:
        """Fids below a renamed name follow it (as QEMU's server fixes fid paths)."""
        for fid in self.fids.values():
            if fid.path[: len(old)] == old:
                fid.path = new + fid.path[len(old) :]


def _times(m: P.Tsetattr, st: os.stat_result) -> tuple[int, int]:
    """(atime, mtime) in ns for Tsetattr: given (``*_SET``), now, or unchanged."""
    now = None

    def one(flag: int, set_flag: int, sec: int, nsec: int, current: int) -> int:
        nonlocal now
        if not m.valid & flag:
            return current
        if m.valid & set_flag:
            if sec > I64_MAX // 1_000_000_000 or nsec >= 1_000_000_000:
                raise OSError(errno.EINVAL, "time")
            return sec * 1_000_000_000 + nsec
        if now is None:
            now = time.time_ns()
        return now

    return (
        one(P.P9_ATTR_ATIME, P.P9_ATTR_ATIME_SET, m.atime_sec, m.atime_nsec, st.st_atime_ns),
        one(P.P9_ATTR_MTIME, P.P9_ATTR_MTIME_SET, m.mtime_sec, m.mtime_nsec, st.st_mtime_ns),
    )

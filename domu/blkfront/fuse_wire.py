"""The kernel's FUSE protocol (``linux/fuse.h``), as much of it as a one-file disk needs.

A FUSE server reads one request per read(2) from ``/dev/fuse`` and writes one reply per
write(2). A request is an ``in_header`` (40 bytes), then the opcode's argument struct, then its
data (a WRITE's bytes, a LOOKUP's name); a reply is an ``out_header`` (16 bytes: length, error
as a negative errno, the request's ``unique``), then the opcode's reply struct or data (a READ's
bytes). FORGET, BATCH_FORGET and INTERRUPT take no reply. All integers are the host's byte
order (little-endian here, as channels/ring.py checks)::

    in_header   len u32, opcode u32, unique u64, nodeid u64, uid u32, gid u32, pid u32,
                total_extlen u16 (extensions after the arguments, in 8-byte units), pad u16
    out_header  len u32, error s32, unique u64

What this module gives: :func:`parse`, pure (bytes in, a :class:`Request` or a
:class:`Rejected` out; it never raises on any input), the reply structs, and :func:`negotiate`,
the INIT handshake. The session that uses them is domu/blkfront/server.py.

INIT (the first request; libfuse's ``do_init`` and QEMU's FUSE export negotiate the same way).
The kernel offers its version and flags; the server answers with its own version (the kernel
uses the lower), the flags it wants of those offered, and its limits:

* version 7.x; a kernel major above 7 gets our version alone and sends INIT again; below 7,
  EPROTO;
* flags: ``ASYNC_READ``, ``BIG_WRITES``, ``ASYNC_DIO`` (a program's asynchronous direct I/O,
  fio's libaio, stays asynchronous: many requests in flight from one thread), ``MAX_PAGES``;
  nothing else: no splice (every request and reply is one readv/writev), no writeback cache,
  no ``ATOMIC_O_TRUNC`` (an ``O_TRUNC`` open comes as a SETATTR of the size, which a disk
  ignores, so the kernel keeps the disk's size);
* ``max_write`` and ``max_pages``: 1 MiB in 256 pages when the kernel takes ``MAX_PAGES``, else
  its default of 32 pages; ``max_background`` 64 and ``congestion_threshold`` 48, the
  asynchronous requests the kernel keeps in flight; ``time_gran`` 1 ns.

A server's read buffer must hold ``max(8192, HEAD_ROOM + max_write)`` bytes (the kernel refuses
a smaller read with EINVAL); ``HEAD_ROOM`` is a WRITE's in_header and write_in, so a buffer
that starts with exactly that many bytes puts the WRITE's data at the start of the next one.

The kernel is trusted: it builds every request itself from a program's system call, so
:func:`parse` only makes sure that what it hands on is whole and within the negotiated limits
(a READ no larger than ``max_read``, a WRITE whose data is all there), and answers anything
else with a :class:`Rejected` (an errno, or no answer at all when the message is too short to
name its request).
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from typing import NamedTuple

FUSE_KERNEL_VERSION = 7
FUSE_KERNEL_MINOR_VERSION = 38  # what this module speaks; linux/fuse.h of 6.x kernels
FUSE_ROOT_ID = 1
FUSE_MIN_READ_BUFFER = 8192
FUSE_COMPAT_INIT_OUT_SIZE = 8
FUSE_COMPAT_22_INIT_OUT_SIZE = 24
PAGE_SIZE = 4096
MAX_PAGES = 256  # 1 MiB: the kernel's own limit (fs.fuse.max_pages_limit) by default
DEFAULT_MAX_PAGES = 32  # what a kernel without FUSE_MAX_PAGES sends at most
MAX_BACKGROUND = 64
CONGESTION_THRESHOLD = 48

# enum fuse_opcode
FUSE_LOOKUP = 1
FUSE_FORGET = 2
FUSE_GETATTR = 3
FUSE_SETATTR = 4
FUSE_OPEN = 14
FUSE_READ = 15
FUSE_WRITE = 16
FUSE_STATFS = 17
FUSE_RELEASE = 18
FUSE_FSYNC = 20
FUSE_FLUSH = 25
FUSE_INIT = 26
FUSE_INTERRUPT = 36
FUSE_DESTROY = 38
FUSE_BATCH_FORGET = 42
FUSE_FALLOCATE = 43

#: Requests the kernel expects no reply to.
NO_REPLY = frozenset({FUSE_FORGET, FUSE_BATCH_FORGET, FUSE_INTERRUPT})

# INIT flags
FUSE_ASYNC_READ = 1 << 0
FUSE_ATOMIC_O_TRUNC = 1 << 3
FUSE_BIG_WRITES = 1 << 5
FUSE_SPLICE_WRITE = 1 << 7
FUSE_SPLICE_MOVE = 1 << 8
FUSE_SPLICE_READ = 1 << 9
FUSE_ASYNC_DIO = 1 << 15
FUSE_WRITEBACK_CACHE = 1 << 16
FUSE_MAX_PAGES = 1 << 22
WANTED_FLAGS = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_ASYNC_DIO | FUSE_MAX_PAGES

# OPEN reply flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6

# SETATTR valid bits
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3

IN_HEADER = struct.Struct("<IIQQIIIHH")
OUT_HEADER = struct.Struct("<IiQ")
INIT_IN = struct.Struct("<IIII")  # major, minor, max_readahead, flags (flags2 and more: unused)
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")
GETATTR_IN = struct.Struct("<IIQ")
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
OPEN_IN = struct.Struct("<II")
OPEN_OUT = struct.Struct("<QII")
READ_IN = struct.Struct("<QQIIQII")
WRITE_IN = READ_IN  # fh, offset, size, write_flags, lock_owner, flags, padding
WRITE_OUT = struct.Struct("<II")
RELEASE_IN = struct.Struct("<QIIQ")
FLUSH_IN = struct.Struct("<QIIQ")
FSYNC_IN = struct.Struct("<QII")
FALLOCATE_IN = struct.Struct("<QQQII")
INTERRUPT_IN = struct.Struct("<Q")
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
ATTR_OUT = struct.Struct("<QII" + ATTR.format[1:])
STATFS_OUT = struct.Struct("<QQQQQIIII24x")

#: A WRITE's fixed part: its data starts right after.
HEAD_ROOM = IN_HEADER.size + WRITE_IN.size  # 80
#: The largest READ the kernel may send: ``max_pages`` pages (no ``max_read`` mount option).
MAX_READ = MAX_PAGES * PAGE_SIZE


# -- requests -------------------------------------------------------------------------------------


class Init(NamedTuple):
    major: int
    minor: int
    max_readahead: int
    flags: int


class GetAttr(NamedTuple):
    getattr_flags: int
    fh: int


class SetAttr(NamedTuple):
    valid: int  # FATTR_* bits: which of the fields below the kernel asks to change
    size: int
    mode: int
    uid: int
    gid: int


class Open(NamedTuple):
    flags: int  # open(2) flags
    open_flags: int


class Read(NamedTuple):
    fh: int
    offset: int
    size: int
    flags: int  # the file's open(2) flags


class Write(NamedTuple):
    fh: int
    offset: int
    size: int  # the data follows the header room: exactly this many bytes
    write_flags: int
    flags: int  # the file's open(2) flags, with O_DSYNC for a synchronous write (RWF_DSYNC)


class Release(NamedTuple):
    fh: int
    flags: int


class Flush(NamedTuple):
    fh: int


class Fsync(NamedTuple):
    fh: int
    fsync_flags: int


class Fallocate(NamedTuple):
    fh: int
    offset: int
    length: int
    mode: int


class Interrupt(NamedTuple):
    unique: int


Args = (
    Init | GetAttr | SetAttr | Open | Read | Write | Release | Flush | Fsync | Fallocate | Interrupt
)


class Request(NamedTuple):
    """A request whose fixed part is whole. ``args`` is None for an opcode without arguments
    (STATFS, DESTROY) and for one this module does not parse (the server answers ENOSYS)."""

    opcode: int
    unique: int
    nodeid: int
    args: Args | None


class Rejected(NamedTuple):
    """A message that cannot be served: answer ``errno`` to ``unique``, or nothing when
    ``unique`` is None (too short to name its request) or the opcode takes no reply."""

    opcode: int | None
    unique: int | None
    errno: int
    reason: str


def _init(raw: bytes, at: int) -> Init:
    return Init(*INIT_IN.unpack_from(raw, at))


def _getattr(raw: bytes, at: int) -> GetAttr:
    getattr_flags, _, fh = GETATTR_IN.unpack_from(raw, at)
    return GetAttr(getattr_flags, fh)


def _setattr(raw: bytes, at: int) -> SetAttr:
    f = SETATTR_IN.unpack_from(raw, at)
    return SetAttr(valid=f[0], size=f[3], mode=f[11], uid=f[13], gid=f[14])


def _open(raw: bytes, at: int) -> Open:
    return Open(*OPEN_IN.unpack_from(raw, at))


def _read(raw: bytes, at: int) -> Read:
    fh, offset, size, _, _, flags, _ = READ_IN.unpack_from(raw, at)
    return Read(fh, offset, size, flags)


def _write(raw: bytes, at: int) -> Write:
    fh, offset, size, write_flags, _, flags, _ = WRITE_IN.unpack_from(raw, at)
    return Write(fh, offset, size, write_flags, flags)


def _release(raw: bytes, at: int) -> Release:
    fh, flags, _, _ = RELEASE_IN.unpack_from(raw, at)
    return Release(fh, flags)


def _flush(raw: bytes, at: int) -> Flush:
    return Flush(FLUSH_IN.unpack_from(raw, at)[0])


def _fsync(raw: bytes, at: int) -> Fsync:
    fh, fsync_flags, _ = FSYNC_IN.unpack_from(raw, at)
    return Fsync(fh, fsync_flags)


def _fallocate(raw: bytes, at: int) -> Fallocate:
    fh, offset, length, mode, _ = FALLOCATE_IN.unpack_from(raw, at)
    return Fallocate(fh, offset, length, mode)


def _interrupt(raw: bytes, at: int) -> Interrupt:
    return Interrupt(INTERRUPT_IN.unpack_from(raw, at)[0])


#: opcode -> (size of its argument struct, its parser). INIT's struct grew to 64 bytes in 7.36;
#: the first 16 are all a server needs. No parser: the opcode has no arguments we read.
_ARGS: dict[int, tuple[int, Callable[[bytes, int], Args]]] = {
    FUSE_INIT: (INIT_IN.size, _init),
    FUSE_GETATTR: (GETATTR_IN.size, _getattr),
    FUSE_SETATTR: (SETATTR_IN.size, _setattr),
    FUSE_OPEN: (OPEN_IN.size, _open),
    FUSE_READ: (READ_IN.size, _read),
    FUSE_WRITE: (WRITE_IN.size, _write),
    FUSE_RELEASE: (RELEASE_IN.size, _release),
    FUSE_FLUSH: (FLUSH_IN.size, _flush),
    FUSE_FSYNC: (FSYNC_IN.size, _fsync),
    FUSE_FALLOCATE: (FALLOCATE_IN.size, _fallocate),
    FUSE_INTERRUPT: (INTERRUPT_IN.size, _interrupt),
}


def parse(
    message: bytes, length: int | None = None, *, max_read: int = MAX_READ
) -> Request | Rejected:
    """The request in ``message``, as read(2) from /dev/fuse returned ``length`` bytes.

    ``message`` may stop short of ``length`` after the arguments: a WRITE's data stays where
    it was read (the server hands those pages on as they are), so ``message`` need only hold
    its first :data:`HEAD_ROOM` bytes. Never raises."""
    length = len(message) if length is None else length
    if length < IN_HEADER.size or len(message) < IN_HEADER.size:
        return Rejected(None, None, errno.EIO, f"a message of {length} bytes has no header")
    size, opcode, unique, nodeid, _, _, _, extlen, _ = IN_HEADER.unpack_from(message)
    if size != length:
        return Rejected(opcode, unique, errno.EIO, f"header says {size} bytes, read {length}")
    known = _ARGS.get(opcode)
    if known is None:
        return Request(opcode, unique, nodeid, None)
    need, parser = known
    body = length - IN_HEADER.size - extlen * 8  # the arguments and data, without extensions
    if body < need or len(message) < IN_HEADER.size + need:
        return Rejected(opcode, unique, errno.EINVAL, f"opcode {opcode}: arguments cut short")
    args = parser(message, IN_HEADER.size)
    if isinstance(args, Write) and args.size != body - need:
        return Rejected(opcode, unique, errno.EINVAL, f"WRITE of {args.size} carries {body - need}")
    if isinstance(args, Read) and args.size > max_read:
        return Rejected(opcode, unique, errno.EINVAL, f"READ of {args.size} over {max_read}")
    return Request(opcode, unique, nodeid, args)


def opcode_of(head: bytes | bytearray) -> int:
    """The opcode of a message whose first bytes are ``head`` (0 if too short)."""
    return int.from_bytes(head[4:8], "little") if len(head) >= 8 else 0


# -- replies -------------------------------------------------------------------------------------


def reply_header(unique: int, payload: int) -> bytes:
    """The out_header of a successful reply carrying ``payload`` bytes after it."""
    return OUT_HEADER.pack(OUT_HEADER.size + payload, 0, unique)


def reply(unique: int, payload: bytes = b"") -> bytes:
    return OUT_HEADER.pack(OUT_HEADER.size + len(payload), 0, unique) + payload


def reply_error(unique: int, code: int) -> bytes:
    return OUT_HEADER.pack(OUT_HEADER.size, -code, unique)


class Attr(NamedTuple):
    """``struct fuse_attr`` of the one file (times in ns)."""

    size: int
    mode: int
    uid: int
    gid: int
    time_ns: int
    blksize: int = PAGE_SIZE

    def pack_out(self, valid_s: int) -> bytes:
        """``fuse_attr_out``: the attributes, cached by the kernel for ``valid_s`` seconds."""
        secs, nsec = divmod(self.time_ns, 1_000_000_000)
        blocks = -(-self.size // 512)
        return ATTR_OUT.pack(
            valid_s, 0, 0,  # attr_valid, attr_valid_nsec, dummy
            FUSE_ROOT_ID, self.size, blocks, secs, secs, secs, nsec, nsec, nsec,
            self.mode, 1, self.uid, self.gid, 0, self.blksize, 0,
        )  # fmt: skip


def open_out(open_flags: int) -> bytes:
    return OPEN_OUT.pack(0, open_flags, 0)


def write_out(size: int) -> bytes:
    return WRITE_OUT.pack(size, 0)


def statfs_out(size: int) -> bytes:
    """One file of ``size`` bytes filling the file system, in 4 KiB blocks."""
    blocks = size // PAGE_SIZE
    return STATFS_OUT.pack(blocks, 0, 0, 1, 0, PAGE_SIZE, 255, PAGE_SIZE, 0)


# -- INIT ----------------------------------------------------------------------------------------


class Negotiated(NamedTuple):
    """INIT's outcome: ``payload`` to reply (None: reply ``error``); ``done`` False when the
    kernel must send INIT again (it offered a newer major version); ``max_pages``, the most a
    READ or WRITE may carry from now on, in pages."""

    payload: bytes | None
    error: int
    done: bool
    max_pages: int


def negotiate(init: Init) -> Negotiated:
    """The INIT reply to the kernel's offer (see the module docstring)."""
    if init.major < FUSE_KERNEL_VERSION:
        return Negotiated(None, errno.EPROTO, True, 0)
    if init.major > FUSE_KERNEL_VERSION:
        ours = INIT_OUT.pack(FUSE_KERNEL_VERSION, FUSE_KERNEL_MINOR_VERSION, *(0,) * 9)
        return Negotiated(ours, 0, False, 0)
    flags = init.flags & WANTED_FLAGS
    pages = MAX_PAGES if flags & FUSE_MAX_PAGES else DEFAULT_MAX_PAGES
    payload = INIT_OUT.pack(
        FUSE_KERNEL_VERSION,
        FUSE_KERNEL_MINOR_VERSION,
        init.max_readahead,
        flags,
        MAX_BACKGROUND,
        CONGESTION_THRESHOLD,
        pages * PAGE_SIZE,  # max_write
        1,  # time_gran: nanoseconds
        pages if flags & FUSE_MAX_PAGES else 0,
        0,  # map_alignment
        0,  # flags2: nothing from the second word
    )
    # A kernel older than 7.23 knows a shorter reply (libfuse sends it the same way).
    if init.minor < 5:
        payload = payload[:FUSE_COMPAT_INIT_OUT_SIZE]
    elif init.minor < 23:
        payload = payload[:FUSE_COMPAT_22_INIT_OUT_SIZE]
    return Negotiated(payload, 0, True, pages)

"""9pfs: Xen's 9P transport (``io/9pfs.h``, ``docs/misc/9pfs.pandoc``), declared once for both
sides, and the 9P2000.L messages that travel over it.

A 9pfs device shares one host directory (the backend's ``path``) with a domain. The frontend
is the 9P client, the backend the file server. Each ring is a pair of one-way byte rings (Xen's
"flex rings", ``DEFINE_XEN_FLEX_RING``), described by one interface page::

    xen_9pfs_data_intf      offset size
      in_cons               0      4     frontend: bytes of ``in`` it has read
      in_prod               4      4     backend: bytes of ``in`` it has written
      pad                   8      56
      out_cons              64     4     backend: bytes of ``out`` it has read
      out_prod              68     4     frontend: bytes of ``out`` it has written
      pad                   72     56
      ring_order            128    4     the data area is 2**ring_order pages
      ref[2**ring_order]    132    4 each the grant refs of the data pages, in order

(9pfs.pandoc's drawing puts ring_order at 72; the header's struct, which a C peer compiles,
has it at 128, and so do we: ``tests/unit/test_p9fs_wire.py`` compiles the header to check.)
The data pages are one area: its first half is ``in`` (responses, backend -> frontend), its
second half ``out`` (requests, frontend -> backend), each ``XEN_FLEX_RING_SIZE(ring_order)`` =
``2**(ring_order + 11)`` bytes. Indices are free-running u32 byte counts; byte ``x`` of a ring
is at ``x & (size - 1)``. A producer writes bytes at its index, then publishes the index; a
consumer copies bytes out, then publishes its index. There is no event index: after moving any
index, a side notifies the other through the ring's event channel (the doorbell's post is the
full barrier). One page of refs holds at most 512 (a power of two), so ``ring_order <= 9``.

A hostile peer is caught on the indices (:class:`FlexRing`): each side keeps a private copy of
the index it owns and refuses a shared one that differs, and ``prod - cons`` above the ring's
size is impossible; both raise :class:`channels.errors.ProtocolViolation`, and that ring
stays broken.

Messages. Every 9P message starts with ``size[4] id[1] tag[2]`` (little-endian; ``size``
counts the whole message). One message is written to a ring at once, so ``size`` is at most the
ring's size, and at most ``msize`` (what Tversion negotiated). The backend reads the header,
checks ``size`` against both (a size below 7 or above them is a protocol violation: the device
is disconnected), copies the message out once, and decodes the copy; every length inside it
(strings, counts, data) is checked against what is left of it (:class:`P9Error`), so no peer can
make a decoder read past its message. ``tag`` pairs a response (R = T + 1, or Rlerror) with its
request; NOTAG (0xFFFF) is Tversion's.

Store keys::

    backend  /local/domain/0/backend/9pfs/<domid>/<devid>/
      toolstack:      path (host directory), security_model ("none"), mode ("r" | "w",
                      hyper's, default "w"), path-owner (hyper's: the host uid the share
                      belongs to), frontend, frontend-id, online
      before InitWait: versions ("1"), max-rings, max-ring-page-order
    frontend /local/domain/<domid>/device/9pfs/<devid>/
      toolstack:      tag (the share's name: the domain mounts it at /mnt/<tag>), backend,
                      backend-id
      before Initialised (one transaction):
                      version ("1"), num-rings, ring-ref<N> (the interface page of ring N),
                      event-channel-<N>

Handshake (9pfs.h): backend Initialising -> publishes versions and limits -> InitWait; the
frontend reads them, sets up its rings (interface page and data pages granted to the backend,
an event channel each), publishes its keys -> Initialised; the backend maps the rings, binds
the channels -> Connected; the frontend -> Connected. Teardown: Closing, then Closed.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, TypeVar

from channels.errors import BadInput, ProtocolViolation
from channels.ring import MASK32, PAGE_SIZE, RingError, u32_view

# -- the transport ------------------------------------------------------------------------------

XEN_PAGE_SHIFT = 12
XEN_9PFS_PROTOCOL_VERSION = "1"
XEN_9PFS_SECURITY_MODEL = "none"  # the only model the protocol defines

IN_CONS_OFFSET = 0
IN_PROD_OFFSET = 4
OUT_CONS_OFFSET = 64
OUT_PROD_OFFSET = 68
RING_ORDER_OFFSET = 128
REF_OFFSET = 132
#: ref[] holds 2**ring_order entries in the rest of the interface page: (4096 - 132) / 4 =
#: 991 fit, so 512 at most (9pfs.pandoc).
MAX_RING_ORDER = 9


def xen_flex_ring_size(order: int) -> int:
    """XEN_FLEX_RING_SIZE(order): bytes in each of the two rings of a 2**order-page area."""
    return 1 << (order + XEN_PAGE_SHIFT - 1)


def ring_mask(idx: int, ring_size: int) -> int:
    """``$NAME_mask``: where byte ``idx`` of a ring lives."""
    return idx & (ring_size - 1)


def queued(prod: int, cons: int, ring_size: int) -> int:
    """Bytes between ``cons`` and ``prod`` (``$NAME_queued``); ProtocolViolation if more than
    the ring holds. The free-running difference, which, unlike Xen's masked one, also tells a
    full ring from a lying one."""
    n = (prod - cons) & MASK32
    if n > ring_size:
        raise ProtocolViolation(f"impossible indices prod {prod} cons {cons} (ring of {ring_size})")
    return n


class P9Key(StrEnum):
    """The 9pfs store keys (the shared ones are channels.xenbus.Key)."""

    VERSIONS = "versions"
    MAX_RINGS = "max-rings"
    MAX_RING_PAGE_ORDER = "max-ring-page-order"
    PATH = "path"
    SECURITY_MODEL = "security_model"
    MODE = "mode"  # hyper's: "r" or "w"
    PATH_OWNER = "path-owner"  # hyper's: the host uid the share belongs to
    TAG = "tag"
    VERSION = "version"
    NUM_RINGS = "num-rings"


def ring_ref_key(n: int) -> str:
    return f"ring-ref{n}"


def event_channel_key(n: int) -> str:
    return f"event-channel-{n}"


def valid_tag(tag: str) -> bool:
    """A tag names a mount point (/mnt/<tag>): letters, digits, ``-`` and ``_``, at most 64."""
    return 0 < len(tag) <= 64 and all(c.isascii() and (c.isalnum() or c in "-_") for c in tag)


class DataIntf:
    """One ring's interface page: its four indices (as u32 views) and its order and refs."""

    def __init__(self, page: memoryview) -> None:
        if page.nbytes < PAGE_SIZE:
            raise ValueError(f"9pfs interface page of {page.nbytes} bytes")
        self.page = page
        self.in_cons = u32_view(page, IN_CONS_OFFSET)
        self.in_prod = u32_view(page, IN_PROD_OFFSET)
        self.out_cons = u32_view(page, OUT_CONS_OFFSET)
        self.out_prod = u32_view(page, OUT_PROD_OFFSET)

    @classmethod
    def init(cls, page: memoryview, order: int, refs: Sequence[int]) -> DataIntf:
        """The frontend's: a zeroed page with ``ring_order`` and the data pages' refs."""
        if not 0 <= order <= MAX_RING_ORDER or len(refs) != 1 << order:
            raise ValueError(f"9pfs ring of order {order} with {len(refs)} refs")
        page[:PAGE_SIZE] = bytes(PAGE_SIZE)
        struct.pack_into(f"<I{len(refs)}I", page, RING_ORDER_OFFSET, order, *refs)
        return cls(page)

    def read_layout(self, max_order: int) -> tuple[int, tuple[int, ...]]:
        """The backend's: (ring_order, refs), each read once from the page the frontend
        writes; ProtocolViolation for an order above ``max_order`` (what we advertised)."""
        (order,) = struct.unpack_from("<I", self.page, RING_ORDER_OFFSET)
        if order > min(max_order, MAX_RING_ORDER):
            raise ProtocolViolation(f"ring_order {order} above max-ring-page-order {max_order}")
        refs = struct.unpack_from(f"<{1 << order}I", self.page, REF_OFFSET)
        return order, refs

    def close(self) -> None:
        """Release the index views and drop the page, so that its pool can be unmapped."""
        for view in (self.in_cons, self.in_prod, self.out_cons, self.out_prod):
            view.release()
        self.page = memoryview(b"")


class FlexRing:
    """One direction of a 9pfs ring, as one side uses it: the producer writes whole messages
    (``write``), the consumer copies bytes out (``peek``, ``read``). ``pages`` are the ring's
    data pages in order (they need not be contiguous: each is a granted page of its own).

    The side's own index lives privately too; each call snapshots the peer's index once and
    checks both (see the module docstring). Not thread-safe: one thread per side uses it.
    """

    def __init__(
        self,
        pages: Sequence[memoryview],
        cons: memoryview,
        prod: memoryview,
        *,
        producer: bool,
        name: str,
    ) -> None:
        size = len(pages) * PAGE_SIZE
        if not pages or size & (size - 1) or any(p.nbytes != PAGE_SIZE for p in pages):
            raise ValueError(f"{name}: {len(pages)} pages are no flex ring")
        self.name = name
        self.size = size
        self._pages = tuple(pages)
        self._cons, self._prod = cons, prod
        self._producer = producer
        self._dead: str | None = None
        self._closed = False
        # Ours, private: whatever the peer writes over the shared copy, we go on from here.
        self._mine = int(prod[0] if producer else cons[0])
        self._snapshot()  # a peer that lies already is refused at attach

    @property
    def broken(self) -> bool:
        return self._dead is not None

    def close(self) -> None:
        """Drop the data pages (so that their pool can be unmapped); later calls raise
        RingError, as a closed ring does (channels/ring.py)."""
        self._pages = ()
        self._closed = True

    def _break(self, reason: str) -> ProtocolViolation:
        self._dead = f"{self.name}: {reason}"
        return ProtocolViolation(self._dead)

    def _snapshot(self) -> int:
        """Bytes queued: the peer's index read once, ours checked against our copy."""
        if self._closed:
            raise RingError(f"{self.name}: closed")
        if self._dead is not None:
            raise ProtocolViolation(self._dead)
        own = self._prod if self._producer else self._cons
        peer = int((self._cons if self._producer else self._prod)[0])
        if own[0] != self._mine:
            raise self._break(f"our index moved under us ({own[0]}, not {self._mine})")
        prod, cons = (self._mine, peer) if self._producer else (peer, self._mine)
        try:
            return queued(prod, cons, self.size)
        except ProtocolViolation as exc:
            raise self._break(str(exc)) from None

    # producer

    def free(self) -> int:
        return self.size - self._snapshot()

    def write(self, data: bytes | bytearray | memoryview) -> bool:
        """Write all of ``data`` and publish it, or nothing (False) if it does not fit now."""
        if not self._producer:
            raise RingError(f"{self.name}: the consumer does not write")
        n = len(data)
        if n > self.size - self._snapshot():
            return False
        self._copy(self._mine, memoryview(data).cast("B"), into_ring=True)
        self._mine = (self._mine + n) & MASK32
        self._prod[0] = self._mine  # the data stores precede it (TSO)
        return True

    # consumer

    def available(self) -> int:
        return self._snapshot()

    def peek(self, n: int) -> bytes:
        """Copy the next ``n`` unread bytes without consuming them (RingError if fewer)."""
        if n > self._snapshot():
            raise RingError(f"{self.name}: {n} bytes asked, fewer queued")
        out = bytearray(n)
        self._copy(self._mine, memoryview(out), into_ring=False)
        return bytes(out)

    def read(self, n: int) -> bytes:
        """Copy the next ``n`` bytes out (once) and consume them."""
        data = self.peek(n)
        self._mine = (self._mine + n) & MASK32
        self._cons[0] = self._mine  # after the copy (TSO: load -> store)
        return data

    def _copy(self, idx: int, buf: memoryview, *, into_ring: bool) -> None:
        """Between ``buf`` and the ring from byte ``idx``, page by page, wrapping at the end."""
        done, n = 0, buf.nbytes
        while done < n:
            pos = ring_mask(idx + done, self.size)
            page, offset = divmod(pos, PAGE_SIZE)
            chunk = min(n - done, PAGE_SIZE - offset)
            area = self._pages[page]
            if into_ring:
                area[offset : offset + chunk] = buf[done : done + chunk]
            else:
                buf[done : done + chunk] = area[offset : offset + chunk]
            done += chunk


def flex_rings(
    intf: DataIntf, pages: Sequence[memoryview], *, backend: bool, name: str
) -> tuple[FlexRing, FlexRing]:
    """The (in, out) rings over a ring's data pages: ``in`` is the first half (the backend
    produces it), ``out`` the second (the frontend produces it)."""
    half = len(pages) // 2
    if half == 0 or len(pages) != 2 * half:
        raise ValueError(f"{name}: {len(pages)} data pages")
    in_ring = FlexRing(
        pages[:half], intf.in_cons, intf.in_prod, producer=backend, name=name + " in"
    )
    out = FlexRing(
        pages[half:], intf.out_cons, intf.out_prod, producer=not backend, name=name + " out"
    )
    return in_ring, out


# -- 9P2000.L -----------------------------------------------------------------------------------

HEADER = struct.Struct("<IBH")  # size, id, tag
HEADER_SIZE = HEADER.size  # 7
VERSION_9P2000_L = "9P2000.L"
NOTAG = 0xFFFF
NOFID = 0xFFFFFFFF
MAXWELEM = 16  # names in one Twalk
IOHDRSZ = 24  # what Tread/Twrite framing takes of msize (Linux's P9_IOHDRSZ)
READDIRHDRSZ = 24  # Linux's P9_READDIRHDRSZ
RREAD_HEADER = HEADER_SIZE + 4  # size id tag count
V9FS_MAGIC = 0x01021997

QTDIR = 0x80
QTSYMLINK = 0x02
QTFILE = 0x00

# Tgetattr request_mask / Rgetattr valid
P9_GETATTR_BASIC = 0x000007FF
# Tsetattr valid
P9_ATTR_MODE = 1 << 0
P9_ATTR_UID = 1 << 1
P9_ATTR_GID = 1 << 2
P9_ATTR_SIZE = 1 << 3
P9_ATTR_ATIME = 1 << 4
P9_ATTR_MTIME = 1 << 5
P9_ATTR_CTIME = 1 << 6
P9_ATTR_ATIME_SET = 1 << 7
P9_ATTR_MTIME_SET = 1 << 8
# Tunlinkat flags
AT_REMOVEDIR = 0x200
# Tlopen / Tlcreate flags (Linux's, as 9P2000.L carries them: P9_DOTL_*)
P9_DOTL_ACCMODE = 0o3
P9_DOTL_RDONLY = 0o0
P9_DOTL_WRONLY = 0o1
P9_DOTL_RDWR = 0o2
P9_DOTL_CREATE = 0o100
P9_DOTL_EXCL = 0o200
P9_DOTL_TRUNC = 0o1000
P9_DOTL_APPEND = 0o2000
P9_DOTL_NONBLOCK = 0o4000
P9_DOTL_DSYNC = 0o10000
P9_DOTL_DIRECTORY = 0o200000
P9_DOTL_NOFOLLOW = 0o400000
P9_DOTL_SYNC = 0o4000000


class P9Error(BadInput):
    """A message that does not decode: a length past its end, a count too high, bytes left
    over, a type we do not know (``type`` and ``tag`` say which, when the header was whole)."""

    def __init__(self, message: str, *, type: int | None = None, tag: int | None = None):
        super().__init__(message)
        self.type = type
        self.tag = tag


@dataclass(frozen=True, slots=True)
class Qid:
    """The server's identity of a file: type (QT*), version, path (unique per file)."""

    type: int
    version: int
    path: int


_QID = struct.Struct("<BIQ")
_INTS = {"u8": struct.Struct("<B"), "u16": struct.Struct("<H"), "u32": struct.Struct("<I")}
_INTS["u64"] = struct.Struct("<Q")


class _Reader:
    """Reads one message's body; every length a peer wrote is checked against what is left."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def take(self, n: int, what: str) -> bytes:
        if n > len(self._data) - self._pos:
            raise P9Error(f"{what}: {n} bytes, {len(self._data) - self._pos} left")
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def number(self, kind: str) -> int:
        packer = _INTS[kind]
        value: int = packer.unpack(self.take(packer.size, kind))[0]
        return value

    def string(self) -> str:
        return self.take(self.number("u16"), "string").decode("utf-8", "surrogateescape")

    def qid(self) -> Qid:
        return Qid(*_QID.unpack(self.take(_QID.size, "qid")))

    def left(self) -> int:
        return len(self._data) - self._pos

    def done(self) -> None:
        if self._pos != len(self._data):
            raise P9Error(f"{len(self._data) - self._pos} bytes after the last field")


def _pack_string(value: str) -> bytes:
    raw = value.encode("utf-8", "surrogateescape")
    if len(raw) > 0xFFFF:
        raise ValueError(f"a 9P string of {len(raw)} bytes")
    return _INTS["u16"].pack(len(raw)) + raw


def _read_field(r: _Reader, kind: str) -> object:
    if kind in _INTS:
        return r.number(kind)
    if kind == "s":
        return r.string()
    if kind == "qid":
        return r.qid()
    if kind == "data":
        return r.take(r.number("u32"), "data")
    n = r.number("u16")
    if n > MAXWELEM:
        raise P9Error(f"{n} walk elements, more than {MAXWELEM}")
    if kind == "s*":
        return tuple(r.string() for _ in range(n))
    return tuple(r.qid() for _ in range(n))  # "qid*"


def _pack_field(kind: str, value: Any) -> bytes:
    if kind in _INTS:
        return bytes(_INTS[kind].pack(value))
    if kind == "s":
        return _pack_string(value)
    if kind == "qid":
        return _QID.pack(value.type, value.version, value.path)
    if kind == "data":
        return _INTS["u32"].pack(len(value)) + bytes(value)
    if len(value) > MAXWELEM:
        raise ValueError(f"{len(value)} walk elements, more than {MAXWELEM}")
    head = _INTS["u16"].pack(len(value))
    if kind == "s*":
        return head + b"".join(_pack_string(v) for v in value)
    return head + b"".join(_pack_field("qid", v) for v in value)  # "qid*"


class Message:
    """A 9P2000.L message. Each subclass is a frozen dataclass whose fields are, in wire order,
    ``LAYOUT``'s kinds: u8/u16/u32/u64, s (string), qid, data (u32 count + bytes), s* and qid*
    (u16 count, at most MAXWELEM)."""

    TYPE: ClassVar[int]
    LAYOUT: ClassVar[tuple[str, ...]]
    # Set on each subclass by @dataclass; declared so that dataclasses.fields takes any Message.
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def body(self) -> bytes:
        values = (getattr(self, f.name) for f in dataclasses.fields(self))
        try:
            return b"".join(_pack_field(k, v) for k, v in zip(self.LAYOUT, values, strict=True))
        except struct.error as exc:
            raise ValueError(f"{type(self).__name__}: {exc}") from exc


MESSAGES: dict[int, type[Message]] = {}


M = TypeVar("M", bound=Message)


def _message(type_id: int, *layout: str) -> Callable[[type[M]], type[M]]:
    """Register a message class (a dataclass already) with its type id and wire layout."""

    def declare(cls: type[M]) -> type[M]:
        if len(dataclasses.fields(cls)) != len(layout):
            raise TypeError(f"{cls.__name__}: fields and layout differ")
        cls.TYPE, cls.LAYOUT = type_id, layout
        MESSAGES[type_id] = cls
        return cls

    return declare


@_message(7, "u32")
@dataclass(frozen=True, slots=True)
class Rlerror(Message):
    ecode: int


@_message(8, "u32")
@dataclass(frozen=True, slots=True)
class Tstatfs(Message):
    fid: int


@_message(9, "u32", "u32", "u64", "u64", "u64", "u64", "u64", "u64", "u32")
@dataclass(frozen=True, slots=True)
class Rstatfs(Message):
    type: int
    bsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    fsid: int
    namelen: int


@_message(12, "u32", "u32")
@dataclass(frozen=True, slots=True)
class Tlopen(Message):
    fid: int
    flags: int


@_message(13, "qid", "u32")
@dataclass(frozen=True, slots=True)
class Rlopen(Message):
    qid: Qid
    iounit: int


@_message(14, "u32", "s", "u32", "u32", "u32")
@dataclass(frozen=True, slots=True)
class Tlcreate(Message):
    fid: int
    name: str
    flags: int
    mode: int
    gid: int


@_message(15, "qid", "u32")
@dataclass(frozen=True, slots=True)
class Rlcreate(Message):
    qid: Qid
    iounit: int


@_message(16, "u32", "s", "s", "u32")
@dataclass(frozen=True, slots=True)
class Tsymlink(Message):
    fid: int
    name: str
    symtgt: str
    gid: int


@_message(17, "qid")
@dataclass(frozen=True, slots=True)
class Rsymlink(Message):
    qid: Qid


@_message(22, "u32")
@dataclass(frozen=True, slots=True)
class Treadlink(Message):
    fid: int


@_message(23, "s")
@dataclass(frozen=True, slots=True)
class Rreadlink(Message):
    target: str


@_message(24, "u32", "u64")
@dataclass(frozen=True, slots=True)
class Tgetattr(Message):
    fid: int
    request_mask: int


_U64 = ("u64",)


@_message(25, "u64", "qid", "u32", "u32", "u32", *_U64 * 15)
@dataclass(frozen=True, slots=True)
class Rgetattr(Message):
    valid: int
    qid: Qid
    mode: int
    uid: int
    gid: int
    nlink: int
    rdev: int
    size: int
    blksize: int
    blocks: int
    atime_sec: int
    atime_nsec: int
    mtime_sec: int
    mtime_nsec: int
    ctime_sec: int
    ctime_nsec: int
    btime_sec: int
    btime_nsec: int
    gen: int
    data_version: int


@_message(26, "u32", "u32", "u32", "u32", "u32", "u64", "u64", "u64", "u64", "u64")
@dataclass(frozen=True, slots=True)
class Tsetattr(Message):
    fid: int
    valid: int
    mode: int
    uid: int
    gid: int
    size: int
    atime_sec: int
    atime_nsec: int
    mtime_sec: int
    mtime_nsec: int


@_message(27)
@dataclass(frozen=True, slots=True)
class Rsetattr(Message):
    pass


@_message(40, "u32", "u64", "u32")
@dataclass(frozen=True, slots=True)
class Treaddir(Message):
    fid: int
    offset: int
    count: int


@_message(41, "data")
@dataclass(frozen=True, slots=True)
class Rreaddir(Message):
    data: bytes


@_message(50, "u32", "u32")
@dataclass(frozen=True, slots=True)
class Tfsync(Message):
    fid: int
    datasync: int


@_message(51)
@dataclass(frozen=True, slots=True)
class Rfsync(Message):
    pass


@_message(72, "u32", "s", "u32", "u32")
@dataclass(frozen=True, slots=True)
class Tmkdir(Message):
    dfid: int
    name: str
    mode: int
    gid: int


@_message(73, "qid")
@dataclass(frozen=True, slots=True)
class Rmkdir(Message):
    qid: Qid


@_message(74, "u32", "s", "u32", "s")
@dataclass(frozen=True, slots=True)
class Trenameat(Message):
    olddirfid: int
    oldname: str
    newdirfid: int
    newname: str


@_message(75)
@dataclass(frozen=True, slots=True)
class Rrenameat(Message):
    pass


@_message(76, "u32", "s", "u32")
@dataclass(frozen=True, slots=True)
class Tunlinkat(Message):
    dirfid: int
    name: str
    flags: int


@_message(77)
@dataclass(frozen=True, slots=True)
class Runlinkat(Message):
    pass


@_message(100, "u32", "s")
@dataclass(frozen=True, slots=True)
class Tversion(Message):
    msize: int
    version: str


@_message(101, "u32", "s")
@dataclass(frozen=True, slots=True)
class Rversion(Message):
    msize: int
    version: str


@_message(104, "u32", "u32", "s", "s", "u32")
@dataclass(frozen=True, slots=True)
class Tattach(Message):
    fid: int
    afid: int
    uname: str
    aname: str
    n_uname: int


@_message(105, "qid")
@dataclass(frozen=True, slots=True)
class Rattach(Message):
    qid: Qid


@_message(108, "u16")
@dataclass(frozen=True, slots=True)
class Tflush(Message):
    oldtag: int


@_message(109)
@dataclass(frozen=True, slots=True)
class Rflush(Message):
    pass


@_message(110, "u32", "u32", "s*")
@dataclass(frozen=True, slots=True)
class Twalk(Message):
    fid: int
    newfid: int
    wnames: tuple[str, ...]


@_message(111, "qid*")
@dataclass(frozen=True, slots=True)
class Rwalk(Message):
    qids: tuple[Qid, ...]


@_message(116, "u32", "u64", "u32")
@dataclass(frozen=True, slots=True)
class Tread(Message):
    fid: int
    offset: int
    count: int


@_message(117, "data")
@dataclass(frozen=True, slots=True)
class Rread(Message):
    data: bytes


@_message(118, "u32", "u64", "data")
@dataclass(frozen=True, slots=True)
class Twrite(Message):
    fid: int
    offset: int
    data: bytes


@_message(119, "u32")
@dataclass(frozen=True, slots=True)
class Rwrite(Message):
    count: int


@_message(120, "u32")
@dataclass(frozen=True, slots=True)
class Tclunk(Message):
    fid: int


@_message(121)
@dataclass(frozen=True, slots=True)
class Rclunk(Message):
    pass


def encode(tag: int, message: Message) -> bytes:
    """The whole message: header and body (ValueError if a field does not fit its kind)."""
    body = message.body()
    try:
        return HEADER.pack(HEADER_SIZE + len(body), message.TYPE, tag) + body
    except struct.error as exc:
        raise ValueError(f"{type(message).__name__} tag {tag}: {exc}") from exc


def parse_header(raw: bytes) -> tuple[int, int, int]:
    """(size, type, tag) of the 7 bytes that start a message."""
    size, type_id, tag = HEADER.unpack(raw[:HEADER_SIZE])
    return int(size), int(type_id), int(tag)


def decode(raw: bytes) -> tuple[int, Message]:
    """(tag, message) of one whole message (a private copy). P9Error if its size field is not
    its length, its type is unknown, or its body does not decode exactly."""
    if len(raw) < HEADER_SIZE:
        raise P9Error(f"a message of {len(raw)} bytes")
    size, type_id, tag = parse_header(raw)
    if size != len(raw):
        raise P9Error(f"size field {size} on a {len(raw)}-byte message", tag=tag)
    cls = MESSAGES.get(type_id)
    if cls is None:
        raise P9Error(f"unknown message type {type_id}", type=type_id, tag=tag)
    reader = _Reader(bytes(raw[HEADER_SIZE:]))
    try:
        values = [_read_field(reader, kind) for kind in cls.LAYOUT]
        reader.done()
    except P9Error as exc:
        raise P9Error(f"{cls.__name__}: {exc}", type=type_id, tag=tag) from None
    return tag, cls(*values)


# -- directory entries (Rreaddir's data) --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Dirent:
    """One entry of Rreaddir's data: qid, the offset to resume after it, DT_* type, name."""

    qid: Qid
    offset: int
    type: int
    name: str

    def pack(self) -> bytes:
        return (
            _pack_field("qid", self.qid)
            + _INTS["u64"].pack(self.offset)
            + _INTS["u8"].pack(self.type)
            + _pack_string(self.name)
        )


def unpack_dirents(data: bytes) -> list[Dirent]:
    """The entries of one Rreaddir; P9Error if one runs past the data."""
    reader, out = _Reader(data), []
    while reader.left():
        out.append(Dirent(reader.qid(), reader.number("u64"), reader.number("u8"), reader.string()))
    return out

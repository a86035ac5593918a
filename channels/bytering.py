"""Byte-stream rings: XenStore's interface page and Xen's console interface.

A :class:`ByteRing` is a one-way stream of ``size`` bytes (a power of two) inside a shared
area, with two free-running u32 indices elsewhere in the area: the producer advances ``prod``
after writing, the consumer advances ``cons`` after reading, and byte ``x`` of the stream lives
at ``data_offset + (x mod size)``. ``prod - cons`` (mod 2**32) is the number of unread bytes; a
value above ``size`` is impossible and raises ``ProtocolViolation`` (channels/errors.py), after
which that view keeps raising it (the caller disconnects the peer). The object is a stateless
view: both indices are re-read from shared memory on every call and snapshotted once per call.
Data is copied out once (``read``/``peek`` return bytes), so a peer rewriting the page afterwards
cannot change what the caller validates. Indices are read and written through native u32 views
(:func:`channels.ring.u32_view`), one load or store each; ``close()`` a ByteRing before
unmapping its segment.

XenStore interface page (``docs/misc/xenstore-ring.txt``, ``io/xs_wire.h``), one 4 KiB page::

    0     1024  req     request ring, guest -> server
    1024  1024  rsp     response ring, server -> guest
    2048  4     req_cons
    2052  4     req_prod
    2056  4     rsp_cons
    2060  4     rsp_prod
    2064  4     server_features  (bit 1: reconnection, bit 2: error field)
    2068  4     connection       (0 connected, 1 reconnect requested)
    2072  4     error            (0 none, 1 comms, 2 bad ring index, 3 protocol violation)

Console interface page (``io/console.h``, ``struct xencons_interface``)::

    0     1024  in      input ring, backend -> guest
    1024  2048  out     output ring, guest -> backend
    3072  4     in_cons
    3076  4     in_prod
    3080  4     out_cons
    3084  4     out_prod

Memory ordering: the producer stores data then ``prod``; the consumer loads ``prod`` then the
data, and finishes reading before it stores ``cons``. On x86-64 (TSO) all of these are program
order (store->store, load->load, load->store). There is no event index here: every update is
followed by a doorbell ring, and the doorbell's semaphore post is itself a full barrier.
"""

from __future__ import annotations

from channels.errors import ProtocolViolation
from channels.ring import MASK32, PAGE_SIZE, RingError, u32_view

XENSTORE_PAGE_SIZE = PAGE_SIZE
XENSTORE_RING_SIZE = 1024
XENSTORE_REQ_OFFSET = 0
XENSTORE_RSP_OFFSET = 1024
XENSTORE_REQ_CONS_OFFSET = 2048
XENSTORE_REQ_PROD_OFFSET = 2052
XENSTORE_RSP_CONS_OFFSET = 2056
XENSTORE_RSP_PROD_OFFSET = 2060
XENSTORE_SERVER_FEATURES_OFFSET = 2064
XENSTORE_CONNECTION_OFFSET = 2068
XENSTORE_ERROR_OFFSET = 2072
XENSTORE_INTERFACE_SIZE = 2076

XENSTORE_SERVER_FEATURE_RECONNECTION = 1
XENSTORE_SERVER_FEATURE_ERROR = 2
XENSTORE_CONNECTED = 0
XENSTORE_RECONNECT = 1
XENSTORE_ERROR_NONE = 0
XENSTORE_ERROR_COMM = 1
XENSTORE_ERROR_RINGIDX = 2
XENSTORE_ERROR_PROTO = 3

CONSOLE_PAGE_SIZE = PAGE_SIZE
XENCONS_IN_SIZE = 1024
XENCONS_OUT_SIZE = 2048
XENCONS_IN_OFFSET = 0
XENCONS_OUT_OFFSET = 1024
XENCONS_IN_CONS_OFFSET = 3072
XENCONS_IN_PROD_OFFSET = 3076
XENCONS_OUT_CONS_OFFSET = 3080
XENCONS_OUT_PROD_OFFSET = 3084
XENCONS_INTERFACE_SIZE = 3088


class ByteRing:
    """One direction of a byte stream in shared memory; producer and consumer operations."""

    __slots__ = ("_area", "_data", "_dead", "_index", "_mask", "name", "size")

    def __init__(
        self,
        area: memoryview,
        data_offset: int,
        size: int,
        cons_offset: int,
        prod_offset: int,
        name: str = "byte ring",
    ) -> None:
        _check_layout(name, area, data_offset, size, (cons_offset, prod_offset))
        self.name = name
        self.size = size
        self._area = area
        self._data = data_offset
        # (cons, prod) as one-store u32 views; struct.pack_into would expose a transient 0.
        self._index = (u32_view(area, cons_offset), u32_view(area, prod_offset))
        self._mask = size - 1
        self._dead: tuple[type[Exception], str] | None = None  # broken or closed, for good

    def close(self) -> None:
        """Drop the index views (so the segment can be unmapped); idempotent. Later calls
        raise RingError (ProtocolViolation if the peer had broken the ring)."""
        if self._dead is None:
            self._dead = (RingError, f"{self.name}: closed")
        for view in self._index:
            view.release()

    @property
    def broken(self) -> bool:
        """True once the peer has written impossible indices."""
        return self._dead is not None and self._dead[0] is ProtocolViolation

    def _indices(self) -> tuple[int, int]:
        """Snapshot (cons, prod) once and validate them."""
        if self._dead is not None:
            raise self._dead[0](self._dead[1])
        cons = self._index[0][0]
        prod = self._index[1][0]
        if (prod - cons) & MASK32 > self.size:
            message = f"{self.name}: impossible indices cons {cons} prod {prod} (size {self.size})"
            self._dead = (ProtocolViolation, message)
            raise ProtocolViolation(message)
        return cons, prod

    # producer

    def consumed(self) -> int:
        """The consumer's index: it moves only when the peer has read (and freed room)."""
        return self._indices()[0]

    def free(self) -> int:
        """Bytes the producer may write now."""
        cons, prod = self._indices()
        return self.size - ((prod - cons) & MASK32)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Copy as much of `data` as fits, publish it, and return the number of bytes written."""
        cons, prod = self._indices()
        src = memoryview(data).cast("B")
        n = min(len(src), self.size - ((prod - cons) & MASK32))
        if n == 0:
            return 0
        pos = prod & self._mask
        first = min(n, self.size - pos)
        start = self._data + pos
        self._area[start : start + first] = src[:first]
        self._area[self._data : self._data + n - first] = src[first:n]
        self._index[1][0] = (prod + n) & MASK32  # the data stores precede it (TSO)
        return n

    # consumer

    def available(self) -> int:
        """Bytes the consumer may read now."""
        cons, prod = self._indices()
        return (prod - cons) & MASK32

    def peek(self, limit: int | None = None) -> bytes:
        """Copy up to `limit` unread bytes (all if None) without consuming them."""
        cons, prod = self._indices()
        return self._copy_out(cons, _bounded((prod - cons) & MASK32, limit))

    def read(self, limit: int | None = None) -> bytes:
        """Copy out and consume up to `limit` unread bytes (all if None)."""
        cons, prod = self._indices()
        data = self._copy_out(cons, _bounded((prod - cons) & MASK32, limit))
        if data:
            self._index[0][0] = (cons + len(data)) & MASK32  # after the copy (TSO)
        return data

    def _copy_out(self, cons: int, n: int) -> bytes:
        pos = cons & self._mask
        first = min(n, self.size - pos)
        start = self._data + pos
        head = self._area[start : start + first].tobytes()
        if first == n:
            return head
        return head + self._area[self._data : self._data + n - first].tobytes()


def _bounded(n: int, limit: int | None) -> int:
    if limit is None:
        return n
    if limit < 0:
        raise ValueError(f"negative read limit {limit}")
    return min(n, limit)


def _check_layout(
    name: str, area: memoryview, data_offset: int, size: int, index_offsets: tuple[int, int]
) -> None:
    if size <= 0 or size & (size - 1):
        raise ValueError(f"{name}: size {size} is not a power of two")
    if area.readonly or area.format != "B" or not area.c_contiguous:
        raise ValueError(f"{name}: area must be a writable, contiguous byte view")
    if data_offset < 0 or data_offset + size > area.nbytes:
        raise ValueError(f"{name}: data [{data_offset}, +{size}) outside a {area.nbytes}-byte area")
    for off in index_offsets:
        if off % 4 or off < 0 or off + 4 > area.nbytes:
            raise ValueError(f"{name}: index offset {off} is not an aligned u32 in the area")
        if data_offset - 4 < off < data_offset + size:
            raise ValueError(f"{name}: index offset {off} overlaps the data")


def xenstore_rings(area: memoryview, name: str = "xenstore") -> tuple[ByteRing, ByteRing]:
    """The (req, rsp) rings of a XenStore interface page."""
    req = ByteRing(
        area,
        XENSTORE_REQ_OFFSET,
        XENSTORE_RING_SIZE,
        XENSTORE_REQ_CONS_OFFSET,
        XENSTORE_REQ_PROD_OFFSET,
        f"{name} req ring",
    )
    rsp = ByteRing(
        area,
        XENSTORE_RSP_OFFSET,
        XENSTORE_RING_SIZE,
        XENSTORE_RSP_CONS_OFFSET,
        XENSTORE_RSP_PROD_OFFSET,
        f"{name} rsp ring",
    )
    return req, rsp


def console_rings(area: memoryview, name: str = "console") -> tuple[ByteRing, ByteRing]:
    """The (in_, out) rings of a console interface page: in_ feeds the guest, out drains it."""
    in_ = ByteRing(
        area,
        XENCONS_IN_OFFSET,
        XENCONS_IN_SIZE,
        XENCONS_IN_CONS_OFFSET,
        XENCONS_IN_PROD_OFFSET,
        f"{name} in ring",
    )
    out = ByteRing(
        area,
        XENCONS_OUT_OFFSET,
        XENCONS_OUT_SIZE,
        XENCONS_OUT_CONS_OFFSET,
        XENCONS_OUT_PROD_OFFSET,
        f"{name} out ring",
    )
    return in_, out


class Word:
    """One u32 status field of an interface page (the xenstore page's connection and error
    fields), read and written with single aligned accesses."""

    def __init__(self, area: memoryview, offset: int) -> None:
        self._view = u32_view(area, offset)

    def get(self) -> int:
        return int(self._view[0])

    def set(self, value: int) -> None:
        self._view[0] = value

    def close(self) -> None:
        self._view.release()

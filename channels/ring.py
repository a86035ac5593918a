"""Xen's generic shared ring (``xen/include/public/io/ring.h``), defined once for every protocol.

A protocol module (netif, blkif, ...) only declares its structs::

    BLKIF = declare_ring("blkif", "<BBHQQ...", "<QBxh...")

and both sides instantiate that type over the shared area: the frontend with
:meth:`FrontRing.init` (it alone initialises the page), the backend with :meth:`BackRing.attach`.

Shared area layout (one page, or several contiguous pages)::

    offset  size  field      written by  meaning
    0       4     req_prod   front       producer index of requests
    4       4     req_event  back        "notify me when req_prod passes this value"
    8       4     rsp_prod   back        producer index of responses
    12      4     rsp_event  front       "notify me when rsp_prod passes this value"
    16      48    pad        -           zeroed; the header is exactly HEADER_SIZE = 64 bytes
    64      N*S   slots      both        union { request; response }, S = max(sizeof req, rsp)

* RING_SIZE ``N = (area_bytes - 64) // S`` rounded *down* to a power of two, so a slot is
  ``idx & (N - 1)`` and free-running u32 indices (arithmetic ``& 0xFFFFFFFF``) wrap harmlessly.
* Response *i* goes into the slot request *i* occupied: the backend copied the request out
  before it answers, and never answers more requests than it consumed.
* Private indices (front ``req_prod_pvt``/``rsp_cons``, back ``req_cons``/``rsp_prod_pvt``) live
  in these Python objects, never in shared memory. Each object is used by one thread.
* All fields are little-endian; every struct format must start with ``<`` (standard sizes, no
  implicit padding: protocols spell their padding with ``x``).

Flow control: the frontend has at most RING_SIZE requests outstanding (``free_requests``); the
backend consumes ``min(req_prod - req_cons, RING_SIZE - (req_cons - rsp_prod_pvt))``.

Notification suppression: a side about to sleep sets its event index to ``cons + 1``
(``final_check_for_*``). ``push_*`` publishes the producer index and returns True only when the
published batch ``(old, new]`` contains the peer's event index; only then does the caller ring
the doorbell. A consumer that finds no work after the final check sleeps (with a timeout) on its
doorbell and re-runs the final check when it wakes.

Hostile peer: the shared page can change at any moment. The peer's producer index is read once
per batch and validated (RING_REQUEST_PROD_OVERFLOW on the back, RING_RESPONSE_PROD_OVERFLOW on
the front, plus an index that moved backwards); each slot is copied out once (``get_*`` return
tuples or bytes, never views of shared memory). An impossible index raises ``ProtocolViolation``,
and every later call on that ring object raises it again: the caller disconnects the device.

Indices are accessed only through native u32 views (:func:`u32_view`), one load or store each;
``close()`` a ring before unmapping its segment (later calls raise RingError "closed").

Figures: a backend ring given ``figures`` (RING_FIGURES u64s, in a page dom0 reads) counts the
requests it takes and the responses it pushes, and each push as a notification sent or
suppressed; its loop's LateEoi counts the wakeups (channels/evtchn.py). A native pump serving
the ring counts in the same words (channels/native/pump.h's RF_*).
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from channels.errors import ProtocolViolation

logger = logging.getLogger(__name__)

PAGE_SIZE = 4096
HEADER_SIZE = 64
MASK32 = 0xFFFFFFFF

REQ_PROD_OFFSET = 0
REQ_EVENT_OFFSET = 4
RSP_PROD_OFFSET = 8
RSP_EVENT_OFFSET = 12

# Shared indices are read and written through a native "I" memoryview: item get/set is one
# aligned 32-bit load/store (a 4-byte memcpy in CPython's unpack_single/pack_single; checked with
# a hardware watchpoint). Never struct.pack_into: s_pack_internal memsets its destination before
# packing, so a peer can observe a transient 0 in the index (the first stress run did).
_REQ_PROD, _REQ_EVENT, _RSP_PROD, _RSP_EVENT = 0, 1, 2, 3  # u32 positions in the header
_HEADER = struct.Struct("<IIII")  # only for SHARED_RING_INIT, before the page is shared

#: A backend ring's figures, u64s in this order: requests taken, responses pushed, pushes that
#: rang the frontend and pushes its event index let pass, rung wakeups, those that found no
#: work, and the late-EOI waits that followed them (channels/native/pump.h's RF_* too).
RING_FIGURES = (
    "requests",
    "responses",
    "notify_sent",
    "notify_suppressed",
    "wakeups",
    "spurious_wakeups",
    "late_eoi_backoffs",
)
(
    FIG_REQUESTS,
    FIG_RESPONSES,
    FIG_NOTIFY_SENT,
    FIG_NOTIFY_SUPPRESSED,
    FIG_WAKEUPS,
    FIG_SPURIOUS,
    FIG_BACKOFFS,
) = range(len(RING_FIGURES))

if sys.byteorder != "little" or struct.calcsize("I") != 4:
    raise ImportError("channels.ring needs a little-endian host with 32-bit unsigned int")


class RingError(Exception):
    """A ring operation that cannot be done: put on a full ring, get from an empty one."""


# --- Memory ordering -------------------------------------------------------------------------
#
# Notification suppression is Dekker's pattern. The producer does
#     store prod; mb(); load event          (push_requests / push_responses)
# and the consumer does
#     store event; mb(); load prod          (final_check_for_requests / _responses)
# Without both full barriers each load could be satisfied before the other side's store
# leaves its store buffer: the producer sees the old event index (no notify) while the consumer
# sees the old producer index (no work) and sleeps -- a lost wakeup. Store->load is the one
# reordering x86-64 (TSO) performs, so the other orderings the ring needs are program order:
# slot stores before the producer-index store (store->store), producer-index load before slot
# loads (load->load), and slot loads before the consumer's later index store (load->store).
#
# CPython exposes no fence, so mb() executes a locked instruction. In CPython 3.11 on Linux a
# threading.Lock is a sem_t (thread_pthread.h, USE_SEMAPHORES): acquire() first tries
# PyThread_acquire_lock_timed(lock, 0) = sem_trywait, release() is sem_post, and glibc
# implements both with `lock cmpxchg` (checked by disassembling libpython3.11 and libc.so.6 on
# these hosts). A locked instruction drains the store buffer and later loads cannot pass it, so
# acquire+release of a private, uncontended lock is a full barrier. (3.13's PyMutex-based Lock
# also uses an atomic compare-exchange.) The calls are opaque to the C compiler, which
# therefore cannot move the surrounding memory accesses across them either.
#
# Consumers in this project still sleep with a timeout and re-run the final check, which would
# heal a missed wakeup; the stress test (tests/integration/test_ring_stress.py) treats any
# timeout as a failure to show none is lost. (It reliably catches logic errors such as a final
# check that does not re-read the index; a hardware reordering window is a few hundred ns, so a
# test run can only catch that kind of bug by chance -- hence this argument.)

_fence = threading.Lock()


def mb() -> None:
    """Full memory barrier (store->load): one locked instruction via a private lock."""
    _fence.acquire()
    _fence.release()


def _reset_fence() -> None:
    # A fork while another thread held the lock would leave the child's copy locked forever.
    global _fence
    _fence = threading.Lock()


os.register_at_fork(after_in_child=_reset_fence)


def u32_view(area: memoryview, offset: int, count: int = 1) -> memoryview:
    """A native u32 view of `count` shared indices at `offset`: each item access is one
    aligned 32-bit load or store, never torn. Release it (``.release()``) before unmapping."""
    view = area[offset : offset + 4 * count]
    if view.nbytes != 4 * count:
        raise ValueError(f"{count} u32 at offset {offset} do not fit a {area.nbytes}-byte area")
    if _address(view) % 4:
        view.release()
        raise ValueError(f"u32 at offset {offset} is not 4-byte aligned in memory")
    return view.cast("I")


def _address(view: memoryview) -> int:
    probe = ctypes.c_char.from_buffer(view)  # a transient export, dropped on return
    return ctypes.addressof(probe)


# --- Ring types ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RingType:
    """One protocol's ring: its request and response structs (DEFINE_RING_TYPES)."""

    name: str
    request: struct.Struct
    response: struct.Struct
    slot_size: int
    #: The same structs padded to a whole slot: ``iter_unpack`` over a block of copied slots,
    #: and the item format of the block packers.
    request_slot: struct.Struct
    response_slot: struct.Struct

    def nr_ents(self, area_bytes: int) -> int:
        """RING_SIZE for an area of `area_bytes`: slots that fit, rounded down to a power of 2."""
        fit = (area_bytes - HEADER_SIZE) // self.slot_size
        if fit < 1:
            raise ValueError(
                f"{self.name} ring: a {area_bytes}-byte area holds no {self.slot_size}-byte slot"
            )
        return 1 << (fit.bit_length() - 1)


def declare_ring(name: str, request_format: str, response_format: str) -> RingType:
    """Declare a ring type from little-endian struct formats (e.g. ``"<QHH"``)."""
    structs = []
    for what, fmt in (("request", request_format), ("response", response_format)):
        if not fmt.startswith("<"):
            raise ValueError(f"{name} ring: {what} format {fmt!r} must start with '<'")
        try:
            compiled = struct.Struct(fmt)
        except struct.error as e:
            raise ValueError(f"{name} ring: bad {what} format {fmt!r}") from e
        if compiled.size == 0:
            raise ValueError(f"{name} ring: {what} format {fmt!r} is empty")
        structs.append(compiled)
    request, response = structs
    slot_size = max(request.size, response.size)
    return RingType(
        name,
        request,
        response,
        slot_size,
        _padded(request, slot_size),
        _padded(response, slot_size),
    )


def _padded(compiled: struct.Struct, slot_size: int) -> struct.Struct:
    pad = slot_size - compiled.size
    return struct.Struct(compiled.format + (f"{pad}x" if pad else ""))


# --- Front and back ends ---------------------------------------------------------------------


class _Ring:
    """What both ends share: the area, RING_SIZE, slot offsets and the broken state."""

    __slots__ = (
        "_area",
        "_blocks",
        "_dead",
        "_fields",
        "_item",
        "_mask",
        "_offsets",
        "_raw",
        "_sring",
        "_zero",
        "name",
        "nr_ents",
    )

    def __init__(self, rtype: RingType, area: memoryview, name: str | None) -> None:
        _check_area(rtype, area)
        self.name = name or rtype.name
        self.nr_ents = rtype.nr_ents(area.nbytes)
        self._area = area
        self._sring = u32_view(area, 0, 4)  # req_prod, req_event, rsp_prod, rsp_event
        self._mask = self.nr_ents - 1
        self._offsets = tuple(HEADER_SIZE + i * rtype.slot_size for i in range(self.nr_ents))
        self._raw = struct.Struct(f"{rtype.slot_size}s")
        self._zero = bytes(rtype.slot_size)
        self._item = self._produced(rtype)
        self._fields = len(self._item.unpack(bytes(self._item.size)))
        self._blocks: dict[int, struct.Struct] = {}  # slot count -> packer of that many items
        self._dead: tuple[type[Exception], str] | None = None  # broken or closed, for good

    def close(self) -> None:
        """Drop this end's view of the header (so the segment can be unmapped); idempotent.
        Later calls raise RingError (ProtocolViolation if the peer had broken the ring)."""
        if self._dead is None:
            self._dead = (RingError, f"{self.name} ring: closed")
        self._sring.release()

    @property
    def area(self) -> memoryview:
        """The shared memory this ring lives in (to start a fresh ring over it)."""
        return self._area

    @property
    def slot_size(self) -> int:
        """Bytes per slot."""
        return len(self._zero)

    @property
    def broken(self) -> bool:
        """True once the peer has written an impossible index."""
        return self._dead is not None and self._dead[0] is ProtocolViolation

    def _check(self) -> None:
        if self._dead is not None:
            raise self._dead[0](self._dead[1])

    def broke(self, reason: str) -> NoReturn:
        """The peer broke the ring where a native pump saw it: halt it as ``_break`` does."""
        self._break(reason)

    def _break(self, reason: str) -> NoReturn:
        message = f"{self.name} ring: {reason}; ring halted"
        self._dead = (ProtocolViolation, message)
        logger.warning("%s", message)
        raise ProtocolViolation(message)

    def _push(self, prod: int, event: int, old: int, new: int) -> bool:
        """RING_PUSH_*_AND_CHECK_NOTIFY: publish `new`, say whether the peer wants a kick."""
        if new == old:
            return False
        sring = self._sring
        # wmb: the slot stores above precede this store in program order (enough on TSO).
        sring[prod] = new
        mb()  # the index store must be visible before we read the peer's event index
        return ((new - sring[event]) & MASK32) < ((new - old) & MASK32)

    def _put_raw(self, prod: int, data: bytes) -> None:
        if len(data) > len(self._zero):
            raise ValueError(
                f"{self.name} ring: {len(data)} bytes exceed the {len(self._zero)}-byte slot"
            )
        off = self._offsets[prod & self._mask]
        # Zero the whole slot first so no stale bytes of an earlier item reach the peer.
        self._area[off : off + len(self._zero)] = self._zero
        self._area[off : off + len(data)] = data

    def _take(self, unpack: Callable[[Any, int], tuple], cons: int, n: int) -> list[tuple]:
        area, offsets, mask = self._area, self._offsets, self._mask
        return [unpack(area, offsets[(cons + i) & mask]) for i in range(n)]

    @staticmethod
    def _produced(rtype: RingType) -> struct.Struct:
        """The slot struct this end writes (requests at the front, responses at the back)."""
        raise NotImplementedError

    def _copy_slots(self, cons: int, n: int) -> bytes:
        """Copy ``n`` whole slots from index ``cons`` out as one bytes object (the one copy a
        consumer makes), in two pieces when the run wraps past the end of the slot array."""
        size, start = len(self._zero), cons & self._mask
        first = min(n, self.nr_ents - start)
        offset = HEADER_SIZE + start * size
        data = self._area[offset : offset + first * size].tobytes()
        if first < n:
            data += self._area[HEADER_SIZE : HEADER_SIZE + (n - first) * size].tobytes()
        return data

    def _block(self, n: int) -> struct.Struct:
        packer = self._blocks.get(n)
        if packer is None:
            body = self._item.format.lstrip("<")
            packer = self._blocks[n] = struct.Struct("<" + body * n)
        return packer

    def _pack_flat(self, prod: int, values: Sequence[int]) -> int:
        """Pack items given as one flat run of field values into whole slots from ``prod``
        (padding zeroed); returns the number of slots written."""
        fields = self._fields
        n, rest = divmod(len(values), fields)
        if rest:
            raise ValueError(f"{self.name} ring: {len(values)} values are not whole items")
        start = prod & self._mask
        first = min(n, self.nr_ents - start)
        offset = HEADER_SIZE + start * len(self._zero)
        try:
            if first == n:
                self._block(n).pack_into(self._area, offset, *values)
            else:
                split = first * fields
                self._block(first).pack_into(self._area, offset, *values[:split])
                self._block(n - first).pack_into(self._area, HEADER_SIZE, *values[split:])
        except struct.error as e:
            raise ValueError(f"{self.name} ring: cannot pack {values!r}") from e
        return n

    def _pack_many(self, pack: Callable[..., None], prod: int, items: Sequence[tuple]) -> None:
        area, offsets, mask = self._area, self._offsets, self._mask
        try:
            for i, values in enumerate(items):
                pack(area, offsets[(prod + i) & mask], *values)
        except struct.error as e:
            raise ValueError(f"{self.name} ring: cannot pack {items[i]!r}") from e


def _bounded(n: int, limit: int | None) -> int:
    if limit is None:
        return n
    if limit < 0:
        raise ValueError(f"negative batch limit {limit}")
    return min(n, limit)


def _check_area(rtype: RingType, area: memoryview) -> None:
    if not isinstance(area, memoryview):
        raise ValueError(f"{rtype.name} ring: area must be a memoryview, not {type(area).__name__}")
    if area.readonly or area.format != "B" or not area.c_contiguous:
        raise ValueError(f"{rtype.name} ring: area must be a writable, contiguous byte view")


class FrontRing(_Ring):
    """The frontend's end: produces requests, consumes responses. Make one with ``init``."""

    __slots__ = ("_pack_req", "_req_prod", "_rsp_prod", "_unpack_rsp", "req_prod_pvt", "rsp_cons")

    @staticmethod
    def _produced(rtype: RingType) -> struct.Struct:
        return rtype.request_slot

    def __init__(self, rtype: RingType, area: memoryview, name: str | None = None) -> None:
        super().__init__(rtype, area, name)
        self._pack_req = rtype.request.pack_into
        self._unpack_rsp = rtype.response.unpack_from
        self.req_prod_pvt = 0  # next request slot to fill (not yet published)
        self.rsp_cons = 0  # next response to consume
        self._req_prod = 0  # last value we published: a peer cannot rewrite our own history
        self._rsp_prod = 0  # validated snapshot of the backend's rsp_prod

    @classmethod
    def init(
        cls, rtype: RingType, area: memoryview, start: int = 0, name: str | None = None
    ) -> FrontRing:
        """SHARED_RING_INIT: prods = start, events = start + 1, pad (and slots) zeroed."""
        ring = cls(rtype, area, name)
        start &= MASK32
        used = HEADER_SIZE + ring.nr_ents * rtype.slot_size
        area[:used] = bytes(used)  # slots too: a reused area shows the backend nothing stale
        event = (start + 1) & MASK32
        _HEADER.pack_into(area, 0, start, event, start, event)
        ring.req_prod_pvt = ring.rsp_cons = ring._req_prod = ring._rsp_prod = start
        return ring

    # requests

    def free_requests(self) -> int:
        """RING_FREE_REQUESTS: slots the frontend may still fill."""
        self._check()
        return self.nr_ents - ((self.req_prod_pvt - self.rsp_cons) & MASK32)

    @property
    def full(self) -> bool:
        """RING_FULL."""
        return self.free_requests() == 0

    def _claim(self, n: int) -> int:
        free = self.free_requests()
        if n > free:
            raise RingError(f"{self.name} ring: {n} requests but only {free} free slots")
        return self.req_prod_pvt

    def put_request(self, values: tuple) -> None:
        """Pack one request into the slot at req_prod_pvt (not yet visible to the backend)."""
        self.put_requests((values,))

    def put_requests(self, items: Sequence[tuple]) -> None:
        """Pack a batch of requests; all or nothing (RingError if they do not all fit)."""
        prod = self._claim(len(items))
        self._pack_many(self._pack_req, prod, items)
        self.req_prod_pvt = (prod + len(items)) & MASK32

    def put_requests_flat(self, values: Sequence[int]) -> None:
        """Pack a batch of requests given as one flat run of their field values (the fast
        path: one ``pack_into`` per batch); all or nothing."""
        prod = self._claim(len(values) // self._fields)
        n = self._pack_flat(prod, values)
        self.req_prod_pvt = (prod + n) & MASK32

    def put_request_raw(self, data: bytes) -> None:
        """Write raw bytes (at most one slot) as the next request; the rest of the slot is 0."""
        prod = self._claim(1)
        self._put_raw(prod, data)
        self.req_prod_pvt = (prod + 1) & MASK32

    def indices(self) -> tuple[int, int, int]:
        """(rsp_cons, req_prod_pvt, the req_prod last published): what a native pump
        (channels.pumps) takes over, and hands back with ``adopt``."""
        return self.rsp_cons, self.req_prod_pvt, self._req_prod

    def adopt(self, cons: int, prod_pvt: int, pushed: int) -> None:
        """Carry on from where a native pump left this ring (``indices``' order)."""
        self.rsp_cons, self.req_prod_pvt, self._req_prod, self._rsp_prod = (
            cons,
            prod_pvt,
            pushed,
            cons,
        )

    def push_requests(self) -> bool:
        """Publish req_prod_pvt; True if the backend asked to be notified (ring the doorbell)."""
        self._check()
        old, self._req_prod = self._req_prod, self.req_prod_pvt
        return self._push(_REQ_PROD, _REQ_EVENT, old, self.req_prod_pvt)

    # responses

    def _snapshot(self) -> int:
        """Read rsp_prod once and validate it; return the number of unconsumed responses."""
        rsp_prod = self._sring[_RSP_PROD]
        ahead = (rsp_prod - self.rsp_cons) & MASK32
        outstanding = (self._req_prod - self.rsp_cons) & MASK32
        # RING_RESPONSE_PROD_OVERFLOW, tightened: an honest backend never answers more requests
        # than were published, which also catches rsp_prod moving backwards (ahead ~ 2**32).
        if ahead > outstanding:
            self._break(
                f"impossible rsp_prod {rsp_prod} (rsp_cons {self.rsp_cons}, {outstanding} "
                f"requests outstanding, RING_SIZE {self.nr_ents})"
            )
        self._rsp_prod = rsp_prod  # rmb: slot loads below follow this load (TSO)
        return ahead

    def unconsumed_responses(self) -> int:
        """RING_HAS_UNCONSUMED_RESPONSES, from a fresh, validated snapshot of rsp_prod."""
        self._check()
        return self._snapshot()

    def _available(self, limit: int | None) -> int:
        return _bounded(self.unconsumed_responses(), limit)

    def _next_response(self) -> int:
        self._check()
        if self._rsp_prod == self.rsp_cons and self._snapshot() == 0:
            raise RingError(f"{self.name} ring: no unconsumed response")
        return self.rsp_cons

    def get_response(self) -> tuple:
        """RING_COPY_RESPONSE: copy the next response out of its slot (once) and consume it."""
        cons = self._next_response()
        values = self._unpack_rsp(self._area, self._offsets[cons & self._mask])
        self.rsp_cons = (cons + 1) & MASK32
        return values

    def get_response_raw(self) -> bytes:
        """Copy the next response slot out as bytes (once) and consume it."""
        cons = self._next_response()
        data: bytes = self._raw.unpack_from(self._area, self._offsets[cons & self._mask])[0]
        self.rsp_cons = (cons + 1) & MASK32
        return data

    def get_responses(self, limit: int | None = None) -> list[tuple]:
        """Copy out and consume up to `limit` responses (all available if None)."""
        n = self._available(limit)
        out = self._take(self._unpack_rsp, self.rsp_cons, n)
        self.rsp_cons = (self.rsp_cons + n) & MASK32
        return out

    def get_responses_raw(self, limit: int | None = None) -> list[bytes]:
        """Like get_responses, but each slot is returned whole as bytes."""
        n = self._available(limit)
        out = [t[0] for t in self._take(self._raw.unpack_from, self.rsp_cons, n)]
        self.rsp_cons = (self.rsp_cons + n) & MASK32
        return out

    def get_responses_block(self, limit: int | None = None) -> bytes:
        """Copy out and consume up to `limit` whole response slots as one bytes object (the
        fast path; read it with ``rtype.response_slot.iter_unpack``)."""
        n = self._available(limit)
        out = self._copy_slots(self.rsp_cons, n)
        self.rsp_cons = (self.rsp_cons + n) & MASK32
        return out

    def final_check_for_responses(self) -> bool:
        """RING_FINAL_CHECK_FOR_RESPONSES: True if there is work; else arm rsp_event first."""
        if self.unconsumed_responses():
            return True
        self._sring[_RSP_EVENT] = (self.rsp_cons + 1) & MASK32
        mb()  # the event store must be visible before we re-read rsp_prod
        return self._snapshot() > 0


class BackRing(_Ring):
    """The backend's end: consumes requests, produces responses into the same slots.
    Make one with ``attach``."""

    __slots__ = (
        "_pack_rsp",
        "_req_prod",
        "_rsp_prod",
        "_unpack_req",
        "figures",
        "req_cons",
        "rsp_prod_pvt",
    )

    @staticmethod
    def _produced(rtype: RingType) -> struct.Struct:
        return rtype.response_slot

    def __init__(self, rtype: RingType, area: memoryview, name: str | None = None) -> None:
        super().__init__(rtype, area, name)
        self._pack_rsp = rtype.response.pack_into
        self._unpack_req = rtype.request.unpack_from
        self.req_cons = 0  # next request to consume
        self.rsp_prod_pvt = 0  # next response slot to fill (not yet published)
        self._req_prod = 0  # validated snapshot of the frontend's req_prod
        self._rsp_prod = 0  # last value we published
        #: RING_FIGURES u64s this ring counts in (a native "Q" view), or None
        self.figures: memoryview | None = None

    @classmethod
    def attach(cls, rtype: RingType, area: memoryview, name: str | None = None) -> BackRing:
        """BACK_RING_ATTACH: resume at the shared rsp_prod; unanswered requests are re-read."""
        ring = cls(rtype, area, name)
        rsp_prod = ring._sring[_RSP_PROD]
        ring.req_cons = ring.rsp_prod_pvt = ring._req_prod = ring._rsp_prod = rsp_prod
        try:
            ring._snapshot()  # a frontend that already lies is refused at attach
        except ProtocolViolation:
            ring.close()
            raise
        return ring

    # requests

    def _snapshot(self) -> int:
        """Read req_prod once and validate it; return the number of unconsumed requests."""
        req_prod = self._sring[_REQ_PROD]
        if (req_prod - self.rsp_prod_pvt) & MASK32 > self.nr_ents:  # RING_REQUEST_PROD_OVERFLOW
            self._break(
                f"impossible req_prod {req_prod} (rsp_prod_pvt {self.rsp_prod_pvt}, "
                f"RING_SIZE {self.nr_ents})"
            )
        ahead = (req_prod - self.req_cons) & MASK32
        if ahead > self.nr_ents:
            self._break(f"req_prod {req_prod} moved back behind req_cons {self.req_cons}")
        self._req_prod = req_prod  # rmb: slot loads below follow this load (TSO)
        # RING_REQUEST_CONS_OVERFLOW: never consume more than we can still answer.
        return min(ahead, self.nr_ents - ((self.req_cons - self.rsp_prod_pvt) & MASK32))

    def unconsumed_requests(self) -> int:
        """RING_HAS_UNCONSUMED_REQUESTS (capped), from a fresh, validated snapshot of req_prod."""
        self._check()
        return self._snapshot()

    def _available(self, limit: int | None) -> int:
        return _bounded(self.unconsumed_requests(), limit)

    def _next_request(self) -> int:
        self._check()
        # A validated snapshot ahead of req_cons guarantees a slot we can still answer into.
        if self._req_prod == self.req_cons and self._snapshot() == 0:
            raise RingError(f"{self.name} ring: no unconsumed request")
        return self.req_cons

    def get_request(self) -> tuple:
        """RING_COPY_REQUEST: copy the next request out of its slot (once) and consume it."""
        cons = self._next_request()
        values = self._unpack_req(self._area, self._offsets[cons & self._mask])
        self._took(cons, 1)
        return values

    def get_request_raw(self) -> bytes:
        """Copy the next request slot out as bytes (once) and consume it."""
        cons = self._next_request()
        data: bytes = self._raw.unpack_from(self._area, self._offsets[cons & self._mask])[0]
        self._took(cons, 1)
        return data

    def get_requests(self, limit: int | None = None) -> list[tuple]:
        """Copy out and consume up to `limit` requests (all available if None)."""
        n = self._available(limit)
        out = self._take(self._unpack_req, self.req_cons, n)
        self._took(self.req_cons, n)
        return out

    def get_requests_block(self, limit: int | None = None) -> bytes:
        """Copy out and consume up to `limit` whole request slots as one bytes object (the
        fast path; read it with ``rtype.request_slot.iter_unpack``)."""
        n = self._available(limit)
        out = self._copy_slots(self.req_cons, n)
        self._took(self.req_cons, n)
        return out

    def get_requests_raw(self, limit: int | None = None) -> list[bytes]:
        """Like get_requests, but each slot is returned whole as bytes."""
        n = self._available(limit)
        out = [t[0] for t in self._take(self._raw.unpack_from, self.req_cons, n)]
        self._took(self.req_cons, n)
        return out

    def _took(self, cons: int, n: int) -> None:
        self.req_cons = (cons + n) & MASK32
        figures = self.figures
        if figures is not None:
            figures[FIG_REQUESTS] += n

    # responses

    def _claim(self, n: int) -> int:
        self._check()
        owed = (self.req_cons - self.rsp_prod_pvt) & MASK32
        if n > owed:
            raise RingError(f"{self.name} ring: {n} responses but only {owed} requests consumed")
        return self.rsp_prod_pvt

    def put_response(self, values: tuple) -> None:
        """Pack one response into the slot of the oldest unanswered request."""
        self.put_responses((values,))

    def put_responses(self, items: Sequence[tuple]) -> None:
        """Pack a batch of responses; all or nothing (RingError if more than consumed)."""
        prod = self._claim(len(items))
        self._pack_many(self._pack_rsp, prod, items)
        self.rsp_prod_pvt = (prod + len(items)) & MASK32

    def put_responses_flat(self, values: Sequence[int]) -> None:
        """Pack a batch of responses given as one flat run of their field values (the fast
        path: one ``pack_into`` per batch); all or nothing."""
        prod = self._claim(len(values) // self._fields)
        n = self._pack_flat(prod, values)
        self.rsp_prod_pvt = (prod + n) & MASK32

    def put_response_raw(self, data: bytes) -> None:
        """Write raw bytes (at most one slot) as the next response; the rest of the slot is 0."""
        prod = self._claim(1)
        self._put_raw(prod, data)
        self.rsp_prod_pvt = (prod + 1) & MASK32

    def unconsume(self, n: int) -> None:
        """Take back the last ``n`` requests consumed and not answered, to be copied out
        again (a native pump's held rx buffers, which the Python path takes over: the slots
        are still the backend's, and what is read from them is checked again)."""
        if n > (self.req_cons - self.rsp_prod_pvt) & MASK32:
            raise RingError(f"{self.name} ring: cannot take back {n} requests")
        self.req_cons = (self.req_cons - n) & MASK32
        if self.figures is not None:  # taken again, and counted again, by the next get
            self.figures[FIG_REQUESTS] -= n

    def indices(self) -> tuple[int, int, int]:
        """(req_cons, rsp_prod_pvt, the rsp_prod last published): what a native pump
        (channels.pumps) takes over, and hands back with ``adopt``."""
        return self.req_cons, self.rsp_prod_pvt, self._rsp_prod

    def adopt(self, cons: int, prod_pvt: int, pushed: int) -> None:
        """Carry on from where a native pump left this ring (``indices``' order)."""
        self.req_cons, self.rsp_prod_pvt, self._rsp_prod, self._req_prod = (
            cons,
            prod_pvt,
            pushed,
            cons,
        )

    def push_responses(self) -> bool:
        """Publish rsp_prod_pvt; True if the frontend asked to be notified."""
        self._check()
        old, self._rsp_prod = self._rsp_prod, self.rsp_prod_pvt
        notify = self._push(_RSP_PROD, _RSP_EVENT, old, self.rsp_prod_pvt)
        figures = self.figures
        if figures is not None and old != self.rsp_prod_pvt:
            figures[FIG_RESPONSES] += (self.rsp_prod_pvt - old) & MASK32
            figures[FIG_NOTIFY_SENT if notify else FIG_NOTIFY_SUPPRESSED] += 1
        return notify

    def final_check_for_requests(self) -> bool:
        """RING_FINAL_CHECK_FOR_REQUESTS: True if there is work; else arm req_event first."""
        if self.unconsumed_requests():
            return True
        self._sring[_REQ_EVENT] = (self.req_cons + 1) & MASK32
        mb()  # the event store must be visible before we re-read req_prod
        return self._snapshot() > 0

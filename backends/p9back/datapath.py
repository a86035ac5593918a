"""p9back's data path for one 9pfs device: requests from each ring's ``out``, replies into its
``in``, answered by the device's file server (backends/p9back/server.py).

It runs inside the device's worker process (backends/p9back/worker.py), over the rings, event
channels and grants of one frontend connection, and the share's root fd dom0 opened for it.

One thread per ring. Each turn it (1) writes the reply it holds, if the ``in`` ring has room
for all of it now; (2) only then takes the next request: it reads the 7-byte header, checks
``size`` (at least the header, at most the negotiated msize and the ring's size: anything else
is a protocol violation), waits until the whole message is queued, copies it out of ``out``
once (the server decodes that private copy), and answers it. So a connection holds at most
one reply per ring: a frontend that stops reading ``in`` only stops its own requests. After
moving an index it notifies the frontend (a flex ring has no event index: every move is
signalled, and the doorbell coalesces them). When there is nothing to do it sleeps on the
event channel with a timeout that heals a lost wakeup; wakeups that find no work slow it down
(LateEoi), so a frontend ringing in a loop costs dom0 a few wakeups a second.

Protocol violations (xen-split-driver.md §1.7): an index the frontend moved that it does not
own, ``prod - cons`` beyond the ring's size, a bad message size, a ring order above what we
advertised, grant refs past the budget (channels/grants.py). Each calls ``on_fatal`` once and
stops every ring of this device, none of any other. A request that decodes badly, names an
unknown fid or asks too much is answered Rlerror by the server, and the ring goes on.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence

from backends.datapath_worker import CounterPage
from backends.p9back.server import MIN_MSIZE, P9Server
from channels import kinds
from channels import p9fs as P
from channels.errors import ProtocolViolation
from channels.evtchn import Doorbells, LateEoi
from channels.grants import GrantMapper
from channels.ring import FIG_NOTIFY_SENT, FIG_REQUESTS, FIG_RESPONSES, RingError

log = logging.getLogger(__name__)

HEAL_TIMEOUT = 10.0  # seconds asleep before re-checking the rings without a notification
JOIN_TIMEOUT = 5.0

#: channels/kinds.py declares them, in this order.
COUNTER_FIELDS = kinds.P9.counters


class Counters(CounterPage):
    """Per device: requests answered, of them answered Rlerror, request and reply bytes, and
    grant refs in no pool the frontend set up (counted by the grant mapper)."""

    FIELDS = COUNTER_FIELDS
    requests: int
    errors: int
    bytes_in: int
    bytes_out: int
    bad_grefs: int


def max_grant_pages(rings: int, order: int) -> int:
    """What one connection can have granted: per ring, the interface page and its data."""
    return rings * (1 + (1 << order))


class RingPath:
    """One ring of a device: its two flex rings, its event channel, its thread."""

    def __init__(
        self,
        intf: P.DataIntf,
        in_ring: P.FlexRing,
        out: P.FlexRing,
        evtchn: Doorbells,
        device: P9Device,
        name: str,
    ) -> None:
        self.intf, self.in_ring, self.out, self.evtchn = intf, in_ring, out, evtchn
        self.device = device
        self.name = name
        self.pending: bytes | None = None  # the reply the in ring had no room for yet
        self.late_eoi = LateEoi()
        #: The ring's figures (channels/ring.py's RING_FIGURES), or None. A flex ring has no
        #: event index: every notification is sent, none suppressed.
        self.figures: memoryview | None = None
        self.thread = threading.Thread(target=self._run, name=f"p9back {name}", daemon=True)

    def _run(self) -> None:
        with self.device.guard():
            self.late_eoi.serve(
                self.work, self.has_work, self.evtchn.wait, self.device.running, HEAL_TIMEOUT
            )

    def work(self) -> bool:
        """One turn (see the module docstring); False when nothing moved."""
        moved = False
        if self.pending is not None:
            if not self.in_ring.write(self.pending):
                return False  # the frontend has yet to make room: nothing else until it does
            self.pending, moved = None, True
            self._notify(FIG_RESPONSES)
        raw = self._next_request()
        if raw is not None:
            self._notify(FIG_REQUESTS)  # out_cons moved: room for the frontend's next requests
            reply = self.device.answer(raw)
            if not self.in_ring.write(reply):
                self.pending = reply
            else:
                self._notify(FIG_RESPONSES)
            moved = True
        return moved

    def _notify(self, figure: int) -> None:
        """Ring the frontend for a request taken or a reply written (``figure``), counted
        first: whoever the frontend tells next sees the figures that led to it."""
        if self.figures is not None:
            self.figures[figure] += 1
            self.figures[FIG_NOTIFY_SENT] += 1
        self.evtchn.notify()

    def has_work(self) -> bool:
        """The final check before sleeping: a reply that fits now, or a whole request."""
        if self.pending is not None:
            return self.in_ring.free() >= len(self.pending)
        queued = self.out.available()
        if queued < P.HEADER_SIZE:
            return False
        return queued >= self._size(self.out.peek(P.HEADER_SIZE))

    def _size(self, header: bytes) -> int:
        size = P.parse_header(header)[0]
        limit = min(self.device.server.msize, self.out.size)
        if not P.HEADER_SIZE <= size <= limit:
            raise ProtocolViolation(f"{self.name}: a message of {size} bytes (limit {limit})")
        return size

    def _next_request(self) -> bytes | None:
        """The next whole request, copied out of the ring once; None if not all there yet."""
        queued = self.out.available()
        if queued < P.HEADER_SIZE:
            return None
        size = self._size(self.out.peek(P.HEADER_SIZE))
        if queued < size:
            return None
        return self.out.read(size)


class P9Device:
    """The rings of one 9pfs device and its server; ``start()`` once, ``stop()`` any time."""

    def __init__(
        self,
        server: P9Server,
        *,
        counters: Counters,
        on_fatal: Callable[[str], None],
        name: str,
    ) -> None:
        self.server = server
        self.counters = counters
        self.on_fatal = on_fatal
        self.name = name
        self.rings: list[RingPath] = []
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # the server's requests and the counters
        self._fatal_sent = False

    @classmethod
    def connect(
        cls,
        grants: GrantMapper,
        channels: Sequence[Doorbells],
        ring_refs: Sequence[int],
        server: P9Server,
        *,
        max_order: int,
        counters: Counters,
        on_fatal: Callable[[str], None],
        name: str,
    ) -> P9Device:
        """Map each ring (its interface page, then the data pages it names: ``in`` writable,
        ``out`` read-only) and attach to it. GrantError or ProtocolViolation if the frontend
        set a ring up wrong; nothing is left mapped by us then but what the mapper holds."""
        if len(channels) != len(ring_refs):
            raise ValueError(f"{name}: {len(ring_refs)} rings, {len(channels)} event channels")
        device = cls(server, counters=counters, on_fatal=on_fatal, name=name)
        for n, (ref, channel) in enumerate(zip(ring_refs, channels, strict=True)):
            intf = P.DataIntf(grants.resolve(ref, write=True))
            order, refs = intf.read_layout(max_order)
            half = len(refs) // 2
            pages = [grants.resolve(r, write=i < half) for i, r in enumerate(refs)]
            ring = f"{name} ring {n}"
            in_ring, out = P.flex_rings(intf, pages, backend=True, name=ring)
            if out.size < MIN_MSIZE:
                raise ProtocolViolation(f"{ring}: order {order} is too small for 9P")
            device.rings.append(RingPath(intf, in_ring, out, channel, device, ring))
            server.limit_msize(out.size)
        return device

    def running(self) -> bool:
        return not self._stopping.is_set()

    def start(self) -> None:
        for ring in self.rings:
            ring.thread.start()

    def stop(self) -> None:
        """Stop every ring's thread and let go of the rings; idempotent."""
        self._stopping.set()
        for ring in self.rings:
            ring.late_eoi.stop()
            ring.evtchn.kick()
        for ring in self.rings:
            if ring.thread.ident is not None:
                ring.thread.join(JOIN_TIMEOUT)
        for ring in self.rings:  # their pages go, so the mapper can unmap their pools
            ring.in_ring.close()
            ring.out.close()
            ring.intf.close()
        self.server.close()

    def answer(self, raw: bytes) -> bytes:
        reply = self.server.handle(raw)
        with self._lock:
            c = self.counters
            c.requests += 1
            c.bytes_in += len(raw)
            c.bytes_out += len(reply)
            if reply[4] == P.Rlerror.TYPE:
                c.errors += 1
        return reply

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """How a ring's thread ends: a protocol violation (or our own bug) fails the device;
        a ring closed under us means it is already going away."""
        try:
            yield
        except ProtocolViolation as exc:
            self.fatal(str(exc))
        except RingError:
            pass
        except Exception as exc:
            log.exception("%s failed", threading.current_thread().name)
            self.fatal(f"internal error: {exc}")

    def fatal(self, message: str) -> None:
        """Report once, and stop every ring of this device."""
        with self._lock:
            if self._fatal_sent:
                return
            self._fatal_sent = True
        self._stopping.set()
        for ring in self.rings:
            ring.late_eoi.stop()
            ring.evtchn.kick()
        self.on_fatal(message)

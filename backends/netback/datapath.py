"""netback's data path: the tx ring into the host TAP, the host TAP into the rx ring.

Two threads per vif. The frontend is hostile (xen-split-driver.md §1.7): every request is
copied out of the ring once (BackRing returns copies) and checked before use; grant refs are
resolved through GrantMapper, which checks each one; a bad packet is answered NETIF_RSP_ERROR
and counted; a protocol violation (impossible ring index, a slot chain longer than any honest
frontend makes, grant refs past the budget of bad ones: channels/grants.py) stops this vif only,
through ``on_fatal``.

A transmitted frame's head (its first HEAD_COPY bytes, every header netback reads) is copied out
of the granted pages once; the source check (antispoof.py) and the virtio-net header are made
from that copy, and the copy is what the TAP gets, followed by the rest of the frame as slices
of the granted pages, in one writev. A received frame is read with one readv straight into the
pages the frontend posted. Each wakeup handles every request or frame that is ready.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from backends.datapath_worker import CounterPage
from backends.netback.antispoof import SourceFilter
from channels import kinds, pumps
from channels import netif as N
from channels.errors import BadInput, ProtocolViolation
from channels.evtchn import Doorbells, LateEoi
from channels.gnttab import GrantError
from channels.grants import GrantMapper
from channels.ring import BackRing, RingError
from channels.threadname import NamedThread
from channels.tun import VNET_HDR_SIZE, TapWaiter

log = logging.getLogger(__name__)

HEAL_TIMEOUT = 10.0
#: An honest frontend never chains more slots than this into one packet (Linux netback's
#: fatal_skb_slots); more is a protocol violation. 19..20 slots are dropped with an error.
FATAL_SLOTS = 20
MAX_FRAME_PAGES = 17  # 65535 bytes of frame in 4 KiB pages, rounded up
BUDGET = 64  # frames per wakeup on the rx side
BUDGET_SLOTS = 256  # tx slots per wakeup: a full ring's worth
#: The bytes of each transmitted frame that netback copies out of the guest's pages before it
#: looks at them: every header it parses (Ethernet, VLAN, IPv4 with options, IPv6, ARP, the
#: TCP/UDP header's fields) lies in them. Linux netback's XEN_NETBACK_TX_COPY_LEN.
HEAD_COPY = 128
#: The GSO sizes netback passes to the kernel: from TCP_MIN_MSS (88, Linux's include/net/tcp.h,
#: the smallest MSS setsockopt(TCP_MAXSEG) accepts) to below GSO_BY_FRAGS (0xFFFF, which the
#: kernel's virtio_net_hdr_to_skb refuses). 0 is nonsense (Linux netback treats it as fatal);
#: a size of 1 would have the host cut one 64 KiB frame into 65535 packets. A guest's TCP makes
#: segments under 88 bytes only over a path whose MTU is under 140 (40 bytes of headers, 12 of
#: timestamps).
MIN_GSO_SIZE = 88
GSO_BY_FRAGS = 0xFFFF


#: A tx slot as copied out: (gref, offset, flags, id, size); an extra slot reads the same way.
Slot = tuple[int, int, int, int, int]
_TX_SLOT = N.TX_RING.request_slot
_RX_REQ = N.RX_RING.request_slot
_FIRST, _EXTRA, _FRAGMENT, _DONE = range(4)  # where TxPath is in the packet it collects


#: The order the native pump keeps them in too (channels/kinds.py declares them).
COUNTER_FIELDS = kinds.VIF.counters


class Counters(CounterPage):
    """Per vif, from the domain's point of view: tx = sent by the domain."""

    FIELDS = COUNTER_FIELDS
    # Declared for type checkers; CounterPage makes each a property over the page.
    tx_packets: int
    tx_bytes: int
    tx_errors: int
    tx_dropped: int
    tx_spoofed: int
    rx_packets: int
    rx_bytes: int
    rx_errors: int
    rx_dropped: int
    bad_grefs: int  # refs in no pool the frontend set up (channels/grants.py counts them)
    fault_dropped: int  # frames the injected faults hit (backends/netback/faults.py)
    fault_duplicated: int
    fault_corrupted: int
    fault_delayed: int

    def error(self, reason: str) -> None:
        """A refused tx packet: counted; its reason goes to the log (not per packet above
        debug level: a hostile frontend chooses how often)."""
        with self.lock:  # a fault line counts TAP refusals too
            self.tx_errors += 1
        log.debug("tx packet refused: %s", reason)

    def spoofed(self, reason: str) -> None:
        """A tx frame from an address the vif may not use: counted; the reason at debug level,
        as for ``error``."""
        self.tx_spoofed += 1
        log.debug("tx frame spoofed: %s", reason)


class BadPacket(BadInput):
    """One packet is refused (answered NETIF_RSP_ERROR); the vif carries on."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Spoofed(BadInput):
    """A frame from an address the vif may not use (antispoof.py; the reason is its message):
    dropped and counted, and answered NETIF_RSP_OKAY, as a bridge's filter drops it after Xen's
    netback answered. Not a BadPacket, which is answered NETIF_RSP_ERROR."""


@dataclass
class RateLimit:
    """netback's credit scheduler: ``credit`` bytes per ``window_us`` microseconds."""

    credit: int
    window_us: int
    remaining: int = 0
    next_refill: float = 0.0

    def wait_time(self, size: int) -> float:
        """Seconds to wait before ``size`` bytes may go (0: send now, and the credit is taken)."""
        now = time.monotonic()
        if now >= self.next_refill:
            # A new window's credit, less what the last packet overdrew.
            self.remaining = self.credit + min(0, self.remaining)
            self.next_refill = now + self.window_us / 1e6
        # Any credit left lets the next packet go, however large (a 64 KiB GSO packet is more
        # than a window's credit at low rates); what it overdraws is paid from the next window,
        # so the long-run rate is exactly credit per window.
        if self.remaining > 0:
            self.remaining -= size
            return 0.0
        return self.next_refill - now


N_KIND_TX, N_KIND_RX = (pumps.NETBACK_TX, pumps.NETBACK_RX)


@contextlib.contextmanager
def _fatal_on_violation(direction: str, on_fatal: Callable[[str], None]) -> Iterator[None]:
    """How a data-path thread ends: a protocol violation (or our own bug) disconnects the vif;
    a ring closed under us means the vif is already going away."""
    try:
        yield
    except ProtocolViolation as exc:
        on_fatal(f"{direction}: {exc}")
    except RingError:
        pass
    except Exception as exc:
        log.exception("netback %s failed", direction)
        on_fatal(f"{direction}: internal error: {exc}")


class TxPath:
    """Frontend -> host: consume tx requests, transmit on the TAP, answer every slot."""

    def __init__(
        self,
        ring: BackRing,
        evtchn: Doorbells,
        grants: GrantMapper,
        tap_fd: int,
        counters: Counters,
        rate: RateLimit | None,
        on_fatal: Callable[[str], None],
        sources: SourceFilter | None = None,
        queue: pumps.QueueLoop | None = None,
    ):
        self.ring = ring
        self.evtchn = evtchn
        self.grants = grants
        self.tap_fd = tap_fd
        self.counters = counters
        self.rate = rate
        self.on_fatal = on_fatal
        self.sources = sources  # None: any source (a test's frames)
        self.stopping = False
        self._slots: list[Slot] = []  # the packet being collected, first slot first
        self._state = _FIRST  # what its next slot must be
        self._extras = 0  # how many extra slots follow its first
        self._responses: list[int] = []  # flat (id, status) pairs, in slot order
        self.late_eoi = LateEoi()
        self.native = pumps.NativePump(self.late_eoi, queue=queue, side=pumps.TX)
        self.thread = NamedThread(target=self._run, name="netback-tx", daemon=True)

    def stop(self) -> None:
        self.stopping = True
        self.native.stop()
        self.late_eoi.stop()
        self.evtchn.kick()

    def divert(self, fd: int) -> None:
        """Send frames to ``fd`` instead of the TAP from now on (a fault line's:
        backends/netback/faults.py); a native pump running hands the ring to this path."""
        self.tap_fd = fd
        self.native.interrupt()

    def _run(self) -> None:
        with _fatal_on_violation("tx", self.on_fatal):
            # The native pump has no credit scheduler: a vif with a rate runs in Python. A
            # pump interrupted (the vif got faults) leaves the ring to the Python path.
            if self.rate is None and self._run_native() and self.stopping:
                return
            self.late_eoi.serve(
                self._work,
                self.ring.final_check_for_requests,
                self.evtchn.wait,
                lambda: not self.stopping,
                HEAL_TIMEOUT,
            )

    def _run_native(self) -> bool:
        """Serve the ring with the native pump until stopped; False if it does not run here.
        A frame it hands back (anything but the common case) goes through ``_work``, one
        packet, then the pump carries on where Python left the ring."""
        sources = self.sources
        pump = self.native.start_backend(
            N_KIND_TX,
            self.ring,
            self.tap_fd,
            self.evtchn,
            self.counters,
            self.grants,
            sources=None if sources is None else (sources.mac, sources.ipv4, sources.any_address),
        )
        if pump is None:
            return False
        self.native.serve_backend(
            pump, self.ring, self.grants, lambda: self.stopping, ProtocolViolation, self._take_back
        )
        return True

    def _take_back(self, result: tuple[int, str, int]) -> None:
        """A packet of ``result[2]`` slots the pump left in the ring (FALLBACK), done here. An
        honest frontend never takes published slots back; one that does would have the two of
        us hand the packet back and forth with no doorbell between."""
        if not self._work(result[2]):
            raise ProtocolViolation("req_prod moved back under a published packet")
        while self._slots and not self.stopping:  # rewritten meanwhile: finish it
            if self._work(FATAL_SLOTS):
                self.late_eoi.worked()
            elif not self.ring.final_check_for_requests() and self.late_eoi.woke(
                self.evtchn.wait(HEAL_TIMEOUT)
            ):
                self.late_eoi.back_off()

    def _work(self, limit: int = BUDGET_SLOTS) -> bool:
        """Take every slot the frontend has published, up to ``limit`` (one private copy of the
        whole run), transmit the packets they complete, answer them all in one block, push
        once. A protocol violation is raised once the packets before it are answered: they
        were sent (as blkback does and answers the requests before one); the slots after it
        are never looked at."""
        block = self.ring.get_requests_block(limit)
        if not block:
            return False
        try:
            self._collect(block)
        finally:
            self._answer()
        return True

    def _collect(self, block: bytes) -> None:
        """Add ``block``'s slots to the packet being collected, transmitting each completed."""
        slots, state, extras = self._slots, self._state, self._extras
        for slot in _TX_SLOT.iter_unpack(block):
            slots.append(slot)
            if state == _EXTRA:
                # An extra overlays the slot: its type and flags are the gref's low bytes.
                extras += 1
                if not (slot[0] >> 8) & N.XEN_NETIF_EXTRA_FLAG_MORE:
                    state = _FRAGMENT if slots[0][2] & N.NETTXF_more_data else _DONE
            elif state == _FIRST and slot[2] & N.NETTXF_extra_info:
                state = _EXTRA
            else:
                state = _FRAGMENT if slot[2] & N.NETTXF_more_data else _DONE
            if state == _DONE:
                self._transmit(slots, extras)
                slots, state, extras = [], _FIRST, 0
            elif len(slots) > FATAL_SLOTS:
                raise ProtocolViolation(f"a packet of more than {FATAL_SLOTS} slots")
        self._slots, self._state, self._extras = slots, state, extras

    def _answer(self) -> None:
        """Put the responses collected on the ring, in one block, and push them."""
        if self._responses:
            self.ring.put_responses_flat(self._responses)
            self._responses = []
            if self.ring.push_responses():
                self.evtchn.notify()

    def _transmit(self, slots: list[Slot], extras: int) -> None:
        """Send one packet and answer each of its slots: extras NETIF_RSP_NULL, the rest the
        packet's status."""
        try:
            total = self._send(slots, extras)
            status = N.NETIF_RSP_OKAY
            self.counters.tx_packets += 1
            self.counters.tx_bytes += total
        except Spoofed as exc:
            status = N.NETIF_RSP_OKAY
            self.counters.spoofed(str(exc))
        except BadPacket as exc:
            status = N.NETIF_RSP_ERROR
            self.counters.error(exc.reason)
        out = self._responses
        out += (slots[0][3], status)
        out += (0, N.NETIF_RSP_NULL) * extras
        for slot in slots[1 + extras :]:
            out += (slot[3], status)

    def _send(self, slots: list[Slot], extras: int) -> int:
        first = slots[0]
        total = first[4]
        offload = self._offload(first[2], slots[1 : 1 + extras])
        if offload is None:
            return 0  # a multicast-control request: answered OKAY, nothing sent
        if len(slots) - extras > N.XEN_NETIF_NR_SLOTS_MIN:
            raise BadPacket("too many slots")
        if total < N.ETH_HLEN:
            raise BadPacket("first slot shorter than an Ethernet header")
        # The iovec: virtio-net header, the head's private copy, then the frame's live pages.
        views: list[bytes | memoryview] = [b"", b"", b""]
        head = self._add_pages(views, slots, extras)
        # Every check and every header netback computes reads ``head``, and the kernel parses
        # the same bytes, since they go to the TAP from ``head`` too: the guest can no longer
        # change them in between (XSA-155). The rest goes zero-copy from the granted pages:
        # the tun driver copies it into its own skb during writev, and it is payload to us and
        # to the kernel's parsers (checksums and segmentation run on the kernel's copy), so a
        # guest that changes it meanwhile only changes what it sends, as it could anyway.
        layout = N.frame_layout(head)  # parsed once, for the source check and the vnet header
        if self.sources is not None:
            refusal = self.sources.refusal(head, layout)
            if refusal is not None:
                raise Spoofed(refusal)
        views[0] = N.vnet_from_offload(offload, head, layout)
        views[1] = head
        if self.rate is not None:
            delay = self.rate.wait_time(total)
            while delay > 0 and not self.stopping:
                time.sleep(min(delay, 0.05))
                delay = self.rate.wait_time(total)
        try:
            os.writev(self.tap_fd, views)
        except BlockingIOError:
            with self.counters.lock:  # a fault line counts its drops too
                self.counters.tx_dropped += 1
        except OSError as exc:
            if exc.errno not in (errno.EIO, errno.EINVAL):
                raise
            raise BadPacket(f"TAP refused the frame: {exc.strerror}") from exc
        return total

    def _add_pages(self, views: list[bytes | memoryview], slots: list[Slot], extras: int) -> bytes:
        """Check each slot, append the frame's fragments to ``views``, put the rest of its first
        slot in ``views[2]`` (all views of the granted pages), and return a copy of the frame's
        first HEAD_COPY bytes, which those views no longer hold."""
        first, total = slots[0], slots[0][4]
        resolve = self.grants.resolve
        rest = 0
        try:
            for gref, offset, _flags, _id, size in slots[1 + extras :]:
                if size == 0:
                    raise BadPacket("empty fragment")
                if offset + size > N.PAGE_SIZE:
                    raise BadPacket("slot crosses its page")
                views.append(resolve(gref, write=False)[offset : offset + size])
                rest += size
            size = total - rest  # the first slot's own length
            if size < N.ETH_HLEN:
                raise BadPacket(
                    "fragments longer than the packet"
                    if rest > total
                    else "first slot shorter than an Ethernet header"
                )
            if first[1] + size > N.PAGE_SIZE:
                raise BadPacket("slot crosses its page")
            page, start = resolve(first[0], write=False), first[1]
        except GrantError as exc:
            raise BadPacket("bad grant ref") from exc
        end, cut = start + size, start + HEAD_COPY
        if cut <= end:  # the first slot holds the head: copied straight from the page
            views[2] = page[cut:end]
            return page[start:cut].tobytes()
        head = page[start:end].tobytes()  # the whole first slot; the rest of the head follows
        return head + _gather(views, min(HEAD_COPY, total) - size) if rest else head

    @staticmethod
    def _offload(flags: int, slots: list[Slot]) -> N.Offload | None:
        gso_type, gso_size = N.XEN_NETIF_GSO_TYPE_NONE, 0
        for extra in map(N.Extra.from_tx_slot, slots):
            if extra.type == N.XEN_NETIF_EXTRA_TYPE_GSO:
                if not MIN_GSO_SIZE <= extra.gso_size < GSO_BY_FRAGS:
                    raise BadPacket(f"GSO size {extra.gso_size}")
                if extra.gso_type not in (N.XEN_NETIF_GSO_TYPE_TCPV4, N.XEN_NETIF_GSO_TYPE_TCPV6):
                    raise BadPacket("unknown GSO type")
                gso_type, gso_size = extra.gso_type, extra.gso_size
            elif extra.type in (N.XEN_NETIF_EXTRA_TYPE_MCAST_ADD, N.XEN_NETIF_EXTRA_TYPE_MCAST_DEL):
                return None
            elif not N.XEN_NETIF_EXTRA_TYPE_NONE < extra.type < N.XEN_NETIF_EXTRA_TYPE_MAX:
                raise BadPacket("unknown extra type")
        return N.Offload(
            csum_blank=bool(flags & N.NETTXF_csum_blank),
            data_validated=bool(flags & N.NETTXF_data_validated),
            gso_type=gso_type,
            gso_size=gso_size,
        )


def _gather(views: list[bytes | memoryview], length: int) -> bytes:
    """The next ``length`` bytes of ``views[2:]`` (the frame's pages, in order), copied out;
    the views are trimmed so that they hold the rest."""
    parts, index = [], 2
    while length:
        view = views[index]
        taken = min(len(view), length)
        parts.append(view[:taken])
        views[index] = view[taken:]
        length -= taken
        index += 1
    return b"".join(parts)


class RxPath:
    """Host -> frontend: read each frame from the TAP straight into the pages the frontend
    posted, and answer the posted requests in ring order (netfront ignores rx response ids
    and matches responses to its requests by slot)."""

    def __init__(
        self,
        ring: BackRing,
        evtchn: Doorbells,
        grants: GrantMapper,
        tap_fd: int,
        counters: Counters,
        gso: bool,
        on_fatal: Callable[[str], None],
        queue: pumps.QueueLoop | None = None,
    ) -> None:
        self.ring = ring
        self.evtchn = evtchn
        self.grants = grants
        self.tap_fd = tap_fd
        self.counters = counters
        self.gso = gso
        self.on_fatal = on_fatal
        self.stopping = False
        self.waiter = TapWaiter(tap_fd)
        self._held: deque[tuple[int, memoryview]] = deque()  # posted requests: (id, page)
        self._responses: list[int] = []  # flat (id, offset, flags, status) per slot
        self._header = bytearray(VNET_HDR_SIZE)
        self.late_eoi = LateEoi()  # the frontend ringing for no new buffers is slowed down
        self._rung = False
        self._diverted: int | None = None  # a fault line's fd to read from instead of the TAP
        self.native = pumps.NativePump(self.late_eoi, queue=queue, side=pumps.RX)
        self.thread = NamedThread(target=self._run, name="netback-rx", daemon=True)

    def stop(self) -> None:
        self.stopping = True
        self.native.stop()
        self.waiter.interrupt()
        self.late_eoi.stop()
        self.evtchn.kick()

    def divert(self, fd: int) -> None:
        """Read frames from ``fd`` instead of the TAP from now on (a fault line's:
        backends/netback/faults.py); a native pump running hands the ring to this path,
        which switches over as it wakes."""
        self._diverted = fd
        self.native.interrupt()
        self.waiter.interrupt()
        self.evtchn.kick()

    def _run(self) -> None:
        try:
            with _fatal_on_violation("rx", self.on_fatal):
                # A pump interrupted (the vif got faults) leaves the ring to the Python path.
                if self._run_native() and self.stopping:
                    return
                while not self.stopping:
                    if self._diverted is not None and self.waiter.tap_fd != self._diverted:
                        self.tap_fd = self.waiter.tap_fd = self._diverted
                    self._loop_once()
        finally:
            self._held.clear()
            self.waiter.close()

    def _run_native(self) -> bool:
        """Serve the TAP and the ring with the native pump until stopped; False if it does not
        run here. A posted buffer whose grant ref misses comes back here to be resolved (the
        mapper refreshes, and counts a bad ref); the pump then goes on with the new pools."""
        pump = self.native.start_backend(
            N_KIND_RX,
            self.ring,
            self.tap_fd,
            self.evtchn,
            self.counters,
            self.grants,
            gso=self.gso,
        )
        if pump is None:
            return False
        self.native.serve_backend(
            pump, self.ring, self.grants, lambda: self.stopping, ProtocolViolation, self._missed
        )
        # The buffers the pump took off the ring and never filled are the last it took (it
        # answered every one before them): this path takes them again.
        with contextlib.suppress(RingError):
            self.ring.unconsume(pump.held)
        return True

    def _missed(self, result: tuple[int, str, int]) -> None:
        """A posted buffer's grant ref ``result[2]`` is in no pool the pump maps (MISS)."""
        gref = result[2]
        try:
            self.grants.resolve(gref, write=True)
        except GrantError as exc:
            raise ProtocolViolation(f"rx buffer gref {gref}: {exc}") from exc

    NEED = MAX_FRAME_PAGES + 1  # a whole frame's pages, and the slot of its GSO extra

    def _fill(self) -> None:
        """Take posted requests off the ring (in one batch) until a whole frame fits."""
        if len(self._held) >= self.NEED:
            return
        resolve, held = self.grants.resolve, self._held
        for rid, gref in _RX_REQ.iter_unpack(self.ring.get_requests_block(BUDGET)):
            try:
                held.append((rid, resolve(gref, write=True)))
            except GrantError as exc:
                raise ProtocolViolation(f"rx buffer gref {gref}: {exc}") from exc

    def _loop_once(self) -> None:
        held = len(self._held)
        self._fill()
        if len(self._held) < self.NEED:
            if len(self._held) != held:
                self.late_eoi.worked()
            elif self._rung:  # woken for no new buffer
                self.late_eoi.back_off()
            self._rung = not self.ring.final_check_for_requests() and self.late_eoi.woke(
                self.evtchn.wait(HEAL_TIMEOUT)
            )
            return
        self._rung = False
        if not self.waiter.wait():
            return
        frames = 0
        while frames < BUDGET and not self.stopping:
            self._fill()
            if len(self._held) < self.NEED or not self._receive():
                break
            frames += 1
        if self._responses:
            self.ring.put_responses_flat(self._responses)
            self._responses = []
        if frames and self.ring.push_responses():
            self.evtchn.notify()

    def _receive(self) -> bool:
        """Read one frame. Its first page is the first posted buffer; the rest go from the third
        on, leaving the second for a GSO extra, so a GSO frame (the common large one) is never
        moved; a large frame without GSO is moved back one page."""
        held = self._held
        pages = [held[0][1], *(held[i][1] for i in range(2, self.NEED))]
        try:
            n = os.readv(self.tap_fd, [self._header, *pages])
        except BlockingIOError:
            return False
        length = n - VNET_HDR_SIZE
        if length <= 0:
            self.counters.rx_errors += 1
            return True
        used = (length + N.PAGE_SIZE - 1) // N.PAGE_SIZE
        try:
            offload = N.offload_from_vnet(self._header)
        except N.UnsupportedOffload:
            self._dropped()
            return True
        gso = offload.gso_type != N.XEN_NETIF_GSO_TYPE_NONE
        if gso and not self.gso:
            self._dropped()
            return True
        if not gso:
            for i in range(1, used):
                held[i][1][:] = held[i + 1][1]
        self._respond(offload, length, used, gso)
        self.counters.rx_packets += 1
        self.counters.rx_bytes += length
        return True

    def _dropped(self) -> None:
        with self.counters.lock:  # a fault line counts its drops too
            self.counters.rx_dropped += 1

    def _respond(self, offload: N.Offload, length: int, used: int, gso: bool) -> None:
        flags = (N.NETRXF_csum_blank if offload.csum_blank else 0) | (
            N.NETRXF_data_validated if offload.data_validated else 0
        )
        held, out = self._held, self._responses
        first_flags = flags | (N.NETRXF_more_data if used > 1 else 0)
        first_flags |= N.NETRXF_extra_info if gso else 0
        out += (held.popleft()[0], 0, first_flags, min(N.PAGE_SIZE, length))
        if gso:
            held.popleft()
            extra = N.Extra(N.XEN_NETIF_EXTRA_TYPE_GSO, 0, offload.gso_size, offload.gso_type)
            out += N.RX_RING.response.unpack(extra.pack_rx())
        for _ in range(used - 2):
            out += (held.popleft()[0], 0, N.NETRXF_more_data, N.PAGE_SIZE)
        if used > 1:
            out += (held.popleft()[0], 0, 0, length - (used - 1) * N.PAGE_SIZE)

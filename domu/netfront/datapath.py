"""netfront's data path: eth<N> (a TAP in the domain's own netns) to the rings, and back.

The frontend owns two grant pools of pages, granted once to the backend when the vif connects:
tx pages (read-only to the backend) and rx pages (writable). A frame the workload sends is read
from the TAP with one readv straight into free tx pages; a frame from the backend is written to
the TAP with one writev straight out of the rx pages it filled. The backend is not trusted
either (§1.8): responses are copied once, ids must name a request in flight, sizes must fit
their page; anything else marks the vif broken (an ``error`` node, Closing).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from channels import netif as N
from channels import pumps
from channels.errors import ProtocolViolation
from channels.evtchn import Doorbells, LateEoi
from channels.gnttab import GrantPool
from channels.ring import FrontRing, RingError
from channels.threadname import NamedThread
from channels.tun import VNET_HDR_SIZE, TapWaiter

log = logging.getLogger(__name__)

HEAL_TIMEOUT = 10.0
MAX_FRAME_PAGES = 17
BUDGET = 64
_TX_RSP = N.TX_RING.response_slot
_RX_RSP = N.RX_RING.response_slot


class _Path:
    """What netfront's two paths share: the ring, its channel, the pool's pages, the TAP, the
    thread, and the native pump that serves them where it runs."""

    def __init__(
        self,
        name: str,
        ring: FrontRing,
        evtchn: Doorbells,
        pool: GrantPool,
        grefs: list[int],
        tap_fd: int,
        on_broken: Callable[[str], None],
        queue: pumps.QueueLoop | None,
        side: int,
    ) -> None:
        self.ring = ring
        self.evtchn = evtchn
        self.pages = [pool.page(i) for i in range(pool.pages)]
        self.grefs = grefs
        self.tap_fd = tap_fd
        self.on_broken = on_broken
        self.stopping = False
        self.late_eoi = LateEoi()  # a backend ringing for nothing (a storm) is slowed down
        self._region = pool.region()
        self.native = pumps.NativePump(self.late_eoi, queue=queue, side=side)
        self.thread = NamedThread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def _serve_native(self, kind: int, **kw: Any) -> bool:
        """Run the native pump of ``kind`` until stopped; False if the Python path must run."""
        return self.native.serve_frontend(
            kind,
            self.ring,
            self.tap_fd,
            self.evtchn,
            lambda: self.stopping,
            ProtocolViolation,
            pages=self._region,
            grefs=self.grefs,
            **kw,
        )


class TxPath(_Path):
    def __init__(
        self,
        ring: FrontRing,
        evtchn: Doorbells,
        pool: GrantPool,
        grefs: list[int],
        tap_fd: int,
        gso: bool,
        on_broken: Callable[[str], None],
        queue: pumps.QueueLoop | None = None,
    ) -> None:
        super().__init__(
            "netfront-tx", ring, evtchn, pool, grefs, tap_fd, on_broken, queue, pumps.TX
        )
        self.gso = gso
        self.free = list(range(pool.pages))  # a stack: the page freed last is reused first
        self.in_flight = bytearray(pool.pages)  # 1 for each page a tx request still holds
        self.waiter = TapWaiter(tap_fd)
        self._header = bytearray(VNET_HDR_SIZE)

    def stop(self) -> None:
        self.stopping = True
        self.native.stop()
        self.waiter.interrupt()
        self.late_eoi.stop()
        self.evtchn.kick()

    def _run(self) -> None:
        rung = False  # woken by the backend; a wakeup that reaps nothing is slowed down
        try:
            if self._serve_native(pumps.NETFRONT_TX, gso=self.gso):
                return
            while not self.stopping:
                if self._reap():
                    self.late_eoi.worked()
                elif rung:
                    self.late_eoi.back_off()
                rung = False
                if len(self.free) < MAX_FRAME_PAGES + 1 or self.ring.free_requests() < (
                    MAX_FRAME_PAGES + 2
                ):
                    if not self.ring.final_check_for_responses():
                        rung = self.evtchn.wait(HEAL_TIMEOUT)
                    continue
                if not self.waiter.wait():
                    break
                self._send_batch()
        except ProtocolViolation as exc:
            self.on_broken(f"tx: {exc}")
        except RingError:
            pass
        finally:
            self.native.end()
            self.waiter.close()

    def _reap(self) -> bool:
        """Take every tx response; False if there was none."""
        block = self.ring.get_responses_block()
        in_flight, free = self.in_flight, self.free
        for rid, status in _TX_RSP.iter_unpack(block):
            if status == N.NETIF_RSP_NULL:
                continue
            if rid >= len(in_flight) or not in_flight[rid]:
                raise ProtocolViolation(f"tx response for id {rid}, which is not in flight")
            in_flight[rid] = 0
            free.append(rid)
        return bool(block)

    def _send_batch(self) -> None:
        sent = 0
        free, pages = self.free, self.pages
        while (
            sent < BUDGET
            and len(free) > MAX_FRAME_PAGES
            and (self.ring.free_requests() >= MAX_FRAME_PAGES + 2)
        ):
            ids = free[-MAX_FRAME_PAGES:]
            try:
                n = os.readv(self.tap_fd, [self._header, *[pages[i] for i in ids]])
            except BlockingIOError:
                break
            length = n - VNET_HDR_SIZE
            if length <= 0 or length > N.XEN_NETIF_MAX_TX_SIZE:
                continue  # nothing netif can carry (a size is 16 bits)
            try:
                offload = N.offload_from_vnet(self._header)
            except N.UnsupportedOffload:
                continue
            self._post(ids, length, offload)
            sent += 1
        if sent and self.ring.push_requests():
            self.evtchn.notify()

    def _post(self, ids: list[int], length: int, offload: N.Offload) -> None:
        """Queue one frame read into the pages ``ids`` (in order) as tx requests."""
        used = (length + N.PAGE_SIZE - 1) // N.PAGE_SIZE
        gso = offload.gso_type != N.XEN_NETIF_GSO_TYPE_NONE and self.gso
        flags = (N.NETTXF_csum_blank if offload.csum_blank else 0) | (
            N.NETTXF_data_validated if offload.data_validated else 0
        )
        flags |= N.NETTXF_more_data if used > 1 else 0
        grefs = self.grefs
        values = [grefs[ids[0]], 0, flags | (N.NETTXF_extra_info if gso else 0), ids[0], length]
        if gso:
            # An extra overlays a request slot: the same 12 bytes, read as request fields.
            extra = N.Extra(N.XEN_NETIF_EXTRA_TYPE_GSO, 0, offload.gso_size, offload.gso_type)
            values += N.TX_RING.request.unpack(extra.pack_tx())
        for i in ids[1 : used - 1]:
            values += (grefs[i], 0, N.NETTXF_more_data, i, N.PAGE_SIZE)
        if used > 1:
            last = ids[used - 1]
            values += (grefs[last], 0, 0, last, length - (used - 1) * N.PAGE_SIZE)
        self.ring.put_requests_flat(values)
        in_flight = self.in_flight
        for i in ids[:used]:
            in_flight[i] = 1
        del self.free[len(self.free) - len(ids) : len(self.free) - len(ids) + used]


class RxPath(_Path):
    def __init__(
        self,
        ring: FrontRing,
        evtchn: Doorbells,
        pool: GrantPool,
        grefs: list[int],
        tap_fd: int,
        on_broken: Callable[[str], None],
        queue: pumps.QueueLoop | None = None,
    ) -> None:
        super().__init__(
            "netfront-rx", ring, evtchn, pool, grefs, tap_fd, on_broken, queue, pumps.RX
        )
        self.slot_page = [0] * ring.nr_ents  # ring slot -> the page posted in it

    def post_all(self) -> None:
        self._post(list(range(min(len(self.pages), self.ring.nr_ents))))
        if self.ring.push_requests():
            self.evtchn.notify()

    def _post(self, pages: list[int]) -> None:
        mask = self.ring.nr_ents - 1
        prod = self.ring.req_prod_pvt
        slot_page, grefs = self.slot_page, self.grefs
        values: list[int] = []
        for k, page in enumerate(pages):
            slot_page[(prod + k) & mask] = page
            values += (page, grefs[page])
        self.ring.put_requests_flat(values)

    def stop(self) -> None:
        self.stopping = True
        self.native.stop()
        self.late_eoi.stop()
        self.evtchn.kick()

    def _run(self) -> None:
        try:
            if self._serve_native(pumps.NETFRONT_RX, slot_page=self.slot_page):
                return
            self.late_eoi.serve(
                self._receive_batch,
                self.ring.final_check_for_responses,
                self.evtchn.wait,
                lambda: not self.stopping,
                HEAL_TIMEOUT,
            )
        except ProtocolViolation as exc:
            self.on_broken(f"rx: {exc}")
        except RingError:
            pass
        finally:
            self.native.end()

    def _receive_batch(self) -> bool:
        """Copy out every response available (once), deliver the frames they complete, repost
        the pages of every slot consumed (each response sits in its request's slot)."""
        mask = self.ring.nr_ents - 1
        first_slot = self.ring.rsp_cons
        responses = list(_RX_RSP.iter_unpack(self.ring.get_responses_block()))
        if not responses:
            return False
        n = len(responses)
        slot_page = self.slot_page
        pages = [slot_page[(first_slot + i) & mask] for i in range(n)]
        i = 0
        while i < n:
            _rid, offset, flags, status = responses[i]
            chain = [(pages[i], offset, status)]
            i += 1
            gso = N.Offload()
            if flags & N.NETRXF_extra_info:
                if i >= n:
                    raise ProtocolViolation("a packet's extra slot is missing")
                extra = N.Extra.from_rx_slot(responses[i])
                i += 1
                if extra.type == N.XEN_NETIF_EXTRA_TYPE_GSO:
                    gso = N.Offload(gso_type=extra.gso_type, gso_size=extra.gso_size)
            more = flags & N.NETRXF_more_data
            while more:
                if i >= n:
                    raise ProtocolViolation("a packet's response chain is cut short")
                _rid, noffset, nflags, nstatus = responses[i]
                chain.append((pages[i], noffset, nstatus))
                i += 1
                more = nflags & N.NETRXF_more_data
                if len(chain) > MAX_FRAME_PAGES + 1:
                    raise ProtocolViolation("an rx chain longer than any frame")
            self._deliver(chain, flags, gso)
        self._post(pages)
        if self.ring.push_requests():
            self.evtchn.notify()
        return True

    def _deliver(self, chain: list[tuple[int, int, int]], flags: int, gso: N.Offload) -> None:
        views = []
        for page, offset, size in chain:
            if size < 0:
                return  # an error response: the backend dropped the frame
            if offset + size > N.PAGE_SIZE:
                raise ProtocolViolation(f"rx response offset {offset} + size {size} past the page")
            views.append(self.pages[page][offset : offset + size])
        if not views or len(views[0]) < N.ETH_HLEN:
            return
        offload = N.Offload(
            csum_blank=bool(flags & N.NETRXF_csum_blank),
            data_validated=bool(flags & N.NETRXF_data_validated),
            gso_type=gso.gso_type,
            gso_size=gso.gso_size,
        )
        header = N.vnet_from_offload(offload, bytes(views[0][:128]))
        try:
            os.writev(self.tap_fd, [header, *views])
        except OSError as exc:
            log.debug("eth write failed: %s", exc)

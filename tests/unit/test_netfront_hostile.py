"""netfront against a hostile backend, with real rings, grants and doorbells.

The test plays netback: it writes raw responses into netfront's rings and rings its doorbell.
netfront's data path runs as it does in a domain, its "eth0" one end of a SOCK_SEQPACKET pair.
An honest response is delivered; anything a correct backend never writes (an impossible
rsp_prod, an id that is not in flight, sizes past the page, a chain cut short) marks the vif
broken through ``on_broken``, without a crash or a hang. Each test runs with the path under
test alone and beside the queue's other half (over its own ring, pool and doorbells, nobody
answering it), as netfront runs them: with the native pumps one loop serves the two
(channels/pumps.py's QueueLoop).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from channels import netif as N
from channels import pumps
from channels.doorbell import Doorbell, create_doorbell, unlink_doorbell
from channels.evtchn import EventChannel, LateEoi, from_status
from channels.gnttab import GrantPool, pool_bytes
from channels.ring import HEADER_SIZE, PAGE_SIZE, FrontRing, u32_view
from channels.shm import Segment, attach, create_segment, unlink_segment
from channels.tun import VNET_HDR_SIZE
from domu.netfront.datapath import RxPath, TxPath
from tests.unit.backend_hypercalls import Hypercalls, storm
from tests.unit.pumps import both_pumps  # noqa: F401  (runs each test with both)

PAGES = 32
_ids = itertools.count()
FRAME = bytes.fromhex("ffffffffffff 00163e0000bb 0800") + bytes(46)


@dataclass
class Backend:
    """The test's side of one netfront ring: raw slots and the shared indices."""

    area: memoryview
    slot_size: int
    nr_ents: int
    index: memoryview = field(init=False)
    rsp_prod: int = 0
    req_cons: int = 0

    def __post_init__(self) -> None:
        self.index = u32_view(self.area, 0, 4)  # req_prod, req_event, rsp_prod, rsp_event

    def requests(self, fmt: N.struct.Struct) -> list[tuple[int, ...]]:
        out = []
        while self.req_cons != self.index[0]:
            offset = HEADER_SIZE + (self.req_cons % self.nr_ents) * self.slot_size
            out.append(fmt.unpack_from(self.area, offset))
            self.req_cons = (self.req_cons + 1) & 0xFFFFFFFF
        return out

    def respond(self, *slots: bytes) -> None:
        for raw in slots:
            offset = HEADER_SIZE + (self.rsp_prod % self.nr_ents) * self.slot_size
            self.area[offset : offset + self.slot_size] = raw.ljust(self.slot_size, b"\0")
            self.rsp_prod = (self.rsp_prod + 1) & 0xFFFFFFFF
        self.index[2] = self.rsp_prod

    def lie(self, rsp_prod: int) -> None:
        self.index[2] = rsp_prod & 0xFFFFFFFF


@dataclass
class Harness:
    ring: FrontRing
    backend: Backend
    pool: GrantPool
    peer: socket.socket
    doorbell: Doorbell  # netfront's: the one netback rings
    late_eoi: LateEoi | None = None  # the path's
    broken: list[str] = field(default_factory=list)
    broken_event: threading.Event = field(default_factory=threading.Event)

    def on_broken(self, message: str) -> None:
        self.broken.append(message)
        self.broken_event.set()

    def delivered(self, timeout: float = 5.0) -> bytes:
        self.peer.settimeout(timeout)
        return self.peer.recv(70000)


@contextlib.contextmanager
def channel() -> Iterator[tuple[Segment, GrantPool, EventChannel, str]]:
    """A fresh ring page, grant pool and event channel: (segment, pool, channel, netfront's
    doorbell); everything is removed on the way out."""
    tag = f"hyper-test-netfront-{os.getpid()}-{next(_ids)}"
    names = (f"{tag}-ring", f"{tag}-pool", f"{tag}-f", f"{tag}-b")
    create_segment(names[0], PAGE_SIZE)
    create_segment(names[1], pool_bytes(PAGES))
    create_doorbell(names[2])
    create_doorbell(names[3])
    segment = attach(names[0])
    pool = GrantPool.open(names[1], 8, PAGES)
    calls = Hypercalls([(names[1], 8, PAGES)], (names[2], names[3]))
    try:
        yield segment, pool, from_status(calls, 1), names[2]
    finally:
        pool.close()
        segment.close()
        for name in names[:2]:
            unlink_segment(name)
        for name in names[2:]:
            unlink_doorbell(name)


#: (segment, pool, netfront's end of eth0, the workload's end, event channel, netfront's doorbell)
Setup = tuple[Segment, GrantPool, socket.socket, socket.socket, EventChannel, str]


@pytest.fixture
def setup() -> Iterator[Setup]:
    with open_setup() as opened:
        yield opened


@contextlib.contextmanager
def open_setup() -> Iterator[Setup]:
    """The ``setup`` fixture, for a test that makes its own (a hypothesis example each)."""
    with channel() as (segment, pool, evtchn, bell):
        tap, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        tap.setblocking(False)  # as a TAP's fd is: netfront reads until EAGAIN
        yield segment, pool, tap, peer, evtchn, bell
        tap.close()
        peer.close()


@pytest.fixture(params=["paired", "alone"])
def paired(request: pytest.FixtureRequest) -> bool:
    return bool(request.param == "paired")


@contextlib.contextmanager
def other_half(half: type[TxPath | RxPath], tap: socket.socket, paired: bool) -> Iterator[Any]:
    """The QueueLoop for the path under test, with the queue's other half (``half``) already
    serving in it over the same eth0; None when not ``paired``. The other half must not break."""
    if not paired:
        yield None
        return
    loop = pumps.QueueLoop("netfront-q")
    broken: list[str] = []
    with channel() as (segment, pool, evtchn, _):
        partner: TxPath | RxPath
        if half is TxPath:
            ring = FrontRing.init(N.TX_RING, segment.buf)
            grefs = [pool.grant(i, 0, readonly=True) for i in range(PAGES)]
            partner = TxPath(ring, evtchn, pool, grefs, tap.fileno(), False, broken.append, loop)
        else:
            ring = FrontRing.init(N.RX_RING, segment.buf)
            grefs = [pool.grant(i, 0, readonly=False) for i in range(PAGES)]
            partner = RxPath(ring, evtchn, pool, grefs, tap.fileno(), broken.append, loop)
            partner.post_all()
        partner.thread.start()
        try:
            yield loop
        finally:
            partner.stop()
            partner.thread.join(5)
            ring.close()
    assert not partner.thread.is_alive()
    assert not broken


@pytest.fixture
def rx(setup: Setup, paired: bool) -> Iterator[Harness]:
    with open_rx(setup, paired) as harness:
        yield harness


@contextlib.contextmanager
def open_rx(setup: Setup, paired: bool) -> Iterator[Harness]:
    """The ``rx`` fixture, for a test that makes its own."""
    segment, pool, tap, peer, evtchn, bell = setup
    with other_half(TxPath, tap, paired) as loop:
        ring = FrontRing.init(N.RX_RING, segment.buf)
        backend = Backend(segment.buf, N.RX_RING.slot_size, N.RX_RING.nr_ents(PAGE_SIZE))
        grefs = [pool.grant(i, 0, readonly=False) for i in range(PAGES)]
        harness = Harness(ring, backend, pool, peer, Doorbell(bell))
        path = RxPath(ring, evtchn, pool, grefs, tap.fileno(), harness.on_broken, loop)
        harness.late_eoi = path.late_eoi
        path.post_all()
        path.thread.start()
        yield harness
        path.stop()
        path.thread.join(5)
        backend.index.release()
        harness.doorbell.close()
        ring.close()


def rx_response(rid: int, size: int, flags: int = 0, offset: int = 0) -> bytes:
    return N.RX_RING.response.pack(rid, offset, flags, size)


def fill_page(harness: Harness, slot: int, data: bytes) -> None:
    harness.pool.page(slot)[: len(data)] = data


def deliver_a_frame(rx: Harness, requests: list[tuple[int, ...]]) -> bytes:
    """Answer the first posted rx request with FRAME, as an honest netback; what the TAP got."""
    fill_page(rx, 0, FRAME)
    rx.backend.respond(rx_response(requests[0][0], len(FRAME)))
    from_status_kick(rx)
    return rx.delivered()[VNET_HDR_SIZE:]


def test_an_honest_rx_response_is_delivered(rx: Harness) -> None:
    requests = rx.backend.requests(N.RX_RING.request)
    assert len(requests) == PAGES  # every page posted
    assert deliver_a_frame(rx, requests) == FRAME
    assert not rx.broken


def from_status_kick(harness: Harness) -> None:
    """Ring netfront's doorbell (what netback's notify does)."""
    harness.doorbell.ring()


@pytest.mark.parametrize(
    ("what", "responses"),
    [
        ("size past the page", [rx_response(0, 200, offset=4000)]),
        ("chain cut short", [rx_response(0, 4096, flags=N.NETRXF_more_data)]),
        ("extra slot missing", [rx_response(0, 60, flags=N.NETRXF_extra_info)]),
        (
            "chain longer than any frame",
            [rx_response(0, 4096, flags=N.NETRXF_more_data)] * 20 + [rx_response(0, 10)],
        ),
    ],
)
def test_a_hostile_rx_response_breaks_the_vif(
    rx: Harness, what: str, responses: list[bytes]
) -> None:
    rx.backend.requests(N.RX_RING.request)
    rx.backend.respond(*responses)
    from_status_kick(rx)
    assert rx.broken_event.wait(5), f"{what}: the vif must be marked broken"


def test_a_notification_storm_costs_a_few_wakeups_and_frames_still_arrive(rx: Harness) -> None:
    requests = rx.backend.requests(N.RX_RING.request)
    rings = storm(rx.doorbell.ring, 1.0)

    assert rings > 1000
    assert rx.late_eoi is not None
    assert rx.late_eoi.spurious < 64, f"{rx.late_eoi.spurious} wakeups for nothing"
    assert deliver_a_frame(rx, requests) == FRAME
    assert not rx.broken


def test_an_impossible_rsp_prod_breaks_the_vif(rx: Harness) -> None:
    rx.backend.lie(rx.backend.rsp_prod + 5000)
    from_status_kick(rx)
    assert rx.broken_event.wait(5)
    assert "rsp_prod" in rx.broken[0]


def test_an_error_status_drops_the_frame_only(rx: Harness) -> None:
    requests = rx.backend.requests(N.RX_RING.request)
    rx.backend.respond(N.RX_RING.response.pack(requests[0][0], 0, 0, N.NETIF_RSP_ERROR))
    fill_page(rx, 1, FRAME)
    rx.backend.respond(rx_response(requests[1][0], len(FRAME)))
    from_status_kick(rx)
    assert rx.delivered()[VNET_HDR_SIZE:] == FRAME
    assert not rx.broken


@pytest.fixture
def tx(setup: Setup, paired: bool) -> Iterator[Harness]:
    with open_tx(setup, paired) as harness:
        yield harness


@contextlib.contextmanager
def open_tx(setup: Setup, paired: bool) -> Iterator[Harness]:
    """The ``tx`` fixture, for a test that makes its own."""
    segment, pool, tap, peer, evtchn, bell = setup
    with other_half(RxPath, tap, paired) as loop:
        ring = FrontRing.init(N.TX_RING, segment.buf)
        backend = Backend(segment.buf, N.TX_RING.slot_size, N.TX_RING.nr_ents(PAGE_SIZE))
        grefs = [pool.grant(i, 0, readonly=True) for i in range(PAGES)]
        harness = Harness(ring, backend, pool, peer, Doorbell(bell))
        path = TxPath(ring, evtchn, pool, grefs, tap.fileno(), False, harness.on_broken, loop)
        harness.late_eoi = path.late_eoi
        path.thread.start()
        yield harness
        path.stop()
        path.thread.join(5)
        backend.index.release()
        harness.doorbell.close()
        ring.close()


def send_frame(harness: Harness) -> tuple[int, ...]:
    harness.peer.sendall(bytes(VNET_HDR_SIZE) + FRAME)  # the workload sends on eth0
    for _ in range(500):
        requests = harness.backend.requests(N.TX_RING.request)
        if requests:
            return requests[0]
        threading.Event().wait(0.01)
    raise AssertionError("netfront never posted the frame")


@pytest.mark.parametrize("bad_id", [7777, "again"])
def test_a_tx_response_for_a_request_not_in_flight_breaks_the_vif(
    tx: Harness, bad_id: int | str
) -> None:
    request = send_frame(tx)
    assert request[4] == len(FRAME)
    send_frame(tx)  # two in flight: two answers are not more than were asked (impossible rsp_prod)
    rid = request[3]
    if bad_id == "again":  # the right id, twice: the second is not in flight any more
        tx.backend.respond(N.TX_RING.response.pack(rid, 0), N.TX_RING.response.pack(rid, 0))
    else:
        tx.backend.respond(N.TX_RING.response.pack(int(bad_id), 0))
    from_status_kick(tx)
    send_frame_nowait(tx)  # netfront reaps responses before it reads the next frame
    assert tx.broken_event.wait(5)
    assert "not in flight" in tx.broken[0]


def send_frame_nowait(harness: Harness) -> None:
    harness.peer.sendall(bytes(VNET_HDR_SIZE) + FRAME)

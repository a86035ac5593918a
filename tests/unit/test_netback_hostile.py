"""netback's tx path against a hostile frontend, with real rings, grants and doorbells.

The test plays the frontend: it writes raw requests into a real tx ring on shared memory,
grants pages from a real grant pool, and rings a real doorbell. netback's TxPath runs as it does
in dom0, except that its "TAP" is one end of a SOCK_SEQPACKET pair (one message per frame, so
the test sees exactly what would have reached the host) and its hypercalls come from a table.
Each bad request listed in the issue must be answered NETIF_RSP_ERROR and counted, with nothing
transmitted; a protocol violation must end the vif (``on_fatal``) and nothing else. A frame from
an address the vif may not use is dropped and counted; what reaches the TAP is what netback
checked, however the guest rewrites its pages meanwhile. Each queue's RxPath runs beside its
TxPath (over a ring with no buffers posted) and, with the native pumps, one loop serves both
as in dom0 (channels/pumps.py's QueueLoop); the ``vif`` fixture also runs each test with the
TxPath alone, as a vif with a rate runs it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from backends.datapath_worker import ring_figures
from backends.netback.antispoof import SourceFilter
from backends.netback.datapath import COUNTER_FIELDS, Counters, RxPath, TxPath
from channels import netif as N
from channels import pumps
from channels.doorbell import create_doorbell, unlink_doorbell
from channels.evtchn import from_status
from channels.gnttab import GrantPool, pool_bytes
from channels.grants import BAD_GREF_BUDGET, DeviceGrants, GrantMapper
from channels.ring import PAGE_SIZE, RING_FIGURES, BackRing, FrontRing, u32_view
from channels.shm import attach, create_segment, unlink_segment
from tests.unit.backend_hypercalls import Hypercalls, storm
from tests.unit.pumps import both_pumps  # noqa: F401  (runs each test with both)

FRONT = 5
_ids = itertools.count()


@dataclass
class Vif:
    front: FrontRing
    pool: GrantPool
    peer: socket.socket
    tx: TxPath
    counters: Counters
    figures: memoryview  # the tx ring's (channels/ring.py's RING_FIGURES)
    rx: RxPath | None = None  # the queue's other half (paired), its ring with nothing posted
    fatal: list[str] = field(default_factory=list)
    fatal_event: threading.Event = field(default_factory=threading.Event)

    def page(self, index: int, data: bytes) -> int:
        self.pool.page(index)[: len(data)] = data
        return self.pool.gref_base + index

    def send(self, *slots: tuple[int, ...] | bytes) -> None:
        for slot in slots:
            if isinstance(slot, bytes):
                self.front.put_request_raw(slot)
            else:
                self.front.put_request(slot)
        self.front.push_requests()
        self.tx.evtchn.kick()

    def responses(self, count: int, timeout: float = 5.0) -> list[tuple[int, int]]:
        got: list[tuple[int, int]] = []
        deadline = threading.Event()
        for _ in range(int(timeout / 0.01)):
            got += self.front.get_responses()
            if len(got) >= count or deadline.wait(0.01):
                break
        assert len(got) == count, f"wanted {count} responses, got {got}"
        return got

    def transmitted(self) -> list[bytes]:
        frames = []
        while True:
            try:
                frames.append(self.peer.recv(70000, socket.MSG_DONTWAIT))
            except BlockingIOError:
                return frames


FRAME = bytes.fromhex("ffffffffffff 00163e000001 0800") + bytes(range(50))


@pytest.fixture(params=["paired", "alone"])
def vif(request: pytest.FixtureRequest) -> Iterator[Vif]:
    with serving_vif(paired=request.param == "paired") as state:
        yield state


@contextlib.contextmanager
def serving_vif(
    sources: SourceFilter | None = None,
    bad_gref_budget: int = BAD_GREF_BUDGET,
    paired: bool = True,
) -> Iterator[Vif]:
    """netback's TxPath running over a fresh ring, pool and doorbells, checking ``sources`` if
    given, failing past ``bad_gref_budget``, with its RxPath beside it if ``paired``;
    everything is removed on the way out."""
    with serving_queues(1, sources, bad_gref_budget, paired) as [vif]:
        yield vif


@contextlib.contextmanager
def serving_queues(
    queues: int,
    sources: SourceFilter | None = None,
    bad_gref_budget: int = BAD_GREF_BUDGET,
    paired: bool = True,
) -> Iterator[list[Vif]]:
    """A vif of ``queues`` queues, as backends/netback/worker.py runs one: a TxPath per queue over
    its own ring, doorbells and "TAP", counting in its own block of one counter page, and its
    RxPath over a second ring and doorbells if ``paired`` (one QueueLoop for the two); one pool
    and one grant mapper for them all (counting bad refs in the first block)."""
    tag = f"hyper-test-netback-{os.getpid()}-{next(_ids)}"
    pool_name = f"{tag}-pool"
    rings = [f"{tag}-ring{q}" for q in range(queues)] + [f"{tag}-rx{q}" for q in range(queues)]
    bells = [(f"{tag}-b{q}", f"{tag}-f{q}") for q in range(queues)]
    rx_bells = [(f"{tag}-rb{q}", f"{tag}-rf{q}") for q in range(queues)]
    with contextlib.ExitStack() as stack:
        for name in rings:
            create_segment(name, PAGE_SIZE)
            stack.callback(unlink_segment, name)
        create_segment(pool_name, pool_bytes(8))
        stack.callback(unlink_segment, pool_name)
        for bell in (b for pair in bells + rx_bells for b in pair):
            create_doorbell(bell)
            stack.callback(unlink_doorbell, bell)
        pool = GrantPool.open(pool_name, 8, 8)
        stack.callback(pool.close)
        for i in range(8):
            pool.grant(i, 0, readonly=True)
        page = memoryview(bytearray(8 * (len(COUNTER_FIELDS) + 2 * len(RING_FIGURES)) * queues))
        counters = Counters.blocks(page, queues)
        figures = [f.page for f in ring_figures(page, len(COUNTER_FIELDS), queues, 2 * queues)]
        calls = [Hypercalls([(pool_name, 8, 8)], pair) for pair in bells]
        device = DeviceGrants(FRONT, "vif/0", N.MAX_GRANT_PAGES * queues)
        grants = GrantMapper(
            calls[0], device, counters=counters[0], bad_gref_budget=bad_gref_budget
        )
        stack.callback(grants.close)
        vifs = []
        for q in range(queues):
            segment = attach(rings[q])
            stack.callback(segment.close)
            front = FrontRing.init(N.TX_RING, segment.buf)
            back = BackRing.attach(N.TX_RING, segment.buf)
            stack.callback(back.close)
            stack.callback(front.close)
            tap, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            stack.callback(peer.close)
            stack.callback(tap.close)
            state = Vif(front, pool, peer, None, counters[q], figures[2 * q])  # type: ignore[arg-type]

            def on_fatal(message: str, state: Vif = state) -> None:
                state.fatal.append(message)
                state.fatal_event.set()

            evtchn = from_status(calls[q], 1)
            loop = pumps.QueueLoop("netback-q") if paired else None
            state.tx = TxPath(
                back, evtchn, grants, tap.fileno(), counters[q], None, on_fatal, sources, loop
            )
            back.figures = state.tx.late_eoi.figures = figures[2 * q]  # as the worker counts
            if paired:
                rx_segment = attach(rings[queues + q])
                stack.callback(rx_segment.close)
                rx_front = FrontRing.init(N.RX_RING, rx_segment.buf)
                rx_back = BackRing.attach(N.RX_RING, rx_segment.buf)
                stack.callback(rx_back.close)
                stack.callback(rx_front.close)
                rx_calls = Hypercalls([(pool_name, 8, 8)], rx_bells[q])
                rx_evtchn = from_status(rx_calls, 1)
                state.rx = RxPath(
                    rx_back, rx_evtchn, grants, tap.fileno(), counters[q], True, on_fatal, loop
                )
                rx_back.figures = state.rx.late_eoi.figures = figures[2 * q + 1]
            vifs.append(state)
        for state in vifs:
            for path in (state.tx, state.rx):
                if path is not None:
                    path.thread.start()
                    stack.callback(path.thread.join, 5)
                    stack.callback(path.stop)
        yield vifs


def test_a_good_packet_is_transmitted_and_answered_okay(vif: Vif) -> None:
    gref = vif.page(0, FRAME)
    vif.send((gref, 0, 0, 7, len(FRAME)))
    assert vif.responses(1) == [(7, N.NETIF_RSP_OKAY)]
    frames = vif.transmitted()
    assert len(frames) == 1 and frames[0][10:] == FRAME  # after the virtio-net header
    assert (vif.counters.tx_packets, vif.counters.tx_errors) == (1, 0)


def test_a_fragmented_packet_with_a_gso_extra_goes_as_one_frame(vif: Vif) -> None:
    first, second = vif.page(0, FRAME), vif.page(1, b"x" * 100)
    extra = N.Extra(N.XEN_NETIF_EXTRA_TYPE_GSO, 0, 1448, N.XEN_NETIF_GSO_TYPE_TCPV4).pack_tx()
    flags = N.NETTXF_more_data | N.NETTXF_extra_info
    vif.send((first, 0, flags, 1, len(FRAME) + 100), extra, (second, 0, 0, 2, 100))
    assert vif.responses(3) == [(1, 0), (0, N.NETIF_RSP_NULL), (2, 0)]
    assert vif.transmitted()[0][10:] == FRAME + b"x" * 100


def test_the_queues_of_one_vif_share_its_mapper_and_count_apart() -> None:
    """netif multi-queue: each queue's frames go to its own TAP queue and count in its own
    block of the vif's counter page, with the two queues' threads sending at once."""
    with serving_queues(2) as (first, second):
        gref = first.page(0, FRAME)  # one pool for the vif: either queue may name any page
        first.send(*[(gref, 0, 0, i, len(FRAME)) for i in range(3)])
        second.send(*[(gref, 0, 0, i, len(FRAME)) for i in range(5)])
        assert first.responses(3) == [(i, N.NETIF_RSP_OKAY) for i in range(3)]
        assert second.responses(5) == [(i, N.NETIF_RSP_OKAY) for i in range(5)]
        assert (len(first.transmitted()), len(second.transmitted())) == (3, 5)
        assert (first.counters.tx_packets, second.counters.tx_packets) == (3, 5)
        assert first.counters.tx_bytes == 3 * len(FRAME)


def extra_of(type_: int, size: int = 1448, gso_type: int = 1) -> bytes:
    return N.Extra(type_, 0, size, gso_type).pack_tx()


#: A slot: a request's fields (gref, offset, flags, id, size), or an extra's packed bytes.
BAD: dict[str, Callable[[int], Sequence[tuple[int, ...] | bytes]]] = {
    "offset + size past the page": lambda g: [(g, 4000, 0, 1, 200)],
    "first slot shorter than an Ethernet header": lambda g: [(g, 0, 0, 1, 10)],
    "bad grant ref": lambda g: [(9999, 0, 0, 1, 60)],
    "grant ref outside any pool": lambda g: [(3, 0, 0, 1, 60)],
    "unknown extra type": lambda g: [(g, 0, N.NETTXF_extra_info, 1, 60), extra_of(9)],
    "zero GSO size": lambda g: [(g, 0, N.NETTXF_extra_info, 1, 60), extra_of(1, size=0)],
    "GSO size 1": lambda g: [(g, 0, N.NETTXF_extra_info, 1, 60), extra_of(1, size=1)],
    "GSO size under TCP's minimum MSS": lambda g: [
        (g, 0, N.NETTXF_extra_info, 1, 60),
        extra_of(1, size=87),
    ],
    "GSO size GSO_BY_FRAGS": lambda g: [(g, 0, N.NETTXF_extra_info, 1, 60), extra_of(1, 0xFFFF)],
    "unknown GSO type": lambda g: [(g, 0, N.NETTXF_extra_info, 1, 60), extra_of(1, gso_type=7)],
    "fragments longer than the packet": lambda g: [
        (g, 0, N.NETTXF_more_data, 1, 60),
        (g, 0, 0, 2, 100),
    ],
    "an empty fragment": lambda g: [(g, 0, N.NETTXF_more_data, 1, 60), (g, 0, 0, 2, 0)],
    "too many slots": lambda g: (
        [(g, 0, N.NETTXF_more_data, i, 4000) for i in range(18)] + [(g, 0, 0, 18, 100)]
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_each_bad_request_is_refused_and_counted(vif: Vif, case: str) -> None:
    gref = vif.page(0, FRAME)
    slots = BAD[case](gref)
    vif.send(*slots)
    answers = vif.responses(len(slots))
    data_answers = [
        status for (rid, status), s in zip(answers, slots, strict=True) if not isinstance(s, bytes)
    ]
    assert data_answers and set(data_answers) == {N.NETIF_RSP_ERROR}, answers
    assert vif.counters.tx_errors == 1
    assert vif.transmitted() == []
    assert not vif.fatal
    # The vif still works afterwards.
    vif.send((vif.page(1, FRAME), 0, 0, 99, len(FRAME)))
    assert vif.responses(1) == [(99, N.NETIF_RSP_OKAY)]


def test_a_chain_longer_than_any_honest_packet_disconnects_the_vif(vif: Vif) -> None:
    gref = vif.page(0, FRAME)
    vif.send(*[(gref, 0, N.NETTXF_more_data, i, 100) for i in range(25)])
    assert vif.fatal_event.wait(5), "the vif must be disconnected"
    # Said by the tx half, whichever thread ran the queue's loop (QueueLoop raises it there).
    assert vif.fatal[0].startswith("tx: ") and "slots" in vif.fatal[0]


def test_past_its_budget_of_bad_grefs_the_vif_is_disconnected(vif: Vif) -> None:
    """Each gref in no pool costs the worker a round trip to dom0 and hyperd: the first
    BAD_GREF_BUDGET are refused one packet at a time, the next disconnects the vif."""
    for n in range(BAD_GREF_BUDGET):
        vif.send((1000 + n, 0, 0, n, len(FRAME)))
        assert vif.responses(1) == [(n, N.NETIF_RSP_ERROR)]
    assert not vif.fatal
    assert vif.counters.tx_errors == vif.counters.bad_grefs == BAD_GREF_BUDGET
    vif.send((5000, 0, 0, 99, len(FRAME)))
    assert vif.fatal_event.wait(5), "the vif must be disconnected"
    assert "grefs in none of its pools" in vif.fatal[0]


def test_a_grant_violation_mid_batch_answers_the_frames_sent_before_it() -> None:
    """One batch: two good frames, then one in a gref in no pool past the budget of bad grefs
    (0 here: the first is a violation), then another good one. The two before the violation
    were sent: they are answered. The vif is disconnected once, and the frame after it is never
    sent."""
    with serving_vif(bad_gref_budget=0) as vif:
        gref = vif.page(0, FRAME)
        vif.send(*[(gref if n != 3 else 1000, 0, 0, n, len(FRAME)) for n in (1, 2, 3, 4)])
        assert vif.fatal_event.wait(5), "the vif must be disconnected"
        vif.tx.thread.join(5)  # the path has ended: what it answered is on the ring
        assert vif.front.get_responses() == [(1, N.NETIF_RSP_OKAY), (2, N.NETIF_RSP_OKAY)]
        assert [frame[10:] for frame in vif.transmitted()] == [FRAME, FRAME]
        assert len(vif.fatal) == 1 and "grefs in none of its pools" in vif.fatal[0]


def test_an_impossible_req_prod_disconnects_the_vif(vif: Vif) -> None:
    req_prod = u32_view(vif.front._area, 0)
    req_prod[0] = (req_prod[0] + 1000) & 0xFFFFFFFF
    req_prod.release()
    vif.tx.evtchn.kick()
    assert vif.fatal_event.wait(5), "the vif must be disconnected"
    assert vif.transmitted() == []


def test_a_doorbell_storm_on_an_empty_ring_costs_a_few_wakeups(vif: Vif) -> None:
    """XSA-332: spurious wakeups slow the tx path down (late EOI); a real packet still goes."""
    rings = storm(vif.tx.evtchn.kick, 1.0)
    assert rings > 1000
    assert vif.tx.late_eoi.spurious < 64, f"{vif.tx.late_eoi.spurious} wakeups for nothing"
    vif.send((vif.page(0, FRAME), 0, 0, 1, len(FRAME)))
    assert vif.responses(1) == [(1, N.NETIF_RSP_OKAY)]


def thread_names() -> list[str]:
    return [(task / "comm").read_text().strip() for task in Path("/proc/self/task").iterdir()]


def test_with_the_native_pumps_one_thread_serves_a_queue() -> None:
    """The queue's two halves run in one loop (channels/pumps.py's QueueLoop), in a thread
    named for it; the Python reference keeps a thread per half."""
    with serving_vif() as vif:
        vif.send((vif.page(0, FRAME), 0, 0, 1, len(FRAME)))
        assert vif.responses(1) == [(1, N.NETIF_RSP_OKAY)]  # both halves have started
        names = thread_names()
    native = pumps.native() is not None  # as the both_pumps fixture chose
    assert names.count("netback-q") == (1 if native else 0), names
    assert names.count("netback-tx") + names.count("netback-rx") == (1 if native else 2), names


def test_a_storm_on_the_rx_doorbell_costs_a_few_wakeups_and_tx_still_goes() -> None:
    """A frontend ringing its rx doorbell with no buffer posted: late EOI slows the rx half
    down, and the tx half (served by the same loop with the native pumps) still sends."""
    with serving_vif() as vif:
        assert vif.rx is not None
        rings = storm(vif.rx.evtchn.kick, 1.0)
        assert rings > 1000
        assert vif.rx.late_eoi.spurious < 64, f"{vif.rx.late_eoi.spurious} wakeups for nothing"
        vif.send((vif.page(0, FRAME), 0, 0, 1, len(FRAME)))
        assert vif.responses(1) == [(1, N.NETIF_RSP_OKAY)]


# -- what the TAP gets is what netback checked (XSA-155) -----------------------------------------

MAC = "00:16:3e:00:00:01"
TCP_FRAME = (
    bytes.fromhex("ffffffffffff 00163e000001 0800")
    + bytes.fromhex("4500 0046 0000 4000 4006 0000 0a000002 0a000003")  # IPv4, 70 bytes, TCP
    + bytes.fromhex("1f90 0050 00000000 00000000 5018 ffff 0000 0000")  # TCP, 20 bytes
    + b"payload: thirty bytes of data."
)


@pytest.fixture
def rewrite_before_writev(
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[[Callable[[], object]], None]:
    """Run a guest's rewrite of its pages the moment netback hands a frame to the TAP, after
    every check: the widest window a racing guest could hit."""
    real = os.writev

    def arm(rewrite: Callable[[], object]) -> None:
        def writev(fd: int, buffers: list[bytes | memoryview]) -> int:
            rewrite()
            return real(fd, buffers)

        monkeypatch.setattr(os, "writev", writev)

    return arm


def test_the_tap_gets_the_headers_netback_parsed_not_the_guests_rewrite(
    vif: Vif, rewrite_before_writev: Callable[[Callable[[], object]], None]
) -> None:
    """netback made the virtio-net header's checksum offsets from this IPv4 header; a guest that
    then changes the header length and the protocol would have the kernel trust offsets that
    no longer fit the frame."""
    gref = vif.page(0, TCP_FRAME)
    rewritten = bytearray(TCP_FRAME)
    rewritten[14] = 0x4F  # IHL 15: the TCP header would be 40 bytes further on
    rewritten[23] = 17  # UDP
    rewritten[6:12] = bytes.fromhex("00163e0000ee")  # and someone else's MAC
    rewrite_before_writev(lambda: vif.page(0, bytes(rewritten)))
    vif.send((gref, 0, N.NETTXF_csum_blank | N.NETTXF_data_validated, 1, len(TCP_FRAME)))
    assert vif.responses(1) == [(1, N.NETIF_RSP_OKAY)]
    [frame] = vif.transmitted()
    flags, _gso, _hdr_len, _size, csum_start, csum_offset = N.VNET_HDR.unpack_from(frame)
    assert (flags, csum_start, csum_offset) == (N.VIRTIO_NET_HDR_F_NEEDS_CSUM, 34, 16)
    assert frame[N.VNET_HDR.size :] == TCP_FRAME, "the headers netback checked, byte for byte"


def test_a_mac_rewritten_after_the_check_does_not_reach_the_tap(
    rewrite_before_writev: Callable[[Callable[[], object]], None],
) -> None:
    with serving_vif(SourceFilter.from_backend(MAC, "10.0.0.2")) as vif:
        gref = vif.page(0, TCP_FRAME)
        rewrite_before_writev(lambda: vif.page(0, b"\xff" * 6 + bytes.fromhex("00163e0000ee")))
        vif.send((gref, 0, 0, 1, len(TCP_FRAME)))
        assert vif.responses(1) == [(1, N.NETIF_RSP_OKAY)]
        [frame] = vif.transmitted()
        assert frame[N.VNET_HDR.size + 6 : N.VNET_HDR.size + 12] == bytes.fromhex("00163e000001")
        assert vif.counters.tx_spoofed == 0


def test_headers_split_across_slots_are_checked_and_sent_as_checked(
    vif: Vif, rewrite_before_writev: Callable[[Callable[[], object]], None]
) -> None:
    """A frontend may put the Ethernet header alone in the first slot (Linux netfront's linear
    area can be that short): the IP header netback parses is in the next slot."""
    first, second = vif.page(0, TCP_FRAME[:14]), vif.page(1, TCP_FRAME[14:])
    rewrite_before_writev(lambda: vif.page(1, b"\x4f" + bytes(40)))
    flags = N.NETTXF_csum_blank | N.NETTXF_more_data
    vif.send((first, 0, flags, 1, len(TCP_FRAME)), (second, 0, 0, 2, len(TCP_FRAME) - 14))
    assert vif.responses(2) == [(1, N.NETIF_RSP_OKAY), (2, N.NETIF_RSP_OKAY)]
    [frame] = vif.transmitted()
    assert N.VNET_HDR.unpack_from(frame)[4] == 34, "the checksum offsets of the IPv4 header"
    assert frame[N.VNET_HDR.size :] == TCP_FRAME


# -- antispoof: only the vif's own addresses leave ------------------------------------------------

SPOOFS = {  # where in TCP_FRAME, what instead
    "another source MAC": (6, bytes.fromhex("00163e0000ee")),
    "another IPv4 source": (26, bytes([10, 0, 0, 99])),
}


@pytest.mark.parametrize("case", sorted(SPOOFS))
def test_a_spoofed_frame_is_dropped_counted_and_answered_okay(case: str) -> None:
    """Answered OKAY: with Xen a bridge's filter drops the frame after netback has answered."""
    offset, forged = SPOOFS[case]
    spoofed = bytearray(TCP_FRAME)
    spoofed[offset : offset + len(forged)] = forged
    with serving_vif(SourceFilter.from_backend(MAC, "10.0.0.2")) as vif:
        vif.send((vif.page(0, bytes(spoofed)), 0, 0, 1, len(spoofed)))
        assert vif.responses(1) == [(1, N.NETIF_RSP_OKAY)]
        assert vif.transmitted() == []
        assert (vif.counters.tx_spoofed, vif.counters.tx_packets, vif.counters.tx_errors) == (
            1,
            0,
            0,
        )
        vif.send((vif.page(1, TCP_FRAME), 0, 0, 2, len(TCP_FRAME)))
        assert vif.responses(1) == [(2, N.NETIF_RSP_OKAY)]
        assert [f[N.VNET_HDR.size :] for f in vif.transmitted()] == [TCP_FRAME]
        assert (vif.counters.tx_spoofed, vif.counters.tx_packets) == (1, 1)


def test_a_spoofed_address_in_the_second_slot_is_dropped() -> None:
    spoofed = bytearray(TCP_FRAME)
    spoofed[26:30] = bytes([10, 0, 0, 99])
    with serving_vif(SourceFilter.from_backend(MAC, "10.0.0.2")) as vif:
        first, second = vif.page(0, bytes(spoofed[:14])), vif.page(1, bytes(spoofed[14:]))
        vif.send(
            (first, 0, N.NETTXF_more_data, 1, len(spoofed)), (second, 0, 0, 2, len(spoofed) - 14)
        )
        assert vif.responses(2) == [(1, N.NETIF_RSP_OKAY), (2, N.NETIF_RSP_OKAY)]
        assert vif.transmitted() == []
        assert vif.counters.tx_spoofed == 1

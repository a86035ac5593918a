"""The native netif pumps against their Python reference: the same rings, the same answers.

Each property feeds one hostile input (tx slots a frontend wrote, rx responses a backend wrote,
frames a TAP gave) to a fresh data path twice, once with the native pumps
(channels/native/netpump.c) and once with ``HYPER_PUMPS=python``, and requires the same
outcome: the ring's answers, what reached the TAP, the counters, and whether the device was
failed. The hostile-peer tests of each path (test_netback_hostile, test_netfront_hostile) also
run with both; these add arbitrary inputs beyond their hand-made ones.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.netback.antispoof import SourceFilter
from backends.netback.datapath import COUNTER_FIELDS, FATAL_SLOTS
from channels import netif as N
from channels import pumps
from channels.doorbell import DoorbellPair, create_doorbell, unlink_doorbell
from channels.ring import FIG_RESPONSES, RING_FIGURES
from tests.unit import test_netback_hostile as back
from tests.unit import test_netfront_hostile as front

pytestmark = pytest.mark.skipif(pumps.native() is None, reason=pumps.describe())
SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@contextlib.contextmanager
def implementation(name: str) -> Iterator[None]:
    old = os.environ.get(pumps.ENV)
    os.environ[pumps.ENV] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ[pumps.ENV]
        else:
            os.environ[pumps.ENV] = old


def both(run: Any, *args: Any) -> tuple[Any, Any]:
    """``run(*args)`` with the native pumps, then with the Python ones."""
    with implementation("native"):
        native = run(*args)
    with implementation("python"):
        python = run(*args)
    return native, python


def test_the_native_module_speaks_the_same_numbers() -> None:
    module = pumps.native()
    assert module is not None
    for name in ("NETBACK_TX", "NETBACK_RX", "NETFRONT_TX", "NETFRONT_RX"):
        assert getattr(module, name) == getattr(pumps, name)
    for name in ("STOPPED", "FATAL", "FALLBACK", "MISS", "BROKEN", "IOERROR"):
        assert getattr(module, name) == getattr(pumps, name)
    # The pump counts in the counters page by position: netback's first fields, in order.
    assert COUNTER_FIELDS.index("bad_grefs") == module.N_COUNTERS
    # Every pool of a vif with the most queues (three each: domu/netfront/xenbus.py) is one
    # the pump can map; more would send the vif to the Python path.
    assert module.MAX_POOLS >= 3 * N.MAX_QUEUES
    assert len(RING_FIGURES) == module.RING_FIGURES  # pump.h's RF_N


def tx_figures(packets: int) -> dict[str, int]:
    """A ring's figures once netback has answered ``packets`` one-slot packets sent at once."""
    with back.serving_vif(SOURCES) as vif:
        gref = vif.page(0, IPV4 + TCP)
        vif.send(*[(gref, 0, 0, i, len(IPV4 + TCP)) for i in range(packets)])
        assert len(vif.responses(packets)) == packets
        deadline = time.monotonic() + 5  # counted just after the push the frontend saw
        while vif.figures[FIG_RESPONSES] < packets and time.monotonic() < deadline:
            time.sleep(0.01)
        vif.tx.stop()
        vif.tx.thread.join(5)
        return dict(zip(RING_FIGURES, vif.figures.tolist(), strict=True))


def test_the_ring_figures_count_as_python_does() -> None:
    native, python = both(tx_figures, 5)
    for figures in (native, python):
        assert (figures["requests"], figures["responses"]) == (5, 5)
        # The frontend armed rsp_event at 1 (FrontRing.init): the first push rings it.
        assert figures["notify_sent"] >= 1
        # An honest frontend rings for work: nothing for late EOI to slow down (only the
        # wakeup that stops the path may find none).
        assert figures["late_eoi_backoffs"] == 0
    # How each batched its pushes may differ; what they took and answered may not.
    taken = ("requests", "responses")
    assert {f: native[f] for f in taken} == {f: python[f] for f in taken}


# -- netback tx: slots a hostile frontend wrote -------------------------------------------------

SOURCES = SourceFilter.from_backend("00:16:3e:00:00:01", "10.0.0.2")
IPV4 = bytes.fromhex(
    "ffffffffffff 00163e000001 0800 4500 0054 0000 4000 4006 0000 0a000002 0a000001"
)
TCP = bytes.fromhex("0001 0002 00000000 00000000 5010 ffff 0000 0000")
HEADS = [
    IPV4 + TCP,  # what the common case sends
    bytes.fromhex("ffffffffffff 00163e000001 0806 0001 0800 0604 0001 00163e000001 0a000002"),
    bytes.fromhex("ffffffffffff 00163e000001 86dd 6000000000083a40") + bytes(32),  # IPv6
    bytes.fromhex("ffffffffffff 00163e000099 0800") + IPV4[14:],  # another MAC
    IPV4[:26] + bytes.fromhex("0a000063") + IPV4[30:],  # another IPv4 source
    bytes.fromhex("ffffffffffff 00163e000001 8100 0001 0800") + IPV4[14:],  # a VLAN tag
]


def gso_extra(size: int, gso_type: int, more: bool = False) -> tuple[int, ...]:
    flags = N.XEN_NETIF_EXTRA_FLAG_MORE if more else 0
    return N.TX_RING.request.unpack(N.Extra(1, flags, size, gso_type).pack_tx())


grefs = st.one_of(st.integers(8, 15), st.sampled_from([3, 9999]), st.integers(0, 2**32 - 1))
plain_slot = st.tuples(
    grefs,
    st.sampled_from([0, 0, 2, 4000, 4095]) | st.integers(0, 0xFFFF),
    st.integers(0, 15),
    st.integers(0, 0xFFFF),
    st.sampled_from([0, 10, 14, 60, 128, 200, 1500, 4096]) | st.integers(0, 0xFFFF),
)
extra_slot = st.builds(
    gso_extra,
    st.sampled_from([0, 1, 87, 88, 1448, 0xFFFF]),
    st.integers(0, 3),
    st.booleans(),
) | st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 0xFFFF), st.just(0), st.just(0), st.just(0))
slots = st.lists(st.one_of(plain_slot, plain_slot, extra_slot), min_size=1, max_size=40)
pages = st.lists(st.sampled_from(HEADS) | st.binary(max_size=200), min_size=8, max_size=8)


def answered(requests: list[tuple[int, ...]]) -> int:
    """How many slots netback answers: those of whole packets, up to one longer than
    FATAL_SLOTS (TxPath._collect's chaining, with slots as the test wrote them)."""
    done, start, state = 0, 0, "first"
    for k, (gref, _offset, flags, _id, _size) in enumerate(requests):
        if state == "extra":
            if not (gref >> 8) & N.XEN_NETIF_EXTRA_FLAG_MORE:
                more = requests[start][2] & N.NETTXF_more_data
                state = "fragment" if more else "done"
        elif state == "first" and flags & N.NETTXF_extra_info:
            state = "extra"
        else:
            state = "fragment" if flags & N.NETTXF_more_data else "done"
        if state == "done":
            done, start, state = k + 1, k + 1, "first"
        elif k + 1 - start > FATAL_SLOTS:
            return done
    return done


def run_tx(requests: list[tuple[int, ...]], contents: list[bytes]) -> tuple[Any, ...]:
    with back.serving_vif(SOURCES) as vif:
        for i, data in enumerate(contents):
            vif.page(i, data.ljust(N.PAGE_SIZE, b"\xab"))
        vif.send(*requests)
        want = answered(requests)
        got: list[tuple[int, int]] = []
        for _ in range(500):
            got += vif.front.get_responses()
            if len(got) >= want or vif.fatal_event.wait(0.01):
                break
        vif.fatal_event.wait(0.05)  # a violation right after the last answer
        got += vif.front.get_responses()
        return got, vif.transmitted(), vif.counters.as_dict(), bool(vif.fatal)


@SETTINGS
@given(requests=slots, contents=pages)
def test_netback_tx_answers_any_slots_as_python_does(
    requests: list[tuple[int, ...]], contents: list[bytes]
) -> None:
    native, python = both(run_tx, requests, contents)
    assert native == python


@SETTINGS
@given(
    head=st.sampled_from(HEADS),
    fragments=st.lists(st.integers(1, 4096), max_size=17),
    gso=st.sampled_from([None, (1448, 1), (1428, 2)]),
    csum=st.integers(0, 3),
)
def test_netback_tx_sends_honest_frames_as_python_does(
    head: bytes, fragments: list[int], gso: tuple[int, int] | None, csum: int
) -> None:
    """Well-formed packets: every fragment size, GSO or not, checksum flags."""
    first = (8, 0, csum | (N.NETTXF_more_data if fragments else 0), 0, len(head) + sum(fragments))
    requests: list[tuple[int, ...]] = []
    if gso:
        requests = [(first[0], 0, first[2] | N.NETTXF_extra_info, 0, first[4]), gso_extra(*gso)]
    else:
        requests = [first]
    for i, size in enumerate(fragments):
        more = N.NETTXF_more_data if i + 1 < len(fragments) else 0
        requests.append((9 + i % 7, 0, more, i + 1, size))
    contents = [head] + [bytes([i]) * 64 for i in range(1, 8)]
    native, python = both(run_tx, requests, contents)
    assert native == python
    assert native[2]["tx_errors"] == 0 or len(fragments) > 17


# -- netfront rx: responses a hostile backend wrote ---------------------------------------------

rx_slot = st.tuples(
    st.integers(0, 0xFFFF),
    st.sampled_from([0, 0, 10, 4000]) | st.integers(0, 0xFFFF),
    st.integers(0, 15),
    st.sampled_from([60, 1500, 4096, -1, 0, 13]) | st.integers(-0x8000, 0x7FFF),
)


def run_netfront_rx(responses: list[tuple[int, int, int, int]], payload: bytes) -> tuple[Any, ...]:
    with front_rx() as rx:
        for i in range(front.PAGES):
            rx.pool.page(i)[: len(payload)] = payload
        rx.backend.requests(N.RX_RING.request)
        rx.backend.respond(*(N.RX_RING.response.pack(*r) for r in responses))
        front.from_status_kick(rx)
        delivered = []
        rx.peer.settimeout(0.2)
        with contextlib.suppress(TimeoutError):
            while True:
                delivered.append(rx.peer.recv(70000))
        rx.broken_event.wait(0.05)
        reposted = rx.backend.requests(N.RX_RING.request)
        return delivered, bool(rx.broken), reposted


@contextlib.contextmanager
def front_rx() -> Iterator[front.Harness]:
    with contextlib.ExitStack() as stack:
        setup = stack.enter_context(front.open_setup())
        yield stack.enter_context(front.open_rx(setup, paired=True))


@SETTINGS
@given(responses=st.lists(rx_slot, min_size=1, max_size=30), payload=st.sampled_from(HEADS))
def test_netfront_rx_takes_any_responses_as_python_does(
    responses: list[tuple[int, int, int, int]], payload: bytes
) -> None:
    native, python = both(run_netfront_rx, responses, payload)
    assert native == python


# -- netfront tx and netback rx: frames from a TAP ----------------------------------------------

vnet = st.tuples(
    st.integers(0, 3),
    st.sampled_from([0, 1, 4, 3, 0x81]),
    st.integers(0, 200),
    st.sampled_from([0, 1448]),
    st.integers(0, 100),
    st.integers(0, 20),
)
frames = st.lists(
    st.tuples(vnet, st.sampled_from(HEADS), st.integers(0, 70000)), min_size=1, max_size=6
)


def frame_bytes(header: tuple[int, ...], head: bytes, length: int) -> bytes:
    body = (head + bytes(range(256)) * 300)[: max(length, 1)]
    return N.VNET_HDR.pack(*header) + body[:65535]


def run_netfront_tx(items: list[tuple[tuple[int, ...], bytes, int]]) -> tuple[Any, ...]:
    with contextlib.ExitStack() as stack:
        setup = stack.enter_context(front.open_setup())
        tx = stack.enter_context(front.open_tx(setup, paired=True))
        # netfront stops reading eth0 once its pages are all in flight (nobody answers them
        # here), at the same frame with either pump; past that the socket fills, and the test
        # stops sending.
        tx.peer.settimeout(0.5)
        with contextlib.suppress(TimeoutError):
            for header, head, length in items:
                tx.peer.sendall(frame_bytes(header, head, length))
        requests = settled(lambda: tx.backend.requests(N.TX_RING.request))
        data = [bytes(tx.pool.page(r[3] % front.PAGES)[: r[4]]) for r in requests if r[0] >= 8]
        return requests, data, bool(tx.broken)


@SETTINGS
@given(items=frames)
def test_netfront_tx_posts_frames_as_python_does(
    items: list[tuple[tuple[int, ...], bytes, int]],
) -> None:
    native, python = both(run_netfront_tx, items)
    assert native == python


def settled(take: Any) -> list[tuple[int, ...]]:
    """Everything ``take()`` gives until it has given nothing for 0.1 s (at most 5 s): the
    data path is done with what the test sent."""
    got: list[tuple[int, ...]] = []
    quiet = 0
    for _ in range(500):
        more = take()
        got += more
        quiet = 0 if more else quiet + 1
        if quiet >= 10:
            break
        threading.Event().wait(0.01)
    return got


def run_netback_rx(items: list[tuple[tuple[int, ...], bytes, int]], gso: bool) -> tuple[Any, ...]:
    with back_rx(gso) as (vif, ring, posted, peer):
        for header, head, length in items:
            with contextlib.suppress(OSError):
                peer.send(frame_bytes(header, head, length))
        got = settled(ring.get_responses)
        contents = [bytes(vif.pool.page(i)[:64]) for i in range(posted)]
        return got, contents, vif.counters.as_dict(), bool(vif.fatal)


@contextlib.contextmanager
def back_rx(gso: bool) -> Iterator[tuple[Any, Any, int, socket.socket]]:
    """netback's RxPath over a fresh rx ring whose frontend posted every pool page."""
    from backends.netback.datapath import RxPath
    from channels.ring import BackRing, FrontRing

    with back.serving_vif(paired=False) as vif:  # its pool, doorbells, grants; tx idles
        area = bytearray(N.PAGE_SIZE)
        ring_front = FrontRing.init(N.RX_RING, memoryview(area))
        ring_back = BackRing.attach(N.RX_RING, memoryview(area))
        posted = vif.pool.pages
        for i in range(posted):
            vif.pool.grant(i, 0, readonly=False)
        # 64 buffers over the pool's 8 pages (a frame needs 18): frames overwrite each other's
        # pages, in the same order with either pump.
        base = vif.pool.gref_base
        ring_front.put_requests([(i, base + i % posted) for i in range(64)])
        ring_front.push_requests()
        tap, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        tap.setblocking(False)
        bells = (f"hyper-test-rx-{os.getpid()}-b", f"hyper-test-rx-{os.getpid()}-f")
        for bell in bells:
            create_doorbell(bell)
        evtchn = DoorbellPair(*bells)
        rx = RxPath(ring_back, evtchn, vif.tx.grants, tap.fileno(), vif.counters, gso,
                    vif.fatal.append)  # fmt: skip
        rx.thread.start()
        try:
            yield vif, ring_front, posted, peer
        finally:
            rx.stop()
            rx.thread.join(5)
            assert not rx.thread.is_alive()
            evtchn.close()
            for bell in bells:
                unlink_doorbell(bell)
            ring_front.close()
            ring_back.close()
            tap.close()
            peer.close()


@SETTINGS
@given(items=frames, gso=st.booleans())
def test_netback_rx_fills_posted_pages_as_python_does(
    items: list[tuple[tuple[int, ...], bytes, int]], gso: bool
) -> None:
    native, python = both(run_netback_rx, items, gso)
    assert native == python


# -- the Python type: what the review found ----------------------------------------------------


@pytest.mark.parametrize("module_name", [pumps.NETPUMP, pumps.BLKPUMP])
def test_a_pump_that_never_initialised_touches_no_descriptor(module_name: str) -> None:
    module = pumps.native(module_name)
    assert module is not None
    before = os.fstat(0)
    with pytest.raises(TypeError):
        module.Pump("not a kind")
    bare = module.Pump.__new__(module.Pump)
    bare.stop()  # once wrote to fd 0
    del bare
    assert os.fstat(0) == before  # and the failed __init__ once closed it


def test_a_pump_takes_new_pools_for_ever_and_lets_the_old_ones_go() -> None:
    """A bad ref refreshes the mapper, and each refresh hands the pump its pools again: that
    must not run out of room, nor keep a replaced pool's mapping held."""
    module = pumps.native()
    assert module is not None
    tag = f"hyper-test-pools-{os.getpid()}"
    for bell in (f"{tag}-a", f"{tag}-b"):
        create_doorbell(bell)
    try:
        area = bytearray(N.PAGE_SIZE)
        pools = [bytearray(2 * N.PAGE_SIZE) for _ in range(3)]
        pump = module.Pump(
            pumps.NETBACK_TX, area, 12, 256, 0, 0, 0, -1, f"{tag}-a", f"{tag}-b",
            pools=[(pool, 8 + i, 1, N.PAGE_SIZE) for i, pool in enumerate(pools)],
        )  # fmt: skip
        for _ in range(200):
            pump.set_pools([(pool, 8 + i, 1, N.PAGE_SIZE) for i, pool in enumerate(pools)])
        replaced = bytearray(2 * N.PAGE_SIZE)
        pump.set_pools([(replaced, 8, 1, N.PAGE_SIZE)])
        pump.set_pools([])
        replaced.extend(b"x")  # a bytearray cannot grow while a view of it is held
        del pump
    finally:
        for bell in (f"{tag}-a", f"{tag}-b"):
            unlink_doorbell(bell)


def test_a_domain_runs_the_pumps_hyperd_was_told_to(monkeypatch: pytest.MonkeyPatch) -> None:
    """HYPER_PUMPS in hyperd's environment reaches the domUs' frontends (their boot process
    gets nothing else of the host's environment but PATH)."""
    from hyperd.domain import _boot_environment

    monkeypatch.setenv(pumps.ENV, "python")
    monkeypatch.setenv("HYPER_TEST_SECRET", "host only")
    env = _boot_environment()
    assert env[pumps.ENV] == "python"
    assert "HYPER_TEST_SECRET" not in env
    monkeypatch.delenv(pumps.ENV)
    assert pumps.ENV not in _boot_environment()

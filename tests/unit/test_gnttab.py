"""Grant pools: the grantee resolves a gref only as the granter allowed."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from channels import blkif, credit, grants, netif
from channels import hypercall as hc
from channels.errors import ProtocolViolation
from channels.gnttab import GrantError, GrantPool, MappedPool, pool_bytes
from channels.grants import (
    BAD_GREF_BUDGET,
    REFRESH_BURST,
    REFRESHES_PER_SECOND,
    DeviceGrants,
    GrantMapper,
    map_pools,
    open_pools,
)
from channels.ring import PAGE_SIZE
from channels.shm import create_segment, open_segment, unlink_segment
from domu.blkfront import xenbus as blkfront
from domu.netfront import xenbus as netfront

BASE = 8
#: A vbd of domain 5, whose protocol would let it map far more than the granter's budget: the
#: budget binds, unless a test says otherwise.
DEVICE = DeviceGrants(5, "vbd/51712", max_pages=1 << 16)


@pytest.fixture
def pools() -> Iterator[tuple[GrantPool, MappedPool]]:
    name = f"hyper-test-gnt-{os.getpid()}"
    create_segment(name, pool_bytes(4))
    granter = GrantPool.open(name, BASE, 4)
    fd = open_segment(name)
    grantee = MappedPool.from_fd(fd, name, BASE, 4, domid=0)
    os.close(fd)
    yield granter, grantee
    granter.close()
    grantee.close()
    unlink_segment(name)


def test_a_granted_page_is_shared(pools: tuple[GrantPool, MappedPool]) -> None:
    granter, grantee = pools
    gref = granter.grant(2, 0, readonly=False)
    granter.page(2)[:5] = b"hello"
    page = grantee.resolve(gref, write=True)
    assert bytes(page[:5]) == b"hello"
    page[:5] = b"HELLO"
    assert bytes(granter.page(2)[:5]) == b"HELLO"


@pytest.mark.parametrize(
    ("setup", "gref", "write", "reason"),
    [
        (lambda g: None, BASE + 1, False, "not granted"),
        (lambda g: g.grant(1, 7, readonly=False), BASE + 1, False, "domain 7"),
        (lambda g: g.grant(1, 0, readonly=True), BASE + 1, True, "read-only"),
        (lambda g: None, BASE + 4, False, "outside"),
        (lambda g: None, BASE - 1, False, "outside"),
        (
            lambda g: (g.grant(1, 0, readonly=False), g.end_access(BASE + 1)),
            BASE + 1,
            False,
            "not granted",
        ),
    ],
)
def test_bad_grefs_are_refused(
    pools: tuple[GrantPool, MappedPool], setup, gref: int, write: bool, reason: str
) -> None:
    granter, grantee = pools
    setup(granter)
    with pytest.raises(GrantError, match=reason):
        grantee.resolve(gref, write=write)


def test_regrant_hands_every_granted_page_to_the_new_backend_and_keeps_its_kind(
    pools: tuple[GrantPool, MappedPool],
) -> None:
    """The device moved from domain 7 to domain 0 (the mapper's): granted pages follow, read-only
    ones stay read-only, ended ones stay ended."""
    granter, grantee = pools
    writable = granter.grant(0, 7, readonly=False)
    readonly = granter.grant(1, 7, readonly=True)
    ended = granter.grant(2, 7, readonly=False)
    granter.end_access(ended)
    with pytest.raises(GrantError, match="domain 7"):
        grantee.resolve(writable, write=True)

    granter.regrant(0)
    assert len(grantee.resolve(writable, write=True)) == PAGE_SIZE
    with pytest.raises(GrantError, match="read-only"):
        grantee.resolve(readonly, write=True)
    with pytest.raises(GrantError, match="not granted"):
        grantee.resolve(ended, write=False)


def test_a_readonly_grant_can_be_read(pools: tuple[GrantPool, MappedPool]) -> None:
    granter, grantee = pools
    gref = granter.grant(3, 0, readonly=True)
    assert len(grantee.resolve(gref, write=False)) == 4096


def test_the_granter_cannot_grant_outside_its_pool(pools: tuple[GrantPool, MappedPool]) -> None:
    granter, _ = pools
    with pytest.raises(GrantError):
        granter.grant(4, 0, readonly=False)
    with pytest.raises(GrantError):
        granter.grant(0, 0, readonly=False, frame=9)


class NoHypervisor:
    """A hypercall client whose every call fails, as when no hyperd answers."""

    def call(self, op: object) -> dict[str, object]:
        raise AssertionError(f"the data path asked hyperd: {op}")


def test_a_mapper_given_its_pools_resolves_without_a_hypercall(
    pools: tuple[GrantPool, MappedPool],
) -> None:
    granter, _ = pools
    gref = granter.grant(3, 0, readonly=False)
    granter.page(3)[:2] = b"ok"
    pool = {"pool": 0, "name": granter.name, "gref_base": BASE, "pages": 4}
    known = open_pools({"pools": [pool], "max_pages": 4})
    mapper = GrantMapper(NoHypervisor(), DEVICE, known)
    try:
        assert bytes(mapper.resolve(gref, write=True)[:2]) == b"ok"
        with pytest.raises(AssertionError, match="asked hyperd"):
            mapper.resolve(BASE + 4, write=False)  # beyond the known pools: only hyperd knows
    finally:
        mapper.close()


def test_a_mapper_refuses_a_pool_it_cannot_open() -> None:
    missing = {"pool": 0, "name": f"hyper-test-missing-{os.getpid()}", "gref_base": 8, "pages": 1}
    known = open_pools({"pools": [missing], "max_pages": 1})
    with pytest.raises(GrantError, match="pools of vbd/51712 of domain 5"):
        GrantMapper(NoHypervisor(), DEVICE, known)


# -- a mapper against hyperd's word on what is live ----------------------------------------------


class Granter:
    """A granting domain and hyperd's gnttab as a backend's mapper sees them: real pools in
    /dev/shm, set up and released as a frontend would (hyperd unlinks a released pool's name),
    and the gnttab_map_pools answers, counted."""

    def __init__(self, max_pages: int) -> None:
        self.max_pages = max_pages
        self.live: dict[str, tuple[str, GrantPool]] = {}  # name: (device, pool)
        self.names: list[str] = []
        self.next_gref = BASE
        self.refreshes = 0

    def setup(self, pages: int, device: str = DEVICE.name) -> GrantPool:
        name = f"hyper-test-gnt-{os.getpid()}-{len(self.names)}"
        create_segment(name, pool_bytes(pages))
        self.names.append(name)
        pool = GrantPool.open(name, self.next_gref, pages)
        for i in range(pages):
            pool.grant(i, 0, readonly=False)
        self.next_gref += pages
        self.live[name] = (device, pool)
        return pool

    def release(self, pool: GrantPool) -> None:
        del self.live[pool.name]
        unlink_segment(pool.name)
        pool.close()

    def call(self, op: hc.Op) -> dict[str, Any]:
        assert isinstance(op, hc.GnttabMapPools) and op.granter == 5, op
        self.refreshes += 1
        pools = [
            {"pool": i, "name": p.name, "gref_base": p.gref_base, "pages": p.pages}
            for i, (device, p) in enumerate(self.live.values())
            if device == op.device
        ]
        return open_pools({"pools": pools, "max_pages": self.max_pages})  # as dom0 answers

    def close(self) -> None:
        for _, pool in list(self.live.values()):
            self.release(pool)


@pytest.fixture
def granter() -> Iterator[Granter]:
    domain = Granter(max_pages=8)
    yield domain
    domain.close()


@pytest.fixture
def mapper(granter: Granter) -> Iterator[GrantMapper]:
    mapper = GrantMapper(granter, DEVICE, map_pools(granter, 5, DEVICE.name))
    yield mapper
    mapper.close()


def mapped_here(pool: GrantPool) -> bool:
    """Whether this process still maps ``pool``'s segment (its name may be gone already)."""
    maps = Path("/proc/self/maps").read_text()
    return f"/dev/shm/{pool.name}\n" in maps or f"/dev/shm/{pool.name} (deleted)\n" in maps


def test_a_released_pool_is_unmapped_at_the_next_miss(granter: Granter) -> None:
    old = granter.setup(4)
    mapper = GrantMapper(granter, DEVICE, map_pools(granter, 5, DEVICE.name))
    try:
        mapper.resolve(old.gref_base, write=True)[:2] = b"ok"
        granter.release(old)
        assert mapped_here(old), "released, but only a miss tells the backend"
        new = granter.setup(4)
        assert bytes(mapper.resolve(new.gref_base + 3, write=False)[:2]) == bytes(2)
        assert not mapped_here(old) and mapped_here(new)
        with pytest.raises(GrantError):
            mapper.resolve(old.gref_base, write=True)  # no longer usable, even once checked
    finally:
        mapper.close()


def test_what_is_mapped_counts_against_the_budget_not_what_is_live(
    granter: Granter, mapper: GrantMapper
) -> None:
    """A page the data path still holds (a posted rx buffer, a request in flight) keeps its
    pool mapped after the granter released it, and counted: a granter that releases pools
    under its own requests cannot make dom0 map more than its budget of 8 pages."""
    first = granter.setup(4)
    held = mapper.resolve(first.gref_base, write=True)  # the data path holds this page
    granter.release(first)
    second = granter.setup(4)
    mapper.resolve(second.gref_base, write=True)
    assert mapped_here(first) and mapped_here(second)
    held[:2] = b"ok"  # never unmapped under its user
    granter.release(second)
    third = granter.setup(8)  # 8 live pages: within what hyperd lets the granter have
    with pytest.raises(ProtocolViolation, match="budget of 8"):
        mapper.resolve(third.gref_base, write=True)
    assert mapped_here(first) and not mapped_here(second), "unmapped once nothing held it"
    del held
    assert len(mapper.resolve(third.gref_base + 7, write=True)) == 4096
    assert not mapped_here(first) and mapped_here(third)


def test_a_miss_drops_a_released_pool_whatever_its_place_among_the_mapped(
    granter: Granter, mapper: GrantMapper
) -> None:
    """At a tight budget: 4 pages of A and 4 of P1 mapped, P1 released and P2 of 4 set up.
    Resolving a ref of P2 drops P1 and maps P2 (8 pages), however the mapper found that P1 was
    the last pool it mapped."""
    a = granter.setup(4)
    mapper.resolve(a.gref_base, write=True)[:2] = b"ok"
    p1 = granter.setup(4)
    mapper.resolve(p1.gref_base, write=True)[:2] = b"ok"
    granter.release(p1)
    p2 = granter.setup(4)
    assert len(mapper.resolve(p2.gref_base, write=True)) == 4096
    assert not mapped_here(p1)
    assert mapped_here(a) and mapped_here(p2)


def test_the_bad_grefs_of_a_connection_go_to_the_device_counters_and_its_own_budget(
    granter: Granter,
) -> None:
    counters = SimpleNamespace(bad_grefs=0)
    mapper = GrantMapper(granter, DEVICE, counters=counters, bad_gref_budget=2)
    try:
        for n in range(2):
            with pytest.raises(GrantError, match="in no pool"):
                mapper.resolve(1000 + n, write=False)
        assert counters.bad_grefs == 2
        with pytest.raises(ProtocolViolation, match="more than the 2 allowed"):
            mapper.resolve(1002, write=False)
    finally:
        mapper.close()


def test_a_device_maps_no_more_than_its_protocol_can_use(granter: Granter) -> None:
    """A vif's protocol can use 514 pages at once (netif.MAX_GRANT_PAGES): its backend maps
    no more, however large the granter's budget. netfront's pools fill it exactly, and
    blkfront's fit a vbd's."""
    assert 2 + netfront.TX_PAGES + netfront.RX_PAGES == netif.MAX_GRANT_PAGES
    assert 1 + blkfront.DATA_PAGES + blkif.nr_ents(0) <= blkif.MAX_GRANT_PAGES
    granter.max_pages = 1 << 16
    for pages in (2, netfront.TX_PAGES, netfront.RX_PAGES):
        granter.setup(pages, "vif/0")
    vif = DeviceGrants(5, "vif/0", netif.MAX_GRANT_PAGES)
    mapper = GrantMapper(granter, vif, map_pools(granter, 5, "vif/0"))
    try:
        one_more = granter.setup(1, "vif/0")
        with pytest.raises(ProtocolViolation, match="more than the 514 its protocol can use"):
            mapper.resolve(one_more.gref_base, write=False)
    finally:
        mapper.close()


def test_a_pool_named_for_another_device_harms_only_the_granters_own_device(
    granter: Granter,
) -> None:
    """A backend maps its own device's pools and no other: a frontend that names its vbd for
    a pool meant for its vif gets a bad gref on the vif, and has the vbd count the pool against
    what the vbd may map (past it, that vbd fails). Both are the granter's own devices."""
    granter.max_pages = 1 << 16
    vif_pool = granter.setup(256, "vif/0")
    vbd_pool = granter.setup(1024, "vbd/51712")
    vif = GrantMapper(
        granter, DeviceGrants(5, "vif/0", netif.MAX_GRANT_PAGES), map_pools(granter, 5, "vif/0")
    )
    vbd = GrantMapper(
        granter,
        DeviceGrants(5, "vbd/51712", blkif.MAX_GRANT_PAGES),
        map_pools(granter, 5, "vbd/51712"),
    )
    try:
        with pytest.raises(GrantError, match="in no pool of vif/0 of domain 5"):
            vif.resolve(vbd_pool.gref_base, write=False)
        with pytest.raises(GrantError, match="in no pool of vbd/51712 of domain 5"):
            vbd.resolve(vif_pool.gref_base, write=False)
        mislabelled = [granter.setup(4096, "vbd/51712") for _ in range(2)]
        with pytest.raises(GrantError, match="in no pool of vif/0"):
            vif.resolve(mislabelled[0].gref_base, write=False)
        with pytest.raises(ProtocolViolation, match="pools of vbd/51712 of domain 5 would have"):
            vbd.resolve(mislabelled[0].gref_base, write=False)
        assert len(vif.resolve(vif_pool.gref_base + 255, write=False)) == 4096
    finally:
        vif.close()
        vbd.close()


def test_bad_grefs_cost_a_refresh_each_up_to_the_budget_then_fail_the_device(
    granter: Granter,
) -> None:
    pool = granter.setup(4)
    pool.end_access(pool.gref_base + 3)
    mapper = GrantMapper(granter, DEVICE, map_pools(granter, 5, DEVICE.name))
    try:
        start = granter.refreshes
        for _ in range(2 * BAD_GREF_BUDGET):  # refused by the mapped pool itself: no round trip
            with pytest.raises(GrantError, match="not granted"):
                mapper.resolve(pool.gref_base + 3, write=False)
        assert granter.refreshes == start
        for n in range(BAD_GREF_BUDGET):
            with pytest.raises(GrantError, match="in no pool"):
                mapper.resolve(1000 + n, write=False)
            assert len(mapper.resolve(pool.gref_base, write=False)) == 4096  # the rest works
        assert granter.refreshes == start + BAD_GREF_BUDGET, "one round trip per miss"
        with pytest.raises(ProtocolViolation, match=f"more than the {BAD_GREF_BUDGET}"):
            mapper.resolve(1 << 31, write=False)
    finally:
        mapper.close()


class Clock:
    """time for channels.grants and its credit, with sleeps that only move it on."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept += seconds
        self.now += seconds


def test_refreshes_that_resolve_are_paced_and_bad_ones_are_not(
    granter: Granter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A granter that sets up a pool and uses it, over and over, forces a refresh each time:
    past a burst, its device waits for them at a fixed rate."""
    clock = Clock()
    monkeypatch.setattr(credit, "time", clock)
    monkeypatch.setattr(grants, "time", clock)
    granter.max_pages = 1 << 16
    mapper = GrantMapper(granter, DEVICE)
    try:
        for n in range(REFRESH_BURST + 10):
            with pytest.raises(GrantError):
                mapper.resolve(1 << 30, write=False)  # costs the budget, not time
            mapper.resolve(granter.setup(1).gref_base, write=False)
            assert clock.slept == pytest.approx(
                max(0, n + 1 - REFRESH_BURST) / REFRESHES_PER_SECOND
            )
    finally:
        mapper.close()


class Unreachable(Granter):
    """hyperd's answers through a dom0 that may be down (ENOTCONN) or slow to answer."""

    def __init__(self, max_pages: int) -> None:
        super().__init__(max_pages)
        self.down = False
        self.asked = threading.Event()  # a refresh is waiting on an answer
        self.answer = threading.Event()  # set: answer at once
        self.answer.set()

    def call(self, op: hc.Op) -> dict[str, Any]:
        self.asked.set()
        assert self.answer.wait(60), "the test never let dom0 answer"
        if self.down:
            raise hc.HypercallError(op.op, "ENOTCONN", "dom0 is gone")
        return super().call(op)


@pytest.fixture
def unreachable() -> Iterator[Unreachable]:
    domain = Unreachable(max_pages=8)
    yield domain
    domain.answer.set()
    domain.close()


def test_a_refresh_that_fails_is_not_the_granters_bad_gref(
    unreachable: Unreachable, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dom0's link down (or hyperd restarting) fails every refresh: each miss is answered
    GrantError, none is counted, and the device lives on to count the first bad gref once
    the refresh works again."""
    clock = Clock()
    monkeypatch.setattr(credit, "time", clock)
    monkeypatch.setattr(grants, "time", clock)
    pool = unreachable.setup(4)
    mapper = GrantMapper(unreachable, DEVICE)
    try:
        unreachable.down = True
        for _ in range(2 * BAD_GREF_BUDGET):
            with pytest.raises(GrantError, match="dom0 is gone"):
                mapper.resolve(pool.gref_base, write=False)
        assert mapper.bad_grefs == 0
        unreachable.down = False
        assert len(mapper.resolve(pool.gref_base, write=False)) == 4096
        with pytest.raises(GrantError, match="in no pool"):
            mapper.resolve(1 << 30, write=False)
        assert mapper.bad_grefs == 1
    finally:
        mapper.close()


@pytest.mark.parametrize("size", [0, PAGE_SIZE], ids=["emptied", "cut-short"])
def test_a_pool_its_granter_truncated_costs_it_a_bad_gref_per_miss(
    granter: Granter, size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The granter maps its pools read-write, so it can truncate one that hyperd still names
    live: no backend maps it then, and each miss that finds it so is the granter's bad gref,
    up to the budget (a refresh that fails on dom0's side is not: the test above)."""
    clock = Clock()
    monkeypatch.setattr(credit, "time", clock)
    monkeypatch.setattr(grants, "time", clock)
    mapper = GrantMapper(granter, DEVICE, bad_gref_budget=2)
    pool = granter.setup(4)
    os.truncate(f"/dev/shm/{pool.name}", size)
    try:
        for n in (1, 2):
            with pytest.raises(
                GrantError, match=rf"in no pool of {DEVICE} \(shared memory segment"
            ):
                mapper.resolve(pool.gref_base, write=False)
            assert mapper.bad_grefs == n
        with pytest.raises(ProtocolViolation, match="more than the 2 allowed"):
            mapper.resolve(pool.gref_base, write=False)
    finally:
        mapper.close()


def in_thread(target: Callable[[], object]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def outcome(call: Callable[[], object], into: list[object]) -> Callable[[], None]:
    """``call``, its result or exception appended to ``into``: a thread's body."""

    def run() -> None:
        try:
            into.append(call())
        except Exception as exc:
            into.append(exc)

    return run


def closes(mapper: GrantMapper) -> bool:
    """Whether ``mapper.close()``, called from a thread of its own, is done within 10 s."""
    closer = in_thread(mapper.close)
    closer.join(10)
    return not closer.is_alive()


def test_a_refresh_waiting_on_dom0_blocks_neither_mapped_refs_nor_close(
    unreachable: Unreachable,
) -> None:
    """A miss waits up to 10 s on a dom0 that does not answer. Meanwhile the other data-path
    thread resolves refs of the pools already mapped, and the device can be closed."""
    pool = unreachable.setup(4)
    mapper = GrantMapper(unreachable, DEVICE, map_pools(unreachable, 5, DEVICE.name))
    unreachable.answer.clear()
    unreachable.asked.clear()
    missed: list[object] = []
    miss = in_thread(outcome(lambda: mapper.resolve(1 << 30, write=False), missed))
    try:
        assert unreachable.asked.wait(10), "the miss asked dom0"
        assert len(mapper.resolve(pool.gref_base + 1, write=False)) == 4096
        assert closes(mapper), "close() waited for dom0's answer to another thread"
    finally:
        unreachable.answer.set()
        miss.join(10)
        mapper.close()
    assert isinstance(missed[0], GrantError)


class BlockingClock(Clock):
    """A clock whose sleeps last until the test lets them end."""

    def __init__(self) -> None:
        super().__init__()
        self.sleeping = threading.Event()
        self.wake = threading.Event()

    def sleep(self, seconds: float) -> None:
        self.sleeping.set()
        assert self.wake.wait(60), "the test never woke the sleeper"
        super().sleep(seconds)


def test_a_paced_refresh_waits_holding_no_lock(
    granter: Granter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A data-path thread waiting out its refresh's pacing keeps no other thread waiting."""
    clock = BlockingClock()
    monkeypatch.setattr(credit, "time", clock)
    monkeypatch.setattr(grants, "time", clock)
    monkeypatch.setattr(grants, "REFRESH_BURST", 0)  # the first refresh that resolves waits
    mapper = GrantMapper(granter, DEVICE)
    pool = granter.setup(4)
    paced = in_thread(lambda: mapper.resolve(pool.gref_base, write=False))
    try:
        assert clock.sleeping.wait(10), "the refresh was paced"
        assert closes(mapper), "close() waited for another thread's pacing"
    finally:
        clock.wake.set()
        paced.join(10)
        mapper.close()


class WatchedLock:
    """A lock that tells when a thread had to wait for it."""

    def __init__(self, waited: threading.Event) -> None:
        self._lock = threading.Lock()
        self.waited = waited

    def __enter__(self) -> None:
        if not self._lock.acquire(blocking=False):
            self.waited.set()
            self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def test_a_page_checked_while_a_refresh_drops_its_pool_is_not_remembered(
    granter: Granter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """netback's tx and rx threads share one mapper. Thread A checks a ref of P1 while thread
    B's miss refreshes and drops P1 (the granter released it): A's page must not stay
    remembered, or the released pool's ref would go on resolving from memory.

    A stops inside the check until B has either done its refresh or had to wait for A (the
    mapper's lock is watched for that: a mapper that lets B wait has nothing to race)."""
    p1 = granter.setup(4)
    mapper = GrantMapper(granter, DEVICE, map_pools(granter, 5, DEVICE.name))
    checking, go = threading.Event(), threading.Event()
    mapper._lock = WatchedLock(go)  # type: ignore[assignment]
    granter.release(p1)
    p2 = granter.setup(4)
    check = MappedPool.resolve

    def stalled_check(pool: MappedPool, gref: int, *, write: bool) -> memoryview:
        page = check(pool, gref, write=write)
        if gref == p1.gref_base:
            checking.set()
            assert go.wait(10), "B neither refreshed nor waited"
        return page

    monkeypatch.setattr(MappedPool, "resolve", stalled_check)
    pages: list[object] = []
    a = in_thread(outcome(lambda: mapper.resolve(p1.gref_base, write=False), pages))
    try:
        assert checking.wait(10)

        def resolve_then_go() -> None:
            mapper.resolve(p2.gref_base, write=False)
            go.set()

        b = in_thread(outcome(resolve_then_go, []))
        a.join(10)
        b.join(10)
        assert not a.is_alive() and not b.is_alive()
        with pytest.raises(GrantError):
            mapper.resolve(p1.gref_base, write=False)
    finally:
        go.set()
        mapper.close()

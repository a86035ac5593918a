"""Grant pools: the grantee resolves a gref only as the granter allowed."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from channels import credit, grants
from channels import hypercall as hc
from channels.gnttab import GrantError, GrantPool, GrantViolation, MappedPool, pool_bytes
from channels.grants import (
    BAD_GREF_BUDGET,
    REFRESH_BURST,
    REFRESHES_PER_SECOND,
    GrantMapper,
    map_pools,
)
from channels.shm import create_segment, unlink_segment

BASE = 8


@pytest.fixture
def pools() -> Iterator[tuple[GrantPool, MappedPool]]:
    name = f"hyper-test-gnt-{os.getpid()}"
    create_segment(name, pool_bytes(4))
    granter = GrantPool.open(name, BASE, 4)
    grantee = MappedPool.open(name, BASE, 4, domid=0)
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
    mapper = GrantMapper(NoHypervisor(), 5, 0, {"pools": [pool], "max_pages": 4})  # type: ignore[arg-type]
    try:
        assert bytes(mapper.resolve(gref, write=True)[:2]) == b"ok"
        with pytest.raises(AssertionError, match="asked hyperd"):
            mapper.resolve(BASE + 4, write=False)  # beyond the known pools: only hyperd knows
    finally:
        mapper.close()


def test_a_mapper_refuses_a_pool_it_cannot_open() -> None:
    missing = {"pool": 0, "name": f"hyper-test-missing-{os.getpid()}", "gref_base": 8, "pages": 1}
    known = {"pools": [missing], "max_pages": 1}
    with pytest.raises(GrantError, match="pools of domain 5"):
        GrantMapper(NoHypervisor(), granter=5, domid=0, known=known)  # type: ignore[arg-type]


# -- a mapper against hyperd's word on what is live ----------------------------------------------


class Granter:
    """A granting domain and hyperd's gnttab as a backend's mapper sees them: real pools in
    /dev/shm, set up and released as a frontend would (hyperd unlinks a released pool's name),
    and the gnttab_map_pools answers, counted."""

    def __init__(self, max_pages: int) -> None:
        self.max_pages = max_pages
        self.live: dict[str, GrantPool] = {}
        self.names: list[str] = []
        self.next_gref = BASE
        self.refreshes = 0

    def setup(self, pages: int) -> GrantPool:
        name = f"hyper-test-gnt-{os.getpid()}-{len(self.names)}"
        create_segment(name, pool_bytes(pages))
        self.names.append(name)
        pool = GrantPool.open(name, self.next_gref, pages)
        for i in range(pages):
            pool.grant(i, 0, readonly=False)
        self.next_gref += pages
        self.live[name] = pool
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
            for i, p in enumerate(self.live.values())
        ]
        return {"pools": pools, "max_pages": self.max_pages}

    def close(self) -> None:
        for pool in list(self.live.values()):
            self.release(pool)


@pytest.fixture
def granter() -> Iterator[Granter]:
    domain = Granter(max_pages=8)
    yield domain
    domain.close()


@pytest.fixture
def mapper(granter: Granter) -> Iterator[GrantMapper]:
    mapper = GrantMapper(granter, 5, 0, map_pools(granter, 5))  # type: ignore[arg-type]
    yield mapper
    mapper.close()


def mapped_here(pool: GrantPool) -> bool:
    """Whether this process still maps ``pool``'s segment (its name may be gone already)."""
    maps = Path("/proc/self/maps").read_text()
    return f"/dev/shm/{pool.name}\n" in maps or f"/dev/shm/{pool.name} (deleted)\n" in maps


def test_a_released_pool_is_unmapped_at_the_next_miss(granter: Granter) -> None:
    old = granter.setup(4)
    mapper = GrantMapper(granter, 5, 0, map_pools(granter, 5))  # type: ignore[arg-type]
    try:
        mapper.resolve(old.gref_base, write=True)[:2] = b"ok"
        granter.release(old)
        assert mapped_here(old), "released, but only a miss tells the backend"
        new = granter.setup(4)
        assert bytes(mapper.resolve(new.gref_base + 3, write=False)[:2]) == bytes(2)
        assert not mapped_here(old)
        assert mapper.mapped_pages() == 4
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
    assert mapped_here(first) and mapper.mapped_pages() == 8
    held[:2] = b"ok"  # never unmapped under its user
    granter.release(second)
    third = granter.setup(8)  # 8 live pages: within what hyperd lets the granter have
    with pytest.raises(GrantViolation, match="budget of 8"):
        mapper.resolve(third.gref_base, write=True)
    del held
    assert not mapped_here(first)
    assert len(mapper.resolve(third.gref_base + 7, write=True)) == 4096
    assert mapper.mapped_pages() == 8


def test_bad_grefs_cost_a_refresh_each_up_to_the_budget_then_fail_the_device(
    granter: Granter,
) -> None:
    pool = granter.setup(4)
    pool.end_access(pool.gref_base + 3)
    mapper = GrantMapper(granter, 5, 0, map_pools(granter, 5))  # type: ignore[arg-type]
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
        with pytest.raises(GrantViolation, match=f"more than the {BAD_GREF_BUDGET}"):
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
    mapper = GrantMapper(granter, 5, 0)  # type: ignore[arg-type]
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

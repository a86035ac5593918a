"""Grant pools: the grantee resolves a gref only as the granter allowed."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from channels.gnttab import GrantError, GrantPool, MappedPool, pool_bytes
from channels.grants import GrantMapper
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
    known = [{"pool": 0, "name": granter.name, "gref_base": BASE, "pages": 4}]
    mapper = GrantMapper(NoHypervisor(), granter=5, domid=0, known=known)  # type: ignore[arg-type]
    try:
        assert bytes(mapper.resolve(gref, write=True)[:2]) == b"ok"
        with pytest.raises(AssertionError, match="asked hyperd"):
            mapper.resolve(BASE + 4, write=False)  # beyond the known pools: only hyperd knows
    finally:
        mapper.close()


def test_a_mapper_refuses_a_pool_it_cannot_open() -> None:
    known = [{"pool": 0, "name": f"hyper-test-missing-{os.getpid()}", "gref_base": 8, "pages": 1}]
    with pytest.raises(GrantError, match="pools of domain 5"):
        GrantMapper(NoHypervisor(), granter=5, domid=0, known=known)  # type: ignore[arg-type]

"""Faults blkback injects (channels/faults.py) into a running vbd: EIO for the requests that
touch a sector range and only those, failed flushes, cleared again; each counted. Every test
runs with the native pump and with the Python path (``both_pumps``): a native pump running when
faults are set hands the ring to the Python path, which applies them."""

from __future__ import annotations

import pytest

from backends.blkback.datapath import COUNTER_FIELDS
from channels.blkif import (
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    Request,
)
from channels.errors import BadInput
from tests.unit.pumps import both_pumps  # noqa: F401  (runs each test with both)
from tests.unit.test_blkback_hostile import MakeVbd, Vbd, make_vbd, pattern, vbd  # noqa: F401  (the fixtures)

OK, ERR = BLKIF_RSP_OKAY, BLKIF_RSP_ERROR


def status(v: Vbd, op: int, sector: int) -> int:
    """The status of one request of a whole page (8 sectors) at ``sector``."""
    return v.answer(Request.rw(op, 1, sector, [v.full(0)]))[2]


def test_eio_fails_only_the_requests_that_touch_its_sectors_until_cleared(vbd: Vbd) -> None:  # noqa: F811
    assert status(vbd, BLKIF_OP_READ, 16) == OK  # the native pump, if built, is running

    vbd.path.set_faults("eio=100,sectors=16-23")
    image = vbd.sha256()

    assert status(vbd, BLKIF_OP_WRITE, 16) == ERR
    assert status(vbd, BLKIF_OP_READ, 20) == ERR
    assert vbd.sha256() == image, "a failed write reached the image"
    assert status(vbd, BLKIF_OP_READ, 8) == OK  # sectors 8-15: just before
    assert vbd.page(0) == pattern(8, 8)
    assert status(vbd, BLKIF_OP_READ, 24) == OK
    assert (vbd.counters.faults, vbd.counters.errors) == (2, 2)

    vbd.path.set_faults("")
    assert status(vbd, BLKIF_OP_READ, 16) == OK
    assert vbd.page(0) == pattern(16, 8)
    assert vbd.counters.faults == 2


def test_a_failed_flush_fails_alone(make_vbd: MakeVbd) -> None:  # noqa: F811
    v = make_vbd(faults="flush=fail")  # from the start, as a disk's config gives them
    flush = Request.rw(BLKIF_OP_FLUSH_DISKCACHE, 3, 0, [])
    assert v.answer(flush)[2] == ERR
    assert status(v, BLKIF_OP_WRITE, 0) == OK
    assert v.counters.faults == 1


def test_a_seeded_spec_fails_the_same_requests_each_run(make_vbd: MakeVbd) -> None:  # noqa: F811
    runs = []
    for _ in range(2):
        v = make_vbd()
        v.path.set_faults("eio=50,seed=9")
        runs.append([status(v, BLKIF_OP_READ, 8 * (i % 64)) for i in range(40)])
    assert runs[0] == runs[1]
    assert 8 < runs[0].count(ERR) < 32


def test_the_faults_counter_is_the_last_field_of_the_page() -> None:
    assert COUNTER_FIELDS[-1] == "faults"  # the native pump's fields come first, unchanged


def test_a_spec_is_checked_before_it_reaches_the_data_path(vbd: Vbd) -> None:  # noqa: F811
    with pytest.raises(BadInput):
        vbd.path.set_faults("eio=200")
    assert status(vbd, BLKIF_OP_READ, 0) == OK

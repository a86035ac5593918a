"""blkback's trace (`hyperctl trace`): while a sink listens, each request is told as it is taken
off the ring and its response as it is put on, with the sectors the copy of it named; with the
native pump and the Python path (``both_pumps``: a running pump hands the ring over). What a
worker sends is checked by dom0 before anyone sees it (``trace_record``)."""

from __future__ import annotations

from typing import Any

import pytest

from backends.datapath_worker import trace_record
from channels.blkif import BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_RSP_OKAY, Request
from tests.unit.pumps import both_pumps  # noqa: F401  (runs each test with both)
from tests.unit.test_blkback_hostile import Vbd, make_vbd, vbd  # noqa: F401  (the fixtures)


def test_each_request_and_response_is_told_with_its_sectors_while_traced(vbd: Vbd) -> None:  # noqa: F811
    assert vbd.answer(Request.rw(BLKIF_OP_READ, 1, 0, [vbd.full(0)]))[2] == BLKIF_RSP_OKAY
    records: list[dict[str, Any]] = []
    vbd.path.set_trace(records.append)

    vbd.answer(Request.rw(BLKIF_OP_WRITE, 7, 64, [vbd.full(0)]))
    vbd.answer(Request.rw(BLKIF_OP_READ, 8, 128, [vbd.full(1)]))
    vbd.path.set_trace(None)
    vbd.answer(Request.rw(BLKIF_OP_READ, 9, 0, [vbd.full(0)]))

    told = [(r["ev"], r["op"], r["id"], r["sector"], r["count"], r.get("status")) for r in records]
    assert told == [
        ("req", "write", 7, 64, 8, None),
        ("rsp", "write", 7, 64, 8, "ok"),
        ("req", "read", 8, 128, 8, None),
        ("rsp", "read", 8, 128, 8, "ok"),
    ]
    assert all(trace_record(r) == r for r in records), "dom0 would refuse its own worker's"


@pytest.mark.parametrize(
    "sent",
    [
        "not a record",
        {"ev": "rsp", "op": "\x1b[2Jwrite"},  # a terminal escape in a word
        {"ev": "rsp", "sector": "64"},
        {"ev": "rsp", "extra": 1},
        {"ev": "rsp", "id": True},
    ],
)
def test_a_subverted_workers_record_is_dropped(sent: object) -> None:
    assert trace_record(sent) is None

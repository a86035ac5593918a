"""The native blkback pump against its Python reference: the same rings, the same answers.

Each property feeds one batch of blkif requests a frontend wrote (hostile ones: bad
operations, segment counts and sectors, ranges past the end or wrapping a u64, grant refs in no
pool, not granted or read-only, indirect pages that lie; and honest mixes) to a fresh vbd twice,
once with the native pump (channels/native/blkpump.c) and once with ``HYPER_PUMPS=python``, and
requires the same outcome: the answers, the image, the frontend's pages, the counters, and
whether the vbd was failed. test_blkback_hostile also runs whole with both; these add arbitrary
inputs beyond its hand-made ones.

Requests in one batch run concurrently (in any order, with either pump), so each request k
names only its own data pages (8 from k * 8) and its own sectors (512 from k * 512), besides the
hostile refs and sectors every one may name: the outcome is the same whatever the order.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.blkback.datapath import COUNTER_FIELDS
from channels import blkif as B
from channels import pumps
from channels.blkif import Request, Segment
from tests.unit import test_blkback_hostile as hostile
from tests.unit.test_native_pumps import both

pytestmark = pytest.mark.skipif(pumps.native(pumps.BLKPUMP) is None, reason=pumps.describe())
SETTINGS = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
MAX_REQUESTS = 16  # each with 8 data pages and an indirect page of its own
END = hostile.IMAGE_SECTORS
U64_MAX = (1 << 64) - 1
PRIMER = 1 << 40  # the id of the read that maps the pool before the batch


def test_the_native_module_speaks_the_same_numbers() -> None:
    module = pumps.native(pumps.BLKPUMP)
    assert module is not None
    assert module.BLKBACK == pumps.BLKBACK
    for name in ("STOPPED", "FATAL", "FALLBACK", "MISS", "BROKEN"):
        assert getattr(module, name) == getattr(pumps, name)
    # The pump counts in the counters page by position: every field before the mapper's.
    assert COUNTER_FIELDS.index("bad_grefs") == module.N_COUNTERS


# -- what a frontend may write ----------------------------------------------------------------

Drawn = tuple[bytes, list[bytes]]  # a request's slot, and the indirect page it names (if any)
OWN_SECTS = [(0, 7), (0, 7), (3, 7), (0, 0), (2, 5), (1, 6)]
BAD_SECTS = [(0, 8), (5, 4), (7, 255), (0, 255), (8, 8), (255, 255)]
BAD_GREFS = [
    hostile.GREF_BASE + hostile.RO_PAGE,
    hostile.GREF_BASE + hostile.UNGRANTED,
    hostile.NO_POOL,
    hostile.GREF_BASE - 1,
    2**32 - 1,
]
BAD_SECTORS = [END - 4, END, U64_MAX - 3, U64_MAX, 1 << 63]
#: One flaw at most per request, each check's own: None is an honest request.
FLAWS = [None] * 6 + [
    "operation",
    "nr_segments",
    "sects",
    "sector",
    "gref",
    "indirect_op",
    "indirect_count",
    "indirect_page",
    "indirect_page_gref",
    "discard",
    "flush",
]


def own_segments(draw: st.DrawFn, k: int, n: int) -> list[Segment]:
    """n segments over request k's own pages (8 from k * 8)."""
    return [
        Segment(
            hostile.GREF_BASE + k * 8 + draw(st.integers(0, 7)), *draw(st.sampled_from(OWN_SECTS))
        )
        for _ in range(n)
    ]


@st.composite
def request(draw: st.DrawFn, k: int, flaws: list[str | None]) -> Drawn:
    """Request k (its id): READ or WRITE, classic or indirect, with at most one flaw."""
    flaw = draw(st.sampled_from(flaws))
    op = draw(st.sampled_from([B.BLKIF_OP_READ, B.BLKIF_OP_WRITE]))
    start = k * 512 + draw(st.sampled_from([0, 8, 160]))
    if flaw == "sector":
        # Past every honest request's sectors: at the end, past it, or wrapping. One that
        # starts just before the end may still fit when short, so it only reads: two such
        # writes to the same sectors would race, and the image depend on the order.
        start = draw(st.sampled_from(BAD_SECTORS) | st.integers(END - 4, U64_MAX))
        if start < END:
            op = B.BLKIF_OP_READ
    if flaw == "discard":
        return Request.discard(k, start, draw(st.sampled_from([0, 8, 64]))).pack(), []
    if flaw == "flush":
        return Request.rw(B.BLKIF_OP_FLUSH_DISKCACHE, k, start, own_segments(draw, k, 1)).pack(), []
    indirect = draw(st.booleans()) or (flaw is not None and flaw.startswith("indirect"))
    segs = own_segments(draw, k, draw(st.integers(1, 20 if indirect else 11)))
    at = draw(st.integers(0, len(segs) - 1))
    if flaw == "sects":
        segs[at] = Segment(segs[at].gref, *draw(st.sampled_from(BAD_SECTS)))
    if flaw == "gref":
        segs[at] = Segment(draw(st.sampled_from(BAD_GREFS)), 0, 7)
    if not indirect:
        raw = bytearray(Request.rw(op, k, start, segs).pack())
        if flaw == "operation":
            raw[0] = draw(st.sampled_from([2, 4, 7, 9, 255]))
        if flaw == "nr_segments":
            raw[1] = draw(st.sampled_from([0, 12, 255]))
        return bytes(raw), []
    page = hostile.GREF_BASE + hostile.INDIRECT + k
    if flaw == "indirect_page":
        page = draw(st.sampled_from(BAD_GREFS))
    if flaw == "indirect_page_gref":  # a data page (its descriptors are then whatever it holds)
        page = segs[0].gref
    raw = bytearray(Request.indirect(op, k, start, len(segs), [page]).pack())
    if flaw == "indirect_op":
        raw[1] = draw(st.sampled_from([2, 3, 5, 6, 255]))
    if flaw == "indirect_count":
        raw[2:4] = struct.pack("<H", draw(st.sampled_from([0, 257, 512, 513, 0xFFFF])))
    if flaw == "operation":
        raw[0] = draw(st.sampled_from([2, 4, 7, 9, 255]))
    return bytes(raw), B.pack_indirect_frames(segs)


@st.composite
def batches(draw: st.DrawFn, flaws: list[str | None] = FLAWS) -> list[Drawn]:
    return [draw(request(k, flaws)) for k in range(draw(st.integers(1, MAX_REQUESTS)))]


# -- one run ------------------------------------------------------------------------------------


def run(batch: list[Drawn], readonly: bool) -> tuple[Any, ...]:
    """The batch, in one push, to a fresh vbd whose pool is mapped already; what came of it."""
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        vbd = hostile._build(stack, Path(tmp), readonly=readonly)
        for i in range(MAX_REQUESTS * 8):
            vbd.fill(i, bytes([i]) * B.PAGE_SIZE if i >= hostile.MARKED else hostile.mark(i))
        primer = Request.rw(B.BLKIF_OP_READ, PRIMER, END - 8, [vbd.full(MAX_REQUESTS * 8)])
        assert vbd.answer(primer)[2] == B.BLKIF_RSP_OKAY  # maps the pool: no miss below
        for k, (_raw, frames) in enumerate(batch):
            for i, frame in enumerate(frames[:1]):
                vbd.fill(hostile.INDIRECT + k + i, frame)
        vbd.submit(*(raw for raw, _frames in batch))
        got: list[hostile.Response] = []
        pause = vbd.fatal_event
        for _ in range(1000):
            got += vbd.front.get_responses()
            if len(got) >= len(batch) or pause.wait(0.01):
                break
        vbd.path.stop()  # everything it started is done and answered
        got += vbd.front.get_responses()
        pages = hashlib.sha256(b"".join(vbd.page(i) for i in range(MAX_REQUESTS * 8))).hexdigest()
        return sorted(got), vbd.sha256(), pages, vbd.counters.as_dict(), bool(vbd.fatal)


@pytest.mark.parametrize("flaw", [flaw for flaw in FLAWS if flaw])
@settings(SETTINGS, max_examples=10)
@given(data=st.data(), readonly=st.booleans())
def test_blkback_refuses_each_flaw_as_python_does(
    flaw: str, data: st.DataObject, readonly: bool
) -> None:
    """Batches where some requests carry `flaw` (and the others are honest)."""
    batch = data.draw(batches([None, flaw, flaw]))
    native, python = both(run, batch, readonly)
    assert native == python


@SETTINGS
@given(batch=batches(), readonly=st.booleans())
def test_blkback_answers_any_mix_as_python_does(batch: list[Drawn], readonly: bool) -> None:
    native, python = both(run, batch, readonly)
    assert native == python


@SETTINGS
@given(batch=batches([None]))
def test_blkback_moves_honest_requests_as_python_does(batch: list[Drawn]) -> None:
    native, python = both(run, batch, False)
    assert native == python
    answers, *_ = native
    assert [status for _id, _op, status in answers] == [B.BLKIF_RSP_OKAY] * len(answers)
    assert len(answers) == len(batch)


def test_a_whole_ring_of_reads_is_answered_by_id_as_python_does() -> None:
    """32 requests in one push: as many in flight as the vbd allows (io_threads * 4)."""
    batch: list[Drawn] = [
        (Request.rw(B.BLKIF_OP_READ, (1 << 63) + k, k * 200, [Segment(8 + k, 0, 7)]).pack(), [])
        for k in range(32)
    ]
    native, python = both(run, batch, False)
    assert native == python
    assert len(native[0]) == 32

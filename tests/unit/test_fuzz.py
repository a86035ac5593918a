"""Fuzzing the parsers a domU feeds: blkback's requests, netback's tx requests and its source
check, the store's wire.

Each test is a hypothesis property over arbitrary input from a hostile peer, run against the
real code over real rings, grants and doorbells (the same rigs as the hostile-peer unit tests).
Inputs mix raw bytes, well-formed requests and well-formed requests with a few bytes changed,
so that the search reaches deep into each parser as well as its first checks.

In CI each test runs a bounded number of cases (about a minute in all); for a longer run:

    HYPER_FUZZ_EXAMPLES=20000 python3 -m pytest tests/unit/test_fuzz.py \\
        --hypothesis-show-statistics

Any failure hypothesis finds is printed with the smallest input that shows it: add that input
as an ``@example`` below, so it stays a regression test.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from backends.netback.antispoof import SourceFilter
from channels import blkif as B
from channels import netif as N
from channels.errors import ProtocolViolation
from channels.xs_wire import XsType, encode
from tests.unit.test_blkback_hostile import GREF_BASE, IMAGE_SECTORS, POOL_PAGES, Vbd, _build
from tests.unit.test_netback_antispoof import ANY_IP, PASSES, REFUSED, V4, V6
from tests.unit.test_netback_hostile import serving_vif
from tests.unit.test_store_connection import RawPeer
from tests.unit.test_store_connection import store as store
from xenstored import Store


def fuzz(cases_in_ci: int) -> settings:
    """Settings for one fuzz test: ``cases_in_ci`` cases, or HYPER_FUZZ_EXAMPLES."""
    return settings(
        max_examples=int(os.environ.get("HYPER_FUZZ_EXAMPLES", cases_in_ci)),
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


def _mutated(slot: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(slot)
    for index, value in edits:
        out[index % len(out)] = value
    return bytes(out)


def hostile(valid: st.SearchStrategy[bytes], size: int) -> st.SearchStrategy[bytes]:
    """Raw slots of ``size`` bytes, well-formed ones, and well-formed ones with bytes changed."""
    edits = st.lists(st.tuples(st.integers(0, size - 1), st.integers(0, 255)), min_size=1)
    return st.one_of(
        st.binary(min_size=size, max_size=size),
        valid,
        st.builds(_mutated, valid, edits),
    )


# -- blkback ------------------------------------------------------------------------------------

_grefs = st.one_of(
    st.integers(GREF_BASE - 2, GREF_BASE + POOL_PAGES + 2), st.integers(0, 2**32 - 1)
)
_sectors = st.one_of(st.integers(0, IMAGE_SECTORS + 16), st.integers(0, 2**64 - 1))
_segments = st.lists(
    st.builds(B.Segment, _grefs, st.integers(0, 9), st.integers(0, 9)),
    max_size=B.BLKIF_MAX_SEGMENTS_PER_REQUEST,
)
_ops = st.sampled_from(
    [B.BLKIF_OP_READ, B.BLKIF_OP_WRITE, B.BLKIF_OP_FLUSH_DISKCACHE, B.BLKIF_OP_WRITE_BARRIER, 9]
)
_ids = st.integers(0, 2**64 - 1)
_blk_valid = st.one_of(
    st.builds(lambda *a: B.Request.rw(*a).pack(), _ops, _ids, _sectors, _segments),
    st.builds(lambda *a: B.Request.discard(*a).pack(), _ids, _sectors, st.integers(0, 2**32 - 1)),
    st.builds(
        lambda op, rid, sector, count, frames: B.Request.indirect(
            op, rid, sector, count, frames
        ).pack(),
        _ops,
        _ids,
        _sectors,
        st.integers(0, B.MAX_INDIRECT_SEGMENTS + 2),
        st.lists(_grefs, min_size=1, max_size=B.BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST),
    ),
)


@pytest.fixture(scope="module")
def vbd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vbd]:
    """One vbd for every case, as one long-lived backend meets one frontend. Its grant refs in
    no pool are not budgeted: the budget would fail the vbd within a few cases, and every case
    must reach blkback's checks (test_gnttab.py tests the budget)."""
    with contextlib.ExitStack() as stack:
        yield _build(stack, tmp_path_factory.mktemp("fuzz"), bad_gref_budget=sys.maxsize)


@fuzz(900)
@given(batch=st.lists(hostile(_blk_valid, B.SLOT_SIZE), min_size=1, max_size=32))
def test_blkback_answers_every_slot_by_id_and_never_fails(vbd: Vbd, batch: list[bytes]) -> None:
    vbd.submit(*batch)
    responses = vbd.responses(len(batch))
    asked = sorted(B.REQUEST.unpack(slot)[3] for slot in batch)  # the u64 id of any layout
    assert sorted(r[0] for r in responses) == asked
    valid = (B.BLKIF_RSP_OKAY, B.BLKIF_RSP_ERROR, B.BLKIF_RSP_EOPNOTSUPP)
    assert all(r[2] in valid for r in responses)
    assert not vbd.fatal, "no slot content is a protocol violation"


# -- netback ------------------------------------------------------------------------------------

_tx_valid = st.builds(
    lambda *fields: N.TX_RING.request.pack(*fields),
    st.integers(0, 20),  # gref: the rig's pool is 8..15
    st.integers(0, 4200),  # offset
    st.integers(0, 0xF),  # flags: csum_blank, data_validated, more_data, extra_info
    st.integers(0, 0xFFFF),  # id
    st.integers(0, 0xFFFF),  # size
)


@fuzz(400)
@given(slots=st.lists(hostile(_tx_valid, N.TX_RING.request.size), min_size=1, max_size=40))
# Found by this test: a lone slot with more_data is half a packet, which netback leaves on
# the ring until the rest arrives (the property first demanded an answer for it).
@example(slots=[N.TX_RING.request.pack(0, 0, N.NETTXF_more_data, 0, 0)])
def test_netback_answers_within_bounds_or_disconnects_and_never_dies(slots: list[bytes]) -> None:
    """A packet's slots are taken only once the whole chain is on the ring, so a batch may end
    with some unanswered: that is waiting, not a failure. What must hold: every answer is for a
    slot sent, with a known status, and the path either lives or has reported the violation."""
    sent_ids = {N.TX_RING.request.unpack(slot)[3] for slot in slots}
    with serving_vif() as vif:
        vif.send(*slots)
        answered: list[tuple[int, int]] = []
        quiet = threading.Event()
        while len(answered) < len(slots) and not vif.fatal_event.is_set():
            got = vif.front.get_responses()
            if not got:
                quiet.wait(0.05)
                got = vif.front.get_responses()
                if not got:
                    break  # nothing more for 50 ms: the rest waits for a chain's end
            answered += got
        if vif.fatal:
            return  # a protocol violation ends the vif, and only it
        assert vif.tx.thread.is_alive()
        assert len(answered) <= len(slots)
        statuses = (N.NETIF_RSP_OKAY, N.NETIF_RSP_ERROR, N.NETIF_RSP_DROPPED, N.NETIF_RSP_NULL)
        assert all(status in statuses for _, status in answered)
        assert {rid for rid, status in answered if status != N.NETIF_RSP_NULL} <= sent_ids


_frames = [
    *(frame[:128] for _, frame in PASSES.values()),
    *(frame[:128] for _, frame, _ in REFUSED.values()),
]
_heads = st.one_of(
    st.binary(min_size=N.ETH_HLEN, max_size=128),  # netback never checks a shorter head
    st.builds(
        _mutated,
        st.sampled_from(_frames),
        st.lists(st.tuples(st.integers(0, 127), st.integers(0, 255)), min_size=1),
    ),
)


def _only_its_own_sources(head: bytes, sources: SourceFilter) -> bool:
    """What a frame the check lets go must show, read here on its own terms: the vif's MAC and
    no VLAN tag; with an ip, an IPv4 source, ARP sender or IPv6 source that is the vif's own, and
    an IPv6 Neighbor Advertisement for its own address only."""
    if head[6:12] != sources.mac or head[12:14] in (b"\x81\x00", b"\x88\xa8"):
        return False
    if sources.any_address:
        return True
    ethertype = head[12:14]
    if ethertype == b"\x08\x00":
        return head[26:30] == sources.ipv4
    if ethertype == b"\x08\x06":
        return head[22:28] == sources.mac and head[28:32] == sources.ipv4
    if ethertype != b"\x86\xdd":
        return False
    kind, target = _icmpv6(head)
    if kind == 136 and target not in sources.ipv6:
        return False
    if head[22:38] != bytes(16):
        return head[22:38] in sources.ipv6
    # From ::, only duplicate-address detection of its own addresses and MLD reports.
    return (kind == 135 and target in sources.ipv6) or kind in (131, 132, 143)


def _icmpv6(head: bytes) -> tuple[int | None, bytes]:
    """The ICMPv6 type of an IPv6 frame and the 16 bytes of a neighbour message's target, found
    past hop-by-hop, routing and destination-options headers; (None, b"") if it carries none."""
    following, pos = head[20], 54
    while following in (0, 43, 60) and pos + 2 <= len(head):
        following, pos = head[pos], pos + (head[pos + 1] + 1) * 8
    if following != 58 or pos >= len(head):
        return None, b""
    return head[pos], head[pos + 8 : pos + 24]


@fuzz(2000)
@given(head=_heads, sources=st.sampled_from([V4, V6, ANY_IP]))
def test_the_source_check_lets_go_only_frames_from_the_vifs_own_addresses(
    head: bytes, sources: SourceFilter
) -> None:
    refusal = sources.refusal(head, N.frame_layout(head))
    if head[6:12] != sources.mac:
        assert refusal == "source MAC"
    if refusal is None:
        assert _only_its_own_sources(head, sources)


# -- the store's wire ---------------------------------------------------------------------------

_headers = st.builds(
    lambda kind, req, tx, length: (
        encode(XsType(kind), b"", req_id=req, tx_id=tx)[:12] + length.to_bytes(4, "little")
    ),
    st.sampled_from([t.value for t in XsType]),
    st.integers(0, 2**32 - 1),
    st.integers(0, 3),
    st.integers(0, 5000),
)
_chunks = st.lists(st.one_of(st.binary(max_size=80), _headers), max_size=10)


@fuzz(2000)
@given(chunks=_chunks)
def test_the_store_survives_any_bytes_on_a_connection(store: Store, chunks: list[bytes]) -> None:
    hostile_peer = RawPeer(store, 1)
    for chunk in chunks:
        try:
            hostile_peer.conn.feed(chunk)
        except ProtocolViolation:  # the transport's cue to hang up: the store has already
            assert hostile_peer.conn.closed
            break
    hostile_peer.conn.close()
    other = RawPeer(store, 2)
    answer = other.reply(XsType.READ, b"/local/domain/2/data\0")
    assert answer.type is XsType.READ, "another domain's store connection is unaffected"
    other.conn.close()

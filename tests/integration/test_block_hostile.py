"""A hostile blkfront against the real blkback, while a neighbour's fio verifies its own disk.

The test takes over a real domain's vbds (tests/integration/blkhost.py): it pauses the domain
(its blkfront and FUSE servers are frozen, so only the test writes the rings), maps each disk's
ring page, data pages and indirect pages from /dev/shm as root can, writes raw requests and
rings blkback's doorbell. blkback in dom0 sees exactly what a compromised domain kernel could
produce. Every bad request must be answered, by id, with BLKIF_RSP_ERROR (EOPNOTSUPP for an
operation that is not offered) and counted in ``errors``; a good WRITE among them must land; no
bad one may touch the image or the domain's pages; the neighbour's fio must finish with its
data verified; dom0 and hyperd must carry on.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from channels import blkif as B
from tests.integration.blkhost import HostileBlkfront, vbd_stats, with_field
from tests.integration.conftest import BOTH_PUMPS, domain_info, hyperctl, wait_for
from tests.integration.test_block import destroy, disk, verifying_fio

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("data_path_pumps")]
PUMPS = BOTH_PUMPS  # every test on the native pumps, then on the Python reference

MiB = 1 << 20
PAGE = 4096
IMAGE_BYTES = 16 * MiB
SECTORS = IMAGE_BYTES // B.SECTOR_SIZE
U64_MAX = (1 << 64) - 1
ERROR, EOPNOTSUPP, OKAY = B.BLKIF_RSP_ERROR, B.BLKIF_RSP_EOPNOTSUPP, B.BLKIF_RSP_OKAY

# Data pages of the taken-over disks, by job.
GOOD = 0  # pages 0, 1: the one good WRITE
READBACK = 2  # pages 2, 3: a good READ of that range
CHECK = 4  # pages 4..7: a good indirect READ of the pattern
READ_INTO = 10  # every bad READ names this page: it must keep its marker
WRITE_FROM = 11  # every bad WRITE takes its data from here: the marker must never reach disk
READ_MARKER = b"\xee" * PAGE
WRITE_MARKER = b"\xbb" * PAGE
GOOD_SECTOR = 4096  # 2 MiB into the disk
GOOD_BYTES = random.Random(7).randbytes(2 * PAGE)


@functools.cache
def pattern(seed: int) -> bytes:
    return random.Random(seed).randbytes(IMAGE_BYTES)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def first_difference(a: bytes, b: bytes) -> int:
    return next((i for i in range(0, len(a), PAGE) if a[i : i + PAGE] != b[i : i + PAGE]), -1)


def seg(gref: int, first_sect: int = 0, last_sect: int = 7) -> B.Segment:
    return B.Segment(gref, first_sect, last_sect)


def _rw(op: int, sector: int, *grefs: int) -> bytes:
    """A well-formed READ or WRITE of whole pages (id 0, stamped when sent)."""
    return B.Request.rw(op, 0, sector, [seg(g) for g in grefs]).pack()


@dataclass(frozen=True)
class Req:
    """A request slot (its id is stamped when it is sent) and the status due."""

    what: str
    slot: bytes
    status: int = ERROR
    also: int | None = None  # a second right answer, where the spec allows two

    def statuses(self) -> set[int]:
        return {self.status} if self.also is None else {self.status, self.also}


def bad_requests_rw(evil: HostileBlkfront) -> list[Req]:
    """Everything blkback must refuse on a read-write disk of SECTORS sectors."""
    r = evil.data_gref(READ_INTO)
    w = evil.data_gref(WRITE_FROM)
    readonly_page = evil.indirect_gref(31)  # indirect pages are granted read-only
    nowhere = evil.beyond_every_pool()
    READ, WRITE = B.BLKIF_OP_READ, B.BLKIF_OP_WRITE

    def rw(op: int, sector: int, *segments: B.Segment) -> bytes:
        return B.Request.rw(op, 0, sector, segments).pack()

    def indirect(op: int, sector: int, count: int, *grefs: int) -> bytes:
        return B.Request.indirect(op, 0, sector, count, grefs).pack()

    eleven = rw(WRITE, 128, *[seg(w)] * 11)
    ok_frame = evil.indirect_frame(0, [seg(w)] * B.SEGS_PER_INDIRECT_FRAME)
    return [
        Req("READ past the end", rw(READ, SECTORS - 4, seg(r))),
        Req("WRITE past the end", rw(WRITE, SECTORS - 1, seg(w, 0, 1))),
        Req("WRITE whose sector + count wraps a u64", rw(WRITE, U64_MAX - 3, seg(w))),
        Req("READ at sector 2**64 - 1", rw(READ, U64_MAX, seg(r, 0, 0))),
        Req("first_sect > last_sect", rw(WRITE, 64, seg(w, 5, 2))),
        Req("last_sect 8", rw(WRITE, 64, seg(w, 0, 8))),
        Req("first_sect and last_sect 8", rw(READ, 64, seg(r, 8, 8))),
        Req("a good segment, then last_sect 255", rw(WRITE, 64, seg(w), seg(w, 0, 255))),
        Req("READ with zero segments", rw(READ, 0)),
        Req("WRITE with zero segments", rw(WRITE, 0)),
        Req("12 segments in a direct request", with_field(eleven, "<B", 1, 12)),
        Req("255 segments in a direct request", with_field(eleven, "<B", 1, 255)),
        Req("257 indirect segments", indirect(WRITE, 128, 257, ok_frame)),
        Req("65535 indirect segments", indirect(READ, 128, 65535, *[ok_frame] * 8)),
        Req("zero indirect segments", indirect(READ, 128, 0)),
        Req("indirect FLUSH_DISKCACHE", indirect(B.BLKIF_OP_FLUSH_DISKCACHE, 0, 1, ok_frame)),
        Req("unknown operation 9", rw(9, 0, seg(r)), EOPNOTSUPP),
        Req("operation 255", rw(255, 0, seg(r)), EOPNOTSUPP),
        Req("RESERVED_1", rw(B.BLKIF_OP_RESERVED_1, 0, seg(r)), EOPNOTSUPP),
        Req("WRITE_BARRIER, not offered", rw(B.BLKIF_OP_WRITE_BARRIER, 0, seg(w)), EOPNOTSUPP),
        Req("gref beyond every pool", rw(READ, 0, seg(nowhere))),
        Req("gref 0 (reserved)", rw(WRITE, 0, seg(0))),
        Req("a good segment, then a bad gref", rw(WRITE, 256, seg(w), seg(0xFFFFFFFF))),
        Req("READ into a page granted read-only", rw(READ, 0, seg(readonly_page))),
        Req("indirect page gref beyond every pool", indirect(READ, 0, 1, nowhere)),
        Req(
            "indirect descriptor with a bad gref",
            indirect(WRITE, 0, 2, evil.indirect_frame(1, [seg(w), seg(nowhere)])),
        ),
        Req(
            "indirect descriptor with last_sect 8",
            indirect(WRITE, 0, 1, evil.indirect_frame(2, [seg(w, 0, 8)])),
        ),
        Req(
            "indirect READ into a page granted read-only",
            indirect(READ, 0, 1, evil.indirect_frame(3, [seg(readonly_page)])),
        ),
        Req("DISCARD past the end", B.Request.discard(0, SECTORS - 8, 16).pack()),
        Req("DISCARD wrapping a u64", B.Request.discard(0, 8, U64_MAX).pack()),
        Req("DISCARD of zero sectors", B.Request.discard(0, 8, 0).pack()),
        Req("secure DISCARD, not offered", B.Request.discard(0, 0, 8, True).pack(), EOPNOTSUPP),
    ]


def bad_requests_ro(evil: HostileBlkfront) -> list[Req]:
    """What blkback must refuse on a read-only disk, however well-formed."""
    w = evil.data_gref(WRITE_FROM)
    frame = evil.indirect_frame(0, [seg(w)])
    return [
        Req("WRITE to a read-only disk", B.Request.rw(B.BLKIF_OP_WRITE, 0, 0, [seg(w)]).pack()),
        Req(
            "indirect WRITE to a read-only disk",
            B.Request.indirect(B.BLKIF_OP_WRITE, 0, 0, 1, [frame]).pack(),
        ),
        Req(
            "FLUSH_DISKCACHE on a read-only disk",
            B.Request.rw(B.BLKIF_OP_FLUSH_DISKCACHE, 0, 0, []).pack(),
        ),
        # Linux answers ERROR (the write check); channels/blkif.py also allows EOPNOTSUPP,
        # since a read-only vbd does not offer feature-discard.
        Req("DISCARD on a read-only disk", B.Request.discard(0, 0, 8).pack(), ERROR, EOPNOTSUPP),
    ]


class Sender:
    """Sends requests with fresh ids and checks each answer, matched by id."""

    def __init__(self, evil: HostileBlkfront) -> None:
        self.evil = evil
        self.next_id = 0x5EED_0000_0000_0001  # ids are opaque u64: use all of them

    def _stamp(self, slot: bytes) -> tuple[int, bytes]:
        rid, self.next_id = self.next_id, self.next_id + 1
        return rid, with_field(slot, "<Q", 8, rid)  # id sits at offset 8 in every layout

    def batch(self, requests: list[Req]) -> None:
        """Publish `requests` in one go; each must get its own answer."""
        stamped = [(req, *self._stamp(req.slot)) for req in requests]
        self.evil.send(*(slot for _, _, slot in stamped))
        answers = self.evil.responses(len(stamped))
        for req, rid, slot in stamped:
            op = slot[1] if slot[0] == B.BLKIF_OP_INDIRECT else slot[0]  # Linux echoes indirect_op
            right = {(op, status) for status in req.statuses()}
            assert answers.get(rid) in right, f"{self.evil.vdev}: {req.what}: {answers}"

    def one(self, req: Req) -> None:
        self.batch([req])


@pytest.fixture
def takeover() -> Iterator[Callable[[str, int, str], HostileBlkfront]]:
    """Take over vbds of a paused domain; every mapping is dropped afterwards."""
    taken: list[HostileBlkfront] = []

    def take(domain: str, domid: int, vdev: str) -> HostileBlkfront:
        evil = HostileBlkfront(domain, domid, vdev)
        taken.append(evil)
        return evil

    yield take
    for evil in taken:
        evil.close()


@dataclass(frozen=True)
class Victim:
    name: str
    domid: int
    rw_image: Path  # xvda, read-write, filled with pattern(1)
    ro_image: Path  # xvdb, read-only, filled with pattern(2)


@pytest.fixture
def victim(make_domain: Callable[..., str], tmp_path: Path) -> Victim:
    """A domain with two disks whose images hold known patterns before it starts."""
    rw_image, ro_image = tmp_path / "victim.img", tmp_path / "victim-ro.img"
    rw_image.write_bytes(pattern(1))
    ro_image.write_bytes(pattern(2))
    name = make_domain(
        "disk:\n" + disk(rw_image, size="16M") + disk(ro_image, "xvdb", size=None, access="ro")
    )
    info = domain_info(name)
    assert info is not None
    return Victim(name, info["domid"], rw_image, ro_image)


@pytest.fixture
def neighbour(
    victim: Victim, make_domain: Callable[..., str], tmp_path: Path
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """A domain with its own disk running a verifying fio for 20 s, already doing I/O (made
    after the victim, so that the attack overlaps the run)."""
    name = make_domain("disk:\n" + disk(tmp_path / "neighbour.img", size="64M"))
    fio = verifying_fio(name)
    try:
        wait_for(lambda: vbd_stats(name, "xvda")["wr_req"], 30, "the neighbour's fio to write")
        yield name, fio
    finally:
        if fio.poll() is None:
            fio.kill()
        fio.communicate()


def test_hostile_blkfront_is_refused_while_a_neighbour_verifies(
    victim: Victim,
    neighbour: tuple[str, subprocess.Popen[str]],
    takeover: Callable[[str, int, str], HostileBlkfront],
) -> None:
    name, fio = neighbour
    hyperctl("pause", victim.name)
    evil = takeover(victim.name, victim.domid, "xvda")
    evil_ro = takeover(victim.name, victim.domid, "xvdb")
    evil.fill_data(READ_INTO, READ_MARKER)
    evil.fill_data(WRITE_FROM, WRITE_MARKER)
    evil_ro.fill_data(WRITE_FROM, WRITE_MARKER)
    bad = bad_requests_rw(evil)
    bad_ro = bad_requests_ro(evil_ro)
    send, send_ro = Sender(evil), Sender(evil_ro)

    # One at a time, with the good requests in the middle: the vbd still works after bad ones.
    half = len(bad) // 2
    for b in bad[:half]:
        send.one(b)
    good = evil.fill_data(GOOD, GOOD_BYTES)
    send.one(Req("the good WRITE", _rw(B.BLKIF_OP_WRITE, GOOD_SECTOR, good, good + 1), OKAY))
    back = evil.data_gref(READBACK)
    send.one(Req("READ of the good WRITE", _rw(B.BLKIF_OP_READ, GOOD_SECTOR, back, back + 1), OKAY))
    assert evil.read_data(READBACK, 2 * PAGE) == GOOD_BYTES
    for b in bad[half:]:
        send.one(b)
    for b in bad_ro:
        send_ro.one(b)

    # All of them again, many per notification (two batches: the ring holds 32), with a good
    # indirect READ among them.
    check_grefs = [evil.data_gref(CHECK + i) for i in range(4)]
    frame = evil.indirect_frame(4, [seg(g) for g in check_grefs])
    indirect_read = B.Request.indirect(B.BLKIF_OP_READ, 0, 8192, 4, [frame]).pack()
    batch = [*bad]
    batch.insert(half // 2, Req("good indirect READ", indirect_read, OKAY))
    send.batch(batch[: half + 1])
    send.batch(batch[half + 1 :])
    assert evil.read_data(CHECK, 4 * PAGE) == pattern(1)[8192 * 512 :][: 4 * PAGE]
    send_ro.batch(bad_ro)
    ro_read = evil_ro.data_gref(READBACK)
    send_ro.one(Req("READ of the read-only disk", _rw(B.BLKIF_OP_READ, 0, ro_read), OKAY))
    assert evil_ro.read_data(READBACK, PAGE) == pattern(2)[:PAGE]

    assert evil.read_data(READ_INTO, PAGE) == READ_MARKER, "a refused READ wrote a page"
    rw_stats, ro_stats = vbd_stats(victim.name, "xvda"), vbd_stats(victim.name, "xvdb")
    assert rw_stats["errors"] == 2 * len(bad), rw_stats
    assert rw_stats["wr_req"] == 1 and rw_stats["wr_sect"] == 16, rw_stats
    assert ro_stats["errors"] == 2 * len(bad_ro), ro_stats
    assert ro_stats["wr_req"] == 0, ro_stats

    # dom0, hyperd and the neighbour carry on; the victim's own disks may be broken now.
    hyperctl("unpause", victim.name)
    running = {d["name"]: d["status"] for d in json.loads(hyperctl("list", "--json").out)}
    assert running.get(name) == "running", running
    out, err = fio.communicate(timeout=120)
    assert fio.returncode == 0, err
    assert "verify" not in err.lower(), err
    job = json.loads(out[out.index("{") :])["jobs"][0]
    assert job["error"] == 0, job
    assert job["read"]["io_bytes"] > 0 and job["write"]["io_bytes"] > 0
    assert vbd_stats(name, "xvda")["errors"] == 0

    destroy(victim.name, victim.rw_image)
    image = victim.rw_image.read_bytes()
    good_range = slice(GOOD_SECTOR * 512, GOOD_SECTOR * 512 + len(GOOD_BYTES))
    assert image[good_range] == GOOD_BYTES
    expected = pattern(1)
    untouched = image[: good_range.start] + expected[good_range] + image[good_range.stop :]
    assert sha256(untouched) == sha256(expected), (
        f"the image changed at byte {first_difference(untouched, expected)}"
    )
    assert sha256(victim.ro_image.read_bytes()) == sha256(pattern(2)), "the read-only image changed"
    assert hyperctl("list").status == 0

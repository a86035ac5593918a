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

import hashlib
import json
import os
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from channels import blkif as B
from tests.integration.blkhost import HostileBlkfront, vbd_stats, with_field
from tests.integration.conftest import REPO, domain_info, hyperctl, wait_for
from tests.integration.test_block import destroy, disk

pytestmark = pytest.mark.root

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


def pattern(seed: int) -> bytes:
    return random.Random(seed).randbytes(IMAGE_BYTES)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def first_difference(a: bytes, b: bytes) -> int:
    return next((i for i in range(0, len(a), PAGE) if a[i : i + PAGE] != b[i : i + PAGE]), -1)


def seg(gref: int, first_sect: int = 0, last_sect: int = 7) -> B.Segment:
    return B.Segment(gref, first_sect, last_sect)


@dataclass(frozen=True)
class Bad:
    """One hostile request slot (its id is filled in when it is sent) and the answer due."""

    what: str
    slot: bytes
    status: int = ERROR


def bad_requests_rw(evil: HostileBlkfront) -> list[Bad]:
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
        Bad("READ past the end", rw(READ, SECTORS - 4, seg(r))),
        Bad("WRITE past the end", rw(WRITE, SECTORS - 1, seg(w, 0, 1))),
        Bad("WRITE whose sector + count wraps a u64", rw(WRITE, U64_MAX - 3, seg(w))),
        Bad("READ at sector 2**64 - 1", rw(READ, U64_MAX, seg(r, 0, 0))),
        Bad("first_sect > last_sect", rw(WRITE, 64, seg(w, 5, 2))),
        Bad("last_sect 8", rw(WRITE, 64, seg(w, 0, 8))),
        Bad("first_sect and last_sect 8", rw(READ, 64, seg(r, 8, 8))),
        Bad("a good segment, then last_sect 255", rw(WRITE, 64, seg(w), seg(w, 0, 255))),
        Bad("READ with zero segments", rw(READ, 0)),
        Bad("WRITE with zero segments", rw(WRITE, 0)),
        Bad("12 segments in a direct request", with_field(eleven, "<B", 1, 12)),
        Bad("255 segments in a direct request", with_field(eleven, "<B", 1, 255)),
        Bad("257 indirect segments", indirect(WRITE, 128, 257, ok_frame)),
        Bad("65535 indirect segments", indirect(READ, 128, 65535, *[ok_frame] * 8)),
        Bad("zero indirect segments", indirect(READ, 128, 0)),
        Bad("indirect FLUSH_DISKCACHE", indirect(B.BLKIF_OP_FLUSH_DISKCACHE, 0, 1, ok_frame)),
        Bad("unknown operation 9", rw(9, 0, seg(r)), EOPNOTSUPP),
        Bad("operation 255", rw(255, 0, seg(r)), EOPNOTSUPP),
        Bad("RESERVED_1", rw(B.BLKIF_OP_RESERVED_1, 0, seg(r)), EOPNOTSUPP),
        Bad("WRITE_BARRIER, not offered", rw(B.BLKIF_OP_WRITE_BARRIER, 0, seg(w)), EOPNOTSUPP),
        Bad("gref beyond every pool", rw(READ, 0, seg(nowhere))),
        Bad("gref 0 (reserved)", rw(WRITE, 0, seg(0))),
        Bad("a good segment, then a bad gref", rw(WRITE, 256, seg(w), seg(0xFFFFFFFF))),
        Bad("READ into a page granted read-only", rw(READ, 0, seg(readonly_page))),
        Bad("indirect page gref beyond every pool", indirect(READ, 0, 1, nowhere)),
        Bad(
            "indirect descriptor with a bad gref",
            indirect(WRITE, 0, 2, evil.indirect_frame(1, [seg(w), seg(nowhere)])),
        ),
        Bad(
            "indirect descriptor with last_sect 8",
            indirect(WRITE, 0, 1, evil.indirect_frame(2, [seg(w, 0, 8)])),
        ),
        Bad(
            "indirect READ into a page granted read-only",
            indirect(READ, 0, 1, evil.indirect_frame(3, [seg(readonly_page)])),
        ),
        Bad("DISCARD past the end", B.Request.discard(0, SECTORS - 8, 16).pack()),
        Bad("DISCARD wrapping a u64", B.Request.discard(0, 8, U64_MAX).pack()),
        Bad("DISCARD of zero sectors", B.Request.discard(0, 8, 0).pack()),
        Bad("secure DISCARD, not offered", B.Request.discard(0, 0, 8, True).pack(), EOPNOTSUPP),
    ]


def bad_requests_ro(evil: HostileBlkfront) -> list[Bad]:
    """What blkback must refuse on a read-only disk, however well-formed."""
    w = evil.data_gref(WRITE_FROM)
    frame = evil.indirect_frame(0, [seg(w)])
    return [
        Bad("WRITE to a read-only disk", B.Request.rw(B.BLKIF_OP_WRITE, 0, 0, [seg(w)]).pack()),
        Bad(
            "indirect WRITE to a read-only disk",
            B.Request.indirect(B.BLKIF_OP_WRITE, 0, 0, 1, [frame]).pack(),
        ),
        Bad(
            "FLUSH_DISKCACHE on a read-only disk",
            B.Request.rw(B.BLKIF_OP_FLUSH_DISKCACHE, 0, 0, []).pack(),
        ),
    ]


class Sender:
    """Sends requests with fresh ids and checks each answer, matched by id."""

    def __init__(self, evil: HostileBlkfront) -> None:
        self.evil = evil
        self.next_id = 0x5EED_0000_0000_0001  # ids are opaque u64: use all of them

    def _stamp(self, slot: bytes) -> tuple[int, bytes]:
        rid, self.next_id = self.next_id, self.next_id + 1
        return rid, with_field(slot, "<Q", 8, rid)  # id sits at offset 8 in every layout

    def batch(self, requests: list[tuple[str, bytes, int]]) -> None:
        """Publish (what, slot, status) requests in one go; each must get its answer."""
        stamped = [(what, *self._stamp(slot), status) for what, slot, status in requests]
        self.evil.send(*(slot for _, _, slot, _ in stamped))
        answers = self.evil.responses(len(stamped))
        for what, rid, slot, status in stamped:
            op = slot[1] if slot[0] == B.BLKIF_OP_INDIRECT else slot[0]  # Linux echoes indirect_op
            assert answers.get(rid) == (op, status), f"{self.evil.vdev}: {what}: {answers}"

    def one(self, what: str, slot: bytes, status: int) -> None:
        self.batch([(what, slot, status)])


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


@pytest.fixture
def neighbour(
    make_domain: Callable[..., str], tmp_path: Path
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """A domain with its own disk running a verifying fio for 20 s, already doing I/O."""
    name = make_domain("disk:\n" + disk(tmp_path / "neighbour.img", size="64M"))
    fio = subprocess.Popen(
        [sys.executable, "-m", "hyper.cli", "exec", name, "--", "fio", "--name=n"]
        + ["--filename=/dev/xvda", "--rw=randrw", "--bs=4k", "--iodepth=16"]
        + ["--ioengine=libaio", "--direct=1", "--size=32M", "--verify=crc32c"]
        + ["--time_based", "--runtime=20", "--output-format=json"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: vbd_stats(name, "xvda")["wr_req"], 30, "the neighbour's fio to write")
        yield name, fio
    finally:
        if fio.poll() is None:
            fio.kill()
        fio.communicate()


def test_hostile_blkfront_is_refused_while_a_neighbour_verifies(
    make_domain: Callable[..., str],
    tmp_path: Path,
    takeover: Callable[[str, int, str], HostileBlkfront],
) -> None:
    rw_image, ro_image = tmp_path / "victim.img", tmp_path / "victim-ro.img"
    rw_image.write_bytes(pattern(1))
    ro_image.write_bytes(pattern(2))
    victim = make_domain(
        "disk:\n" + disk(rw_image, size="16M") + disk(ro_image, "xvdb", size=None, access="ro")
    )
    info = domain_info(victim)
    assert info is not None
    # Requested late so that fio is writing while the victim attacks.
    neighbour, fio = _neighbour_fixture()

    hyperctl("pause", victim)
    evil = takeover(victim, info["domid"], "xvda")
    evil_ro = takeover(victim, info["domid"], "xvdb")
    evil.fill_data(READ_INTO, READ_MARKER)
    evil.fill_data(WRITE_FROM, WRITE_MARKER)
    evil_ro.fill_data(WRITE_FROM, WRITE_MARKER)
    bad = bad_requests_rw(evil)
    bad_ro = bad_requests_ro(evil_ro)
    send, send_ro = Sender(evil), Sender(evil_ro)

    # One at a time, with the good requests in the middle: the vbd still works after bad ones.
    half = len(bad) // 2
    for b in bad[:half]:
        send.one(b.what, b.slot, b.status)
    good = evil.fill_data(GOOD, GOOD_BYTES)
    send.one("the good WRITE", _rw(B.BLKIF_OP_WRITE, GOOD_SECTOR, good, good + 1), OKAY)
    readback = evil.data_gref(READBACK)
    send.one("READ of the good WRITE", _rw(B.BLKIF_OP_READ, GOOD_SECTOR, readback, readback + 1), OKAY)
    assert evil.read_data(READBACK, 2 * PAGE) == GOOD_BYTES
    for b in bad[half:]:
        send.one(b.what, b.slot, b.status)
    for b in bad_ro:
        send_ro.one(b.what, b.slot, b.status)

    # All of them again in one batch, with a good indirect READ among them.
    check_grefs = [evil.data_gref(CHECK + i) for i in range(4)]
    frame = evil.indirect_frame(4, [seg(g) for g in check_grefs])
    indirect_read = B.Request.indirect(B.BLKIF_OP_READ, 0, 8192, 4, [frame]).pack()
    batch = [(b.what, b.slot, b.status) for b in bad]
    batch.insert(half, ("good indirect READ", indirect_read, OKAY))
    send.batch(batch)
    assert evil.read_data(CHECK, 4 * PAGE) == pattern(1)[8192 * 512 :][: 4 * PAGE]
    send_ro.batch([(b.what, b.slot, b.status) for b in bad_ro])
    ro_read = evil_ro.data_gref(READBACK)
    send_ro.one("READ of the read-only disk", _rw(B.BLKIF_OP_READ, 0, ro_read), OKAY)
    assert evil_ro.read_data(READBACK, PAGE) == pattern(2)[:PAGE]

    assert evil.read_data(READ_INTO, PAGE) == READ_MARKER, "a refused READ wrote a page"
    rw_stats, ro_stats = vbd_stats(victim, "xvda"), vbd_stats(victim, "xvdb")
    assert rw_stats["errors"] == 2 * len(bad), rw_stats
    assert rw_stats["wr_req"] == 1 and rw_stats["wr_sect"] == 16, rw_stats
    assert ro_stats["errors"] == 2 * len(bad_ro), ro_stats
    assert ro_stats["wr_req"] == 0, ro_stats

    # dom0, hyperd and the neighbour carry on; the victim's own disks may be broken now.
    hyperctl("unpause", victim)
    running = {d["name"]: d["status"] for d in json.loads(hyperctl("list", "--json").out)}
    assert running.get(neighbour) == "running", running
    out, err = fio.communicate(timeout=120)
    assert fio.returncode == 0, err
    assert "verify" not in err.lower(), err
    job = json.loads(out[out.index("{") :])["jobs"][0]
    assert job["error"] == 0, job
    assert job["read"]["io_bytes"] > 0 and job["write"]["io_bytes"] > 0
    assert vbd_stats(neighbour, "xvda")["errors"] == 0

    destroy(victim, rw_image)
    image = rw_image.read_bytes()
    good_range = slice(GOOD_SECTOR * 512, GOOD_SECTOR * 512 + len(GOOD_BYTES))
    assert image[good_range] == GOOD_BYTES
    expected = pattern(1)
    untouched = image[: good_range.start] + expected[good_range] + image[good_range.stop :]
    assert sha256(untouched) == sha256(expected), (
        f"the image changed at byte {first_difference(untouched, expected)}"
    )
    assert sha256(ro_image.read_bytes()) == sha256(pattern(2)), "the read-only image changed"
    assert hyperctl("list").status == 0


def _rw(op: int, sector: int, *grefs: int) -> bytes:
    return B.Request.rw(op, 0, sector, [seg(g) for g in grefs]).pack()

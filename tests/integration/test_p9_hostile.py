"""A hostile 9pfs frontend against the real p9back, while a neighbour reads its own share.

The test takes over a real domain's 9pfs ring, as tests/integration/blkhost.py takes over a vbd:
it pauses the domain (its p9front is frozen, so only the test writes the ring), maps the ring's
interface page and data pages from /dev/shm as root can, writes raw 9P messages into ``out``,
rings p9back's doorbell and reads the answers from ``in``. p9back in dom0 sees exactly what a
compromised domain kernel could send. Walks out of the share, symlinks, unknown fids and
oversized counts get errors (or stay inside the share); then a message whose size is larger
than the ring disconnects that device alone, and the neighbour's share, dom0 and hyperd carry
on.
"""

from __future__ import annotations

import errno
import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from channels import p9fs as P
from channels.gnttab import table_pages
from channels.ring import PAGE_SIZE
from channels.shm import Segment, attach
from tests.integration.blkhost import grant_pools, mapped_doorbells
from tests.integration.conftest import domain_info, hyperctl, wait_for
from tests.integration.test_p9 import p9, run, share
from tests.raw_bell import ring_once

pytestmark = pytest.mark.root


def p9_entry(domain: str) -> dict[str, object]:
    [entry] = json.loads(hyperctl("p9-list", "--json", domain).out)
    return dict(entry)


class HostileP9front:
    """Raw access to a paused domain's only 9pfs ring: its pools are the ring pool (interface
    page, then the ``in`` pages) and the ``out`` pool, in that order (domu/p9front/xenbus.py)."""

    def __init__(self, domain: str) -> None:
        info = domain_info(domain)
        assert info is not None
        self.domid = int(info["domid"])
        front = f"/local/domain/{self.domid}/device/9pfs/0"
        self.port = int(hyperctl("store", "read", f"{front}/event-channel-0").out)
        ring_ref = int(hyperctl("store", "read", f"{front}/ring-ref0").out)
        ring_pool, out_pool = grant_pools(self.domid)
        assert ring_pool.gref_base == ring_ref, (ring_pool, ring_ref)
        self.segments: list[Segment] = [attach(ring_pool.name), attach(out_pool.name)]
        ring_pages = self._pages(self.segments[0], ring_pool.pages)
        out_pages = self._pages(self.segments[1], out_pool.pages)
        self.intf = P.DataIntf(ring_pages[0])
        self.in_ring, self.out_ring = P.flex_rings(
            self.intf, ring_pages[1:] + out_pages, backend=False, name="hostile"
        )
        pid = p9_entry(domain)["worker_pid"]
        assert isinstance(pid, int), "no p9back worker"
        bells = mapped_doorbells(pid)
        frontend = {b for b in bells if b.startswith(f"hyper.d{self.domid}.evtchn{self.port}.")}
        self.bells = sorted(bells - frontend) or sorted(bells)
        self.tag = 0x4000

    @staticmethod
    def _pages(segment: Segment, pages: int) -> list[memoryview]:
        start = table_pages(pages) * PAGE_SIZE
        return [segment.buf[start + i * PAGE_SIZE :][:PAGE_SIZE] for i in range(pages)]

    def backend_state(self) -> str:
        path = f"/local/domain/0/backend/9pfs/{self.domid}/0/state"
        return hyperctl("store", "read", path).out.strip()

    def send_raw(self, raw: bytes) -> None:
        assert self.out_ring.write(raw), "the out ring is full"
        for name in self.bells:
            ring_once(name)

    def ask(self, message: P.Message) -> P.Message:
        """Send one request and return its answer (the tags are the test's own)."""
        self.tag += 1
        self.send_raw(P.encode(self.tag, message))
        wait_for(lambda: self.in_ring.available() >= P.HEADER_SIZE, 10, "p9back's answer")
        size, _, _ = P.parse_header(self.in_ring.peek(P.HEADER_SIZE))
        wait_for(lambda: self.in_ring.available() >= size, 10, "the whole answer")
        tag, answer = P.decode(self.in_ring.read(size))
        assert tag == self.tag
        return answer

    def close(self) -> None:
        self.intf.close()
        for segment in self.segments:
            segment.close()


@pytest.fixture
def takeover() -> Iterator[Callable[[str], HostileP9front]]:
    taken: list[HostileP9front] = []

    def take(domain: str) -> HostileP9front:
        hyperctl("pause", domain)
        hostile = HostileP9front(domain)
        taken.append(hostile)
        return hostile

    yield take
    for hostile in taken:
        hostile.close()


def errno_of(answer: P.Message) -> int:
    assert isinstance(answer, P.Rlerror), answer
    return answer.ecode


def test_a_hostile_9pfs_frontend_is_refused_while_a_neighbour_reads_its_share(
    make_domain: Callable[..., str],
    tmp_path: Path,
    takeover: Callable[[str], HostileP9front],
) -> None:
    secret = tmp_path / "outside.txt"
    secret.write_text("outside the share\n")
    victim_share = share(tmp_path / "victim", ("inside.txt", b"inside\n"))
    (victim_share / "shadow").symlink_to("/etc/shadow")
    (victim_share / "escape").symlink_to("../outside.txt")
    victim = make_domain("p9:\n" + p9("victim", victim_share))
    neighbour = make_domain("p9:\n" + p9("mine", share(tmp_path / "n", ("n.txt", b"mine\n"))))
    evil = takeover(victim)

    root = evil.ask(P.Tattach(9000, P.NOFID, "", "", 0))
    assert isinstance(root, P.Rattach)
    # `..` from the share's root stays there: `../../etc/shadow` is looked for in the share,
    # and the walk stops where it is not (9P: the qids of the part walked, no new fid).
    up = evil.ask(P.Twalk(9000, 9001, ("..", "..")))
    assert isinstance(up, P.Rwalk) and [q.path for q in up.qids] == [root.qid.path] * 2
    walked = evil.ask(P.Twalk(9000, 9002, ("..", "..", "etc", "shadow")))
    assert isinstance(walked, P.Rwalk) and [q.path for q in walked.qids] == [root.qid.path] * 2
    assert errno_of(evil.ask(P.Tgetattr(9002, 0x7FF))) == errno.EBADF
    assert errno_of(evil.ask(P.Twalk(9000, 9002, ("../outside.txt",)))) == errno.EINVAL
    # Symlinks: a walk ends on them, never goes through; opening one is ELOOP.
    for link in ("shadow", "escape"):
        walked = evil.ask(P.Twalk(9000, 9003, (link,)))
        assert isinstance(walked, P.Rwalk) and walked.qids[0].type == P.QTSYMLINK
        assert errno_of(evil.ask(P.Tlopen(9003, P.P9_DOTL_RDONLY))) == errno.ELOOP
        assert isinstance(evil.ask(P.Tclunk(9003)), P.Rclunk)
    through = evil.ask(P.Twalk(9000, 9004, ("escape", "x")))  # stops at the link
    assert isinstance(through, P.Rwalk) and [q.type for q in through.qids] == [P.QTSYMLINK]
    assert errno_of(evil.ask(P.Tgetattr(9004, 0x7FF))) == errno.EBADF
    # Unknown fids, and a count far past msize (clamped, not obeyed).
    assert errno_of(evil.ask(P.Tread(4242, 0, 100))) == errno.EBADF
    assert errno_of(evil.ask(P.Tclunk(4243))) == errno.EBADF
    assert isinstance(evil.ask(P.Twalk(9000, 9005, ("inside.txt",))), P.Rwalk)
    assert isinstance(evil.ask(P.Tlopen(9005, P.P9_DOTL_RDONLY)), P.Rlopen)
    read = evil.ask(P.Tread(9005, 0, 0xFFFFFFFF))
    assert isinstance(read, P.Rread) and read.data == b"inside\n"
    assert evil.backend_state() == "4", "bad requests are answered, not fatal"

    # A message larger than the ring: a protocol violation, this device disconnects.
    evil.send_raw(struct.pack("<IBH", evil.out_ring.size + 1, P.Tread.TYPE, 1) + bytes(9))
    wait_for(
        lambda: evil.backend_state() in ("5", "6"),
        10,
        "the victim's 9pfs device to be closed by its backend",
    )
    backend = f"/local/domain/0/backend/9pfs/{evil.domid}/0"
    error = hyperctl("store", "read", f"{backend}/error").out
    assert f"a message of {evil.out_ring.size + 1} bytes" in error
    status, out, err = run(neighbour, "cat /mnt/mine/n.txt")
    assert (status, out) == (0, "mine\n"), err
    assert {d["name"] for d in json.loads(hyperctl("list", "--json").out)} >= {victim, neighbour}
    assert secret.read_text() == "outside the share\n"

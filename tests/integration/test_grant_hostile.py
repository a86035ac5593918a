"""A hostile guest cycling grant pools through the real blkback: dom0's memory stays bounded.

The test plays a compromised domain kernel. It pauses a domain with two disks (its blkfront is
frozen), takes over the vbds' rings as tests/integration/blkhost.py does, and takes the kernel's
own hypercall socket (``pidfd_getfd``: root may), so that hyperd sees the domain itself asking.
Then, for 30 s, it sets up a pool of 4096 pages (16 MiB, the most one call gives) for its first
disk, grants every page to dom0 without touching one, has blkback READ 16 MiB from the disk into
them (sixteen indirect requests of 256 segments: blkback's writes fault the pages in, charged to
dom0's cgroup), releases the pool, and starts over.

Before issue 12, blkback's worker kept every pool it had mapped until the vbd disconnected, so
dom0 grew by 16 MiB a pool. Now the worker drops the pools the guest released at its next miss
(unmapping each once no request holds a page of it), and maps no more for the vbd than blkif
can use (``blkif.MAX_GRANT_PAGES``, 8225 pages, of which blkfront's own pools take 1057). So
dom0 maps at most one of these pools at a time: the one released last stays mapped until the
next miss, which unmaps it before it maps the next; a guest that kept it mapped (a request in
flight on it) would fail its vbd rather than have dom0 map a second. The loop stops early,
failing, as soon as dom0 has grown past the bound.

The second test names grefs in no pool: each costs the worker a round trip to dom0 and hyperd,
so past the budget of bad grefs (channels/grants.py) the vbd fails as on a protocol violation,
and the domain's other disk carries on. Another keeps its pools instead of releasing them:
its vbd fails at the second, dom0 having mapped one. The last checks that each vbd's worker maps
its own device's pools and none of the other disk's.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from channels import blkif as B
from channels import hypercall as hc
from channels import xenbus
from channels.gnttab import GrantPool
from channels.grants import BAD_GREF_BUDGET
from channels.ring import PAGE_SIZE
from hyperd import cgroup
from hyperd.domain import BOOT_HYPERCALL_FD
from hyperd.gnttab import grant_budget
from tests.integration.blkhost import DATA_PAGES, INDIRECT_PAGES, HostileBlkfront, vbd_stats
from tests.integration.conftest import BOTH_PUMPS, domain_info, hyperctl, wait_for
from tests.integration.test_block import disk
from tests.integration.test_block_hostile import OKAY, Req, Sender, seg

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("data_path_pumps")]
PUMPS = BOTH_PUMPS  # every test on the native pumps, then on the Python reference

MiB = 1 << 20
POOL_PAGES = 4096  # the most one gnttab_setup_pool gives (channels/hypercall.py)
SEGMENTS = B.MAX_INDIRECT_SEGMENTS  # 256 pages of the pool per indirect READ
READS = POOL_PAGES // SEGMENTS  # the READs that fill a pool
SECONDS = 30.0
OWN_PAGES = 1 + DATA_PAGES + INDIRECT_PAGES  # blkfront's pools for the vbd: 1057 pages
#: What dom0 may grow by. The vbd maps no more than blkif can use; beyond blkfront's own pools
#: that is one attacker's pool, mapped already as the baseline is taken (the warm-up's, until
#: the next miss), and 3072 pages, never a second pool: 12 MiB, and slack for dom0's own logs
#: and heap.
GROWTH_BOUND = (B.MAX_GRANT_PAGES - OWN_PAGES - POOL_PAGES) * PAGE_SIZE + 8 * MiB
SYS_PIDFD_GETFD = 438  # x86_64 and aarch64 alike


def kernel_hypercall_socket(kernel_pid: int) -> socket.socket:
    """A duplicate of the domain kernel's hypercall socket (where hyperd put the boot
    process's, which the kernel inherited)."""
    target = BOOT_HYPERCALL_FD
    pidfd = os.pidfd_open(kernel_pid)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.syscall(SYS_PIDFD_GETFD, pidfd, target, 0)
        if fd < 0:
            raise OSError(ctypes.get_errno(), f"pidfd_getfd of the kernel's fd {target}")
    finally:
        os.close(pidfd)
    return socket.socket(fileno=fd)


class Hypercalls:
    """Blocking hypercalls on the kernel's socket, one at a time (the kernel is frozen, so every
    reply is ours). Never shut down: the socket is the kernel's too."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(30.0)
        self.ids = itertools.count(1 << 40)  # far from the kernel's ids

    def call(self, op: hc.Op) -> dict[str, Any]:
        req_id = next(self.ids)
        self.sock.send(hc.encode({"id": req_id, "op": op.op, "args": op.model_dump(mode="json")}))
        while True:
            reply = json.loads(self.sock.recv(hc.MAX_MESSAGE))
            if reply.get("id") == req_id:
                break
        assert reply["ok"], f"{op.op}: {reply}"
        return dict(reply["result"])


def pool_for(hcalls: Hypercalls, evil: HostileBlkfront) -> tuple[int, GrantPool, list[Req]]:
    """A pool set up for the vbd, every page granted to dom0 (none touched), and the READs
    that have blkback write every page of it: (pool id, pool, READS requests, ids from 0)."""
    device = xenbus.device_name("vbd", B.vdev_number(evil.vdev))
    info = hcalls.call(hc.GnttabSetupPool(peer=0, device=device, pages=POOL_PAGES))
    pool = GrantPool.open(info["name"], info["gref_base"], info["pages"])
    grefs = [pool.grant(i, 0, readonly=False) for i in range(POOL_PAGES)]
    reads = []
    for n, start in enumerate(range(0, POOL_PAGES, SEGMENTS)):
        frame = evil.indirect_frame(n, [seg(g) for g in grefs[start : start + SEGMENTS]])
        sector = n * SEGMENTS * B.SECTORS_PER_PAGE
        request = B.Request.indirect(B.BLKIF_OP_READ, n, sector, SEGMENTS, [frame])
        reads.append(Req(f"READ {n} into a fresh pool", request.pack(), B.BLKIF_RSP_OKAY))
    return info["pool"], pool, reads


def cycle_one_pool(hcalls: Hypercalls, evil: HostileBlkfront, send: Sender) -> None:
    """Set up a pool for the vbd, grant it all to dom0, have blkback write every page of it,
    release it."""
    pool_id, pool, reads = pool_for(hcalls, evil)
    try:
        send.batch(reads)
    finally:
        pool.close()
    hcalls.call(hc.GnttabReleasePool(pool=pool_id))


def vbd_error(guest: Guest, vdev: str) -> str | None:
    """What blkback wrote in the vbd's ``error`` node as it failed it; None while it has not."""
    backend = f"/local/domain/0/backend/vbd/{guest.domid}/{B.vdev_number(vdev)}"
    result = hyperctl("store", "read", f"{backend}/error", check=False)
    return result.out if result.status == 0 else None


def answered(evil: HostileBlkfront, count: int) -> bool:
    """Whether blkback has put ``count`` responses on the ring we have not read yet."""
    return (evil.index[2] - evil.rsp_cons) & 0xFFFF_FFFF >= count


def read(gref: int) -> bytes:
    """A READ of sector 0 into one whole page (id 0: Sender stamps its own)."""
    return B.Request.rw(B.BLKIF_OP_READ, 0, 0, [seg(gref)]).pack()


def pools_mapped(pid: int, domid: int) -> set[str]:
    """The domain's grant pools that process ``pid`` maps; those hyperd removed already end
    with " (deleted)"."""
    names = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        path = line.split(maxsplit=5)[-1]
        if path.startswith(f"/dev/shm/hyper.d{domid}.gnt"):
            names.add(path.removeprefix("/dev/shm/"))
    return names


def released_pools_mapped(pid: int, domid: int) -> int:
    """How many of the domain's grant pools process ``pid`` maps after hyperd removed them."""
    return sum(name.endswith(" (deleted)") for name in pools_mapped(pid, domid))


@dataclass
class Guest:
    """A paused domain with two 16 MiB disks, each vbd taken over."""

    name: str
    domid: int
    kernel_pid: int
    vbds: dict[str, HostileBlkfront]


@pytest.fixture
def guest(make_domain: Callable[..., str], tmp_path: Path) -> Iterator[Guest]:
    disks = disk(tmp_path / "a.img", size="16M") + disk(tmp_path / "b.img", "xvdb", size="16M")
    name = make_domain("disk:\n" + disks)
    info = domain_info(name)
    assert info is not None
    hyperctl("pause", name)
    taken = Guest(name, info["domid"], info["pid"], {})
    try:
        for vdev in ("xvda", "xvdb"):
            taken.vbds[vdev] = HostileBlkfront(name, taken.domid, vdev)
        yield taken
    finally:
        for evil in taken.vbds.values():
            evil.close()


@pytest.fixture
def hypercalls(guest: Guest) -> Iterator[Hypercalls]:
    """The guest's hypercall socket, taken from its frozen kernel."""
    sock = kernel_hypercall_socket(guest.kernel_pid)
    try:
        yield Hypercalls(sock)
    finally:
        sock.close()


def test_a_guest_cycling_grant_pools_cannot_grow_dom0(guest: Guest, hypercalls: Hypercalls) -> None:
    evil = guest.vbds["xvda"]
    dom0 = cgroup.open_hierarchy().open("dom0")
    send = Sender(evil)
    cycle_one_pool(hypercalls, evil, send)  # the worker's first refresh, and its heap, warmed up
    baseline = dom0.memory_bytes()
    pools, peak = 0, 0
    deadline = time.monotonic() + SECONDS
    while time.monotonic() < deadline:
        cycle_one_pool(hypercalls, evil, send)
        pools += 1
        growth = dom0.memory_bytes() - baseline
        peak = max(peak, growth)
        assert growth < GROWTH_BOUND, (
            f"dom0 grew by {growth / MiB:.0f} MiB after {pools} pools of 16 MiB"
        )
    print(f"\n{pools} pools of 16 MiB cycled; dom0 grew by at most {peak / MiB:.1f} MiB")

    worker = vbd_stats(guest.name, "xvda")["worker_pid"]
    assert isinstance(worker, int), "the vbd is still served"
    # The pool released last is dropped at the worker's next miss; none before it is kept.
    assert released_pools_mapped(worker, guest.domid) <= 1


def test_a_guest_keeping_its_pools_has_dom0_map_no_more_than_its_vbd_may(
    guest: Guest, hypercalls: Hypercalls
) -> None:
    """Pools the guest never releases stay mapped, and blkback fills every page of them. Past
    what blkif can use (8225 pages, 1057 of them blkfront's own), that is at the second pool of
    16 MiB, the vbd fails, having grown dom0 by one pool. Before pools were per device, the vbd
    mapped them up to the guest's whole grant budget (its memory: 128 MiB, 7 pools here)."""
    evil = guest.vbds["xvda"]
    info = domain_info(guest.name)
    assert info is not None
    room = (grant_budget(info["memory"]) - len(guest.vbds) * OWN_PAGES) // POOL_PAGES
    dom0 = cgroup.open_hierarchy().open("dom0")
    baseline = dom0.memory_bytes()
    kept: list[GrantPool] = []
    peak = 0
    try:
        while len(kept) < room and vbd_error(guest, "xvda") is None:
            _, pool, reads = pool_for(hypercalls, evil)
            kept.append(pool)
            evil.send(*(req.slot for req in reads))
            wait_for(
                lambda: answered(evil, READS) or vbd_error(guest, "xvda"),
                10,
                "blkback to fill the pool or fail the vbd",
            )
            if answered(evil, READS):
                assert {status for _, status in evil.responses(READS).values()} == {OKAY}
                peak = max(peak, dom0.memory_bytes() - baseline)
    finally:
        for pool in kept:
            pool.close()
    print(f"\n{len(kept)} pools of 16 MiB kept; dom0 grew by at most {peak / MiB:.1f} MiB")
    assert "its protocol can use" in (vbd_error(guest, "xvda") or ""), "the vbd failed"
    assert len(kept) == 2, "at the second pool"
    assert peak < (B.MAX_GRANT_PAGES - OWN_PAGES) * PAGE_SIZE + 8 * MiB

    other = guest.vbds["xvdb"]
    Sender(other).one(Req("a good READ on the other disk", read(other.data_gref(0)), OKAY))


def test_past_its_budget_of_bad_grefs_a_vbd_fails_alone(guest: Guest) -> None:
    """Each gref in no pool costs dom0 and hyperd a round trip: BAD_GREF_BUDGET of them are
    answered with errors, the next fails that vbd as a protocol violation would."""
    evil, other = guest.vbds["xvda"], guest.vbds["xvdb"]
    nowhere = evil.beyond_every_pool()
    bad = [Req(f"READ into gref {nowhere + n}", read(nowhere + n)) for n in range(BAD_GREF_BUDGET)]
    send = Sender(evil)
    for start in range(0, len(bad), 16):
        send.batch(bad[start : start + 16])
    assert vbd_stats(guest.name, "xvda")["errors"] == BAD_GREF_BUDGET

    evil.send(read(nowhere + BAD_GREF_BUDGET))
    error = wait_for(lambda: vbd_error(guest, "xvda"), 10, "blkback to fail the vbd")
    assert "grefs in none of its pools" in error

    good = read(other.data_gref(0))
    Sender(other).one(Req("a good READ on the other disk", good, OKAY))
    assert hyperctl("list").status == 0


def test_each_vbd_worker_maps_its_own_devices_pools_and_no_other(guest: Guest) -> None:
    """Pools are per device: the worker of each disk maps the pools blkfront set up for that
    disk (its ring, data and indirect pages) and none of the other disk's."""
    for vdev, evil in guest.vbds.items():
        worker = vbd_stats(guest.name, vdev)["worker_pid"]
        assert isinstance(worker, int), f"{vdev} is served"
        own = {segment.name for segment in evil.segments}
        assert len(own) == 3
        assert pools_mapped(worker, guest.domid) == own, vdev

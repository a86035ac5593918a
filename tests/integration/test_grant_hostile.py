"""A hostile guest cycling grant pools through the real blkback: dom0's memory stays bounded.

The test plays a compromised domain kernel. It pauses a domain with one disk (its blkfront is
frozen), takes over the vbd's ring as tests/integration/blkhost.py does, and takes the kernel's
own hypercall socket (``pidfd_getfd``: root may), so that hyperd sees the domain itself asking.
Then, for 30 s, it sets up a pool of 4096 pages (16 MiB, the most one call gives), grants every
page to dom0 without touching one, has blkback READ 16 MiB from the disk into them (sixteen
indirect requests of 256 segments: blkback's writes fault the pages in, charged to dom0's
cgroup), releases the pool, and starts over.

Before issue 12, blkback's worker kept every pool it had mapped until the vbd disconnected, so
dom0 grew by 16 MiB a pool. Now the worker drops the pools the guest released at its next miss,
and may never map more than the guest's grant budget, so dom0 holds at most one of these pools
at a time. The loop stops early, failing, as soon as dom0 has grown past the bound.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from channels import blkif as B
from channels import hypercall as hc
from channels.gnttab import GrantPool
from hyper import cgroup
from tests.integration.blkhost import HostileBlkfront, vbd_stats
from tests.integration.conftest import domain_info, hyperctl
from tests.integration.test_block import disk
from tests.integration.test_block_hostile import Req, Sender, seg

pytestmark = pytest.mark.root

MiB = 1 << 20
POOL_PAGES = 4096  # the most one gnttab_setup_pool gives (channels/hypercall.py)
SEGMENTS = B.MAX_INDIRECT_SEGMENTS  # 256 pages of the pool per indirect READ
SECONDS = 30.0
#: One pool of the attacker's (16 MiB) may be live in dom0 at a time, and the one it released
#: last until blkback's next miss drops it: 32 MiB, and slack for dom0's own logs and heap.
GROWTH_BOUND = 48 * MiB
SYS_PIDFD_GETFD = 438  # x86_64 and aarch64 alike


def kernel_hypercall_socket(kernel_pid: int) -> socket.socket:
    """A duplicate of the domain kernel's hypercall socket (the boot process's first argument,
    which the kernel inherited)."""
    argv = Path(f"/proc/{kernel_pid}/cmdline").read_bytes().split(b"\0")
    target = int(argv[argv.index(b"domu.boot") + 1])
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


def cycle_one_pool(hcalls: Hypercalls, evil: HostileBlkfront, send: Sender) -> None:
    """Set up a pool, grant it all to dom0, have blkback write every page of it, release it."""
    info = hcalls.call(hc.GnttabSetupPool(peer=0, pages=POOL_PAGES))
    pool = GrantPool.open(info["name"], info["gref_base"], info["pages"])
    try:
        grefs = [pool.grant(i, 0, readonly=False) for i in range(POOL_PAGES)]
        reads = []
        for n, start in enumerate(range(0, POOL_PAGES, SEGMENTS)):
            frame = evil.indirect_frame(n, [seg(g) for g in grefs[start : start + SEGMENTS]])
            sector = n * SEGMENTS * B.SECTORS_PER_PAGE
            request = B.Request.indirect(B.BLKIF_OP_READ, 0, sector, SEGMENTS, [frame])
            reads.append(Req(f"READ {n} into a fresh pool", request.pack(), B.BLKIF_RSP_OKAY))
        send.batch(reads)
    finally:
        pool.close()
    hcalls.call(hc.GnttabReleasePool(pool=info["pool"]))


def released_pools_mapped(pid: int, domid: int) -> int:
    """How many of the domain's grant pools process ``pid`` maps after hyperd removed them."""
    names = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        path = line.split(maxsplit=5)[-1]
        if path.startswith(f"/dev/shm/hyper.d{domid}.gnt") and path.endswith("(deleted)"):
            names.add(path)
    return len(names)


@pytest.fixture
def attacker(
    make_domain: Callable[..., str], tmp_path: Path
) -> Iterator[tuple[str, int, Hypercalls, HostileBlkfront]]:
    """A paused domain with a 16 MiB disk, its vbd and its hypercall socket taken over."""
    name = make_domain("disk:\n" + disk(tmp_path / "cycle.img", size="16M"))
    info = domain_info(name)
    assert info is not None
    hyperctl("pause", name)
    sock = kernel_hypercall_socket(info["pid"])
    evil = HostileBlkfront(name, info["domid"], "xvda")
    try:
        yield name, info["domid"], Hypercalls(sock), evil
    finally:
        evil.close()
        sock.close()


def test_a_guest_cycling_grant_pools_cannot_grow_dom0(
    attacker: tuple[str, int, Hypercalls, HostileBlkfront],
) -> None:
    name, domid, hcalls, evil = attacker
    dom0 = cgroup.open_hierarchy().open("dom0")
    send = Sender(evil)
    cycle_one_pool(hcalls, evil, send)  # the worker's first refresh, and its heap, warmed up
    baseline = dom0.memory_bytes()
    pools, peak = 0, 0
    deadline = time.monotonic() + SECONDS
    while time.monotonic() < deadline:
        cycle_one_pool(hcalls, evil, send)
        pools += 1
        growth = dom0.memory_bytes() - baseline
        peak = max(peak, growth)
        assert growth < GROWTH_BOUND, (
            f"dom0 grew by {growth / MiB:.0f} MiB after {pools} pools of 16 MiB"
        )
    print(f"\n{pools} pools of 16 MiB cycled; dom0 grew by at most {peak / MiB:.1f} MiB")

    worker = vbd_stats(name, "xvda")["worker_pid"]
    assert isinstance(worker, int), "the vbd is still served"
    # The pool released last is dropped at the worker's next miss; none before it is kept.
    assert released_pools_mapped(worker, domid) <= 1

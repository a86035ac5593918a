"""A hostile blkfront for the tests: raw access to a paused domain's vbd ring and granted pages.

Root can map any shared-memory object in /dev/shm, so a test can do to a vbd what a compromised
domain kernel could: write any 112 bytes into the ring's request slots, move ``req_prod``, write
its own granted pages and ring the backend's doorbell. The domain must be paused first (its
blkfront and FUSE server are frozen), so that only the test writes the ring.

How the objects are found, without any hypercall:

* pools: hyperd names a domain's grant pools ``hyper.d<domid>.gnt<N>.<token>`` and hands each
  granter's pools consecutive gref ranges from 8, in pool order, reusing neither
  (hyperd/gnttab.py); the pool's size gives its pages (channels/gnttab.py pool_bytes). A fresh
  domain has released no pool, so each pool's ``gref_base`` is the running sum.
* the disk's pools: blkfront grants, per disk and in this order, "ring" (1 page; its first gref
  is ``ring-ref``), "data" (1024 pages, read-write) and "indirect" (32 pages, read-only), so
  they start at ``ring-ref``, ``ring-ref + 1`` and ``ring-ref + 1025``.
* the backend's doorbell: the vbd's worker process (``worker_pid`` in ``block-list``) keeps
  both doorbells of its event channel mapped; the one that is not the frontend's port (the
  ``event-channel`` key) is the one blkback sleeps on.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from channels import blkif as B
from channels.gnttab import pool_bytes, table_pages
from channels.ring import HEADER_SIZE, PAGE_SIZE, u32_view
from channels.shm import Segment, attach
from tests.integration.conftest import hyperctl, wait_for
from tests.raw_bell import ring_once

SHM = Path("/dev/shm")
FIRST_GREF = 8  # refs 0..7 are reserved, as in Xen (hyperd/gnttab.py)
DATA_PAGES = 1024  # domu/blkfront/xenbus.py
INDIRECT_PAGES = B.nr_ents(0)  # one indirect page per ring slot
U32 = 0xFFFFFFFF


@dataclass(frozen=True)
class Pool:
    """One of a domain's grant pools, as found in /dev/shm."""

    number: int  # the N in gnt<N>
    name: str
    gref_base: int
    pages: int

    def __contains__(self, gref: int) -> bool:
        return self.gref_base <= gref < self.gref_base + self.pages


def _pages_of(size: int) -> int:
    """Invert pool_bytes (strictly increasing in pages, so the answer is unique)."""
    for pages in range(1, size // PAGE_SIZE + 1):
        if pool_bytes(pages) == size:
            return pages
    raise AssertionError(f"{size} bytes is not the size of a grant pool")


def grant_pools(domid: int) -> list[Pool]:
    """Every grant pool of domain `domid`, in pool order, with its gref range."""
    pattern = re.compile(rf"hyper\.d{domid}\.gnt(\d+)\.[0-9a-f]+")
    found = sorted(
        (int(m[1]), p.name, p.stat().st_size)
        for p in SHM.iterdir()
        if (m := pattern.fullmatch(p.name))
    )
    pools, base = [], FIRST_GREF
    for number, name, size in found:
        pages = _pages_of(size)
        pools.append(Pool(number, name, base, pages))
        base += pages
    return pools


def vbd_stats(domain: str, vdev: str) -> dict[str, object]:
    """The ``block-list --json`` entry of one of the domain's disks."""
    listing = json.loads(hyperctl("block-list", "--json", domain).out)
    return next(v for v in listing if v["vdev"] == vdev)


def mapped_doorbells(pid: int) -> set[str]:
    """The doorbell names (no ``sem.``) process `pid` has mapped: sem_open maps the file."""
    names = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        path = line.split(maxsplit=5)[-1]
        if path.startswith("/dev/shm/sem.hyper."):
            names.add(path.removeprefix("/dev/shm/sem."))
    return names


def with_field(slot: bytes, fmt: str, offset: int, value: int) -> bytes:
    """`slot` with one field overwritten: for the values Request.pack refuses to produce."""
    raw = bytearray(slot)
    struct.pack_into(fmt, raw, offset, value)
    return bytes(raw)


class HostileBlkfront:
    """Raw access to one vbd of a paused domain: its ring, data pages and indirect pages."""

    def __init__(self, domain: str, domid: int, vdev: str) -> None:
        self.domid = domid
        self.vdev = vdev
        front = f"/local/domain/{domid}/device/vbd/{B.vdev_number(vdev)}"
        self.ring_ref = int(hyperctl("store", "read", f"{front}/ring-ref").out)
        port = int(hyperctl("store", "read", f"{front}/event-channel").out)
        pools = {p.gref_base: p for p in grant_pools(domid)}
        self.all_pools = list(pools.values())
        self.segments: list[Segment] = []
        self.views: list[memoryview] = []
        self.nr_ents = B.nr_ents(0)
        try:
            self._map(pools)
            self.bells = self._backend_doorbells(domain, port)
            # Whatever the real blkfront sent before the pause must be answered first.
            wait_for(lambda: self.index[0] == self.index[2], 10, f"the {vdev} ring to go quiet")
        except BaseException:
            self.close()
            raise
        self.req_prod = self.index[0]
        self.rsp_cons = self.index[2]

    def _map(self, pools: dict[int, Pool]) -> None:
        ring_pool = self._attach(pools, self.ring_ref, 1)
        data_pool = self._attach(pools, self.ring_ref + 1, DATA_PAGES)
        indirect_pool = self._attach(pools, self.ring_ref + 1 + DATA_PAGES, INDIRECT_PAGES)
        self.ring = ring_pool.buf[table_pages(1) * PAGE_SIZE :][:PAGE_SIZE]
        self.index = u32_view(self.ring, 0, 4)  # req_prod, req_event, rsp_prod, rsp_event
        self.data = data_pool.buf[table_pages(DATA_PAGES) * PAGE_SIZE :]
        self.indirect = indirect_pool.buf[table_pages(INDIRECT_PAGES) * PAGE_SIZE :]
        self.views = [self.index, self.ring, self.data, self.indirect]

    def _attach(self, pools: dict[int, Pool], gref_base: int, pages: int) -> Segment:
        pool = pools.get(gref_base)
        assert pool is not None, f"{self.vdev}: no pool at gref {gref_base} in {pools}"
        assert pool.pages == pages, f"{self.vdev}: {pool} is not the {pages}-page pool"
        segment = attach(pool.name)
        self.segments.append(segment)
        return segment

    def _backend_doorbells(self, domain: str, frontend_port: int) -> list[str]:
        pid = vbd_stats(domain, self.vdev)["worker_pid"]
        assert isinstance(pid, int), f"{self.vdev}: no blkback worker"
        bells = mapped_doorbells(pid)
        assert len(bells) == 2, f"{self.vdev}: the worker maps {bells}, not one channel"
        frontends = {
            b for b in bells if b.startswith(f"hyper.d{self.domid}.evtchn{frontend_port}.")
        }
        # Port numbers of dom0 and the domain could coincide: then ring both (a spurious
        # notification of the frozen frontend is harmless).
        return sorted(bells - frontends) or sorted(bells)

    # -- grefs and pages ------------------------------------------------------------------------

    def data_gref(self, index: int) -> int:
        return self.ring_ref + 1 + index

    def indirect_gref(self, index: int) -> int:
        return self.ring_ref + 1 + DATA_PAGES + index

    def beyond_every_pool(self) -> int:
        """The first gref no pool of the domain holds."""
        last = self.all_pools[-1]
        return last.gref_base + last.pages

    def fill_data(self, index: int, data: bytes) -> int:
        """Write `data` into data pages from `index` on; the first page's gref."""
        start = index * PAGE_SIZE
        self.data[start : start + len(data)] = data
        return self.data_gref(index)

    def read_data(self, index: int, nbytes: int) -> bytes:
        return bytes(self.data[index * PAGE_SIZE : index * PAGE_SIZE + nbytes])

    def indirect_frame(self, index: int, segments: Sequence[B.Segment]) -> int:
        """Write descriptors into indirect page `index` (read-only to the backend, not to
        us); the page's gref."""
        (frame,) = B.pack_indirect_frames(segments)
        self.indirect[index * PAGE_SIZE : (index + 1) * PAGE_SIZE] = frame
        return self.indirect_gref(index)

    # -- the ring -------------------------------------------------------------------------------

    def _slot(self, index: int) -> int:
        return HEADER_SIZE + (index % self.nr_ents) * B.SLOT_SIZE

    def send(self, *slots: bytes) -> None:
        """Publish raw request slots (ids already in them) and ring blkback's doorbell."""
        assert (self.req_prod + len(slots) - self.rsp_cons) & U32 <= self.nr_ents, "ring full"
        for raw in slots:
            assert len(raw) == B.SLOT_SIZE
            offset = self._slot(self.req_prod)
            self.ring[offset : offset + B.SLOT_SIZE] = raw
            self.req_prod = (self.req_prod + 1) & U32
        self.index[0] = self.req_prod  # after the slots: x86 keeps stores in order
        self.kick()

    def kick(self) -> None:
        for name in self.bells:
            ring_once(name)

    def responses(self, count: int) -> dict[int, tuple[int, int]]:
        """The next `count` responses, by id: (operation, status)."""

        def arrived() -> bool:
            return (self.index[2] - self.rsp_cons) & U32 >= count

        wait_for(arrived, 10, f"{count} responses from blkback on {self.vdev}")
        got: dict[int, tuple[int, int]] = {}
        for _ in range(count):
            rid, operation, status = B.RESPONSE.unpack_from(self.ring, self._slot(self.rsp_cons))
            assert rid not in got, f"{self.vdev}: two responses for id {rid}"
            got[rid] = (operation, status)
            self.rsp_cons = (self.rsp_cons + 1) & U32
        return got

    def close(self) -> None:
        """Drop every view, then unmap (idempotent; fine after a failed __init__)."""
        for view in self.views:
            view.release()
        self.views = []
        for segment in self.segments:
            segment.close()
        self.segments = []

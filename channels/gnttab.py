"""Grant tables over shared memory: a granting domain's pool of pages, and a peer's view of it.

A *pool* is one shared-memory object hyperd creates for one device of a granter, which only
that device's backend maps (so a backend can never reach another device's or another domain's
pages: channels/grants.py). It starts with the pool's grant table, Xen's v1 entries of 8 bytes,
one per page, followed by the pages themselves:

    offset 0                     entries[pages]: u16 flags, u16 domid, u32 frame
    offset table_pages * 4096    page 0, page 1, ... page pages-1

Grant ref ``gref_base + i`` names entry i. The granter writes domid and frame first, then flags
(GTF_permit_access, optionally GTF_readonly), as Xen's ordering rules ask. The grantee resolves
a gref by copying the entry once and validating the copy: the ref is in the pool, the entry
permits access to *this* domain, the frame is inside the pool, and a write needs an entry that
is not read-only. Any failure raises GrantError, which a backend turns into an error response.
"""

from __future__ import annotations

import contextlib
import struct

from channels.errors import BadInput
from channels.hypercall import (
    GnttabReleasePool,
    GnttabSetupPool,
    HypercallError,
    Hypercalls,
)
from channels.ring import PAGE_SIZE
from channels.shm import Segment, attach, attach_fd

GTF_invalid = 0
GTF_permit_access = 1
GTF_type_mask = 3
GTF_readonly = 1 << 2

ENTRY = struct.Struct("<HHI")


class GrantError(BadInput):
    """A grant reference that does not name a page the caller may use this way."""


def table_pages(pages: int) -> int:
    return (pages * ENTRY.size + PAGE_SIZE - 1) // PAGE_SIZE


def pool_bytes(pages: int) -> int:
    return (table_pages(pages) + pages) * PAGE_SIZE


class _Pool:
    def __init__(self, segment: Segment, gref_base: int, pages: int) -> None:
        self._segment = segment
        self.gref_base = gref_base
        self.pages = pages
        self._data_offset = table_pages(pages) * PAGE_SIZE
        self.buf = segment.buf
        # Entry fields are written through native-width views: one store each, never the
        # zero-then-value pair struct.pack_into makes, which a peer could observe half done.
        table = self.buf[: pages * ENTRY.size]
        self._u16 = table.cast("H")
        self._u32 = table.cast("I")
        self._pages: list[memoryview] | None = None

    def page(self, frame: int) -> memoryview:
        """A view of one page (made once: data paths ask for the same pages again and again)."""
        if self._pages is None:
            off = self._data_offset
            self._pages = [
                self.buf[off + i * PAGE_SIZE : off + (i + 1) * PAGE_SIZE] for i in range(self.pages)
            ]
        return self._pages[frame]

    def region(self) -> memoryview:
        """All the pool's pages as one contiguous view (page i at i * PAGE_SIZE)."""
        return self.buf[self._data_offset : self._data_offset + self.pages * PAGE_SIZE]

    def native(self) -> tuple[memoryview, int, int, int]:
        """(mapping, first gref, pages, offset of page 0): what a native pump resolves refs
        in, with MappedPool.resolve's checks (channels/native/pump.h's grant_page)."""
        return self.buf, self.gref_base, self.pages, self._data_offset

    @property
    def name(self) -> str:
        """The pool's shared-memory object, for another process of the granter to open."""
        return self._segment.name

    def __contains__(self, gref: int) -> bool:
        return self.gref_base <= gref < self.gref_base + self.pages

    def close(self) -> None:
        self._release_views()
        self._segment.close()

    def _release_views(self) -> None:
        """Release the views this object made (never one it handed out: see MappedPool)."""
        self._u16.release()
        self._u32.release()
        for view in self._pages or ():
            view.release()
        self._pages = None
        self.buf = memoryview(b"")


class GrantPool(_Pool):
    """The granting side (a frontend): hands out grefs for its pages."""

    @classmethod
    def open(cls, name: str, gref_base: int, pages: int) -> GrantPool:
        return cls(attach(name), gref_base, pages)

    def grant(self, index: int, domid: int, *, readonly: bool, frame: int | None = None) -> int:
        """Grant page ``frame`` (default: ``index``) to ``domid`` through entry ``index``."""
        frame = index if frame is None else frame
        if not (0 <= index < self.pages and 0 <= frame < self.pages):
            raise GrantError(f"entry {index} / frame {frame} outside a pool of {self.pages}")
        flags = GTF_permit_access | (GTF_readonly if readonly else 0)
        # domid and frame first, then flags: the peer never sees a valid type with stale fields.
        self._u16[index * 4 + 1] = domid
        self._u32[index * 2 + 1] = frame
        self._u16[index * 4] = flags
        return self.gref_base + index

    def regrant(self, domid: int) -> None:
        """Every page granted now is granted to ``domid`` instead: a frontend whose device moved
        to another backend (its driver domain came back under a new domid) grants its pages
        again, as a Xen frontend does for the backend it reconnects to. Done before the new
        backend is told the frontend is ready, so it never sees the old grantee."""
        for index in range(self.pages):
            if self._u16[index * 4] & GTF_type_mask == GTF_permit_access:
                self._u16[index * 4 + 1] = domid

    def end_access(self, gref: int) -> None:
        if gref not in self:
            raise GrantError(f"gref {gref} is not in this pool")
        self._u16[(gref - self.gref_base) * 4] = GTF_invalid


class MappedPool(_Pool):
    """The grantee side (a backend): resolves grefs to pages after validating them."""

    def __init__(self, segment: Segment, gref_base: int, pages: int, domid: int) -> None:
        super().__init__(segment, gref_base, pages)
        self.domid = domid

    @classmethod
    def from_fd(cls, fd: int, name: str, gref_base: int, pages: int, domid: int) -> MappedPool:
        """Map pool ``name`` from ``fd`` (its opener's: a backend's worker may not open it by
        name, see channels/grants.py): ShmError unless it is the size hyperd made it (the
        granter maps it read-write, so it may have truncated it)."""
        return cls(attach_fd(fd, name, pool_bytes(pages)), gref_base, pages, domid)

    def resolve(self, gref: int, *, write: bool) -> memoryview:
        """The page behind ``gref``, checked on a private copy of its entry."""
        if gref not in self:
            raise GrantError(f"gref {gref} outside pool {self.gref_base}+{self.pages}")
        flags, domid, frame = ENTRY.unpack_from(self.buf, (gref - self.gref_base) * ENTRY.size)
        if flags & GTF_type_mask != GTF_permit_access:
            raise GrantError(f"gref {gref} is not granted")
        if domid != self.domid:
            raise GrantError(f"gref {gref} is granted to domain {domid}, not {self.domid}")
        if frame >= self.pages:
            raise GrantError(f"gref {gref} names frame {frame} outside the pool")
        if write and flags & GTF_readonly:
            raise GrantError(f"gref {gref} is read-only")
        # A view of the caller's own, not one of page()'s: unmap() never releases it under its
        # user, and whether it is still alive is what unmap() finds out.
        start = self._data_offset + frame * PAGE_SIZE
        return self.buf[start : start + PAGE_SIZE]

    def unmap(self) -> bool:
        """Unmap the pool unless a page ``resolve`` handed out is still in use: True once
        unmapped. Either way the pool resolves nothing more; ask again to unmap it later."""
        self._release_views()
        return self._segment.unmap()


def grant_pool(
    hc: Hypercalls, peer: int, device: str, pages: int, *, readonly: bool
) -> tuple[int, GrantPool, list[int]]:
    """A frontend's pool of ``pages`` from hyperd for ``device`` (``xenbus.device_name``), every
    page zeroed (nothing of ours may leak through a fresh page, XSA-403) and granted to
    ``peer``: (pool id, pool, grefs)."""
    info = hc.call(GnttabSetupPool(peer=peer, device=device, pages=pages))
    pool = GrantPool.open(info["name"], info["gref_base"], info["pages"])
    grefs = []
    for i in range(pages):
        pool.page(i)[:] = bytes(PAGE_SIZE)
        grefs.append(pool.grant(i, peer, readonly=readonly))
    return info["pool"], pool, grefs


def release_pool(hc: Hypercalls, pool_id: int, pool: GrantPool) -> None:
    """Unmap ``pool`` and give it back to hyperd. A refusal is ignored: EINVAL says the pool
    is gone already, HypervisorGone that the domain is going away, and a release that timed
    out (hyperd down, or our credit spent) is still queued on our socket, which hyperd serves
    in order, so it is done before any later call of ours: no pool we set up next for the
    device finds this one still live beside it (a backend counts both against its bound)."""
    pool.close()
    with contextlib.suppress(HypercallError):
        hc.call(GnttabReleasePool(pool=pool_id))

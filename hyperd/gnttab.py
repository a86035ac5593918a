"""Grant bookkeeping: which pool of pages each domain may grant to which peer, for which device.

Pools are created at the granter's request (a few per device) with a fresh range of grant refs
in the granter's ref space; a peer may map a pool only if the granter named it when the pool
was set up, and is told of it only when it asks for the device the granter named then
(``<type>/<devid>``: a device's backend maps that device's pools, none of another device's).
Entries inside a pool (which page is granted, read-only or not) are written by the granter and
checked by the grantee (channels/gnttab.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from channels.gnttab import pool_bytes
from channels.ring import PAGE_SIZE
from hyperd.resources import Resources

MAX_POOL_PAGES_PER_DOMAIN = 1 << 16  # 256 MiB of grantable memory per domain, at most
MAX_POOLS_PER_DOMAIN = 256  # a frontend sets up 3 per device; each is a /dev/shm object


def grant_budget(memory_mib: int) -> int:
    """The pages a domain of ``memory_mib`` may have in grant pools at once: never more than
    its memory, as a page a Xen guest grants is its own. Honest frontends touch every page they
    grant (grant_pool zeroes them), so their own memory limit came first. A backend device maps
    no more of it than its protocol can use (channels/grants.py): a page the guest never
    touched is charged to dom0 as the backend touches it."""
    return min(MAX_POOL_PAGES_PER_DOMAIN, memory_mib * (1 << 20) // PAGE_SIZE)


class GnttabError(Exception):
    def __init__(self, errno_name: str, message: str) -> None:
        super().__init__(message)
        self.errno_name = errno_name


@dataclass(frozen=True)
class Pool:
    pool: int
    granter: int
    peer: int
    device: str  # <type>/<devid>, as the granter named it
    name: str
    gref_base: int
    pages: int

    def result(self) -> dict[str, object]:
        return {
            "pool": self.pool,
            "name": self.name,
            "gref_base": self.gref_base,
            "pages": self.pages,
        }


class GrantTables:
    def __init__(self) -> None:
        self._pools: dict[tuple[int, int], Pool] = {}
        self._next_gref: dict[int, int] = {}
        self._next_pool: dict[int, int] = {}

    def setup_pool(
        self,
        granter: int,
        peer: int,
        device: str,
        pages: int,
        resources: Resources,
        budget: int = MAX_POOL_PAGES_PER_DOMAIN,
    ) -> Pool:
        """A new pool of ``pages`` that ``granter`` may grant to ``peer`` for ``device``,
        within the granter's ``budget`` of pages in pools at once (``grant_budget``)."""
        pools = self.pools_of(granter)
        if len(pools) >= MAX_POOLS_PER_DOMAIN:
            raise GnttabError("ENOSPC", f"domain {granter}: {len(pools)} grant pools, the limit")
        held = sum(p.pages for p in pools)
        if held + pages > budget:
            raise GnttabError(
                "ENOSPC",
                f"domain {granter}: {held} pages in grant pools, {pages} more "
                f"would pass its budget of {budget}",
            )
        # Grant refs 0..7 are reserved, as in Xen (console and store rings live there).
        base = self._next_gref.get(granter, 8)
        pool_id = self._next_pool.get(granter, 0)
        opener = resources.counterpart(granter, peer)
        name = resources.new_segment(f"gnt{pool_id}", pool_bytes(pages), opener)
        pool = Pool(pool_id, granter, peer, device, name, base, pages)
        self._pools[granter, pool_id] = pool
        self._next_gref[granter] = base + pages
        self._next_pool[granter] = pool_id + 1
        return pool

    def pools_for(self, caller: int, granter: int, device: str) -> list[Pool]:
        """The pools of ``granter`` for ``device`` that ``caller`` may map."""
        return [p for p in self.pools_of(granter) if p.peer == caller and p.device == device]

    def hand_over(
        self,
        granter: int,
        device: str,
        to: int,
        serves: Callable[[int], bool],
        resources: Resources,
    ) -> None:
        """``granter``'s pools for ``device`` granted to a domain that no longer serves it (a
        driver domain that died) go to ``to``, which serves it now: as a Xen frontend grants
        its pages again to the backend it reconnects to, done here so that the pages in
        flight stay where they are. ``serves(domid)`` says whether a domain serves the device;
        ``resources`` are the granter's."""
        for key, pool in list(self._pools.items()):
            if pool.granter != granter or pool.device != device or pool.peer == to:
                continue
            if serves(pool.peer):
                continue
            resources.reshare(pool.name, to)
            self._pools[key] = replace(pool, peer=to)

    def release_pool(self, granter: int, pool_id: int, resources: Resources) -> None:
        pool = self._pools.pop((granter, pool_id), None)
        if pool is None:
            raise GnttabError("EINVAL", f"domain {granter} has no pool {pool_id}")
        resources.drop_segment(pool.name)

    def release_domain(self, domid: int, resources: Resources) -> None:
        for pool in self.pools_of(domid):
            self.release_pool(domid, pool.pool, resources)
        self._next_gref.pop(domid, None)
        self._next_pool.pop(domid, None)

    def pools_of(self, domid: int) -> list[Pool]:
        return [p for (g, _), p in self._pools.items() if g == domid]

    def to_dict(self) -> dict[str, Any]:
        """Every pool and each granter's next gref and pool id, for hyperd's state file."""
        return {
            "pools": [asdict(p) for _, p in sorted(self._pools.items())],
            "next_gref": {str(d): n for d, n in sorted(self._next_gref.items())},
            "next_pool": {str(d): n for d, n in sorted(self._next_pool.items())},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GrantTables:
        """The tables ``to_dict`` wrote (each pool's segment is one of a domain's Resources)."""
        tables = cls()
        for entry in data["pools"]:
            pool = Pool(
                int(entry["pool"]),
                int(entry["granter"]),
                int(entry["peer"]),
                str(entry["device"]),
                str(entry["name"]),
                int(entry["gref_base"]),
                int(entry["pages"]),
            )
            tables._pools[pool.granter, pool.pool] = pool
        tables._next_gref = {int(d): int(n) for d, n in data["next_gref"].items()}
        tables._next_pool = {int(d): int(n) for d, n in data["next_pool"].items()}
        return tables

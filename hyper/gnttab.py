"""Grant bookkeeping: which pool of pages each domain may grant to which peer.

Pools are created at the granter's request (one per device connection) with a fresh range of
grant refs in the granter's ref space; a peer may map a pool only if the granter named it when
the pool was set up. Entries inside a pool (which page is granted, read-only or not) are written
by the granter and checked by the grantee (channels/gnttab.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from channels.gnttab import pool_bytes
from hyper.resources import Resources, sharing_gid

MAX_POOL_PAGES_PER_DOMAIN = 1 << 16  # 256 MiB of grantable memory per domain
MAX_POOLS_PER_DOMAIN = 256  # a frontend sets up 3 per device; each is a /dev/shm object


class GnttabError(Exception):
    def __init__(self, errno_name: str, message: str) -> None:
        super().__init__(message)
        self.errno_name = errno_name


@dataclass(frozen=True)
class Pool:
    pool: int
    granter: int
    peer: int
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

    def setup_pool(self, granter: int, peer: int, pages: int, resources: Resources) -> Pool:
        pools = self.pools_of(granter)
        if len(pools) >= MAX_POOLS_PER_DOMAIN:
            raise GnttabError("ENOSPC", f"domain {granter}: {len(pools)} grant pools, the limit")
        if sum(p.pages for p in pools) + pages > MAX_POOL_PAGES_PER_DOMAIN:
            raise GnttabError("ENOSPC", f"domain {granter}: grant pool limit reached")
        try:
            gid = sharing_gid(granter, peer)
        except PermissionError as exc:
            raise GnttabError("EPERM", str(exc)) from exc
        # Grant refs 0..7 are reserved, as in Xen (console and store rings live there).
        base = self._next_gref.get(granter, 8)
        pool_id = self._next_pool.get(granter, 0)
        name = resources.new_segment(f"gnt{pool_id}", pool_bytes(pages), gid)
        pool = Pool(pool_id, granter, peer, name, base, pages)
        self._pools[granter, pool_id] = pool
        self._next_gref[granter] = base + pages
        self._next_pool[granter] = pool_id + 1
        return pool

    def map_pool(self, caller: int, granter: int, gref: int) -> Pool:
        for pool in self.pools_of(granter):
            if pool.gref_base <= gref < pool.gref_base + pool.pages:
                if pool.peer != caller:
                    raise GnttabError(
                        "EPERM", f"gref {gref} of domain {granter} is not granted to {caller}"
                    )
                return pool
        raise GnttabError("EINVAL", f"domain {granter} has no gref {gref}")

    def pools_for(self, caller: int, granter: int) -> list[Pool]:
        """Every pool of ``granter`` that ``caller`` may map."""
        return [p for p in self.pools_of(granter) if p.peer == caller]

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
                str(entry["name"]),
                int(entry["gref_base"]),
                int(entry["pages"]),
            )
            tables._pools[pool.granter, pool.pool] = pool
        tables._next_gref = {int(d): int(n) for d, n in data["next_gref"].items()}
        tables._next_pool = {int(d): int(n) for d, n in data["next_pool"].items()}
        return tables

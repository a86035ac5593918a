"""A grantee's view of every pool a granting domain shares with it, mapped on first use.

A backend sees only grant refs in requests. It maps every pool the frontend set up for it as it
connects (``map_pools``: one ``gnttab_map_pools`` hypercall, passed to a data-path worker in its
parameters), so the data path makes no hypercall and runs on while no hyperd does. A ref in a
pool set up later costs one ``gnttab_map_pool`` hypercall (which hyperd refuses unless the pool
was set up for the caller); every ref then resolves locally, checked on a copy of its entry.

A ref that passed its check stays usable, as a persistent grant does in Xen (blkif's and
netif-staging's): frontends grant their buffer pages once per connection and reuse them, and
checking each use again costs the data path more than anything else per slot. Ending access
to a page the backend already used therefore does not take it back before the connection
ends, which can only ever expose the granter's own page of its own pool to this backend.
"""

from __future__ import annotations

import threading

from channels.gnttab import GrantError, MappedPool
from channels.hypercall import GnttabMapPool, GnttabMapPools, HypercallClient, HypercallError
from channels.shm import ShmError

#: Refs remembered per connection: a frontend's whole buffer pools (netif: 2 x 256 pages).
MAX_CHECKED = 4096


def map_pools(hc: HypercallClient, granter: int) -> list[dict[str, int | str]]:
    """What hyperd says of every pool ``granter`` set up for us: ``GrantMapper``'s ``known``."""
    return list(hc.call(GnttabMapPools(granter=granter))["pools"])


class GrantMapper:
    def __init__(
        self,
        hc: HypercallClient,
        granter: int,
        domid: int,
        known: list[dict[str, int | str]] | None = None,
    ) -> None:
        """``known``: pools to map now, as ``map_pools`` gives them."""
        self._hc = hc
        self.granter = granter
        self.domid = domid
        self._pools: list[MappedPool] = []
        # Pages already checked, by gref: [read-only use, writable use].
        self._checked: tuple[dict[int, memoryview], dict[int, memoryview]] = ({}, {})
        self._lock = threading.Lock()
        try:
            for info in known or []:
                self._pools.append(self._open(info))
        except (KeyError, TypeError, ValueError, ShmError) as exc:
            self.close()
            raise GrantError(f"pools of domain {granter}: {exc}") from exc

    def _pool(self, gref: int) -> MappedPool:
        for pool in self._pools:
            if gref in pool:
                return pool
        with self._lock:
            for pool in self._pools:
                if gref in pool:
                    return pool
            try:
                info = self._hc.call(GnttabMapPool(granter=self.granter, gref=gref))
            except HypercallError as exc:
                raise GrantError(f"gref {gref} of domain {self.granter}: {exc.message}") from exc
            except ValueError as exc:  # a gref that no request model accepts (negative...)
                raise GrantError(f"gref {gref}: {exc}") from exc
            pool = self._open(info)
            self._pools = [*self._pools, pool]
            return pool

    def _open(self, info: dict[str, int | str]) -> MappedPool:
        name, base, pages = str(info["name"]), int(info["gref_base"]), int(info["pages"])
        return MappedPool.open(name, base, pages, self.domid)

    def resolve(self, gref: int, *, write: bool) -> memoryview:
        """The granted page behind ``gref``; GrantError if the granter did not allow it."""
        checked = self._checked[write]
        page = checked.get(gref)
        if page is None:
            page = self._pool(gref).resolve(gref, write=write)
            if len(checked) < MAX_CHECKED:
                checked[gref] = page
        return page

    def close(self) -> None:
        with self._lock:
            pools, self._pools = self._pools, []
            for checked in self._checked:
                checked.clear()
        for pool in pools:
            pool.close()

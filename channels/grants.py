"""A grantee's view of the pools a granting domain shares with it: mapped as it connects,
refreshed on a miss, bounded.

A backend sees only grant refs in requests. It maps every pool the frontend set up for it as it
connects (``map_pools``: one ``gnttab_map_pools`` hypercall, passed to a data-path worker in its
parameters), so the data path makes no hypercall and runs on while no hyperd does.

A miss (a ref in no pool we map) *refreshes*: one ``gnttab_map_pools`` call names the pools
live now; the ones set up since are mapped, and the ones the granter released since are
dropped. So a backend maps what was live at its last refresh, and a pool the granter released
goes at the next miss (an honest frontend releases its pools only as its device closes, and
never misses). What a mapper may hold is bounded by the granter's grant budget, ``max_pages``
(the pages hyperd lets it have in pools at once), counted on what is *mapped*, not on what is
live: a dropped pool stays mapped while the data path still holds one of its pages (a request
in flight, a posted rx buffer, a checked page cached by a thread that raced the refresh), and
counts until it is unmapped. Going past the budget is the granter's doing (it released pools
under requests it had posted): GrantViolation, and its device fails.

Misses cost dom0 and hyperd a round trip each, so they are paid for. A miss whose ref is in no
live pool even after the refresh is a *bad gref*: answered as any bad ref (GrantError), and
counted; past ``BAD_GREF_BUDGET`` in one connection the device fails (GrantViolation). A miss
that does resolve follows the granter's own ``gnttab_setup_pool`` call; those refreshes are
paced (``REFRESH_BURST`` at once, then ``REFRESHES_PER_SECOND``), so a granter cycling pools
waits on its own device and costs dom0 a bounded rate of calls.

A ref that passed its check stays usable while its pool is mapped, as a persistent grant does
in Xen (blkif's and netif-staging's): frontends grant their buffer pages once per connection and
reuse them, and checking each use again costs the data path more than anything else per slot.
Ending access to a page the backend already used therefore does not take it back before the
pool is released, which can only ever expose the granter's own page of its own pool to this
backend.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any

from channels.credit import Credit
from channels.gnttab import GrantError, GrantViolation, MappedPool
from channels.hypercall import GnttabMapPools, HypercallClient, HypercallError
from channels.shm import ShmError

#: Refs remembered per connection: a frontend's whole buffer pools (netif: 2 x 256 pages).
MAX_CHECKED = 4096
#: Refs in no live pool a connection may name before its device fails. An honest frontend
#: names none; the slack is for a buggy one to be reported, one error response at a time.
BAD_GREF_BUDGET = 64
REFRESH_BURST = 16
REFRESHES_PER_SECOND = 50.0


def map_pools(hc: HypercallClient, granter: int) -> dict[str, Any]:
    """hyperd's word on every pool ``granter`` set up for us, and on its grant budget
    (``{"pools": [...], "max_pages": N}``): ``GrantMapper``'s ``known``."""
    return dict(hc.call(GnttabMapPools(granter=granter)))


class GrantMapper:
    def __init__(
        self,
        hc: HypercallClient,
        granter: int,
        domid: int,
        known: dict[str, Any] | None = None,
    ) -> None:
        """``known``: the pools to map now, and the budget, as ``map_pools`` gives them."""
        self._hc = hc
        self.granter = granter
        self.domid = domid
        self.max_pages = 0  # the granter's grant budget, as of the last refresh
        self.bad_grefs = 0
        self.bad_gref_budget = BAD_GREF_BUDGET
        self._pace = Credit(REFRESHES_PER_SECOND, REFRESH_BURST)
        self._pools: list[MappedPool] = []  # replaced, never changed: read without the lock
        # Pools dropped at a refresh, while the data path may still hold pages of them.
        self._dropped: list[tuple[weakref.ref[Any], int]] = []
        # Pages already checked, by gref: [read-only use, writable use].
        self._checked: tuple[dict[int, memoryview], dict[int, memoryview]] = ({}, {})
        self._lock = threading.Lock()
        if known is not None:
            try:
                self._adopt(known)
            except (GrantError, GrantViolation):
                self.close()
                raise

    def resolve(self, gref: int, *, write: bool) -> memoryview:
        """The granted page behind ``gref``. GrantError if the granter did not allow it;
        GrantViolation if the granter has broken the rules (the device must fail)."""
        checked = self._checked[write]
        page = checked.get(gref)
        if page is None:
            page = self._pool(gref).resolve(gref, write=write)
            if len(checked) < MAX_CHECKED:
                checked[gref] = page
        return page

    def mapped_pages(self) -> int:
        """Pages this mapper keeps mapped: the live pools', and the dropped ones' still held."""
        with self._lock:
            return sum(pool.pages for pool in self._pools) + self._lingering()

    def close(self) -> None:
        with self._lock:
            pools, self._pools = self._pools, []
            for checked in self._checked:
                checked.clear()
        for pool in pools:
            pool.close()

    # -- misses ---------------------------------------------------------------------------------

    def _pool(self, gref: int) -> MappedPool:
        for pool in self._pools:
            if gref in pool:
                return pool
        with self._lock:
            for pool in self._pools:  # another thread's refresh may have mapped it
                if gref in pool:
                    return pool
            return self._miss(gref)

    def _miss(self, gref: int) -> MappedPool:
        """Refresh; the pool holding ``gref``, or a GrantError counted as a bad gref."""
        try:
            self._refresh()
        except GrantError:
            self._bad_gref(gref)
            raise
        for pool in self._pools:
            if gref in pool:
                # Charged after the fact: only the refreshes that resolve are paced.
                delay = self._pace.charge(1.0)
                if delay:
                    time.sleep(delay)
                return pool
        self._bad_gref(gref)
        raise GrantError(f"gref {gref} is in no pool domain {self.granter} granted us")

    def _bad_gref(self, gref: int) -> None:
        self.bad_grefs += 1
        if self.bad_grefs > self.bad_gref_budget:
            raise GrantViolation(
                f"domain {self.granter} named {self.bad_grefs} grefs in none of its pools "
                f"(the last: {gref}), more than the {self.bad_gref_budget} allowed"
            )

    def _refresh(self) -> None:
        try:
            known = self._hc.call(GnttabMapPools(granter=self.granter))
        except HypercallError as exc:
            raise GrantError(f"pools of domain {self.granter}: {exc.message}") from exc
        self._adopt(known)

    # -- what is mapped -------------------------------------------------------------------------

    def _adopt(self, known: dict[str, Any]) -> None:
        """Map the pools ``known`` names, after dropping the ones it no longer names; refuse
        to map past the budget."""
        try:
            live = {str(p["name"]): (int(p["gref_base"]), int(p["pages"])) for p in known["pools"]}
            max_pages = int(known["max_pages"])
        except (KeyError, TypeError, ValueError) as exc:
            raise GrantError(f"pools of domain {self.granter}: {exc!r}") from exc
        self._drop([pool for pool in self._pools if pool.name not in live])
        for pool in self._pools:
            live.pop(pool.name)
        mapped = sum(pool.pages for pool in self._pools) + self._lingering()
        wanted = mapped + sum(pages for _, pages in live.values())
        self.max_pages = max_pages
        if wanted > max_pages:
            raise GrantViolation(
                f"domain {self.granter}'s pools would have us map {wanted} pages, "
                f"more than its grant budget of {max_pages}"
            )
        opened: list[MappedPool] = []
        try:
            for name, (base, pages) in live.items():
                opened.append(MappedPool.open(name, base, pages, self.domid))
        except ShmError as exc:
            for pool in opened:
                pool.close()
            raise GrantError(f"pools of domain {self.granter}: {exc}") from exc
        self._pools = [*self._pools, *opened]

    def _drop(self, gone: list[MappedPool]) -> None:
        """Forget pools the granter released: each one's pages are unmapped as soon as the
        data path holds none of them (a page in use is never unmapped under its user)."""
        if not gone:
            return
        self._pools = [pool for pool in self._pools if pool not in gone]
        for checked in self._checked:  # they may hold pages of the gone pools
            checked.clear()
        self._dropped += [(pool.mapped(), pool.pages) for pool in gone]

    def _lingering(self) -> int:
        self._dropped = [(ref, pages) for ref, pages in self._dropped if ref() is not None]
        return sum(pages for _, pages in self._dropped)

"""A grantee's view of the pools a granting domain shares with it: mapped as it connects,
refreshed on a miss, bounded.

A backend sees only grant refs in requests. It maps every pool the frontend set up for the
device it serves as it connects (``map_pools``: one ``gnttab_map_pools`` hypercall, passed to a
data-path worker in its parameters), so the data path makes no hypercall and runs on while no
hyperd does. Pools are per device (the frontend names the device as it sets a pool up, the
backend as it asks): a backend never maps another device's pages, nor another domain's.

The mapper opens nothing by name: every pool it is told of comes open, as an fd of its own
(``"fd"`` in the pool's entry; ``"error"`` instead if it could not be opened), from whoever asked
hyperd (``open_pools``): dom0, for a worker that has dropped its privilege and may not open the
root-owned objects in /dev/shm (backends/privilege.py). The mapper owns those fds: it maps the
pools it did not map yet, and closes every fd it is given.

A miss (a ref in no pool we map) *refreshes*: one ``gnttab_map_pools`` call names the pools live
now; the ones set up since are mapped, and the ones the granter released since are dropped. So a
backend maps what was live at its last refresh, and a pool the granter released goes at the next
miss (an honest frontend releases its pools only as its device closes, and never misses). A
dropped pool stays mapped while the data path holds a page it was handed from it (a request in
flight, a posted rx buffer, a ring): Python's ``mmap`` refuses to unmap while such a view is
alive. Each later refresh (that is, each later miss) tries again and unmaps it if none is left,
and until then the pool counts against what the mapper may hold; ``close`` lets go of every pool
at the end of the connection. What a mapper may hold is bounded by what its device's protocol
can have in use at once (``DeviceGrants.max_pages``: netif's 514 pages, blkif's 8225), and by
the granter's grant budget (the pages hyperd lets it have in pools at once, for all its
devices), counted on what is *mapped*, not on what is live. An honest frontend grants no more
than its protocol can use, and releases no pool under its own requests; going past the bound is
the granter's doing (more pools for the device than it can use, named for the wrong device, or
released under requests it had posted): ProtocolViolation, and that device fails, no other. So dom0
maps at most the sum of its devices' bounds for a domain, whatever the domain's memory.

Misses cost dom0 and hyperd a round trip each, so they are paid for. A miss whose ref is in no
live pool even after a refresh that succeeded is a *bad gref*: answered as any bad ref
(GrantError), and counted (in the device's counters too); past ``BAD_GREF_BUDGET`` in one
connection the device fails (ProtocolViolation). So is a miss whose refresh finds that a live pool
cannot be mapped (``MappedPool.from_fd``: not the size hyperd made it): hyperd made it and named it
live, and only the granter, which maps it read-write, can have truncated it. A refresh that
fails (dom0 or hyperd not answering) is not the granter's doing: its miss is answered
GrantError, and not counted. The other refreshes follow the granter's own ``gnttab_setup_pool``
calls (or a failure on our side); they are paced (``REFRESH_BURST`` at once, then
``REFRESHES_PER_SECOND``), so a granter cycling pools waits on its own device and costs dom0 a
bounded rate of calls. One refresh runs at a time; a miss that waited for one begun after it
takes that one's answer. Neither a refresh nor its pacing holds the lock that lookups and
``close`` take.

A ref that passed its check stays usable while its pool is mapped, as a persistent grant does
in Xen (blkif's and netif-staging's): frontends grant their buffer pages once per connection and
reuse them, and checking each use again costs the data path more than anything else per slot.
Ending access to a page the backend already used therefore does not take it back before the
pool is released, which can only ever expose the granter's own page of its own pool to this
backend. The remembered pages are looked up without a lock (the data path's hot path); they
are remembered, and forgotten as a refresh drops their pool, under the lock.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

from channels.credit import Credit
from channels.errors import ProtocolViolation
from channels.gnttab import GrantError, MappedPool
from channels.hypercall import GnttabMapPools, HypercallError, Hypercalls
from channels.shm import ShmError, open_segment

#: Refs remembered per connection: a frontend's whole buffer pools (netif: 2 x 256 pages).
MAX_CHECKED = 4096
#: Refs in no live pool a connection may name before its device fails. An honest frontend
#: names none; the slack is for a buggy one to be reported, one error response at a time.
BAD_GREF_BUDGET = 64
REFRESH_BURST = 16
REFRESHES_PER_SECOND = 50.0


@dataclass(frozen=True)
class DeviceGrants:
    """What one backend device maps: the pools ``granter`` set up for device ``name``
    (``xenbus.device_name``), at most ``max_pages`` pages of them (what the device's protocol
    can have in use at once: ``netif.MAX_GRANT_PAGES``, ``blkif.MAX_GRANT_PAGES``), their pages
    checked as granted to ``grantee`` (us)."""

    granter: int
    name: str
    max_pages: int
    grantee: int = 0

    def __str__(self) -> str:
        return f"{self.name} of domain {self.granter}"


def map_pools(hc: Hypercalls, granter: int, device: str) -> dict[str, Any]:
    """hyperd's word on the pools ``granter`` set up for us and its ``device``, and on its grant
    budget (``{"pools": [...], "max_pages": N}``): ``GrantMapper``'s ``known``."""
    return dict(hc.call(GnttabMapPools(granter=granter, device=device)))


def open_pools(known: dict[str, Any]) -> dict[str, Any]:
    """``known`` (``map_pools``'s answer) with each pool opened: its entry gets ``"fd"``, an fd
    the caller owns (to hand to a mapper, which closes it), or ``"error"``, why it could not be
    opened (the granter released it since, say). In the process that may open the names."""
    pools = []
    for entry in known.get("pools", []):
        try:
            pools.append({**entry, "fd": open_segment(str(entry["name"]))})
        except (ShmError, ValueError) as exc:
            pools.append({**entry, "error": str(exc)})
    return {**known, "pools": pools}


def pool_fds(known: dict[str, Any]) -> list[int]:
    """The fds ``open_pools`` put in ``known``, in pool order."""
    return [entry["fd"] for entry in known.get("pools", []) if isinstance(entry.get("fd"), int)]


def close_pool_fds(known: dict[str, Any]) -> None:
    for fd in pool_fds(known):
        with contextlib.suppress(OSError):
            os.close(fd)


class BadGrefCount(Protocol):
    """Where a mapper also counts its connection's bad grefs: the device's counters."""

    bad_grefs: int


class GrantMapper:
    def __init__(
        self,
        hc: Hypercalls,
        device: DeviceGrants,
        known: dict[str, Any] | None = None,
        *,
        counters: BadGrefCount | None = None,
        bad_gref_budget: int = BAD_GREF_BUDGET,
    ) -> None:
        """``known``: the pools to map now, opened, and the budget, as ``open_pools`` gives
        them; ``hc`` answers each refresh so too (a worker's link to dom0)."""
        self._hc = hc
        self.device = device
        self.bad_grefs = 0  # in this connection: what the budget counts
        self._counters = counters
        self._bad_gref_budget = bad_gref_budget
        self._pace = Credit(REFRESHES_PER_SECOND, REFRESH_BURST)
        # Taken for moments only, never across a hypercall or a sleep: the pools, the pages
        # remembered, the counts and the credit.
        self._lock = threading.Lock()
        self._closed = False
        self._pools: list[MappedPool] = []  # mapped and live at the last refresh
        self._dropped: list[MappedPool] = []  # released, still mapped: the data path holds pages
        # Pages already checked, by gref: [read-only use, writable use].
        self._checked: tuple[dict[int, memoryview], dict[int, memoryview]] = ({}, {})
        self._refreshing = threading.Lock()  # one refresh at a time, held across its hypercall
        self._refreshes = 0  # refreshes begun
        self._failed: str | None = None  # why the last refresh failed; None if it succeeded
        self._broken: str | None = None  # how the last refresh found a pool the granter broke
        if known is not None:
            try:
                self._adopt_answer(known)
            except ShmError as exc:
                self.close()
                raise GrantError(f"pools of {self.device}: {exc}") from exc
            except (GrantError, ProtocolViolation):
                self.close()
                raise

    def resolve(self, gref: int, *, write: bool) -> memoryview:
        """The granted page behind ``gref``. GrantError if the granter did not allow it;
        ProtocolViolation if the granter has broken the rules (the device must fail)."""
        page = self._checked[write].get(gref)
        if page is None:
            page = self._check(gref, write)
        return page

    def native_pools(self) -> list[tuple[memoryview, int, int, int]]:
        """The pools mapped now, as a native pump looks refs up in them (channels.pumps):
        (mapping, first gref, pages, offset of page 0). The pump holds each mapping for as
        long as it lives, so a pool dropped meanwhile lingers (and counts) until it goes."""
        with self._lock:
            return [pool.native() for pool in self._pools]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pools = [*self._pools, *self._dropped]
            self._pools, self._dropped = [], []
            for checked in self._checked:
                checked.clear()
        for pool in pools:
            pool.close()

    # -- a ref not checked yet ------------------------------------------------------------------

    def _check(self, gref: int, write: bool) -> memoryview:
        page = self._mapped_page(gref, write)
        if page is None:
            page = self._miss(gref, write)
        return page

    def _mapped_page(self, gref: int, write: bool) -> memoryview | None:
        """The page behind ``gref`` if a pool we map holds it (None if none does), checked and
        remembered. Under the lock: a refresh cannot drop the pool between the two."""
        with self._lock:
            for pool in self._pools:
                if gref in pool:
                    page = pool.resolve(gref, write=write)
                    checked = self._checked[write]
                    if len(checked) < MAX_CHECKED:
                        checked[gref] = page
                    return page
        return None

    def _miss(self, gref: int, write: bool) -> memoryview:
        """Refresh, or take the answer of a refresh begun since this miss; then look again."""
        begun = self._refreshes
        with self._refreshing:
            made = self._refreshes == begun  # else one begun after our miss has answered it
            if made:
                self._refresh()
            failed, broken = self._failed, self._broken
        page = self._mapped_page(gref, write) if failed is None else None
        if page is None and failed is None:
            self._bad_gref(gref, broken)  # raises: a bad gref is budgeted, not paced
        if made:
            self._wait_for_credit()
        if page is None:
            raise GrantError(f"gref {gref}: no answer on the pools of {self.device}: {failed}")
        return page

    def _refresh(self) -> None:
        """Ask which pools are live and adopt the answer (``_refreshing`` is held). ``_failed``
        says why no answer could be had (None if one was), ``_broken`` how the answer named a
        pool the granter broke (None if it did not)."""
        self._refreshes += 1
        self._failed = self._broken = None
        try:
            self._adopt_answer(map_pools(self._hc, self.device.granter, self.device.name))
        except HypercallError as exc:
            self._failed = exc.message or exc.errno_name
        except GrantError as exc:
            self._failed = str(exc)
        except ShmError as exc:
            # hyperd made the pool, and named it live: only the granter, which maps it
            # read-write, can have truncated it. Its doing, answered as its miss's bad gref.
            self._broken = str(exc)
        except ProtocolViolation as exc:
            self._failed = str(exc)
            raise

    def _bad_gref(self, gref: int, broken: str | None) -> NoReturn:
        """Count a gref in no live pool we could map; ``broken``: a pool the granter broke."""
        with self._lock:
            self.bad_grefs += 1
            if self._counters is not None:
                self._counters.bad_grefs += 1
            bad = self.bad_grefs
        why = f" ({broken})" if broken else ""
        if bad > self._bad_gref_budget:
            raise ProtocolViolation(
                f"{self.device} named {bad} grefs in none of its pools "
                f"(the last: {gref}{why}), more than the {self._bad_gref_budget} allowed"
            )
        raise GrantError(f"gref {gref} is in no pool of {self.device}{why}")

    def _wait_for_credit(self) -> None:
        """Charge one refresh; wait out what it overdrew, holding no lock."""
        with self._lock:
            delay = self._pace.charge(1.0)
        if delay:
            time.sleep(delay)

    # -- what is mapped (the lock is held) ------------------------------------------------------

    def _adopt_answer(self, known: dict[str, Any]) -> None:
        """``_adopt`` under the lock; every fd in ``known`` is closed, whatever happens."""
        try:
            with self._lock:
                self._adopt(known)
        finally:
            close_pool_fds(known)

    def _adopt(self, known: dict[str, Any]) -> None:
        """Map the pools ``known`` names, after dropping the ones it no longer names; refuse
        to map past the budget (ProtocolViolation), or any if one cannot be mapped (ShmError)."""
        if self._closed:
            raise GrantError(f"pools of {self.device}: the mapper is closed")
        try:
            live = {
                str(p["name"]): (int(p["gref_base"]), int(p["pages"]), p) for p in known["pools"]
            }
            budget = int(known["max_pages"])
        except (KeyError, TypeError, ValueError) as exc:
            raise GrantError(f"pools of {self.device}: {exc!r}") from exc
        self._drop([pool for pool in self._pools if pool.name not in live])
        mapped = {pool.name for pool in self._pools}
        new = {name: pool for name, pool in live.items() if name not in mapped}
        held = sum(pool.pages for pool in self._pools) + self._lingering()
        wanted = held + sum(pages for _, pages, _ in new.values())
        if wanted > min(self.device.max_pages, budget):
            raise ProtocolViolation(
                f"the pools of {self.device} would have us map {wanted} pages, more than "
                f"the {self.device.max_pages} its protocol can use or the grant budget of "
                f"{budget} of domain {self.device.granter}"
            )
        opened: list[MappedPool] = []
        try:
            for name, (base, pages, entry) in new.items():
                fd = _pool_fd(name, entry)
                opened.append(MappedPool.from_fd(fd, name, base, pages, self.device.grantee))
        except ShmError:
            for pool in opened:
                pool.close()
            raise
        self._pools = [*self._pools, *opened]

    def _drop(self, gone: list[MappedPool]) -> None:
        """Forget pools the granter released, and the pages remembered from any pool (a
        rare event: an honest granter releases no pool while connected)."""
        if not gone:
            return
        self._pools = [pool for pool in self._pools if pool not in gone]
        for checked in self._checked:
            checked.clear()
        self._dropped += gone

    def _lingering(self) -> int:
        """Pages of the dropped pools still mapped: each is unmapped here if the data path
        holds none of its pages any more (never under its user), and counted until then."""
        self._dropped = [pool for pool in self._dropped if not pool.unmap()]
        return sum(pool.pages for pool in self._dropped)


def _pool_fd(name: str, entry: dict[str, Any]) -> int:
    """The fd ``open_pools`` put in pool ``name``'s entry; ShmError with the reason it could
    not be opened, if it could not."""
    fd = entry.get("fd")
    if not isinstance(fd, int):
        raise ShmError(str(entry.get("error") or f"shared memory segment {name}: not opened"))
    return fd

"""The store's stub domain (Xen's xenstore stubdom): its build, and its restart each time it dies.

With ``hyperd --store-domain`` the store runs in a domain of its own, ``Xenstore``, built before
dom0 and kept as long as the hypervisor runs. It is a domU in every way the host sees (its own
namespaces, ids, cgroup and /dev/shm view, no host privilege): its kernel
(domu/stubdom.py) runs the store instead of frontends and a workload. Every domain's store ring
is made between that domain and this one, dom0's included, so dom0's toolstack reaches the store
through a ring with dom0's privileges there, as every other domain does; the store domain asks
hyperd for the rings it serves (``StoreRings``) and hyperd answers it alone.

Its tree lives on in a host directory of the run directory that only its kernel's uid may enter,
bound into its sandbox (``state_dir``), where its journal (xenstored/journal.py) is kept.

When it dies it is restarted in place, as dom0 is: the same domain id, so every ring, event
channel and shared object stays as it was, and its cgroup, once nothing of the dead one runs
there. The new store recovers its tree from the journal and takes each ring over; the clients
reconnect and resend (xenstore-ring.txt's reconnection), their watches registered again. A store
domain that keeps dying soon after it starts is restarted after a wait that doubles, up to a
limit. hyperd tells it when dom0 restarts (``dom0_restarted``): dom0's new store client starts
from a fresh connection, the old one's watches and transactions gone with the old dom0.
"""

from __future__ import annotations

import logging
import os
import selectors
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from channels.config import DomainConfig
from channels.ids import uid_base
from hyperd.domain import Domain, RingInfo, Status, cgroup_limits, spawn_boot
from hyperd.resources import Resources

if TYPE_CHECKING:
    from pathlib import Path

    from hyperd.hypervisor import Hypervisor

log = logging.getLogger("hyperd")

STORE_DOMAIN_NAME = "Xenstore"
#: Its tree, its connections' queues, and one relay process per domain (forks of its kernel):
#: room for a few hundred domains, each at xenstored's default quota.
STORE_DOMAIN_MEMORY_MIB = 1024
#: Its tasks: the store's threads (two per connection) and each relay's (three).
STORE_DOMAIN_PIDS = 16384
STABLE = 5.0  # seconds up after which a death restarts it at once
BACKOFF = (0.25, 30.0)  # first and longest wait before restarting one that keeps dying


def store_domain_config() -> DomainConfig:
    """Every domain's store calls go through it: as many vcpus as the host has CPUs, as dom0."""
    vcpus = os.cpu_count() or 1
    return DomainConfig(name=STORE_DOMAIN_NAME, memory=STORE_DOMAIN_MEMORY_MIB, vcpus=vcpus)


class StoreDomainLifecycle:
    """Builds the store domain for the hypervisor ``hv``, and restarts it when it dies."""

    def __init__(self, hv: Hypervisor) -> None:
        self.hv = hv
        self._started = 0.0  # monotonic
        self._backoff = 0.0
        self.restart_at: float | None = None  # monotonic, while a restart waits

    @property
    def domain(self) -> Domain | None:
        domid = self.hv.store_domid
        return None if domid is None else self.hv.domains.get(domid)

    @property
    def state_dir(self) -> Path:
        """Where its journal lives on the host: the run directory's, its kernel's alone."""
        return self.hv.run.store_dir

    def build(self) -> Domain:
        """Build it (first thing, before dom0: dom0's store ring is made with it)."""
        config = store_domain_config()
        domid = self.hv.next_domid()
        domain = Domain(domid, config.name, config, Resources(domid))
        self.hv.store_domid = domid
        try:
            limits = replace(cgroup_limits(config), pids_max=STORE_DOMAIN_PIDS)
            domain.cgroup = self.hv.cgroups.create(f"dom{domid}", limits)
            domain.resources.open_view()
            self.state_dir.mkdir(mode=0o700, exist_ok=True)
            os.chown(self.state_dir, uid_base(domid), uid_base(domid))
            self.hv.domains[domid] = domain
            self._boot(domain, recover=False)
        except Exception:
            self.hv.domains.pop(domid, None)
            self.hv.store_domid = None
            self.hv.release(domain)
            raise
        log.info("dom%d (%s) created: the store's stub domain", domid, domain.name)
        return domain

    def _boot(self, domain: Domain, recover: bool) -> None:
        extra = {"role": "xenstore", "state_dir": str(self.state_dir), "recover": recover}
        spawn_boot(
            domain,
            self.hv.run.rootfs,
            self.hv.run.log(f"dom{domain.domid}"),
            self.hv.spawner.server(),
            extra=extra,
            fresh_log=not recover,
        )
        self._started = time.monotonic()
        assert domain.sock is not None and domain.sync is not None
        domain.sock.setblocking(False)
        self.hv.selector.register(domain.sock, selectors.EVENT_READ, ("hypercall", domain))
        self.hv.selector.register(domain.sync, selectors.EVENT_READ, ("sync", domain))
        self.hv.keeper.keep(domain)
        self.hv.watch_log(domain)

    def restarting(self, domain: Domain) -> bool:
        """``domain`` is the store domain, waiting to be started again (not a slow boot)."""
        return domain.domid == self.hv.store_domid and self.restart_at is not None

    def rings(self, domid: int | None) -> list[dict[str, Any]]:
        """The store rings it serves (of ``domid`` alone, if given): dom0's and every live
        domain's."""
        found = []
        for domain in self.hv.domains.values():
            ring = domain.store
            if ring is None or (domid is not None and domain.domid != domid):
                continue
            if domain.status in (Status.BUILDING, Status.RUNNING):
                found.append(_ring(domain.domid, ring))
        return found

    def on_death(self, domain: Domain, reason: str) -> None:
        """It stopped (``reason``: crash, poweroff or reboot): drop what was its process's and
        restart it once due (``restart_when_due``)."""
        log.error("the store domain dom%d stopped (%s); restarting it", domain.domid, reason)
        self.hv.stop_processes(domain)
        self.hv.forget_pidfd(domain)
        domain.status = Status.BUILDING
        domain.pid = domain.pid_start = None  # until its next kernel says its pid
        domain.shutdown_reason = domain.exit_code = None
        if time.monotonic() - self._started > STABLE:
            self._backoff = 0.0
        else:
            first, longest = BACKOFF
            self._backoff = min(longest, max(first, 2 * self._backoff))
            log.error("it died soon after starting: restarting it in %.2f s", self._backoff)
        self.restart_at = time.monotonic() + self._backoff

    def restart_when_due(self, now: float) -> bool:
        """Start the next store once its wait is over and nothing of the dead one runs. Never
        blocks: one look at its cgroup each time. True if it started."""
        due, domain = self.restart_at, self.domain
        if due is None or now < due or self.hv.halting or domain is None:
            return False
        if domain.cgroup is not None and domain.cgroup.kill():
            self.restart_at = now + 0.05
            return False
        self.restart_at = None
        domain.created = time.time()
        self._boot(domain, recover=True)
        return True

    def tell_dom0_restarted(self) -> None:
        """Tell it which life dom0 is in (at each dom0 start, and when a hyperd adopts it): a
        life it has not served dom0's ring for makes it take that ring over."""
        domain = self.domain
        if domain is not None and domain.sock is not None:
            self.hv.send_event(domain, "dom0_restarted", {"dom0_restarts": self.hv.dom0_restarts})


def _ring(domid: int, ring: RingInfo) -> dict[str, Any]:
    return {"domid": domid, "segment": ring.segment, "port": ring.dom0_port}

"""dom0's life as hyperd sees it: its start, and its restart each time it dies.

A dead dom0 is restarted only once every process in its cgroup is gone (its data-path workers
and relays are SIGKILLed, and the loop looks again, more and more rarely, without blocking): a
process in the middle of a write dies only after the write, so no write the old dom0 started
can land after one the new dom0 acknowledged. A dom0 that keeps dying soon after it starts is
restarted after a wait that doubles, up to a limit.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from channels.config import DOM0_NAME
from channels.forkserver import ChildSetup
from hyperd import cgroup
from hyperd.domain import Domain, Status, describe_wait_status, dom0_config, ring_sizes
from hyperd.hypercalls import domain_info, host_memory_mib
from hyperd.resources import Resources

if TYPE_CHECKING:
    from hyperd.hypervisor import Hypervisor

log = logging.getLogger("hyperd")

DOM0_STABLE = 5.0  # seconds up after which a dom0 death restarts it at once
DOM0_BACKOFF = (0.25, 30.0)  # first and longest wait before restarting a dom0 that keeps dying
DOM0_REAP_TICK = (0.01, 0.5)  # first and longest wait between looks at a dead dom0's cgroup
DOM0_REAP_WARN = 5.0  # seconds after which a dead dom0's processes not dying yet is logged
#: dom0's hypercall socket, in dom0.
DOM0_HYPERCALL_FD = 3


class Dom0Lifecycle:
    """Starts dom0 for the hypervisor ``hv``, and restarts it when it dies."""

    def __init__(self, hv: Hypervisor) -> None:
        self.hv = hv
        self._started = 0.0  # monotonic
        self._backoff = 0.0  # the wait before the last restart, 0 if it was at once
        self.restart_at: float | None = None  # monotonic, while a restart waits
        self._reap_warn_at: float | None = None  # monotonic: when to log leftovers
        self._reap_tick = DOM0_REAP_TICK[0]  # the wait before the next look at them

    def start(self) -> None:
        """Start dom0, making its record and cgroup the first time; tell it of every domain."""
        # What was pending for a dead dom0 is for nobody: a new one learns the domains below.
        self.hv.drop_events()
        dom0 = self.hv.domains.get(0)
        if dom0 is None:
            dom0 = Domain(
                0, DOM0_NAME, dom0_config(host_memory_mib(), os.cpu_count() or 1), Resources(0)
            )
            # dom0 is accounted, not limited: its group only measures what it uses.
            unlimited = cgroup.Limits(memory_mib=host_memory_mib(), pids_max=1 << 16)
            dom0.cgroup = self.hv.cgroups.create("dom0", unlimited)
            if self.hv.store_domid is not None:  # dom0 is the store's client, as every domain
                dom0.store = self.hv.ring(dom0, "store", ring_sizes()["store"])
            self.hv.domains[0] = dom0
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        assert dom0.cgroup is not None
        groups = dom0.cgroup.procs_file_paths()
        # One log per hypervisor run; a restarted dom0 adds to it.
        with open(self.hv.run.log("dom0"), "ab" if self.hv.dom0_restarts else "wb") as out:
            proc = self.hv.spawner.server().spawn(
                "dom0.main:main",
                [
                    "--hypercall-fd",
                    str(DOM0_HYPERCALL_FD),
                    "--run-dir",
                    str(self.hv.run.root),
                    *(["--recover"] if self.hv.dom0_restarts else []),
                    *(["--store-ring", json.dumps(dom0.store.as_dict())] if dom0.store else []),
                ],
                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                pass_fds={DOM0_HYPERCALL_FD: theirs.fileno()},
                # A new interpreter: the domains' kernels are forked from this same server, and
                # a kernel that knew dom0's string-hash secret could send dom0's store keys that
                # all collide in its dicts.
                setup=ChildSetup(
                    cgroup_procs=tuple(map(str, groups)),
                    comm="hyper-dom0",
                    fresh_interpreter=True,
                ),
            )
        theirs.close()
        dom0.set_pid(proc.pid)
        self._started = time.monotonic()
        dom0.process = proc
        ours.setblocking(False)
        dom0.sock = ours
        dom0.status = Status.RUNNING
        self.hv.selector.register(ours, selectors.EVENT_READ, ("hypercall", dom0))
        self.hv.keeper.keep(dom0)
        log.info("dom0 started, pid %d", proc.pid)
        if self.hv.dom0_restarts:
            self.hv.store_lifecycle.tell_dom0_restarted()
        # A restarted dom0 learns the domains that already exist, as if they were new (those
        # being built too: what their build queued for the dead dom0 was dropped above); the
        # store domain is hyperd's, not the toolstack's.
        for domain in self.hv.domains.values():
            if domain.domid in (0, self.hv.store_domid):
                continue
            if domain.status is not Status.DYING:
                self.hv.event("domain_introduced", domain_info(domain))
                if domain.status is Status.RUNNING:
                    self.hv.event("domain_running", {"domid": domain.domid})

    def on_death(self, status: int | None) -> None:
        """dom0's process is gone (``status`` its wait status, None if it was not our child):
        drop what was its, and restart it once it is due (``restart_when_due``), unless halting."""
        dom0 = self.hv.domains[0]
        self.hv.drop_socket(dom0)
        self.hv.forget_pidfd(dom0)
        dom0.pid = None
        self.hv.evtchn.orphan(0)
        if self.hv.halting:
            self.hv.domains.pop(0, None)
            if dom0.cgroup is not None:
                dom0.cgroup.remove()
            return
        self.hv.dom0_restarts += 1
        # What the dead dom0 left running (its data-path workers, its relays) must be gone
        # before the next dom0 starts: a worker still writing to its old loop device could
        # land a write after a newer one the next dom0 acknowledged over a new loop device.
        self._reap_warn_at = time.monotonic() + DOM0_REAP_WARN
        self._reap_tick = DOM0_REAP_TICK[0]
        self._kill_leftovers()
        # A dom0 that dies soon after starting (a broken install, a missing module) would
        # otherwise be restarted as fast as it can die: back off, doubling, up to a limit.
        if time.monotonic() - self._started > DOM0_STABLE:
            self._backoff = 0.0
        else:
            first, longest = DOM0_BACKOFF
            self._backoff = min(longest, max(first, 2 * self._backoff))
        if not self._backoff:
            log.error("dom0 died (%s); restarting it", describe_wait_status(status))
        else:
            log.error(
                "dom0 died (%s) %.1f s after starting; restarting it in %.2f s",
                describe_wait_status(status),
                time.monotonic() - self._started,
                self._backoff,
            )
        self.restart_at = time.monotonic() + self._backoff

    def restart_when_due(self, now: float) -> bool:
        """Start the next dom0 once its wait is over (at monotonic ``now``) and nothing of the
        dead one runs; until then kill what is left again and look again later (DOM0_REAP_TICK:
        at once at first, ever more rarely for a process that will not die). Never blocks: each
        look is one read of dom0's cgroup and a SIGKILL per process still there. True if it
        started."""
        due = self.restart_at
        if due is None or now < due or self.hv.halting:
            return False
        if self._kill_leftovers():
            self.restart_at = now + self._reap_tick
            self._reap_tick = min(DOM0_REAP_TICK[1], 2 * self._reap_tick)
            return False
        self.restart_at = None
        self.start()
        return True

    def _kill_leftovers(self) -> bool:
        """SIGKILL every process left in dom0's cgroup; True while any is left. One in the
        middle of a write dies once the write is done, so an empty group means every write
        the dead dom0 started has landed."""
        dom0 = self.hv.domains.get(0)
        group = dom0.cgroup if dom0 is not None else None
        if group is None:
            return False
        try:
            left = group.kill()
        except cgroup.CgroupError as exc:
            log.error("dom0's cgroup: %s; not waiting for what the dead dom0 left", exc)
            return False
        warn_at = self._reap_warn_at
        if left and warn_at is not None and time.monotonic() >= warn_at:
            self._reap_warn_at = None
            log.warning(
                "the dead dom0's processes %s are not gone after %.0f s: the next dom0 waits",
                group.pids(),
                DOM0_REAP_WARN,
            )
        return left

"""hyperd, the hypervisor: a small supervisor that builds, watches and destroys domains.

It owns the domain table, the event-channel port tables and the grant tables; it creates every
shared-memory object and doorbell; it answers hypercalls on one socket per domain, where the
socket identifies the caller; and it reaps every domain process (it is their child subreaper),
applying ``on_poweroff``/``on_reboot``/``on_crash`` when one dies. Drivers, the store and policy
live in dom0, not here.

One thread runs a selector loop over the hypercall sockets, the boot sync sockets, pidfds of
adopted domains and a self-pipe for signals, so every state change happens in one place and in
one order.

This module holds that loop, the domain table with its state file, and the building,
reaping and destruction of domUs. Beside it, each on its own seam:

- hyperd/hypercalls.py: the handler of each hypercall, and the table that dispatches to them;
- hyperd/adopt.py: surviving hyperd's own death: the fd keeper's link, and re-adoption by the
  next hyperd of the domains that ran on;
- hyperd/control_domain.py: dom0's start, and its restart when it dies.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import json
import logging
import logging.handlers
import math
import os
import select
import selectors
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from channels import hypercall as hc
from channels import linux
from channels.config import DomainConfig
from channels.forkserver import Spawner
from channels.paths import RunDir
from hyperd import cgroup, nics, state
from hyperd.adopt import KeeperLink, adopt_all
from hyperd.budget import HYPERCALL_COST
from hyperd.control_domain import Dom0Lifecycle
from hyperd.devlinks import DeviceLinks
from hyperd.domain import (
    Domain,
    RingInfo,
    Status,
    cgroup_limits,
    describe_wait_status,
    ring_sizes,
    spawn_boot,
    write_id_maps,
)
from hyperd.evtchn import EventChannels, EvtchnError
from hyperd.gnttab import GnttabError, GrantTables
from hyperd.hypercalls import Descriptors, HvError, Hypercalls, cpu_ns, domain_info
from hyperd.resources import Resources
from hyperd.store_domain import StoreDomainLifecycle

log = logging.getLogger("hyperd")

BUILD_TIMEOUT = 30.0
OUTQ_LIMIT = 4096
MAX_LOG_LINE = 1000
#: What hyperd's fork server imports once for the processes it forks: each domain's boot
#: process (which becomes the domain's kernel) and the fd keeper; and what a domain kernel's own
#: fork server preloads (domu/spawn.py), so that every domain shares those pages with this
#: server instead of importing them again. Not dom0: it runs in a fresh interpreter of its own
#: (hyperd/control_domain.py), sharing neither memory nor the string-hash secret with domains.
HYPERD_PRELOAD = (
    "domu.boot",
    "domu.blkfront.server",
    "domu.p9front.fs",
    "hyperd.keeper",
)
HYPERD_LOG_MAX = 8 << 20  # bytes of hyperd.log before it is rotated to hyperd.log.1


class BoundedLines(logging.Filter):
    """No line of hyperd's log is longer than MAX_LOG_LINE characters: some carry text a
    domain chose (a bad hypercall's complaint, say), and the log is kept in memory too."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if len(message) > MAX_LOG_LINE:
            record.msg, record.args = message[:MAX_LOG_LINE] + " [cut]", ()
        return True


class DmesgHandler(logging.Handler):
    """Keeps the last lines of the hypervisor log for `hyperctl dmesg`."""

    def __init__(self, size: int = 2000) -> None:
        super().__init__()
        self.lines: collections.deque[str] = collections.deque(maxlen=size)
        self.setFormatter(logging.Formatter("(XEN) [%(asctime)s] %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class Hypervisor:
    def __init__(
        self,
        run: RunDir,
        hierarchy: cgroup.Hierarchy,
        dmesg: DmesgHandler,
        spawner: Spawner | None = None,
        store_domain: bool = False,
    ) -> None:
        """``store_domain``: run the store in a stub domain (hyperd/store_domain.py) when
        starting afresh; a hyperd that adopts running domains finds the choice in its state."""
        self.run = run
        #: Starts every process hyperd runs (dom0, the domains' boot processes, the keeper).
        self.spawner = spawner or Spawner(HYPERD_PRELOAD)
        self.cgroups = hierarchy
        self.dmesg = dmesg
        self.domains: dict[int, Domain] = {}
        self.evtchn = EventChannels()
        self.gnttab = GrantTables()
        self.links = DeviceLinks()
        self.selector = selectors.DefaultSelector()
        self.halting = False
        self.halt_requested = False
        self.last_domid = 0
        self.dom0_restarts = 0
        self._sig_r, self._sig_w = socket.socketpair()
        self._sig_r.setblocking(False)
        self._sig_w.setblocking(False)
        self._events: list[tuple[str, dict[str, Any]]] = []  # for dom0, sent at the next commit
        self._paused: dict[int, Domain] = {}  # domUs out of credit, by domid (``_resume_due``)
        self._saved: bytes | None = None  # the state file's content as last written
        self._dirty = True  # the tables may differ from the state file
        #: Hands the fd keeper every socket of every domain, for the next hyperd.
        self.keeper = KeeperLink(run, self.spawner, lambda: self.domains.values())
        self.hypercalls = Hypercalls(self)
        self.dom0_lifecycle = Dom0Lifecycle(self)
        self.want_store_domain = store_domain
        #: The store's stub domain, if the store runs in one (else dom0 serves the store).
        self.store_domid: int | None = None
        self.store_lifecycle = StoreDomainLifecycle(self)

    # -- main loop -------------------------------------------------------------------------

    def serve(self, sockets: dict[str, socket.socket] | None = None, adopt: bool = False) -> None:
        """Run until halted: from scratch, or (``adopt``) re-adopting the domains of the tables
        ``load`` rebuilt, with the hypercall ``sockets`` the fd keeper held for them."""
        signal.set_wakeup_fd(self._sig_w.fileno())
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: None)
        self.selector.register(self._sig_r, selectors.EVENT_READ, ("signal", None))
        if adopt:
            adopt_all(self, dict(sockets or {}))
        else:
            self.keeper.forget(sockets or {})
            if self.want_store_domain:
                self.store_lifecycle.build()
            self.dom0_lifecycle.start()
        self._commit()
        while not (self.halting and not self.domains):
            ready = self.selector.select(timeout=self._select_timeout())
            for key, mask in ready:
                kind, domain = key.data
                try:
                    if kind == "signal":
                        self._on_signal()
                    elif kind == "hypercall" and mask & selectors.EVENT_WRITE:
                        self._flush(domain)
                    elif kind == "hypercall":
                        self._on_hypercall(domain)
                    elif kind == "sync":
                        self._on_sync(domain)
                    elif kind == "pidfd":
                        self._on_pidfd(domain)
                    elif kind == "log":
                        self._on_log(domain)
                except Exception:
                    log.exception("internal error handling %s", kind)
                if kind in ("signal", "sync", "pidfd"):
                    self._dirty = True
            self._resume_due()
            changed = self._check_builds()
            changed |= self.dom0_lifecycle.restart_when_due(time.monotonic())
            changed |= self.store_lifecycle.restart_when_due(time.monotonic())
            if self.halt_requested:
                self.halt()
            if ready or changed:
                self._dirty |= changed
                self._commit()

    def _commit(self) -> None:
        """Write the tables, then tell dom0 what changed: nothing is ever announced that a
        hyperd killed the next moment would not find in its state file."""
        self._save()
        self._flush_events()

    def _save(self) -> None:
        """Write the tables if anything may have changed them since the last write."""
        if not self._dirty:
            return
        data = state.encode(self.snapshot())
        if data != self._saved:
            try:
                state.write(self.run.state_file, data)
            except OSError as exc:
                log.error("cannot write %s: %s", self.run.state_file, exc)
                return
            self._saved = data
        self._dirty = False

    def _flush_events(self) -> None:
        events, self._events = self._events, []
        dom0 = self.domains.get(0)
        if dom0 is None:
            return
        for name, data in events:
            self._send(dom0, hc.encode({"event": name, "data": data}))

    def _select_timeout(self) -> float:
        due = [d.calls_paused_until for d in self._paused.values() if d.calls_paused_until]
        due += [d.log.paused_until for d in self._paused.values() if d.log and d.log.paused_until]
        for restart_at in (self.dom0_lifecycle.restart_at, self.store_lifecycle.restart_at):
            if restart_at is not None:
                due.append(restart_at)
        return min(1.0, max(0.0, min(due, default=math.inf) - time.monotonic()))

    def _resume_due(self) -> None:
        """Read again from domains whose credit is back (see ``_charge``, ``_on_log``)."""
        now = time.monotonic()
        for domain in list(self._paused.values()):
            if domain.calls_paused_until and now >= domain.calls_paused_until:
                domain.calls_paused_until = 0.0
                self._watch(domain)
            guest_log = domain.log
            if guest_log is not None and guest_log.paused_until and now >= guest_log.paused_until:
                guest_log.paused_until = 0.0
                self.selector.register(guest_log.sock, selectors.EVENT_READ, ("log", domain))
            self._forget_pause(domain)

    def _forget_pause(self, domain: Domain) -> None:
        """Out of ``_paused`` once nothing of the domain's waits for its credit."""
        if not domain.calls_paused_until and not (domain.log and domain.log.paused_until):
            self._paused.pop(domain.domid, None)

    def _on_signal(self) -> None:
        try:
            data = self._sig_r.recv(512)
        except BlockingIOError:
            data = b""
        if {signal.SIGTERM, signal.SIGINT} & set(data):
            self.halt()
        self._reap()

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.spawner.owns(pid):
                log.warning("the fork server %d exited; the next spawn starts another", pid)
                continue
            for domain in list(self.domains.values()):
                # Only a live child: an adopted domain's old pid, or a preserved domain's, may
                # since have been given to a new child of ours.
                if domain.pid == pid and not domain.reaped and domain.pidfd is None:
                    domain.reaped = True
                    if domain.process is not None:
                        domain.process.returncode = os.waitstatus_to_exitcode(status)
                    self.on_death(domain, status)
                elif domain.boot is not None and domain.boot.pid == pid:
                    domain.boot.returncode = os.waitstatus_to_exitcode(status)

    # -- the tables and the state file ------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The tables as the state file holds them (hyperd/state.py)."""
        return {
            "last_domid": self.last_domid,
            "dom0_restarts": self.dom0_restarts,
            "store_domid": self.store_domid,
            "halting": self.halting,
            "domains": [d.to_dict() for _, d in sorted(self.domains.items())],
            "evtchn": self.evtchn.to_dict(),
            "gnttab": self.gnttab.to_dict(),
            "links": self.links.to_dict(),
        }

    def load(self, saved: dict[str, Any]) -> None:
        """Rebuild the tables from a snapshot, re-opening each domain's cgroup (never creating
        or emptying one); no process or socket is touched. StateError if it does not hold
        together."""
        try:
            domains = [Domain.from_dict(d, self._open_group) for d in saved["domains"]]
            owners = {d.domid: d.resources for d in domains}
            self.evtchn = EventChannels.from_dict(saved["evtchn"], owners)
            self.gnttab = GrantTables.from_dict(saved["gnttab"])
            self.links = DeviceLinks.from_dict(saved["links"])
            self.last_domid = int(saved["last_domid"])
            self.dom0_restarts = int(saved["dom0_restarts"])
            store_domid = saved["store_domid"]
            self.store_domid = None if store_domid is None else int(store_domid)
            # A halt that had begun is finished at adoption (``adopt_all``).
            self.halt_requested = bool(saved["halting"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            message = f"{self.run.state_file}: {type(exc).__name__}: {exc}"
            raise state.StateError(message) from exc
        self.domains = {d.domid: d for d in domains}

    def _open_group(self, name: str) -> cgroup.DomainGroup | None:
        try:
            return self.cgroups.open(name)
        except cgroup.CgroupError as exc:
            log.error("re-adopting: %s", exc)
            return None

    # -- messages to the domains -------------------------------------------------------------

    def event(self, name: str, data: dict[str, Any]) -> None:
        """Tell dom0, once the change is in the state file (see ``_commit``)."""
        self._events.append((name, data))
        self._dirty = True

    def send_event(self, domain: Domain, name: str, data: dict[str, Any]) -> None:
        """Tell a domU at once (the store domain: dom0 restarted)."""
        self._send(domain, hc.encode({"event": name, "data": data}))

    def drop_events(self) -> None:
        """Forget the events not yet sent: they were for a dom0 that died."""
        self._events.clear()

    def _send(self, domain: Domain, message: bytes, fd: int | None = None) -> None:
        """Queue a message (with ``fd``, which is ours to close from now on) for a domain
        without ever blocking the loop. While a domain has unsent replies it is not read from:
        one that never reads can queue only the replies to what it already sent (and dom0,
        events, up to OUTQ_LIMIT)."""
        if domain.sock is None:
            _close(fd)
            return
        if not domain.outq:
            try:
                _send_one(domain.sock, message, fd)
                _close(fd)
                return
            except BlockingIOError:
                pass
            except OSError as exc:
                log.warning("dom%d: message lost: %s", domain.domid, exc)
                _close(fd)
                return
        if len(domain.outq) >= OUTQ_LIMIT:
            log.error("dom%d does not read its hypercall socket; dropping a message", domain.domid)
            _close(fd)
            return
        domain.outq.append((message, fd))
        self._watch(domain)

    def _flush(self, domain: Domain) -> None:
        assert domain.sock is not None
        while domain.outq:
            try:
                _send_one(domain.sock, *domain.outq[0])
            except BlockingIOError:
                return
            except OSError:
                _clear(domain.outq)
                break
            _close(domain.outq.popleft()[1])
        self._watch(domain)

    def _watch(self, domain: Domain) -> None:
        """Wait on a domain's hypercall socket for what is due: room for the replies it has
        not taken, else its next request, unless it has used up its credit (``_charge``)."""
        if domain.sock is None:
            return
        if domain.outq:
            events = selectors.EVENT_WRITE
        elif not domain.calls_paused_until:
            events = selectors.EVENT_READ
        else:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(domain.sock)
            return
        try:
            self.selector.modify(domain.sock, events, ("hypercall", domain))
        except KeyError:
            self.selector.register(domain.sock, events, ("hypercall", domain))

    # -- hypercalls ------------------------------------------------------------------------

    def _on_hypercall(self, caller: Domain) -> None:
        """Answer the next request. It is only peeked at, and consumed once handled, saved and
        answered: a hyperd killed in between leaves it queued for the next hyperd, which handles
        it again. What that can cost: a call with no effect (status, map, list) costs nothing;
        one that was already done is refused the second time (destroy, create of the same name,
        close, release), and the caller, holding the first answer or none, drops that reply; an
        allocation (alloc_unbound, bind_interdomain, setup_pool, a domctl_create whose domain
        died meanwhile) is done twice, and the one the caller never learns of is held, doorbell
        or pool, until its domain dies."""
        assert caller.sock is not None
        # Only dom0 gives descriptors (DomctlLinkDevice); a domU's stay unread, and the kernel
        # closes them with its message. Each peek receives its own copies: closed below.
        most = 1 if caller.domid == 0 else 0
        try:
            data, fds = hc.receive(caller.sock, most, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        if not data:
            linux.close_fds(fds)
            self.drop_socket(caller)
            return
        passed = Descriptors(fds)
        try:
            reply, read_only = self._answer(caller, data, passed)
            try:
                self._commit()
            finally:  # even if saving failed: a request left queued would be handled forever
                self._send(caller, hc.encode(reply), passed.take_reply())
                if caller.sock is not None:
                    with contextlib.suppress(OSError):  # done: consume it
                        linux.close_fds(hc.receive(caller.sock, most)[1])
                self._charge(caller, HYPERCALL_COST[read_only])
        finally:
            passed.close()

    def _charge(self, caller: Domain, cost: float) -> None:
        """A domU pays for its call; one out of credit is not read from until it is back."""
        if caller.domid == 0:
            return
        wait = caller.credit.charge(cost)
        if wait > 0 and caller.sock is not None:
            caller.calls_paused_until = time.monotonic() + wait
            self._paused[caller.domid] = caller
            self._watch(caller)

    def _answer(
        self, caller: Domain, data: bytes, passed: Descriptors
    ) -> tuple[dict[str, Any], bool]:
        """The reply to one request, and whether it was a call that changes nothing."""
        try:
            req_id, op = hc.parse_request(data)
        except ValueError as exc:
            message = str(exc)[:200]  # the domain chose this text: keep the log bounded
            if caller.bad_calls < 10:
                log.warning("dom%d: bad hypercall: %s", caller.domid, message)
            caller.bad_calls += 1
            reply = {"id": _request_id(data), "ok": False, "error": "EINVAL", "message": message}
            return reply, False
        if not op.read_only:  # no state-file encode for a call that changes nothing
            self._dirty = True
        try:
            result = self.hypercalls.handle(caller, op, passed)
            return {"id": req_id, "ok": True, "result": result}, op.read_only
        except (HvError, EvtchnError, GnttabError) as exc:
            error = {"id": req_id, "ok": False, "error": exc.errno_name, "message": str(exc)}
            return error, op.read_only
        except Exception as exc:
            log.exception("dom%d: hypercall %s failed", caller.domid, op.op)
            return {"id": req_id, "ok": False, "error": "EIO", "message": str(exc)}, op.read_only

    def drop_socket(self, domain: Domain) -> None:
        if domain.sock is not None:
            with contextlib.suppress(KeyError, ValueError):  # a build that failed early
                self.selector.unregister(domain.sock)
            self.keeper.unkeep(domain)
            domain.sock.close()
            domain.sock = None
            _clear(domain.outq)
            domain.calls_paused_until = 0.0
            self._forget_pause(domain)

    # -- building, reaping and destroying ----------------------------------------------------

    def next_domid(self) -> int:
        """Domain ids increase (as Xen's do) and wrap; a restarted domain gets a new one. An id
        a dead driver domain still stands for (its stale ports, the devices it served) is not
        given out again: the new domain would take for its own what waits for its successor."""
        domid = self.last_domid
        while True:
            domid = domid % hc.DOMID_MAX + 1
            if domid not in self.domains and not self._remembered(domid):
                self.last_domid = domid
                return domid

    def _remembered(self, domid: int) -> bool:
        return bool(self.evtchn.ports_of(domid)) or self.links.remembers(domid)

    def build(self, config: DomainConfig, owner: int) -> Domain:
        domid = self.next_domid()
        domain = Domain(domid, config.name, config, Resources(domid), owner=owner)
        try:
            domain.cgroup = self.cgroups.create(f"dom{domid}", cgroup_limits(config))
            domain.resources.open_view()
            sizes = ring_sizes()
            domain.store = self.ring(domain, "store", sizes["store"])
            domain.console = self.ring(domain, "console", sizes["console"])
            spawn_boot(domain, self.run.rootfs, self.run.log(f"dom{domid}"), self.spawner.server())
        except Exception as exc:
            self.release(domain)
            raise HvError("EIO", f"building domain {domid}: {exc}") from exc
        assert domain.sock is not None and domain.sync is not None
        domain.sock.setblocking(False)
        self.domains[domid] = domain
        self.selector.register(domain.sock, selectors.EVENT_READ, ("hypercall", domain))
        self.selector.register(domain.sync, selectors.EVENT_READ, ("sync", domain))
        self.keeper.keep(domain)
        self.watch_log(domain)
        log.info(
            "dom%d (%s) created: %d MiB, %d vcpus", domid, domain.name, domain.memory, domain.vcpus
        )
        self.event("domain_introduced", domain_info(domain))
        return domain

    def ring(self, domain: Domain, kind: str, size: int) -> RingInfo:
        """A ring of ``domain`` and its server: dom0, or the store domain for the store ring
        when there is one."""
        server = self.store_domid if kind == "store" and self.store_domid is not None else 0
        segment = domain.resources.new_segment(kind, size, peer=server)
        domu_port = self.evtchn.alloc_unbound(domain.domid, server, domain.resources)
        server_port = self.evtchn.bind_interdomain(
            server, domain.domid, domu_port.port, domain.resources
        )
        return RingInfo(segment, domu_port.port, server_port.port)

    def _on_sync(self, domain: Domain) -> None:
        assert domain.sync is not None
        try:
            data = domain.sync.recv(4096)
        except OSError:
            data = b""
        if not data:
            self._end_sync(domain)
            if domain.pid is None and domain.status is Status.BUILDING:
                log.error(
                    "dom%d: boot failed (see %s)", domain.domid, self.run.log(f"dom{domain.domid}")
                )
                self._finish(domain, "crash")
            return
        domain.sync_buffer += data
        while b"\n" in domain.sync_buffer:
            line, domain.sync_buffer = domain.sync_buffer.split(b"\n", 1)
            word, _, arg = line.decode(errors="replace").partition(" ")
            if word == "needs_id_map" and domain.boot is not None:
                write_id_maps(domain.boot.pid, domain.domid)
                domain.sync.sendall(b"mapped\n")
            elif word == "needs_nics" and domain.boot is not None:
                names = [nic.name for nic in domain.config.nics]
                why = nics.give(names, domain.boot.pid)
                if why is not None:
                    log.error("dom%d: its nics: %s", domain.domid, why)
                domain.sync.sendall(b"nics_given\n" if why is None else b"nics_refused\n")
            elif word == "kernel_pid":
                # Our child's child, unreaped: its pid cannot have been reused yet.
                domain.set_pid(int(arg))
            else:
                log.warning("dom%d: unexpected boot message %r", domain.domid, line[:80])

    def _end_sync(self, domain: Domain) -> None:
        if domain.sync is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(domain.sync)
            domain.sync.close()
            domain.sync = None

    def watch_log(self, domain: Domain) -> None:
        """Read a domU's output (hyperd/budget.py)."""
        if domain.log is not None:
            self.selector.register(domain.log.sock, selectors.EVENT_READ, ("log", domain))

    def _on_log(self, domain: Domain) -> None:
        assert domain.log is not None
        wait = domain.log.pump()
        if wait is None:  # every process of the domain has closed it
            self._end_log(domain)
        elif wait > 0:  # past its rate: read on once its credit is back (``_resume_due``)
            self.selector.unregister(domain.log.sock)
            domain.log.paused_until = time.monotonic() + wait
            self._paused[domain.domid] = domain

    def _end_log(self, domain: Domain) -> None:
        """The domain is dead: keep what it wrote last, and close its log."""
        if domain.log is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(domain.log.sock)
        domain.log.drain()
        domain.log.close()
        domain.log = None
        self._forget_pause(domain)
        self.keeper.drop_log(domain.domid)

    def _check_builds(self) -> bool:
        now = time.time()
        late = [
            d
            for d in self.domains.values()
            if d.status is Status.BUILDING
            and now - d.created > BUILD_TIMEOUT
            and not self.store_lifecycle.restarting(d)
        ]
        for domain in late:
            log.error("dom%d: did not boot in %.0f s", domain.domid, BUILD_TIMEOUT)
            self._finish(domain, "crash")
        return bool(late)

    def _on_pidfd(self, domain: Domain) -> None:
        """An adopted domain's main process exited (PID 1 reaps it: we only learn that)."""
        self.forget_pidfd(domain)
        self.on_death(domain, None)

    def forget_pidfd(self, domain: Domain) -> None:
        if domain.pidfd is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(domain.pidfd)
            os.close(domain.pidfd)
            domain.pidfd = None

    def on_death(self, domain: Domain, status: int | None) -> None:
        """``status`` is the wait status, None for an adopted process (not ours to reap)."""
        if domain.domid == 0:
            self.dom0_lifecycle.on_death(status)
            return
        if domain.status is Status.DYING:
            return
        self._read_last_words(domain)
        reason = domain.shutdown_reason or "crash"
        if domain.shutdown_reason is None:
            log.info(
                "dom%d (%s) died unexpectedly (%s)",
                domain.domid,
                domain.name,
                describe_wait_status(status),
            )
        self._finish(domain, reason)

    def _read_last_words(self, domain: Domain) -> None:
        """A dead domain's sched_shutdown may still be queued on its socket: it called it while
        no hyperd ran (or in the same instant it died), and its reason decides on_poweroff or
        on_reboot over on_crash. Nothing else a dead domain asked for matters."""
        while domain.sock is not None:
            try:
                data = domain.sock.recv(hc.MAX_MESSAGE)
            except OSError:
                return
            if not data:
                return
            with contextlib.suppress(ValueError):
                _, op = hc.parse_request(data)
                if isinstance(op, hc.SchedShutdown):
                    self.hypercalls.do_sched_shutdown(domain, op)

    def _finish(self, domain: Domain, reason: str) -> None:
        """Apply the config's on_<reason> action to a domain that stopped; the store domain
        is restarted in place (hyperd/store_domain.py)."""
        if domain.domid == self.store_domid and not self.halting:
            self.store_lifecycle.on_death(domain, reason)
            return
        config = domain.config
        actions = {
            "poweroff": config.on_poweroff,
            "reboot": config.on_reboot,
            "crash": config.on_crash,
        }
        action = str(actions[reason])
        if self.halting:
            action = "destroy"
        log.info("dom%d (%s): %s -> %s", domain.domid, domain.name, reason, action)
        self.event("domain_shutdown", {"domid": domain.domid, "reason": reason, "action": action})
        if action == "preserve":
            self._stop(domain)
            domain.status = Status.CRASHED if reason == "crash" else Status.SHUTDOWN
            return
        config = domain.config
        self.destroy(domain)
        if action == "restart":
            try:
                self.build(config, domain.owner)
            except HvError as exc:
                log.error("restarting %s failed: %s", config.name, exc)

    def _stop(self, domain: Domain) -> None:
        """Kill every process and free every channel; keep the record (for preserve)."""
        self.stop_processes(domain)
        self.evtchn.close_domain(domain.domid)
        self.gnttab.release_domain(domain.domid, domain.resources)
        self.links.release_domain(domain.domid)
        domain.resources.release()

    def stop_processes(self, domain: Domain) -> None:
        """Kill every process of the domain and close what hyperd had of them (its sockets,
        its log); its channels and objects stay (a store domain restarted in place keeps
        them)."""
        domain.final_cpu_ns = cpu_ns(domain)
        alive = domain.pidfd is not None or not domain.reaped  # adopted, or our unreaped child
        if domain.config.nics and domain.pid is not None and alive:  # before any kill
            nics.take_back([nic.name for nic in domain.config.nics], domain.pid)
        if domain.pidfd is not None:
            # Adopted: not our child, so only the pidfd names it safely; PID 1 reaps it.
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(domain.pidfd, signal.SIGKILL)
            self.forget_pidfd(domain)
        if domain.pid is not None and not domain.reaped:
            # Still our unreaped child, so the pid cannot have been reused by anyone else.
            with contextlib.suppress(ProcessLookupError):
                os.kill(domain.pid, signal.SIGKILL)
        if domain.cgroup is not None:
            domain.cgroup.kill_all()
        if domain.pid is not None and not domain.reaped:
            # Dead now (SIGKILL, and its cgroup is empty): reap it here, or it stays a zombie.
            with contextlib.suppress(ChildProcessError):
                os.waitpid(domain.pid, 0)
            domain.reaped = True
        self.drop_socket(domain)
        self._end_sync(domain)
        self._end_log(domain)

    def release(self, domain: Domain) -> None:
        self._stop(domain)
        if domain.cgroup is not None:
            domain.cgroup.remove()
            domain.cgroup = None

    def destroy(self, domain: Domain) -> None:
        # Saved first: a hyperd killed half way through finishes the destruction on adoption,
        # rather than taking the domain's end for a crash (and applying on_crash).
        domain.status = Status.DYING
        self._dirty = True
        self._save()
        self.release(domain)
        self.domains.pop(domain.domid, None)
        log.info("dom%d (%s) destroyed", domain.domid, domain.name)
        self.event("domain_destroyed", {"domid": domain.domid, "name": domain.name})

    def halt(self) -> None:
        """Destroy every domU, then stop dom0; the main loop then exits."""
        if self.halting:
            return
        self.halting = True
        self._dirty = True
        self._save()  # a hyperd killed during the halt finishes it (``adopt_all``)
        log.info("halting: destroying every domain")
        # The store domain after dom0 (below): dom0's teardown of the others, and its own
        # end, go through the store.
        for domain in [d for d in self.domains.values() if d.domid not in (0, self.store_domid)]:
            self.destroy(domain)
        # dom0 hears of the destructions before it is told to stop (it may still read them).
        self._commit()
        dom0 = self.domains.pop(0, None)
        if dom0 is not None:
            self._stop_dom0(dom0)
        store = self.store_lifecycle.domain
        if store is not None:
            self.destroy(store)
        if dom0 is not None:
            self.evtchn.close_domain(0)
            dom0.resources.release()  # its store ring's objects, with a store domain

    def _stop_dom0(self, dom0: Domain) -> None:
        self._dirty = True
        self.drop_socket(dom0)
        if dom0.pidfd is not None:
            _terminate_adopted(dom0.pidfd)
            self.forget_pidfd(dom0)
        elif dom0.pid is not None and not dom0.reaped:
            _terminate(dom0.pid)
            dom0.reaped = True
            if dom0.process is not None:
                dom0.process.returncode = 0
        if dom0.cgroup is not None:
            dom0.cgroup.remove()


def _terminate_adopted(pidfd: int, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds, to a process we did not start; returns
    once it is dead (PID 1 reaps it)."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        try:
            signal.pidfd_send_signal(pidfd, signum)
        except ProcessLookupError:
            return
        readable, _, _ = select.select([pidfd], [], [], grace)
        if readable:
            return


def _terminate(pid: int, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; reaps the child either way."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _send_one(sock: socket.socket, message: bytes, fd: int | None) -> None:
    """One message, with its descriptor if any (which stays ours: the kernel sent a copy)."""
    if fd is None:
        sock.send(message)
    else:
        socket.send_fds(sock, [message], [fd])


def _close(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def _clear(outq: collections.deque[tuple[bytes, int | None]]) -> None:
    """Drop unsent messages, closing the descriptors they would have handed on."""
    while outq:
        _close(outq.popleft()[1])


def _request_id(data: bytes) -> int | None:
    try:
        value = json.loads(data).get("id")
    except (ValueError, AttributeError, RecursionError):
        return None
    return value if isinstance(value, int) else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hyperd", description="the hyper hypervisor")
    parser.add_argument("--run-dir", default=None, help="state directory (default /run/hyper)")
    parser.add_argument(
        "--store-domain",
        action="store_true",
        help="run the store in a stub domain of its own (Xenstore) instead of in dom0",
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("hyperd: must run as root", file=sys.stderr)
        return 1
    run = RunDir(Path(args.run_dir)) if args.run_dir else RunDir()
    run.create()
    lock = open(run.pidfile, "a+")  # noqa: SIM115 - held for the daemon's lifetime
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("hyperd: already running", file=sys.stderr)
        return 1
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    dmesg = DmesgHandler()
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        handlers=[
            # Appended to across runs, so capped: what guests cause it to say is bounded per
            # line and per domain, but a long-lived host would still fill its disk.
            logging.handlers.RotatingFileHandler(
                run.log("hyperd"), maxBytes=HYPERD_LOG_MAX, backupCount=1
            ),
            logging.StreamHandler(),
        ],
    )
    logging.getLogger().addHandler(dmesg)
    for handler in logging.getLogger().handlers:
        handler.addFilter(BoundedLines())
    linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)
    os.umask(0o077)
    try:
        saved = state.read(run.state_file)
    except state.StateError as exc:
        return refuse_state(exc)
    try:
        # Before any helper starts: on a systemd host this moves hyperd into hyper's scope.
        cgroups = cgroup.open_hierarchy()
        cgroups.prepare()
    except cgroup.CgroupError as exc:
        log.error("cannot run domains: %s", exc)
        return 1
    hypervisor = Hypervisor(run, cgroups, dmesg, store_domain=args.store_domain)
    # From the main thread (the server dies with it), and now: its imports overlap ours.
    hypervisor.spawner.start()
    log.info("hyperd %d starting (cgroup v%d)", os.getpid(), hypervisor.cgroups.version)
    sockets = hypervisor.keeper.take_back()
    if saved is not None:
        if sockets is None:
            # The keeper still holds every socket (it hands over duplicates): leave the
            # domains running for a later attempt rather than adopt them without their calls.
            log.error("cannot re-adopt the running domains: `hyperctl start` tries again")
            return 1
        try:
            hypervisor.load(saved)
        except state.StateError as exc:
            return refuse_state(exc)
    status = 0
    try:
        hypervisor.serve(sockets or {}, adopt=saved is not None)
    except Exception:
        if any(domid != 0 for domid in hypervisor.domains):
            # As after a kill: the domains run on, and the next hyperd adopts them.
            log.exception("hyperd failed; the domains run on (`hyperctl start` adopts them)")
            return 1
        log.exception("hyperd failed")
        status = 1
    log.info("hyperd stopped")
    hypervisor.cgroups.remove_all()
    hypervisor.keeper.exit()
    run.remove()
    return status


def refuse_state(exc: state.StateError) -> int:
    """hyperd's exit status on a state file it cannot use, having said what to do."""
    log.error(
        "%s; `hyperctl cleanup` ends the domains it describes and removes what they left, "
        "then `hyperctl start` starts afresh",
        exc,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())

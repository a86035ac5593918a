"""hyperd, the hypervisor: a small supervisor that builds, watches and destroys domains.

It owns the domain table, the event-channel port tables and the grant tables; it creates every
shared-memory object and doorbell; it answers hypercalls on one socket per domain, where the
socket identifies the caller; and it reaps every domain process (it is their child subreaper),
applying ``on_poweroff``/``on_reboot``/``on_crash`` when one dies. Drivers, the store and policy
live in dom0, not here.

One thread runs a selector loop over the hypercall sockets, the boot sync sockets, pidfds of
adopted domains and a self-pipe for signals, so every state change happens in one place and in
one order.

Surviving its own death (SIGKILL included): the domains do not need hyperd to move data, only
to change what exists. So hyperd hands its end of every hypercall socket to the fd keeper
(hyperd/keeper.py), which outlives it, and after every change writes its tables to the state file
(hyperd/state.py) before it tells anyone of the change. While no hyperd runs, the domains run on
and their hypercalls wait in the kernel. A hyperd that starts and finds a state file re-adopts:
it rebuilds the tables, re-opens the cgroups, takes the sockets back from the keeper and watches
each domain's process through a pidfd (they are PID 1's children now, not its own). A domain
that died meanwhile gets its ``on_crash`` (or the reason it gave in sched_shutdown); a dom0 that
died is restarted; a domain that was still being built is destroyed.

A dead dom0 is restarted only once every process in its cgroup is gone (its data-path workers
and relays are SIGKILLed, and the loop looks again, more and more rarely, without blocking): a
process in the middle of a write dies only after the write, so no write the old dom0 started
can land after one the new dom0 acknowledged.
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
import platform
import select
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from channels import hypercall as hc
from channels import linux
from channels.config import DOM0_NAME, DomainConfig
from channels.errors import HyperError
from channels.forkserver import ChildSetup, Spawner
from channels.hypercall import Op
from channels.ids import host_gid
from channels.paths import RunDir
from hyperd import cgroup, keeper, state
from hyperd.budget import HYPERCALL_COST, GuestLog
from hyperd.domain import (
    Domain,
    RingInfo,
    Status,
    dom0_config,
    find_workload_init,
    process_start_time,
    ring_sizes,
    spawn_boot,
    write_id_maps,
)
from hyperd.evtchn import EventChannels, EvtchnError
from hyperd.gnttab import GnttabError, GrantTables, grant_budget
from hyperd.keeper import KeeperClient, KeeperError
from hyperd.resources import Resources, leftovers, remove

log = logging.getLogger("hyperd")

PIDS_MAX = 1024
BUILD_TIMEOUT = 30.0
DOM0_STABLE = 5.0  # seconds up after which a dom0 death restarts it at once
DOM0_BACKOFF = (0.25, 30.0)  # first and longest wait before restarting a dom0 that keeps dying
DOM0_REAP_TICK = (0.01, 0.5)  # first and longest wait between looks at a dead dom0's cgroup
DOM0_REAP_WARN = 5.0  # seconds after which a dead dom0's processes not dying yet is logged
OUTQ_LIMIT = 4096
MAX_LOG_LINE = 1000
#: What hyperd's fork server imports once for every process it starts: dom0, each domain's
#: boot process (which becomes the domain's kernel) and the fd keeper; and what a domain
#: kernel's own fork server preloads (domu/spawn.py), so that every domain shares those pages
#: with this server instead of importing them again.
HYPERD_PRELOAD = (
    "domu.boot",
    "domu.blkfront.server",
    "domu.p9front.fs",
    "dom0.main",
    "hyperd.keeper",
)
#: dom0's hypercall socket, in dom0.
DOM0_HYPERCALL_FD = 3
HYPERD_LOG_MAX = 8 << 20  # bytes of hyperd.log before it is rotated to hyperd.log.1


class HvError(HyperError):
    def __init__(self, errno_name: str, message: str) -> None:
        super().__init__(message)
        self.errno_name = errno_name


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


def _socket_name(domid: int) -> str:
    """The name under which the fd keeper holds a domain's hypercall socket."""
    return f"hc.{domid}"


def _log_name(domid: int) -> str:
    """... and hyperd's end of its output (hyperd/budget.py)."""
    return f"log.{domid}"


def _kept(domain: Domain) -> dict[str, socket.socket]:
    """The sockets of a domain the fd keeper holds for us, by name."""
    kept = {}
    if domain.sock is not None:
        kept[_socket_name(domain.domid)] = domain.sock
    if domain.log is not None:
        kept[_log_name(domain.domid)] = domain.log.sock
    return kept


class Hypervisor:
    def __init__(
        self,
        run: RunDir,
        hierarchy: cgroup.Hierarchy,
        dmesg: DmesgHandler,
        spawner: Spawner | None = None,
    ) -> None:
        self.run = run
        #: Starts every process hyperd runs (dom0, the domains' boot processes, the keeper).
        self.spawner = spawner or Spawner(HYPERD_PRELOAD)
        self.cgroups = hierarchy
        self.dmesg = dmesg
        self.keeper: KeeperClient | None = None  # connected by main (``_connect_keeper``)
        self.domains: dict[int, Domain] = {}
        self.evtchn = EventChannels()
        self.gnttab = GrantTables()
        self.selector = selectors.DefaultSelector()
        self.halting = False
        self.halt_requested = False
        self.last_domid = 0
        self.dom0_restarts = 0
        self._dom0_started = 0.0  # monotonic
        self._dom0_backoff = 0.0  # the wait before the last restart, 0 if it was at once
        self._dom0_restart_at: float | None = None  # monotonic, while a restart waits
        self._dom0_reap_warn_at: float | None = None  # monotonic: when to log leftovers
        self._dom0_reap_tick = DOM0_REAP_TICK[0]  # the wait before the next look at them
        self._sig_r, self._sig_w = socket.socketpair()
        self._sig_r.setblocking(False)
        self._sig_w.setblocking(False)
        self._events: list[tuple[str, dict[str, Any]]] = []  # for dom0, sent at the next commit
        self._paused: dict[int, Domain] = {}  # domUs out of credit, by domid (``_resume_due``)
        self._saved: bytes | None = None  # the state file's content as last written
        self._dirty = True  # the tables may differ from the state file
        self._handlers = self._handler_table()

    # -- main loop -------------------------------------------------------------------------

    def serve(self, sockets: dict[str, socket.socket] | None = None, adopt: bool = False) -> None:
        """Run until halted: from scratch, or (``adopt``) re-adopting the domains of the tables
        ``load`` rebuilt, with the hypercall ``sockets`` the fd keeper held for them."""
        signal.set_wakeup_fd(self._sig_w.fileno())
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: None)
        self.selector.register(self._sig_r, selectors.EVENT_READ, ("signal", None))
        if adopt:
            self._adopt_all(dict(sockets or {}))
        else:
            self._forget_sockets(sockets or {})
            self.start_dom0()
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
            changed |= self._restart_dom0_when_due(time.monotonic())
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
        if self._dom0_restart_at is not None:
            due.append(self._dom0_restart_at)
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
                    self._on_death(domain, status)
                elif domain.boot is not None and domain.boot.pid == pid:
                    domain.boot.returncode = os.waitstatus_to_exitcode(status)

    # -- persisted state and re-adoption ----------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The tables as the state file holds them (hyperd/state.py)."""
        return {
            "last_domid": self.last_domid,
            "dom0_restarts": self.dom0_restarts,
            "halting": self.halting,
            "domains": [d.to_dict() for _, d in sorted(self.domains.items())],
            "evtchn": self.evtchn.to_dict(),
            "gnttab": self.gnttab.to_dict(),
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
            self.last_domid = int(saved["last_domid"])
            self.dom0_restarts = int(saved["dom0_restarts"])
            # A halt that had begun is finished at adoption (``_adopt_all``).
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

    def _adopt_all(self, sockets: dict[str, socket.socket]) -> None:
        log.info("re-adopting %d domains from %s", len(self.domains), self.run.state_file)
        self._reconcile()
        dead = [
            domain
            for domid, domain in sorted(self.domains.items())
            if not self._adopt(
                domain, sockets.pop(_socket_name(domid), None), sockets.pop(_log_name(domid), None)
            )
        ]
        self._forget_sockets(sockets)
        if self.halt_requested:
            log.warning("the previous hyperd was halting: finishing the halt")
            self.halt()  # every domU goes, dead or alive: no on_crash
            return
        for domain in dead:
            if domain.domid != 0:
                log.warning("dom%d (%s) died while no hyperd ran", domain.domid, domain.name)
                self._on_death(domain, None)
        if 0 in self.domains and any(d.domid == 0 for d in dead):
            self._on_dom0_death(None)
        elif 0 not in self.domains:
            self.start_dom0()
        log.info("re-adopted: %s", ", ".join(f"dom{d}" for d in sorted(self.domains)))

    def _adopt(
        self, domain: Domain, sock: socket.socket | None, log_sock: socket.socket | None
    ) -> bool:
        """Take a domain of the state file back: its sockets, and a pidfd on its process. False
        if it is dead (or cannot be run without its socket), for the caller to finish."""
        if domain.status in (Status.SHUTDOWN, Status.CRASHED):  # preserved: nothing runs
            if sock is not None:
                self._unkeep(domain)
                sock.close()
            if log_sock is not None:
                self._to_keeper(lambda k: k.drop(_log_name(domain.domid)))
                log_sock.close()
            return True
        domain.reaped = True  # whatever still runs is PID 1's child now, never ours to reap
        domain.pidfd = _pidfd_of(domain.pid, domain.pid_start)
        if sock is not None:
            sock.setblocking(False)
            domain.sock = sock
            self.selector.register(sock, selectors.EVENT_READ, ("hypercall", domain))
        if log_sock is not None:
            domain.log = GuestLog(self.run.log(f"dom{domain.domid}"), log_sock, fresh=False)
            self._watch_log(domain)
        elif domain.domid != 0:
            log.error("dom%d: the fd keeper lost its log socket; its output is lost", domain.domid)
        if domain.status is Status.BUILDING:
            # Its boot needed the sync socket, which died with the old hyperd: it cannot finish.
            log.warning("dom%d (%s) was being built: destroying it", domain.domid, domain.name)
            self.destroy(domain)
            return True
        if domain.status is Status.DYING:
            log.warning("dom%d (%s) was being destroyed: finishing", domain.domid, domain.name)
            self.destroy(domain)
            return True
        if domain.pidfd is not None and sock is None:
            log.error("dom%d: the fd keeper lost its hypercall socket; killing it", domain.domid)
            if domain.cgroup is not None:
                domain.cgroup.kill_all()
            self._forget_pidfd(domain)
        if domain.pidfd is None:
            return False
        self.selector.register(domain.pidfd, selectors.EVENT_READ, ("pidfd", domain))
        return True

    def _reconcile(self) -> None:
        """Remove what a hyperd killed between making something and saving it left: a cgroup or
        a /dev/shm entry that no domain of the state holds, whatever its name or type (anyone
        may make one in the world-writable /dev/shm: a symlink is removed, never followed).
        hyper's parent cgroup and the ``hyper.`` names are hyperd's."""
        groups = {d.cgroup.name for d in self.domains.values() if d.cgroup is not None}
        for name in self.cgroups.list():
            if name not in groups:
                log.warning("removing cgroup %s: no domain holds it", name)
                try:
                    self.cgroups.open(name).remove()
                except cgroup.CgroupError as exc:
                    log.error("cannot remove cgroup %s: %s", name, exc)
        held: set[Path] = set()
        for domain in self.domains.values():
            held |= domain.resources.paths()
        for path in leftovers():
            if path not in held and os.path.lexists(path):  # not gone with its directory
                log.warning("removing %s: no domain holds it", path)
                problem = remove(path)
                if problem is not None:
                    log.error("cannot remove %s", problem)

    def _forget_sockets(self, sockets: dict[str, socket.socket]) -> None:
        """Sockets the keeper held for domains that are no more."""
        for name, sock in sockets.items():
            log.info("the fd keeper held %s, which no domain uses: dropped", name)
            self._to_keeper(lambda k, name=name: k.drop(name))
            sock.close()

    # -- dom0 ------------------------------------------------------------------------------

    def start_dom0(self) -> None:
        # What was pending for a dead dom0 is for nobody: a new one learns the domains below.
        self._events.clear()
        dom0 = self.domains.get(0)
        if dom0 is None:
            dom0 = Domain(
                0, DOM0_NAME, dom0_config(_host_memory_mib(), os.cpu_count() or 1), Resources(0)
            )
            # dom0 is accounted, not limited: its group only measures what it uses.
            unlimited = cgroup.Limits(memory_mib=_host_memory_mib(), pids_max=1 << 16)
            dom0.cgroup = self.cgroups.create("dom0", unlimited)
            self.domains[0] = dom0
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        assert dom0.cgroup is not None
        groups = dom0.cgroup.procs_file_paths()
        # One log per hypervisor run; a restarted dom0 adds to it.
        with open(self.run.log("dom0"), "ab" if self.dom0_restarts else "wb") as out:
            proc = self.spawner.server().spawn(
                "dom0.main:main",
                [
                    "--hypercall-fd",
                    str(DOM0_HYPERCALL_FD),
                    "--run-dir",
                    str(self.run.root),
                    *(["--recover"] if self.dom0_restarts else []),
                ],
                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                pass_fds={DOM0_HYPERCALL_FD: theirs.fileno()},
                setup=ChildSetup(cgroup_procs=tuple(map(str, groups)), comm="hyper-dom0"),
            )
        theirs.close()
        dom0.set_pid(proc.pid)
        self._dom0_started = time.monotonic()
        dom0.process = proc
        ours.setblocking(False)
        dom0.sock = ours
        dom0.status = Status.RUNNING
        self.selector.register(ours, selectors.EVENT_READ, ("hypercall", dom0))
        self._keep(dom0)
        log.info("dom0 started, pid %d", proc.pid)
        # A restarted dom0 learns the domains that already exist, as if they were new (those
        # being built too: what their build queued for the dead dom0 was dropped above).
        for domain in self.domains.values():
            if domain.domid != 0 and domain.status is not Status.DYING:
                self.event("domain_introduced", self.info(domain))
                if domain.status is Status.RUNNING:
                    self.event("domain_running", {"domid": domain.domid})

    def event(self, name: str, data: dict[str, Any]) -> None:
        """Tell dom0, once the change is in the state file (see ``_commit``)."""
        self._events.append((name, data))
        self._dirty = True

    def _send(self, domain: Domain, message: bytes) -> None:
        """Queue a message for a domain without ever blocking the loop. While a domain has
        unsent replies it is not read from: one that never reads can queue only the replies
        to what it already sent (and dom0, events, up to OUTQ_LIMIT)."""
        if domain.sock is None:
            return
        if not domain.outq:
            try:
                domain.sock.send(message)
                return
            except BlockingIOError:
                pass
            except OSError as exc:
                log.warning("dom%d: message lost: %s", domain.domid, exc)
                return
        if len(domain.outq) >= OUTQ_LIMIT:
            log.error("dom%d does not read its hypercall socket; dropping a message", domain.domid)
            return
        domain.outq.append(message)
        self._watch(domain)

    def _flush(self, domain: Domain) -> None:
        assert domain.sock is not None
        while domain.outq:
            try:
                domain.sock.send(domain.outq[0])
            except BlockingIOError:
                return
            except OSError:
                domain.outq.clear()
                break
            domain.outq.popleft()
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
        try:
            data = caller.sock.recv(hc.MAX_MESSAGE, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop_socket(caller)
            return
        reply, read_only = self._answer(caller, data)
        try:
            self._commit()
        finally:  # even if saving failed: a request left queued would be handled forever
            self._reply(caller, reply)
            if caller.sock is not None:
                with contextlib.suppress(OSError):
                    caller.sock.recv(hc.MAX_MESSAGE)  # done: consume it
            self._charge(caller, HYPERCALL_COST[read_only])

    def _charge(self, caller: Domain, cost: float) -> None:
        """A domU pays for its call; one out of credit is not read from until it is back."""
        if caller.domid == 0:
            return
        wait = caller.credit.charge(cost)
        if wait > 0 and caller.sock is not None:
            caller.calls_paused_until = time.monotonic() + wait
            self._paused[caller.domid] = caller
            self._watch(caller)

    def _answer(self, caller: Domain, data: bytes) -> tuple[dict[str, Any], bool]:
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
            result = self.handle(caller, op)
            return {"id": req_id, "ok": True, "result": result}, op.read_only
        except (HvError, EvtchnError, GnttabError) as exc:
            error = {"id": req_id, "ok": False, "error": exc.errno_name, "message": str(exc)}
            return error, op.read_only
        except Exception as exc:
            log.exception("dom%d: hypercall %s failed", caller.domid, op.op)
            return {"id": req_id, "ok": False, "error": "EIO", "message": str(exc)}, op.read_only

    def _reply(self, caller: Domain, reply: dict[str, Any]) -> None:
        self._send(caller, hc.encode(reply))

    def _drop_socket(self, domain: Domain) -> None:
        if domain.sock is not None:
            with contextlib.suppress(KeyError, ValueError):  # a build that failed early
                self.selector.unregister(domain.sock)
            self._unkeep(domain)
            domain.sock.close()
            domain.sock = None
            domain.outq.clear()
            domain.calls_paused_until = 0.0
            self._forget_pause(domain)

    # -- the fd keeper -----------------------------------------------------------------------

    def _keep(self, domain: Domain) -> None:
        """Hand the keeper our end of each of the domain's sockets (``_kept``)."""
        for name, sock in _kept(domain).items():
            self._to_keeper(lambda k, name=name, sock=sock: k.put(name, sock.fileno()))

    def _unkeep(self, domain: Domain) -> None:
        self._to_keeper(lambda k: k.drop(_socket_name(domain.domid)))

    def _to_keeper(self, action: Any) -> None:
        if self.keeper is None:
            return
        try:
            action(self.keeper)
        except OSError as exc:
            log.error("the fd keeper is gone (%s); starting a new one", exc)
            self._replace_keeper()

    def connect_keeper(self) -> KeeperClient | None:
        """The running fd keeper, or a new one; None (logged) if neither answers."""
        if self.keeper is not None:
            self.keeper.close()
            self.keeper = None
        try:
            self.keeper = keeper.connect_or_start(
                self.run.keeper_socket, self.spawner, self.run.log("hyperd")
            )
        except (KeeperError, OSError) as exc:
            log.error("no fd keeper (%s): a killed hyperd would now take every domain down", exc)
        return self.keeper

    def _replace_keeper(self) -> None:
        """A new keeper, holding every socket we hold: until then a kill of hyperd would end
        every domain."""
        fd_keeper = self.connect_keeper()
        try:
            for domain in self.domains.values():
                for name, sock in _kept(domain).items():
                    if fd_keeper is not None:
                        fd_keeper.put(name, sock.fileno())
        except OSError as exc:
            log.error("the new fd keeper failed too (%s)", exc)

    def handle(self, caller: Domain, op: Op) -> dict[str, Any]:
        if op.privileged and caller.domid != 0:
            raise HvError("EPERM", f"{op.op} is privileged; domain {caller.domid} may not call it")
        return self._handlers[type(op)](caller, op)

    def _handler_table(self) -> dict[type[Op], Callable[[Domain, Any], dict[str, Any]]]:
        """Which method answers each hypercall (Xen's hypercall_table); a test checks that
        every op in channels.hypercall.OPS has one."""
        return {
            hc.EvtchnAllocUnbound: self.do_evtchn_alloc_unbound,
            hc.EvtchnStatus: self.do_evtchn_status,
            hc.EvtchnClose: self.do_evtchn_close,
            hc.GnttabSetupPool: self.do_gnttab_setup_pool,
            hc.GnttabMapPools: self.do_gnttab_map_pools,
            hc.GnttabReleasePool: self.do_gnttab_release_pool,
            hc.SchedBooted: self.do_sched_booted,
            hc.SchedShutdown: self.do_sched_shutdown,
            hc.DomctlCreate: self.do_domctl_create,
            hc.DomctlDestroy: self.do_domctl_destroy,
            hc.DomctlPause: self.do_domctl_pause,
            hc.DomctlList: self.do_domctl_list,
            hc.DomctlExecTarget: self.do_domctl_exec_target,
            hc.DomctlSetSched: self.do_domctl_set_sched,
            hc.DomctlSetMemory: self.do_domctl_set_memory,
            hc.SysctlDmesg: self.do_sysctl_dmesg,
            hc.SysctlInfo: self.do_sysctl_info,
            hc.SysctlHalt: self.do_sysctl_halt,
            hc.EvtchnBindInterdomain: self.do_evtchn_bind_interdomain,
        }

    def _domu(self, domid: int) -> Domain:
        domain = self.domains.get(domid)
        if domain is None or domid == 0:
            raise HvError("ESRCH", f"no domain {domid}")
        return domain

    def _shared_resources(self, a: int, b: int) -> Resources:
        """Objects shared by dom0 and a domU belong to the domU: they die with it."""
        return self._domu(b if a == 0 else a).resources

    def do_evtchn_alloc_unbound(self, caller: Domain, op: hc.EvtchnAllocUnbound) -> dict[str, Any]:
        resources = self._shared_resources(caller.domid, op.remote_dom)
        port = self.evtchn.alloc_unbound(caller.domid, op.remote_dom, resources)
        return {"port": port.port, "doorbell": port.doorbell}

    def do_evtchn_bind_interdomain(
        self, caller: Domain, op: hc.EvtchnBindInterdomain
    ) -> dict[str, Any]:
        resources = self._shared_resources(caller.domid, op.remote_dom)
        port = self.evtchn.bind_interdomain(caller.domid, op.remote_dom, op.remote_port, resources)
        return {
            "port": port.port,
            "doorbell": port.doorbell,
            "peer_doorbell": self.evtchn.peer_doorbell(port),
        }

    def do_evtchn_status(self, caller: Domain, op: hc.EvtchnStatus) -> dict[str, Any]:
        port = self.evtchn.get(caller.domid, op.port)
        return {
            "state": port.state,
            "remote_dom": port.remote_dom,
            "remote_port": port.remote_port,
            "doorbell": port.doorbell,
            "peer_doorbell": self.evtchn.peer_doorbell(port),
        }

    def do_evtchn_close(self, caller: Domain, op: hc.EvtchnClose) -> dict[str, Any]:
        self.evtchn.close(caller.domid, op.port)
        return {}

    def do_gnttab_setup_pool(self, caller: Domain, op: hc.GnttabSetupPool) -> dict[str, Any]:
        resources = self._shared_resources(caller.domid, op.peer)
        budget = grant_budget(caller.memory)
        pool = self.gnttab.setup_pool(caller.domid, op.peer, op.device, op.pages, resources, budget)
        return pool.result()

    def do_gnttab_map_pools(self, caller: Domain, op: hc.GnttabMapPools) -> dict[str, Any]:
        granter = self.domains.get(op.granter)
        pools = self.gnttab.pools_for(caller.domid, op.granter, op.device)
        return {
            "pools": [p.result() for p in pools],
            "max_pages": grant_budget(granter.memory) if granter is not None else 0,
        }

    def do_gnttab_release_pool(self, caller: Domain, op: hc.GnttabReleasePool) -> dict[str, Any]:
        resources = caller.resources
        self.gnttab.release_pool(caller.domid, op.pool, resources)
        return {}

    def do_sched_booted(self, caller: Domain, op: hc.SchedBooted) -> dict[str, Any]:
        if caller.status is Status.BUILDING:
            caller.status = Status.RUNNING
            log.info("dom%d (%s) running", caller.domid, caller.name)
            self.event("domain_running", {"domid": caller.domid})
        return {}

    def do_sched_shutdown(self, caller: Domain, op: hc.SchedShutdown) -> dict[str, Any]:
        if caller.domid == 0:
            raise HvError("EINVAL", "dom0 shuts down with sysctl_halt")
        if (op.reason, op.code) != (caller.shutdown_reason, caller.exit_code):  # once, not per call
            log.info(
                "dom%d (%s) shutting down: %s (code %d)",
                caller.domid,
                caller.name,
                op.reason,
                op.code,
            )
        caller.shutdown_reason = op.reason
        caller.exit_code = op.code
        return {}

    def do_domctl_create(self, caller: Domain, op: hc.DomctlCreate) -> dict[str, Any]:
        if self.halting:
            raise HvError("ESHUTDOWN", "the hypervisor is halting")
        name = op.config.name
        if any(d.name == name for d in self.domains.values()):
            raise HvError("EEXIST", f"a domain named {name!r} already exists")
        return self.info(self.build(op.config, op.owner))

    def do_domctl_destroy(self, caller: Domain, op: hc.DomctlDestroy) -> dict[str, Any]:
        self.destroy(self._domu(op.domid))
        return {}

    def do_domctl_pause(self, caller: Domain, op: hc.DomctlPause) -> dict[str, Any]:
        domain = self._domu(op.domid)
        if domain.cgroup is None or domain.status is not Status.RUNNING:
            raise HvError("EINVAL", f"domain {op.domid} is {domain.status.value}")
        if op.pause:
            domain.cgroup.freeze()
        else:
            domain.cgroup.thaw()
        log.info("dom%d %s", op.domid, "paused" if op.pause else "unpaused")
        return {}

    def do_domctl_list(self, caller: Domain, op: hc.DomctlList) -> dict[str, Any]:
        return {
            "domains": [self.info(d) for d in sorted(self.domains.values(), key=lambda d: d.domid)]
        }

    def do_domctl_exec_target(self, caller: Domain, op: hc.DomctlExecTarget) -> dict[str, Any]:
        domain = self._domu(op.domid)
        if domain.status is not Status.RUNNING or domain.pid is None or domain.cgroup is None:
            raise HvError("EINVAL", f"domain {op.domid} is not running")
        if domain.cgroup.frozen:
            raise HvError("EBUSY", f"domain {op.domid} is paused")
        init = find_workload_init(domain.pid)
        if init is None:
            raise HvError("ESRCH", f"domain {op.domid} has no workload init")
        return {"pid": init, "cgroup_procs": [str(p) for p in domain.cgroup.procs_file_paths()]}

    def do_domctl_set_sched(self, caller: Domain, op: hc.DomctlSetSched) -> dict[str, Any]:
        domain = self._domu(op.domid)
        if op.cap is not None and op.cap > 100 * domain.config.vcpus:
            limit = 100 * domain.config.vcpus
            raise HvError(
                "EINVAL",
                f"cap {op.cap}% is more than {domain.config.vcpus} vcpus can use ({limit}%)",
            )
        changes = {"cpu_weight": op.cpu_weight, "cap": op.cap}
        domain.config = domain.config.model_copy(
            update={key: value for key, value in changes.items() if value is not None}
        )
        if domain.cgroup is not None:
            domain.cgroup.set_limits(_limits(domain.config))
        return {"cpu_weight": domain.config.cpu_weight, "cap": domain.config.cap}

    def do_domctl_set_memory(self, caller: Domain, op: hc.DomctlSetMemory) -> dict[str, Any]:
        domain = self._domu(op.domid)
        old = domain.config
        domain.config = old.model_copy(update={"memory": op.memory})
        if domain.cgroup is not None:
            try:
                domain.cgroup.set_limits(_limits(domain.config))
            except cgroup.CgroupError as exc:
                domain.config = old
                message = f"domain {op.domid}: cannot set {op.memory} MiB: {exc}"
                raise HvError("EBUSY", message) from exc
        log.info("dom%d memory limit %d -> %d MiB", op.domid, old.memory, op.memory)
        return {"memory": op.memory}

    def do_sysctl_dmesg(self, caller: Domain, op: hc.SysctlDmesg) -> dict[str, Any]:
        lines = list(self.dmesg.lines)
        if op.clear:
            self.dmesg.lines.clear()
        return {"lines": lines}

    def do_sysctl_info(self, caller: Domain, op: hc.SysctlInfo) -> dict[str, Any]:
        uname = platform.uname()
        return {
            "host": uname.node,
            "release": uname.release,
            "machine": uname.machine,
            "nr_cpus": os.cpu_count(),
            "total_memory": _host_memory_mib(),
            "free_memory": _host_available_mib(),
            "hyper_version": "0.1.0",
            "cgroup_version": self.cgroups.version,
            "hyperd_pid": os.getpid(),
            "nr_domains": len(self.domains),
            "dom0_restarts": self.dom0_restarts,
        }

    def do_sysctl_halt(self, caller: Domain, op: hc.SysctlHalt) -> dict[str, Any]:
        # Reply first: halting stops dom0, which would never see the answer.
        self.halt_requested = True
        return {}

    # -- building and destroying -------------------------------------------------------------

    def info(self, domain: Domain) -> dict[str, Any]:
        info = domain.info(self._state_letters(domain), self._cpu_ns(domain))
        try:
            info["mem_usage"] = domain.cgroup.memory_bytes() if domain.cgroup else 0
        except cgroup.CgroupError:
            info["mem_usage"] = 0
        return info

    def _cpu_ns(self, domain: Domain) -> int:
        if domain.cgroup is None:
            return domain.final_cpu_ns
        try:
            return domain.cgroup.cpu_time_ns()
        except cgroup.CgroupError:
            return domain.final_cpu_ns

    def _state_letters(self, domain: Domain) -> str:
        letters = ["-"] * 6
        if domain.status is Status.RUNNING and domain.cgroup is not None:
            if domain.cgroup.frozen:
                letters[2] = "p"
            elif _any_running(domain.cgroup.pids()):
                letters[0] = "r"
            else:
                letters[1] = "b"
        elif domain.status is Status.SHUTDOWN:
            letters[3] = "s"
        elif domain.status is Status.CRASHED:
            letters[4] = "c"
        elif domain.status is Status.DYING:
            letters[5] = "d"
        return "".join(letters)

    def _next_domid(self) -> int:
        """Domain ids increase (as Xen's do) and wrap; a restarted domain gets a new one."""
        domid = self.last_domid
        while True:
            domid = domid % hc.DOMID_MAX + 1
            if domid not in self.domains:
                self.last_domid = domid
                return domid

    def build(self, config: DomainConfig, owner: int) -> Domain:
        domid = self._next_domid()
        domain = Domain(domid, config.name, config, Resources(domid), owner=owner)
        try:
            domain.cgroup = self.cgroups.create(f"dom{domid}", _limits(config))
            domain.resources.open_view()
            sizes = ring_sizes()
            domain.store = self._ring(domain, "store", sizes["store"])
            domain.console = self._ring(domain, "console", sizes["console"])
            spawn_boot(domain, self.run.rootfs, self.run.log(f"dom{domid}"), self.spawner.server())
        except Exception as exc:
            self._release(domain)
            raise HvError("EIO", f"building domain {domid}: {exc}") from exc
        assert domain.sock is not None and domain.sync is not None
        domain.sock.setblocking(False)
        self.domains[domid] = domain
        self.selector.register(domain.sock, selectors.EVENT_READ, ("hypercall", domain))
        self.selector.register(domain.sync, selectors.EVENT_READ, ("sync", domain))
        self._keep(domain)
        self._watch_log(domain)
        log.info(
            "dom%d (%s) created: %d MiB, %d vcpus", domid, domain.name, domain.memory, domain.vcpus
        )
        self.event("domain_introduced", self.info(domain))
        return domain

    def _ring(self, domain: Domain, kind: str, size: int) -> RingInfo:
        segment = domain.resources.new_segment(kind, size, host_gid(domain.domid))
        domu_port = self.evtchn.alloc_unbound(domain.domid, 0, domain.resources)
        dom0_port = self.evtchn.bind_interdomain(0, domain.domid, domu_port.port, domain.resources)
        return RingInfo(segment, domu_port.port, dom0_port.port)

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

    def _watch_log(self, domain: Domain) -> None:
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
        self._to_keeper(lambda k: k.drop(_log_name(domain.domid)))

    def _check_builds(self) -> bool:
        now = time.time()
        late = [
            d
            for d in self.domains.values()
            if d.status is Status.BUILDING and now - d.created > BUILD_TIMEOUT
        ]
        for domain in late:
            log.error("dom%d: did not boot in %.0f s", domain.domid, BUILD_TIMEOUT)
            self._finish(domain, "crash")
        return bool(late)

    def _on_pidfd(self, domain: Domain) -> None:
        """An adopted domain's main process exited (PID 1 reaps it: we only learn that)."""
        self._forget_pidfd(domain)
        self._on_death(domain, None)

    def _forget_pidfd(self, domain: Domain) -> None:
        if domain.pidfd is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(domain.pidfd)
            os.close(domain.pidfd)
            domain.pidfd = None

    def _on_death(self, domain: Domain, status: int | None) -> None:
        """``status`` is the wait status, None for an adopted process (not ours to reap)."""
        if domain.domid == 0:
            self._on_dom0_death(status)
            return
        if domain.status is Status.DYING:
            return
        self._read_last_words(domain)
        reason = domain.shutdown_reason or "crash"
        if domain.shutdown_reason is None:
            log.info(
                "dom%d (%s) died unexpectedly (%s)", domain.domid, domain.name, _describe(status)
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
                    self.do_sched_shutdown(domain, op)

    def _finish(self, domain: Domain, reason: str) -> None:
        """Apply the config's on_<reason> action to a domain that stopped."""
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
        domain.final_cpu_ns = self._cpu_ns(domain)
        if domain.pidfd is not None:
            # Adopted: not our child, so only the pidfd names it safely; PID 1 reaps it.
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(domain.pidfd, signal.SIGKILL)
            self._forget_pidfd(domain)
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
        self._drop_socket(domain)
        self._end_sync(domain)
        self._end_log(domain)
        self.evtchn.close_domain(domain.domid)
        self.gnttab.release_domain(domain.domid, domain.resources)
        domain.resources.release()

    def _release(self, domain: Domain) -> None:
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
        self._release(domain)
        self.domains.pop(domain.domid, None)
        log.info("dom%d (%s) destroyed", domain.domid, domain.name)
        self.event("domain_destroyed", {"domid": domain.domid, "name": domain.name})

    def _on_dom0_death(self, status: int | None) -> None:
        dom0 = self.domains[0]
        self._drop_socket(dom0)
        self._forget_pidfd(dom0)
        dom0.pid = None
        self.evtchn.orphan(0)
        if self.halting:
            self.domains.pop(0, None)
            if dom0.cgroup is not None:
                dom0.cgroup.remove()
            return
        self.dom0_restarts += 1
        # What the dead dom0 left running (its data-path workers, its relays) must be gone
        # before the next dom0 starts: a worker still writing to its old loop device could
        # land a write after a newer one the next dom0 acknowledged over a new loop device.
        self._dom0_reap_warn_at = time.monotonic() + DOM0_REAP_WARN
        self._dom0_reap_tick = DOM0_REAP_TICK[0]
        self._kill_dom0_leftovers()
        # A dom0 that dies soon after starting (a broken install, a missing module) would
        # otherwise be restarted as fast as it can die: back off, doubling, up to a limit.
        if time.monotonic() - self._dom0_started > DOM0_STABLE:
            self._dom0_backoff = 0.0
        else:
            first, longest = DOM0_BACKOFF
            self._dom0_backoff = min(longest, max(first, 2 * self._dom0_backoff))
        if not self._dom0_backoff:
            log.error("dom0 died (%s); restarting it", _describe(status))
        else:
            log.error(
                "dom0 died (%s) %.1f s after starting; restarting it in %.2f s",
                _describe(status),
                time.monotonic() - self._dom0_started,
                self._dom0_backoff,
            )
        self._dom0_restart_at = time.monotonic() + self._dom0_backoff

    def _restart_dom0_when_due(self, now: float) -> bool:
        """Start the next dom0 once its wait is over (at monotonic ``now``) and nothing of the
        dead one runs; until then kill what is left again and look again later (DOM0_REAP_TICK:
        at once at first, ever more rarely for a process that will not die). Never blocks: each
        look is one read of dom0's cgroup and a SIGKILL per process still there. True if it
        started."""
        due = self._dom0_restart_at
        if due is None or now < due or self.halting:
            return False
        if self._kill_dom0_leftovers():
            self._dom0_restart_at = now + self._dom0_reap_tick
            self._dom0_reap_tick = min(DOM0_REAP_TICK[1], 2 * self._dom0_reap_tick)
            return False
        self._dom0_restart_at = None
        self.start_dom0()
        return True

    def _kill_dom0_leftovers(self) -> bool:
        """SIGKILL every process left in dom0's cgroup; True while any is left. One in the
        middle of a write dies once the write is done, so an empty group means every write
        the dead dom0 started has landed."""
        dom0 = self.domains.get(0)
        group = dom0.cgroup if dom0 is not None else None
        if group is None:
            return False
        try:
            left = group.kill()
        except cgroup.CgroupError as exc:
            log.error("dom0's cgroup: %s; not waiting for what the dead dom0 left", exc)
            return False
        warn_at = self._dom0_reap_warn_at
        if left and warn_at is not None and time.monotonic() >= warn_at:
            self._dom0_reap_warn_at = None
            log.warning(
                "the dead dom0's processes %s are not gone after %.0f s: the next dom0 waits",
                group.pids(),
                DOM0_REAP_WARN,
            )
        return left

    def halt(self) -> None:
        """Destroy every domU, then stop dom0; the main loop then exits."""
        if self.halting:
            return
        self.halting = True
        self._dirty = True
        self._save()  # a hyperd killed during the halt finishes it (``_adopt_all``)
        log.info("halting: destroying every domain")
        for domain in [d for d in self.domains.values() if d.domid != 0]:
            self.destroy(domain)
        # dom0 hears of the destructions before it is told to stop (it may still read them).
        self._commit()
        dom0 = self.domains.pop(0, None)
        if dom0 is None:
            return
        self._dirty = True
        self._drop_socket(dom0)
        if dom0.pidfd is not None:
            _terminate_adopted(dom0.pidfd)
            self._forget_pidfd(dom0)
        elif dom0.pid is not None and not dom0.reaped:
            _terminate(dom0.pid)
            dom0.reaped = True
            if dom0.process is not None:
                dom0.process.returncode = 0
        if dom0.cgroup is not None:
            dom0.cgroup.remove()


def _pidfd_of(pid: int | None, started: int | None) -> int | None:
    """A pidfd on the process that had ``pid`` and started at ``started``; None if it is gone
    (its number perhaps reused since)."""
    if pid is None or started is None:
        return None
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    # Opened first, checked second: had the number been reused before the open, the start time
    # would differ; from the open on, the pidfd pins the process we checked. A zombie that
    # PID 1 has not reaped yet is as dead as one it has.
    exited, _, _ = select.select([pidfd], [], [], 0)
    if exited or process_start_time(pid) != started:
        os.close(pidfd)
        return None
    return pidfd


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


def _limits(config: DomainConfig) -> cgroup.Limits:
    return cgroup.Limits(
        memory_mib=config.memory,
        cpu_weight=config.cpu_weight,
        cap=config.cap,
        pids_max=PIDS_MAX,
        vcpus=config.vcpus,
    )


def _any_running(pids: list[int]) -> bool:
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] == "R":
            return True
    return False


def _meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) // 1024
    return 0


def _host_memory_mib() -> int:
    return _meminfo("MemTotal")


def _host_available_mib() -> int:
    return _meminfo("MemAvailable")


def _describe(status: int | None) -> str:
    if status is None:
        return "not our child: exit status unknown"
    code = os.waitstatus_to_exitcode(status)
    return f"signal {-code}" if code < 0 else f"exit status {code}"


def _request_id(data: bytes) -> int | None:
    try:
        value = json.loads(data).get("id")
    except (ValueError, AttributeError, RecursionError):
        return None
    return value if isinstance(value, int) else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hyperd", description="the hyper hypervisor")
    parser.add_argument("--run-dir", default=None, help="state directory (default /run/hyper)")
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
    hypervisor = Hypervisor(run, cgroup.open_hierarchy(), dmesg)
    # From the main thread (the server dies with it), and now: its imports overlap ours.
    hypervisor.spawner.start()
    log.info("hyperd %d starting (cgroup v%d)", os.getpid(), hypervisor.cgroups.version)
    sockets = _connect_keeper(hypervisor)
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
    if hypervisor.keeper is not None:
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


def _connect_keeper(hypervisor: Hypervisor) -> dict[str, socket.socket] | None:
    """Connect to the fd keeper (starting one if none runs) and take back what it holds; None
    if that failed."""
    fd_keeper = hypervisor.connect_keeper()
    if fd_keeper is None:
        return None
    try:
        return fd_keeper.fetch()
    except KeeperError as exc:
        log.error("%s: a killed hyperd would now take every domain down", exc)
        fd_keeper.close()
        hypervisor.keeper = None
        return None


if __name__ == "__main__":
    sys.exit(main())

"""Surviving hyperd's own death (SIGKILL included): the fd keeper's link, and re-adoption.

The domains do not need hyperd to move data, only to change what exists. So hyperd hands its
end of every hypercall socket to the fd keeper (hyperd/keeper.py), which outlives it, and after
every change writes its tables to the state file (hyperd/state.py) before it tells anyone of the
change. While no hyperd runs, the domains run on and their hypercalls wait in the kernel. A
hyperd that starts and finds a state file re-adopts (``adopt_all``): it rebuilds the tables
(``Hypervisor.load``), re-opens the cgroups, takes the sockets back from the keeper and watches
each domain's process through a pidfd (they are PID 1's children now, not its own). A domain
that died meanwhile gets its ``on_crash`` (or the reason it gave in sched_shutdown); a dom0 that
died is restarted; a domain that was still being built is destroyed.
"""

from __future__ import annotations

import logging
import os
import select
import selectors
import socket
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from channels.forkserver import Spawner
from channels.paths import RunDir
from hyperd import cgroup, keeper
from hyperd.budget import GuestLog
from hyperd.domain import Domain, Status, process_start_time
from hyperd.keeper import KeeperClient, KeeperError
from hyperd.resources import leftovers, remove

if TYPE_CHECKING:
    from hyperd.hypervisor import Hypervisor

log = logging.getLogger("hyperd")


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


class KeeperLink:
    """hyperd's connection to the fd keeper, kept in step with the domain table: every socket of
    a domain is handed over as it is made and dropped as it is closed. A keeper that fails is
    replaced by a new one, handed every socket of ``domains()`` (read anew each time: a
    re-adoption replaces the table)."""

    def __init__(
        self, run: RunDir, spawner: Spawner, domains: Callable[[], Iterable[Domain]]
    ) -> None:
        self.run = run
        self.spawner = spawner
        self.domains = domains
        self.client: KeeperClient | None = None  # connected by main (``take_back``)

    def connect(self) -> KeeperClient | None:
        """The running fd keeper, or a new one; None (logged) if neither answers."""
        if self.client is not None:
            self.client.close()
            self.client = None
        try:
            self.client = keeper.connect_or_start(
                self.run.keeper_socket, self.spawner, self.run.log("hyperd")
            )
        except (KeeperError, OSError) as exc:
            log.error("no fd keeper (%s): a killed hyperd would now take every domain down", exc)
        return self.client

    def take_back(self) -> dict[str, socket.socket] | None:
        """Connect to the fd keeper (starting one if none runs) and take back what it holds;
        None if that failed."""
        fd_keeper = self.connect()
        if fd_keeper is None:
            return None
        try:
            return fd_keeper.fetch()
        except KeeperError as exc:
            log.error("%s: a killed hyperd would now take every domain down", exc)
            fd_keeper.close()
            self.client = None
            return None

    def keep(self, domain: Domain) -> None:
        """Hand the keeper our end of each of the domain's sockets (``_kept``)."""
        for name, sock in _kept(domain).items():
            self._put(name, sock)

    def unkeep(self, domain: Domain) -> None:
        """The domain's hypercall socket is closed: the keeper closes its copy."""
        self._drop(_socket_name(domain.domid))

    def drop_log(self, domid: int) -> None:
        """... and its log socket."""
        self._drop(_log_name(domid))

    def _put(self, name: str, sock: socket.socket) -> None:
        self._to_keeper(lambda k: k.put(name, sock.fileno()))

    def _drop(self, name: str) -> None:
        self._to_keeper(lambda k: k.drop(name))

    def forget(self, sockets: dict[str, socket.socket]) -> None:
        """Sockets the keeper held for domains that are no more."""
        for name, sock in sockets.items():
            log.info("the fd keeper held %s, which no domain uses: dropped", name)
            self._drop(name)
            sock.close()

    def exit(self) -> None:
        """Stop the keeper: hyperd stops and leaves no domain behind."""
        if self.client is not None:
            self.client.exit()

    def _to_keeper(self, action: Callable[[KeeperClient], None]) -> None:
        if self.client is None:
            return
        try:
            action(self.client)
        except OSError as exc:
            log.error("the fd keeper is gone (%s); starting a new one", exc)
            self._replace()

    def _replace(self) -> None:
        """A new keeper, holding every socket we hold: until then a kill of hyperd would end
        every domain."""
        fd_keeper = self.connect()
        try:
            for domain in self.domains():
                for name, sock in _kept(domain).items():
                    if fd_keeper is not None:
                        fd_keeper.put(name, sock.fileno())
        except OSError as exc:
            log.error("the new fd keeper failed too (%s)", exc)


def adopt_all(hv: Hypervisor, sockets: dict[str, socket.socket]) -> None:
    """Take back the domains of the tables ``hv.load`` rebuilt, with the ``sockets`` the fd
    keeper held for them; finish what the previous hyperd left half done."""
    log.info("re-adopting %d domains from %s", len(hv.domains), hv.run.state_file)
    reconcile(hv.domains.values(), hv.cgroups)
    dead = [
        domain
        for domid, domain in sorted(hv.domains.items())
        if not _adopt(
            hv, domain, sockets.pop(_socket_name(domid), None), sockets.pop(_log_name(domid), None)
        )
    ]
    hv.keeper.forget(sockets)
    if hv.halt_requested:
        log.warning("the previous hyperd was halting: finishing the halt")
        hv.halt()  # every domU goes, dead or alive: no on_crash
        return
    for domain in dead:
        if domain.domid != 0:
            log.warning("dom%d (%s) died while no hyperd ran", domain.domid, domain.name)
            hv.on_death(domain, None)
    if 0 in hv.domains and any(d.domid == 0 for d in dead):
        hv.dom0_lifecycle.on_death(None)
    elif 0 not in hv.domains:
        hv.dom0_lifecycle.start()
    # A dom0 restart the old hyperd had no time to tell the store domain of is told now.
    hv.store_lifecycle.tell_dom0_restarted()
    log.info("re-adopted: %s", ", ".join(f"dom{d}" for d in sorted(hv.domains)))


def _adopt(
    hv: Hypervisor, domain: Domain, sock: socket.socket | None, log_sock: socket.socket | None
) -> bool:
    """Take a domain of the state file back: its sockets, and a pidfd on its process. False
    if it is dead (or cannot be run without its socket), for the caller to finish."""
    if domain.status in (Status.SHUTDOWN, Status.CRASHED):  # preserved: nothing runs
        if sock is not None:
            hv.keeper.unkeep(domain)
            sock.close()
        if log_sock is not None:
            hv.keeper.drop_log(domain.domid)
            log_sock.close()
        return True
    domain.reaped = True  # whatever still runs is PID 1's child now, never ours to reap
    domain.pidfd = _pidfd_of(domain.pid, domain.pid_start)
    if sock is not None:
        sock.setblocking(False)
        domain.sock = sock
        hv.selector.register(sock, selectors.EVENT_READ, ("hypercall", domain))
    if log_sock is not None:
        domain.log = GuestLog(hv.run.log(f"dom{domain.domid}"), log_sock, fresh=False)
        hv.watch_log(domain)
    elif domain.domid != 0:
        log.error("dom%d: the fd keeper lost its log socket; its output is lost", domain.domid)
    if domain.status is Status.BUILDING and domain.domid == hv.store_domid:
        # The store domain, being (re)started: its boot died with the old hyperd's sync
        # socket, and it is started again in place (hyperd/store_domain.py), never destroyed.
        log.warning("dom%d (%s) was being started: starting it again", domain.domid, domain.name)
        if domain.cgroup is not None:
            domain.cgroup.kill_all()
        hv.forget_pidfd(domain)
        return False
    if domain.status is Status.BUILDING:
        # Its boot needed the sync socket, which died with the old hyperd: it cannot finish.
        log.warning("dom%d (%s) was being built: destroying it", domain.domid, domain.name)
        hv.destroy(domain)
        return True
    if domain.status is Status.DYING:
        log.warning("dom%d (%s) was being destroyed: finishing", domain.domid, domain.name)
        hv.destroy(domain)
        return True
    if domain.pidfd is not None and sock is None:
        log.error("dom%d: the fd keeper lost its hypercall socket; killing it", domain.domid)
        if domain.cgroup is not None:
            domain.cgroup.kill_all()
        hv.forget_pidfd(domain)
    if domain.pidfd is None:
        return False
    hv.selector.register(domain.pidfd, selectors.EVENT_READ, ("pidfd", domain))
    return True


def reconcile(domains: Collection[Domain], cgroups: cgroup.Hierarchy) -> None:
    """Remove what a hyperd killed between making something and saving it left: a cgroup or
    a /dev/shm entry that none of ``domains`` holds, whatever its name or type (anyone may make
    one in the world-writable /dev/shm: a symlink is removed, never followed). hyper's parent
    cgroup and the ``hyper.`` names are hyperd's."""
    groups = {d.cgroup.name for d in domains if d.cgroup is not None}
    for name in cgroups.list():
        if name not in groups:
            log.warning("removing cgroup %s: no domain holds it", name)
            try:
                cgroups.open(name).remove()
            except cgroup.CgroupError as exc:
                log.error("cannot remove cgroup %s: %s", name, exc)
    held: set[Path] = set()
    for domain in domains:
        held |= domain.resources.paths()
    for path in leftovers():
        if path not in held and os.path.lexists(path):  # not gone with its directory
            log.warning("removing %s: no domain holds it", path)
            problem = remove(path)
            if problem is not None:
                log.error("cannot remove %s", problem)


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

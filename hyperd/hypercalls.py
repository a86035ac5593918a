"""The hypercall handlers: one method per op, dispatched by a table keyed by the op's type (Xen's
hypercall_table; Xen's handlers live in xen/common/domctl.c, sysctl.c, event_channel.c,
grant_table.c and sched/core.c, and this module's sections follow them).

A request reaches a handler parsed and checked (channels/hypercall.py), with ``caller`` the
domain whose socket it came on: the socket is the caller's identity, so no handler trusts a
domid the request names for itself. A privileged op is refused to a domU before any handler
runs. A handler returns the result, or raises an error that names the errno the caller gets
(HvError here, EvtchnError, GnttabError); the hypervisor's loop saves what it changed before it
replies (``Hypervisor._on_hypercall``).

The handlers reach the tables through the hypervisor, not through references of their own:
re-adoption (``Hypervisor.load``) replaces the tables whole.
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from channels import hypercall as hc
from channels import linux
from channels.errors import HyperError
from channels.hypercall import Op
from hyperd import cgroup
from hyperd.domain import Domain, Status, cgroup_limits, find_workload_init
from hyperd.gnttab import grant_budget
from hyperd.resources import Resources

if TYPE_CHECKING:
    from hyperd.hypervisor import Hypervisor

log = logging.getLogger("hyperd")

#: A hypercall handler: the caller and its op (the type the table keys it by), to the result.
Handler = Callable[[Domain, Any], dict[str, Any]]


class HvError(HyperError):
    def __init__(self, errno_name: str, message: str) -> None:
        super().__init__(message)
        self.errno_name = errno_name


class Descriptors:
    """The descriptors of one hypercall: the ones its request brought (dom0's, at most one),
    until a handler takes them, and the one its reply hands on. Whatever is left at ``close``
    is closed: nothing a call brought outlives it unless a handler kept it."""

    def __init__(self, received: Iterable[int] = ()) -> None:
        self._received = list(received)
        self._reply: int | None = None

    def take(self) -> int | None:
        """The descriptor the request brought, now the caller's to close; None if none."""
        return self._received.pop() if self._received else None

    def hand_on(self, fd: int) -> None:
        """Send ``fd`` with the reply (and close it once sent)."""
        self._reply = fd

    def take_reply(self) -> int | None:
        fd, self._reply = self._reply, None
        return fd

    def close(self) -> None:
        reply = self.take_reply()
        linux.close_fds([*self._received, *([] if reply is None else [reply])])
        self._received = []


#: A handler of an op that passes descriptors: as Handler, with the call's Descriptors.
PassingHandler = Callable[[Domain, Any, Descriptors], dict[str, Any]]


class Hypercalls:
    """Answers each hypercall of a domain, on behalf of the hypervisor ``hv``."""

    def __init__(self, hv: Hypervisor) -> None:
        self.hv = hv
        #: Which method answers each op; a test checks that every op in hc.OPS has one.
        self.table: dict[type[Op], Handler] = {
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
            hc.StoreRings: self.do_store_rings,
        }
        #: The ops whose request or reply carries a descriptor.
        self.passing: dict[type[Op], PassingHandler] = {
            hc.DomctlLinkDevice: self.do_domctl_link_device,
            hc.DeviceTakeFd: self.do_device_take_fd,
        }

    def handle(self, caller: Domain, op: Op, passed: Descriptors | None = None) -> dict[str, Any]:
        """Answer ``op``; ``passed`` holds the descriptors of the call (none if not given)."""
        if op.privileged and caller.domid != 0:
            raise HvError("EPERM", f"{op.op} is privileged; domain {caller.domid} may not call it")
        passing = self.passing.get(type(op))
        if passing is None:
            return self.table[type(op)](caller, op)
        if passed is not None:
            return passing(caller, op, passed)
        passed = Descriptors()
        try:
            return passing(caller, op, passed)
        finally:
            passed.close()

    def _domu(self, domid: int) -> Domain:
        domain = self.hv.domains.get(domid)
        if domain is None or domid == 0:
            raise HvError("ESRCH", f"no domain {domid}")
        return domain

    def _shared_resources(self, caller: int, other: int, *, binding: bool = False) -> Resources:
        """Who holds an object ``caller`` makes to share with ``other``: the domU when the other
        is dom0 (it dies with the domU); when both are domUs, which must share a device
        (hyperd/devlinks.py, or EPERM), the one served: a device's channels and pools outlive
        the driver domain serving it, for the one that serves it next (hyperd/evtchn.py). A
        frontend makes its pools and unbound ports itself (the caller holds them); a backend
        ``binding`` to a port of a domain it serves makes its end for that domain to hold."""
        if 0 not in (caller, other) and caller != other:
            self._live(self._domu(other))
            if not self.hv.links.share(caller, other):
                raise HvError("EPERM", f"domains {caller} and {other} share no device")
            served = other if binding and self.hv.links.serves_some(caller, other) else caller
            return self._domu(served).resources
        return self._domu(other if caller == 0 else caller).resources

    def _check_serves(self, backend: int, frontend: int, device: str) -> None:
        if not self.hv.links.serves(backend, frontend, device):
            raise HvError("EPERM", f"domain {backend} does not serve {device} of domain {frontend}")

    # -- event channels (event_channel.c) ----------------------------------------------------

    def do_evtchn_alloc_unbound(self, caller: Domain, op: hc.EvtchnAllocUnbound) -> dict[str, Any]:
        resources = self._shared_resources(caller.domid, op.remote_dom)
        port = self.hv.evtchn.alloc_unbound(caller.domid, op.remote_dom, resources)
        return {"port": port.port, "doorbell": port.doorbell}

    def do_evtchn_bind_interdomain(
        self, caller: Domain, op: hc.EvtchnBindInterdomain
    ) -> dict[str, Any]:
        evtchn, links = self.hv.evtchn, self.hv.links
        resources = self._shared_resources(caller.domid, op.remote_dom, binding=True)

        def succeeds(dead: int) -> bool:
            return links.succeeds(caller.domid, dead, op.remote_dom)

        port = evtchn.bind_interdomain(
            caller.domid, op.remote_dom, op.remote_port, resources, succeeds
        )
        return {
            "port": port.port,
            "doorbell": port.doorbell,
            "peer_doorbell": evtchn.peer_doorbell(port),
        }

    def do_evtchn_status(self, caller: Domain, op: hc.EvtchnStatus) -> dict[str, Any]:
        port = self.hv.evtchn.get(caller.domid, op.port)
        return {
            "state": port.state,
            "remote_dom": port.remote_dom,
            "remote_port": port.remote_port,
            "doorbell": port.doorbell,
            "peer_doorbell": self.hv.evtchn.peer_doorbell(port),
        }

    def do_evtchn_close(self, caller: Domain, op: hc.EvtchnClose) -> dict[str, Any]:
        self.hv.evtchn.close(caller.domid, op.port)
        return {}

    # -- grant pools (grant_table.c) ---------------------------------------------------------

    def do_gnttab_setup_pool(self, caller: Domain, op: hc.GnttabSetupPool) -> dict[str, Any]:
        resources = self._shared_resources(caller.domid, op.peer)
        if caller.domid != 0:
            self._check_serves(op.peer, caller.domid, op.device)
        budget = grant_budget(caller.memory)
        pool = self.hv.gnttab.setup_pool(
            caller.domid, op.peer, op.device, op.pages, resources, budget
        )
        return pool.result()

    def do_gnttab_map_pools(self, caller: Domain, op: hc.GnttabMapPools) -> dict[str, Any]:
        self._check_serves(caller.domid, op.granter, op.device)
        granter = self.hv.domains.get(op.granter)
        if granter is not None and caller.domid != 0:  # a driver domain serving it anew
            links = self.hv.links

            def serves(domid: int) -> bool:
                return links.serves(domid, op.granter, op.device)

            self.hv.gnttab.hand_over(op.granter, op.device, caller.domid, serves, granter.resources)
        pools = self.hv.gnttab.pools_for(caller.domid, op.granter, op.device)
        return {
            "pools": [p.result() for p in pools],
            "max_pages": grant_budget(granter.memory) if granter is not None else 0,
        }

    def do_gnttab_release_pool(self, caller: Domain, op: hc.GnttabReleasePool) -> dict[str, Any]:
        resources = caller.resources
        self.hv.gnttab.release_pool(caller.domid, op.pool, resources)
        return {}

    # -- the caller's own life (sched/core.c) -----------------------------------------------------

    def do_sched_booted(self, caller: Domain, op: hc.SchedBooted) -> dict[str, Any]:
        if caller.status is Status.BUILDING:
            caller.status = Status.RUNNING
            log.info("dom%d (%s) running", caller.domid, caller.name)
            self.hv.event("domain_running", {"domid": caller.domid})
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

    # -- domain control, dom0 only (domctl.c) ------------------------------------------------

    def do_domctl_create(self, caller: Domain, op: hc.DomctlCreate) -> dict[str, Any]:
        if self.hv.halting:
            raise HvError("ESHUTDOWN", "the hypervisor is halting")
        name = op.config.name
        if any(d.name == name for d in self.hv.domains.values()):
            raise HvError("EEXIST", f"a domain named {name!r} already exists")
        return domain_info(self.hv.build(op.config, op.owner))

    def do_domctl_link_device(
        self, caller: Domain, op: hc.DomctlLinkDevice, passed: Descriptors
    ) -> dict[str, Any]:
        if not op.linked:  # whether or not either still lives: a dead one's links went with it
            self.hv.links.unlink(op.frontend, op.backend, op.device)
            return {}
        if op.frontend == op.backend:
            raise HvError("EINVAL", f"domain {op.frontend} cannot serve its own {op.device}")
        self._live(self._domu(op.frontend))
        self._live(self._domu(op.backend))
        self.hv.links.link(op.frontend, op.backend, op.device, passed.take())
        return {}

    def do_device_take_fd(
        self, caller: Domain, op: hc.DeviceTakeFd, passed: Descriptors
    ) -> dict[str, Any]:
        self._check_serves(caller.domid, op.frontend, op.device)
        fd = self.hv.links.take_fd(op.frontend, caller.domid, op.device)
        if fd is None:
            raise HvError("ENOENT", f"no descriptor waits for {op.device} of domain {op.frontend}")
        passed.hand_on(fd)
        return {}

    @staticmethod
    def _live(domain: Domain) -> Domain:
        """A domain being built or running: one preserved after its end has no view left to
        share objects through."""
        if domain.status not in (Status.BUILDING, Status.RUNNING):
            raise HvError("ESRCH", f"domain {domain.domid} is {domain.status.value}")
        return domain

    def do_domctl_destroy(self, caller: Domain, op: hc.DomctlDestroy) -> dict[str, Any]:
        if op.domid == self.hv.store_domid:
            raise HvError("EPERM", "the store domain lives as long as the hypervisor")
        self.hv.destroy(self._domu(op.domid))
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
        domains = sorted(self.hv.domains.values(), key=lambda d: d.domid)
        return {"domains": [domain_info(d) for d in domains]}

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
            domain.cgroup.set_limits(cgroup_limits(domain.config))
        return {"cpu_weight": domain.config.cpu_weight, "cap": domain.config.cap}

    def do_domctl_set_memory(self, caller: Domain, op: hc.DomctlSetMemory) -> dict[str, Any]:
        domain = self._domu(op.domid)
        old = domain.config
        domain.config = old.model_copy(update={"memory": op.memory})
        if domain.cgroup is not None:
            try:
                domain.cgroup.set_limits(cgroup_limits(domain.config))
            except cgroup.CgroupError as exc:
                domain.config = old
                message = f"domain {op.domid}: cannot set {op.memory} MiB: {exc}"
                raise HvError("EBUSY", message) from exc
        log.info("dom%d memory limit %d -> %d MiB", op.domid, old.memory, op.memory)
        return {"memory": op.memory}

    # -- the host, dom0 only (sysctl.c) ------------------------------------------------------

    # -- the store's stub domain ---------------------------------------------------------------

    def do_store_rings(self, caller: Domain, op: hc.StoreRings) -> dict[str, Any]:
        if caller.domid != self.hv.store_domid:
            raise HvError("EPERM", f"domain {caller.domid} is not the store domain")
        rings = self.hv.store_lifecycle.rings(op.domid)
        return {"rings": rings, "dom0_restarts": self.hv.dom0_restarts}

    def do_sysctl_dmesg(self, caller: Domain, op: hc.SysctlDmesg) -> dict[str, Any]:
        lines = list(self.hv.dmesg.lines)
        if op.clear:
            self.hv.dmesg.lines.clear()
        return {"lines": lines}

    def do_sysctl_info(self, caller: Domain, op: hc.SysctlInfo) -> dict[str, Any]:
        uname = platform.uname()
        return {
            "host": uname.node,
            "release": uname.release,
            "machine": uname.machine,
            "nr_cpus": os.cpu_count(),
            "total_memory": host_memory_mib(),
            "free_memory": _host_available_mib(),
            "hyper_version": "0.1.0",
            "cgroup_version": self.hv.cgroups.version,
            "hyperd_pid": os.getpid(),
            "nr_domains": len(self.hv.domains),
            "dom0_restarts": self.hv.dom0_restarts,
        }

    def do_sysctl_halt(self, caller: Domain, op: hc.SysctlHalt) -> dict[str, Any]:
        # Reply first: halting stops dom0, which would never see the answer.
        self.hv.halt_requested = True
        return {}


def domain_info(domain: Domain) -> dict[str, Any]:
    """What ``hyperctl list`` shows of a domain, and what dom0 learns of a new one (Xen's
    getdomaininfo)."""
    info = domain.info(_state_letters(domain), cpu_ns(domain))
    try:
        info["mem_usage"] = domain.cgroup.memory_bytes() if domain.cgroup else 0
    except cgroup.CgroupError:
        info["mem_usage"] = 0
    return info


def cpu_ns(domain: Domain) -> int:
    if domain.cgroup is None:
        return domain.final_cpu_ns
    try:
        return domain.cgroup.cpu_time_ns()
    except cgroup.CgroupError:
        return domain.final_cpu_ns


def _state_letters(domain: Domain) -> str:
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


def host_memory_mib() -> int:
    return _meminfo("MemTotal")


def _host_available_mib() -> int:
    return _meminfo("MemAvailable")

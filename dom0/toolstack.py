"""The toolstack (libxl's role): what `hyperctl` asks for, done with hypercalls and the store.

It owns the domain skeleton in the store (the paths and permissions of xen-split-driver.md
§6.6), starts the store and console backends of each domain when hyperd introduces it, and
carries out the domain operations the control socket (dom0/control.py) dispatches to it. Each
operation's docstring says when it is allowed.

The store is dom0's own (``store``, in this process) or a stub domain's (``store`` None): then
the toolstack reaches it through its client alone, introduces and releases domains with the
store's INTRODUCE and RELEASE, as Xen's libxl does, and serves only each domain's console ring;
the store domain serves the store rings.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from backends.datapath_worker import DataPath
from backends.drivers import BackendDrivers
from backends.netback.tap import vif_name
from channels import control, pumps, xenbus
from channels import hypercall as hc
from channels.config import (
    DOM0_DOMID,
    RECEIVED,
    ConfigError,
    DomainConfig,
    parse_config,
    parse_entry,
    parse_size,
)
from channels.errors import BadInput, HyperError, NotFound
from channels.faults import parse_block, parse_net
from channels.kinds import BY_TYPE, KINDS, NET_FAULT_COUNTERS, VBD, VIF, DeviceKind
from channels.xs import Perm, XsClient, XsError
from dom0 import spawn
from dom0.console import ConsoleBackend
from dom0.devices import Devices, Images, entries
from xenstored.core import Store
from xenstored.relay import Relay

log = logging.getLogger(__name__)

BOOT_TIMEOUT = 30.0
DEVICE_TIMEOUT = 20.0
SHUTDOWN_TIMEOUT = 30.0


@dataclass
class DomainState:
    domid: int
    name: str
    info: dict[str, Any]
    relay: Relay | None = None  # the process that alone maps the domain's rings we serve
    console: ConsoleBackend | None = None
    running: threading.Event = field(default_factory=threading.Event)
    gone: threading.Event = field(default_factory=threading.Event)
    ended: str | None = None  # why it stopped, for a waiting create


def host_interface(name: str) -> bool:
    """Whether the host's network namespace (dom0's) has an interface ``name``."""
    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=name))


class Toolstack:
    def __init__(
        self,
        hcall: hc.HypercallClient,
        store: Store | None,
        xs: XsClient,
        events: queue.Queue[tuple[str, dict[str, Any]]],
    ) -> None:
        self.hc = hcall
        self.store = store
        self.xs = xs
        self.domains: dict[int, DomainState] = {}
        self.lock = threading.Lock()
        #: Notified after every event from hyperd; waits for a domain's progress use it.
        self.changed = threading.Condition(self.lock)
        self.events = events
        self.stopped = threading.Event()
        self.drivers: BackendDrivers | None = None  # set by dom0.main
        #: Where dom0 serves the store to the host (dom0.main sets it when it runs the store).
        self.store_socket: Path | None = None
        self.devices = Devices(
            xs, self._device_stats, self._backend_domid, self._link_device, self._hand_over
        )
        self._event_handlers: dict[str, Callable[[dict[str, Any]], None]] = {
            "domain_introduced": self.on_domain_introduced,
            "domain_running": self.on_domain_running,
            "domain_shutdown": self.on_domain_shutdown,
            "domain_destroyed": self.on_domain_destroyed,
        }

    # -- events from hyperd (queued by the hypercall reader, handled on one thread) ----------

    def run_events(self) -> None:
        while True:
            name, data = self.events.get()
            if name == "hypervisor_gone":
                log.error("hyperd is gone; dom0 stops")
                self.stopped.set()
                return
            try:
                self._event_handlers[name](data)
            except Exception:
                log.exception("handling event %s failed", name)
            with self.changed:
                self.changed.notify_all()

    def on_domain_introduced(self, info: dict[str, Any]) -> None:
        domid = info["domid"]
        state = DomainState(domid, info["name"], info)
        with self.lock:
            old = self.domains.get(domid)
            self.domains[domid] = state
        if old is not None:
            self._teardown(old)
        # A dom0 restarted after a crash finds the domain in its recovered store: it takes the
        # domain's store connection over and leaves the devices to the backends' re-probe.
        adopted = self._in_store(info)
        if not adopted:
            self._write_skeleton(info)
        rings = {"console": (info["console"]["segment"], info["console"]["dom0_port"])}
        if self.store is not None:
            self.store.introduce_domain(domid)
            rings["store"] = (info["store"]["segment"], info["store"]["dom0_port"])
        else:
            self.xs.introduce(domid)
        state.relay = Relay.start(
            self.hc, spawn.spawner.server(), domid, rings, store=self.store, reconnect=adopted
        )
        assert state.relay.console is not None
        state.console = ConsoleBackend(domid, state.relay.console)
        if not adopted:
            config = DomainConfig.model_validate(info["config"], context=RECEIVED)
            self.devices.add_all(domid, config, info["owner"])
            if config.backends:
                self._reattach_guests(info)
        log.info("dom%d (%s) %s", domid, info["name"], "adopted" if adopted else "introduced")

    def _reattach_guests(self, driver: dict[str, Any]) -> None:
        """A driver domain came (back): the devices of running guests that name it and lost
        their backend when a domain of its name died are served by it again."""
        for guest in self._list():
            if guest["domid"] in (0, driver["domid"]) or guest["status"] != "running":
                continue
            config = DomainConfig.model_validate(guest["config"], context=RECEIVED)
            try:
                done = self.devices.reattach(
                    guest["domid"], config, guest["owner"], driver["name"], driver["domid"]
                )
            except (HyperError, XsError) as exc:
                log.warning("dom%d: re-attaching to %s: %s", guest["domid"], driver["name"], exc)
                continue
            if done:
                log.info(
                    "dom%d: %s served by %s again", guest["domid"], ", ".join(done), driver["name"]
                )

    def _in_store(self, info: dict[str, Any]) -> bool:
        """The store already holds this very domain (same domid, same uuid)."""
        vm = self.xs.read_optional(xenbus.domain_vm_path(info["domid"]))
        return vm == xenbus.vm_path(info["uuid"])

    def recover(self) -> None:
        """A dom0 restarted over a recovered store: forget the domains that ended while no
        dom0 ran (their events went nowhere), before any backend probes their devices."""
        live = {(d["domid"], xenbus.vm_path(d["uuid"])) for d in self._list() if d["domid"]}
        known = set(self._children(xenbus.LOCAL_DOMAIN_PATH))
        for devtype in ("vif", "vbd"):
            known |= set(self._children(xenbus.backend_type_path(0, devtype)))
        for domid in sorted(int(n) for n in known if n.isdecimal() and n != "0"):
            vm = self.xs.read_optional(xenbus.domain_vm_path(domid))
            if (domid, vm) not in live:
                log.info("dom%d ended while no dom0 ran: forgetting its store nodes", domid)
                try:  # a store domain still serves its ring, and holds its connection
                    self._release(domid)
                except (XsError, ValueError) as exc:
                    log.debug("dom%d: %s", domid, exc)
                self._remove_nodes(domid, vm)

    def _children(self, path: str) -> list[str]:
        try:
            return self.xs.directory(path)
        except XsError:
            return []

    def on_domain_running(self, data: dict[str, Any]) -> None:
        state = self.domains.get(data["domid"])
        if state is not None:
            state.running.set()

    def on_domain_shutdown(self, data: dict[str, Any]) -> None:
        state = self.domains.get(data["domid"])
        if state is None:
            return
        state.ended = f"{data['reason']} ({data['action']})"
        if data["action"] == "preserve":
            try:
                self._stop_backends(state)
            finally:  # it stopped in the host, whatever its backends met
                state.gone.set()

    def on_domain_destroyed(self, data: dict[str, Any]) -> None:
        with self.lock:
            state = self.domains.pop(data["domid"], None)
        if state is not None:
            if state.ended is None:
                state.ended = "destroyed"
            try:
                self._teardown(state)
            finally:  # it is gone from the host, whatever its teardown met
                state.gone.set()

    def _stop_backends(self, state: DomainState) -> None:
        console, relay = state.console, state.relay
        state.relay = state.console = None
        try:
            if console is not None:
                console.close()
        finally:  # the relay maps the guest's rings: it stops whatever the console met
            if relay is not None:
                relay.stop()

    def _teardown(self, state: DomainState) -> None:
        """Stop the domain's backends, release it from the store, remove its nodes: each step
        taken whatever the one before met (that is logged), so none is left behind for it."""
        domid = state.domid
        steps: list[tuple[str, Callable[[], None]]] = [
            ("stopping its backends", lambda: self._stop_backends(state)),
            ("releasing it from the store", lambda: self._release(domid)),
            (
                "removing its store nodes",
                lambda: self._remove_nodes(domid, xenbus.vm_path(state.info["uuid"])),
            ),
        ]
        for what, step in steps:
            try:
                step()
            except Exception:
                log.exception("teardown of dom%d: %s failed", domid, what)

    def _release(self, domid: int) -> None:
        if self.store is not None:
            self.store.release_domain(domid)
        else:
            self.xs.release(domid)

    def _remove_nodes(self, domid: int, vm: str | None) -> None:
        # Its devices' backend directories, in dom0's tree or a driver domain's, found through
        # the toolstack's records: the store dropped the domain's home as it released it.
        served = [paths.backend for paths in self.devices.recorded(domid)]
        paths = [
            *served,
            *(xenbus.backend_domain_path(0, kind.xenbus_type, domid) for kind in KINDS),
            xenbus.domain_path(domid),
            xenbus.tool_path(domid),
        ]
        for path in [*paths, *([vm] if vm else [])]:
            try:
                self.xs.rm(path)
            except XsError as exc:  # ENOENT when a parent never existed (no vif at all)
                log.debug("teardown of dom%d: %s", domid, exc)

    def _write_skeleton(self, info: dict[str, Any]) -> None:
        domid = info["domid"]
        home = xenbus.domain_path(domid)
        readonly = [Perm(0, "n"), Perm(domid, "r")]
        guest = [Perm(domid, "n")]
        console = info["console"]
        entries: list[tuple[str, str, list[Perm] | None]] = [
            (home, "", readonly),
            (xenbus.domain_name_path(domid), info["name"], None),
            (xenbus.domain_domid_path(domid), str(domid), None),
            (xenbus.domain_vm_path(domid), xenbus.vm_path(info["uuid"]), None),
            (xenbus.memory_target_path(domid), str(info["memory"] * 1024), None),
            (xenbus.memory_static_max_path(domid), str(info["memory"] * 1024), None),
            (xenbus.device_type_path(domid, "vif"), "", None),
            (xenbus.device_type_path(domid, "vbd"), "", None),
            (xenbus.console_path(domid), "", None),
            (xenbus.console_port_path(domid), str(console["domu_port"]), None),
            (xenbus.console_type_path(domid), "xenconsoled", None),
            (xenbus.vm_path(info["uuid"]), "", [Perm(0, "n")]),
            (xenbus.join_path(xenbus.vm_path(info["uuid"]), "name"), info["name"], None),
            (xenbus.join_path(xenbus.vm_path(info["uuid"]), "uuid"), info["uuid"], None),
            (xenbus.tool_path(domid), json.dumps(info["config"]), [Perm(0, "n")]),
        ]
        for vcpu in range(info["vcpus"]):
            entries.append((xenbus.cpu_availability_path(domid, vcpu), "online", None))
        if info["config"].get("backends"):  # a driver domain: where its devices appear
            entries.append((xenbus.backend_root_path(domid), "", [Perm(domid, "n")]))
        guest_dirs = [(p, "", guest) for p in xenbus.guest_writable_paths(domid)]

        def write(tx: Any) -> None:
            for path, value, perms in entries + guest_dirs:
                tx.write(path, value)
                if perms is not None:
                    tx.set_perms(path, perms)

        self.xs.transaction(write)

    # -- helpers ----------------------------------------------------------------------------

    def _device_stats(self, kind: DeviceKind, domid: int | None) -> list[dict[str, object]]:
        return self.drivers.stats(kind, domid) if self.drivers is not None else []

    def _list(self) -> list[dict[str, Any]]:
        return list(self.hc.call(hc.DomctlList())["domains"])

    def _unserved(self, kind: DeviceKind, backend: int | str) -> str | None:
        """Why the domain ``backend`` names cannot serve a device of ``kind`` (a line's tail,
        from the field on), or None: dom0 serves every kind; a driver domain (Xen's: a domU
        running backends) the kinds its config's ``backends`` lists, while it runs. Refused
        before anything is made, instead of failing half-way through the create."""
        if backend == DOM0_DOMID:
            return None
        try:
            info = self.find(backend)
        except NotFound:
            return f"backend: {backend!r}: no such domain"
        served = info["config"].get("backends") or []
        if kind.xenbus_type not in served:
            listed = f"its backends are {served}" if served else "its config lists no backends"
            return f"backend: {info['name']} (dom{info['domid']}) runs no {kind.backend}: {listed}"
        if info["status"] not in ("building", "running"):
            return f"backend: {info['name']} (dom{info['domid']}) is {info['status']}"
        return None

    def _backend_domid(self, backend: int | str) -> int:
        """A config's ``backend`` (checked by ``_unserved``) as a domid."""
        return DOM0_DOMID if backend == DOM0_DOMID else int(self.find(backend)["domid"])

    def _link_device(
        self, frontend: int, backend: int, device: str, linked: bool, fd: int | None
    ) -> None:
        op = hc.DomctlLinkDevice(frontend=frontend, backend=backend, device=device, linked=linked)
        self.hc.call(op, fd)

    def _hand_over(self, kind: DeviceKind, back: Mapping[str, str]) -> int | None:
        if self.drivers is None:
            raise HyperError("dom0's backends are not running yet")
        return self.drivers.hand_over(kind, back)

    def find(self, domain: str | int) -> dict[str, Any]:
        for info in self._list():
            if str(info["domid"]) == str(domain) or info["name"] == domain:
                return info
        raise NotFound(f"no domain named {domain!r}")

    def _domu(self, domain: str | int) -> dict[str, Any]:
        info = self.find(domain)
        if info["domid"] == 0:
            raise BadInput("that is dom0; use `hyperctl halt` to stop everything")
        return info

    def _guest(self, domain: str | int) -> dict[str, Any]:
        """A domU the toolstack runs: not the store's stub domain (hyperd/store_domain.py),
        which has no store ring of its own, no workload, console or devices, and lives as long
        as the hypervisor (it may be paused, and its memory and weight set)."""
        info = self._domu(domain)
        if info["store"] is None:
            raise BadInput(
                f"{info['name']} is the store's stub domain: it runs the store alone (no "
                "workload, console or devices), as long as the hypervisor does"
            )
        return info

    # -- operations -------------------------------------------------------------------------

    def create(self, request: control.Create) -> Any:
        """Parses the config (one line per problem, nothing created), builds the domain and
        returns once its workload runs and its devices are connected. Anything that fails after
        hyperd built the domain (it never boots, a device never connects) destroys it again and
        removes the images made for it: a failed create leaves nothing behind, and the error
        says why."""
        source, owner = request.source, request.owner
        try:
            config = parse_config(
                request.text, source=source, base_dir=Path(request.base_dir), owner=owner
            )
        except ConfigError as exc:
            raise BadInput("invalid config", exc.lines) from exc
        unserved = [
            f"{source}: {kind.config_key}.{index}.{problem}"
            for kind in KINDS
            for index, entry in enumerate(entries(config, kind))
            if (problem := self._unserved(kind, entry.backend))
        ]
        unserved += [
            f"{source}: nics.{index}.name: no interface {nic.name!r} on the host"
            for index, nic in enumerate(config.nics)
            if not host_interface(nic.name)
        ]
        if unserved:
            raise BadInput("a backend that cannot serve", unserved)
        if any(info["name"] == config.name for info in self._list()):
            raise BadInput(
                "duplicate name", [f"{source}: name: a domain named {config.name!r} already exists"]
            )
        made = Images(source, owner)
        for kind in KINDS:
            for index, entry in enumerate(entries(config, kind)):
                image = kind.image_of(entry)
                if image is not None:
                    made.create(f"{kind.config_key}.{index}", Path(image[0]), image[1])
        try:
            info = self.hc.call(hc.DomctlCreate(config=config, owner=owner))
        except hc.HypercallError:
            made.remove_created()
            raise
        domid = info["domid"]
        try:
            state = self._wait_state(domid)
            if not request.wait:
                return info
            with self.changed:
                self.changed.wait_for(lambda: state.running.is_set() or state.ended, BOOT_TIMEOUT)
            if not state.running.is_set():
                raise HyperError(
                    f"domain {config.name} did not boot: {state.ended or 'timeout'}"
                    " (see `hyperctl dmesg`)"
                )
            for kind in KINDS:
                for index, entry in enumerate(entries(config, kind)):
                    devid = kind.devid_of(entry)
                    devid = index if devid is None else devid
                    self.devices.wait_connected(domid, kind, devid, DEVICE_TIMEOUT)
            return self.find(domid)
        except HyperError as exc:
            self._roll_back(domid, made)
            undone = f"domain {config.name} was destroyed again: nothing of it is left"
            raise HyperError(exc.summary, [*exc.lines, undone]) from exc

    def _roll_back(self, domid: int, made: Images) -> None:
        """Undo a create that failed after hyperd built the domain: destroy it, wait until its
        teardown is over (its backends, TAPs and loop devices gone), then remove its images."""
        try:
            if not self._destroy_and_release(domid):
                log.warning("rolling back dom%d: its devices were not all released in time", domid)
        except hc.HypercallError as exc:  # gone already, say: its devices may still be going
            log.warning("rolling back dom%d: %s", domid, exc)
            self.devices.wait_released(domid, DEVICE_TIMEOUT)
        made.remove_created()

    def _destroy_and_release(self, domid: int) -> bool:
        """Destroy the domain, then wait until hyperd has torn it down and dom0's backends have
        released its devices (its TAPs, loop devices and shares gone): whether that happened
        within DEVICE_TIMEOUT."""
        with self.lock:
            state = self.domains.get(domid)
        self.hc.call(hc.DomctlDestroy(domid=domid))
        deadline = time.monotonic() + DEVICE_TIMEOUT
        return (state is None or state.gone.wait(DEVICE_TIMEOUT)) and self.devices.wait_released(
            domid, max(0.0, deadline - time.monotonic())
        )

    def _wait_state(self, domid: int) -> DomainState:
        """The toolstack's record of a domain hyperd has just built (its introduction event
        may still be queued)."""
        with self.changed:
            state = self.changed.wait_for(lambda: self.domains.get(domid), 10.0)
        if state is None:
            raise HyperError(f"domain {domid} was never introduced")
        return state

    def list_domains(self) -> Any:
        """Always allowed: every domain, dom0 included."""
        return self._list()

    def destroy(self, domain: str) -> Any:
        """Any domU, in any state: kill it now and release everything. Returns once hyperd has
        torn it down and dom0's backends have released its devices (its TAPs, loop devices and
        shares are gone), as `xl destroy` returns after libxl's device teardown; ``released``
        says whether that happened within DEVICE_TIMEOUT."""
        domid = self._domu(domain)["domid"]
        released = self._destroy_and_release(domid)
        if not released:
            log.warning("dom%d destroyed; its devices were not all released in time", domid)
        return {"domid": domid, "released": released}

    def _request_shutdown(self, domain: str, kind: str, wait: bool, timeout: float) -> Any:
        info = self._guest(domain)
        domid = info["domid"]
        with self.lock:
            state = self.domains.get(domid)
        if state is None or info["status"] != "running":
            raise HyperError(f"domain {info['name']} is not running")
        self.xs.write(xenbus.control_shutdown_path(domid), kind)
        if kind == "reboot":
            return {"domid": domid}

        def enforce() -> bool:
            if state.gone.wait(timeout):
                return True
            log.warning("dom%d ignored shutdown for %.0f s; destroying it", domid, timeout)
            try:
                self.hc.call(hc.DomctlDestroy(domid=domid))
            except hc.HypercallError:
                pass
            return False

        if wait:
            return {"domid": domid, "cooperative": enforce()}
        threading.Thread(target=enforce, daemon=True).start()
        return {"domid": domid}

    def shutdown(self, domain: str, wait: bool = False, grace: float = SHUTDOWN_TIMEOUT) -> Any:
        """A running domU: ask it to power off (control/shutdown); destroyed if it has not
        within ``grace`` seconds. With ``wait``, returns when it is gone."""
        return self._request_shutdown(domain, "poweroff", wait, grace)

    def reboot(self, domain: str) -> Any:
        """A running domU: ask it to reboot; ``on_reboot`` decides what follows."""
        return self._request_shutdown(domain, "reboot", False, SHUTDOWN_TIMEOUT)

    def pause(self, domain: str) -> Any:
        """A running, unpaused domU."""
        info = self._domu(domain)
        self.hc.call(hc.DomctlPause(domid=info["domid"], pause=True))
        return {"domid": info["domid"]}

    def unpause(self, domain: str) -> Any:
        """A paused domU."""
        info = self._domu(domain)
        self.hc.call(hc.DomctlPause(domid=info["domid"], pause=False))
        return {"domid": info["domid"]}

    def exec_target(self, domain: str) -> Any:
        """A running, unpaused domU: where `hyperctl exec` must enter."""
        info = self._guest(domain)
        return self.hc.call(hc.DomctlExecTarget(domid=info["domid"]))

    def sched_credit(
        self, domain: str, cpu_weight: int | None = None, cap: int | None = None
    ) -> Any:
        """Any domU: set (or, with neither given, show) its weight and cap."""
        info = self._domu(domain)
        return self.hc.call(hc.DomctlSetSched(domid=info["domid"], cpu_weight=cpu_weight, cap=cap))

    def mem_set(self, domain: str, memory: str) -> Any:
        """A domU: set its memory limit (xl mem-set); a bare number is MiB."""
        try:
            mib = int(memory) if memory.isdigit() else parse_size(memory) // (1 << 20)
        except ValueError as exc:
            raise BadInput(f"mem-set: {memory!r}: {exc}") from exc
        info = self._domu(domain)
        domid = info["domid"]
        result = self.hc.call(hc.DomctlSetMemory(domid=domid, memory=mib))
        self.xs.write(xenbus.memory_target_path(domid), str(mib * 1024))
        return result

    def host_info(self) -> Any:
        """Always allowed: host and hypervisor facts, which data-path pumps the backends dom0
        starts run (channels.pumps: native or the Python reference), and where dom0 serves
        the store to Xen's own tools."""
        served = (
            str(self.store_socket)
            if self.store_socket is not None
            else "none (the store runs in its stub domain, Xenstore)"
        )
        return {**self.hc.call(hc.SysctlInfo()), "pumps": pumps.describe(), "store_socket": served}

    def dmesg(self, clear: bool = False) -> Any:
        """Always allowed: the hypervisor's log."""
        return self.hc.call(hc.SysctlDmesg(clear=clear))["lines"]

    def halt(self) -> Any:
        """Always allowed: destroy every domain, then stop dom0 and hyperd."""
        self.hc.call(hc.SysctlHalt())
        return {}

    def device_attach(self, request: control.DeviceAttach) -> Any:
        """A running domU: add one device (xl network-attach, block-attach, ...); returns once
        it is connected. ``owner`` as for ``create``."""
        kind = BY_TYPE[request.kind]
        try:
            entry = parse_entry(
                kind.config_key,
                request.spec,
                Path(request.base_dir),
                source=kind.spec_name,
                owner=request.owner,
            )
        except ConfigError as exc:
            raise BadInput(f"invalid {kind.what}", exc.lines) from exc
        if problem := self._unserved(kind, entry.backend):
            raise BadInput("a backend that cannot serve", [f"{kind.spec_name}: {problem}"])
        info = self._guest(request.domain)
        if self._backend_domid(entry.backend) == info["domid"]:
            own = f"{kind.spec_name}: backend: {info['name']} cannot serve its own {kind.what}"
            raise BadInput("a backend that cannot serve", [own])
        if info["status"] != "running":
            raise HyperError(f"domain {info['name']} is not running")
        return self.devices.attach(
            info["domid"], info["name"], kind, entry, request.owner, DEVICE_TIMEOUT
        )

    def device_detach(self, request: control.DeviceDetach) -> Any:
        """A domU's device: close it through XenBus and remove it (its TAP, loop device or
        share goes with it)."""
        info = self._guest(request.domain)
        return self.devices.detach(
            info["domid"], info["name"], BY_TYPE[request.kind], request.device
        )

    def device_list(self, request: control.DeviceList) -> Any:
        """A domU: its devices of a kind with their configuration, state and counters."""
        info = self._guest(request.domain)
        return self.devices.listing(info["domid"], BY_TYPE[request.kind])

    def fault_set(self, request: control.FaultSet) -> Any:
        """A running domU's vif (``vif<N>``) or disk (by vdev): its faults, from its next
        frame or request on."""
        info = self._guest(request.domain)
        if info["status"] != "running":
            raise HyperError(f"domain {info['name']} is not running")
        kind, device = _named_device(request.device)
        parse = parse_net if kind is VIF else parse_block
        spec = str(parse(request.spec, "fault")) if request.spec else ""
        return self.devices.set_faults(info["domid"], info["name"], kind, device, spec)

    def fault_list(self, domain: str) -> Any:
        """Any domU: each vif's and disk's faults, and how many each injected."""
        info = self._guest(domain)
        return [
            {
                "device": VIF.label(vif),
                "faults": vif.get("fault_spec") or "",
                "injected": sum(int(vif.get(name, 0)) for name in NET_FAULT_COUNTERS),
            }
            for vif in self.devices.listing(info["domid"], VIF)
        ] + [
            {
                "device": VBD.label(disk),
                "faults": disk.get("fault_spec") or "",
                "injected": disk.get("faults", 0),
            }
            for disk in self.devices.listing(info["domid"], VBD)
        ]

    def capture_target(self, domain: str, device: str) -> tuple[str, int | None]:
        """A running domU's vif ``vif<N>``: its TAP's name, and the pid of the driver domain
        serving it, if one does (the TAP is then in that domain's network namespace)."""
        domid, devid, backend = self._served(domain, device, VIF, "capture")
        return vif_name(domid, devid), None if backend == DOM0_DOMID else self.find(backend)["pid"]

    def trace_target(self, domain: str, device: str) -> DataPath:
        """A running domU's disk (by vdev) that dom0 serves: its blkback data path."""
        domid, devid, backend = self._served(domain, device, VBD, "trace")
        if backend != DOM0_DOMID:
            raise BadInput(
                f"trace: {device} is served by driver domain {backend}; trace follows the "
                "disks dom0 serves"
            )
        path = self.drivers.data_path(VBD, domid, devid) if self.drivers is not None else None
        if path is None:
            raise NotFound(f"trace: {device} of domain {domain} is not connected")
        return path

    def _served(
        self, domain: str, device: str, kind: DeviceKind, what: str
    ) -> tuple[int, int, int]:
        """A running domU's device named ``device`` (``vif<N>`` for a vif): its domid, its
        devid and the domain serving it."""
        info = self._guest(domain)
        if info["status"] != "running":
            raise HyperError(f"domain {info['name']} is not running")
        named, label = _named_device(device)
        if named is not kind:
            raise BadInput(f"{what}: {device!r} is not a {kind.what}")
        devid = self.devices.find(info["domid"], info["name"], kind, label)
        return info["domid"], devid, self.devices.backend_of(info["domid"], kind, devid)

    def device_stats(self, request: control.DeviceStats) -> Any:
        """Always allowed: every device of a kind's counters (for `hyperctl top`)."""
        return self.devices.stats(BY_TYPE[request.kind])

    def console_of(self, domain: str) -> tuple[int, ConsoleBackend]:
        """A running domU: its domid and console backend, for the control socket to attach
        a client to."""
        info = self._domu(domain)
        with self.lock:
            state = self.domains.get(info["domid"])
        console = state.console if state else None
        if console is None:
            self._guest(domain)  # the store domain says what it is
            raise NotFound(f"domain {info['name']} has no console")
        return info["domid"], console


def _named_device(device: str) -> tuple[DeviceKind, str]:
    """The kind and the device a ``fault``, ``capture`` or ``trace`` names: ``vif<N>`` a vif
    by its index, anything else a disk by its vdev (or devid); BadInput for a vif named
    otherwise."""
    if device.startswith("vif"):
        index = device.removeprefix("vif")
        if not index.isdecimal():
            raise BadInput(f"{device!r} is not a vif such as vif0, or a disk's vdev")
        return VIF, str(int(index))
    return VBD, device

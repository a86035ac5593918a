"""The domain kernel: pid 1 of a domU, the guest OS of this architecture.

It holds the domain's only ways out, its hypercall socket and its channels, and it runs the
frontends: the store client over the store ring, the console frontend, and (with the net and
block issues) the XenBus frontends. Programs never see any of it: they run under the workload
init (domu/init.py) in a mount namespace without the rings, as an unprivileged user.

Lifecycle: mount /proc and /sys, set the hostname, bring up lo, fork the workload init, connect
the store and the console, advertise ``control/feature-poweroff`` and ``feature-reboot``, tell
hyperd it booted. Then wait for one of: the workload ended (poweroff, or crash if a signal
killed it), or the toolstack wrote ``control/shutdown``. Either way it stops the workload,
tells hyperd why (``sched_shutdown``) and exits, which ends the pid namespace.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import threading
from typing import Any

from pyroute2 import IPRoute

from channels import linux, xenbus
from channels.evtchn import EventChannel, from_status
from channels.hypercall import HypercallClient, SchedBooted, SchedShutdown, ShutdownReason
from channels.ids import ID_RANGE
from channels.shm import Segment, attach
from channels.xenbus_bus import Bus
from channels.xs_ring import XenstoreRing
from domu import init as workload_init
from domu import sandbox, spawn
from domu.console import ConsoleFrontend
from domu.drivers import frontend_drivers

log = logging.getLogger("domu.kernel")

SHUTDOWN_GRACE = 5.0


def _network_up() -> None:
    """lo up, and unprivileged ICMP sockets for the workload (ping without CAP_NET_RAW), as
    current distributions allow by default; both only in the domain's own netns."""
    with open("/proc/sys/net/ipv4/ping_group_range", "w") as f:
        f.write(f"0 {ID_RANGE - 1}")  # every gid mapped in the domain
    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


class StoreConnection:
    """The domain's store client over its store ring."""

    def __init__(self, hc: HypercallClient, info: dict[str, Any]) -> None:
        self.segment: Segment = attach(info["segment"])
        self.evtchn: EventChannel = from_status(hc, info["domu_port"])
        self.ring = XenstoreRing(self.segment.buf, self.evtchn).start()
        self.client = self.ring.client


class Kernel:
    def __init__(
        self,
        params: dict[str, Any],
        hc: HypercallClient,
        init_pid: int,
        status_fd: int,
        tty_master: int,
    ) -> None:
        self.params = params
        self.domid = int(params["domid"])
        self.hc = hc
        self.init_pid = init_pid
        self.status_fd = status_fd
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.init_gone = threading.Event()
        self.store = StoreConnection(hc, params["store"])
        self.console = ConsoleFrontend(hc, params["console"], tty_master)

    def run(self) -> int:
        xs = self.store.client
        self.bus = Bus(
            xs,
            xenbus.join_path(xenbus.domain_path(self.domid), "device"),
            "frontend",
            frontend_drivers(self.hc),
        ).start()
        for feature in ("feature-poweroff", "feature-reboot"):
            xs.write(xenbus.join_path(xenbus.control_path(self.domid), feature), "1")
        watch = xs.watch(xenbus.control_shutdown_path(self.domid), "shutdown")
        threading.Thread(target=self._watch_shutdown, args=(watch,), daemon=True).start()
        threading.Thread(target=self._watch_workload, daemon=True).start()
        served = self.params.get("backends") or []
        if served:  # a driver domain (domu/driver_domain.py)
            from domu import driver_domain

            driver_domain.attach_nics(self.params.get("nics") or [])
            self.backends = driver_domain.start_backends(xs, self.hc, self.domid, served)
        self.hc.call(SchedBooted())
        kind, value = self.events.get()
        reason: ShutdownReason
        if kind == "workload":
            code = os.waitstatus_to_exitcode(value)
            reason = "crash" if code < 0 else "poweroff"
            self.hc.call(SchedShutdown(reason=reason, code=code))
            return 0
        # Acknowledge the request as Linux's manage.c does, then stop the workload.
        xs.write(xenbus.control_shutdown_path(self.domid), "")
        reason = "reboot" if value == "reboot" else "poweroff"
        self._stop_workload()
        self.hc.call(SchedShutdown(reason=reason, code=0))
        return 0

    def _watch_shutdown(self, watch: Any) -> None:
        xs = self.store.client
        while True:
            try:
                watch.get()
                value = xs.read_optional(xenbus.control_shutdown_path(self.domid))
            except Exception as exc:
                log.warning("shutdown watch ended: %s", exc)
                return
            if value in ("poweroff", "halt", "reboot"):
                self.events.put(("shutdown", value))
                return

    def _watch_workload(self) -> None:
        """The init reports how the command ended, then exits; or it dies on its own."""
        line = b""
        with os.fdopen(self.status_fd, "rb", buffering=0) as status:
            while not line.endswith(b"\n"):
                chunk = status.read(64)
                if not chunk:
                    break
                line += chunk
        if line.startswith(b"exit "):
            self.events.put(("workload", int(line.split()[1])))
        else:
            # The init itself died (OOM, or killed): the domain has crashed.
            self.events.put(("workload", signal.SIGKILL))

    def _stop_workload(self) -> None:
        """TERM the init, which TERMs every program and KILLs what is left after its grace;
        wait for it, since our own exit (pid 1) would KILL them all at once."""
        try:
            os.kill(self.init_pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        self.init_gone.wait(SHUTDOWN_GRACE)


def _reap_forever(init_pid: int, init_gone: threading.Event) -> None:
    """pid 1 adopts orphans that `hyperctl exec` leaves behind: reap them, and say when the
    workload's init has gone."""
    while True:
        try:
            pid, _ = os.waitpid(-1, 0)
        except ChildProcessError:
            threading.Event().wait(1.0)
            continue
        if pid == init_pid:
            init_gone.set()


def main(params: dict[str, Any], hypercall_fd: int) -> int:
    logging.basicConfig(level=logging.INFO, format=f"dom{params['domid']} %(name)s: %(message)s")
    linux.set_comm("hyper-kernel")
    sandbox.enter_kernel_mounts(params["name"])
    _network_up()
    tty_master, tty_slave = os.openpty()
    status_r, status_w = os.pipe()
    # Fork before any thread exists: the init keeps running Python code after the fork.
    init_pid = os.fork()
    if init_pid == 0:
        os.close(tty_master)
        os.close(status_r)
        os.close(hypercall_fd)
        os._exit(workload_init.main(params, tty_slave, status_w))
    os.close(tty_slave)
    os.close(status_w)
    # Still no thread: the fork server for our FUSE servers is a fork of us (domu/spawn.py), and
    # in a driver domain it starts the backends' workers too (imported only there).
    if params.get("backends"):
        from domu import driver_domain

        spawn.spawner.preload.extend(driver_domain.worker_modules(params["backends"]))
    spawn.start()
    hc = HypercallClient(socket.socket(fileno=hypercall_fd))
    kernel = Kernel(params, hc, init_pid, status_r, tty_master)
    threading.Thread(
        target=_reap_forever, args=(init_pid, kernel.init_gone), name="reaper", daemon=True
    ).start()
    return kernel.run()

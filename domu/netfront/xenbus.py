"""netfront's negotiation: the vif frontend driver on the domain kernel's XenBus bus.

When the backend reaches InitWait (and offers rx-copy), the frontend chooses how many queues
the vif has (as many as the backend offers and the domain has vcpus, up to netif.MAX_QUEUES),
creates eth<devid>, a multi-queue TAP in the domain's own network namespace with the MAC, MTU,
address and route the toolstack wrote into the frontend directory, one TAP queue per netif
queue; grants each queue's ring pages and buffer pools to the backend, for this vif only (each
pool names ``vif/<devid>``: no other device's backend maps it); allocates each queue's two
event channels; publishes all of it in one transaction and goes Connected (netfront skips
Initialised). When the backend closes, or the device goes away, it stops and releases
everything; closing the TAP's fd removes eth<devid>.

A backend that restarted (its data path was killed) returns from Connected to InitWait with
its ends of the channels still bound. The frontend then stops its data path, starts both rings
over on the same pages, posts every receive buffer again (frames that were in flight are lost,
as on a wire; TCP sends them again) and goes Initialised, then Connected once the backend is.
eth<devid>, its address and its open sockets never notice. The same when the driver domain
serving the vif dies and comes back (domu/blkfront/xenbus.py says how).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from pyroute2 import IPRoute

from channels import netif as N
from channels import pumps
from channels.evtchn import EventChannel, alloc_unbound
from channels.gnttab import GrantPool, grant_pool, release_pool
from channels.hypercall import HypercallClient, HypercallError
from channels.ring import FrontRing
from channels.tun import open_tap
from channels.xenbus import XenbusState
from channels.xenbus_bus import XenbusDevice
from channels.xs import XsError
from domu.netfront.datapath import RxPath, TxPath

log = logging.getLogger(__name__)
S = XenbusState

TX_PAGES = N.TX_RING.nr_ents(N.PAGE_SIZE)  # one buffer page per slot: N.MAX_GRANT_PAGES in all
RX_PAGES = N.RX_RING.nr_ents(N.PAGE_SIZE)


@dataclass
class Queue:
    """One netif queue: its TAP queue, its two channels (tx, rx), its pools and its paths."""

    tap_fd: int = -1
    channels: list[EventChannel] = field(default_factory=list)
    rings: list[FrontRing] = field(default_factory=list)
    # kind ("ring", "tx", "rx"): (pool id, pool, grefs)
    pools: dict[str, tuple[int, GrantPool, list[int]]] = field(default_factory=dict)
    tx: TxPath | None = None
    rx: RxPath | None = None


@dataclass
class Netfront:
    name: str
    queues: list[Queue] = field(default_factory=list)
    gso: bool = False

    @property
    def has_paths(self) -> bool:
        """Its data path is built (and runs, or is about to)."""
        return any(queue.tx is not None for queue in self.queues)


class NetfrontDriver:
    def __init__(self, hc: HypercallClient) -> None:
        self.hc = hc

    def probe(self, dev: XenbusDevice) -> None:
        dev.driver_data = Netfront(f"eth{dev.devid}")

    def otherend_changed(self, dev: XenbusDevice, state: XenbusState) -> None:
        nf = dev.driver_data
        if not isinstance(nf, Netfront):
            return
        if state == S.InitWait and dev.state in (S.Unknown, S.Initialising):
            try:
                self._connect(dev, nf)
            except (OSError, ValueError, KeyError, HypercallError, XsError) as exc:
                self._release(nf)
                dev.fatal(f"{nf.name}: connecting: {exc}")
                return
            dev.switch_state(S.Connected)
            log.info("%s connected, %d queue(s)", nf.name, len(nf.queues))
        elif state == S.InitWait and dev.state == S.Connected and nf.has_paths:
            log.warning("%s: the backend restarted; starting the rings over", nf.name)
            self._stop_paths(nf)
            for queue in nf.queues:  # to the domain serving the vif now, if another does
                for _, pool, _ in queue.pools.values():
                    pool.regrant(dev.otherend_id)
            if _offered_queues(dev) < len(nf.queues):
                self._release(nf)
                dev.fatal(f"{nf.name}: the backend came back offering fewer queues")
                return
            self._start_paths(dev, nf)
            dev.switch_state(S.Initialised)
        elif state == S.Connected and dev.state == S.Initialised:
            dev.switch_state(S.Connected)
            log.info("%s connected again", nf.name)
        elif state == S.Connected and dev.state == S.Connected:
            # The backend has bound our ports: learn its doorbells now, so that the data path
            # never has to ask hyperd (which may be restarting) at its first notification.
            try:
                for queue in nf.queues:
                    for channel in queue.channels:
                        channel.doorbell_names()
            except HypercallError as exc:
                log.warning("%s: the backend's doorbells: %s", nf.name, exc)
        # Unknown (the backend's directory went with its driver domain) is a pause: the
        # toolstack moves the device to the domain that serves it next (xenbus_bus.py).
        elif state in (S.Closing, S.Closed) and dev.state != S.Closed:
            self._release(nf)
            dev.switch_state(S.Closed)

    def remove(self, dev: XenbusDevice) -> None:
        nf = dev.driver_data
        if isinstance(nf, Netfront):
            self._release(nf)
        dev.driver_data = None

    # -- connecting -----------------------------------------------------------------------------

    def _connect(self, dev: XenbusDevice, nf: Netfront) -> None:
        if dev.read_otherend("feature-rx-copy") != "1":
            raise ValueError("the backend does not offer rx-copy")
        backend, device = dev.otherend_id, dev.device_name
        count = min(_offered_queues(dev), _vcpus(dev), N.MAX_QUEUES)
        config = {k: dev.read(k) for k in ("mac", "mtu", "ip", "gateway")}
        nf.gso = gso = dev.read_otherend("feature-gso-tcpv4") == "1"
        nf.queues = [Queue() for _ in range(count)]
        for queue in nf.queues:  # the first open creates eth<devid>, each one more a queue
            queue.tap_fd = open_tap(nf.name, offload=gso)
        _configure_link(nf.name, config)
        for queue in nf.queues:
            for kind, pages, readonly in (
                ("ring", 2, False),
                ("tx", TX_PAGES, True),
                ("rx", RX_PAGES, False),
            ):
                queue.pools[kind] = grant_pool(self.hc, backend, device, pages, readonly=readonly)
            queue.channels = [alloc_unbound(self.hc, backend), alloc_unbound(self.hc, backend)]
        self._start_paths(dev, nf, run=False)
        keys = {
            "request-rx-copy": "1",
            "feature-rx-notify": "1",
            "feature-sg": "1",
            "feature-gso-tcpv4": "1" if gso else "0",
            "feature-gso-tcpv6": "1" if gso else "0",
        }
        if dev.read_otherend("multi-queue-max-queues") is not None:
            keys["multi-queue-num-queues"] = str(count)
        for q, queue in enumerate(nf.queues):
            _, _, ring_grefs = queue.pools["ring"]
            tx_ch, rx_ch = queue.channels
            for key, value in (
                ("tx-ring-ref", ring_grefs[0]),
                ("rx-ring-ref", ring_grefs[1]),
                ("event-channel-tx", tx_ch.port),
                ("event-channel-rx", rx_ch.port),
            ):
                keys[N.queue_path(q, count, key)] = str(value)

        dev.write_all(keys)
        self._run_paths(nf)

    def _start_paths(self, dev: XenbusDevice, nf: Netfront, *, run: bool = True) -> None:
        """For each queue: fresh rings over its ring pages, the data path over them, every rx
        buffer posted; the threads started if ``run`` (else once the backend can find the
        rings)."""

        def broken(message: str) -> None:
            dev.fatal(f"{nf.name}: backend misbehaved: {message}")

        for q, queue in enumerate(nf.queues):
            name = nf.name if len(nf.queues) == 1 else f"{nf.name}-q{q}"
            _, ring_pool, _ = queue.pools["ring"]
            tx_ring = FrontRing.init(N.TX_RING, ring_pool.page(0), name=f"{name}-tx")
            rx_ring = FrontRing.init(N.RX_RING, ring_pool.page(1), name=f"{name}-rx")
            queue.rings = [tx_ring, rx_ring]
            tx_ch, rx_ch = queue.channels
            _, tx_pool, tx_grefs = queue.pools["tx"]
            _, rx_pool, rx_grefs = queue.pools["rx"]
            loop = pumps.QueueLoop("netfront-q")  # native pumps: one loop serves both paths
            queue.tx = TxPath(tx_ring, tx_ch, tx_pool, tx_grefs, queue.tap_fd, nf.gso, broken, loop)
            queue.rx = RxPath(rx_ring, rx_ch, rx_pool, rx_grefs, queue.tap_fd, broken, loop)
            queue.rx.post_all()
        if run:
            self._run_paths(nf)

    @staticmethod
    def _run_paths(nf: Netfront) -> None:
        for queue in nf.queues:
            assert queue.tx is not None and queue.rx is not None
            queue.tx.thread.start()
            queue.rx.thread.start()

    def _stop_paths(self, nf: Netfront) -> None:
        paths = [p for q in nf.queues for p in (q.tx, q.rx) if p is not None]
        for path in paths:
            path.stop()
        for path in paths:
            if path.thread.is_alive():
                path.thread.join(timeout=5.0)
        for queue in nf.queues:
            queue.tx = queue.rx = None
            for ring in queue.rings:
                ring.close()
            queue.rings = []

    def _release(self, nf: Netfront) -> None:
        self._stop_paths(nf)
        for queue in nf.queues:
            for channel in queue.channels:
                channel.close()
            for pool_id, pool, _ in queue.pools.values():
                release_pool(self.hc, pool_id, pool)
            if queue.tap_fd >= 0:
                os.close(queue.tap_fd)  # the last one removes eth<devid>
        nf.queues = []


def _offered_queues(dev: XenbusDevice) -> int:
    """How many queues the backend offers (``multi-queue-max-queues``; one if it says
    nothing or nonsense)."""
    try:
        return max(1, int(dev.read_otherend("multi-queue-max-queues") or 1))
    except ValueError:
        return 1


def _vcpus(dev: XenbusDevice) -> int:
    """The domain's vcpus, as the toolstack listed them in its home (``cpu/<n>``: a path
    relative to the home)."""
    try:
        return max(1, len(dev.xs.directory("cpu")))
    except XsError:
        return 1


def _configure_link(name: str, config: dict[str, str | None]) -> None:
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=name)[0]
        settings: dict[str, Any] = {"state": "up", "mtu": int(config.get("mtu") or 1500)}
        if config.get("mac"):
            settings["address"] = config["mac"]
        ipr.link("set", index=index, **settings)
        if config.get("ip"):
            address, _, prefix = str(config["ip"]).partition("/")
            ipr.addr("add", index=index, address=address, prefixlen=int(prefix or 24))
        if config.get("gateway"):
            ipr.route("add", dst="default", gateway=config["gateway"])


#: The driver channels/kinds.py names this folder for.
Driver = NetfrontDriver

"""netfront's negotiation: the vif frontend driver on the domain kernel's XenBus bus.

When the backend reaches InitWait (and offers rx-copy), the frontend creates eth<devid>, a TAP
in the domain's own network namespace with the MAC, MTU, address and route the toolstack wrote
into the frontend directory; grants its ring pages and buffer pools to the backend, for this
vif only (each pool names ``vif/<devid>``: no other device's backend maps it); allocates
its two event channels; publishes all of it in one transaction and goes Connected (netfront
skips Initialised). When the backend closes, or the device goes away, it stops and releases
everything; closing the TAP's fd removes eth<devid>.

A backend that restarted (its data path was killed) returns from Connected to InitWait with
its ends of the channels still bound. The frontend then stops its data path, starts both rings
over on the same pages, posts every receive buffer again (frames that were in flight are lost,
as on a wire; TCP sends them again) and goes Initialised, then Connected once the backend is.
eth<devid>, its address and its open sockets never notice.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from pyroute2 import IPRoute

from channels import netif as N
from channels.evtchn import EventChannel, alloc_unbound
from channels.gnttab import GrantPool, grant_pool, release_pool
from channels.hypercall import HypercallClient, HypercallError
from channels.ring import FrontRing
from channels.tun import open_tap
from channels.xenbus import XenbusState
from channels.xenbus_bus import XenbusDevice
from domu.netfront.datapath import RxPath, TxPath

log = logging.getLogger(__name__)
S = XenbusState

TX_PAGES = N.TX_RING.nr_ents(N.PAGE_SIZE)  # one buffer page per slot: N.MAX_GRANT_PAGES in all
RX_PAGES = N.RX_RING.nr_ents(N.PAGE_SIZE)


@dataclass
class Netfront:
    name: str
    tap_fd: int = -1
    channels: list[EventChannel] = field(default_factory=list)
    rings: list[FrontRing] = field(default_factory=list)
    # kind ("ring", "tx", "rx"): (pool id, pool, grefs)
    pools: dict[str, tuple[int, GrantPool, list[int]]] = field(default_factory=dict)
    gso: bool = False
    tx: TxPath | None = None
    rx: RxPath | None = None


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
            except (OSError, ValueError, KeyError, HypercallError) as exc:
                self._release(nf)
                dev.fatal(f"{nf.name}: connecting: {exc}")
                return
            dev.switch_state(S.Connected)
            log.info("%s connected", nf.name)
        elif state == S.InitWait and dev.state == S.Connected and nf.tx is not None:
            log.warning("%s: the backend restarted; starting the rings over", nf.name)
            self._stop_paths(nf)
            self._start_paths(dev, nf)
            dev.switch_state(S.Initialised)
        elif state == S.Connected and dev.state == S.Initialised:
            dev.switch_state(S.Connected)
            log.info("%s connected again", nf.name)
        elif state == S.Connected and dev.state == S.Connected:
            # The backend has bound our ports: learn its doorbells now, so that the data path
            # never has to ask hyperd (which may be restarting) at its first notification.
            try:
                for channel in nf.channels:
                    channel.doorbell_names()
            except HypercallError as exc:
                log.warning("%s: the backend's doorbells: %s", nf.name, exc)
        elif state in (S.Closing, S.Closed, S.Unknown) and dev.state != S.Closed:
            self._release(nf)
            dev.switch_state(S.Closed)

    def remove(self, dev: XenbusDevice) -> None:
        nf = dev.driver_data
        if isinstance(nf, Netfront):
            self._release(nf)
        dev.driver_data = None

    # -- connecting -----------------------------------------------------------------------------

    def _pool(
        self, dev: XenbusDevice, nf: Netfront, kind: str, pages: int, *, readonly: bool
    ) -> None:
        """A pool for this vif, granted to its backend."""
        backend, device = dev.otherend_id, dev.device_name
        nf.pools[kind] = grant_pool(self.hc, backend, device, pages, readonly=readonly)

    def _connect(self, dev: XenbusDevice, nf: Netfront) -> None:
        if dev.read_otherend("feature-rx-copy") != "1":
            raise ValueError("the backend does not offer rx-copy")
        backend = dev.otherend_id
        config = {k: dev.read(k) for k in ("mac", "mtu", "ip", "gateway")}
        nf.gso = gso = dev.read_otherend("feature-gso-tcpv4") == "1"
        nf.tap_fd = open_tap(nf.name, offload=gso)
        _configure_link(nf.name, config)
        self._pool(dev, nf, "ring", 2, readonly=False)
        self._pool(dev, nf, "tx", TX_PAGES, readonly=True)
        self._pool(dev, nf, "rx", RX_PAGES, readonly=False)
        nf.channels = [alloc_unbound(self.hc, backend), alloc_unbound(self.hc, backend)]
        self._start_paths(dev, nf, run=False)
        _, _, ring_grefs = nf.pools["ring"]
        tx_ch, rx_ch = nf.channels
        keys = {
            "tx-ring-ref": str(ring_grefs[0]),
            "rx-ring-ref": str(ring_grefs[1]),
            "event-channel-tx": str(tx_ch.port),
            "event-channel-rx": str(rx_ch.port),
            "request-rx-copy": "1",
            "feature-rx-notify": "1",
            "feature-sg": "1",
            "feature-gso-tcpv4": "1" if gso else "0",
            "feature-gso-tcpv6": "1" if gso else "0",
        }

        def publish(tx: Any) -> None:
            for key, value in keys.items():
                tx.write(dev.path(key), value)

        dev.xs.transaction(publish)
        assert nf.tx is not None and nf.rx is not None
        nf.tx.thread.start()
        nf.rx.thread.start()

    def _start_paths(self, dev: XenbusDevice, nf: Netfront, *, run: bool = True) -> None:
        """Fresh rings over the ring pages, the data path over them, every rx buffer posted;
        the threads started if ``run`` (else once the backend can find the rings)."""
        _, ring_pool, _ = nf.pools["ring"]
        tx_ring = FrontRing.init(N.TX_RING, ring_pool.page(0), name=f"{nf.name}-tx")
        rx_ring = FrontRing.init(N.RX_RING, ring_pool.page(1), name=f"{nf.name}-rx")
        nf.rings = [tx_ring, rx_ring]
        tx_ch, rx_ch = nf.channels

        def broken(message: str) -> None:
            dev.fatal(f"{nf.name}: backend misbehaved: {message}")

        _, tx_pool, tx_grefs = nf.pools["tx"]
        _, rx_pool, rx_grefs = nf.pools["rx"]
        nf.tx = TxPath(tx_ring, tx_ch, tx_pool, tx_grefs, nf.tap_fd, nf.gso, broken)
        nf.rx = RxPath(rx_ring, rx_ch, rx_pool, rx_grefs, nf.tap_fd, broken)
        nf.rx.post_all()
        if run:
            nf.tx.thread.start()
            nf.rx.thread.start()

    def _stop_paths(self, nf: Netfront) -> None:
        for path in (nf.tx, nf.rx):
            if path is not None:
                path.stop()
        for path in (nf.tx, nf.rx):
            if path is not None and path.thread.is_alive():
                path.thread.join(timeout=5.0)
        nf.tx = nf.rx = None
        for ring in nf.rings:
            ring.close()
        nf.rings = []

    def _release(self, nf: Netfront) -> None:
        self._stop_paths(nf)
        for channel in nf.channels:
            channel.close()
        nf.channels = []
        for pool_id, pool, _ in nf.pools.values():
            release_pool(self.hc, pool_id, pool)
        nf.pools = {}
        if nf.tap_fd >= 0:
            os.close(nf.tap_fd)
            nf.tap_fd = -1


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

"""netfront's negotiation: the vif frontend driver on the domain kernel's XenBus bus.

When the backend reaches InitWait (and offers rx-copy), the frontend creates eth<devid>, a TAP
in the domain's own network namespace with the MAC, MTU, address and route the toolstack wrote
into the frontend directory; grants its ring pages and buffer pools to the backend; allocates
its two event channels; publishes all of it in one transaction and goes Connected (netfront
skips Initialised). When the backend closes, or the device goes away, it stops and releases
everything; closing the TAP's fd removes eth<devid>.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from pyroute2 import IPRoute

from channels import netif as N
from channels.evtchn import EventChannel, alloc_unbound
from channels.gnttab import GrantPool
from channels.hypercall import GnttabReleasePool, GnttabSetupPool, HypercallClient, HypercallError
from channels.ring import FrontRing
from channels.tun import open_tap
from channels.xenbus import XenbusState
from channels.xenbus_bus import XenbusDevice
from domu.netfront.datapath import RxPath, TxPath

log = logging.getLogger(__name__)
S = XenbusState

TX_PAGES = 256
RX_PAGES = 256


@dataclass
class Netfront:
    name: str
    tap_fd: int = -1
    pools: list[tuple[int, GrantPool]] = field(default_factory=list)  # (pool id, pool)
    channels: list[EventChannel] = field(default_factory=list)
    rings: list[FrontRing] = field(default_factory=list)
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
        self, nf: Netfront, backend: int, pages: int, *, readonly: bool
    ) -> tuple[GrantPool, list[int]]:
        info = self.hc.call(GnttabSetupPool(peer=backend, pages=pages))
        pool = GrantPool.open(info["name"], info["gref_base"], info["pages"])
        nf.pools.append((info["pool"], pool))
        # Zero before granting: nothing of ours may leak through a fresh page (XSA-403).
        for i in range(pages):
            pool.page(i)[:] = bytes(N.PAGE_SIZE)
        return pool, [pool.grant(i, backend, readonly=readonly) for i in range(pages)]

    def _connect(self, dev: XenbusDevice, nf: Netfront) -> None:
        if dev.read_otherend("feature-rx-copy") != "1":
            raise ValueError("the backend does not offer rx-copy")
        backend = dev.otherend_id
        config = {k: dev.read(k) for k in ("mac", "mtu", "ip", "gateway")}
        gso = dev.read_otherend("feature-gso-tcpv4") == "1"
        nf.tap_fd = open_tap(nf.name, offload=gso)
        _configure_link(nf.name, config)
        ring_pool, ring_grefs = self._pool(nf, backend, 2, readonly=False)
        tx_pool, tx_grefs = self._pool(nf, backend, TX_PAGES, readonly=True)
        rx_pool, rx_grefs = self._pool(nf, backend, RX_PAGES, readonly=False)
        tx_ring = FrontRing.init(N.TX_RING, ring_pool.page(0), name=f"{nf.name}-tx")
        rx_ring = FrontRing.init(N.RX_RING, ring_pool.page(1), name=f"{nf.name}-rx")
        nf.rings = [tx_ring, rx_ring]
        tx_ch = alloc_unbound(self.hc, backend)
        nf.channels.append(tx_ch)
        rx_ch = alloc_unbound(self.hc, backend)
        nf.channels.append(rx_ch)

        def broken(message: str) -> None:
            dev.fatal(f"{nf.name}: backend misbehaved: {message}")

        nf.tx = TxPath(tx_ring, tx_ch, tx_pool, tx_grefs, nf.tap_fd, gso, broken)
        nf.rx = RxPath(rx_ring, rx_ch, rx_pool, rx_grefs, nf.tap_fd, broken)
        nf.rx.post_all()
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
        nf.tx.thread.start()
        nf.rx.thread.start()

    def _release(self, nf: Netfront) -> None:
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
        for channel in nf.channels:
            channel.close()
        nf.channels = []
        for pool_id, pool in nf.pools:
            pool.close()
            try:
                self.hc.call(GnttabReleasePool(pool=pool_id))
            except HypercallError:
                pass
        nf.pools = []
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

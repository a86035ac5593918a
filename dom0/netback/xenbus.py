"""netback's negotiation: the vif backend driver on dom0's XenBus bus.

probe: create the host TAP on its bridge, publish the features, go InitWait. When the frontend
is Connected: read its ring refs, event channels and features, map the rings, bind the channels,
start the data path, go Connected. When either side closes: stop the data path, release the
rings and channels, close the TAP (the kernel removes it), go Closed. Any failure, or a protocol
violation by the frontend, fails this vif alone (error node, Closing).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from channels import netif as N
from channels.evtchn import EventChannel, bind_interdomain
from channels.gnttab import GrantError
from channels.grants import GrantMapper
from channels.hypercall import HypercallClient, HypercallError
from channels.ring import BackRing
from channels.xenbus import XenbusState
from channels.xenbus_bus import XenbusDevice
from dom0.netback.datapath import Counters, RateLimit, RxPath, TxPath
from dom0.netback.tap import TapError, create_tap, destroy_tap, vif_name

log = logging.getLogger(__name__)
S = XenbusState

BACKEND_FEATURES = {
    "feature-sg": "1",
    "feature-gso-tcpv4": "1",
    "feature-gso-tcpv6": "1",
    "feature-rx-copy": "1",
    "feature-rx-flip": "0",
    "feature-split-event-channels": "1",
}


@dataclass
class Vif:
    domid: int
    devid: int
    bridge: str
    tap_fd: int
    counters: Counters = field(default_factory=Counters)
    grants: GrantMapper | None = None
    channels: list[EventChannel] = field(default_factory=list)
    rings: list[BackRing] = field(default_factory=list)
    tx: TxPath | None = None
    rx: RxPath | None = None

    @property
    def name(self) -> str:
        return vif_name(self.domid, self.devid)


class NetbackDriver:
    def __init__(self, hc: HypercallClient) -> None:
        self.hc = hc
        self.vifs: dict[tuple[int, int], Vif] = {}
        self._lock = threading.Lock()

    # -- XenBus ---------------------------------------------------------------------------------

    def probe(self, dev: XenbusDevice) -> None:
        bridge = dev.read("bridge") or "hyperbr0"
        mtu = int(dev.read("mtu") or 1500)
        try:
            fd = create_tap(dev.frontend_id, dev.devid, bridge, mtu)
        except TapError as exc:
            dev.fatal(f"creating the host TAP: {exc}")
            return
        vif = Vif(dev.frontend_id, dev.devid, bridge, fd)
        dev.driver_data = vif
        with self._lock:
            self.vifs[dev.frontend_id, dev.devid] = vif
        for key, value in BACKEND_FEATURES.items():
            dev.write(key, value)
        dev.write("hotplug-status", "connected")
        dev.switch_state(S.InitWait)
        log.info("%s: on %s, waiting for the frontend", vif.name, bridge)

    def otherend_changed(self, dev: XenbusDevice, state: XenbusState) -> None:
        vif = dev.driver_data
        if not isinstance(vif, Vif):
            return
        if state in (S.Closing, S.Closed, S.Unknown) or dev.state in (S.Closing, S.Closed):
            # The frontend closes, or the toolstack asked us to (by writing our state): stop,
            # then follow the frontend down to Closed.
            self._disconnect(vif)
            if state in (S.Closed, S.Unknown):
                dev.switch_state(S.Closed)
            elif state == S.Closing:
                dev.switch_state(S.Closing)
            return
        if state == S.Connected and dev.state == S.InitWait:
            try:
                self._connect(dev, vif)
            except (KeyError, ValueError, GrantError, HypercallError) as exc:
                self._disconnect(vif)
                dev.fatal(f"connecting: {exc}")
                return
            dev.switch_state(S.Connected)
            log.info("%s: connected", vif.name)

    def remove(self, dev: XenbusDevice) -> None:
        vif = dev.driver_data
        if not isinstance(vif, Vif):
            return
        self._disconnect(vif)
        with self._lock:
            self.vifs.pop((vif.domid, vif.devid), None)
        destroy_tap(vif.tap_fd, vif.domid, vif.devid, vif.bridge)
        dev.driver_data = None
        log.info("%s: removed", vif.name)

    # -- connecting ---------------------------------------------------------------------------

    def _connect(self, dev: XenbusDevice, vif: Vif) -> None:
        def key(name: str) -> int:
            value = dev.read_otherend(name)
            if value is None:
                raise KeyError(f"frontend {name} missing")
            return int(value)

        if dev.read_otherend("request-rx-copy") != "1":
            raise ValueError("frontend does not request rx-copy")
        grants = GrantMapper(self.hc, dev.frontend_id, 0)
        vif.grants = grants
        tx_page = grants.resolve(key("tx-ring-ref"), write=True)
        rx_page = grants.resolve(key("rx-ring-ref"), write=True)
        tx_ring = BackRing.attach(N.TX_RING, tx_page, name=f"{vif.name}-tx")
        rx_ring = BackRing.attach(N.RX_RING, rx_page, name=f"{vif.name}-rx")
        vif.rings = [tx_ring, rx_ring]
        tx_ch = bind_interdomain(self.hc, dev.frontend_id, key("event-channel-tx"))
        vif.channels.append(tx_ch)
        rx_ch = bind_interdomain(self.hc, dev.frontend_id, key("event-channel-rx"))
        vif.channels.append(rx_ch)
        gso = dev.read_otherend("feature-gso-tcpv4") == "1"
        rate = _parse_rate(dev.read("rate"))

        def fatal(message: str) -> None:
            dev.fatal(f"{vif.name}: {message}")

        vif.tx = TxPath(tx_ring, tx_ch, grants, vif.tap_fd, vif.counters, rate, fatal)
        vif.rx = RxPath(rx_ring, rx_ch, grants, vif.tap_fd, vif.counters, gso, fatal)
        vif.tx.thread.start()
        vif.rx.thread.start()

    def _disconnect(self, vif: Vif) -> None:
        if vif.tx is not None:
            vif.tx.stopping = True
        if vif.rx is not None:
            vif.rx.stop()
        for channel in vif.channels:
            channel.kick()
        for path in (vif.tx, vif.rx):
            if path is not None and path.thread.is_alive():
                path.thread.join(timeout=5.0)
        vif.tx = vif.rx = None
        for ring in vif.rings:
            ring.close()
        vif.rings = []
        for channel in vif.channels:
            channel.close()
        vif.channels = []
        if vif.grants is not None:
            vif.grants.close()
            vif.grants = None

    def stats(self, domid: int | None = None) -> list[dict[str, object]]:
        with self._lock:
            vifs = [v for v in self.vifs.values() if domid is None or v.domid == domid]
        return [
            {
                "domid": v.domid,
                "devid": v.devid,
                "name": v.name,
                "bridge": v.bridge,
                "connected": v.tx is not None,
                **{
                    k: getattr(v.counters, k)
                    for k in (
                        "tx_packets",
                        "tx_bytes",
                        "tx_errors",
                        "tx_dropped",
                        "rx_packets",
                        "rx_bytes",
                        "rx_errors",
                        "rx_dropped",
                    )
                },
                "errors_by_reason": dict(v.counters.errors_by_reason),
            }
            for v in vifs
        ]


def _parse_rate(value: str | None) -> RateLimit | None:
    """The backend's ``rate`` key, as libxl writes it: "<bytes>,<usec>" per credit window."""
    if not value:
        return None
    try:
        credit, window = (int(x) for x in value.split(","))
    except ValueError:
        return None
    if credit <= 0 or window <= 0:
        return None
    return RateLimit(credit, window)

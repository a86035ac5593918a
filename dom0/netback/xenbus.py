"""netback's negotiation: the vif backend driver on dom0's XenBus bus.

probe: read the vif's ``mac`` and ``ip`` from the backend dir (the toolstack's; never from the
frontend dir, which the guest may rewrite), the addresses its frames may come from
(antispoof.py); create the host TAP on its bridge, publish the features, go InitWait. When the
frontend is Connected: read its ring refs, event channels and features, map the rings, bind the
channels, start the data path, go Connected. When either side closes: stop the data path,
release the rings and channels, close the TAP (the kernel removes it), go Closed. Any failure,
or a protocol violation by the frontend, fails this vif alone (error node, Closing).

A worker that dies (killed, crashed) is restarted through the frontend, as blkback does: the
vif keeps its TAP and its ends of the event channels and returns to InitWait; netfront starts
its rings over and posts its receive buffers again (frames in flight are lost, as on a wire:
TCP resends them) and goes Initialised; a new worker starts and the vif is Connected again.
A vif whose worker dies too often (DataPath) fails instead.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from channels.evtchn import EventChannel, bind_interdomain
from channels.gnttab import GrantError
from channels.hypercall import HypercallClient, HypercallError
from channels.xenbus import XenbusState
from channels.xenbus_bus import XenbusDevice
from dom0.datapath_worker import DataPath
from dom0.netback.antispoof import SourceFilter
from dom0.netback.datapath import COUNTER_FIELDS, RateLimit
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
    mac: str  # the backend dir's, checked at probe: what its frames' sources must be
    ip: str | None
    path: DataPath = field(default_factory=lambda: DataPath(COUNTER_FIELDS))
    channels: list[EventChannel] = field(default_factory=list)
    remote_ports: list[int] = field(default_factory=list)  # the frontend's, channels bound to

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
        mac, ip = dev.read("mac"), dev.read("ip")
        try:
            SourceFilter.from_backend(mac or "", ip)  # the worker makes its own from these
        except ValueError as exc:
            dev.fatal(f"backend {exc}")
            return
        try:
            fd = create_tap(dev.frontend_id, dev.devid, bridge, mtu)
        except TapError as exc:
            dev.fatal(f"creating the host TAP: {exc}")
            return
        vif = Vif(dev.frontend_id, dev.devid, bridge, fd, mac or "", ip)
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
        if dev.backend_closing(state, lambda: self._disconnect(vif)):
            return
        if dev.state == S.InitWait and dev.otherend_ready(state):
            try:
                self._connect(dev, vif)
            except (KeyError, ValueError, OSError, GrantError, HypercallError) as exc:
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
        if dev.read_otherend("request-rx-copy") != "1":
            raise ValueError("frontend does not request rx-copy")
        ports = [dev.otherend_int("event-channel-tx"), dev.otherend_int("event-channel-rx")]
        if vif.remote_ports != ports:  # after a restart, still bound to the same ports
            self._unbind(vif)
            for port in ports:
                vif.channels.append(bind_interdomain(self.hc, dev.frontend_id, port))
            vif.remote_ports = ports
        tx_ch, rx_ch = vif.channels
        rate = _parse_rate(dev.read("rate"))
        params = {
            "name": vif.name,
            "tx_ring_ref": dev.otherend_int("tx-ring-ref"),
            "rx_ring_ref": dev.otherend_int("rx-ring-ref"),
            "tx_doorbells": tx_ch.doorbell_names(),
            "rx_doorbells": rx_ch.doorbell_names(),
            "gso": dev.read_otherend("feature-gso-tcpv4") == "1",
            "rate": [rate.credit, rate.window_us] if rate else None,
            "mac": vif.mac,
            "ip": vif.ip,
        }
        vif.path.start("dom0.netback.worker", params, vif.tap_fd, self.hc, dev, vif.name)

    def _disconnect(self, vif: Vif) -> None:
        vif.path.stop()
        self._unbind(vif)

    @staticmethod
    def _unbind(vif: Vif) -> None:
        for channel in vif.channels:
            channel.close()
        vif.channels = []
        vif.remote_ports = []

    def stats(self, domid: int | None = None) -> list[dict[str, object]]:
        with self._lock:
            vifs = [v for v in self.vifs.values() if domid is None or v.domid == domid]
        return [
            {
                "domid": v.domid,
                "devid": v.devid,
                "name": v.name,
                "bridge": v.bridge,
                "mac": v.mac,  # what netback enforces, whatever the guest wrote in its own dir
                "ip": v.ip,
                **v.path.stats(),
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

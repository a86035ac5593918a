"""netback's negotiation: the vif backend driver on dom0's XenBus bus.

probe: read the vif's ``mac`` and ``ip`` from the backend dir (the toolstack's; never from the
frontend dir, which the guest may rewrite), the addresses its frames may come from
(antispoof.py); create the host TAP on its bridge, publish the features (and how many queues
the vif may have: one per host CPU, up to netif.MAX_QUEUES; one for a vif with a ``rate``, whose
credit is the vif's), go InitWait. When the frontend is Connected: read how many queues it
chose, each queue's ring refs and event channels, and its features; attach a TAP queue per
netif queue, bind the channels, start the data path (one worker serving every queue), go
Connected. When either side closes: stop the data path,
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
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

from backends.datapath_worker import DataPath
from backends.host import BackendHost
from backends.netback.antispoof import SourceFilter
from backends.netback.datapath import COUNTER_FIELDS, RateLimit
from backends.netback.tap import TapError, add_queue, create_tap, destroy_tap, vif_name
from channels import netif as N
from channels.errors import BadInput
from channels.evtchn import EventChannel, bind_interdomain
from channels.faults import parse_net
from channels.gnttab import GrantError
from channels.hypercall import HypercallError
from channels.xenbus import XenbusState
from channels.xenbus_bus import XenbusDevice

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
    tap_fds: list[int]  # one per queue, the first the TAP's own (opened at probe)
    mac: str  # the backend dir's, checked at probe: what its frames' sources must be
    ip: str | None
    max_queues: int = 1  # what we offered the frontend
    path: DataPath = field(default_factory=lambda: DataPath(COUNTER_FIELDS))
    channels: list[EventChannel] = field(default_factory=list)
    remote_ports: list[int] = field(default_factory=list)  # the frontend's, channels bound to
    faults: str = ""  # the fault spec its data path runs with (channels/faults.py)

    @property
    def name(self) -> str:
        return vif_name(self.domid, self.devid)


class NetbackDriver:
    def __init__(self, host: BackendHost) -> None:
        self.host = host
        self.hc = host.hc
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
            fd = create_tap(dev.frontend_id, dev.devid, bridge, mtu, self.host.firewall)
        except TapError as exc:
            dev.fatal(f"creating the host TAP: {exc}")
            return
        # A rate is the vif's credit, which one queue spends.
        limited = _parse_rate(dev.read("rate")) is not None
        max_queues = 1 if limited else min(os.cpu_count() or 1, N.MAX_QUEUES)
        vif = Vif(dev.frontend_id, dev.devid, bridge, [fd], mac or "", ip, max_queues)
        dev.driver_data = vif
        with self._lock:
            self.vifs[dev.frontend_id, dev.devid] = vif
        for key, value in BACKEND_FEATURES.items():
            dev.write(key, value)
        dev.write("multi-queue-max-queues", str(max_queues))
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

    def settings_changed(self, dev: XenbusDevice) -> None:
        """The toolstack set or cleared the vif's faults (``hyperctl fault``): its data path
        applies them from the next frame on."""
        vif = dev.driver_data
        if not isinstance(vif, Vif):
            return
        spec = _checked_faults(dev, vif.name)
        if spec == vif.faults:
            return
        vif.faults = spec
        vif.path.send_settings({"faults": spec})
        log.info("%s: faults %s", vif.name, spec or "cleared")

    def remove(self, dev: XenbusDevice) -> None:
        vif = dev.driver_data
        if not isinstance(vif, Vif):
            return
        self._disconnect(vif)
        destroy_tap(vif.tap_fds, vif.domid, vif.devid, vif.bridge, self.host.firewall)
        with self._lock:  # forgotten only once released: see Devices.wait_released
            self.vifs.pop((vif.domid, vif.devid), None)
        dev.driver_data = None
        log.info("%s: removed", vif.name)

    # -- connecting ---------------------------------------------------------------------------

    def _connect(self, dev: XenbusDevice, vif: Vif) -> None:
        if dev.read_otherend("request-rx-copy") != "1":
            raise ValueError("frontend does not request rx-copy")
        queues = _requested_queues(dev, vif.max_queues)

        def key(queue: int, name: str) -> int:
            return dev.otherend_int(N.queue_path(queue, queues, name))

        ports = [key(q, f"event-channel-{d}") for q in range(queues) for d in ("tx", "rx")]
        if vif.remote_ports != ports:  # after a restart, still bound to the same ports
            self._unbind(vif)
            for port in ports:
                vif.channels.append(bind_interdomain(self.hc, dev.frontend_id, port))
            vif.remote_ports = ports
        while len(vif.tap_fds) < queues:
            vif.tap_fds.append(add_queue(vif.domid, vif.devid))
        while len(vif.tap_fds) > queues:  # a restarted frontend chose fewer
            os.close(vif.tap_fds.pop())
        rate = _parse_rate(dev.read("rate"))
        params = {
            "name": vif.name,
            "queues": [
                {
                    "tx_ring_ref": key(q, "tx-ring-ref"),
                    "rx_ring_ref": key(q, "rx-ring-ref"),
                    "tx_doorbells": vif.channels[2 * q].doorbell_names(),
                    "rx_doorbells": vif.channels[2 * q + 1].doorbell_names(),
                    "tap_fd": vif.tap_fds[q],
                }
                for q in range(queues)
            ],
            "gso": dev.read_otherend("feature-gso-tcpv4") == "1",
            "rate": [rate.credit, rate.window_us] if rate else None,
            "mac": vif.mac,
            "ip": vif.ip,
            "faults": vif.faults,
        }
        vif.path.start(
            "backends.netback.worker",
            params,
            vif.tap_fds[0],
            self.host,
            dev,
            vif.name,
            extra_fds=vif.tap_fds[1:],
            counter_blocks=queues,
            rings=[f"q{q}-{d}" for q in range(queues) for d in ("tx", "rx")],
        )

    def _disconnect(self, vif: Vif) -> None:
        vif.path.stop()
        self._unbind(vif)

    @staticmethod
    def _unbind(vif: Vif) -> None:
        for channel in vif.channels:
            channel.close()
        vif.channels = []
        vif.remote_ports = []

    def hand_over(self, back: Mapping[str, str]) -> None:
        """Nothing of the host's to hand over: a driver domain makes the vif's TAP itself."""
        return None

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
                "queues": [
                    {"tx_packets": q["tx_packets"], "rx_packets": q["rx_packets"]}
                    for q in v.path.queue_counters()
                ],
            }
            for v in vifs
        ]


def _checked_faults(dev: XenbusDevice, name: str) -> str:
    """The vif's fault spec from its backend directory, canonical; one dom0 did not check
    fails nothing but itself: it is logged and ignored (no faults)."""
    spec = dev.read("faults") or ""
    try:
        return str(parse_net(spec)) if spec else ""
    except BadInput as exc:
        log.warning("%s: faults %r ignored: %s", name, spec, exc)
        return ""


def _requested_queues(dev: XenbusDevice, offered: int) -> int:
    """How many queues the frontend chose (``multi-queue-num-queues``; one if it says
    nothing): ValueError unless 1..``offered``."""
    value = dev.read_otherend("multi-queue-num-queues")
    queues = 1 if value is None else int(value)
    if not 1 <= queues <= offered:
        raise ValueError(f"frontend requested {queues} queues; the backend offers 1 to {offered}")
    return queues


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


#: The driver channels/kinds.py names this folder for.
Driver = NetbackDriver

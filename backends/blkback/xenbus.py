"""blkback's negotiation: the vbd backend driver on dom0's XenBus bus (blkif order).

probe: attach the image (``params``, read-only unless ``mode`` is ``w``) to a loop device,
publish the transport features, go InitWait. The image is opened only if nobody but root and
``params-owner`` can redirect or change it (channels/images.py), checked on what is opened. In a
driver domain, blkback opens no image: dom0 attaches it (``hand_over``, the same checks) and
hyperd hands the loop device's descriptor to the driver domain, which takes it as it probes
(issue 15); its size and access mode are the descriptor's. When
the frontend is Initialised (Linux also accepts Connected): read its ring ref, event channel
and protocol, bind the channel, start the data path in a worker process, publish the disk's
properties (``sectors``, ``sector-size``, ``info``) and go Connected. When either side closes:
stop the worker, release the channel, go Closed; the loop device goes when the vbd is removed
(closing its last descriptor detaches it). Any failure, or a protocol violation by the
frontend, fails this vbd alone (error node, Closing).

A worker that dies (killed, crashed) is a restart, not a failure: the vbd keeps its loop device
and its end of the event channel, returns to InitWait, and the frontend resets its ring with
every unanswered request on it again (domu/blkfront/xenbus.py) and goes Initialised; then a new
worker starts over the same ring and the vbd is Connected again. Counters carry over. A vbd
whose worker dies too often (DataPath) fails instead: a frontend that can crash its worker, by
truncating its own pages, cannot make dom0 spawn workers without end.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from backends.blkback.datapath import COUNTER_FIELDS
from backends.blkback.loop import LoopDevice, LoopError, adopt, attach
from backends.datapath_worker import DataPath
from backends.host import BackendHost
from channels import blkif as B
from channels import xenbus
from channels.errors import BadInput
from channels.evtchn import EventChannel, bind_interdomain
from channels.faults import parse_block
from channels.hypercall import HypercallError
from channels.xenbus import XenbusState
from channels.xenbus_bus import XenbusDevice

log = logging.getLogger(__name__)
S = XenbusState

IO_THREADS = 8

TRANSPORT_FEATURES = {
    "feature-flush-cache": "1",
    "feature-persistent": "1",
    "feature-max-indirect-segments": str(B.MAX_INDIRECT_SEGMENTS),
}


@dataclass
class Vbd:
    domid: int
    devid: int
    vdev: str
    loop: LoopDevice
    path: DataPath = field(default_factory=lambda: DataPath(COUNTER_FIELDS))
    channel: EventChannel | None = None
    remote_port: int | None = None  # the frontend's port, which channel is bound to
    faults: str = ""  # the fault spec its data path runs with (channels/faults.py)

    @property
    def name(self) -> str:
        return f"vbd{self.domid}.{self.vdev}"


class BlkbackDriver:
    def __init__(self, host: BackendHost) -> None:
        self.host = host
        self.hc = host.hc
        self.vbds: dict[tuple[int, int], Vbd] = {}
        self._lock = threading.Lock()

    # -- XenBus ---------------------------------------------------------------------------------

    def hand_over(self, back: Mapping[str, str]) -> int:
        """For a vbd a driver domain serves: the image attached here in dom0, with the checks
        dom0's own blkback makes (``back`` is the backend directory the toolstack writes), as
        the loop device's descriptor for hyperd to hand over (BackendHost.handed)."""
        return _attach(back).hand_over()

    def probe(self, dev: XenbusDevice) -> None:
        image = dev.read("params") or "?"
        try:
            if self.host.handed is None:
                loop = _attach({key: dev.read(key) or "" for key in _OPEN_KEYS})
            else:
                loop = self._take(dev)
        except (LoopError, HypercallError) as exc:
            dev.fatal(f"attaching the image: {exc}")
            return
        vbd = Vbd(dev.frontend_id, dev.devid, dev.read("dev") or str(dev.devid), loop)
        dev.driver_data = vbd
        with self._lock:
            self.vbds[dev.frontend_id, dev.devid] = vbd
        rdev = os.fstat(loop.fd).st_rdev
        features = {
            **TRANSPORT_FEATURES,
            "feature-discard": "0" if loop.readonly else "1",
            "discard-granularity": "4096",
            "discard-alignment": "0",
            "physical-device": f"{os.major(rdev):x}:{os.minor(rdev):x}",
            "physical-device-path": loop.path,
        }
        for key, value in features.items():
            dev.write(key, value)
        dev.switch_state(S.InitWait)
        log.info("%s: %s on %s, waiting for the frontend", vbd.name, image, loop.path)

    def _take(self, dev: XenbusDevice) -> LoopDevice:
        """The loop device dom0 attached for this vbd, handed over through hyperd."""
        assert self.host.handed is not None
        fd = self.host.handed(dev.frontend_id, xenbus.device_name("vbd", dev.devid))
        try:
            return adopt(fd)
        except LoopError:
            os.close(fd)
            raise

    def otherend_changed(self, dev: XenbusDevice, state: XenbusState) -> None:
        vbd = dev.driver_data
        if not isinstance(vbd, Vbd):
            return
        if dev.backend_closing(state, lambda: self._disconnect(vbd)):
            return
        if dev.state == S.InitWait and dev.otherend_ready(state):
            try:
                self._connect(dev, vbd)
            except (KeyError, ValueError, OSError, HypercallError) as exc:
                self._disconnect(vbd)
                dev.fatal(f"connecting: {exc}")
                return
            dev.switch_state(S.Connected)
            log.info("%s: connected", vbd.name)

    def settings_changed(self, dev: XenbusDevice) -> None:
        """The toolstack set or cleared the vbd's faults (``hyperctl fault``): its data path
        applies them from the next request on. A spec dom0 did not check fails nothing but
        itself: it is logged and ignored."""
        vbd = dev.driver_data
        if not isinstance(vbd, Vbd):
            return
        spec = dev.read("faults") or ""
        if spec == vbd.faults:
            return
        try:
            spec = str(parse_block(spec)) if spec else ""
        except BadInput as exc:
            log.warning("%s: faults %r ignored: %s", vbd.name, spec, exc)
            return
        vbd.faults = spec
        vbd.path.send_settings({"faults": spec})
        log.info("%s: faults %s", vbd.name, spec or "cleared")

    def data_path(self, domid: int, devid: int) -> DataPath | None:
        """The data path of the vbd ``devid`` of domain ``domid``, if it is served here."""
        with self._lock:
            vbd = self.vbds.get((domid, devid))
        return vbd.path if vbd is not None else None

    def remove(self, dev: XenbusDevice) -> None:
        vbd = dev.driver_data
        if not isinstance(vbd, Vbd):
            return
        self._disconnect(vbd)
        vbd.loop.close()
        with self._lock:  # forgotten only once released: see Devices.wait_released
            self.vbds.pop((vbd.domid, vbd.devid), None)
        dev.driver_data = None
        log.info("%s: removed", vbd.name)

    # -- connecting ---------------------------------------------------------------------------

    def _connect(self, dev: XenbusDevice, vbd: Vbd) -> None:
        protocol = dev.read_otherend("protocol")
        if protocol not in (None, B.XEN_IO_PROTO_ABI_X86_64):
            raise ValueError(f"unsupported protocol {protocol!r}")
        order = dev.read_otherend("ring-page-order")
        if order not in (None, "0"):
            raise ValueError(f"ring-page-order {order} above the maximum 0")
        port = dev.otherend_int("event-channel")
        if vbd.channel is None or vbd.remote_port != port:  # after a restart, still bound
            if vbd.channel is not None:
                vbd.channel.close()
            vbd.channel = bind_interdomain(self.hc, dev.frontend_id, port)
            vbd.remote_port = port
        params: dict[str, Any] = {
            "name": vbd.name,
            "ring_ref": dev.otherend_int("ring-ref"),
            "doorbells": vbd.channel.doorbell_names(),
            "sectors": vbd.loop.sectors,
            "readonly": vbd.loop.readonly,
            "io_threads": IO_THREADS,
            "faults": vbd.faults,
        }
        vbd.path.start("backends.blkback.worker", params, vbd.loop.fd, self.host, dev, vbd.name)
        properties = {
            "sectors": str(vbd.loop.sectors),
            "sector-size": str(B.SECTOR_SIZE),
            "physical-sector-size": str(B.SECTOR_SIZE),
            "info": str(B.VDISK_READONLY if vbd.loop.readonly else 0),
        }

        dev.write_all(properties)

    def _disconnect(self, vbd: Vbd) -> None:
        vbd.path.stop()
        if vbd.channel is not None:
            vbd.channel.close()
            vbd.channel = None
            vbd.remote_port = None

    def stats(self, domid: int | None = None) -> list[dict[str, object]]:
        with self._lock:
            vbds = [v for v in self.vbds.values() if domid is None or v.domid == domid]
        return [
            {
                "domid": v.domid,
                "devid": v.devid,
                "vdev": v.vdev,
                "loop": v.loop.path,
                "sectors": v.loop.sectors,
                "readonly": v.loop.readonly,
                **v.path.stats(),
            }
            for v in vbds
        ]


#: The backend keys that say which image to open, and how.
_OPEN_KEYS = ("params", "mode", B.BlkifKey.PARAMS_OWNER)


def _attach(back: Mapping[str, str]) -> LoopDevice:
    """Attach the image the backend keys name (``params``), read-only unless ``mode`` is
    ``w``, if only root and ``params-owner`` can change it (backends/blkback/loop.py)."""
    image = back.get("params")
    if not image:
        raise LoopError("no params (image path) in the backend directory")
    owner = back.get(B.BlkifKey.PARAMS_OWNER) or "0"
    if not owner.isdecimal():
        raise LoopError(f"{B.BlkifKey.PARAMS_OWNER} {owner!r} is not a uid")
    return attach(image, readonly=back.get("mode") != "w", owner=int(owner))


#: The driver channels/kinds.py names this folder for.
Driver = BlkbackDriver

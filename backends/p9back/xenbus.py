"""p9back's negotiation: the 9pfs backend driver on dom0's XenBus bus (9pfs.h order).

probe: open the share (``path``, a host directory, as ``O_PATH | O_DIRECTORY``, with the checks
of channels/images.py: no symlink on the way, its parents root's or ``path-owner``'s), check
``security_model`` ("none", the only one), read ``mode`` ("r" read-only, anything else
read-write), publish ``versions``, ``max-rings`` and ``max-ring-page-order``, go InitWait. When
the frontend is Initialised (or Connected): read ``version`` (must be "1"), ``num-rings``
(1..max-rings) and each ring's ``ring-ref<N>`` and ``event-channel-<N>``, bind the channels,
start the data path in a worker process (backends/p9back/worker.py) with the share's fd as its
device, go Connected. When either side closes: stop the worker, release the channels, go Closed;
the share's fd goes when the device is removed. Any failure, or a protocol violation by the
frontend, fails this device alone (error node, Closing). A worker that dies is restarted through
the frontend, as blkback's is (backends/datapath_worker.py, DataPath): the device returns to
InitWait.

The worker serves the share as the directory's owner when that is a user other than root (it
must be able to write there, and files the domain creates belong to that user on the host); a
root-owned share, as a worker uid of its own, which reaches only what others may. It never runs
as root (backends/privilege.py refuses).
"""

from __future__ import annotations

import logging
import os
import pwd
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from backends.datapath_worker import DataPath
from backends.host import BackendHost
from backends.p9back.datapath import COUNTER_FIELDS
from channels import images
from channels import p9fs as P
from channels.evtchn import EventChannel, bind_interdomain
from channels.hypercall import HypercallError
from channels.xenbus import XenbusState
from channels.xenbus_bus import XenbusDevice

log = logging.getLogger(__name__)
S = XenbusState

MAX_RINGS = 2  # Linux's 9pfs frontend asks for 2 and refuses a backend offering fewer
MAX_RING_PAGE_ORDER = 6  # 64 pages a ring: 128 KiB each way, so msize up to 128 KiB


@dataclass
class Share:
    domid: int
    devid: int
    path: str
    root_fd: int
    readonly: bool
    owner: int
    data: DataPath = field(default_factory=lambda: DataPath(COUNTER_FIELDS))
    channels: list[EventChannel] = field(default_factory=list)
    remote_ports: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"9pfs{self.domid}.{self.devid}"


class P9backDriver:
    def __init__(self, host: BackendHost) -> None:
        self.host = host
        self.hc = host.hc
        self.shares: dict[tuple[int, int], Share] = {}
        self._lock = threading.Lock()

    # -- XenBus ---------------------------------------------------------------------------------

    def probe(self, dev: XenbusDevice) -> None:
        path = dev.read(P.P9Key.PATH)
        model = dev.read(P.P9Key.SECURITY_MODEL) or P.XEN_9PFS_SECURITY_MODEL
        owner = dev.read(P.P9Key.PATH_OWNER) or "0"
        if not path:
            dev.fatal("no path (host directory) in the backend directory")
            return
        if model != P.XEN_9PFS_SECURITY_MODEL:
            dev.fatal(f"security_model {model!r}: only 'none' is supported")
            return
        if not owner.isdecimal():
            dev.fatal(f"{P.P9Key.PATH_OWNER} {owner!r} is not a uid")
            return
        try:
            root_fd = images.open_share(path, int(owner))
        except images.ImageError as exc:
            dev.fatal(f"opening the share: {exc}")
            return
        readonly = dev.read(P.P9Key.MODE) == "r"
        # Served as the directory's owner (the worker never runs as root: a root-owned share
        # is served as the worker's own id, which may write only what everyone may).
        share = Share(dev.frontend_id, dev.devid, path, root_fd, readonly, os.fstat(root_fd).st_uid)
        dev.driver_data = share
        with self._lock:
            self.shares[dev.frontend_id, dev.devid] = share
        dev.write(P.P9Key.VERSIONS, P.XEN_9PFS_PROTOCOL_VERSION)
        dev.write(P.P9Key.MAX_RINGS, str(MAX_RINGS))
        dev.write(P.P9Key.MAX_RING_PAGE_ORDER, str(MAX_RING_PAGE_ORDER))
        dev.switch_state(S.InitWait)
        log.info("%s: sharing %s%s", share.name, path, " read-only" if readonly else "")

    def otherend_changed(self, dev: XenbusDevice, state: XenbusState) -> None:
        share = dev.driver_data
        if not isinstance(share, Share):
            return
        if dev.backend_closing(state, lambda: self._disconnect(share)):
            return
        if dev.state == S.InitWait and dev.otherend_ready(state):
            try:
                self._connect(dev, share)
            except (KeyError, ValueError, OSError, HypercallError) as exc:
                self._disconnect(share)
                dev.fatal(f"connecting: {exc}")
                return
            dev.switch_state(S.Connected)
            log.info("%s: connected", share.name)

    def remove(self, dev: XenbusDevice) -> None:
        share = dev.driver_data
        if not isinstance(share, Share):
            return
        self._disconnect(share)
        os.close(share.root_fd)
        with self._lock:  # forgotten only once released: see Devices.wait_released
            self.shares.pop((share.domid, share.devid), None)
        dev.driver_data = None

    # -- connecting -----------------------------------------------------------------------------

    def _connect(self, dev: XenbusDevice, share: Share) -> None:
        version = dev.read_otherend(P.P9Key.VERSION)
        if version != P.XEN_9PFS_PROTOCOL_VERSION:
            raise ValueError(f"version {version!r}, not {P.XEN_9PFS_PROTOCOL_VERSION}")
        rings = dev.otherend_int(P.P9Key.NUM_RINGS)
        if not 1 <= rings <= MAX_RINGS:
            raise ValueError(f"num-rings {rings} outside 1..{MAX_RINGS}")
        refs = [dev.otherend_int(P.ring_ref_key(n)) for n in range(rings)]
        ports = [dev.otherend_int(P.event_channel_key(n)) for n in range(rings)]
        if share.remote_ports != ports:  # after a worker restart, still bound
            self._close_channels(share)
            for port in ports:
                share.channels.append(bind_interdomain(self.hc, dev.frontend_id, port))
            share.remote_ports = ports
        params: dict[str, Any] = {
            "name": share.name,
            "ring_refs": refs,
            "doorbells": [channel.doorbell_names() for channel in share.channels],
            "readonly": share.readonly,
            "max_order": MAX_RING_PAGE_ORDER,
            **_credentials(share.owner),
        }
        share.data.start(
            "backends.p9back.worker",
            params,
            share.root_fd,
            self.host,
            dev,
            share.name,
            rings=[f"ring{n}" for n in range(len(params["ring_refs"]))],
        )

    def _disconnect(self, share: Share) -> None:
        share.data.stop()
        self._close_channels(share)

    def _close_channels(self, share: Share) -> None:
        for channel in share.channels:
            channel.close()
        share.channels, share.remote_ports = [], []

    def hand_over(self, back: Mapping[str, str]) -> None:
        """Nothing to hand over: no domain but dom0 serves shares (config's ServedKind)."""
        return None

    def stats(self, domid: int | None = None) -> list[dict[str, object]]:
        with self._lock:
            shares = [s for s in self.shares.values() if domid is None or s.domid == domid]
        return [
            {
                "domid": s.domid,
                "devid": s.devid,
                "path": s.path,
                "readonly": s.readonly,
                **s.data.stats(),
            }
            for s in shares
        ]


def _credentials(owner: int) -> dict[str, int]:
    """Who the worker serves the share as (see the module docstring): the owner's uid and
    primary gid, or nothing (its own worker id) for root or no owner."""
    if owner == 0:
        return {}
    try:
        gid = pwd.getpwuid(owner).pw_gid
    except KeyError:
        gid = owner
    return {"share_uid": owner, "share_gid": gid}


#: The driver channels/kinds.py names this folder for.
Driver = P9backDriver

"""blkfront's negotiation: the vbd frontend driver on the domain kernel's XenBus bus.

blkif order (xen-split-driver.md §5.4): when the backend reaches InitWait, the frontend reads its
features, sets up one ring page, a pool of data pages and one indirect page per ring slot (all
granted to the backend once, persistent grants, in pools for this vbd only: ``vbd/<devid>``),
allocates the event channel, initialises the ring, publishes ``ring-ref``, ``event-channel``,
``protocol`` and ``feature-persistent`` in one transaction and goes Initialised. When the
backend is Connected, it reads the disk's properties, makes the mount point ``/dev/<vdev>`` (an
empty regular file on the domain's own /dev), starts the disk's FUSE server
(domu/blkfront/server.py) and goes Connected once the server has mounted. When the backend
closes or the device goes away: the server is told to stop (it unmounts), the mount point is
removed and every pool, ring and channel released.

Backend restart (xen-split-driver.md §6.9, done here without the toolstack): a backend whose
data path died returns from Connected to InitWait, keeping its end of the event channel. The
frontend then recovers instead of closing: it tells the server to ``reset`` (start the ring
over, replaying every request not yet answered), goes Initialised with the same ring, pools and
channel, and Connected again once the backend is. Programs using the disk see a pause.

The same when the driver domain serving the disk dies: its backend directory goes with it
(the frontend waits, whatever state it reads as Unknown), and when a domain of its name serves
the guest again the toolstack moves the device there (channels/xenbus_bus.py follows it), and
hyperd hands the new backend the channel and pools the frontend has (hyperd/evtchn.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field

from channels import blkif as B
from channels.evtchn import EventChannel, alloc_unbound
from channels.gnttab import GrantPool, grant_pool, release_pool
from channels.hypercall import HypercallClient, HypercallError
from channels.ids import WORKLOAD_GID, WORKLOAD_UID
from channels.ring import FrontRing
from channels.xenbus import XenbusState
from channels.xenbus_bus import XenbusDevice
from domu.fuseserver import FuseServer

log = logging.getLogger(__name__)
S = XenbusState

DATA_PAGES = 1024  # 4 MiB in flight: four 1 MiB requests, or the whole ring of small ones


@dataclass
class Blkfront:
    vdev: str
    pools: dict[str, tuple[int, GrantPool]] = field(default_factory=dict)  # kind: (id, pool)
    channel: EventChannel | None = None
    server: FuseServer | None = None
    disk: tuple[int, bool] = (0, False)  # sectors, read-only: a restarted backend must agree

    @property
    def mountpoint(self) -> str:
        return f"/dev/{self.vdev}"


class BlkfrontDriver:
    def __init__(self, hc: HypercallClient) -> None:
        self.hc = hc

    def probe(self, dev: XenbusDevice) -> None:
        vdev = dev.read("dev") or B.vdev_name(dev.devid)
        B.parse_vdev(vdev)  # the toolstack wrote it; still, never build a path from a bad name
        dev.driver_data = Blkfront(vdev)

    def otherend_changed(self, dev: XenbusDevice, state: XenbusState) -> None:
        bf = dev.driver_data
        if not isinstance(bf, Blkfront):
            return
        try:
            if state == S.InitWait and dev.state in (S.Unknown, S.Initialising):
                self._initialise(dev, bf)
                dev.switch_state(S.Initialised)
            elif state == S.InitWait and dev.state == S.Connected and bf.server is not None:
                self._recover(dev, bf)
                dev.switch_state(S.Initialised)
            elif state == S.InitWait and dev.state == S.Initialised:
                # Moved while we waited for the backend we had published our ring to: the new
                # one connects to that ring as it is; our pages must be granted to it.
                _regrant(dev, bf)
            elif state == S.Connected and dev.state == S.Initialised:
                if bf.server is None:
                    self._connect(dev, bf)
                elif _disk(dev) != bf.disk:
                    raise ValueError(f"the restarted backend offers another disk: {_disk(dev)}")
                dev.switch_state(S.Connected)
                log.info("%s connected", bf.vdev)
            # Unknown (the backend's directory went with its driver domain) is a pause: the
            # toolstack moves the device to the domain that serves it next (xenbus_bus.py).
            elif state in (S.Closing, S.Closed) and dev.state != S.Closed:
                self._release(bf)
                dev.switch_state(S.Closed)
        except (OSError, ValueError, KeyError, HypercallError, TimeoutError) as exc:
            self._release(bf)
            dev.fatal(f"{bf.vdev}: {exc}")

    def remove(self, dev: XenbusDevice) -> None:
        bf = dev.driver_data
        if isinstance(bf, Blkfront):
            self._release(bf)
        dev.driver_data = None

    # -- connecting -----------------------------------------------------------------------------

    def _pool(
        self, dev: XenbusDevice, bf: Blkfront, kind: str, pages: int, *, readonly: bool
    ) -> None:
        """A pool for this vbd, granted to its backend."""
        backend, device = dev.otherend_id, dev.device_name
        pool_id, pool, _ = grant_pool(self.hc, backend, device, pages, readonly=readonly)
        bf.pools[kind] = (pool_id, pool)

    def _initialise(self, dev: XenbusDevice, bf: Blkfront) -> None:
        self._pool(dev, bf, "ring", 1, readonly=False)
        self._pool(dev, bf, "data", DATA_PAGES, readonly=False)
        if _indirect_segments(dev) > B.BLKIF_MAX_SEGMENTS_PER_REQUEST:
            self._pool(dev, bf, "indirect", B.nr_ents(0), readonly=True)
        ring_pool = bf.pools["ring"][1]
        FrontRing.init(B.BLK_RING, ring_pool.page(0), name=bf.vdev).close()
        bf.channel = alloc_unbound(self.hc, dev.otherend_id)
        keys = {
            "ring-ref": str(ring_pool.gref_base),
            "event-channel": str(bf.channel.port),
            "protocol": B.XEN_IO_PROTO_ABI_X86_64,
            "feature-persistent": "1",
        }

        dev.write_all(keys)

    def _connect(self, dev: XenbusDevice, bf: Blkfront) -> None:
        bf.disk = sectors, readonly = _disk(dev)
        segments = _indirect_segments(dev) if "indirect" in bf.pools else 0
        assert bf.channel is not None
        mine, peer = bf.channel.doorbell_names()
        if peer is None:
            raise ValueError("the backend has not bound the event channel")
        params = {
            "name": bf.vdev,
            "mountpoint": bf.mountpoint,
            "sectors": sectors,
            "readonly": readonly,
            "max_segments": max(segments, B.BLKIF_MAX_SEGMENTS_PER_REQUEST),
            "pools": {
                kind: {"name": pool.name, "gref_base": pool.gref_base, "pages": pool.pages}
                for kind, (_, pool) in bf.pools.items()
            },
            "doorbells": [mine, peer],
            "uid": WORKLOAD_UID,
            "gid": WORKLOAD_GID,
        }
        fd = os.open(bf.mountpoint, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.close(fd)
        bf.server = FuseServer(dev, bf.vdev, "domu.blkfront.server:main", params)
        bf.server.wait_mounted(bf.mountpoint)

    def _recover(self, dev: XenbusDevice, bf: Blkfront) -> None:
        """The backend restarted, or another serves the disk now: grant the pages to it, and
        have the server start the ring over (see the docstring)."""
        assert bf.server is not None
        log.warning("%s: the backend restarted; replaying what it had not answered", bf.vdev)
        _regrant(dev, bf)
        bf.server.reset(bf.mountpoint)

    def _release(self, bf: Blkfront) -> None:
        server, bf.server = bf.server, None
        if server is not None:
            server.stop(bf.mountpoint)
        with contextlib.suppress(OSError):
            os.unlink(bf.mountpoint)
        if bf.channel is not None:
            bf.channel.close()
            bf.channel = None
        for pool_id, pool in bf.pools.values():
            release_pool(self.hc, pool_id, pool)
        bf.pools = {}


def _regrant(dev: XenbusDevice, bf: Blkfront) -> None:
    """Our pages, granted to the backend that serves the disk now (GrantPool.regrant)."""
    for _, pool in bf.pools.values():
        pool.regrant(dev.otherend_id)


def _disk(dev: XenbusDevice) -> tuple[int, bool]:
    """The backend's disk: (sectors, read-only)."""
    sectors = int(dev.read_otherend("sectors") or "")
    sector_size = int(dev.read_otherend("sector-size") or B.SECTOR_SIZE)
    if sector_size != B.SECTOR_SIZE or sectors <= 0:
        raise ValueError(f"unsupported disk: {sectors} sectors of {sector_size} bytes")
    return sectors, bool(int(dev.read_otherend("info") or 0) & B.VDISK_READONLY)


def _indirect_segments(dev: XenbusDevice) -> int:
    value = dev.read_otherend("feature-max-indirect-segments") or "0"
    return min(int(value), B.MAX_INDIRECT_SEGMENTS) if value.isdigit() else 0


#: The driver channels/kinds.py names this folder for.
Driver = BlkfrontDriver

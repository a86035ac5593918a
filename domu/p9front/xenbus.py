"""p9front's negotiation: the 9pfs frontend driver on the domain kernel's XenBus bus.

9pfs.h order: when the backend reaches InitWait, the frontend checks that it speaks version 1,
takes ``ring_order = min(RING_ORDER, max-ring-page-order)``, and sets up one ring: a pool
``ring`` of the interface page and the ``in`` pages (granted read-write: the backend writes
``in`` and its indices) and a pool ``out`` of the ``out`` pages (granted read-only: the backend
only reads requests), both for this device only (``9pfs/<devid>``). It initialises the
interface page (ring_order, the data pages' refs), allocates the event channel, publishes
``version``, ``num-rings`` (1), ``ring-ref0`` and ``event-channel-0`` in one transaction and
goes Initialised. When the backend is Connected, it makes the mount point ``/mnt/<tag>``
(``tag`` is the toolstack's, in our directory), starts the share's FUSE server
(``python -m domu.p9front.fs``, a process of its own like blkfront's) and goes Connected once
the server has mounted. When the backend closes or the device goes away: the server is told to
stop (it unmounts), the mount point is removed and every pool and channel released.

The workload sees the mount because the kernel's ``/mnt`` is a shared mount (a tmpfs the kernel
mounts at boot, before the workload's mount namespace is copied from its own), as ``/dev`` is
for the disks: mounts made under it later propagate to the workload.

A backend whose worker restarts returns to InitWait; this frontend does not replay its ring (a
9P session cannot be resumed: its fids are gone), so the share is closed and the mount goes
(programs see EIO, then ENOENT).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field

from channels import p9fs as P
from channels.evtchn import EventChannel, alloc_unbound
from channels.gnttab import GrantPool, grant_pool, release_pool
from channels.hypercall import HypercallClient, HypercallError
from channels.xenbus import XenbusState
from channels.xenbus_bus import XenbusDevice
from domu.fuseserver import FuseServer

log = logging.getLogger(__name__)
S = XenbusState

RING_ORDER = 6  # 64 pages: 128 KiB each way
MOUNT_ROOT = "/mnt"


@dataclass
class P9front:
    tag: str
    pools: dict[str, tuple[int, GrantPool]] = field(default_factory=dict)  # kind: (id, pool)
    order: int = 0
    channel: EventChannel | None = None
    server: FuseServer | None = None

    @property
    def mountpoint(self) -> str:
        return f"{MOUNT_ROOT}/{self.tag}"


class P9frontDriver:
    def __init__(self, hc: HypercallClient) -> None:
        self.hc = hc

    def probe(self, dev: XenbusDevice) -> None:
        tag = dev.read(P.P9Key.TAG) or ""
        if not P.valid_tag(tag):  # the toolstack wrote it; still, never build a path from it
            dev.fatal(f"tag {tag!r} is not a share name")
            return
        dev.driver_data = P9front(tag)

    def otherend_changed(self, dev: XenbusDevice, state: XenbusState) -> None:
        pf = dev.driver_data
        if not isinstance(pf, P9front):
            return
        try:
            if state == S.InitWait and dev.state in (S.Unknown, S.Initialising):
                self._initialise(dev, pf)
                dev.switch_state(S.Initialised)
            elif state == S.Connected and dev.state == S.Initialised:
                self._connect(dev, pf)
                dev.switch_state(S.Connected)
                log.info("9pfs %s mounted at %s", pf.tag, pf.mountpoint)
            elif state == S.InitWait and dev.state == S.Connected:
                raise ValueError("the backend restarted; a 9P session does not resume")
            elif state in (S.Closing, S.Closed, S.Unknown) and dev.state != S.Closed:
                self._release(pf)
                dev.switch_state(S.Closed)
        except (OSError, ValueError, KeyError, HypercallError, TimeoutError) as exc:
            self._release(pf)
            dev.fatal(f"9pfs {pf.tag}: {exc}")

    def remove(self, dev: XenbusDevice) -> None:
        pf = dev.driver_data
        if isinstance(pf, P9front):
            self._release(pf)
        dev.driver_data = None

    # -- connecting -----------------------------------------------------------------------------

    def _initialise(self, dev: XenbusDevice, pf: P9front) -> None:
        versions = (dev.read_otherend(P.P9Key.VERSIONS) or "").split(",")
        if P.XEN_9PFS_PROTOCOL_VERSION not in versions:
            raise ValueError(f"backend versions {versions}: no {P.XEN_9PFS_PROTOCOL_VERSION}")
        if dev.otherend_int(P.P9Key.MAX_RINGS) < 1:
            raise ValueError("the backend offers no ring")
        pf.order = min(RING_ORDER, dev.otherend_int(P.P9Key.MAX_RING_PAGE_ORDER))
        if pf.order < 1:
            raise ValueError(f"max-ring-page-order {pf.order}: rings too small for 9P")
        half = 1 << pf.order >> 1
        backend, device = dev.otherend_id, dev.device_name
        for kind, pages, readonly in (("ring", 1 + half, False), ("out", half, True)):
            pool_id, pool, _ = grant_pool(self.hc, backend, device, pages, readonly=readonly)
            pf.pools[kind] = (pool_id, pool)
        ring, out = pf.pools["ring"][1], pf.pools["out"][1]
        refs = [ring.gref_base + 1 + i for i in range(half)] + [
            out.gref_base + i for i in range(half)
        ]
        P.DataIntf.init(ring.page(0), pf.order, refs).close()
        pf.channel = alloc_unbound(self.hc, dev.otherend_id)
        keys = {
            P.P9Key.VERSION.value: P.XEN_9PFS_PROTOCOL_VERSION,
            P.P9Key.NUM_RINGS.value: "1",
            P.ring_ref_key(0): str(ring.gref_base),
            P.event_channel_key(0): str(pf.channel.port),
        }

        dev.write_all(keys)

    def _connect(self, dev: XenbusDevice, pf: P9front) -> None:
        assert pf.channel is not None
        mine, peer = pf.channel.doorbell_names()
        if peer is None:
            raise ValueError("the backend has not bound the event channel")
        params = {
            "tag": pf.tag,
            "mountpoint": pf.mountpoint,
            "order": pf.order,
            "pools": [
                {"name": pool.name, "gref_base": pool.gref_base, "pages": pool.pages}
                for _, pool in (pf.pools["ring"], pf.pools["out"])
            ],
            "doorbells": [mine, peer],
        }
        os.makedirs(pf.mountpoint, mode=0o755, exist_ok=True)
        pf.server = FuseServer(dev, f"9pfs {pf.tag}", "domu.p9front.fs:main", params)
        pf.server.wait_mounted(pf.mountpoint)

    def _release(self, pf: P9front) -> None:
        server, pf.server = pf.server, None
        if server is not None:
            server.stop(pf.mountpoint)
        with contextlib.suppress(OSError):
            os.rmdir(pf.mountpoint)
        if pf.channel is not None:
            pf.channel.close()
            pf.channel = None
        for pool_id, pool in pf.pools.values():
            release_pool(self.hc, pool_id, pool)
        pf.pools = {}


#: The driver channels/kinds.py names this folder for.
Driver = P9frontDriver

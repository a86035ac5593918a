"""The store over the real XenStore byte ring: a domU's kernel and dom0's RingServer, in one
process, on a real shared-memory page and real doorbell semaphores (no root needed).

Only the hypercalls are stood in for: hyperd would bind the event channel at domain build and
answer ``evtchn_status`` with the two doorbells; here a small table does.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

from channels import hypercall as hc
from channels.bytering import XENSTORE_PAGE_SIZE
from channels.doorbell import create_doorbell, unlink_doorbell
from channels.evtchn import from_status
from channels.shm import attach, create_segment, unlink_segment
from channels.xs_ring import XenstoreRing
from dom0.store.core import Store
from dom0.xenstored import RingServer

_ids = itertools.count()


class FakeHypercalls:
    """evtchn_status and evtchn_close for one bound pair of ports: all a ring transport uses."""

    def __init__(self, ports: dict[int, tuple[str, str]]) -> None:
        self.ports = ports

    def call(self, op: hc.Op) -> dict[str, Any]:
        if isinstance(op, hc.EvtchnStatus):
            mine, peer = self.ports[op.port]
            return {"state": "interdomain", "doorbell": mine, "peer_doorbell": peer}
        if isinstance(op, hc.EvtchnClose):
            return {}
        raise AssertionError(f"unexpected hypercall {op.op}")


class ByteRingLink:
    """``client`` acts as ``domid`` through a xenstore ring page, exactly as a domU kernel."""

    def __init__(self, store: Store, domid: int) -> None:
        tag = f"hyper-test-xsring-{os.getpid()}-{next(_ids)}"
        self.names = (tag, f"{tag}-front", f"{tag}-back")
        create_segment(tag, XENSTORE_PAGE_SIZE)
        create_doorbell(self.names[1])
        create_doorbell(self.names[2])
        hcalls = FakeHypercalls(
            {1: (self.names[1], self.names[2]), 2: (self.names[2], self.names[1])}
        )
        self.server = RingServer(
            store,
            hcalls,
            domid,  # type: ignore[arg-type]
            {"segment": tag, "dom0_port": 2},
        )
        self.segment = attach(tag)
        evtchn = from_status(hcalls, 1)  # type: ignore[arg-type]
        self.ring = XenstoreRing(self.segment.buf, evtchn, timeout=5.0).start()
        self.client = self.ring.client

    def close(self) -> None:
        self.ring.close()
        self.server.close()
        self.segment.close()
        unlink_segment(self.names[0])
        unlink_doorbell(self.names[1])
        unlink_doorbell(self.names[2])

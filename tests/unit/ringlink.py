"""The store over the real XenStore byte ring: a domU's kernel and dom0's RingServer, in one
process, on a real shared-memory page and real doorbell semaphores (no root needed).

Only the hypercalls are stood in for: hyperd would bind the event channel at domain build and
answer ``evtchn_status`` with the two doorbells; here a small table does.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
from typing import Any

from channels import hypercall as hc
from channels.bytering import XENSTORE_PAGE_SIZE, xenstore_rings
from channels.doorbell import create_doorbell, unlink_doorbell
from channels.evtchn import from_status
from channels.shm import attach, create_segment, unlink_segment
from channels.xs_ring import XenstoreRing
from xenstored.core import Store
from xenstored.relay import relay
from xenstored.stream import StreamConnection

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
    """``client`` acts as ``domid`` through a xenstore ring page, exactly as a domU kernel does,
    and the page is served as dom0 serves it: the relay's store loop (dom0/relay.py, here in a
    thread) between the page and a socket, the store's StreamConnection on the socket."""

    def __init__(self, store: Store, domid: int) -> None:
        tag = f"hyper-test-xsring-{os.getpid()}-{next(_ids)}"
        self.names = (tag, f"{tag}-front", f"{tag}-back")
        create_segment(tag, XENSTORE_PAGE_SIZE)
        create_doorbell(self.names[1])
        create_doorbell(self.names[2])
        dom0_end, relay_end = socket.socketpair()
        self.conn = StreamConnection(store, domid, dom0_end)
        self.done = threading.Event()
        params = {
            "segment": tag,
            "doorbell": self.names[2],
            "peer_doorbell": self.names[1],
            "fd": relay_end.detach(),
        }
        self.relay = threading.Thread(
            target=relay, args=("store", params, xenstore_rings, self.done), daemon=True
        )
        self.relay.start()
        hcalls = FakeHypercalls({1: (self.names[1], self.names[2])})
        self.segment = attach(tag)
        evtchn = from_status(hcalls, 1)
        self.ring = XenstoreRing(self.segment.buf, evtchn, timeout=5.0).start()
        self.client = self.ring.client

    def close(self) -> None:
        try:
            self.ring.close()
            self.conn.close()
            self.done.wait(5.0)
            self.segment.close()
        finally:  # the names go whatever happened above
            unlink_segment(self.names[0])
            unlink_doorbell(self.names[1])
            unlink_doorbell(self.names[2])

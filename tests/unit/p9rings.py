"""One 9pfs device over real shared memory, in one process: a backend (backends/p9back's data path
and server, as its worker runs them) and the frontend's end of the same ring.

The ring is set up as p9front sets it up: a grant pool of the interface page and the ``in``
pages (read-write) and one of the ``out`` pages (read-only), real doorbells for the event
channel. Only hypercalls are stood in for (tests/unit/backend_hypercalls.py). No root needed.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading

from backends.p9back.datapath import Counters, P9Device, max_grant_pages
from backends.p9back.server import P9Server
from channels import p9fs as P
from channels.doorbell import DoorbellPair, create_doorbell, unlink_doorbell
from channels.evtchn import from_status
from channels.gnttab import GrantPool, pool_bytes
from channels.grants import DeviceGrants, GrantMapper
from channels.ring import RING_FIGURES
from channels.shm import create_segment, unlink_segment
from domu.p9front.client import P9Client
from tests.unit.backend_hypercalls import Hypercalls

FRONT = 5
_ids = itertools.count()


class P9Link:
    """``device`` serves the share at ``root_fd``; ``front_in``/``front_out`` and ``bell`` are
    the frontend's end of its ring (``client()`` makes a 9P client over them)."""

    def __init__(
        self, stack: contextlib.ExitStack, root_fd: int, *, readonly: bool = False, order: int = 2
    ) -> None:
        tag = self.tag = f"hyper-test-p9-{os.getpid()}-{next(_ids)}"
        half = 1 << order >> 1
        names = (f"{tag}-ring", f"{tag}-out")
        sizes = (1 + half, half)
        bases = (16, 16 + 1 + half)
        for name, pages in zip(names, sizes, strict=True):
            create_segment(name, pool_bytes(pages))
            stack.callback(unlink_segment, name)
        bells = (f"{tag}-b", f"{tag}-f")
        for bell in bells:
            create_doorbell(bell)
            stack.callback(unlink_doorbell, bell)
        ring = GrantPool.open(names[0], bases[0], sizes[0])
        out = GrantPool.open(names[1], bases[1], sizes[1])
        for pool, readonly_pages in ((ring, False), (out, True)):
            stack.callback(pool.close)
            for i in range(pool.pages):
                pool.grant(i, 0, readonly=readonly_pages)
        refs = [bases[0] + 1 + i for i in range(half)] + [bases[1] + i for i in range(half)]
        self.intf = P.DataIntf.init(ring.page(0), order, refs)
        stack.callback(self.intf.close)
        in_pages = self.in_pages = [ring.page(1 + i) for i in range(half)]
        out_pages = [out.page(i) for i in range(half)]
        self.front_in, self.front_out = P.flex_rings(
            self.intf, in_pages + out_pages, backend=False, name=f"{tag} front"
        )
        self.bell = DoorbellPair(bells[1], bells[0])  # the frontend's: waits on "f", rings "b"
        stack.callback(self.bell.close)
        calls = Hypercalls(list(zip(names, bases, sizes, strict=True)), bells)
        self.counters = Counters()
        grants = GrantMapper(
            calls,
            DeviceGrants(FRONT, "9pfs/0", max_grant_pages(1, order)),
            counters=self.counters,
        )
        stack.callback(grants.close)
        evtchn = from_status(calls, 1)
        stack.callback(evtchn.close)
        self.fatal: list[str] = []
        self.fatal_event = threading.Event()
        self.server = P9Server(root_fd, readonly=readonly, max_msize=P.xen_flex_ring_size(order))
        self.device = P9Device.connect(
            grants,
            [evtchn],
            [bases[0]],
            self.server,
            max_order=order,
            counters=self.counters,
            on_fatal=self._on_fatal,
            name=tag,
        )
        (path,) = self.device.rings  # its figures counted as the worker has them counted
        self.figures = memoryview(bytearray(8 * len(RING_FIGURES))).cast("Q")
        path.figures = path.late_eoi.figures = self.figures
        self.device.start()
        stack.callback(self.device.stop)
        self._stack = stack

    def _on_fatal(self, message: str) -> None:
        self.fatal.append(message)
        self.fatal_event.set()

    def client(self) -> P9Client:
        client = P9Client(self.front_in, self.front_out, self.bell, name="test client")
        self._stack.callback(client.close)
        return client

    def send_raw(self, data: bytes) -> None:
        """Write bytes into ``out`` as a frontend would (whatever they say), and ring."""
        assert self.front_out.write(data)
        self.bell.notify()

    def reply(self, timeout: float = 10.0) -> bytes:
        """The next whole reply from ``in``, waiting on the doorbell (never polling)."""
        for _ in range(int(timeout / 0.5) + 1):
            queued = self.front_in.available()
            if queued >= P.HEADER_SIZE:
                size = P.parse_header(self.front_in.peek(P.HEADER_SIZE))[0]
                if queued >= size:
                    return self.front_in.read(size)
            self.bell.wait(0.5)
        raise AssertionError("no reply")

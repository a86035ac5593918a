"""XenStore's reconnection over the real byte ring: dom0 dies, the next dom0 takes over.

The guest's client (channels/xs_ring.py) and the relay's store loop (dom0/relay.py) on a real
page and real doorbells, as in tests/unit/ringlink.py; "dom0" is a child process whose death the
first relay sees, as the relay of a real dom0 does.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import Iterator

import pytest

from channels.bytering import XENSTORE_PAGE_SIZE, xenstore_rings
from channels.doorbell import create_doorbell, unlink_doorbell
from channels.evtchn import from_status
from channels.shm import attach, create_segment, unlink_segment
from channels.xenbus import guest_rw_perms
from channels.xs import XsConnectionLost, XsError
from channels.xs_ring import XenstoreRing
from tests.unit.ringlink import FakeHypercalls
from xenstored import connect_local
from xenstored.core import Store
from xenstored.relay import relay
from xenstored.stream import StreamConnection

TIMEOUT = 10.0
DATA = "/local/domain/1/data"


class Page:
    """A domain's store page and doorbells, its guest client, and the dom0 serving it."""

    def __init__(self, store: Store) -> None:
        tag = f"hyper-test-xsreconnect-{os.getpid()}"
        self.names = (tag, f"{tag}-front", f"{tag}-back")
        create_segment(tag, XENSTORE_PAGE_SIZE)
        create_doorbell(self.names[1])
        create_doorbell(self.names[2])
        self.store = store
        self.segment = attach(tag)
        hcalls = FakeHypercalls({1: (self.names[1], self.names[2])})
        evtchn = from_status(hcalls, 1)
        self.dom0: subprocess.Popen[bytes] | None = None
        self.conn: StreamConnection | None = None
        self.serve(reconnect=False)
        self.ring = XenstoreRing(self.segment.buf, evtchn, timeout=5.0).start()
        self.client = self.ring.client

    def serve(self, reconnect: bool) -> None:
        """Start a "dom0" and its relay for the page."""
        self.dom0 = subprocess.Popen(["sleep", "600"])
        dom0_end, relay_end = socket.socketpair()
        self.conn = StreamConnection(self.store, 1, dom0_end)
        params = {
            "segment": self.names[0],
            "doorbell": self.names[2],
            "peer_doorbell": self.names[1],
            "fd": relay_end.detach(),
            "server": os.pidfd_open(self.dom0.pid),
            "reconnect": reconnect,
        }
        self.relay_done = threading.Event()
        args = ("store", params, xenstore_rings, self.relay_done)
        threading.Thread(target=relay, args=args, daemon=True).start()

    def kill_dom0(self) -> None:
        assert self.dom0 is not None and self.conn is not None
        self.dom0.kill()
        self.dom0.wait()
        self.conn.close()  # what the kernel does to a dead dom0's sockets
        assert self.relay_done.wait(TIMEOUT)

    def close(self) -> None:
        self.ring.close()
        if self.conn is not None:
            self.conn.close()
        if self.dom0 is not None and self.dom0.poll() is None:
            self.dom0.kill()
            self.dom0.wait()
        self.segment.close()
        unlink_segment(self.names[0])
        for name in self.names[1:]:
            unlink_doorbell(name)


@pytest.fixture
def page() -> Iterator[Page]:
    store = Store()
    with connect_local(store, 0) as dom0:
        dom0.client.mkdir(DATA)
        dom0.client.set_perms(DATA, guest_rw_perms(1))
    store.introduce_domain(1)
    page = Page(store)
    yield page
    page.close()


def test_a_guest_keeps_its_calls_watches_and_data_across_a_dom0_death(page: Page) -> None:
    xs = page.client
    xs.write(f"{DATA}/before", "1")
    watch = xs.watch(f"{DATA}/watched")
    assert watch.get(TIMEOUT).path == f"{DATA}/watched"  # the registration event
    open_tx = xs.transaction_start()
    xs.write(f"{DATA}/in-tx", "lost", open_tx)

    page.kill_dom0()
    during = threading.Thread(target=xs.write, args=(f"{DATA}/during", "2"))
    during.start()
    during.join(0.5)
    assert during.is_alive(), "a call waits while no store serves the page"
    page.serve(reconnect=True)
    during.join(TIMEOUT)

    assert not during.is_alive()
    assert page.ring.reconnections == 1
    assert xs.read(f"{DATA}/during") == "2" and xs.read(f"{DATA}/before") == "1"
    assert watch.get(TIMEOUT).path == f"{DATA}/watched"  # registered again: fires once
    with connect_local(page.store, 0) as dom0:
        dom0.client.write(f"{DATA}/watched", "changed")
    assert watch.get(TIMEOUT).path == f"{DATA}/watched"
    with pytest.raises(XsError) as failed:
        xs.transaction_end(open_tx)
    assert failed.value.errno_name == "EAGAIN"
    assert xs.read_optional(f"{DATA}/in-tx") is None
    xs.transaction(lambda tx: xs.write(f"{DATA}/in-tx", "kept", tx))
    assert xs.read(f"{DATA}/in-tx") == "kept"


def test_a_live_dom0_that_drops_the_connection_fails_the_guest_at_once(page: Page) -> None:
    xs = page.client
    xs.write(f"{DATA}/x", "1")
    assert page.conn is not None

    page.conn.close()  # dom0 stays alive: a deliberate drop, not a crash

    assert page.relay_done.wait(TIMEOUT)
    with pytest.raises(XsConnectionLost):
        xs.read(f"{DATA}/x")

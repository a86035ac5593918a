"""channels.stream: a peer ringing a byte-ring stream's doorbell in a tight loop.

The store relay and the console serve each domain's byte rings with a RingStream; a guest that
rings them for nothing must cost dom0 a few wakeups, as it does a backend (XSA-332).
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from channels.bytering import XENSTORE_PAGE_SIZE, ByteRing, xenstore_rings
from channels.doorbell import Doorbell, DoorbellPair, create_doorbell, unlink_doorbell
from channels.stream import RingStream
from tests.unit.backend_hypercalls import storm

LONG = 10.0  # a wait that is expected to succeed; reaching it fails the test


@dataclass
class Served:
    """A server's stream over one page, and the guest's side of the same page."""

    stream: RingStream
    received: queue.Queue[bytes]
    guest_req: ByteRing  # the guest writes requests here
    guest_rsp: ByteRing  # and reads replies here
    guest_rings: Doorbell  # the server's doorbell, as the guest rings it


@pytest.fixture
def served() -> Iterator[Served]:
    tag = f"hyper-test-stream-{uuid.uuid4().hex}"
    server_bell, guest_bell = f"{tag}-server", f"{tag}-guest"
    create_doorbell(server_bell)
    create_doorbell(guest_bell)
    page = memoryview(bytearray(XENSTORE_PAGE_SIZE))
    req, rsp = xenstore_rings(page)  # the server reads req, writes rsp
    guest_req, guest_rsp = xenstore_rings(page)
    received: queue.Queue[bytes] = queue.Queue()
    stream = RingStream(req, rsp, DoorbellPair(server_bell, guest_bell), received.put)
    stream.start()
    ringer = Doorbell(server_bell)
    yield Served(stream, received, guest_req, guest_rsp, ringer)
    stream.close()
    ringer.close()
    unlink_doorbell(server_bell)
    unlink_doorbell(guest_bell)


def test_a_doorbell_storm_with_nothing_on_the_ring_costs_a_few_wakeups(served: Served) -> None:
    rings = storm(served.guest_rings.ring, 1.0)

    assert rings > 1000
    assert served.stream.late_eoi.spurious < 64, f"{served.stream.late_eoi.spurious} wakeups"
    # A real request after the storm still arrives (within the longest slowdown, 1 s).
    served.guest_req.write(b"hello")
    served.guest_rings.ring()
    assert served.received.get(timeout=LONG) == b"hello"


def test_a_peer_that_frees_room_is_not_storming(served: Served) -> None:
    """A guest that read our replies rings to say so: that wakeup is work (the writer waits
    for that room), not a storm to slow down."""
    reply = bytes(2 * served.guest_rsp.size)  # twice what the ring holds: the writer waits
    got = bytearray()
    done = threading.Event()

    def guest_reads() -> None:
        while len(got) < 20 * len(reply) and not done.is_set():
            data = served.guest_rsp.read()
            if data:
                got.extend(data)
                served.guest_rings.ring()
            else:
                time.sleep(0.0005)

    reader = threading.Thread(target=guest_reads)
    reader.start()
    try:
        for _ in range(20):
            served.stream.send(reply, timeout=LONG)
    finally:
        reader.join(LONG)  # it ends once it has read everything
        done.set()

    assert len(got) == 20 * len(reply)
    assert served.stream.late_eoi.spurious < 10, f"{served.stream.late_eoi.spurious} wakeups"

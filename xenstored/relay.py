"""A domain's store and console rings, served from a process of its own: ``xenstored.relay:main``.

The ring pages and doorbells a domU shares are files it can open read-write, so it could also
truncate them, and whoever touches a truncated mapping faults (SIGBUS). The server of a ring
therefore never maps it: one relay process per domain moves bytes between the domain's byte
rings (xenstore-ring.txt and Xen's console interface) and sockets to its server, where the
store serves the first as that domain's connection and the console backend the second. A
hostile domU can crash its own relay, nothing else. dom0 runs one relay per domU for both rings
while the store is dom0's; with the store in a stub domain (domu/stubdom.py), that domain runs
one per domain, dom0 included, for the store ring alone, and dom0 one for the console ring.

Flow control is the sockets': the relay writes to a ring only as the guest reads it and reads
a ring only as its server takes the bytes, so a domain that never reads holds up only its own
relay.

The store page's error field tells the guest why its connection ended. The relay offers
XenStore's reconnection (``server_features``). When the store's process dies (dom0, or the
store domain), the relay sets ``XENSTORE_ERROR_COMM`` and exits; the relay the restarted server
starts for the domain (``"reconnect": true``) waits for the guest's ``connection =
XENSTORE_RECONNECT``, then zeroes the indices, clears the error and sets
``XENSTORE_CONNECTED``, as xenstored does (the guest side is channels/xs_ring.py). When a live
server drops the connection (the store dropped the domain), the relay sets
``XENSTORE_ERROR_PROTO`` and the guest's client fails at once.

Parameters arrive as one JSON object on stdin: for "store" and for "console" (either may be
absent), the segment name, our doorbell and the guest's, and the number of the inherited
socket; for "store", "reconnect" too.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from channels.bytering import (
    XENSTORE_CONNECTED,
    XENSTORE_CONNECTION_OFFSET,
    XENSTORE_ERROR_COMM,
    XENSTORE_ERROR_NONE,
    XENSTORE_ERROR_OFFSET,
    XENSTORE_ERROR_PROTO,
    XENSTORE_RECONNECT,
    XENSTORE_REQ_CONS_OFFSET,
    XENSTORE_REQ_PROD_OFFSET,
    XENSTORE_RSP_CONS_OFFSET,
    XENSTORE_RSP_PROD_OFFSET,
    XENSTORE_SERVER_FEATURE_ERROR,
    XENSTORE_SERVER_FEATURE_RECONNECTION,
    XENSTORE_SERVER_FEATURES_OFFSET,
    ByteRing,
    Word,
    console_rings,
    xenstore_rings,
)
from channels.doorbell import DoorbellPair
from channels.forkserver import Child, ChildSetup
from channels.shm import attach
from channels.stream import HEAL_TIMEOUT, RingStream, StreamClosed
from channels.waiting import readable

if TYPE_CHECKING:
    from channels.forkserver import ForkServer
    from channels.hypercall import HypercallClient
    from xenstored.core import Store
    from xenstored.stream import StreamConnection

log = logging.getLogger("relay")

#: After the store socket ends, how long to look for the server's death before calling it a
#: drop.
SERVER_EXIT_GRACE = 1.0


def relay(
    kind: str,
    params: dict[str, Any],
    rings: Callable[[memoryview], tuple[ByteRing, ByteRing]],
    done: threading.Event,
) -> None:
    """Bytes from the guest's ring to the socket and back, until either side ends."""
    segment = attach(params["segment"])
    sock = socket.socket(fileno=params["fd"])
    rx, tx = rings(segment.buf)
    evtchn = DoorbellPair(params["doorbell"], params["peer_doorbell"])
    if kind == "store":
        features = XENSTORE_SERVER_FEATURE_RECONNECTION | XENSTORE_SERVER_FEATURE_ERROR
        Word(segment.buf, XENSTORE_SERVER_FEATURES_OFFSET).set(features)
        if params.get("reconnect"):
            _take_over(segment.buf, evtchn)

    def to_dom0(data: bytes) -> None:
        try:
            sock.sendall(data)
        except OSError:
            done.set()

    stream = RingStream(rx, tx, evtchn, to_dom0, lambda exc: done.set(), name=kind)
    stream.start()
    while True:
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            break
        try:
            stream.send(data)
        except StreamClosed:
            break
    if kind == "store" and not stream.closed:
        # Tell the guest: reconnect (its server died, the next one takes over) or give up.
        died = "server" in params and _server_died(params["server"])
        code = XENSTORE_ERROR_COMM if died else XENSTORE_ERROR_PROTO
        Word(segment.buf, XENSTORE_ERROR_OFFSET).set(code)
        evtchn.notify()
    stream.close()  # a successor may serve the page: read nothing more from it
    done.set()


def _take_over(page: memoryview, evtchn: DoorbellPair) -> None:
    """Become the server of a page whose previous server died: tell the guest (its dying
    predecessor may not have), wait for its reconnection request, reset the page."""
    connection = Word(page, XENSTORE_CONNECTION_OFFSET)
    error = Word(page, XENSTORE_ERROR_OFFSET)
    if connection.get() != XENSTORE_RECONNECT:
        error.set(XENSTORE_ERROR_COMM)
        evtchn.notify()
        while connection.get() != XENSTORE_RECONNECT:
            evtchn.wait(HEAL_TIMEOUT)
    for offset in (
        XENSTORE_REQ_CONS_OFFSET,
        XENSTORE_REQ_PROD_OFFSET,
        XENSTORE_RSP_CONS_OFFSET,
        XENSTORE_RSP_PROD_OFFSET,
    ):
        Word(page, offset).set(0)
    error.set(XENSTORE_ERROR_NONE)
    connection.set(XENSTORE_CONNECTED)  # last: the guest reads the rest once it sees this
    evtchn.notify()
    log.info("took over the store connection")


def _server_died(pidfd: int) -> bool:
    """The server closes a connection it drops while staying alive; its death closes every
    one."""
    return bool(readable([pidfd], SERVER_EXIT_GRACE))


def main(argv: list[str] | None = None) -> int:
    """The entry point the server's fork server runs (no arguments: the parameters come on
    stdin)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s relay: %(message)s")
    params = json.load(sys.stdin)
    if "store" in params:
        params["store"]["server"] = os.pidfd_open(os.getppid())
    done = threading.Event()
    layouts = {"store": lambda buf: xenstore_rings(buf), "console": _console}
    for kind, layout in layouts.items():
        if kind not in params:
            continue
        threading.Thread(
            target=relay, args=(kind, params[kind], layout, done), name=kind, daemon=True
        ).start()
    done.wait()
    os._exit(0)  # no teardown over pages the guest may have broken


def _console(buf: memoryview) -> tuple[ByteRing, ByteRing]:
    in_, out = console_rings(buf)
    return out, in_  # the guest writes "out" and reads "in": we do the opposite


if __name__ == "__main__":
    sys.exit(main())


class Relay:
    """The server's handle on a domain's relay process: the store connection and the console
    socket, each None when this relay does not carry that ring."""

    def __init__(
        self,
        process: Child,
        store_conn: StreamConnection | None,
        console: socket.socket | None,
    ) -> None:
        self.process = process
        self.store_conn = store_conn
        self.console = console

    @classmethod
    def start(
        cls,
        hc: HypercallClient,
        server: ForkServer,
        domid: int,
        rings: dict[str, tuple[str, int]],
        store: Store | None = None,
        reconnect: bool = False,
    ) -> Relay:
        """Serve a domain's ``rings`` ("store" and/or "console": the segment and our port) from a
        process ``server`` forks; the store ring as a connection of ``domid`` to ``store``.
        ``reconnect``: the guest's store client is connected to the relay of a server that died,
        and this one takes over (see the module docstring)."""
        # Imported here, not at the top: the relay process itself must stay small (one per
        # domain), and these bring pydantic and the store along.
        from channels.hypercall import EvtchnStatus
        from xenstored.stream import StreamConnection

        params: dict[str, Any] = {}
        ours: dict[str, socket.socket] = {}
        theirs: list[socket.socket] = []
        for kind, (segment, port) in rings.items():
            status = hc.call(EvtchnStatus(port=port))
            mine, peer = socket.socketpair()
            ours[kind] = mine
            theirs.append(peer)
            params[kind] = {
                "segment": segment,
                "doorbell": status["doorbell"],
                "peer_doorbell": status["peer_doorbell"],
                "fd": peer.fileno(),
            }
        if "store" in params:
            params["store"]["reconnect"] = reconnect
        process = server.spawn(
            "xenstored.relay:main",
            stdin=subprocess.PIPE,
            pass_fds=[s.fileno() for s in theirs],
            setup=ChildSetup(comm="hyper-relay"),
        )
        assert process.stdin is not None
        process.stdin.write(json.dumps(params).encode())
        process.stdin.close()
        for peer in theirs:
            peer.close()
        store_conn = None
        if "store" in ours:
            assert store is not None
            store_conn = StreamConnection(store, domid, ours["store"])
        return cls(process, store_conn, ours.get("console"))

    def stop(self) -> None:
        """End the relay (its domain is gone: nobody reads the page any more)."""
        self.process.kill()
        self.process.wait()
        if self.store_conn is not None:
            self.store_conn.close()
        if self.console is not None:
            self.console.close()

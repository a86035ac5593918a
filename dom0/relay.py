"""A domain's store and console rings, served from a process of its own: ``python -m dom0.relay``.

The ring pages and doorbells a domU shares are files it can open read-write, so it could also
truncate them, and whoever touches a truncated mapping faults (SIGBUS). dom0 itself therefore
never maps them: one relay process per domU moves bytes between the domain's two byte rings
(xenstore-ring.txt and Xen's console interface) and two sockets to dom0, where the store serves
the first as that domain's connection and the console backend the second. A hostile domU can
crash its own relay, nothing else.

Flow control is the sockets': the relay writes to a ring only as the guest reads it and reads
a ring only as dom0 takes the bytes, so a domain that never reads holds up only its own relay.

The store page's error field tells the guest why its connection ended. The relay offers
XenStore's reconnection (``server_features``). When dom0 dies, the relay sets
``XENSTORE_ERROR_COMM`` and exits; the relay the restarted dom0 starts for the domain
(``"reconnect": true``) waits for the guest's ``connection = XENSTORE_RECONNECT``, then zeroes
the indices, clears the error and sets ``XENSTORE_CONNECTED``, as xenstored does (the guest
side is channels/xs_ring.py). When a live dom0 drops the connection (the store dropped the
domain), the relay sets ``XENSTORE_ERROR_PROTO`` and the guest's client fails at once.

Parameters arrive as one JSON object on stdin: for "store" and "console", the segment name, our
doorbell and the guest's, and the number of the inherited socket; for "store", "reconnect" too.
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
from dom0.spawn import spawner

if TYPE_CHECKING:
    from channels.hypercall import HypercallClient
    from xenstored.core import Store
    from xenstored.stream import StreamConnection

log = logging.getLogger("relay")

#: After the store socket ends, how long to look for dom0's death before calling it a drop.
DOM0_EXIT_GRACE = 1.0


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
        # Tell the guest: reconnect (dom0 died, the next one takes over) or give up.
        died = "dom0" in params and _dom0_died(params["dom0"])
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


def _dom0_died(pidfd: int) -> bool:
    """dom0 closes a connection it drops while staying alive; its death closes every one."""
    return bool(readable([pidfd], DOM0_EXIT_GRACE))


def main(argv: list[str] | None = None) -> int:
    """The entry point dom0's fork server runs (no arguments: the parameters come on stdin)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s relay: %(message)s")
    params = json.load(sys.stdin)
    params["store"]["dom0"] = os.pidfd_open(os.getppid())
    done = threading.Event()
    layouts = {"store": lambda buf: xenstore_rings(buf), "console": _console}
    for kind, layout in layouts.items():
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
    """dom0's handle on a domain's relay process: the store connection and the console socket."""

    def __init__(
        self, process: Child, store_conn: StreamConnection, console: socket.socket
    ) -> None:
        self.process = process
        self.store_conn = store_conn
        self.console = console

    @classmethod
    def start(
        cls,
        hc: HypercallClient,
        store: Store,
        domid: int,
        info: dict[str, Any],
        reconnect: bool = False,
    ) -> Relay:
        """Serve a domain's rings; ``reconnect``: the guest's store client is connected to
        the relay of a dom0 that died, and this one takes over (see the module docstring)."""
        # Imported here, not at the top: the relay process itself must stay small (one per
        # domain), and these bring pydantic and the store along.
        from channels.hypercall import EvtchnStatus
        from xenstored.stream import StreamConnection

        params: dict[str, Any] = {}
        ours: dict[str, socket.socket] = {}
        theirs: list[socket.socket] = []
        for kind in ("store", "console"):
            status = hc.call(EvtchnStatus(port=info[kind]["dom0_port"]))
            mine, peer = socket.socketpair()
            ours[kind] = mine
            theirs.append(peer)
            params[kind] = {
                "segment": info[kind]["segment"],
                "doorbell": status["doorbell"],
                "peer_doorbell": status["peer_doorbell"],
                "fd": peer.fileno(),
            }
        params["store"]["reconnect"] = reconnect
        process = spawner.server().spawn(
            "dom0.relay:main",
            stdin=subprocess.PIPE,
            pass_fds=[s.fileno() for s in theirs],
            setup=ChildSetup(comm="hyper-relay"),
        )
        assert process.stdin is not None
        process.stdin.write(json.dumps(params).encode())
        process.stdin.close()
        for peer in theirs:
            peer.close()
        return cls(process, StreamConnection(store, domid, ours["store"]), ours["console"])

    def stop(self) -> None:
        """End the relay (its domain is gone: nobody reads the page any more)."""
        self.process.kill()
        self.process.wait()
        self.store_conn.close()

"""A domain's store and console rings, served from a process of its own: ``python -m dom0.relay``.

The ring pages and doorbells a domU shares are files it can open read-write, so it could also
truncate them, and whoever touches a truncated mapping faults (SIGBUS). dom0 itself therefore
never maps them: one relay process per domU moves bytes between the domain's two byte rings
(xenstore-ring.txt and Xen's console interface) and two sockets to dom0, where the store serves
the first as that domain's connection and the console backend the second. A hostile domU can
crash its own relay, nothing else.

Flow control is the sockets': the relay writes to a ring only as the guest reads it and reads
a ring only as dom0 takes the bytes, so a domain that never reads holds up only its own relay.
When dom0 closes the store socket (the store dropped the domain), the relay sets the page's
error field so the guest's client fails at once.

Parameters arrive as one JSON object on stdin: for "store" and "console", the segment name, our
doorbell and the guest's, and the number of the inherited socket.
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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from channels.bytering import (
    XENSTORE_ERROR_COMM,
    XENSTORE_ERROR_OFFSET,
    ByteRing,
    Word,
    console_rings,
    xenstore_rings,
)
from channels.doorbell import DoorbellPair
from channels.shm import attach
from channels.stream import RingStream, StreamClosed

if TYPE_CHECKING:
    from channels.hypercall import HypercallClient
    from dom0.store.core import Store
    from dom0.store.stream import StreamConnection

log = logging.getLogger("relay")


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

    def to_dom0(data: bytes) -> None:
        try:
            sock.sendall(data)
        except OSError:
            done.set()

    stream = RingStream(rx, tx, evtchn, to_dom0, lambda exc: done.set(), name=kind)  # type: ignore[arg-type]
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
        error = Word(segment.buf, XENSTORE_ERROR_OFFSET)  # tell the guest: connection gone
        error.set(XENSTORE_ERROR_COMM)
        evtchn.notify()
    done.set()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s relay: %(message)s")
    params = json.load(sys.stdin)
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
        self, process: subprocess.Popen[bytes], store_conn: StreamConnection, console: socket.socket
    ) -> None:
        self.process = process
        self.store_conn = store_conn
        self.console = console

    @classmethod
    def start(cls, hc: HypercallClient, store: Store, domid: int, info: dict[str, Any]) -> Relay:
        # Imported here, not at the top: the relay process itself must stay small (one per
        # domain), and these bring pydantic and the store along.
        from channels.hypercall import EvtchnStatus
        from dom0.store.stream import StreamConnection

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
        source = str(Path(__file__).resolve().parents[1])
        process = subprocess.Popen(
            [sys.executable, "-m", "dom0.relay"],
            stdin=subprocess.PIPE,
            pass_fds=[s.fileno() for s in theirs],
            env={**os.environ, "PYTHONPATH": source},
        )
        assert process.stdin is not None
        process.stdin.write(json.dumps(params).encode())
        process.stdin.close()
        for peer in theirs:
            peer.close()
        return cls(process, StreamConnection(store, domid, ours["store"]), ours["console"])

    def stop(self) -> None:
        """Hang up on the relay; it exits when its sockets close."""
        self.store_conn.close()
        try:
            self.process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

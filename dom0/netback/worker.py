"""A vif's data path in a process of its own: ``python -m dom0.netback.worker``.

dom0 negotiates (XenBus, event-channel binding, the TAP) and then hands the data path to one
worker process per vif. Two reasons: CPython's GIL would otherwise serialise every vif's
packets through one interpreter, and the worker is the only process that touches the memory
the frontend shares, so a frontend that truncates its own pages to make the reader fault
(SIGBUS) brings down its own vif's worker, never dom0.

The worker gets, on stdin, one JSON object: the vif's name, the frontend's domid, its tx/rx ring
refs, the doorbell names of both event channels, gso, the rate limit, and the numbers of the
fds it inherited: the TAP, a control socket, and a counters page. Over the control socket it
asks dom0 to map grant pools (dom0 holds the hypercall socket) and reports a fatal protocol
error; dom0 closing the socket tells it to stop.
"""

from __future__ import annotations

import itertools
import json
import logging
import mmap
import os
import socket
import sys
import threading
from typing import Any

from channels import hypercall as hc
from channels import netif as N
from channels.evtchn import EventChannel
from channels.grants import GrantMapper
from channels.ring import BackRing
from dom0.netback.datapath import Counters, RateLimit, RxPath, TxPath

log = logging.getLogger("netback-worker")


class Dom0Link:
    """The worker's side of the control socket: a hypercall client whose calls dom0 makes."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._replies: dict[int, Any] = {}
        self._arrived = threading.Condition()
        self.closed = threading.Event()
        self._buffer = b""
        threading.Thread(target=self._read, name="dom0-link", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = self._sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            self._buffer += data
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                reply = json.loads(line)
                with self._arrived:
                    self._replies[reply["id"]] = reply
                    self._arrived.notify_all()
        self.closed.set()
        with self._arrived:
            self._arrived.notify_all()

    def _send(self, message: dict[str, Any]) -> None:
        with self._lock:
            self._sock.sendall(json.dumps(message).encode() + b"\n")

    def call(self, op: hc.Op) -> dict[str, Any]:
        """Only grant-pool mapping travels this way; the event channels are already bound."""
        if not isinstance(op, hc.GnttabMapPool):
            return {}
        req_id = next(self._ids)
        self._send({"id": req_id, "map_pool": {"granter": op.granter, "gref": op.gref}})
        with self._arrived:
            self._arrived.wait_for(lambda: req_id in self._replies or self.closed.is_set(), 10)
            reply = self._replies.pop(req_id, None)
        if reply is None:
            raise hc.HypercallError(op.op, "ENOTCONN", "dom0 is gone")
        if "error" in reply:
            raise hc.HypercallError(op.op, reply["error"], reply.get("message", ""))
        return dict(reply["result"])

    def fatal(self, message: str) -> None:
        try:
            self._send({"fatal": message})
        except OSError:
            pass


def run(params: dict[str, Any]) -> int:
    link = Dom0Link(socket.socket(fileno=params["control_fd"]))
    page = mmap.mmap(params["counters_fd"], mmap.PAGESIZE)
    counters = Counters(memoryview(page))
    grants = GrantMapper(link, params["frontend"], 0)  # type: ignore[arg-type]
    name = params["name"]
    tx_ring = BackRing.attach(
        N.TX_RING, grants.resolve(params["tx_ring_ref"], write=True), name=f"{name}-tx"
    )
    rx_ring = BackRing.attach(
        N.RX_RING, grants.resolve(params["rx_ring_ref"], write=True), name=f"{name}-rx"
    )
    channels = [
        EventChannel(link, 0, mine, peer)  # type: ignore[arg-type]
        for mine, peer in (params["tx_doorbells"], params["rx_doorbells"])
    ]
    rate = RateLimit(*params["rate"]) if params.get("rate") else None
    tx = TxPath(tx_ring, channels[0], grants, params["tap_fd"], counters, rate, link.fatal)
    rx = RxPath(rx_ring, channels[1], grants, params["tap_fd"], counters, params["gso"], link.fatal)
    tx.thread.start()
    rx.thread.start()
    link.closed.wait()  # dom0 hangs up when the vif disconnects
    tx.stopping = True
    rx.stop()
    channels[0].kick()
    for path in (tx, rx):
        path.thread.join(timeout=5.0)
    return 0


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    run(json.load(sys.stdin))
    os._exit(0)  # no interpreter teardown over shared memory a peer may have broken


if __name__ == "__main__":
    sys.exit(main())

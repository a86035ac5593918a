"""A vif's data path in a process of its own: ``python -m backends.netback.worker``.

See backends/datapath_worker.py for why and how: it opens its event channels' doorbells
(``open_channels``), drops every host privilege (backends/privilege.py), and only then maps the
pools and starts the data path (``start``). Besides the common fds and parameters, the
parameters are the vif's name, its ``queues`` (for each: its tx/rx ring refs, the doorbell
names of both its event channels and the fd of its TAP queue, ``tap_fd``; the first queue's is
``device_fd``), gso, the rate limit, the vif's ``mac`` and ``ip`` (from its backend dir) that
every transmitted frame's source is checked against, and its ``faults`` (channels/faults.py;
dom0 sends changes as settings, which fault lines apply: backends/netback/faults.py). Each
queue has its tx and rx paths (with the native pumps, one loop serves both: channels/pumps.py's
QueueLoop) and its own block of counters; the queues share the grant mapper, which maps at most
what netif can use for that many queues (``netif.MAX_GRANT_PAGES`` each).
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Callable
from typing import Any

from backends.datapath_worker import Dom0Link, ring_figures, serve_device, worker_main
from backends.netback.antispoof import SourceFilter
from backends.netback.datapath import Counters, RateLimit, RxPath, TxPath
from backends.netback.faults import FaultLine, VifFaults
from channels import netif as N
from channels import pumps
from channels.evtchn import EventChannel
from channels.grants import DeviceGrants, GrantMapper
from channels.ring import BackRing


def open_channels(params: dict[str, Any], link: Dom0Link) -> list[EventChannel]:
    """Each queue's tx and rx event channels' doorbells, in that order, opened by name before
    the worker drops privilege."""
    return [
        EventChannel(link, 0, mine, peer)
        for queue in params["queues"]
        for mine, peer in (queue["tx_doorbells"], queue["rx_doorbells"])
    ]


def start(
    channels: list[EventChannel], params: dict[str, Any], link: Dom0Link, counter_page: memoryview
) -> Callable[[], None]:
    queues = params["queues"]
    counters = Counters.blocks(counter_page, len(queues))
    # Each queue's tx ring's figures, then its rx ring's (xenbus.py names them so).
    figures = ring_figures(counter_page, len(Counters.FIELDS), len(queues), 2 * len(queues))
    device = DeviceGrants(
        params["frontend"], params["device"], N.MAX_GRANT_PAGES * len(queues), params["backend"]
    )
    grants = GrantMapper(link, device, params["pools"], counters=counters[0])
    rings = [  # every ring first: a ref the frontend did not grant fails the vif at once
        [
            BackRing.attach(kind, grants.resolve(queue[ref], write=True), name=f"{name}-{d}")
            for kind, ref, d in ((N.TX_RING, "tx_ring_ref", "tx"), (N.RX_RING, "rx_ring_ref", "rx"))
        ]
        for name, queue in zip(_names(params["name"], len(queues)), queues, strict=True)
    ]
    # A vif with a rate has one queue (its credit is the vif's): xenbus.py.
    rate = RateLimit(*params["rate"]) if params.get("rate") else None
    sources = SourceFilter.from_backend(params["mac"], params["ip"])  # checked at probe
    paths: list[tuple[TxPath, RxPath]] = []
    for q, ((tx_ring, rx_ring), queue) in enumerate(zip(rings, queues, strict=True)):
        tap_fd, tx_ch, rx_ch = queue["tap_fd"], channels[2 * q], channels[2 * q + 1]
        # One loop serves both native pumps; the tx of a vif with a rate runs in Python.
        loop = pumps.QueueLoop("netback-q") if rate is None else None
        tx = TxPath(tx_ring, tx_ch, grants, tap_fd, counters[q], rate, link.fatal, sources, loop)
        rx = RxPath(rx_ring, rx_ch, grants, tap_fd, counters[q], params["gso"], link.fatal, loop)
        for path, view in ((tx, figures[2 * q].page), (rx, figures[2 * q + 1].page)):
            path.ring.figures = path.late_eoi.figures = view
        paths.append((tx, rx))
    faults = Faults(params["name"], paths, counters)
    faults.set(params.get("faults", ""))

    def settings(changed: dict[str, Any]) -> None:
        if "faults" in changed:
            faults.set(str(changed["faults"]))

    link.on_settings = settings
    for tx, rx in paths:
        tx.thread.start()
        rx.thread.start()

    def stop() -> None:
        for pair in paths:
            for path in pair:
                path.stop()
        for pair in paths:
            for path in pair:
                path.thread.join(timeout=5.0)
        faults.stop()

    return stop


class Faults:
    """A vif's injected faults (backends/netback/faults.py): the first spec puts a fault line
    between each queue's paths and its TAP queue; later ones change what the lines do."""

    def __init__(self, name: str, paths: list[tuple[TxPath, RxPath]], counters: list[Counters]):
        self.name = name
        self.paths = paths
        self.counters = counters
        self.faults = VifFaults()
        self.lines: list[FaultLine] = []
        self._lock = threading.Lock()

    def set(self, spec: str) -> None:
        with self._lock:
            self.faults.set(spec)
            if not spec or self.lines:
                return
            for q, (tx, rx) in enumerate(self.paths):
                line = FaultLine(self.name, tx.tap_fd, self.faults, self.counters[q])
                line.start()
                tx.divert(line.tx_fd)
                rx.divert(line.rx_fd)
                self.lines.append(line)

    def stop(self) -> None:
        with self._lock:
            for line in self.lines:
                line.stop()


def _names(vif: str, queues: int) -> list[str]:
    """Each queue's name in messages: the vif's for one queue, else ``<vif>-q<n>``."""
    return [vif] if queues == 1 else [f"{vif}-q{q}" for q in range(queues)]


def main(argv: list[str]) -> int:
    """The entry point dom0's fork server runs (backends/datapath_worker.py)."""
    worker_main(functools.partial(serve_device, open_channels=open_channels, start=start))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""A vif's data path in a process of its own: ``python -m dom0.netback.worker``.

See dom0/datapath_worker.py for why and how: it opens its two event channels' doorbells
(``open_channels``), drops every host privilege (dom0/privilege.py), and only then maps the
pools and starts the data path (``start``). Besides the common fds and parameters (``device_fd``
is the TAP), the parameters are the vif's name, its tx/rx ring refs, the doorbell names of both
event channels, gso, the rate limit, and the vif's ``mac`` and ``ip`` (from its backend dir) that
every transmitted frame's source is checked against. Its grant mapper maps at most what netif
can use (``netif.MAX_GRANT_PAGES``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from channels import netif as N
from channels.evtchn import EventChannel
from channels.grants import DeviceGrants, GrantMapper
from channels.ring import BackRing
from dom0.datapath_worker import Dom0Link, serve_device, worker_main
from dom0.netback.antispoof import SourceFilter
from dom0.netback.datapath import Counters, RateLimit, RxPath, TxPath


def open_channels(params: dict[str, Any], link: Dom0Link) -> list[EventChannel]:
    """The tx and rx event channels' doorbells, opened by name before the worker drops
    privilege."""
    return [
        EventChannel(link, 0, mine, peer)  # type: ignore[arg-type]
        for mine, peer in (params["tx_doorbells"], params["rx_doorbells"])
    ]


def start(
    channels: list[EventChannel], params: dict[str, Any], link: Dom0Link, counter_page: memoryview
) -> Callable[[], None]:
    counters = Counters(counter_page)
    device = DeviceGrants(params["frontend"], params["device"], N.MAX_GRANT_PAGES)
    grants = GrantMapper(link, device, params["pools"], counters=counters)  # type: ignore[arg-type]
    name, tap_fd = params["name"], params["device_fd"]
    tx_ring = BackRing.attach(
        N.TX_RING, grants.resolve(params["tx_ring_ref"], write=True), name=f"{name}-tx"
    )
    rx_ring = BackRing.attach(
        N.RX_RING, grants.resolve(params["rx_ring_ref"], write=True), name=f"{name}-rx"
    )
    rate = RateLimit(*params["rate"]) if params.get("rate") else None
    sources = SourceFilter.from_backend(params["mac"], params["ip"])  # checked at probe
    tx = TxPath(tx_ring, channels[0], grants, tap_fd, counters, rate, link.fatal, sources)
    rx = RxPath(rx_ring, channels[1], grants, tap_fd, counters, params["gso"], link.fatal)
    tx.thread.start()
    rx.thread.start()

    def stop() -> None:
        tx.stop()
        rx.stop()
        for path in (tx, rx):
            path.thread.join(timeout=5.0)

    return stop


if __name__ == "__main__":
    worker_main(functools.partial(serve_device, open_channels=open_channels, start=start))

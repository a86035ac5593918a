"""A 9pfs device's data path in a process of its own: ``python -m backends.p9back.worker``.

See backends/datapath_worker.py for why and how: it opens its event channels' doorbells, drops
every host privilege (backends/privilege.py), and only then maps the pools and starts the data path.
Its device fd (``device_fd``) is the share's root, opened ``O_PATH | O_DIRECTORY`` by dom0.
Besides the common parameters: the device's name, each ring's ``ring_refs`` (its interface
page) and ``doorbells``, ``readonly``, ``max_order`` (the max-ring-page-order we advertised),
and, when the share belongs to a user other than root, ``share_uid``/``share_gid``: the worker
then drops to that user instead of its own worker id, so that it can write into the share and
what it creates belongs to that user (backends/p9back/xenbus.py). Its grant mapper maps at most
what its rings can use (``max_grant_pages``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from backends.datapath_worker import Dom0Link, ring_figures, serve_device, worker_main
from backends.p9back.datapath import Counters, P9Device, max_grant_pages
from backends.p9back.server import P9Server
from channels.evtchn import EventChannel
from channels.grants import DeviceGrants, GrantMapper
from channels.p9fs import xen_flex_ring_size


def open_channels(params: dict[str, Any], link: Dom0Link) -> list[EventChannel]:
    """Each ring's event channel, opened by name before the worker drops privilege."""
    return [EventChannel(link, 0, mine, peer) for mine, peer in params["doorbells"]]


def start(
    channels: list[EventChannel], params: dict[str, Any], link: Dom0Link, counter_page: memoryview
) -> Callable[[], None]:
    counters = Counters(counter_page)
    refs, order = params["ring_refs"], params["max_order"]
    device = DeviceGrants(
        params["frontend"], params["device"], max_grant_pages(len(refs), order), params["backend"]
    )
    grants = GrantMapper(link, device, params["pools"], counters=counters)
    server = P9Server(
        params["device_fd"], readonly=params["readonly"], max_msize=xen_flex_ring_size(order)
    )
    p9 = P9Device.connect(
        grants,
        channels,
        refs,
        server,
        max_order=order,
        counters=counters,
        on_fatal=link.fatal,
        name=params["name"],
    )
    for ring, figures in zip(
        p9.rings, ring_figures(counter_page, len(Counters.FIELDS), 1, len(refs)), strict=True
    ):
        ring.figures = ring.late_eoi.figures = figures.page
    p9.start()

    def stop() -> None:
        p9.stop()
        grants.close()

    return stop


def serve(params: dict[str, Any]) -> int:
    """serve_device, as the share's owner when it has one (see the module docstring)."""
    if "share_uid" in params:
        params = {**params, "worker_id": params["share_uid"], "worker_gid": params["share_gid"]}
    return serve_device(params, open_channels=open_channels, start=start)


def main(argv: list[str]) -> int:
    """The entry point dom0's fork server runs (backends/datapath_worker.py)."""
    worker_main(serve)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""A vbd's data path in a process of its own: ``python -m backends.blkback.worker``.

See backends/datapath_worker.py for why and how: it opens its event channel's doorbells
(``open_channel``), drops every host privilege (backends/privilege.py), and only then maps the pools
and starts the data path (``start``). Besides the common fds and parameters (``device_fd``
is the loop device, opened for direct I/O), the parameters are the vbd's name, its ring ref, the
event channel's doorbell names, the disk's size in sectors, whether it is read-only, and how many
I/O threads to run. Its grant mapper maps at most what blkif can use (``blkif.MAX_GRANT_PAGES``).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

from backends.blkback.datapath import Counters, VbdPath
from backends.datapath_worker import Dom0Link, ring_figures, serve_device, worker_main
from channels import blkif as B
from channels.evtchn import EventChannel
from channels.grants import DeviceGrants, GrantMapper
from channels.ring import BackRing


def open_channel(params: dict[str, Any], link: Dom0Link) -> EventChannel:
    """The event channel's doorbells, opened by name before the worker drops privilege."""
    mine, peer = params["doorbells"]
    return EventChannel(link, 0, mine, peer)


def start(
    channel: EventChannel, params: dict[str, Any], link: Dom0Link, counter_page: memoryview
) -> Callable[[], None]:
    counters = Counters(counter_page)
    device = DeviceGrants(
        params["frontend"], params["device"], B.MAX_GRANT_PAGES, params["backend"]
    )
    grants = GrantMapper(link, device, params["pools"], counters=counters)
    ring = BackRing.attach(
        B.BLK_RING, grants.resolve(params["ring_ref"], write=True), name=params["name"]
    )
    (figures,) = ring_figures(counter_page, len(Counters.FIELDS), 1, 1)
    ring.figures = figures.page
    path = VbdPath(
        ring,
        channel,
        grants,
        params["device_fd"],
        params["sectors"],
        readonly=params["readonly"],
        counters=counters,
        on_fatal=link.fatal,
        io_threads=params["io_threads"],
        faults=params.get("faults", ""),
    )
    path.late_eoi.figures = ring.figures

    def settings(changed: dict[str, Any]) -> None:
        if "faults" in changed:
            path.set_faults(str(changed["faults"]))
        if "trace" in changed:
            path.set_trace(link.send_trace if changed["trace"] else None)

    link.on_settings = settings
    path.start()
    return path.stop


def main(argv: list[str]) -> int:
    """The entry point dom0's fork server runs (backends/datapath_worker.py)."""
    worker_main(functools.partial(serve_device, open_channels=open_channel, start=start))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""A data-path worker that maps grant refs and says what it found, for test_datapath_worker.py:
``python -m`` this as a device's worker. It lives as the real ones do (``serve_device``: it drops
its privilege before it maps anything), maps the pools it is given, then resolves each of its
parameters' ``grefs`` (a ref in no pool it was given makes its mapper refresh, over the link to
dom0) and puts what it read in its counter page: ``FIELDS``, each ref's page's first 8 bytes
(0 for a ref it could not resolve), then ``done`` = 1. It serves until dom0 hangs up."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

from backends.datapath_worker import CounterPage, Dom0Link, serve_device, worker_main
from channels.gnttab import GrantError
from channels.grants import DeviceGrants, GrantMapper

MAX_REFS = 4
FIELDS = (*(f"ref{i}" for i in range(MAX_REFS)), "done")


class Found(CounterPage):
    FIELDS = FIELDS
    # Declared for type checkers (the refs are set by name): CounterPage makes each a property.
    done: int


def open_nothing(params: dict[str, Any], link: Dom0Link) -> None:
    return None


def start(_: None, params: dict[str, Any], link: Dom0Link, page: memoryview) -> Callable[[], None]:
    found = Found(page)
    device = DeviceGrants(params["frontend"], params["device"], params["max_pages"])
    grants = GrantMapper(link, device, params["pools"])
    for index, gref in enumerate(params["grefs"][:MAX_REFS]):
        try:
            first = grants.resolve(gref, write=False)[:8]
        except GrantError:
            continue
        setattr(found, FIELDS[index], int.from_bytes(first, "little"))
    found.done = 1
    return grants.close


def main(argv: list[str]) -> int:
    """What dom0's fork server runs, as it runs a real worker's main."""
    worker_main(functools.partial(serve_device, open_channels=open_nothing, start=start))
    return 0


if __name__ == "__main__":
    main(sys.argv[1:])

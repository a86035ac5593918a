"""The backend drivers in dom0, one per device kind (channels/kinds.py).

Each kind names its backend folder; its ``xenbus.py`` holds the driver class as ``Driver``.
The backend bus (channels/xenbus_bus.py) probes that driver for every backend directory the
toolstack creates, and the toolstack asks it for its devices' counters.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Protocol

from channels.hypercall import HypercallClient
from channels.kinds import KINDS, DeviceKind
from channels.xenbus_bus import Driver


class BackendDriver(Driver, Protocol):
    """What dom0 needs of a backend driver besides the bus's calls."""

    def stats(self, domid: int | None = None) -> list[dict[str, object]]: ...


def driver_class(kind: DeviceKind) -> Callable[[HypercallClient], BackendDriver]:
    module = importlib.import_module(f"dom0.{kind.backend}.xenbus")
    cls: Callable[[HypercallClient], BackendDriver] = module.Driver
    return cls


class BackendDrivers:
    """One driver instance per device kind, by XenBus device type."""

    def __init__(self, hc: HypercallClient) -> None:
        self.by_kind: dict[str, BackendDriver] = {
            kind.xenbus_type: driver_class(kind)(hc) for kind in KINDS
        }

    def by_type(self) -> dict[str, Driver]:
        return dict(self.by_kind)

    def stats(self, kind: DeviceKind, domid: int | None = None) -> list[dict[str, object]]:
        return self.by_kind[kind.xenbus_type].stats(domid)

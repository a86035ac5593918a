"""The backend drivers, one per device kind (channels/kinds.py).

Each kind names its backend folder; its ``xenbus.py`` holds the driver class as ``Driver``.
The backend bus (channels/xenbus_bus.py) probes that driver for every backend directory the
toolstack creates, and the toolstack asks it for its devices' counters.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Collection, Mapping
from typing import Protocol

from backends.datapath_worker import DataPath
from backends.host import BackendHost
from channels.kinds import KINDS, DeviceKind
from channels.xenbus_bus import Driver


class BackendDriver(Driver, Protocol):
    """What the toolstack needs of a backend driver besides the bus's calls."""

    def stats(self, domid: int | None = None) -> list[dict[str, object]]: ...

    def hand_over(self, back: Mapping[str, str]) -> int | None:
        """For a device a driver domain serves, with backend directory ``back``: the
        descriptor of the native resource dom0 opens for it here (the caller closes it once
        hyperd holds its copy, hc.DomctlLinkDevice), or None when the kind's backend opens
        nothing of the host's (a vif's TAP is made in the driver domain)."""
        ...


def driver_class(kind: DeviceKind) -> Callable[[BackendHost], BackendDriver]:
    module = importlib.import_module(f"backends.{kind.backend}.xenbus")
    cls: Callable[[BackendHost], BackendDriver] = module.Driver
    return cls


class BackendDrivers:
    """One driver instance per device kind, by XenBus device type."""

    def __init__(self, host: BackendHost, types: Collection[str] | None = None) -> None:
        """Drivers for every kind, or for the kinds of XenBus ``types`` only."""
        self.by_kind: dict[str, BackendDriver] = {
            kind.xenbus_type: driver_class(kind)(host)
            for kind in KINDS
            if types is None or kind.xenbus_type in types
        }

    def by_type(self) -> dict[str, Driver]:
        return dict(self.by_kind)

    def stats(self, kind: DeviceKind, domid: int | None = None) -> list[dict[str, object]]:
        return self.by_kind[kind.xenbus_type].stats(domid)

    def hand_over(self, kind: DeviceKind, back: Mapping[str, str]) -> int | None:
        return self.by_kind[kind.xenbus_type].hand_over(back)

    def data_path(self, kind: DeviceKind, domid: int, devid: int) -> DataPath | None:
        """The data path of a device this backend serves (None for a kind without one that
        can be asked, or a device it does not serve): for a trace."""
        driver = self.by_kind.get(kind.xenbus_type)
        find = getattr(driver, "data_path", None)
        return find(domid, devid) if find is not None else None

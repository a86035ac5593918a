"""The frontend drivers of a domU, one per device kind (channels/kinds.py).

Each kind names its frontend folder; its ``xenbus.py`` holds the driver class as ``Driver``.
The frontend bus (channels/xenbus_bus.py) probes that driver for every device directory the
toolstack creates.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from channels.hypercall import HypercallClient
from channels.kinds import KINDS, DeviceKind
from channels.xenbus_bus import Driver


def driver_class(kind: DeviceKind) -> Callable[[HypercallClient], Driver]:
    module = importlib.import_module(f"domu.{kind.frontend}.xenbus")
    cls: Callable[[HypercallClient], Driver] = module.Driver
    return cls


#: Imported with this module, so before the kernel forks its init: importing a driver after the
#: fork would allocate (and collect) in the kernel and unshare pages the init still shares.
DRIVER_CLASSES = {kind.xenbus_type: driver_class(kind) for kind in KINDS}


def frontend_drivers(hc: HypercallClient) -> dict[str, Driver]:
    return {name: cls(hc) for name, cls in DRIVER_CLASSES.items()}

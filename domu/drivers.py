"""The frontend drivers of a domU, by XenBus device type ("vif", "vbd", ...).

Adding a device kind means one folder with its frontend and one entry here; the frontend bus
(channels/xenbus_bus.py) probes the driver for every device directory the toolstack creates.
"""

from __future__ import annotations

from channels.hypercall import HypercallClient
from channels.xenbus_bus import Driver
from domu.blkfront.xenbus import BlkfrontDriver
from domu.netfront.xenbus import NetfrontDriver


def frontend_drivers(hc: HypercallClient) -> dict[str, Driver]:
    return {"vif": NetfrontDriver(hc), "vbd": BlkfrontDriver(hc)}

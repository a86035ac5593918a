"""The backend drivers in dom0, by XenBus device type ("vif", "vbd", ...).

Adding a device kind means one folder with its backend and one entry here; the backend bus
(channels/xenbus_bus.py) probes the driver for every backend directory the toolstack creates.
"""

from __future__ import annotations

from channels.hypercall import HypercallClient
from dom0.blkback.xenbus import BlkbackDriver
from dom0.netback.xenbus import NetbackDriver


class BackendDrivers:
    """One driver instance per device type; the toolstack asks them for device statistics."""

    def __init__(self, hc: HypercallClient) -> None:
        self.netback = NetbackDriver(hc)
        self.blkback = BlkbackDriver(hc)

    def by_type(self) -> dict[str, object]:
        return {"vif": self.netback, "vbd": self.blkback}

"""The backend drivers in dom0, by XenBus device type ("vif", "vbd", ...).

Adding a device kind means one folder with its backend and one entry here; the backend bus
(channels/xenbus_bus.py) probes the driver for every backend directory the toolstack creates.
"""

from __future__ import annotations

from channels.xenbus_bus import Driver

BACKEND_DRIVERS: dict[str, Driver] = {}

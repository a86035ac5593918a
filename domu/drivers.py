"""The frontend drivers of a domU, by XenBus device type ("vif", "vbd", ...).

Adding a device kind means one folder with its frontend and one entry here; the frontend bus
(channels/xenbus_bus.py) probes the driver for every device directory the toolstack creates.
"""

from __future__ import annotations

from channels.xenbus_bus import Driver

FRONTEND_DRIVERS: dict[str, Driver] = {}

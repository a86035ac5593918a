"""Where the backends run: what differs between dom0 and a driver domain, handed to each
backend driver when it is made (backends/drivers.py).

dom0 makes one with its hypercall socket and its fork server (dom0/main.py). The drivers make
their hypercalls through ``hc`` and start each device's data-path worker from ``spawner``'s
fork server (backends/datapath_worker.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from channels.forkserver import Spawner
from channels.hypercall import HypercallClient


@dataclass(frozen=True)
class BackendHost:
    hc: HypercallClient
    spawner: Spawner  # whose fork server starts the data-path workers

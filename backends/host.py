"""Where the backends run: what differs between dom0 and a driver domain, handed to each
backend driver when it is made (backends/drivers.py).

dom0 makes one with its hypercall socket and its fork server (dom0/main.py), and keeps the
defaults: its workers take host ids from dom0's table and their frontend's host gid, the
bridges it makes are the host's, whose firewall must let their frames through, and its backends
open the images they serve. A driver domain (domu/kernel.py) hands ids inside its own user
namespace, its own group (which the objects it shares with its guests name,
hyperd/resources.py), bridges in its own network namespace, and disks that dom0 opened and
hyperd hands over (``handed``): it opens no image itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from backends.privilege import WorkerIds, worker_ids
from channels.forkserver import Spawner
from channels.hypercall import HypercallClient
from channels.ids import host_gid


@dataclass(frozen=True)
class BackendHost:
    hc: HypercallClient
    spawner: Spawner  # whose fork server starts the data-path workers
    domid: int = 0  # the domain the backends run in: the grantee of the pages they map
    #: the uids the workers run as, one each
    worker_ids: WorkerIds = field(default_factory=lambda: worker_ids)
    #: a worker's gid, given its frontend's domid: one that opens the device's doorbells
    worker_gid: Callable[[int], int] = host_gid
    #: the bridges made are the host's: frames between their ports need the FORWARD rule
    #: (backends/netback/firewall.py)
    firewall: bool = True
    #: ``handed(frontend, device)``: the descriptor of the native resource dom0 opened for a
    #: device this domain serves (a vbd's loop device), taken from hyperd once
    #: (hc.DeviceTakeFd); None in dom0, whose backends open their resources themselves
    handed: Callable[[int, str], int] | None = None

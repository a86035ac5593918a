"""A driver domain's backends: the drivers dom0 runs (backends/), run by this domain's kernel
to serve devices of other domains, as Xen lets any domain that holds a device (issue 15).

The toolstack lists the kinds a domain serves in its config (``backends: [vif]``), gives it a
backend directory in the store (``/local/domain/<domid>/backend``, its own), and writes there
the backend half of each device a guest's config points at it; hyperd lets the guest and this
domain share that device's channels and pools, and nothing else (hyperd/devlinks.py). The
kernel then runs a backend bus over that directory, with the drivers of those kinds alone.

Host interfaces its config lists in ``nics`` are in its network namespace before it runs (hyperd
moves them there as it boots, hyperd/nics.py); ``attach_nics`` puts each on its bridge.

Everything the drivers need of the host, they find in the domain or are handed: the TAPs and
the bridges in its own network namespace (whose empty firewall needs no rule); each disk as the
descriptor of a loop device dom0 attached with its own checks and hyperd handed over
(``take_handed``), so that it opens no image and sees none but the ones it serves; each
data-path worker forked by
the kernel's fork server and dropped to a uid of its own inside the domain's user namespace,
with the domain's own group, the one the objects its guests share with it name. So a worker a
guest subverts reaches what the driver domain reaches, every guest it serves included, as a
subverted netback in a Xen driver domain would: the guests it serves trust it, as they trust
dom0 otherwise; nothing else does (hyperd/devlinks.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from pyroute2 import IPRoute

from backends.drivers import BackendDrivers
from backends.host import BackendHost
from backends.netback.tap import ensure_bridge
from backends.privilege import WorkerIds
from channels import xenbus
from channels.hypercall import DeviceTakeFd, HypercallClient
from channels.ids import ID_RANGE, WORKLOAD_UID
from channels.kinds import BY_TYPE
from channels.xenbus_bus import Bus
from channels.xs import XsClient
from domu import spawn

#: Worker uids inside the domain: past its workload's (channels/ids.py), up to its range's end.
WORKER_ID_BASE = 2 * WORKLOAD_UID


def worker_modules(types: Sequence[str]) -> list[str]:
    """What the kernel's fork server must preload to start the workers of ``types``."""
    return [f"backends.{BY_TYPE[devtype].backend}.worker" for devtype in types]


def attach_nics(nics: Sequence[dict[str, str]]) -> None:
    """The host interfaces hyperd moved into our namespace (``nics``: ``{name, bridge}``), each
    up on its bridge, made if missing: the one the guests' vifs on it name."""
    with IPRoute() as ipr:
        for nic in nics:
            master = ensure_bridge(ipr, nic["bridge"], firewall_rule=False)
            index = ipr.link_lookup(ifname=nic["name"])[0]
            ipr.link("set", index=index, master=master, state="up")


def take_handed(hc: HypercallClient, frontend: int, device: str) -> int:
    """The descriptor dom0 opened for ``device`` of ``frontend`` (a vbd's loop device), which
    hyperd held for us: ours from now on."""
    _, fd = hc.take_fd(DeviceTakeFd(frontend=frontend, device=device))
    return fd


def start_backends(xs: XsClient, hc: HypercallClient, domid: int, types: Sequence[str]) -> Bus:
    """The backend bus over this domain's backend directory, with the drivers of ``types``."""
    host = BackendHost(
        hc,
        spawn.spawner,
        domid,
        worker_ids=WorkerIds(WORKER_ID_BASE, ID_RANGE - WORKER_ID_BASE),
        worker_gid=lambda frontend: 0,  # the domain's own group (backends/privilege.py)
        firewall=False,
        handed=lambda frontend, device: take_handed(hc, frontend, device),
    )
    drivers = BackendDrivers(host, types)
    return Bus(xs, xenbus.backend_root_path(domid), "backend", drivers.by_type()).start()

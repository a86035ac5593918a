"""`hyperctl cleanup`: remove whatever a killed hypervisor left on the host.

Safe to run at any time: it refuses while a hyperd holds its pidfile lock (use `hyperctl halt`
for a live one). It kills every process in hyper's cgroups (dom0, domain kernels, workloads),
removes the cgroups, unlinks hyper's shared memory and semaphores, deletes the network
interfaces dom0 made, and removes the runtime directory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from channels.errors import HyperError
from channels.paths import RunDir
from hyperd import cgroup, keeper
from hyperd.resources import leftovers, remove


class HypervisorRunning(HyperError):
    pass


def _remove_interfaces() -> Iterator[str]:
    from pyroute2 import IPRoute

    from backends.netback import firewall
    from backends.netback.tap import remove_our_bridges

    with IPRoute() as ipr:
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME") or ""
            if name.startswith("vif") and "." in name:
                ipr.link("del", index=link["index"])
                yield f"removed interface {name}"
    for bridge in remove_our_bridges():
        yield f"removed bridge {bridge}"
    for bridge in firewall.revoke_all():  # a bridge removed by hand left its rule
        yield f"removed the firewall rule of bridge {bridge}"


def cleanup(run: RunDir) -> Iterator[str]:
    if run.hyperd_alive():
        raise HypervisorRunning("a hypervisor is running; use `hyperctl halt` to stop it")
    # The fd keeper outlives a killed hyperd on purpose (hyperd/keeper.py): end it first, so
    # that no domain's hypercall socket stays open.
    pid = keeper.stop(run.keeper_socket)
    if pid is not None:
        yield f"stopped the fd keeper (pid {pid})"
    try:
        hierarchy = cgroup.open_hierarchy()
    except cgroup.CgroupError as exc:
        yield f"cgroups: {exc}"
    else:
        for name in hierarchy.list():
            yield f"removing cgroup {name} and its processes"
        hierarchy.remove_all()
    for path in leftovers():
        if not os.path.lexists(path):
            continue  # gone with its directory
        problem = remove(path)
        yield f"cannot remove {problem}" if problem else f"removed {path}"
    yield from _remove_interfaces()
    if run.root.exists():
        run.remove()
        yield f"removed {run.root}"

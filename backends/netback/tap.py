"""netback's native network driver: TAP devices and the bridges they join (pyroute2), in the
network namespace of the domain that runs the backend (dom0's is the host's).

A vif's backend side is the TAP ``vif<domid>.<devid>``: opened on /dev/net/tun (channels/tun.py),
which creates it, then enslaved to its bridge and brought up through netlink, with no IPv6 of
its own (``no_ipv6``). A bridge hyper creates floods multicast instead of snooping it: like its
TAPs, it says nothing of its own on the wire. A bridge hyper
creates is marked by an alias so that it is removed with its last vif (and by `hyperctl
cleanup`), and, on the host, frames between its ports are let through the host's firewall
(backends/netback/firewall.py; a driver domain's own namespace has no such policy); a bridge
that already existed is used as found and never removed.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from backends.netback import firewall
from channels.errors import HyperError
from channels.tun import open_tap

log = logging.getLogger(__name__)

OURS = "hyper-bridge"  # the IFLA_IFALIAS of bridges hyper created
TAP_BUSY_WAIT = 5.0
_bridge_lock = threading.Lock()


class TapError(HyperError):
    pass


def vif_name(domid: int, devid: int) -> str:
    return f"vif{domid}.{devid}"


def _index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def ensure_bridge(ipr: IPRoute, name: str, firewall_rule: bool = True) -> int:
    index = _index(ipr, name)
    if index is None:
        try:
            # A plain switch: it floods multicast rather than snooping it, so it never sends
            # IGMP or MLD reports of its own (a snooping bridge joins the all-snoopers groups).
            ipr.link("add", ifname=name, kind="bridge", br_mcast_snooping=0)
        except NetlinkError as exc:
            if exc.code != 17:  # EEXIST: another vif made it first
                raise TapError(f"bridge {name}: {exc}") from exc
        index = _index(ipr, name)
        assert index is not None
        no_ipv6(name)
        ipr.link("set", index=index, ifalias=OURS, state="up")
        if firewall_rule:
            firewall.allow(name)
        log.info("created bridge %s", name)
    return index


def no_ipv6(name: str) -> None:
    """No IPv6 on interface ``name`` (a TAP, a bridge hyper made), set before it comes up: a
    bridge port or an address-less bridge has no use for a link-local address, and would
    otherwise send router solicitations and MLD reports of its own into every guest's vif (as
    a wire would carry a switch's chatter). Skipped where the kernel has no IPv6."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as knob:
            knob.write("1")
    except FileNotFoundError:
        pass


def create_tap(domid: int, devid: int, bridge: str, mtu: int, firewall_rule: bool = True) -> int:
    """Create the TAP of a vif on ``bridge`` (made, with the host's ``firewall_rule``, if it
    does not exist); returns the fd of its first queue."""
    name = vif_name(domid, devid)
    fd = _open_when_free(name)
    try:
        with _bridge_lock, IPRoute() as ipr:
            master = ensure_bridge(ipr, bridge, firewall_rule)
            index = _index(ipr, name)
            assert index is not None
            no_ipv6(name)
            ipr.link("set", index=index, mtu=mtu, master=master, state="up")
    except (NetlinkError, OSError, TapError) as exc:
        os.close(fd)
        raise TapError(f"{name}: {exc}") from exc
    return fd


def add_queue(domid: int, devid: int) -> int:
    """One more queue of the vif's TAP (which the caller holds open); its fd."""
    try:
        return open_tap(vif_name(domid, devid))
    except OSError as exc:
        raise TapError(f"{vif_name(domid, devid)}: a queue: {exc}") from exc


def _open_when_free(name: str, wait: float = TAP_BUSY_WAIT) -> int:
    """Create TAP ``name``. While a TAP of that name still exists (the worker of a dom0 that
    died a moment ago, exiting, holds its queues: the kernel removes it with the last), wait
    for it to go, up to ``wait`` seconds: opening it would attach a queue to the old device."""
    deadline = time.monotonic() + wait
    with IPRoute() as ipr:
        while _index(ipr, name) is not None:
            if time.monotonic() > deadline:
                raise TapError(f"{name}: still held by another process after {wait:.0f} s")
            time.sleep(0.05)
    try:
        return open_tap(name)
    except OSError as exc:
        raise TapError(f"{name}: {exc}") from exc


def destroy_tap(
    fds: list[int], domid: int, devid: int, bridge: str, firewall_rule: bool = True
) -> None:
    """Close the TAP's queues (the kernel removes it with the last) and the bridge if hyper
    made it and it is empty."""
    for fd in fds:
        os.close(fd)
    with _bridge_lock, IPRoute() as ipr:
        index = _index(ipr, bridge)
        if index is None:
            return
        link = ipr.get_links(index)[0]
        if link.get_attr("IFLA_IFALIAS") != OURS:
            return
        ports = [p for p in ipr.get_links() if p.get_attr("IFLA_MASTER") == index]
        if not ports:
            ipr.link("del", index=index)
            if firewall_rule:
                firewall.revoke(bridge)
            log.info("removed bridge %s", bridge)


def remove_our_bridges() -> list[str]:
    """For cleanup: every bridge hyper created, whatever is still on it, and its firewall
    rule."""
    removed = []
    with IPRoute() as ipr:
        for link in ipr.get_links():
            if link.get_attr("IFLA_IFALIAS") == OURS:
                ipr.link("del", index=link["index"])
                removed.append(link.get_attr("IFLA_IFNAME"))
    for bridge in removed:
        firewall.revoke(bridge)
    return removed

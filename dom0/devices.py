"""Device directories in the store: the toolstack's half of every XenBus handshake.

Adding a device writes, in one transaction, the frontend directory in the domU's home and the
backend directory in the backend domain's home, pointing at each other, both in state
Initialising, with the permissions of xen-split-driver.md §6.6: each side owns its directory
and the other may read it. Removing a device asks the backend to close (``online`` = 0, state
Closing), waits for it to reach Closed, then removes both directories, as libxl does.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from channels import xenbus
from channels.xenbus import XenbusState
from channels.xs import Perm, XsClient


@dataclass(frozen=True)
class DevicePaths:
    frontend: str
    backend: str


def device_paths(domid: int, backend_domid: int, devtype: str, devid: int) -> DevicePaths:
    return DevicePaths(
        xenbus.frontend_path(domid, devtype, devid),
        xenbus.backend_path(backend_domid, devtype, domid, devid),
    )


def add_device(
    xs: XsClient,
    domid: int,
    backend_domid: int,
    devtype: str,
    devid: int,
    front: Mapping[str, str] | None = None,
    back: Mapping[str, str] | None = None,
) -> DevicePaths:
    paths = device_paths(domid, backend_domid, devtype, devid)
    front_entries = {
        "backend": paths.backend,
        "backend-id": str(backend_domid),
        "state": str(int(XenbusState.Initialising)),
        **(front or {}),
    }
    back_entries = {
        "frontend": paths.frontend,
        "frontend-id": str(domid),
        "online": "1",
        "state": str(int(XenbusState.Initialising)),
        **(back or {}),
    }

    def write(tx: object) -> None:
        for base, entries, perms in (
            (paths.frontend, front_entries, [Perm(domid, "n"), Perm(backend_domid, "r")]),
            (paths.backend, back_entries, [Perm(backend_domid, "n"), Perm(domid, "r")]),
        ):
            tx.write(base, "")  # type: ignore[attr-defined]
            tx.set_perms(base, perms)  # type: ignore[attr-defined]
            for key, value in entries.items():
                path = xenbus.join_path(base, key)
                tx.write(path, value)  # type: ignore[attr-defined]
                tx.set_perms(path, perms)  # type: ignore[attr-defined]

    xs.transaction(write)
    return paths


def backend_state(xs: XsClient, paths: DevicePaths) -> XenbusState:
    value = xs.read_optional(xenbus.join_path(paths.backend, "state"))
    try:
        return XenbusState(int(value or 0))
    except ValueError:
        return XenbusState.Unknown


def remove_device(xs: XsClient, paths: DevicePaths, timeout: float = 10.0) -> bool:
    """Close the device and remove both directories; False if the backend did not reach
    Closed in time (the directories are removed anyway, as `xl ... -detach --force` would)."""
    closed = True
    if backend_state(xs, paths) not in (XenbusState.Closed, XenbusState.Unknown):

        def close(tx: object) -> None:
            tx.write(xenbus.join_path(paths.backend, "online"), "0")  # type: ignore[attr-defined]
            tx.write(  # type: ignore[attr-defined]
                xenbus.join_path(paths.backend, "state"), str(int(XenbusState.Closing))
            )

        xs.transaction(close)
        watch = xs.watch(xenbus.join_path(paths.backend, "state"))
        try:
            deadline = time.monotonic() + timeout
            while backend_state(xs, paths) not in (XenbusState.Closed, XenbusState.Unknown):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    closed = False
                    break
                try:
                    watch.get(remaining)
                except TimeoutError:
                    closed = False
                    break
        finally:
            watch.unwatch()
    xs.rm(paths.backend)
    xs.rm(paths.frontend)
    return closed

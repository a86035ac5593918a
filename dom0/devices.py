"""Devices in the store: the toolstack's half of every XenBus handshake, for every kind.

Adding a device writes, in one transaction, the frontend directory in the domU's home and the
backend directory in the backend domain's home, pointing at each other, both in state
Initialising, with the permissions of xen-split-driver.md §6.6: each side owns its directory
and the other may read it. Removing a device asks the backend to close (``online`` = 0, state
Closing), waits for it to reach Closed, then removes both directories, as libxl does.

``Devices`` is the toolstack's one code path for every kind in channels/kinds.py: adding a
domain's devices, attaching, detaching, listing and counting them, and waiting until one is
connected. Nothing here names a kind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from channels import images, xenbus
from channels.config import DOM0_DOMID, DomainConfig
from channels.errors import BadInput, HyperError, NotFound
from channels.kinds import KINDS, DeviceKind
from channels.xenbus import XenbusState
from channels.xs import Perm, Transaction, XsClient, XsError

log = logging.getLogger(__name__)
#: Where a device's fault spec lives in its backend directory (channels/faults.py).
FAULTS_NODE = "faults"


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

    def write(tx: Transaction) -> None:
        _write_dir(tx, paths.frontend, front_entries, _front_perms(domid, backend_domid))
        _write_backend(tx, paths, domid, backend_domid, back)

    xs.transaction(write)
    return paths


def move_device(
    xs: XsClient,
    domid: int,
    backend_domid: int,
    devtype: str,
    devid: int,
    back: Mapping[str, str] | None = None,
) -> DevicePaths:
    """Serve a device by ``backend_domid`` from now on, keeping its frontend directory and what
    the frontend wrote there (its ring refs, its event channels, its state): in one transaction,
    the new backend's directory, and the frontend's ``backend`` and ``backend-id`` naming it,
    with every node of the frontend's readable by it and no longer by the old one. The frontend
    takes the new backend's InitWait for a restart's (channels/xenbus_bus.py's ``moved``)."""
    paths = device_paths(domid, backend_domid, devtype, devid)
    perms = _front_perms(domid, backend_domid)

    def write(tx: Transaction) -> None:
        tx.write(xenbus.join_path(paths.frontend, "backend"), paths.backend)
        tx.write(xenbus.join_path(paths.frontend, "backend-id"), str(backend_domid))
        for node in _subtree(tx, paths.frontend):  # a vif's queue-<n>/ keys included
            tx.set_perms(node, perms)
        _write_backend(tx, paths, domid, backend_domid, back)

    xs.transaction(write)
    return paths


def _subtree(tx: Transaction, path: str) -> Iterator[str]:
    """``path`` and every node below it."""
    yield path
    for child in tx.directory(path):
        yield from _subtree(tx, xenbus.join_path(path, child))


def _front_perms(domid: int, backend_domid: int) -> list[Perm]:
    return [Perm(domid, "n"), Perm(backend_domid, "r")]


def _write_backend(
    tx: Transaction,
    paths: DevicePaths,
    domid: int,
    backend_domid: int,
    back: Mapping[str, str] | None,
) -> None:
    entries = {
        "frontend": paths.frontend,
        "frontend-id": str(domid),
        "online": "1",
        "state": str(int(XenbusState.Initialising)),
        **(back or {}),
    }
    _write_dir(tx, paths.backend, entries, [Perm(backend_domid, "n"), Perm(domid, "r")])


def _write_dir(tx: Transaction, base: str, entries: Mapping[str, str], perms: list[Perm]) -> None:
    """A device directory and its entries, each with ``perms`` (xen-split-driver.md §6.6)."""
    tx.write(base, "")
    tx.set_perms(base, perms)
    for key, value in entries.items():
        path = xenbus.join_path(base, key)
        tx.write(path, value)
        tx.set_perms(path, perms)


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

        def close(tx: Transaction) -> None:
            tx.write(xenbus.join_path(paths.backend, "online"), "0")
            tx.write(xenbus.join_path(paths.backend, "state"), str(int(XenbusState.Closing)))

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
    for path in (paths.backend, paths.frontend):
        rm_if_there(xs, path)  # a driver domain's backend directory went with its home
    return closed


def rm_if_there(xs: XsClient, path: str) -> None:
    """Remove ``path``, which may be gone already, parent and all (the store's ENOENT)."""
    try:
        xs.rm(path)
    except XsError as exc:
        if exc.errno_name != "ENOENT":
            raise


#: How often a rollback looks whether the backends have released a domain's devices.
RELEASE_POLL = 0.02


class Images:
    """Disk images a request creates (sparse, when missing and a size is given, with any
    missing directory), so that a request that fails removes exactly what it made."""

    def __init__(self, source: str, owner: int) -> None:
        self.source = source
        self.owner = owner
        self.created: list[Path] = []

    def create(self, field: str, target: Path, size: int | None) -> None:
        if size is None:
            return
        try:
            self.created += images.create(target, size, self.owner)
        except images.ImageError as exc:
            self.remove_created()
            # The path changed since it was validated: as bad as a config error.
            raise BadInput("cannot create image", [f"{self.source}: {field}: {exc}"]) from exc

    def remove_created(self) -> None:
        images.remove(self.created)
        self.created = []


#: ``link(frontend, backend, device, linked, fd)``: tell hyperd that domU ``backend`` serves (or
#: no longer serves) ``device`` of ``frontend``, handing it ``fd`` if not None
#: (hc.DomctlLinkDevice; hyperd/devlinks.py).
Link = Callable[[int, int, str, bool, int | None], None]
#: ``hand_over(kind, back)``: the descriptor dom0 opens for a device a driver domain serves,
#: given its backend keys, or None (backends/drivers.py).
HandOver = Callable[[DeviceKind, Mapping[str, str]], int | None]


class Devices:
    """Every kind's devices, through the kind table; ``stats`` asks dom0's backend of a kind,
    ``backend_domid`` turns a config's ``backend`` (a domid or a name) into a domid, ``link``
    tells hyperd which driver domain serves which device, handing it what ``hand_over``
    opens."""

    def __init__(
        self,
        xs: XsClient,
        stats: Callable[[DeviceKind, int | None], list[dict[str, object]]],
        backend_domid: Callable[[int | str], int],
        link: Link,
        hand_over: HandOver,
    ) -> None:
        self.xs = xs
        self._stats = stats
        self._backend_domid = backend_domid
        self._link = link
        self._hand_over = hand_over

    def ids(self, domid: int, kind: DeviceKind) -> list[int]:
        try:
            names = self.xs.directory(xenbus.device_type_path(domid, kind.xenbus_type))
        except XsError:
            return []
        return sorted(int(name) for name in names if name.isdecimal())

    def add(self, domid: int, kind: DeviceKind, entry: Any, devid: int, owner: int) -> DevicePaths:
        """Write the device's two directories; a driver domain's link first, so that the
        frontend may share its channels and pools with it as soon as it sees them, with what
        dom0 opens for its backend (a vbd's loop device: the driver domain opens no image)."""
        front, back = kind.store_keys(entry, devid, owner)
        backend = self._backend_domid(entry.backend)
        self.xs.write(_served_by(domid, kind, devid), str(backend))
        try:
            if backend != DOM0_DOMID:
                self._link_handing_over(domid, backend, kind, devid, back)
            return add_device(self.xs, domid, backend, kind.xenbus_type, devid, front, back)
        except (XsError, HyperError):
            self._unserve(domid, kind, devid)
            raise

    def _link_handing_over(
        self, domid: int, backend: int, kind: DeviceKind, devid: int, back: Mapping[str, str]
    ) -> None:
        fd = self._hand_over(kind, back)
        try:
            self._link(domid, backend, xenbus.device_name(kind.xenbus_type, devid), True, fd)
        finally:
            if fd is not None:
                os.close(fd)  # hyperd holds its own copy now, or the link failed

    def _unserve(self, domid: int, kind: DeviceKind, devid: int) -> None:
        """Forget which domain serves a device that is gone (``add``'s record and link)."""
        backend = self.backend_of(domid, kind, devid)
        if backend != DOM0_DOMID:
            self._link(domid, backend, xenbus.device_name(kind.xenbus_type, devid), False, None)
        rm_if_there(self.xs, _served_by(domid, kind, devid))

    def reattach(
        self, domid: int, config: DomainConfig, owner: int, driver: str, driver_domid: int
    ) -> list[str]:
        """A driver domain named ``driver`` came (back) as ``driver_domid``: each device of
        ``domid``'s config whose ``backend`` names it, and whose directories name another domain
        (one that died: its guests' devices paused with it), is moved to the new one, with the
        MAC it had (``move_device``): the frontend replays on the rings, channels and pools it
        has, which hyperd hands the new backend (hyperd/evtchn.py). The devices' names."""
        done = []
        for kind, entry, devid in configured(config):
            front = xenbus.frontend_path(domid, kind.xenbus_type, devid)
            if entry.backend != driver or self.xs.read_optional(front) is None:
                continue
            old = self.paths(domid, kind, devid)
            if self.backend_of(domid, kind, devid) == driver_domid:
                continue
            mac = self.xs.read_optional(xenbus.join_path(front, "mac"))
            if mac and "mac" in type(entry).model_fields and entry.mac is None:
                entry = entry.model_copy(update={"mac": mac})
            name = xenbus.device_name(kind.xenbus_type, devid)
            try:
                self._move(domid, kind, entry, devid, owner, driver_domid)
            except (HyperError, XsError) as exc:  # this device waits on; the others are tried
                log.warning("dom%d: %s stays paused: %s", domid, name, exc)
                continue
            rm_if_there(self.xs, old.backend)  # went with the dead domain's home, as a rule
            done.append(name)
        return done

    def _move(
        self, domid: int, kind: DeviceKind, entry: Any, devid: int, owner: int, backend: int
    ) -> None:
        """Serve a device by ``backend`` from now on (``move_device``), handing it what dom0
        opens for it; the link undone if the move fails."""
        _, back = kind.store_keys(entry, devid, owner)
        self._link_handing_over(domid, backend, kind, devid, back)
        try:
            move_device(self.xs, domid, backend, kind.xenbus_type, devid, back)
        except XsError:
            self._link(domid, backend, xenbus.device_name(kind.xenbus_type, devid), False, None)
            raise
        self.xs.write(_served_by(domid, kind, devid), str(backend))

    def backend_of(self, domid: int, kind: DeviceKind, devid: int) -> int:
        """The domain serving a device, as the toolstack recorded it where only dom0 reads and
        writes (never the frontend directory's ``backend-id``, which the guest may rewrite);
        dom0 for a device recorded nowhere."""
        value = self.xs.read_optional(_served_by(domid, kind, devid))
        return int(value) if value is not None and value.isdecimal() else DOM0_DOMID

    def recorded(self, domid: int) -> list[DevicePaths]:
        """Every device of ``domid``'s that ``add`` recorded and nothing removed since: what
        its directories are, read from dom0's records (``_served_by``), which outlive the
        domain's home."""
        found = []
        for kind in KINDS:
            try:
                devids = self.xs.directory(_records(domid, kind))
            except XsError:
                continue  # none of this kind
            found += [self.paths(domid, kind, int(d)) for d in devids if d.isdecimal()]
        return found

    def paths(self, domid: int, kind: DeviceKind, devid: int) -> DevicePaths:
        return device_paths(domid, self.backend_of(domid, kind, devid), kind.xenbus_type, devid)

    def add_all(self, domid: int, config: DomainConfig, owner: int) -> list[tuple[DeviceKind, int]]:
        """A new domain's devices, every kind in table order; the (kind, devid) of each."""
        added = []
        for kind, entry, devid in configured(config):
            self.add(domid, kind, entry, devid, owner)
            added.append((kind, devid))
        return added

    def wait_connected(self, domid: int, kind: DeviceKind, devid: int, timeout: float) -> None:
        """Both ends Connected, as libxl waits: a netfront says Connected before its backend
        has bound the event channels, and is not usable until then. A backend that gives up
        (Closing or Closed, with its reason in its ``error`` node) fails the wait at once."""
        paths = self.paths(domid, kind, devid)
        deadline = time.monotonic() + timeout
        given_up = {XenbusState.Closing, XenbusState.Closed}
        try:
            wanted = {XenbusState.Connected} | given_up
            back = xenbus.wait_for_state(self.xs, xenbus.state_path(paths.backend), wanted, timeout)
            if back is XenbusState.Connected:
                left = max(0.0, deadline - time.monotonic())
                connected = {XenbusState.Connected}
                xenbus.wait_for_state(self.xs, xenbus.state_path(paths.frontend), connected, left)
                return
        except (TimeoutError, xenbus.XsPathError, XsError):
            pass
        reasons = [
            self.xs.read_optional(xenbus.error_path(path))
            for path in (paths.backend, paths.frontend)
        ]
        error = "; ".join(r for r in reasons if r) or "no error reported"
        raise HyperError(f"{kind.xenbus_type} {domid}/{devid} did not connect: {error}")

    def attach(
        self, domid: int, name: str, kind: DeviceKind, entry: Any, owner: int, timeout: float
    ) -> dict[str, Any]:
        """Add one device to a running domain and wait until it is connected; on failure,
        remove it and whatever image was made for it."""
        existing = self.ids(domid, kind)
        devid = kind.devid_of(entry)
        if devid is None:
            devid = max(existing, default=-1) + 1
        label = self._label(kind, entry, devid)
        if devid in existing or (
            kind.name_key is not None and label in self._names(domid, kind).values()
        ):
            used = (
                f"{kind.spec_name}: {kind.name_meaning}: {label} is already used by domain {name}"
            )
            raise BadInput(f"invalid {kind.what}", [used])
        made = Images(kind.spec_name, owner)
        image = kind.image_of(entry)
        if image is not None:
            made.create("target", Path(image[0]), image[1])
        paths = self.add(domid, kind, entry, devid, owner)
        try:
            self.wait_connected(domid, kind, devid, timeout)
        except HyperError:
            remove_device(self.xs, paths)
            self._unserve(domid, kind, devid)
            made.remove_created()
            raise
        attached: dict[str, Any] = {"domid": domid, "devid": devid}
        if kind.name_field is not None:
            attached[kind.name_field] = label
        return attached

    def detach(self, domid: int, name: str, kind: DeviceKind, device: str) -> dict[str, Any]:
        """Close one device through XenBus and remove it (and what backs it). ``device`` is
        its devid or, for a kind with one, its name (a disk's vdev, a share's tag)."""
        devid = self.find(domid, name, kind, device)
        clean = remove_device(self.xs, self.paths(domid, kind, devid))
        self._unserve(domid, kind, devid)
        return {"domid": domid, "devid": devid, "clean": clean}

    def find(self, domid: int, name: str, kind: DeviceKind, device: str) -> int:
        """The devid of ``device``, a devid or (for a kind with one) a name; NotFound."""
        names = self._names(domid, kind)
        found = [devid for devid, label in names.items() if device in (str(devid), label)]
        if not found:
            raise NotFound(f"domain {name} has no {kind.what} {device}")
        return found[0]

    def set_faults(
        self, domid: int, name: str, kind: DeviceKind, device: str, spec: str
    ) -> dict[str, Any]:
        """Give a device the faults of ``spec`` (checked, canonical; empty: none) where its
        backend reads them, its own directory: the backend applies them from its next request
        on (backends' ``settings_changed``)."""
        devid = self.find(domid, name, kind, device)
        node = xenbus.join_path(self.paths(domid, kind, devid).backend, FAULTS_NODE)
        if spec:
            self.xs.write(node, spec)
        else:
            with contextlib.suppress(XsError):  # ENOENT: it had none
                self.xs.rm(node)
        return {"domid": domid, "devid": devid, "faults": spec}

    def listing(self, domid: int, kind: DeviceKind) -> list[dict[str, Any]]:
        """A domain's devices of ``kind``: what each end's directory says, and the counters."""
        stats = {s["devid"]: s for s in self._stats(kind, domid)}
        out = []
        for devid in self.ids(domid, kind):
            front = xenbus.frontend_path(domid, kind.xenbus_type, devid)
            entry: dict[str, Any] = {"devid": devid}
            for key, node in kind.front_keys.items():
                entry[key] = self.xs.read_optional(xenbus.join_path(front, node))
            back = self.paths(domid, kind, devid).backend
            for key, node in kind.back_keys.items():
                entry[key] = self.xs.read_optional(xenbus.join_path(back, node))
            entry.update(stats.get(devid, {}))
            out.append(entry)
        return out

    def wait_released(self, domid: int, timeout: float) -> bool:
        """Whether every backend has released what it held for ``domid``'s devices (a TAP,
        a loop device, a share) within ``timeout`` seconds of the devices' removal: a backend
        forgets a device (its counters go) only once it has released it."""
        deadline = time.monotonic() + timeout
        while any(self._stats(kind, domid) for kind in KINDS):
            if time.monotonic() > deadline:
                return False
            time.sleep(RELEASE_POLL)  # a bounded wait for the bus thread, not an idle loop
        return True

    def stats(self, kind: DeviceKind) -> list[dict[str, object]]:
        return self._stats(kind, None)

    def _names(self, domid: int, kind: DeviceKind) -> dict[int, str]:
        """Each device's devid and the name the user knows it by."""
        names = {}
        for devid in self.ids(domid, kind):
            label = None
            if kind.name_key is not None:
                front = xenbus.frontend_path(domid, kind.xenbus_type, devid)
                label = self.xs.read_optional(xenbus.join_path(front, kind.name_key))
            names[devid] = label or str(devid)
        return names

    @staticmethod
    def _label(kind: DeviceKind, entry: Any, devid: int) -> str:
        if kind.name_key is None:
            return str(devid)
        front, _ = kind.store_keys(entry, devid, 0)
        return front[kind.name_key]


def _served_by(domid: int, kind: DeviceKind, devid: int) -> str:
    """Where the toolstack records which domain serves a device: below the domain's tool
    directory (libxl's /libxl/<domid>/device/...), dom0's alone."""
    return xenbus.join_path(_records(domid, kind), str(devid))


def _records(domid: int, kind: DeviceKind) -> str:
    """The directory of ``_served_by`` records of one kind of a domain's devices."""
    return xenbus.join_path(xenbus.tool_path(domid), "backend", kind.xenbus_type)


def configured(config: DomainConfig) -> Iterator[tuple[DeviceKind, Any, int]]:
    """The config's devices, every kind in table order: each kind, entry and devid (its own,
    or its index among the kind's)."""
    for kind in KINDS:
        for index, entry in enumerate(entries(config, kind)):
            devid = kind.devid_of(entry)
            yield kind, entry, index if devid is None else devid


def entries(config: DomainConfig, kind: DeviceKind) -> list[Any]:
    """The config's entries of one kind."""
    found: list[Any] = getattr(config, kind.config_key)
    return found

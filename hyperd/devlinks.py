"""Which domU serves which device of which other domU: the only pairs of domUs that hyperd lets
share event channels and grant pools (driver domains, issue 15).

dom0 serves every domain and needs no entry. A domU that runs a backend (a driver domain) may
share channels and pools with another domU only while the toolstack has linked them, by a
device of that domU's which it serves (``domctl_link_device``): an entry is (frontend, backend,
device), the device named ``<type>/<devid>`` as both ends name it beyond the store. Xen leaves
this to its security module's policy; here it is part of the hypervisor, so a driver domain
that turns hostile reaches the guests it serves, and those only through their devices' pools.

The toolstack links a device before the frontend sets it up and unlinks it when it is gone; a
domain's death unlinks everything it was part of.

A link may hold one descriptor that dom0 opened for the backend (a vbd's loop device: Xen's
device assignment), until the backend takes it (``take_fd``) or the link goes, which closes
it. Held descriptors are not saved: a hyperd restarted before the backend took one has lost it,
and the backend's device fails until it is attached again (block-detach and block-attach, or
the driver domain's restart).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, order=True)
class DeviceLink:
    frontend: int
    backend: int
    device: str  # <type>/<devid>


class DeviceLinks:
    def __init__(self) -> None:
        self._links: set[DeviceLink] = set()
        self._fds: dict[DeviceLink, int] = {}  # descriptors waiting for their backend
        #: The devices whose backend died while their frontend lives: what each served.
        self._orphaned: set[DeviceLink] = set()

    def link(self, frontend: int, backend: int, device: str, fd: int | None = None) -> None:
        """Link the device, holding ``fd`` (now ours) for its backend; linking it again
        replaces what it held."""
        link = DeviceLink(frontend, backend, device)
        self._links.add(link)
        self._drop_fd(link)
        if fd is not None:
            self._fds[link] = fd

    def unlink(self, frontend: int, backend: int, device: str) -> None:
        """The device is no longer served by ``backend`` (detached): nobody succeeds a dead
        domain that served it either."""
        link = DeviceLink(frontend, backend, device)
        self._links.discard(link)
        self._drop_fd(link)
        self._orphaned = {o for o in self._orphaned if (o.frontend, o.device) != (frontend, device)}

    def take_fd(self, frontend: int, backend: int, device: str) -> int | None:
        """The descriptor held for ``backend``, now the caller's; None if none is held."""
        return self._fds.pop(DeviceLink(frontend, backend, device), None)

    def _drop_fd(self, link: DeviceLink) -> None:
        fd = self._fds.pop(link, None)
        if fd is not None:
            os.close(fd)

    def held(self) -> int:
        """How many descriptors wait for their backends."""
        return len(self._fds)

    def serves(self, backend: int, frontend: int, device: str) -> bool:
        """Does ``backend`` serve ``device`` of ``frontend``? dom0 serves everything."""
        return backend == 0 or DeviceLink(frontend, backend, device) in self._links

    def serves_some(self, backend: int, frontend: int) -> bool:
        """Does domU ``backend`` serve any device of ``frontend``?"""
        return any(link.backend == backend and link.frontend == frontend for link in self._links)

    def share(self, a: int, b: int) -> bool:
        """May domains ``a`` and ``b`` share channels and pools: one is dom0, or one serves a
        device of the other."""
        return (
            a == 0 or b == 0 or any({link.frontend, link.backend} == {a, b} for link in self._links)
        )

    def succeeds(self, backend: int, dead: int, frontend: int) -> bool:
        """Does ``backend`` serve a device of ``frontend`` that the dead domain ``dead`` served
        when it died? Only such a domain is handed what ``dead`` held for the frontend (its
        stale ports, hyperd/evtchn.py): not another driver domain of the same guest."""
        return any(
            link.backend == backend
            and link.frontend == frontend
            and DeviceLink(frontend, dead, link.device) in self._orphaned
            for link in self._links
        )

    def remembers(self, domid: int) -> bool:
        """Is ``domid`` a dead domain whose devices still wait for a successor?"""
        return any(link.backend == domid for link in self._orphaned)

    def release_domain(self, domid: int) -> None:
        gone = {link for link in self._links if domid in (link.frontend, link.backend)}
        self._links -= gone
        for link in gone:
            self._drop_fd(link)
        orphaned = {link for link in gone if link.backend == domid}
        again = {(link.frontend, link.device) for link in orphaned}  # the last server counts
        self._orphaned = {
            link
            for link in self._orphaned
            if link.frontend != domid and (link.frontend, link.device) not in again
        }
        self._orphaned |= orphaned

    def to_dict(self) -> list[dict[str, Any]]:
        """Every link, and every device its backend's death left (``orphaned``), for hyperd's
        state file."""
        entries = [(link, False) for link in self._links]
        entries += [(link, True) for link in self._orphaned]
        return [
            {"frontend": link.frontend, "backend": link.backend, "device": link.device}
            | ({"orphaned": True} if orphaned else {})
            for link, orphaned in sorted(entries)
        ]

    @classmethod
    def from_dict(cls, data: list[dict[str, Any]]) -> DeviceLinks:
        links = cls()
        for entry in data:
            link = DeviceLink(int(entry["frontend"]), int(entry["backend"]), str(entry["device"]))
            if entry.get("orphaned"):
                links._orphaned.add(link)
            else:
                links.link(link.frontend, link.backend, link.device)
        return links

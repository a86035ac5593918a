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
"""

from __future__ import annotations

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

    def link(self, frontend: int, backend: int, device: str) -> None:
        self._links.add(DeviceLink(frontend, backend, device))

    def unlink(self, frontend: int, backend: int, device: str) -> None:
        self._links.discard(DeviceLink(frontend, backend, device))

    def serves(self, backend: int, frontend: int, device: str) -> bool:
        """Does ``backend`` serve ``device`` of ``frontend``? dom0 serves everything."""
        return backend == 0 or DeviceLink(frontend, backend, device) in self._links

    def share(self, a: int, b: int) -> bool:
        """May domains ``a`` and ``b`` share channels and pools: one is dom0, or one serves a
        device of the other."""
        return (
            a == 0 or b == 0 or any({link.frontend, link.backend} == {a, b} for link in self._links)
        )

    def release_domain(self, domid: int) -> None:
        self._links = {link for link in self._links if domid not in (link.frontend, link.backend)}

    def to_dict(self) -> list[dict[str, Any]]:
        """Every link, for hyperd's state file."""
        return [
            {"frontend": link.frontend, "backend": link.backend, "device": link.device}
            for link in sorted(self._links)
        ]

    @classmethod
    def from_dict(cls, data: list[dict[str, Any]]) -> DeviceLinks:
        links = cls()
        for entry in data:
            links.link(int(entry["frontend"]), int(entry["backend"]), str(entry["device"]))
        return links

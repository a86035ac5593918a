"""A hypercall table for data-path tests: the calls a backend's data path makes, answered from
a few grant pools (opened, as dom0 answers its workers) and one event channel's doorbells (what
hyperd would answer for a real device).
A doorbell storm, as a hostile frontend rings. And hyperd's Resources on paper, for tests of
its tables."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from channels import hypercall as hc
from channels.grants import open_pools
from hyperd.resources import Resources


class Hypercalls:
    def __init__(self, pools: Sequence[tuple[str, int, int]], bells: tuple[str, str]) -> None:
        self.pools = pools  # (shared-memory name, first gref, pages) of each
        self.bells = bells  # (the caller's doorbell, the peer's)

    def call(self, op: hc.Op) -> dict[str, Any]:
        if isinstance(op, hc.GnttabMapPools):
            pools = [
                {"pool": i, "name": name, "gref_base": base, "pages": pages}
                for i, (name, base, pages) in enumerate(self.pools)
            ]
            # Opened, as dom0 answers a data-path worker (channels/grants.py).
            total = sum(pages for _, _, pages in self.pools)
            return open_pools({"pools": pools, "max_pages": total})
        if isinstance(op, hc.EvtchnStatus):
            return {
                "state": "interdomain",
                "doorbell": self.bells[0],
                "peer_doorbell": self.bells[1],
            }
        if isinstance(op, hc.EvtchnClose):
            return {}
        raise AssertionError(op)


def storm(ring: Callable[[], None], seconds: float) -> int:
    """Call ``ring`` in a tight loop from a thread for ``seconds``; how many times it rang."""
    done = threading.Event()
    rings = 0

    def loop() -> None:
        nonlocal rings
        while not done.is_set():
            ring()
            rings += 1

    thread = threading.Thread(target=loop)
    thread.start()
    done.wait(seconds)
    done.set()
    thread.join()
    return rings


class PaperResources(Resources):
    """Resources that only record names (as hyperd makes them): nothing is made in /dev/shm."""

    @property
    def view(self) -> Path | None:
        return None  # no directory in /dev/shm either

    def new_segment(self, kind: str, size: int, peer: int = 0) -> str:
        name = self._name(kind)
        self.segments.add(name)
        self._note_peer(name, peer)
        return name

    def new_doorbell(self, kind: str, peer: int = 0) -> str:
        name = self._name(kind)
        self.doorbells.add(name)
        self._note_peer(name, peer)
        return name

    def _note_peer(self, name: str, peer: int) -> None:
        if peer not in (0, self.domid):
            self.peers[name] = peer

    def reshare(self, name: str, peer: int) -> None:
        self.peers.pop(name, None)
        self._note_peer(name, peer)

    def drop_segment(self, name: str) -> None:
        self.segments.discard(name)
        self.peers.pop(name, None)

    def drop_doorbell(self, name: str) -> None:
        self.doorbells.discard(name)
        self.peers.pop(name, None)

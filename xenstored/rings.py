"""The store serving every domain's store ring itself: the store in its stub domain.

In dom0 the toolstack starts each domain's relay as hyperd introduces the domain. In the store
domain (domu/stubdom.py) the store does, as Xen's xenstored does on the toolstack's INTRODUCE:
hyperd says which rings are the store domain's to serve (``StoreRings``), dom0's among them,
and each is served by a relay process (xenstored/relay.py) feeding one connection of its
domain. RELEASE stops the domain's relay; so does a relay's own end.

On a restart every ring is taken over (the relay's ``reconnect``): the clients reconnect and
resend what went unanswered, and register their watches again. When dom0 restarts, its ring is
taken over the same way, so that the new dom0's client starts from a new connection rather than
the dead one's watches and transactions.

Work is done on one thread, in order, off the store's lock: introductions and releases arrive
under that lock (they are store requests), and starting a relay asks hyperd for the ring.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from channels.forkserver import ForkServer
from channels.hypercall import HypercallClient, StoreRings
from xenstored.core import Store
from xenstored.relay import Relay

log = logging.getLogger("xenstored")


class RingServer:
    """Serves the store rings of ``store`` that hyperd assigns to this domain."""

    def __init__(
        self, hc: HypercallClient, store: Store, fork_server: Callable[[], ForkServer]
    ) -> None:
        self.hc = hc
        self.store = store
        self.fork_server = fork_server
        self.relays: dict[int, Relay] = {}
        self._work: queue.Queue[tuple[str, int]] = queue.Queue()
        store.on_introduce = lambda domid: self._work.put(("serve", domid))
        store.on_release = lambda domid: self._work.put(("stop", domid))

    def serve_all(self, reconnect: bool) -> None:
        """Serve every ring hyperd assigns us; ``reconnect``: a store that died served them, and
        its clients are to reconnect to this one."""
        for ring in self.hc.call(StoreRings())["rings"]:
            self._serve(ring["domid"], ring["segment"], ring["port"], reconnect)
            if ring["domid"] != 0:
                self.store.introduce_domain(ring["domid"])

    def dom0_restarted(self) -> None:
        self._work.put(("renew", 0))

    def run(self, stopped: threading.Event) -> None:
        """Do the queued work until ``stopped``."""
        while not stopped.is_set():
            try:
                what, domid = self._work.get(timeout=1.0)
            except queue.Empty:
                self._reap()
                continue
            try:
                if what == "stop" or what == "renew":
                    self._stop(domid)
                if what == "serve" or what == "renew":
                    self._serve_domain(domid, reconnect=what == "renew")
            except Exception as exc:
                log.error("dom%d: %s of its store ring failed: %s", domid, what, exc)

    def _serve_domain(self, domid: int, reconnect: bool) -> None:
        if domid in self.relays:
            return
        rings = self.hc.call(StoreRings(domid=domid))["rings"]
        if not rings:
            log.warning("dom%d was introduced, but hyperd gives us no store ring of it", domid)
        for ring in rings:
            self._serve(domid, ring["segment"], ring["port"], reconnect)

    def _serve(self, domid: int, segment: str, port: int, reconnect: bool) -> None:
        rings = {"store": (segment, port)}
        relay = Relay.start(
            self.hc, self.fork_server(), domid, rings, store=self.store, reconnect=reconnect
        )
        self.relays[domid] = relay
        log.info("dom%d: serving its store ring%s", domid, " (taking it over)" if reconnect else "")

    def _stop(self, domid: int) -> None:
        relay = self.relays.pop(domid, None)
        if relay is not None:
            relay.stop()
            log.info("dom%d: its store ring is no longer served", domid)

    def _reap(self) -> None:
        """A relay that ended on its own (its guest broke the page) is forgotten: the domain's
        store connection is closed, as with dom0's relays."""
        for domid, relay in list(self.relays.items()):
            if relay.process.poll() is not None:
                log.warning("dom%d: its store relay ended", domid)
                self._stop(domid)

"""The store serving every domain's store ring itself: the store in its stub domain.

In dom0 the toolstack starts each domain's relay as hyperd introduces the domain. In the store
domain (domu/stubdom.py) the store does, as Xen's xenstored does on the toolstack's INTRODUCE:
hyperd says which rings are the store domain's to serve (``StoreRings``), dom0's among them,
and each is served by a relay process (xenstored/relay.py) feeding one connection of its
domain. RELEASE stops the domain's relay; so does a relay's own end.

On a restart every ring is taken over (the relay's ``reconnect``): the clients reconnect and
resend what went unanswered, and register their watches again. When dom0 restarts (hyperd
counts dom0's lives, and says so at each one and whenever it adopts this domain), its ring is
taken over the same way, so that the new dom0's client starts from a new connection rather than
the dead one's watches and transactions. A domain id given to a new domain gets its new ring
served, the old one's relay stopped (a release dom0 never sent, being dead then, is not
needed for that).

Work is done on one thread, in order, off the store's lock: introductions and releases arrive
under that lock (they are store requests), and starting a relay asks hyperd for the ring.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable

from channels.forkserver import ForkServer
from channels.hypercall import HypercallClient, StoreRings
from xenstored.core import Store
from xenstored.relay import Relay

log = logging.getLogger("xenstored")


class RingServer:
    """Serves the store rings of ``store`` that hyperd assigns to this domain."""

    def __init__(
        self,
        hc: HypercallClient,
        store: Store,
        fork_server: Callable[[], ForkServer],
        work: queue.Queue[tuple[str, int]] | None = None,
    ) -> None:
        """``work``: where hyperd's events (``dom0_restarted``) were queued before this
        existed, if anywhere."""
        self.hc = hc
        self.store = store
        self.fork_server = fork_server
        self.relays: dict[int, Relay] = {}
        self._segments: dict[int, str] = {}  # the ring each relay serves, by domain
        self._dom0_lives = 0  # dom0's restarts when we took its ring (over) last
        self._work = work if work is not None else queue.Queue()
        store.on_introduce = lambda domid: self._work.put(("serve", domid))
        store.on_release = lambda domid: self._work.put(("stop", domid))

    def serve_all(self, reconnect: bool) -> None:
        """Serve every ring hyperd assigns us; ``reconnect``: a store that died served them, and
        its clients are to reconnect to this one. A ring that cannot be served is logged and
        left (its domain's store calls wait), not a reason to fail the store."""
        answer = self.hc.call(StoreRings())
        self._dom0_lives = int(answer["dom0_restarts"])
        for ring in answer["rings"]:
            try:
                self._serve(ring["domid"], ring["segment"], ring["port"], reconnect)
            except Exception as exc:
                log.error("dom%d: cannot serve its store ring: %s", ring["domid"], exc)
                continue
            if ring["domid"] != 0:
                self.store.introduce_domain(ring["domid"])

    @staticmethod
    def dom0_restarted(work: queue.Queue[tuple[str, int]], restarts: int) -> None:
        """hyperd's event: dom0 is in its life number ``restarts``."""
        work.put(("dom0", restarts))

    def run(self) -> None:
        """Do the queued work, for as long as the store runs (it ends with its domain). It
        sleeps until there is some: a relay that ended on its own is forgotten at the next."""
        while True:
            what, domid = self._work.get()
            self._reap()
            try:
                if what == "stop":
                    self._stop(domid)
                elif what == "serve":
                    self._serve_domain(domid)
                elif what == "dom0" and domid > self._dom0_lives:  # ``domid``: dom0's lives
                    self._dom0_lives = domid
                    self._stop(0)
                    self._serve_domain(0, reconnect=True)
            except Exception as exc:
                log.error("%s %d: serving the store ring failed: %s", what, domid, exc)

    def _serve_domain(self, domid: int, reconnect: bool = False) -> None:
        rings = self.hc.call(StoreRings(domid=domid))["rings"]
        if not rings:
            log.warning("dom%d was introduced, but hyperd gives us no store ring of it", domid)
        for ring in rings:
            if self._segments.get(domid) == ring["segment"]:
                continue  # served already
            self._stop(domid)  # a dead domain's, whose id is a new one's now
            self._serve(domid, ring["segment"], ring["port"], reconnect)

    def _serve(self, domid: int, segment: str, port: int, reconnect: bool) -> None:
        rings = {"store": (segment, port)}
        relay = Relay.start(
            self.hc, self.fork_server(), domid, rings, store=self.store, reconnect=reconnect
        )
        self.relays[domid] = relay
        self._segments[domid] = segment
        log.info("dom%d: serving its store ring%s", domid, " (taking it over)" if reconnect else "")

    def _stop(self, domid: int) -> None:
        self._segments.pop(domid, None)
        relay = self.relays.pop(domid, None)
        if relay is not None:
            relay.stop()
            log.info("dom%d: its store ring is no longer served", domid)

    def _reap(self) -> None:
        """A relay that ended on its own (its guest broke the page) is forgotten; its store
        connection closed itself as the relay's socket ended."""
        for domid, relay in list(self.relays.items()):
            if relay.process.poll() is not None:
                log.warning("dom%d: its store relay ended", domid)
                self._stop(domid)

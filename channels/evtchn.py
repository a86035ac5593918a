"""Event channels, the domain side: a port bound between two domains, with a doorbell each way.

hyperd owns the port tables (hyperd/evtchn.py) and creates the doorbell semaphores; a domain
asks for ports with hypercalls and then rings its peer's doorbell directly, so a notification
costs one semaphore post, not a round trip through hyperd:

    frontend                                  backend
    ch = alloc_unbound(hc, remote_dom=0)
    (publish ch.port in the store)            ch = bind_interdomain(hc, front_domid, port)
    ch.notify()  ── posts backend's doorbell ─► ch.wait(timeout)
    ch.wait()    ◄─ posts frontend's doorbell ─ ch.notify()

Notifications coalesce (channels/doorbell.py): N notifies before the peer wakes give one wakeup,
so a consumer must always re-check its ring after waking, never count wakeups.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

from channels import ring
from channels.doorbell import Doorbell
from channels.hypercall import (
    EvtchnAllocUnbound,
    EvtchnBindInterdomain,
    EvtchnClose,
    EvtchnStatus,
    HypercallError,
    Hypercalls,
)


class LateEoi:
    """Xen's "late EOI" for one event channel, in a backend's work loop (XSA-332): a wakeup that
    finds no work is spurious. The first in a row is free (an honest peer's notification can
    race with the work it announced); after that the loop waits 1 ms, then 2, 4, ... up to 1 s
    before sleeping on the channel again, so a peer ringing in a tight loop costs a handful of
    wakeups a second instead of a CPU. Any work resets it. The delay holds up only this
    channel, whose peer is the one ringing."""

    FIRST = 0.001
    LONGEST = 1.0

    def __init__(self) -> None:
        self.run = 0  # spurious wakeups in a row
        self._spurious = 0  # all of them, in Python
        #: The ring's figures (channels/ring.py's RING_FIGURES), where the wakeups, the
        #: spurious ones and the back-offs are counted too; None: not counted.
        self.figures: memoryview | None = None
        #: A native pump serving the channel in our place (channels.pumps), which counts its
        #: own; ``spurious`` adds them up.
        self.native: Any = None
        self._halt = threading.Event()

    @property
    def spurious(self) -> int:
        """Wakeups that found no work, all told."""
        native = self.native
        return self._spurious + (native.spurious if native is not None else 0)

    def adopt(self, native: Any) -> None:
        """A native pump serves the channel from now on (None: it is done; its count stays)."""
        if self.native is not None:
            self._spurious += self.native.spurious
        self.native = native

    def serve(
        self,
        work: Callable[[], bool],
        final_check: Callable[[], bool],
        wait: Callable[[float], bool],
        running: Callable[[], bool],
        heal: float,
    ) -> None:
        """A backend's work loop over one channel, until ``running()`` is False: ``work()``
        while it finds some; then arm the ring (``final_check()``, True if work came in
        meanwhile) and ``wait(heal)`` on the channel, True if rung; a rung wakeup that finds
        no work is slowed down as above."""
        rung = False
        while running():
            if work():
                self.worked()
                rung = False
                continue
            if rung:
                self.back_off()
            rung = not final_check() and running() and self.woke(wait(heal))

    def woke(self, rung: bool) -> bool:
        """A wait on the channel returned ``rung``: counted as a wakeup if so; ``rung``."""
        if rung and self.figures is not None:
            self.figures[ring.FIG_WAKEUPS] += 1
        return rung

    def back_off(self) -> None:
        """A rung wakeup found no work: wait as above before sleeping on the channel again."""
        self._halt.wait(self.idle())

    def stop(self) -> None:
        """End a slowdown now (the loop's owner is stopping it)."""
        self._halt.set()

    def worked(self) -> None:
        self.run = 0

    def idle(self) -> float:
        """A wakeup found no work: seconds to wait before sleeping on the channel again."""
        self.run += 1
        self._spurious += 1
        figures = self.figures
        if figures is not None:
            figures[ring.FIG_SPURIOUS] += 1
        if self.run < 2:
            return 0.0
        if figures is not None:
            figures[ring.FIG_BACKOFFS] += 1
        # The exponent stops growing once past LONGEST: 2.0 ** 1100 would overflow a float.
        return min(self.LONGEST, self.FIRST * 2 ** min(self.run - 2, 30))


class Doorbells(Protocol):
    """What a data path uses of a bound event channel: wait on our doorbell, ring the peer's,
    wake our own waiter, and both doorbells' names (what a native pump opens). An EventChannel
    is one; a process that only waits and rings opens channels.doorbell.DoorbellPair."""

    def doorbell_names(self) -> tuple[str, str | None]: ...

    def wait(self, timeout: float | None) -> bool: ...

    def notify(self) -> None: ...

    def kick(self) -> None: ...


class EventChannel:
    """One local port. ``wait`` blocks on our doorbell; ``notify`` rings the peer's."""

    def __init__(self, hc: Hypercalls, port: int, doorbell: str, peer_doorbell: str | None) -> None:
        self._hc = hc
        self.port = port
        self._doorbell = Doorbell(doorbell)
        self._peer: Doorbell | None = Doorbell(peer_doorbell) if peer_doorbell else None
        self._closed = False
        self._bound = threading.Event()  # set once the peer's doorbell is known
        if self._peer is not None:
            self._bound.set()

    def _refresh(self) -> bool:
        """An unbound port learns its peer's doorbell once the peer has bound to it."""
        status = self._hc.call(EvtchnStatus(port=self.port))
        if status.get("peer_doorbell"):
            self._peer = Doorbell(status["peer_doorbell"])
            self._bound.set()
            return True
        return False

    def wait_bound(self, timeout: float) -> bool:
        """Wait until someone has learnt the peer's doorbell (``doorbell_names``, ``notify``):
        a frontend's driver does as its backend says Connected. True once known."""
        return self._bound.wait(timeout)

    def doorbell_names(self) -> tuple[str, str | None]:
        """(ours, the peer's): what a process that only rings and waits needs to open. The
        peer's is None until the peer has bound its end."""
        if self._peer is None:
            self._refresh()
        return self._doorbell.name, self._peer.name if self._peer else None

    def notify(self) -> None:
        """Ring the peer. Before the peer binds this is dropped: binding sets the new port
        pending, so the peer re-checks its ring as soon as it exists. A frontend learns the
        peer's doorbell when its backend says Connected (``doorbell_names``), so that only a
        notify racing with that asks hyperd, and a hyperd that does not answer drops it too."""
        if self._peer is None:
            try:
                if not self._refresh():
                    return
            except HypercallError:
                return
        assert self._peer is not None
        self._peer.ring()

    def wait(self, timeout: float | None) -> bool:
        """Block until notified (True) or ``timeout`` seconds pass (False)."""
        return self._doorbell.wait(timeout)

    def kick(self) -> None:
        """Wake whoever waits on this port (used to stop a waiter), even past a count the
        peer left pending (Doorbell.wake)."""
        self._doorbell.wake()

    def close(self) -> None:
        """Free the port. The peer's port returns to unbound (it may be re-bound later)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._hc.call(EvtchnClose(port=self.port))
        except HypercallError:
            pass  # the domain or the hypervisor is going away; the port goes with it
        self._doorbell.close()
        if self._peer is not None:
            self._peer.close()


def alloc_unbound(hc: Hypercalls, remote_dom: int) -> EventChannel:
    result = hc.call(EvtchnAllocUnbound(remote_dom=remote_dom))
    return EventChannel(hc, result["port"], result["doorbell"], None)


def bind_interdomain(hc: Hypercalls, remote_dom: int, remote_port: int) -> EventChannel:
    result = hc.call(EvtchnBindInterdomain(remote_dom=remote_dom, remote_port=remote_port))
    return EventChannel(hc, result["port"], result["doorbell"], result["peer_doorbell"])


def from_status(hc: Hypercalls, port: int) -> EventChannel:
    """Open a port hyperd bound for us at build time (the store and console channels)."""
    status = hc.call(EvtchnStatus(port=port))
    return EventChannel(hc, port, status["doorbell"], status.get("peer_doorbell"))

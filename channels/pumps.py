"""Which data-path pumps run: the native ones (``channels._netpump``, ``channels._blkpump`` and
``channels._fusepump``, built from ``channels/native/``) when they are built, else the Python
reference.

The native pumps are the batch loops between a TAP and the netif rings (issue 13): each runs,
GIL released, until it is stopped, sees a protocol violation, or meets a frame it leaves to the
Python path (netback tx hands back anything but the common case: channels/native/netpump.c).
blkback's pump (channels/native/blkpump.c) is the loop of one vbd: the blkif ring to the
device with Linux AIO, handing FLUSH, DISCARD and grant refs it cannot look up to Python.
blkfront's (channels/native/fusepump.c) takes READ and WRITE of whole sectors from /dev/fuse to
the ring and back (domu/blkfront/native.py).
The Python classes in backends/netback/datapath.py, domu/netfront/datapath.py,
backends/blkback/datapath.py and domu/blkfront/ stay the reference
implementation: they run wherever the extension is not built, and ``HYPER_PUMPS=python`` in the
environment forces them (the differential tests run both; a domain inherits the variable from
hyperd). ``hyperctl info`` shows which is in use (``describe``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

from channels.evtchn import LateEoi
from channels.hypercall import HypercallError
from channels.ring import BackRing, FrontRing
from channels.threadname import set_native_name

# Each native module, or None where it is not built (channels/_*.pyi tell mypy they exist).
_netpump: ModuleType | None
_fusepump: ModuleType | None
_blkpump: ModuleType | None
try:
    from channels import _netpump
except ImportError as exc:  # not built: the reference runs
    _netpump = None
    _WHY_NOT = str(exc)
else:
    _WHY_NOT = ""
try:
    from channels import _fusepump
except ImportError as exc:
    _fusepump = None
    _FUSE_WHY_NOT = str(exc)
else:
    _FUSE_WHY_NOT = ""
try:
    from channels import _blkpump
except ImportError as exc:
    _blkpump = None
    _BLK_WHY_NOT = str(exc)
else:
    _BLK_WHY_NOT = ""

log = logging.getLogger(__name__)

ENV = "HYPER_PUMPS"

# channels/native/netpump.c's kinds of pump, and how its run() ends (checked against the module
# by tests/unit/test_native_pumps.py).
NETBACK_TX, NETBACK_RX, NETFRONT_TX, NETFRONT_RX = range(4)
STOPPED, FATAL, FALLBACK, MISS, BROKEN, IOERROR = range(6)
# channels/native/blkpump.c's one kind of pump (its own module, its own numbering).
BLKBACK = 0
# channels/native/fusepump.c's ends of its reader and reaper (domu/blkfront/native.py).
FUSE_STOPPED, FUSE_PYTHON, FUSE_ENDED, FUSE_BROKEN, FUSE_ERROR = range(5)
NETPUMP, BLKPUMP, FUSEPUMP = "netpump", "blkpump", "fusepump"
_MODULES = {NETPUMP: _netpump, BLKPUMP: _blkpump, FUSEPUMP: _fusepump}


def native(module: str = NETPUMP) -> ModuleType | None:
    """The native pumps of ``module`` (the netif pumps unless named), or None when the Python
    reference must run."""
    if os.environ.get(ENV, "").lower() == "python":
        return None
    return _MODULES[module]


def describe() -> str:
    """One line for ``hyperctl info``: which pumps a data path started now would run."""
    if os.environ.get(ENV, "").lower() == "python" and any(_MODULES.values()):
        return f"python ({ENV}=python)"
    built = [f"channels._{name}" for name, mod in _MODULES.items() if mod]
    missing = [why for why in (_WHY_NOT, _BLK_WHY_NOT, _FUSE_WHY_NOT) if why]
    if not built:
        return f"python (native pumps not built: {'; '.join(missing)})"
    if missing:
        return f"native ({', '.join(built)}); python elsewhere (not built: {'; '.join(missing)})"
    return f"native ({', '.join(built)})"


def _make(
    kind: int,
    ring: BackRing | FrontRing,
    tap_fd: int,
    doorbells: tuple[str, str | None],
    module_name: str = NETPUMP,
    **kw: Any,
) -> Any:
    """A native Pump of ``kind`` over ``ring``, from where the ring is now; None when the
    native pumps do not run or the peer's doorbell is not known yet. ``tap_fd`` is the fd the
    pump does its I/O on (a vbd's device for blkback)."""
    module = native(module_name)
    mine, peer = doorbells
    if module is None or peer is None:
        return None
    return module.Pump(
        kind, ring.area, ring.slot_size, ring.nr_ents, *ring.indices(), tap_fd, mine, peer, **kw
    )


def ended(ring: BackRing | FrontRing, pump: Any, result: tuple[int, str, int]) -> int:
    """Hand the ring back to Python after ``pump.run()`` returned ``result``; the code, unless
    the peer broke the ring (ProtocolViolation, as the Python path raises it)."""
    ring.adopt(*pump.indices)
    code, why, _ = result
    if code == BROKEN:
        ring.broke(why)
    if code == IOERROR:  # our own device (the TAP) failed, not the peer
        raise OSError(why)
    return code


#: What a side of a QueueLoop does with its pump's end: False once the side is done.
Step = Callable[[tuple[int, str, int]], bool]
TX, RX = 0, 1  # a QueueLoop's sides
_ALONE, _DONE = "alone", "done"


class QueueLoop:
    """One thread for a netif queue's tx and rx native pumps of one side (netpump.c's
    ``serve_queue``: one loop per queue, waiting on both doorbells and the TAP at once).

    Each of the two paths keeps its own thread and calls in with its pump (``serve``), or
    withdraws (``withdraw``: its Python path runs, or it was stopped first). The second to
    call runs both pumps in one loop; the first sleeps until its side is done. A side's end is
    handled by that side's ``step`` (what its path does after its own pump's ``run()``), in the
    running thread. When a step raises (a fatal end) or says its side is done, the loop ends:
    the exception is raised again in its own path's thread, and the other side goes on alone
    with its own pump, as if it had never been paired. The running thread takes the kernel
    name ``name`` meanwhile (``netback-q``), so that per-thread figures say it serves both."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._cond = threading.Condition()
        self._offers: list[tuple[Any, Step] | None] = [None, None]
        self._verdicts: list[str | BaseException | None] = [None, None]
        self._out = [False, False]  # withdrawn or settled: never paired again
        self._running = False

    def serve(self, side: int, pump: Any, step: Step) -> bool:
        """Serve ``side``'s pump with the other side's; True once this side is done (its
        step said so), False if it must now run alone. Raises what its step raised."""
        other = 1 - side
        with self._cond:
            if self._out[side] or self._out[other]:
                self._out[side] = True
                return False
            self._offers[side] = (pump, step)
            if self._offers[other] is None:  # the first: the other runs us both
                while (verdict := self._verdicts[side]) is None:
                    self._cond.wait()
                if isinstance(verdict, BaseException):
                    raise verdict
                return verdict == _DONE
            self._running = True
            offers = [offer for offer in self._offers if offer is not None]
        own = threading.current_thread()
        set_native_name(self.name)
        try:
            return self._run(side, offers)
        finally:
            set_native_name(getattr(own, "native_name", None) or own.name)
            with self._cond:
                self._running = False
                self._out[side] = True
                if self._verdicts[other] is None:  # this side is done or raised
                    self._settle(other, _ALONE)

    def _run(self, side: int, offers: list[tuple[Any, Step]]) -> bool:
        (tx, _), (rx, _) = offers
        assert _netpump is not None, "native pumps without their module"
        while True:
            which, code, why, detail = _netpump.serve_queue(tx, rx)
            step = offers[which][1]
            if which == side:
                if not step((code, why, detail)):
                    return True
                continue
            try:
                going = step((code, why, detail))
            except BaseException as exc:
                with self._cond:
                    self._settle(which, exc)
                return False
            if not going:
                with self._cond:
                    self._settle(which, _DONE)
                return False

    def _settle(self, side: int, verdict: str | BaseException) -> None:
        self._verdicts[side] = verdict
        self._out[side] = True
        self._cond.notify_all()

    def withdraw(self, side: int) -> None:
        """``side`` will not serve (or was stopped): nothing pairs with it, and a side waiting
        for a partner goes on alone (its own stopped pump then returns at once)."""
        with self._cond:
            self._out[side] = True
            if self._running:
                return  # the loop sees the stop itself
            for s in (TX, RX):
                if self._offers[s] is not None and self._verdicts[s] is None:
                    self._settle(s, _ALONE)


class NativePump:
    """A data-path thread's native pump: made in that thread (``start``), stopped from any
    (``stop``; a stop before ``start`` keeps it from running at all), let go when the thread
    is done (``end``), so that the ring and pools it holds can be unmapped. With a ``queue``,
    the pump is served in one loop with the other ``side``'s."""

    def __init__(
        self,
        late_eoi: LateEoi | None = None,
        module: str = NETPUMP,
        queue: QueueLoop | None = None,
        side: int = TX,
    ) -> None:
        self._module = module  # which native module makes the pump
        self._lock = threading.Lock()
        self._pump: Any = None
        self._stopped = False
        self._interrupted = False
        self._late_eoi = late_eoi  # where the pump's spurious wakeups are counted
        self._queue = queue
        self._side = side

    def start(
        self,
        kind: int,
        ring: BackRing | FrontRing,
        tap_fd: int,
        doorbells: tuple[str, str | None],
        **kw: Any,
    ) -> Any:
        """The pump, or None when the Python path must run (not built, not wanted, stopped)."""
        with self._lock:
            if not self._stopped and not self._interrupted:
                try:
                    self._pump = _make(kind, ring, tap_fd, doorbells, self._module, **kw)
                except (OSError, ValueError) as exc:  # a doorbell gone, no AIO context, ...
                    log.warning(
                        "%s: native pump unavailable, the Python path runs: %s", ring.name, exc
                    )
            if self._pump is None:
                self.withdraw()
            elif self._late_eoi is not None:
                self._late_eoi.adopt(self._pump)
            return self._pump

    def interrupt(self) -> None:
        """End the pump running now, as ``stop`` does, but not its path: the thread serving it
        returns (the pump answers what it has in flight first), and the Python path may carry
        on from where the pump left the ring (blkback and netback do, for injected faults).
        A pump not started yet never starts: the Python path runs from the start."""
        with self._lock:
            self._interrupted = True
            if self._pump is not None:
                self._pump.stop()

    def withdraw(self) -> None:
        """This path will not serve a native pump: its QueueLoop partner runs alone."""
        if self._queue is not None:
            self._queue.withdraw(self._side)

    def start_backend(
        self, kind: int, ring: BackRing, fd: int, evtchn: Any, counters: Any, grants: Any, **kw: Any
    ) -> Any:
        """A backend's pump (``start``) over its device ``fd``, counting in ``counters``' page
        (and in the ring's figures, where it has some) and looking refs up in the pools
        ``grants`` maps now, as granted to us."""
        if ring.figures is not None:
            kw["figures"] = ring.figures
        return self.start(
            kind,
            ring,
            fd,
            evtchn.doorbell_names(),
            counters=counters.page,
            pools=grants.native_pools(),
            domid=grants.device.grantee,
            **kw,
        )

    def serve_backend(
        self,
        pump: Any,
        ring: BackRing,
        grants: Any,
        stopping: Callable[[], bool],
        fatal: Callable[[str], BaseException],
        hand_back: Callable[[tuple[int, str, int]], None],
    ) -> None:
        """Run a backend's ``pump`` until stopped. FATAL raises ``fatal(why)``; any other end
        (a frame or request handed back, a ref that missed) is the Python path's turn:
        ``hand_back(result)``, with the pump's pools let go around it (``pools_let_go``);
        then the pump carries on where Python left the ring. The pump is let go at the end."""

        def step(result: tuple[int, str, int]) -> bool:
            code = ended(ring, pump, result)
            if code == STOPPED:
                return False
            if code == FATAL:
                raise fatal(result[1])
            with pools_let_go(pump, grants):
                hand_back(result)
            pump.indices = ring.indices()
            return True

        try:
            self._serve(pump, step, stopping)
        finally:
            self.end()

    def _serve(self, pump: Any, step: Step, stopping: Callable[[], bool]) -> None:
        """``step(pump.run())`` until it or ``stopping()`` says done; in the QueueLoop first,
        if the pump has one."""
        if self._queue is not None and self._queue.serve(self._side, pump, step):
            return
        while not stopping() and step(pump.run()):
            pass

    def doorbells(self, evtchn: Any, stopping: Any) -> tuple[str, str | None]:
        """A frontend's channel's doorbells, once its backend has bound the port (a native
        pump rings the peer's directly, so it cannot start before); the peer's is None if the
        path was stopped first."""
        if native(self._module) is None:
            return "", None  # the Python path runs: it learns the peer's as it rings
        waited = 0
        while not evtchn.wait_bound(0.2):
            if stopping():
                return "", None
            waited += 1
            if waited % 25 == 0:  # the driver's own look failed (hyperd restarting): ask too
                with contextlib.suppress(HypercallError):
                    evtchn.doorbell_names()
        return evtchn.doorbell_names()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            if self._pump is not None:
                self._pump.stop()
        self.withdraw()

    def end(self) -> None:
        with self._lock:
            if self._pump is not None and self._late_eoi is not None:
                self._late_eoi.adopt(None)
            self._pump = None

    def serve_frontend(
        self,
        kind: int,
        ring: FrontRing,
        tap_fd: int,
        evtchn: Any,
        stopping: Any,
        misbehaved: type[Exception],
        **kw: Any,
    ) -> bool:
        """Run a frontend's pump until stopped, once its backend has bound the channel; False
        if the Python path must run instead. It has no Python fallback (what it reads from the
        backend is answers, each either right or a violation): a violation raises
        ``misbehaved`` (or ProtocolViolation)."""
        pump = self.start(kind, ring, tap_fd, self.doorbells(evtchn, stopping), **kw)
        if pump is None:
            return False

        def step(result: tuple[int, str, int]) -> bool:
            code, why, _ = result
            if ended(ring, pump, result) == FATAL:
                raise misbehaved(why)
            assert code == STOPPED, f"a frontend pump ended with {code}"
            return False

        self._serve(pump, step, lambda: False)
        return True


@contextlib.contextmanager
def pools_let_go(pump: Any, grants: Any) -> Iterator[None]:
    """Around the Python path's turn (a frame or request the pump handed back, a ref that
    missed): the pump lets go of the pools it maps, so that a refresh the turn makes can unmap
    the ones the granter released (the mapper counts a pool still mapped against the device's
    bound), and takes the mapper's pools again afterwards. A pool holding a page the pump still
    uses (netback rx's posted buffers) stays mapped until that page is done."""
    pump.set_pools([])
    try:
        yield
    finally:
        pump.set_pools(grants.native_pools())

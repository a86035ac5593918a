"""A two-way byte stream over a pair of byte rings and one event channel.

The store and the console use Xen's byte-ring pages (channels/bytering.py): one ring each way in
one shared page, and a single event channel whose notification means "something changed on the
page", either new bytes to read or space freed to write. Both protocols notify after every
update, so there is no event index to re-arm: a reader drains its ring, then waits; a writer
that finds the ring full waits until the reader side of this stream sees the peer consume.

Each stream runs one reader thread that calls ``on_data`` with every chunk received, in order.
A wakeup that finds no bytes to read and sees no room freed on the ring we write is spurious: a
peer that rings in a tight loop gets the late-EOI slowdown of the backends (channels/evtchn.py
``LateEoi``), so it costs the reader a few wakeups a second, not a CPU.
A peer that corrupts the ring indices makes the stream ``broken``: ``on_close`` runs with the
error and the stream stops, without touching any other stream. ``peer_error`` lets a protocol
report a failure the peer signals in its interface page (the xenstore page's error field).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from channels.bytering import ByteRing
from channels.errors import Closed, HyperError, ProtocolViolation
from channels.evtchn import LateEoi

if TYPE_CHECKING:
    from channels.evtchn import Doorbells

log = logging.getLogger(__name__)

#: A notification lost to a peer's bug costs at most this long: waits re-check the rings.
HEAL_TIMEOUT = 30.0


class StreamClosed(Closed):
    """The stream was closed (by us) or broken (by the peer) before the write completed."""


class StreamPaused(HyperError):
    """The stream's rings are being reset (a protocol's reconnection): nothing was written of
    what is left to write; the protocol sends it again once the stream reopens."""


class RingStream:
    def __init__(
        self,
        rx: ByteRing,
        tx: ByteRing,
        evtchn: Doorbells,
        on_data: Callable[[bytes], None],
        on_close: Callable[[Exception | None], None] | None = None,
        name: str = "stream",
        peer_error: Callable[[], Exception | None] | None = None,
    ) -> None:
        self._rx = rx
        self._tx = tx
        self.evtchn = evtchn
        self._on_data = on_data
        self._on_close = on_close
        self._peer_error = peer_error
        self.name = name
        self._space = threading.Condition()
        self._closed = False
        self._paused = False
        self.error: Exception | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.late_eoi = LateEoi()

    def start(self) -> RingStream:
        self._thread.start()
        # Whatever the peer wrote before we listened is waiting: look at once.
        self.evtchn.kick()
        return self

    @property
    def closed(self) -> bool:
        return self._closed

    def pause(self) -> None:
        """Stop every writer (they raise StreamPaused) while the rings are reset."""
        with self._space:
            self._paused = True
            self._space.notify_all()

    def reopen(self) -> None:
        with self._space:
            self._paused = False

    def try_send(self, data: bytes | memoryview, force: bool = False) -> int:
        """Write what fits now; return how many bytes were written. ``force`` writes even
        while paused (the reconnecting protocol's own messages)."""
        if self._closed:
            raise StreamClosed(f"{self.name}: closed")
        with self._space:
            if self._paused and not force:
                raise StreamPaused(f"{self.name}: being reset")
            try:
                written = self._tx.write(data)
            except ProtocolViolation as exc:
                self._break(exc)
                raise StreamClosed(f"{self.name}: {exc}") from exc
        if written:
            self.evtchn.notify()
        return written

    def send(self, data: bytes, timeout: float | None = None, force: bool = False) -> None:
        """Write all of ``data``, waiting for the peer to make room (``force``: see try_send)."""
        view = memoryview(data)
        deadline = None if timeout is None else time.monotonic() + timeout
        while view:
            written = self.try_send(view, force)
            view = view[written:]
            if not view:
                return
            with self._space:
                if self._tx.free() > 0 or self._closed or (self._paused and not force):
                    continue  # (a pause cut this message short: try_send says so)
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"{self.name}: peer does not read")
                self._space.wait(
                    HEAL_TIMEOUT if remaining is None else min(remaining, HEAL_TIMEOUT)
                )

    def _run(self) -> None:
        rung = False
        try:
            consumed = self._tx.consumed()
            while not self._closed:
                data = self._rx.read()
                if data:
                    self.late_eoi.worked()
                    rung = False
                    # We consumed: the peer may be waiting for room.
                    self.evtchn.notify()
                    self._on_data(data)
                    continue
                if self._tx.consumed() != consumed:  # the peer read: our writers have room
                    consumed = self._tx.consumed()
                    self.late_eoi.worked()
                elif rung:
                    self.late_eoi.back_off()
                with self._space:
                    self._space.notify_all()
                rung = self.evtchn.wait(HEAL_TIMEOUT)
                error = self._peer_error() if self._peer_error is not None else None
                if error is not None:
                    self._break(error)
                    return
        except ProtocolViolation as exc:
            self._break(exc)
            return
        except Exception as exc:
            log.exception("%s: reader failed", self.name)
            self._break(exc)
            return
        self._finish(None)

    def _break(self, exc: Exception) -> None:
        if self.error is None:
            log.warning("%s: broken: %s", self.name, exc)
            self.error = exc
        self._closed = True
        with self._space:
            self._space.notify_all()
        self._finish(exc)

    def _finish(self, exc: Exception | None) -> None:
        callback, self._on_close = self._on_close, None
        if callback is not None:
            callback(exc)

    def close(self) -> None:
        """Stop the reader (it exits at its next wakeup, which we trigger)."""
        if self._closed:
            return
        self._closed = True
        with self._space:
            self._space.notify_all()
        self.late_eoi.stop()
        self.evtchn.kick()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5.0)

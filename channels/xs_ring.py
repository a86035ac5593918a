"""A store client over a domain's XenStore ring page (xenstore-ring.txt), the guest's side.

The domain kernel produces requests into the page's request ring and consumes replies and watch
events from its response ring, ringing its store event channel after every update. The server
(xenstored/relay.py, for the store) reports a connection it has dropped through the page's
error field.

Reconnection (xenstore-ring.txt). A server that offers it (``server_features`` bit 1) sets
``error = XENSTORE_ERROR_COMM`` when it went away (dom0 died) and its successor will take the
domain on. The client then stops writing, sets ``connection = XENSTORE_RECONNECT`` and rings;
the new server zeroes the four indices, clears ``error`` and sets ``connection`` back to
``XENSTORE_CONNECTED``, and rings. The client then sends again what the old server never
answered and registers its watches again (``XsClient.resume``). Meanwhile calls wait, they do
not fail. Any other error code, or one from a server without the feature, fails every call
with XsConnectionLost at once.
"""

from __future__ import annotations

import logging
import threading

from channels.bytering import (
    XENSTORE_CONNECTED,
    XENSTORE_CONNECTION_OFFSET,
    XENSTORE_ERROR_COMM,
    XENSTORE_ERROR_NONE,
    XENSTORE_ERROR_OFFSET,
    XENSTORE_RECONNECT,
    XENSTORE_SERVER_FEATURE_RECONNECTION,
    XENSTORE_SERVER_FEATURES_OFFSET,
    Word,
    xenstore_rings,
)
from channels.evtchn import Doorbells
from channels.stream import HEAL_TIMEOUT, RingStream, StreamPaused
from channels.xs import DEFAULT_TIMEOUT, XsClient, XsConnectionLost, XsResend

log = logging.getLogger(__name__)


class XenstoreRing:
    def __init__(
        self,
        area: memoryview,
        evtchn: Doorbells,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        name: str = "xenstore",
    ) -> None:
        self._req, self._rsp = xenstore_rings(area, name=name)
        self._error = Word(area, XENSTORE_ERROR_OFFSET)
        self._connection = Word(area, XENSTORE_CONNECTION_OFFSET)
        self._features = Word(area, XENSTORE_SERVER_FEATURES_OFFSET)
        self.reconnections = 0
        self.client = XsClient(self._send, timeout=timeout)
        self.stream = RingStream(
            self._rsp,
            self._req,
            evtchn,
            self.client.feed,
            self.client.connection_lost,
            name=name,
            peer_error=self._peer_error,
        )
        self._timeout = timeout

    def start(self) -> XenstoreRing:
        self.stream.start()
        return self

    def _send(self, data: bytes) -> None:
        try:
            self.stream.send(data, timeout=self._timeout)
        except StreamPaused as exc:
            raise XsResend(str(exc)) from exc

    def _send_during_reset(self, data: bytes) -> None:
        self.stream.send(data, timeout=self._timeout, force=True)

    def _peer_error(self) -> Exception | None:
        """Run by the stream's reader after each wakeup: the page's error field."""
        code = self._error.get()
        if not code:
            return None
        reconnectable = self._features.get() & XENSTORE_SERVER_FEATURE_RECONNECTION
        if code != XENSTORE_ERROR_COMM or not reconnectable:
            return XsConnectionLost(f"the store closed this connection (error {code})")
        return self._reconnect()

    def _reconnect(self) -> Exception | None:
        """The server went away: ask its successor for a reset and wait for it, here on the
        reader thread (nothing else reads the page meanwhile)."""
        log.warning("%s: the store went away; waiting to reconnect", self.stream.name)
        self.client.suspend()
        self.stream.pause()
        self._connection.set(XENSTORE_RECONNECT)
        self.stream.evtchn.notify()
        while not (
            self._connection.get() == XENSTORE_CONNECTED
            and self._error.get() == XENSTORE_ERROR_NONE
        ):
            if self.stream.closed:
                return XsConnectionLost("xenstore ring closed while reconnecting")
            self.stream.evtchn.wait(HEAL_TIMEOUT)
        self.reconnections += 1
        log.info("%s: reconnected to the store", self.stream.name)
        # Resending needs this thread back at reading (replies make room in the rings).
        threading.Thread(
            target=self.client.resume,
            args=(self._send_during_reset, self.stream.reopen),
            name="xenstore-resume",
            daemon=True,
        ).start()
        return None

    def close(self) -> None:
        """Stop the reader and drop every view of the page (the caller then unmaps it)."""
        self.stream.close()
        self.client.connection_lost(XsConnectionLost("xenstore ring closed"))
        self._req.close()
        self._rsp.close()
        self._error.close()
        self._connection.close()
        self._features.close()

"""A store client over a domain's XenStore ring page (xenstore-ring.txt), the guest's side.

The domain kernel produces requests into the page's request ring and consumes replies and watch
events from its response ring, ringing its store event channel after every update. The server
(dom0/relay.py, for dom0) reports a connection it has dropped through the page's error field; the
client then fails every call with XsConnectionLost instead of waiting out its timeouts.
"""

from __future__ import annotations

from channels.bytering import XENSTORE_ERROR_OFFSET, Word, xenstore_rings
from channels.evtchn import EventChannel
from channels.stream import RingStream
from channels.xs import DEFAULT_TIMEOUT, XsClient, XsConnectionLost


class XenstoreRing:
    def __init__(
        self,
        area: memoryview,
        evtchn: EventChannel,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        name: str = "xenstore",
    ) -> None:
        self._req, self._rsp = xenstore_rings(area, name=name)
        self._error = Word(area, XENSTORE_ERROR_OFFSET)
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
        self.stream.send(data, timeout=self._timeout)

    def _peer_error(self) -> Exception | None:
        code = self._error.get()
        if code:
            return XsConnectionLost(f"the store closed this connection (error {code})")
        return None

    def close(self) -> None:
        """Stop the reader and drop every view of the page (the caller then unmaps it)."""
        self.stream.close()
        self.client.connection_lost(XsConnectionLost("xenstore ring closed"))
        self._req.close()
        self._rsp.close()
        self._error.close()

"""The store's transport for a domU: its XenStore ring page and event channel.

One thread per domain. It feeds the domain's requests to its store connection and writes the
replies and watch events into the response ring. Replies never block the store: a reply that
does not fit is kept by the connection (which then stops taking requests from that domain) and
flushed when the domain has consumed some, so a domain that never reads costs bounded memory
and no other domain waits for it. A domain that corrupts its ring indices, or breaks the wire
protocol, loses its store connection (the ring's error field says why); nothing else stops.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from channels.bytering import (
    XENSTORE_ERROR_COMM,
    XENSTORE_ERROR_OFFSET,
    XENSTORE_ERROR_PROTO,
    XENSTORE_ERROR_RINGIDX,
    Word,
    xenstore_rings,
)
from channels.evtchn import from_status
from channels.hypercall import HypercallClient
from channels.ring import RingBroken
from channels.shm import attach
from channels.xs_wire import XsProtocolError
from dom0.store.core import Store

log = logging.getLogger(__name__)

HEAL_TIMEOUT = 30.0
#: Bytes taken from a domain's request ring per wakeup before serving others (fairness).
READ_BUDGET = 16 * 1024


class RingServer:
    def __init__(self, store: Store, hc: HypercallClient, domid: int, info: dict[str, Any]):
        self.domid = domid
        self._segment = attach(info["segment"])
        self._evtchn = from_status(hc, info["dom0_port"])
        self._req, self._rsp = xenstore_rings(self._segment.buf, name=f"xenstore-{domid}")
        self._stopping = False
        self._wlock = threading.Lock()
        self._tail = b""
        self._conn = store.connect(domid, self._send, self._evtchn.kick)
        self._thread = threading.Thread(target=self._run, name=f"xenstored-{domid}", daemon=True)
        self._thread.start()

    def _send(self, data: bytes) -> bool:
        """Called with the store lock held, from any thread: never blocks.

        A message (up to 4112 bytes) may not fit the 1024-byte ring even when it is empty: we
        take it whole, write what fits and keep the rest, and refuse the next message until
        the rest is out (then the connection queues it and waits for ``output_drained``)."""
        with self._wlock:
            if self._tail:
                return False
            try:
                written = self._rsp.write(data)
            except RingBroken:
                return False
            self._tail = data[written:]
        self._evtchn.notify()
        return True

    def _flush_tail(self) -> bool:
        """Write what is left of a partly sent message; True when nothing is left."""
        with self._wlock:
            if self._tail:
                written = self._rsp.write(self._tail)
                self._tail = self._tail[written:]
                if written:
                    self._evtchn.notify()
            return not self._tail

    def _run(self) -> None:
        try:
            while not self._stopping and not self._conn.closed:
                if self._flush_tail():
                    self._conn.output_drained()
                data = self._req.read(READ_BUDGET) if self._conn.wants_input() else b""
                if data:
                    self._evtchn.notify()  # room in the request ring
                    self._conn.feed(data)
                    continue
                self._evtchn.wait(HEAL_TIMEOUT)
        except RingBroken as exc:
            self._fail(XENSTORE_ERROR_RINGIDX, exc)
        except XsProtocolError as exc:
            self._fail(XENSTORE_ERROR_PROTO, exc)
        except Exception:
            log.exception("xenstored %d: transport failed", self.domid)
        else:
            if not self._stopping:  # the store dropped this domain (released)
                self._fail(XENSTORE_ERROR_COMM, ConnectionError("connection dropped by the store"))
        finally:
            self._conn.close()

    def _fail(self, code: int, exc: Exception) -> None:
        log.warning("xenstored %d: disconnecting: %s", self.domid, exc)
        error = Word(self._segment.buf, XENSTORE_ERROR_OFFSET)
        error.set(code)
        error.close()
        self._evtchn.notify()

    def close(self) -> None:
        self._stopping = True
        self._evtchn.kick()
        self._thread.join(timeout=5.0)
        self._conn.close()
        self._evtchn.close()
        self._req.close()
        self._rsp.close()
        self._segment.close()

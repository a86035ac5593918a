"""The console backend (xenconsoled's role): one per domU, over its console ring.

It keeps the last bytes each domain wrote (so `hyperctl console` shows what happened before it
attached) and relays between the ring and any attached `hyperctl console` sessions.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

from channels.bytering import console_rings
from channels.evtchn import from_status
from channels.hypercall import HypercallClient
from channels.shm import attach
from channels.stream import RingStream, StreamClosed

log = logging.getLogger(__name__)

HISTORY = 64 * 1024


class ConsoleBackend:
    def __init__(self, hc: HypercallClient, domid: int, info: dict[str, Any]) -> None:
        self.domid = domid
        self._segment = attach(info["segment"])
        self._evtchn = from_status(hc, info["dom0_port"])
        in_, out = console_rings(self._segment.buf)
        self._rings = (in_, out)
        self._lock = threading.Lock()
        self._history = bytearray()
        self._clients: list[socket.socket] = []
        # The guest produces on "out" and consumes "in": we do the opposite.
        self._stream = RingStream(
            out, in_, self._evtchn, self._from_guest, name=f"console-{domid}"
        ).start()

    def _from_guest(self, data: bytes) -> None:
        with self._lock:
            self._history += data
            del self._history[:-HISTORY]
            clients = list(self._clients)
        for client in clients:
            try:
                client.sendall(data)
            except OSError:
                self.detach(client)

    def history(self) -> bytes:
        with self._lock:
            return bytes(self._history)

    def attach(self, client: socket.socket) -> None:
        with self._lock:
            self._clients.append(client)

    def detach(self, client: socket.socket) -> None:
        with self._lock:
            if client in self._clients:
                self._clients.remove(client)

    def to_guest(self, data: bytes) -> None:
        try:
            self._stream.send(data, timeout=5.0)
        except (StreamClosed, TimeoutError) as exc:
            log.info("console %d: input dropped: %s", self.domid, exc)

    def close(self) -> None:
        self._stream.close()
        self._evtchn.close()
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            try:
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for ring in self._rings:
            ring.close()
        self._segment.close()

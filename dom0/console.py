"""The console backend (xenconsoled's role): one per domU, fed by the domain's relay process.

It keeps the last bytes each domain wrote (so `hyperctl console` shows what happened before it
attached) and relays between the domain's console ring (through xenstored/relay.py, which alone maps
it) and any attached `hyperctl console` sessions.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading

log = logging.getLogger(__name__)

HISTORY = 64 * 1024


class ConsoleBackend:
    def __init__(self, domid: int, relay: socket.socket) -> None:
        self.domid = domid
        self._relay = relay
        self._relay.settimeout(5.0)  # a guest that never reads its console drops input
        self._lock = threading.Lock()
        self._history = bytearray()
        self._clients: list[socket.socket] = []
        self._thread = threading.Thread(target=self._read, name=f"console-{domid}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                data = self._relay.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            self._from_guest(data)

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
            self._relay.sendall(data)
        except OSError as exc:
            log.info("console %d: input dropped: %s", self.domid, exc)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._relay.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5.0)
        self._relay.close()
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)

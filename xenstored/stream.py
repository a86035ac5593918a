"""Stream-socket transport, server side: one store connection per connected socket.

Each ``StreamConnection`` runs two threads. The reader receives bytes and feeds the connection,
but only while it ``wants_input()``; otherwise it stops reading and the client's unread requests
wait in the socket (backpressure reaches the client without the store holding them). The writer
drains a bounded queue with blocking ``sendall``, outside the store lock; when the queue is full,
``send`` refuses, and once the writer has emptied it, it calls ``output_drained()``.

``UnixSocketServer`` is how dom0-local tools reach the store: every client of its socket acts as
``domid`` (dom0 by default), so it accepts only peers running as the server's own uid
(SO_PEERCRED) and the socket file is mode 0600.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
from collections import deque

from channels.errors import ProtocolViolation
from xenstored.core import Store

log = logging.getLogger(__name__)

_UCRED = struct.Struct("iII")  # pid, uid, gid


class StreamConnection:
    """Serve ``store`` to the peer of ``sock`` as ``domid``; call ``close()`` to stop."""

    def __init__(self, store: Store, domid: int, sock: socket.socket, *, max_queued: int = 64):
        self.sock = sock
        self.domid = domid
        self._max_queued = max_queued
        self._cond = threading.Condition()
        self._queue: deque[bytes] = deque()
        self._refused = False
        self._closing = False
        self._input_ready = threading.Event()
        self.conn = store.connect(domid, self._send, self._stop)
        self._reader = threading.Thread(target=self._read_loop, name=f"xs{domid}-rd", daemon=True)
        self._writer = threading.Thread(target=self._write_loop, name=f"xs{domid}-wr", daemon=True)
        self._reader.start()
        self._writer.start()

    def _send(self, data: bytes) -> bool:
        with self._cond:
            if self._closing:
                return True  # the peer is gone; nothing will read it
            if len(self._queue) >= self._max_queued:
                self._refused = True
                return False
            self._queue.append(data)
            self._cond.notify_all()
            return True

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closing)
                if self._closing:
                    return
                data = self._queue.popleft()
            try:
                self.sock.sendall(data)
            except OSError as exc:
                log.info("store client of domain %d: send failed: %s", self.domid, exc)
                self._stop()
                return
            self._maybe_drained()

    def _maybe_drained(self) -> None:
        with self._cond:
            if not self._refused or self._queue:
                return
            self._refused = False
        self.conn.output_drained()
        self._input_ready.set()

    def _read_loop(self) -> None:
        while self._wait_for_input():
            try:
                data = self.sock.recv(65536)
            except OSError as exc:
                log.info("store client of domain %d: recv failed: %s", self.domid, exc)
                break
            if not data:
                break
            try:
                self.conn.feed(data)
            except ProtocolViolation:
                break  # the connection logged it and is closed
            if self.conn.closed:
                break
        self._stop()

    def _wait_for_input(self) -> bool:
        while True:
            self._input_ready.clear()
            if self._closing:
                return False
            if self.conn.wants_input():
                return True
            self._input_ready.wait()

    def _stop(self) -> None:
        with self._cond:
            self._closing = True
            self._queue.clear()
            self._cond.notify_all()
        self._input_ready.set()
        with contextlib.suppress(OSError):  # already disconnected
            self.sock.shutdown(socket.SHUT_RDWR)
        self.conn.close()

    @property
    def alive(self) -> bool:
        with self._cond:
            return not self._closing

    def close(self, timeout: float = 5.0) -> None:
        self._stop()
        for thread in (self._reader, self._writer):
            if thread is not threading.current_thread():
                thread.join(timeout)
        self.sock.close()


class UnixSocketServer:
    """A listening Unix socket at ``path`` whose clients act as ``domid`` (default dom0)."""

    def __init__(self, store: Store, path: str, *, domid: int = 0) -> None:
        self.store = store
        self.path = path
        self.domid = domid
        self._lock = threading.Lock()
        self._clients: list[StreamConnection] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind(path)
            os.chmod(path, 0o600)
            self._sock.listen(16)
        except OSError:
            self._sock.close()
            raise
        self._closing = False
        self._acceptor = threading.Thread(target=self._accept_loop, name="xs-accept", daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self._sock.accept()
            except OSError:
                if not self._closing:
                    log.exception("store socket %s: accept failed", self.path)
                return
            if not self._peer_is_trusted(sock):
                sock.close()
                continue
            with self._lock:
                self._clients = [c for c in self._clients if c.alive]
                self._clients.append(StreamConnection(self.store, self.domid, sock))

    def _peer_is_trusted(self, sock: socket.socket) -> bool:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        pid, uid, _ = _UCRED.unpack(creds)
        if uid != os.getuid():
            log.warning("store socket %s: refused pid %d running as uid %d", self.path, pid, uid)
            return False
        return True

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):  # not connected is fine for a listening socket
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._acceptor.join(5.0)
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

"""The console frontend: the workload's terminal, carried over Xen's console ring.

The kernel owns the master side of the terminal whose slave is the workload's stdio. Bytes the
workload writes go to the ring's ``out`` half; bytes from dom0's console backend (a user typing
into `hyperctl console`) arrive on the ``in`` half and are written to the terminal.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from channels.bytering import console_rings
from channels.evtchn import from_status
from channels.hypercall import HypercallClient
from channels.shm import attach
from channels.stream import RingStream, StreamClosed

log = logging.getLogger(__name__)


class ConsoleFrontend:
    def __init__(self, hc: HypercallClient, info: dict[str, Any], tty_master: int) -> None:
        self._tty = tty_master
        self._segment = attach(info["segment"])
        in_, out = console_rings(self._segment.buf)
        self._stream = RingStream(
            in_, out, from_status(hc, info["domu_port"]), self._to_tty, name="console"
        ).start()
        threading.Thread(target=self._from_tty, name="console-tty", daemon=True).start()

    def _to_tty(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._tty, view) :]

    def _from_tty(self) -> None:
        while True:
            try:
                data = os.read(self._tty, 4096)
            except OSError:
                return  # EIO: no process holds the terminal's slave side any more
            if not data:
                return
            try:
                self._stream.send(data)
            except StreamClosed:
                return

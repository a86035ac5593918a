"""Wait for file descriptors with poll(2), never select(2): select cannot watch a descriptor
numbered 1024 or above, and a process holding many doorbells (each a FIFO: channels/doorbell.py),
TAP queues or pools gets such numbers."""

from __future__ import annotations

import select
from collections.abc import Iterable


def readable(fds: Iterable[int], timeout: float | None) -> set[int]:
    """Those of ``fds`` readable (or at their end, or in error) within ``timeout`` seconds
    (None: however long it takes); empty on timeout."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
    return {fd for fd, _ in poller.poll(ms)}

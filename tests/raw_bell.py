"""A doorbell rung as a hostile or careless peer rings it: the semaphore posted whatever its
value, and a byte written into the FIFO beside it (channels/doorbell.py), every time. The
honest ``Doorbell.ring`` posts and writes only when nothing is pending."""

from __future__ import annotations

import contextlib
import os

import posix_ipc

from channels.doorbell import open_fifo


class RawBell:
    def __init__(self, name: str) -> None:
        self.name = name
        self._sem = posix_ipc.Semaphore("/" + name)
        try:
            self._fd = open_fifo(name)
        except OSError:
            self._sem.close()
            raise

    def ring(self) -> None:
        with contextlib.suppress(OSError):  # EOVERFLOW: posted more than anyone will drain
            self._sem.release()
        with contextlib.suppress(BlockingIOError):  # full: readable already
            os.write(self._fd, b"\1")

    def close(self) -> None:
        self._sem.close()
        os.close(self._fd)


def ring_once(name: str) -> None:
    """Open doorbell `name`, ring it raw once, close it."""
    bell = RawBell(name)
    try:
        bell.ring()
    finally:
        bell.close()

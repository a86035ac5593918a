"""What a domU may cost hyperd: a credit for its hypercalls, and its own log, capped.

A domU's hypercalls are answered from a credit of ``HYPERCALL_RATE`` a second, at most
``HYPERCALL_BURST`` saved up, each costing ``HYPERCALL_COST`` (dom0's are the toolstack's and
are not limited). An honest domain makes a few dozen calls as it boots or
gets a device, and none on its data path; one that loops is served at this rate, and hyperd
reads nothing more from it until its credit is back, so its calls wait in its own socket.

A domU's boot process and kernel write their output (log lines, a traceback) to a socket whose
other end hyperd reads into ``dom<N>.log``. The domain chooses how much it writes, so hyperd
reads it at most ``LOG_RATE`` bytes a second (past that it stops reading, and the domain's own
writes wait in its socket) and keeps at most ``LOG_MAX`` bytes of it on disk: at that size the
log is rotated to ``dom<N>.log.1`` (replacing the older one) and starts again, as
logrotate's ``size``/``rotate 1`` would. A flood therefore costs the host two files of bounded
size and hyperd a bounded share of its time.

Both are a ``Credit`` (channels/credit.py): a token bucket refilled at ``rate`` per second up to
``burst``; a charge that overdraws it says how long the domain must wait before it is served
again.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

from channels.credit import Credit

HYPERCALL_RATE = 200.0
HYPERCALL_BURST = 400.0
#: What one call costs, by ``Op.read_only``: a call that changes hyperd's tables makes it
#: rewrite its state file; a request it cannot parse costs as much (and is logged, at most 10).
HYPERCALL_COST = {True: 1.0, False: 10.0}
LOG_MAX = 512 << 10  # bytes of one log file; with the rotated one, 1 MiB per domain at most
LOG_RATE = 64 << 10  # bytes a second hyperd reads of one domain's output
LOG_BURST = 256 << 10
#: What a read costs the log's credit at least: a guest trickling a byte at a time must not
#: wake hyperd more often than one writing whole chunks would at the same rate.
LOG_READ_COST = 4096
READ_CHUNK = 64 << 10


class GuestLog:
    """hyperd's end of a domain's output socket, and the log file it goes to."""

    def __init__(self, path: Path, sock: socket.socket, *, fresh: bool) -> None:
        """``fresh``: a new domain (its id's old logs go); else a re-adopted one (appended)."""
        self.path = path
        self.sock = sock
        self.sock.setblocking(False)
        self.credit = Credit(LOG_RATE, LOG_BURST)
        self.paused_until = 0.0  # monotonic: not read before then (out of credit), 0: read
        if fresh:
            self._rotated.unlink(missing_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        self._fd = os.open(path, flags | (os.O_TRUNC if fresh else 0), 0o600)
        self._size = os.fstat(self._fd).st_size

    @property
    def _rotated(self) -> Path:
        return self.path.with_name(self.path.name + ".1")

    def pump(self) -> float | None:
        """Move what the domain wrote to the file: None once the domain's end is closed (all
        its processes are gone), else the seconds before it may be read again (0: at once)."""
        try:
            data = self.sock.recv(READ_CHUNK)
        except BlockingIOError:
            return 0.0
        except OSError:
            data = b""
        if not data:
            return None
        self._write(data)
        return self.credit.charge(max(len(data), LOG_READ_COST))

    def drain(self) -> None:
        """Move what is left (the domain is dead: at most its socket's buffer), credit or not."""
        while True:
            try:
                data = self.sock.recv(READ_CHUNK)
            except OSError:
                return
            if not data:
                return
            self._write(data)

    def _write(self, data: bytes) -> None:
        try:
            if self._size + len(data) > LOG_MAX or self._fd < 0:
                self._start_file()
            self._size += os.write(self._fd, data)
        except OSError:
            pass  # a full disk, say: the domain loses these lines, hyperd nothing

    def _start_file(self) -> None:
        """Rotate the full log to ``.1`` and start it again (or, after a failure, or with the
        file removed under us, just start it again)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.path, self._rotated)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC
        self._fd = os.open(self.path, flags, 0o600)
        self._size = 0

    def close(self) -> None:
        self.sock.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

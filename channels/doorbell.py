"""One direction of an event channel: a coalescing doorbell, a POSIX named semaphore with a FIFO
beside it that the waiter polls (Xen's pending bit and its ``/dev/xen/evtchn`` descriptor).

hyperd creates each doorbell (:func:`create_doorbell`) and removes it (:func:`unlink_doorbell`);
the two ends of a channel each open it by name with :class:`Doorbell`. The semaphore is the
pending bit: ringing posts it only when its value is 0, and only then writes a byte into the
FIFO, so N rings before the waiter looks give it one wakeup and cost one syscall. The FIFO is
what the waiter sleeps on: a file descriptor, so one ``poll`` can watch a doorbell together with
a TAP, another doorbell and a stop descriptor (one loop per side serving tx and rx, issue 13).
A doorbell carries no data; the consumer always re-checks its ring after waking (the ring's
final check), so a spurious wakeup costs one check and nothing else.

Names are plain names (no ``/``): ``hyper-7-vif0-tx`` is ``/dev/shm/sem.hyper-7-vif0-tx`` and
``/dev/shm/fifo.hyper-7-vif0-tx``. Both ends open the FIFO read-write and non-blocking (Linux
allows it on a FIFO): neither open waits for the other end, and the pipe stays while either
holds it, with a byte a ringer left in it.

Why value-check-then-post (``ring``) cannot lose a wakeup. The ringer (1) has published its ring
index, (2) executes a full barrier, (3) reads the semaphore value and, only if it is 0, posts
and then writes a byte into the FIFO. The waiter loops: check the ring (final check), poll the
FIFO, drain the FIFO, then drain the semaphore's counts, then check the ring again.

* If the ringer read 0, it posts and writes; the waiter's poll (or its next one) returns, and
  the waiter then re-checks the ring after reading that byte, so it sees the index published
  before the write.
* If the ringer read a value > 0, some earlier post has not been consumed yet. Consuming it is a
  locked read-modify-write that comes after the ringer's read in the semaphore word's
  modification order, hence after the ringer's index store became globally visible (step 2).
  Every consume is followed by a ring check in the waiter, and that check sees the index.
  Skipping the post therefore only drops a redundant count.
* The FIFO is drained before the semaphore: a ringer that posts between the two drains has its
  byte still in the FIFO (or about to be), which wakes the next poll at once. Draining the other
  way round could eat that byte and leave the count behind it, and every later ringer would
  then see a count and stay silent.

The barrier in step 2 matters: a plain load of the value could otherwise pass the buffered index
store. ``ring`` executes it itself (:func:`channels.ring.mb`), so callers that did not just run a
ring push (byte rings) are covered too. Two concurrent ringers may both read 0 and both post
and write; the waiter's drains fold the extra count and byte into the same wakeup.

A count can outlive its byte: the pipe's bytes go when the last handle on the FIFO closes (every
process holding the doorbell died or let it go, as when dom0 dies and a frontend reconnects),
while the semaphore's count stays in its file; and a ringer killed between its post and its
write leaves a count with no byte. Every later ringer would then see the count and stay
silent. So opening a doorbell whose count is pending writes the byte again, and a wait that
times out drains the count too (the waiter re-checks its ring after any wait): at worst one
spurious wakeup. A process stopping its own waiter cannot wait for that timeout: ``wake``
writes the byte whatever the count.

A peer that vanished: the semaphore is a small file in /dev/shm that every handle maps and the
pipe lives while any handle holds it, so ringing still succeeds after the peer exited or hyperd
unlinked the names. ``ring`` on such a doorbell is therefore silent, as is ``ring`` at the
semaphore's maximum value (EOVERFLOW: already rung) or into a full FIFO (already readable).
Only ``ring`` on a doorbell this process closed itself raises :class:`DoorbellError`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import stat
import weakref

import posix_ipc

from channels.errors import HyperError
from channels.ring import mb

SEM_DIR = "/dev/shm"


class DoorbellError(HyperError):
    """A doorbell that cannot be created, opened or used (closed, missing, exists)."""


def _sem_name(name: str) -> str:
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise ValueError(f"invalid doorbell name {name!r}")
    return "/" + name


def sem_path(name: str) -> str:
    """Where glibc keeps the named semaphore `name` (for cleanup checks)."""
    return os.path.join(SEM_DIR, "sem." + _sem_name(name)[1:])


def fifo_path(name: str) -> str:
    """Where the FIFO beside the semaphore `name` is."""
    return os.path.join(SEM_DIR, "fifo." + _sem_name(name)[1:])


def create_doorbell(name: str, mode: int = 0o600) -> None:
    """Create the doorbell `name` (its semaphore with value 0, and its FIFO), both with exactly
    `mode` (umask ignored); nothing is left behind if either cannot be made."""
    try:
        sem = posix_ipc.Semaphore(_sem_name(name), posix_ipc.O_CREX, mode=mode, initial_value=0)
    except posix_ipc.ExistentialError as e:
        raise DoorbellError(f"doorbell {name}: already exists") from e
    except posix_ipc.Error as e:
        raise DoorbellError(f"doorbell {name}: cannot create") from e
    sem.close()
    try:
        os.chmod(sem_path(name), mode)  # sem_open applied the umask
        os.mkfifo(fifo_path(name), mode)
        os.chmod(fifo_path(name), mode)  # so did mkfifo
    except FileExistsError as e:
        sem.unlink()
        raise DoorbellError(f"doorbell {name}: already exists") from e
    except OSError as e:
        unlink_doorbell(name)
        raise DoorbellError(f"doorbell {name}: cannot set mode {mode:o}") from e


def unlink_doorbell(name: str) -> None:
    """Remove the names of `name`; open handles keep working. A missing name is fine."""
    with contextlib.suppress(posix_ipc.ExistentialError):
        posix_ipc.unlink_semaphore(_sem_name(name))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(fifo_path(name))


def open_fifo(name: str) -> int:
    """The doorbell's FIFO, read-write and non-blocking; a FIFO or nothing (OSError)."""
    fd = os.open(fifo_path(name), os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a FIFO", fifo_path(name))
    return fd


class Doorbell:
    """An open handle on an existing doorbell: ``ring`` one side, ``wait`` (or poll ``fileno``
    and ``consume``) on the other."""

    def __init__(self, name: str) -> None:
        self.name = name
        try:
            self._sem = posix_ipc.Semaphore(_sem_name(name))
        except posix_ipc.ExistentialError as e:
            raise DoorbellError(f"doorbell {name}: does not exist") from e
        except posix_ipc.Error as e:
            raise DoorbellError(f"doorbell {name}: cannot open") from e
        try:
            self._fd = open_fifo(name)
        except OSError as e:
            self._sem.close()
            why = "does not exist" if e.errno == errno.ENOENT else "cannot open"
            raise DoorbellError(f"doorbell {name}: {why}") from e
        # A handle dropped without close() must not keep its descriptor: a process opens
        # thousands of doorbells over its life (a test run does), and fds are a budget.
        self._closer = weakref.finalize(self, os.close, self._fd)
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN)
        self._rearm()

    def _rearm(self) -> None:
        """A count pending without its byte (see the module's docstring) gets the byte back."""
        with contextlib.suppress(posix_ipc.ExistentialError, BlockingIOError):
            if self._sem.value > 0:
                os.write(self._fd, b"\1")

    def fileno(self) -> int:
        """The FIFO: readable while the doorbell is rung and not consumed yet."""
        if self._fd < 0:
            raise DoorbellError(f"doorbell {self.name}: waited on after close")
        return self._fd

    def ring(self) -> None:
        """Notify the waiter; coalesces with any notification it has not consumed yet."""
        mb()  # our ring index store must be visible before we read the semaphore's value
        try:
            if self._sem.value != 0:
                return
            self._sem.release()
        except posix_ipc.ExistentialError as e:
            raise DoorbellError(f"doorbell {self.name}: rung after close") from e
        except OSError as e:
            if e.errno != errno.EOVERFLOW:
                raise DoorbellError(f"doorbell {self.name}: cannot post") from e
            return
        with contextlib.suppress(BlockingIOError):  # full: readable already
            os.write(self._fd, b"\1")

    def wake(self) -> None:
        """Wake the waiter whatever the semaphore holds: the byte alone, written every time.
        A process stopping its own waiter (``kick``) calls this: ``ring`` stays silent while a
        count is pending, and a peer killed between its post and its write (or a hostile one
        posting without writing) leaves exactly that, which would hold the waiter asleep
        until its heal timeout and its owner's stop with it."""
        if self._fd < 0:
            raise DoorbellError(f"doorbell {self.name}: woken after close")
        with contextlib.suppress(BlockingIOError):  # full: readable already
            os.write(self._fd, b"\1")

    def wait(self, timeout: float | None) -> bool:
        """Sleep until rung or `timeout` seconds pass (None: forever); True if rung."""
        fd = self.fileno()
        ready = self._poll.poll(None if timeout is None else max(0, int(timeout * 1000 + 0.999)))
        if fd != self._fd:  # closed by another thread meanwhile
            return False
        self.consume()  # on a timeout too: a count left without its byte goes
        return bool(ready)

    #: Honest ringers leave at most a count or two behind (ring() posts only on 0). A peer that
    #: writes a huge value into the semaphore's shared word, or fills the FIFO, must not make us
    #: spin through it: what is left merely wakes us again at once, each time doing the bounded
    #: work of a wakeup.
    DRAIN_LIMIT = 64

    def consume(self) -> None:
        """Take the pending notification: the FIFO's bytes, then the semaphore's counts (in this
        order, see the module's docstring), so N rings give one wakeup."""
        with contextlib.suppress(BlockingIOError):
            os.read(self.fileno(), 4096)
        for _ in range(self.DRAIN_LIMIT):
            try:
                self._sem.acquire(0)
            except posix_ipc.BusyError:
                return

    def close(self) -> None:
        """Close this handle (idempotent); the names stay until unlink_doorbell."""
        with contextlib.suppress(posix_ipc.ExistentialError):  # already closed
            self._sem.close()
        self._fd = -1
        self._closer()  # closes the FIFO once

    def __enter__(self) -> Doorbell:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DoorbellPair:
    """A bound event channel's two doorbells, opened by name in a process that only waits and
    rings (a relay, a data-path worker, a FUSE server): the process that holds the hypercall
    socket bound the channel and closes it. The interface is EventChannel's data-path half."""

    def __init__(self, mine: str, peer: str) -> None:
        self._mine = Doorbell(mine)
        try:
            self._peer = Doorbell(peer)
        except DoorbellError:
            self._mine.close()
            raise

    def doorbell_names(self) -> tuple[str, str | None]:
        """(ours, the peer's), as EventChannel.doorbell_names: what a native pump opens."""
        return self._mine.name, self._peer.name

    def wait(self, timeout: float | None) -> bool:
        """Sleep until the peer rings (True) or ``timeout`` seconds pass (False)."""
        return self._mine.wait(timeout)

    def notify(self) -> None:
        """Ring the peer."""
        self._peer.ring()

    def kick(self) -> None:
        """Wake our own waiter (to stop it), even past a count the peer left pending."""
        self._mine.wake()

    def close(self) -> None:
        self._mine.close()
        self._peer.close()

"""One direction of an event channel: a POSIX named semaphore used as a coalescing doorbell.

hyperd creates each doorbell (:func:`create_doorbell`) and removes it (:func:`unlink_doorbell`);
the two ends of a channel each open it by name with :class:`Doorbell`. Like a Xen event
channel's pending bit, rings coalesce: N rings before the waiter looks give it one wakeup.
A doorbell carries no data; the consumer always re-checks its ring after waking (the ring's
final check), so a spurious wakeup costs one check and nothing else.

Names are plain names (no ``/``): ``hyper-7-vif0-tx`` lives in ``/dev/shm/sem.hyper-7-vif0-tx``.

Why value-check-then-post (``ring``) cannot lose a wakeup. The ringer (1) has published its ring
index, (2) executes a full barrier, (3) reads the semaphore value and posts only if it is 0.
The waiter loops: check the ring (final check), wait on the semaphore, drain extra counts,
check the ring again.

* If the ringer read 0, it posts; the waiter's wait (or its next one) returns, and the waiter
  then re-checks the ring, after the post, so it sees the index published before the post
  (``sem_post``/``sem_wait`` synchronise memory).
* If the ringer read a value > 0, some earlier post has not been consumed yet. Consuming it is a
  locked read-modify-write that comes after the ringer's read in the semaphore word's
  modification order, hence after the ringer's index store became globally visible (step 2).
  Every consume (the wait itself or a drain) is followed by a ring check in the waiter, and that
  check sees the index. Skipping the post therefore only drops a redundant count.

The barrier in step 2 matters: a plain load of the value could otherwise pass the buffered index
store. ``ring`` executes it itself (:func:`channels.ring.mb`), so callers that did not just run a
ring push (byte rings) are covered too. Two concurrent ringers may both read 0 and both post;
the waiter's drain folds the extra count into the same wakeup.

A peer that vanished: a named semaphore is a small file in /dev/shm that every handle maps, so
posting still succeeds after the peer exited or hyperd unlinked the name; the count stays
unread and the memory goes away with the last mapping. ``ring`` on such a doorbell is therefore
silent, as is ``ring`` at the semaphore's maximum value (EOVERFLOW: already rung). Only ``ring``
on a doorbell this process closed itself raises :class:`DoorbellError`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time

import posix_ipc

from channels.ring import mb

SEM_DIR = "/dev/shm"


class DoorbellError(Exception):
    """A doorbell that cannot be created, opened or used (closed, missing, exists)."""


def _sem_name(name: str) -> str:
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise ValueError(f"invalid doorbell name {name!r}")
    return "/" + name


def sem_path(name: str) -> str:
    """Where glibc keeps the named semaphore `name` (for cleanup checks)."""
    return os.path.join(SEM_DIR, "sem." + _sem_name(name)[1:])


def create_doorbell(name: str, mode: int = 0o600) -> None:
    """Create the named semaphore `name` with value 0 and exactly `mode` (umask ignored)."""
    try:
        sem = posix_ipc.Semaphore(_sem_name(name), posix_ipc.O_CREX, mode=mode, initial_value=0)
    except posix_ipc.ExistentialError as e:
        raise DoorbellError(f"doorbell {name}: already exists") from e
    except posix_ipc.Error as e:
        raise DoorbellError(f"doorbell {name}: cannot create") from e
    try:
        os.chmod(sem_path(name), mode)  # sem_open applied the umask
    except OSError as e:
        sem.unlink()
        raise DoorbellError(f"doorbell {name}: cannot set mode {mode:o}") from e
    finally:
        sem.close()


def unlink_doorbell(name: str) -> None:
    """Remove the name `name`; open handles keep working. A missing name is fine."""
    with contextlib.suppress(posix_ipc.ExistentialError):
        posix_ipc.unlink_semaphore(_sem_name(name))


class Doorbell:
    """An open handle on an existing doorbell: ``ring`` one side, ``wait`` on the other."""

    def __init__(self, name: str) -> None:
        self.name = name
        try:
            self._sem = posix_ipc.Semaphore(_sem_name(name))
        except posix_ipc.ExistentialError as e:
            raise DoorbellError(f"doorbell {name}: does not exist") from e
        except posix_ipc.Error as e:
            raise DoorbellError(f"doorbell {name}: cannot open") from e

    def ring(self) -> None:
        """Notify the waiter; coalesces with any notification it has not consumed yet."""
        mb()  # our ring index store must be visible before we read the semaphore's value
        try:
            if self._sem.value == 0:
                self._sem.release()
        except posix_ipc.ExistentialError as e:
            raise DoorbellError(f"doorbell {self.name}: rung after close") from e
        except OSError as e:
            if e.errno != errno.EOVERFLOW:
                raise DoorbellError(f"doorbell {self.name}: cannot post") from e

    def wait(self, timeout: float | None) -> bool:
        """Sleep until rung or `timeout` seconds pass (None: forever); True if rung."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                self._sem.acquire(remaining)
                break
            except posix_ipc.BusyError:
                return False
            except posix_ipc.SignalError:
                continue  # the handler ran and did not raise: resume waiting (PEP 475)
            except posix_ipc.ExistentialError as e:
                raise DoorbellError(f"doorbell {self.name}: waited on after close") from e
        self._drain()
        return True

    #: Honest ringers leave at most a count or two behind (ring() posts only on 0). A peer that
    #: writes a huge value into the semaphore's shared word must not make us spin through it:
    #: what is left merely wakes us again at once, each time doing the bounded work of a wakeup.
    DRAIN_LIMIT = 64

    def _drain(self) -> None:
        """Consume counts from concurrent ringers so N rings give one wakeup."""
        for _ in range(self.DRAIN_LIMIT):
            try:
                self._sem.acquire(0)
            except posix_ipc.BusyError:
                return

    def close(self) -> None:
        """Close this handle (idempotent); the name stays until unlink_doorbell."""
        with contextlib.suppress(posix_ipc.ExistentialError):  # already closed
            self._sem.close()

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
        """Ring our own doorbell: wakes our waiter (to stop it)."""
        self._mine.ring()

    def close(self) -> None:
        self._mine.close()
        self._peer.close()

"""channels.doorbell: coalescing, timeouts, polling, a vanished peer, create/unlink."""

from __future__ import annotations

import contextlib
import errno
import os
import select
import stat
import threading
import uuid
from collections.abc import Iterator

import posix_ipc
import pytest

from channels.doorbell import (
    Doorbell,
    DoorbellError,
    DoorbellPair,
    create_doorbell,
    fifo_path,
    sem_path,
    unlink_doorbell,
)
from channels.evtchn import LateEoi

SHORT = 0.05  # a wait that is expected to time out
LONG = 10.0  # a wait that is expected to succeed; reaching it fails the test


@pytest.fixture
def name() -> Iterator[str]:
    """A fresh doorbell, always unlinked afterwards."""
    bell_name = f"hyper-test-bell-{uuid.uuid4().hex}"
    create_doorbell(bell_name)
    yield bell_name
    unlink_doorbell(bell_name)
    assert not os.path.exists(sem_path(bell_name))
    assert not os.path.exists(fifo_path(bell_name))


def readable(bell: Doorbell) -> bool:
    return bool(select.select([bell], [], [], 0)[0])


@pytest.fixture
def pair(name: str) -> Iterator[tuple[Doorbell, Doorbell]]:
    """Two handles on one doorbell: the ringer's and the waiter's."""
    ringer, waiter = Doorbell(name), Doorbell(name)
    yield ringer, waiter
    ringer.close()
    waiter.close()


def test_a_fresh_doorbell_is_not_rung(pair: tuple[Doorbell, Doorbell]) -> None:
    _, waiter = pair
    assert waiter.wait(SHORT) is False


def test_ring_then_wait(pair: tuple[Doorbell, Doorbell]) -> None:
    ringer, waiter = pair
    ringer.ring()
    assert waiter.wait(LONG) is True
    assert waiter.wait(SHORT) is False


def test_many_rings_coalesce_into_one_wakeup(pair: tuple[Doorbell, Doorbell]) -> None:
    ringer, waiter = pair
    for _ in range(100):
        ringer.ring()
    assert waiter.wait(LONG) is True
    assert waiter.wait(SHORT) is False


def test_wait_drains_counts_posted_by_concurrent_ringers(
    name: str, pair: tuple[Doorbell, Doorbell]
) -> None:
    _, waiter = pair
    raw = posix_ipc.Semaphore("/" + name)  # three ringers that all saw 0, posted and wrote
    fifo = os.open(fifo_path(name), os.O_WRONLY | os.O_NONBLOCK)
    try:
        for _ in range(3):
            raw.release()
            os.write(fifo, b"\1")
        assert waiter.wait(LONG) is True
        assert raw.value == 0
        assert not readable(waiter)
        assert waiter.wait(SHORT) is False
    finally:
        raw.close()
        os.close(fifo)


def test_the_fifo_is_readable_while_rung_and_consume_takes_it(
    pair: tuple[Doorbell, Doorbell],
) -> None:
    ringer, waiter = pair
    assert not readable(waiter)
    ringer.ring()
    ringer.ring()
    assert readable(waiter)
    waiter.consume()
    assert not readable(waiter)
    ringer.ring()  # consumed: the next ring wakes again
    assert readable(waiter)


class _RingsAsTheDrainEnds:
    """The waiter's semaphore, with a ringer that rings the moment its drain finds no count
    left: between the waiter's two drains, had it drained the semaphore first."""

    def __init__(self, real: posix_ipc.Semaphore, ringer: Doorbell) -> None:
        self.real, self.ringer, self.rang = real, ringer, False

    def acquire(self, timeout: float) -> None:
        try:
            self.real.acquire(timeout)
        except posix_ipc.BusyError:
            if not self.rang:
                self.rang = True
                self.ringer.ring()
            raise


def test_a_ring_during_the_drain_is_not_lost(pair: tuple[Doorbell, Doorbell]) -> None:
    ringer, waiter = pair
    ringer.ring()
    real = waiter._sem
    waiter._sem = _RingsAsTheDrainEnds(real, ringer)
    try:
        assert waiter.wait(LONG) is True
    finally:
        waiter._sem = real
    assert waiter.wait(SHORT) is True, "the ring during the drain must wake the next wait"


def test_a_count_that_lost_its_byte_rings_again_when_the_doorbell_is_opened(name: str) -> None:
    """Everyone let go of the FIFO (its byte went with the pipe) while the count stayed: the
    next to open the doorbell (a restarted backend) is woken, and rings work again."""
    raw = posix_ipc.Semaphore("/" + name)
    try:
        raw.release()  # a count, and no byte: nobody holds the FIFO
        with Doorbell(name) as waiter, Doorbell(name) as ringer:
            assert waiter.wait(LONG) is True
            ringer.ring()
            assert waiter.wait(LONG) is True
    finally:
        raw.close()


def test_a_wait_that_times_out_takes_a_count_left_without_its_byte(
    name: str, pair: tuple[Doorbell, Doorbell]
) -> None:
    """A ringer killed between its post and its write: the waiter's next heal clears the count,
    so the next ring is heard."""
    ringer, waiter = pair
    raw = posix_ipc.Semaphore("/" + name)
    try:
        raw.release()
        assert waiter.wait(SHORT) is False
        assert raw.value == 0
        ringer.ring()
        assert waiter.wait(LONG) is True
    finally:
        raw.close()


def test_wake_stops_a_waiter_past_a_count_left_without_its_byte(
    name: str, pair: tuple[Doorbell, Doorbell]
) -> None:
    """The peer was killed between its post and its write, so ``ring`` stays silent; a backend
    stopping its own dispatcher must still wake it at once, not after the heal timeout (a
    blkback stop once waited out its 5 s join that way, CI run of 6572bdd)."""
    own, waiter = pair  # opened before the count: opening would write its byte again
    raw = posix_ipc.Semaphore("/" + name)
    try:
        raw.release()
        result: list[bool] = []
        sleeper = threading.Thread(target=lambda: result.append(waiter.wait(LONG)))
        sleeper.start()
        own.ring()  # silent: a count is pending
        own.wake()
        sleeper.join(LONG + 5)
        assert result == [True]
    finally:
        raw.close()


def test_kick_wakes_a_pairs_own_waiter_past_a_pending_count(name: str) -> None:
    peer = f"{name}-peer"
    create_doorbell(peer)
    raw = posix_ipc.Semaphore("/" + name)
    try:
        pair = DoorbellPair(name, peer)
        raw.release()  # after the open: the count stays without its byte
        result: list[bool] = []
        sleeper = threading.Thread(target=lambda: result.append(pair.wait(LONG)))
        sleeper.start()
        pair.kick()
        sleeper.join(LONG + 5)
        pair.close()
        assert result == [True]
    finally:
        raw.close()
        unlink_doorbell(peer)


def test_a_full_fifo_is_silent_and_still_wakes(name: str, pair: tuple[Doorbell, Doorbell]) -> None:
    ringer, waiter = pair
    fifo = os.open(fifo_path(name), os.O_WRONLY | os.O_NONBLOCK)
    try:
        with contextlib.suppress(BlockingIOError):
            while True:  # a peer filled the pipe
                os.write(fifo, b"\1" * 4096)
    finally:
        os.close(fifo)
    ringer.ring()  # posts; the write finds the pipe full, which is rung already
    assert waiter.wait(LONG) is True


def test_ring_wakes_a_sleeping_waiter(pair: tuple[Doorbell, Doorbell]) -> None:
    ringer, waiter = pair
    result: list[bool] = []
    sleeper = threading.Thread(target=lambda: result.append(waiter.wait(LONG)))
    sleeper.start()
    ringer.ring()
    sleeper.join(LONG + 5)
    assert result == [True]


def test_ring_after_the_name_is_unlinked_is_silent(name: str) -> None:
    with Doorbell(name) as ringer, Doorbell(name) as waiter:
        unlink_doorbell(name)  # hyperd tore the channel down; our handles stay valid
        ringer.ring()
        assert waiter.wait(LONG) is True


def test_ring_does_not_post_while_a_count_is_pending(name: str) -> None:
    with Doorbell(name) as ringer:
        raw = posix_ipc.Semaphore("/" + name)
        try:
            for _ in range(3):
                raw.release()
            ringer.ring()  # value > 0: coalesced, no post, no write
            assert raw.value == 3
            assert not readable(ringer)
        finally:
            raw.close()


class _FullSemaphore:
    """Stands in for a semaphore another poster drove to SEM_VALUE_MAX between check and post."""

    value = 0

    def release(self) -> None:
        raise OSError(errno.EOVERFLOW, os.strerror(errno.EOVERFLOW))


def test_ring_on_an_overflowing_semaphore_is_silent(name: str) -> None:
    bell = Doorbell(name)
    real, bell._sem = bell._sem, _FullSemaphore()
    try:
        bell.ring()  # already rung as far as it goes: not an error
        assert not readable(bell)
    finally:
        bell._sem = real
        bell.close()


def test_closed_doorbell_refuses_use(name: str) -> None:
    bell = Doorbell(name)
    bell.close()
    bell.close()  # idempotent
    with pytest.raises(DoorbellError, match=f"doorbell {name}: rung after close"):
        bell.ring()
    with pytest.raises(DoorbellError, match="waited on after close"):
        bell.wait(SHORT)


def test_opening_a_missing_doorbell_names_it() -> None:
    missing = f"hyper-test-missing-{uuid.uuid4().hex}"
    with pytest.raises(DoorbellError, match=f"doorbell {missing}: does not exist"):
        Doorbell(missing)


def test_create_twice_fails_and_unlink_missing_is_fine(name: str) -> None:
    with pytest.raises(DoorbellError, match="already exists"):
        create_doorbell(name)
    unlink_doorbell(name)
    unlink_doorbell(name)


def test_create_applies_the_exact_mode() -> None:
    bell_name = f"hyper-test-mode-{uuid.uuid4().hex}"
    old_umask = os.umask(0o077)
    try:
        create_doorbell(bell_name, mode=0o660)
        assert stat.S_IMODE(os.stat(sem_path(bell_name)).st_mode) == 0o660
        fifo = os.stat(fifo_path(bell_name))
        assert stat.S_ISFIFO(fifo.st_mode) and stat.S_IMODE(fifo.st_mode) == 0o660
    finally:
        os.umask(old_umask)
        unlink_doorbell(bell_name)
    assert not os.path.exists(sem_path(bell_name))
    assert not os.path.exists(fifo_path(bell_name))


def test_a_doorbell_whose_fifo_is_not_a_fifo_does_not_open(name: str) -> None:
    os.unlink(fifo_path(name))
    with open(fifo_path(name), "w"):  # a plain file where the FIFO was
        pass
    with pytest.raises(DoorbellError, match=f"doorbell {name}: cannot open"):
        Doorbell(name)


@pytest.mark.parametrize("bad", ["", "a/b", "..", "nul\0"])
def test_names_with_slashes_or_nul_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid doorbell name"):
        create_doorbell(bad)


def test_late_eoi_lets_one_spurious_wakeup_pass_then_doubles_its_wait_up_to_a_second() -> None:
    late = LateEoi()
    waits = [late.idle() for _ in range(14)]
    assert waits[:4] == [0.0, 0.001, 0.002, 0.004]
    assert waits[-1] == 1.0 and max(waits) == 1.0
    late.worked()
    assert late.idle() == 0.0, "work resets it"
    assert late.spurious == 15


def test_late_eoi_waits_a_second_however_long_the_storm_lasts() -> None:
    """A storm of hours is 2**N spurious wakeups in a row; the wait must stay a second."""
    late = LateEoi()
    late.run = 10_000
    assert late.idle() == 1.0

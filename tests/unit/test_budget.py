"""What a domU may cost hyperd: its credit, and its log's rate and size (hyperd/budget.py)."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from hyperd import budget
from hyperd.budget import Credit, GuestLog
from hyperd.hypervisor import MAX_LOG_LINE, BoundedLines


def test_a_credit_lets_a_burst_through_then_says_how_long_to_wait() -> None:
    now = [0.0]
    credit = Credit(rate=100.0, burst=10.0, clock=lambda: now[0])
    assert [credit.charge(1.0) for _ in range(10)] == [0.0] * 10
    assert credit.charge(5.0) == pytest.approx(0.05), "five tokens short at 100 a second"
    now[0] += 0.05
    assert credit.charge(0.0) == 0.0, "refilled as long as it said"
    now[0] += 3600
    assert credit.charge(11.0) == pytest.approx(0.01), "never more than the burst saved up"


@pytest.fixture
def guest_end(tmp_path: Path) -> Iterator[tuple[socket.socket, GuestLog]]:
    ours, theirs = socket.socketpair()
    log = GuestLog(tmp_path / "dom7.log", ours, fresh=True)
    yield theirs, log
    theirs.close()
    log.close()


def test_a_flood_rotates_the_log_and_keeps_it_under_its_cap(
    guest_end: tuple[socket.socket, GuestLog], monkeypatch: pytest.MonkeyPatch
) -> None:
    guest, log = guest_end
    monkeypatch.setattr(budget, "LOG_MAX", 10_000)
    rotated = log.path.with_name("dom7.log.1")
    chunk = b"y" * 3000
    for _ in range(100):  # 300 kB, thirty times the cap
        guest.sendall(chunk)
        log.drain()
    assert rotated.exists()
    assert log.path.stat().st_size <= 10_000 and rotated.stat().st_size <= 10_000


def test_past_its_rate_the_log_is_not_read_until_the_credit_is_back(
    guest_end: tuple[socket.socket, GuestLog],
) -> None:
    guest, log = guest_end
    wait: float | None = 0.0
    for _ in range(64):  # 4 MiB at most, sixteen bursts
        guest.sendall(b"z" * budget.READ_CHUNK)
        wait = log.pump()
        if wait:
            break
    assert wait is not None and wait > 0, "past the burst, hyperd is told to stop reading"
    assert log.path.stat().st_size <= budget.LOG_BURST + budget.READ_CHUNK


def test_what_a_dead_domain_wrote_last_is_kept(guest_end: tuple[socket.socket, GuestLog]) -> None:
    guest, log = guest_end
    guest.sendall(b"Traceback: the kernel died\n")
    guest.close()
    log.drain()
    assert log.path.read_bytes() == b"Traceback: the kernel died\n"
    assert log.pump() is None, "its end closed"


def test_a_new_domain_starts_a_new_log_and_an_adopted_one_appends(tmp_path: Path) -> None:
    path = tmp_path / "dom3.log"
    path.write_text("old domain 3\n")
    path.with_name("dom3.log.1").write_text("older\n")
    for fresh, expected in ((False, "old domain 3\n"), (True, "")):
        ours, theirs = socket.socketpair()
        GuestLog(path, ours, fresh=fresh).close()
        theirs.close()
        assert path.read_text() == expected
    assert not path.with_name("dom3.log.1").exists()


def test_a_log_removed_under_hyperd_starts_again(guest_end: tuple[socket.socket, GuestLog]) -> None:
    guest, log = guest_end
    log.path.unlink()  # logrotate without copytruncate, or an administrator
    for _ in range(budget.LOG_MAX // budget.READ_CHUNK):  # up to the cap, into the lost file
        guest.sendall(b"a" * budget.READ_CHUNK)
        log.drain()
    guest.sendall(b"after\n" * 4)
    log.drain()
    assert log.path.read_bytes() == b"after\n" * 4, "rotation found no file to move, and went on"


def test_no_line_of_hyperds_log_outgrows_its_bound() -> None:
    record = logging.LogRecord(
        "hyperd", logging.WARNING, "", 0, "bad hypercall: %s", ("k" * 5000,), None
    )
    assert BoundedLines().filter(record)
    assert len(record.getMessage()) <= MAX_LOG_LINE + len(" [cut]")

"""bench/stages.py, on this test's own process: per-thread CPU and context switches grouped by
thread name and divided by the work done, and the machine's busy time (no root needed)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from bench.stages import (
    MachineClock,
    Stage,
    StageMeter,
    children,
    per_thousand,
    read_thread,
    sample_all,
    since_all,
)
from channels.threadname import NamedThread

TIMEOUT = 30.0
WAITS = 50


def spin_until(done: Callable[[], bool]) -> None:
    """Burn CPU on this thread until ``done()`` (the CPU clocks count in ticks)."""
    deadline = time.monotonic() + TIMEOUT
    while not done():
        assert time.monotonic() < deadline, "the clock never moved"
        sum(range(10_000))


def my_ticks() -> int:
    """utime + stime of the calling thread."""
    times = read_thread(os.getpid(), threading.get_native_id())
    assert times is not None
    return times.cpu_ticks


def burn_two_ticks() -> None:
    start = my_ticks()
    spin_until(lambda: my_ticks() >= start + 2)


def sleep_often() -> None:
    pause = threading.Event()
    for _ in range(WAITS):
        pause.wait(0.001)  # each wait gives the CPU up: a voluntary context switch


def run_named(name: str, target: Callable[[], None]) -> None:
    thread = NamedThread(target=target, native_name=name)
    thread.start()
    thread.join(TIMEOUT)
    assert not thread.is_alive()


def test_threads_are_grouped_by_name_and_divided_by_the_stages_work() -> None:
    stage = Stage("this test", os.getpid(), ("dev",))
    meter = StageMeter(lambda: [stage])
    before = meter.sample()
    burned, parked = threading.Event(), threading.Event()

    def burn_then_park() -> None:
        burn_two_ticks()
        burned.set()
        parked.wait(TIMEOUT)

    for _ in range(2):
        run_named("sleeper", sleep_often)  # ends before the window does
    burner = NamedThread(target=burn_then_park, native_name="burner")
    burner.start()  # still alive as the window ends
    try:
        assert burned.wait(TIMEOUT)
        rows = meter.since(before, 0.0)
    finally:
        parked.set()
        burner.join(TIMEOUT)
    per_thousand(rows, {"dev": 500, "other": 7})
    by_thread = {row["thread"]: row for row in rows}

    burner_row = by_thread["burner"]
    assert burner_row["threads"] == 1
    assert burner_row["cpu_us"] >= 2 * 1e6 / os.sysconf("SC_CLK_TCK")
    assert burner_row["work"] == 500
    assert burner_row["cpu_us_per_1k"] == burner_row["cpu_us"] * 2
    # The sleepers ended before the end of the window: not among the live threads' rows.
    assert "sleeper" not in by_thread
    total = by_thread[None]
    assert total["stage"] == "this test" and total["pid"] == os.getpid()
    assert total["cpu_us"] >= burner_row["cpu_us"]


def test_voluntary_switches_are_counted_per_thread_name() -> None:
    stage = Stage("this test", os.getpid(), ("dev",))
    meter = StageMeter(lambda: [stage])
    parked = threading.Event()
    waited = [threading.Event(), threading.Event()]

    def wait_then_park(done: threading.Event) -> None:
        sleep_often()
        done.set()
        parked.wait(TIMEOUT)

    threads = [NamedThread(target=wait_then_park, args=(e,), native_name="waiter") for e in waited]
    before = meter.sample()
    for thread in threads:
        thread.start()
    try:
        assert all(done.wait(TIMEOUT) for done in waited)
        rows = meter.since(before, 0.0)
    finally:
        parked.set()
        for thread in threads:
            thread.join(TIMEOUT)
    per_thousand(rows, {"dev": 2000})
    waiter = next(row for row in rows if row["thread"] == "waiter")
    assert waiter["threads"] == 2
    assert waiter["voluntary"] >= 2 * WAITS
    assert waiter["voluntary_per_1k"] == waiter["voluntary"] / 2


def test_a_stage_whose_process_is_gone_has_no_thread_rows() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    stage = Stage("gone", child.pid, ("dev",))
    before = StageMeter(lambda: [stage]).sample()
    child.wait()
    rows = StageMeter(lambda: [stage]).since(before, 0.0)
    assert [row["thread"] for row in rows] == [None]
    per_thousand(rows, {})
    assert rows[0]["work"] == 0 and rows[0]["cpu_us_per_1k"] is None


def test_probes_are_read_in_order_before_and_in_reverse_order_after() -> None:
    calls: list[str] = []

    class Probe:
        def __init__(self, name: str) -> None:
            self.name = name

        def sample(self) -> str:
            calls.append(f"sample {self.name}")
            return self.name

        def since(self, before: str, seconds: float) -> str:
            calls.append(f"since {self.name}")
            return f"{before} over {seconds}"

    probes = {"costly": Probe("costly"), "cheap": Probe("cheap")}
    changes = since_all(probes, sample_all(probes), 2.0)  # type: ignore[arg-type]
    assert calls == ["sample costly", "sample cheap", "since cheap", "since costly"]
    assert list(changes.items()) == [("costly", "costly over 2.0"), ("cheap", "cheap over 2.0")]


def test_the_machine_clock_counts_busy_time() -> None:
    clock = MachineClock()
    before = clock.sample()
    spin_until(lambda: clock.busy_ticks() >= before[1] + 2)
    used = clock.since(before, 0.0)
    assert used["busy_seconds"] >= 2 / os.sysconf("SC_CLK_TCK")
    assert used["wall_seconds"] > 0 and used["busy_percent"] > 0


def test_children_finds_a_child_by_its_parent() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        assert child.pid in children(os.getpid())
    finally:
        child.communicate(b"")
    assert child.pid not in children(os.getpid())

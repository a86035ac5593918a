"""Where a data path's CPU goes, for bench/net.py and bench/blk.py: the machine's busy time, and
per-thread CPU and context switches of every process on hyper's data path, over each run.

- ``MachineClock``: the whole machine's busy time over a run, from the ``cpu`` line of
  /proc/stat (every state but idle and iowait). The kernel's own paths (veth, the raw loop
  device) have no process of their own to measure (their work is done in softirqs and in the
  callers' system time), so every path is measured this same way and divided by the work done:
  % of one CPU per Gbit/s, per 1,000 IOPS or per GB/s. On a shared machine it also counts
  whatever else ran meanwhile; each run also pays its client's start (``hyperctl exec``, a
  Python process, on hyper's paths).
- ``StageMeter``: for each ``Stage`` (a process on hyper's data path: a domU kernel running
  netfront, blkfront's FUSE server, a backend worker, dom0), every thread's utime+stime
  (/proc/<pid>/task/<tid>/stat, in clock ticks of 10 ms), its run time (.../schedstat, in
  nanoseconds, when the kernel keeps it) and its voluntary and nonvoluntary context switches
  (.../status), grouped by thread name (comm; a thread that never named itself shows its
  process's name: see channels/threadname.py). A stage's total is its process's own
  utime+stime, which also counts threads that ended during the run. ``per_thousand`` divides
  each figure by the frames (net: its vifs' packets) or requests (blk: its vbd's) of the devices
  the stage serves.

Probes (``Probe``) are sampled in the order given before a run and in reverse order after it, so
that the costly ones (a toolstack call for counters or pids) happen outside the windows of the
cheap ones (/proc reads).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rich.table import Table

from bench.create import RUN, BenchError
from channels import control
from channels.errors import HyperError

TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")
IDLE_STATES = (3, 4)  # idle and iowait, of /proc/stat's cpu line


class Probe(Protocol):
    """Something sampled before and after each run; ``since`` gives what changed over it
    (``seconds``: the run's own duration, as its program reported it)."""

    def sample(self) -> Any: ...

    def since(self, before: Any, seconds: float) -> Any: ...


def sample_all(probes: dict[str, Probe]) -> dict[str, Any]:
    return {name: probe.sample() for name, probe in probes.items()}


def since_all(probes: dict[str, Probe], before: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Each probe's change since ``before``, taken in reverse order (see the docstring)."""
    changes = {name: probes[name].since(before[name], seconds) for name in reversed(probes)}
    return {name: changes[name] for name in probes}


def ask(request: control.Request) -> Any:
    """One toolstack request, as hyperctl makes it (no CLI process: it would cost CPU)."""
    try:
        return control.call(RUN.toolstack_socket, request, timeout=30.0)
    except HyperError as exc:
        raise BenchError(f"toolstack {request.method}: {exc}") from exc


# -- the whole machine ------------------------------------------------------------------------


class MachineClock:
    """The whole machine's busy time over a run (every CPU), from /proc/stat."""

    @staticmethod
    def busy_ticks() -> int:
        with open("/proc/stat") as f:
            # user nice system idle iowait irq softirq steal; guest and guest_nice after them
            # are already counted in user and nice.
            states = [int(x) for x in f.readline().split()[1:9]]
        return sum(states) - sum(states[i] for i in IDLE_STATES)

    def sample(self) -> tuple[float, int]:
        return time.monotonic(), self.busy_ticks()

    def since(self, before: tuple[float, int], seconds: float) -> dict[str, float]:
        elapsed, busy = self.sample()
        wall = elapsed - before[0]
        busy_s = (busy - before[1]) * TICK_US / 1e6
        return {
            "busy_seconds": busy_s,
            "wall_seconds": wall,
            "busy_percent": busy_s / wall * 100 if wall > 0 else 0.0,
        }


def percent_per(busy_seconds: float | None, work: float | None) -> float | None:
    """CPU per unit of work, as % of one CPU per unit/s: busy CPU-seconds per unit, x 100."""
    if busy_seconds is None or not work:
        return None
    return busy_seconds / work * 100


# -- threads ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThreadTimes:
    comm: str
    cpu_ticks: int  # utime + stime
    run_ns: int | None  # schedstat's time on a CPU; None without CONFIG_SCHEDSTATS
    voluntary: int
    nonvoluntary: int


def _switches(status: str) -> tuple[int, int]:
    found = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
            found[key] = int(value)
    return found.get("voluntary_ctxt_switches", 0), found.get("nonvoluntary_ctxt_switches", 0)


def _stat(path: Path) -> tuple[str, list[str]]:
    """A /proc stat file: the name between its parentheses (it may hold any character), and the
    fields after it (``state`` is fields[0], ``ppid`` [1], ``utime`` [11], ``stime`` [12])."""
    text = path.read_text()
    end = text.rindex(")")
    return text[text.index("(") + 1 : end], text[end + 1 :].split()


def read_thread(pid: int, tid: int) -> ThreadTimes | None:
    """One thread's figures; None if it has ended."""
    task = Path(f"/proc/{pid}/task/{tid}")
    try:
        comm, fields = _stat(task / "stat")
        voluntary, nonvoluntary = _switches((task / "status").read_text())
        try:
            run_ns: int | None = int((task / "schedstat").read_text().split()[0])
        except FileNotFoundError:
            run_ns = None
    except (FileNotFoundError, ProcessLookupError):
        return None
    return ThreadTimes(comm, int(fields[11]) + int(fields[12]), run_ns, voluntary, nonvoluntary)


def threads_of(pid: int) -> dict[int, ThreadTimes]:
    """Every live thread of ``pid``, by tid ({} if the process is gone)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return {}
    found = {tid: read_thread(pid, tid) for tid in tids}
    return {tid: times for tid, times in found.items() if times is not None}


def process_ticks(pid: int) -> int | None:
    """utime + stime of the whole process, ended threads included; None if it is gone."""
    try:
        _, fields = _stat(Path(f"/proc/{pid}/stat"))
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(fields[11]) + int(fields[12])


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            _, fields = _stat(Path(f"/proc/{entry}/stat"))
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


# -- stages -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """A process on hyper's data path, and the devices whose frames or requests its work is
    counted in (names of ``per_thousand``'s ``work``)."""

    label: str
    pid: int
    devices: tuple[str, ...]


@dataclass
class Group:
    """The threads of one stage that share a name, summed over a run."""

    threads: int = 0
    cpu_ticks: int = 0
    run_ns: int | None = 0
    voluntary: int = 0
    nonvoluntary: int = 0

    def add(self, now: ThreadTimes, was: ThreadTimes | None) -> None:
        self.threads += 1
        self.cpu_ticks += now.cpu_ticks - (was.cpu_ticks if was else 0)
        self.voluntary += now.voluntary - (was.voluntary if was else 0)
        self.nonvoluntary += now.nonvoluntary - (was.nonvoluntary if was else 0)
        if self.run_ns is not None and now.run_ns is not None:
            self.run_ns += now.run_ns - ((was.run_ns or 0) if was else 0)
        else:
            self.run_ns = None

    def row(self, stage: Stage, thread: str | None, cpu_ticks: int | None = None) -> dict[str, Any]:
        ticks = self.cpu_ticks if cpu_ticks is None else cpu_ticks
        return {
            "stage": stage.label,
            "pid": stage.pid,
            "devices": list(stage.devices),
            "thread": thread,  # None: the whole process
            "threads": self.threads,
            "cpu_us": ticks * TICK_US,
            "run_us": None if self.run_ns is None else self.run_ns / 1000,
            "voluntary": self.voluntary,
            "nonvoluntary": self.nonvoluntary,
        }


StageSample = dict[Stage, tuple[int | None, dict[int, ThreadTimes]]]


class StageMeter:
    """Per-thread figures of the stages ``find()`` names as a run starts (it is asked again
    before every run: a backend worker restarted in between is a new process)."""

    def __init__(self, find: Callable[[], list[Stage]]) -> None:
        self.find = find

    def sample(self) -> StageSample:
        return {stage: (process_ticks(stage.pid), threads_of(stage.pid)) for stage in self.find()}

    def since(self, before: StageSample, seconds: float) -> list[dict[str, Any]]:
        rows = []
        for stage, (ticks_before, threads_before) in before.items():
            rows += stage_rows(stage, ticks_before, threads_before)
        return rows


def stage_rows(
    stage: Stage, ticks_before: int | None, threads_before: dict[int, ThreadTimes]
) -> list[dict[str, Any]]:
    """One row per thread name of ``stage`` (threads that did nothing left out), then its total."""
    ticks_now = process_ticks(stage.pid)
    groups: dict[str, Group] = {}
    total = Group()
    for tid, now in threads_of(stage.pid).items():
        was = threads_before.get(tid)
        groups.setdefault(now.comm, Group()).add(now, was)
        total.add(now, was)
    rows = [
        group.row(stage, name)
        for name, group in sorted(groups.items(), key=lambda item: -item[1].cpu_ticks)
        if group.cpu_ticks or group.voluntary or group.nonvoluntary
    ]
    process = None if ticks_now is None or ticks_before is None else ticks_now - ticks_before
    rows.append(total.row(stage, None, process))
    return rows


def per_thousand(rows: Iterable[dict[str, Any]], work: dict[str, int]) -> None:
    """Add to each row its stage's work (frames or requests of its devices) and its figures per
    1,000 of them."""
    for row in rows:
        done = sum(work.get(device, 0) for device in row["devices"])
        row["work"] = done
        for key in ("cpu_us", "run_us", "voluntary", "nonvoluntary"):
            value = row[key]
            row[f"{key}_per_1k"] = None if value is None or not done else value * 1000 / done


# -- the table --------------------------------------------------------------------------------


def _figure(value: float | None, digits: int = 0) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def stage_table(title: str, runs: dict[str, list[dict[str, Any]]], unit: str) -> Table:
    """The per-stage table of one path: for each run, each stage's threads by name, then the
    stage's total; figures per 1,000 ``unit``."""
    t = Table(title=title)
    columns = (
        "run", "stage (pid)", "thread", "n", unit, "CPU ms", "CPU us/1k", "run us/1k",
        "vol cs/1k", "invol cs/1k",
    )  # fmt: skip
    for col in columns:
        t.add_column(col, justify="left" if col in ("run", "stage (pid)", "thread") else "right")
    for run, rows in runs.items():
        shown_run, shown_stage = run, None
        for row in rows:
            stage = f"{row['stage']} ({row['pid']})"
            total = row["thread"] is None
            t.add_row(
                shown_run,
                stage if stage != shown_stage else "",
                "[b]all threads[/b]" if total else row["thread"],
                str(row["threads"]),
                f"{row.get('work', 0):,}" if total else "",
                _figure(row["cpu_us"] / 1000),
                _figure(row.get("cpu_us_per_1k")),
                _figure(row.get("run_us_per_1k")),
                _figure(row.get("voluntary_per_1k"), 1),
                _figure(row.get("nonvoluntary_per_1k"), 1),
                end_section=total and row is rows[-1],
            )
            shown_run, shown_stage = "", stage
    return t

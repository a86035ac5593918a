"""What a dom0 crash costs the domains: the pause, and the dip in throughput.

Run as root: ``python3 bench/recovery.py [--rounds N] [--json]``. It uses the running
hypervisor, or starts one and halts it at the end, and creates two domUs on a bridge of its own,
the first with a disk.

- **Recovery time**: a program in the first domU writes 4 KiB blocks to /dev/xvda (O_DIRECT,
  one at a time) and prints CLOCK_MONOTONIC after each one completes (the clock is the host's:
  domains have no time namespace). dom0 is SIGKILLed N times, 6 s apart (so hyperd restarts it
  at once); each round's figure is the time from the kill to the first write completed after
  the pause (the old worker may still finish a request in flight just after the kill), and the
  pause itself, the longest gap between completions. Medians, with every round's figure.
- **Throughput dip**: iperf3 between the two domUs, reporting every 0.5 s, with dom0 SIGKILLed
  about 6 s in; the median of the seconds before, the worst interval, and how long the rate
  stayed under half of it.

The kernel's own path has no dom0 to lose, so there is no ratio here: these are absolute times.
Benchmarks measure, never assert.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))  # run as `python3 bench/recovery.py`

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bench.create import (  # noqa: E402
    ENV,
    BenchError,
    domains_from,
    hyperctl,
    hypervisor,
    progress,
    run_bench,
    start_iperf3_server,
)

STABLE_WAIT = 6.0  # hyperd restarts a dom0 that lived this long at once (DOM0_STABLE is 5 s)
BRIDGE, NET = "hyrecov0", "10.79.0"
WRITER = """
import mmap, os, sys, time
end = time.monotonic() + float(sys.argv[1])
fd = os.open("/dev/xvda", os.O_WRONLY | os.O_DIRECT)
block = mmap.mmap(-1, 4096)
block.write(b"r" * 4096)
offset = 0
while time.monotonic() < end:
    os.pwrite(fd, block, offset)
    offset = (offset + 4096) % (32 << 20)
    sys.stdout.write(f"{time.monotonic()}\\n")
    sys.stdout.flush()
"""


def in_domain(name: str, *argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "hyper.cli", "exec", name, "--", *argv],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def dom0_pid() -> int:
    domains = json.loads(hyperctl("list", "--json"))
    return next(int(d["pid"]) for d in domains if d["domid"] == 0)


def kill_dom0() -> float:
    """SIGKILL dom0 once it has run STABLE_WAIT seconds; when it died (monotonic)."""
    pid = dom0_pid()
    time.sleep(STABLE_WAIT)
    os.kill(pid, signal.SIGKILL)
    return time.monotonic()


def wait_for_dom0(old: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if dom0_pid() != old:
                return
        except (BenchError, StopIteration, ValueError):
            pass  # between lives
        time.sleep(0.1)
    raise BenchError("dom0 was not restarted")


class Completions:
    """The writer's completion times, as they arrive."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.times: list[float] = []
        self.changed = threading.Condition()
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with self.changed:
                self.times.append(float(line))
                self.changed.notify_all()

    def first_after(self, moment: float, timeout: float = 60.0) -> float:
        with self.changed:
            found = self.changed.wait_for(lambda: self.times and self.times[-1] > moment, timeout)
            if not found:
                raise BenchError("no write completed after the kill")
            return next(t for t in self.times if t > moment)


def recovery_times(name: str, rounds: int) -> dict[str, Any]:
    # It ends by itself: killing `hyperctl exec` would leave it running in the domain.
    lifetime = rounds * (STABLE_WAIT + 6.0) + 5.0
    writer = in_domain(name, "python3", "-c", WRITER, str(lifetime))
    try:
        completions = Completions(writer)
        completions.first_after(0.0)
        recovered, paused = [], []
        for round_ in range(rounds):
            old = dom0_pid()
            killed = kill_dom0()
            wait_for_dom0(old)
            back = completions.first_after(time.monotonic())  # writing again, surely
            # The old worker may finish a request or two after the kill; the pause is the
            # longest gap between completions around it, recovery is where that gap ends.
            with completions.changed:
                near = [t for t in completions.times if killed - 0.5 <= t <= back]
            start, end = max(itertools.pairwise(near), key=lambda gap: gap[1] - gap[0])
            recovered.append(end - killed)
            paused.append(end - start)
            progress(
                f"round {round_ + 1}: no write completed for {paused[-1]:.2f} s; "
                f"writing again {recovered[-1]:.2f} s after the kill"
            )
    finally:
        writer.wait(timeout=lifetime + 30.0)
    return {
        "median_s": statistics.median(recovered),
        "rounds_s": recovered,
        "pause_median_s": statistics.median(paused),
    }


def throughput_dip(client: str, server: str) -> dict[str, Any]:
    start_iperf3_server(server)
    started = time.monotonic()
    stream = in_domain(client, "iperf3", "-c", f"{NET}.3", "-t", "16", "-i", "0.5", "-J")
    old = dom0_pid()
    killed = kill_dom0()  # about 6 s in
    wait_for_dom0(old)
    out, err = stream.communicate(timeout=120)
    if stream.returncode != 0:
        raise BenchError(f"iperf3 failed: {err.strip()}")
    rates = [i["sum"]["bits_per_second"] / 1e9 for i in json.loads(out)["intervals"]]
    before = statistics.median(rates[2:10])
    return {
        "undisturbed_gbit": before,
        "worst_interval_gbit": min(rates),
        "below_half_s": 0.5 * sum(1 for r in rates if r < before / 2),
        "intervals_gbit": [round(r, 2) for r in rates],
        "kill_at_s": round(killed - started, 1),
    }


def run(rounds: int) -> dict[str, Any]:
    with hypervisor(), tempfile.TemporaryDirectory(prefix="hyper-recovery-") as tmp:
        names = (f"recov{os.getpid()}-a", f"recov{os.getpid()}-b")
        image = Path(tmp) / "disk.img"
        configs = {
            names[0]: f"vif:\n  - bridge: {BRIDGE}\n    ip: {NET}.2/24\n"
            f"disk:\n  - target: {image}\n    vdev: xvda\n    size: 64M\n",
            names[1]: f"vif:\n  - bridge: {BRIDGE}\n    ip: {NET}.3/24\n",
        }
        with domains_from(Path(tmp), configs):
            progress(f"recovery time over {rounds} dom0 kills")
            result = {"recovery": recovery_times(names[0], rounds)}
            progress("iperf3 between the two domUs across a dom0 kill")
            result["dip"] = throughput_dip(names[0], names[1])
            return result


def print_report(result: dict[str, Any]) -> None:
    table = Table(title="dom0 SIGKILL while domUs do I/O")
    table.add_column("what")
    table.add_column("figure", justify="right")
    recovery = result["recovery"]
    table.add_row("kill -> first write completed, median", f"{recovery['median_s']:.2f} s")
    table.add_row("  each round", ", ".join(f"{t:.2f}" for t in recovery["rounds_s"]))
    table.add_row("longest gap between writes, median", f"{recovery['pause_median_s']:.2f} s")
    dip = result["dip"]
    table.add_row("iperf3 domU->domU undisturbed", f"{dip['undisturbed_gbit']:.2f} Gbit/s")
    table.add_row("  worst 0.5 s interval", f"{dip['worst_interval_gbit']:.2f} Gbit/s")
    table.add_row("  time under half the rate", f"{dip['below_half_s']:.1f} s")
    table.add_row(
        f"  every 0.5 s (kill at {dip['kill_at_s']} s)",
        " ".join(str(r) for r in dip["intervals_gbit"]),
    )
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    return run_bench(
        "bench/recovery.py",
        lambda: run(args.rounds),
        print_report,
        args.json,
        "what it made is removed",
    )


if __name__ == "__main__":
    sys.exit(main())

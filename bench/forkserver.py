"""What a fork server saves a spawn: time to running, and the memory of an idle child.

``python3 bench/forkserver.py [--count N] [--idle K] [--modules M ...] [--json]`` (defaults: 20
spawns, 10 idle children, ``domu.kernel``: what a domain's kernel imports). No root needed.

For each way of starting a Python child that has ``--modules`` imported:

- popen: ``subprocess.Popen([sys.executable, "-m", "bench.forkserver", ...])``, as hyper's spawn
  sites do today: the interpreter starts, then imports the modules;
- exec server: ``channels.forkserver`` run as a new interpreter (the default), the modules
  preloaded there;
- fork server: ``channels.forkserver`` forked from this process (started first, while it is
  single-threaded).

it prints:

- spawn-to-running: from the spawn call until the child, modules imported, writes a byte on a
  pipe; N spawns one after another, median, min and max (each child is then told to exit);
- idle memory: K children alive at once, each blocked on its stdin; PSS, USS (private) and RSS
  from ``/proc/<pid>/smaps_rollup``, per child; for the servers also their own PSS, and the
  per-child PSS with the server's share added (what K children cost in all, divided by K);
- the fork server's own start-up, until it has imported the modules (paid once per requester).

and the ratio popen / fork server for each. It measures, never asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))  # run as `python3 bench/forkserver.py`

from channels.forkserver import PIPE, ForkServer  # noqa: E402
from channels.waiting import readable  # noqa: E402

TIMEOUT = 60.0
ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO)}


# -- the child ------------------------------------------------------------------------------------


def idle(argv: list[str]) -> int:
    """``FD MODULE...``: import the modules (nothing to do if they were preloaded), say so with a
    byte on FD, then idle until stdin ends."""
    import importlib

    for module in argv[1:]:
        importlib.import_module(module)
    os.write(int(argv[0]), b"r")
    os.close(int(argv[0]))
    sys.stdin.buffer.read()
    return 0


# -- the measurements -----------------------------------------------------------------------------


class Started:
    """A child of either kind: its pid, its stdin (closing it ends the child), its end."""

    def __init__(self, pid: int, stdin: Any, wait: Callable[[], object]) -> None:
        self.pid = pid
        self.stdin = stdin
        self.wait = wait

    def stop(self) -> None:
        self.stdin.close()
        self.wait()


Spawner = Callable[[int], Started]


def popen_spawner(modules: Sequence[str]) -> Spawner:
    def spawn(fd: int) -> Started:
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.forkserver", str(fd), *modules],
            stdin=subprocess.PIPE,
            pass_fds=[fd],
            env=ENV,
            cwd=REPO,
        )
        return Started(process.pid, process.stdin, process.wait)

    return spawn


def server_spawner(server: ForkServer, modules: Sequence[str]) -> Spawner:
    def spawn(fd: int) -> Started:
        child = server.spawn(
            "bench.forkserver:idle", [str(fd), *modules], env=ENV, stdin=PIPE, pass_fds=[fd]
        )
        child.args = ["idle"]
        return Started(child.pid, child.stdin, child.wait)

    return spawn


def start_running(spawn: Spawner) -> tuple[float, Started]:
    """Seconds from the spawn call until the child runs with its modules imported."""
    r, w = os.pipe()
    began = time.perf_counter()
    try:
        started = spawn(w)
    finally:
        os.close(w)
    try:
        if not readable([r], TIMEOUT) or os.read(r, 1) != b"r":
            raise RuntimeError("a child did not start")
        return time.perf_counter() - began, started
    finally:
        os.close(r)


def latency(spawn: Spawner, count: int) -> list[float]:
    start_running(spawn)[1].stop()  # a warm-up: page cache, the server's first fork
    samples = []
    for _ in range(count):
        seconds, started = start_running(spawn)
        started.stop()
        samples.append(seconds)
    return samples


def rollup(pid: int) -> dict[str, int]:
    """Pss, Rss and the private (USS) KiB of a process."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                fields[parts[0].rstrip(":")] = int(parts[1])
    return {
        "pss": fields.get("Pss", 0),
        "rss": fields.get("Rss", 0),
        "uss": fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0),
    }


def idle_memory(spawn: Spawner, idle_count: int, server_pid: int | None) -> dict[str, float]:
    children = [start_running(spawn)[1] for _ in range(idle_count)]
    try:
        each = [rollup(c.pid) for c in children]
        server = rollup(server_pid) if server_pid is not None else {"pss": 0}
    finally:
        for child in children:
            child.stop()
    mean = {k: statistics.fmean(e[k] for e in each) / 1024 for k in ("pss", "uss", "rss")}
    mean["server_pss"] = server["pss"] / 1024
    mean["pss_with_server"] = mean["pss"] + mean["server_pss"] / idle_count
    return mean


def measure(spawn: Spawner, count: int, idle_count: int, server: int | None) -> dict[str, Any]:
    samples = latency(spawn, count)
    return {
        "spawn_ms": {
            "median": statistics.median(samples) * 1000,
            "min": min(samples) * 1000,
            "max": max(samples) * 1000,
            "samples": [s * 1000 for s in samples],
        },
        "idle_mib": idle_memory(spawn, idle_count, server),
    }


def start_server(modules: Sequence[str], fork: bool) -> tuple[ForkServer, float]:
    began = time.perf_counter()
    server = ForkServer.start(["bench.forkserver", *modules], fork=fork)
    server.wait_ready(TIMEOUT)
    return server, time.perf_counter() - began


# -- the report -----------------------------------------------------------------------------------


def print_table(results: dict[str, Any]) -> None:
    kinds = ["popen", "exec server", "fork server"]
    print(
        f"modules: {', '.join(results['modules'])}; {results['count']} spawns, "
        f"{results['idle']} idle children"
    )
    print(f"{'':34}" + "".join(f"{k:>14}" for k in kinds))
    rows: list[tuple[str, Callable[[dict[str, Any]], float]]] = [
        ("spawn-to-running median (ms)", lambda r: r["spawn_ms"]["median"]),
        ("spawn-to-running min (ms)", lambda r: r["spawn_ms"]["min"]),
        ("spawn-to-running max (ms)", lambda r: r["spawn_ms"]["max"]),
        ("idle child PSS (MiB)", lambda r: r["idle_mib"]["pss"]),
        ("idle child PSS + server share", lambda r: r["idle_mib"]["pss_with_server"]),
        ("idle child USS (MiB)", lambda r: r["idle_mib"]["uss"]),
        ("idle child RSS (MiB)", lambda r: r["idle_mib"]["rss"]),
        ("server PSS (MiB)", lambda r: r["idle_mib"]["server_pss"]),
    ]
    for label, get in rows:
        print(f"{label:34}" + "".join(f"{get(results[k]):>14.2f}" for k in kinds))
    for kind in ("exec server", "fork server"):
        print(f"{kind} start until ready: {results[kind]['start_ms']:.0f} ms (once per requester)")
    popen = results["popen"]
    for kind in ("exec server", "fork server"):
        r = results[kind]
        print(
            f"ratio popen / {kind}: spawn-to-running "
            f"{popen['spawn_ms']['median'] / r['spawn_ms']['median']:.1f}x, "
            f"idle PSS (server's share included) "
            f"{popen['idle_mib']['pss_with_server'] / r['idle_mib']['pss_with_server']:.1f}x"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20, help="spawns timed, one after another")
    parser.add_argument("--idle", type=int, default=10, help="idle children alive at once")
    parser.add_argument("--modules", nargs="+", default=["domu.kernel"])
    parser.add_argument("--json", action="store_true", help="every figure, samples included")
    args = parser.parse_args(argv)
    # First, while this process is single-threaded and small: the fork-mode server.
    forked, forked_start = start_server(args.modules, fork=True)
    execd, execd_start = start_server(args.modules, fork=False)
    results: dict[str, Any] = {"modules": args.modules, "count": args.count, "idle": args.idle}
    try:
        results["popen"] = measure(popen_spawner(args.modules), args.count, args.idle, None)
        for kind, server, started in (
            ("exec server", execd, execd_start),
            ("fork server", forked, forked_start),
        ):
            spawn = server_spawner(server, args.modules)
            results[kind] = measure(spawn, args.count, args.idle, server.pid)
            results[kind]["start_ms"] = started * 1000
    finally:
        forked.close()
        execd.close()
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_table(results)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].isdigit():  # a popen child: FD MODULE...
        sys.exit(idle(sys.argv[1:]))
    sys.exit(main())

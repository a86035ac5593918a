"""How long `hyperctl create` and `destroy` take, and what an idle domU costs.

Run as root: ``python3 bench/create.py [--count N] [--repeat R] [--idle-seconds S] [--json]``
(or ``python3 -m bench.create``). It uses the running hypervisor, or starts one and halts it at
the end. Every domain is idle (the smallest config: just a name) and created from YAML generated
in a temporary directory, under a name no one else uses.

What it measures, through hyperctl run as a subprocess per operation, as a user does:

- create-to-running: `hyperctl create` returns once the domain's workload runs. One domain, R
  times (the first create after the hypervisor starts is reported on its own: it is cold);
  then N domains one after another (total and per domain).
- destroy: one domain (R times), then the N domains one after another.
- the same create and destroy as a raw toolstack call (no CLI process), to split the CLI's cost
  from the toolstack's.
- idle CPU of the N domains over ``--idle-seconds``: the sum of their cgroups' CPU time
  deltas, as % of one CPU; dom0's and hyperd's alongside.
- resident memory per idle domU: the cgroup's charge (``mem_usage`` of `hyperctl list --json`)
  and the PSS, USS and RSS summed over every process in the domain's cgroup
  (/proc/<pid>/smaps_rollup).
- the kernel's own path for comparison: `unshare` of the same namespaces running `true`;
  and the floors every call pays: Python's start-up and a `hyperctl list` round trip.

Benchmarks measure, never assert: nothing here fails because a figure is slow.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))  # run as `python3 bench/create.py`

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from channels import control  # noqa: E402
from channels.paths import RunDir  # noqa: E402
from hyperd.cgroup import CgroupError, DomainGroup, Hierarchy, open_hierarchy  # noqa: E402

RUN = RunDir()
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
HYPERD_START_TIMEOUT = 30.0
SETTLE_SECONDS = 1.0  # after the last create, before the idle window opens
UNSHARE = ["unshare", "--user", "--net", "--mount", "--pid", "--uts", "--ipc", "--fork", "true"]
MIB = 1 << 20

err = Console(stderr=True)
_began = time.monotonic()


def progress(message: str) -> None:
    err.print(f"[dim]{time.monotonic() - _began:6.1f} s  {message}")


class BenchError(Exception):
    """A step the benchmark needs failed (not a slow figure: those are only reported)."""


def attempt(name: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One path's figures, or the reason it could not be measured (the other paths go on)."""
    try:
        return measure()
    except BenchError as exc:
        progress(f"[red]{name}: {exc}")
        return {"error": str(exc)}


def ratio(value: float | None, base: float | None) -> str:
    return "" if value is None or not base else f"{value / base:.2f}x"


@contextmanager
def shielded() -> Iterator[None]:
    """Ignore ^C and SIGTERM: a second one must not cut a cleanup short."""
    saved = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


# -- figures ------------------------------------------------------------------------------------


@dataclass
class Series:
    """Samples of one measure, in seconds (or bytes, or %)."""

    samples: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.samples.append(value)

    def summary(self) -> dict[str, Any]:
        s = self.samples
        if not s:
            return {"n": 0}
        return {
            "n": len(s),
            "median": statistics.median(s),
            "min": min(s),
            "max": max(s),
            "total": sum(s),
            "samples": s,
        }


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


# -- running things -----------------------------------------------------------------------------


def hyperctl(*args: str, timeout: float = 120.0) -> str:
    """Run `hyperctl ARGS` as a user would; its stdout, or BenchError naming the failure."""
    proc = subprocess.run(
        [sys.executable, "-m", "hyper.cli", *args],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise BenchError(
            f"hyperctl {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}"
        )
    return proc.stdout


def run_quietly(argv: list[str]) -> None:
    proc = subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, timeout=60)
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr!r}")


def hypervisor_running() -> bool:
    try:
        control.Connection(RUN.toolstack_socket, timeout=5.0).close()
    except control.NotRunning:
        return False
    return True


@contextmanager
def hypervisor() -> Iterator[float | None]:
    """Use the running hypervisor, or start one and halt it on the way out.

    Yields how long a started hypervisor took to answer, None when one was already running.
    """
    if hypervisor_running():
        progress("using the hypervisor that is already running (it stays running)")
        yield None
        return
    progress("starting a hypervisor (halted at the end)")
    start = time.perf_counter()
    hyperd = subprocess.Popen(
        [sys.executable, "-m", "hyperd.hypervisor"],
        cwd="/",
        env=ENV,
        start_new_session=True,  # a ^C to the benchmark must not reach it before the halt
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_hyperd(hyperd)
        yield time.perf_counter() - start
    finally:
        if hyperd.poll() is None:
            subprocess.run(
                [sys.executable, "-m", "hyper.cli", "halt"], cwd=REPO, env=ENV, capture_output=True
            )
        try:
            hyperd.wait(timeout=HYPERD_START_TIMEOUT)
        except subprocess.TimeoutExpired:
            progress(
                f"[red]hyperd (pid {hyperd.pid}) did not exit after halt; see hyperctl cleanup"
            )


def _wait_for_hyperd(hyperd: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + HYPERD_START_TIMEOUT
    while not hypervisor_running():
        if hyperd.poll() is not None:
            raise BenchError(
                f"hyperd exited with status {hyperd.returncode}; see {RUN.log('hyperd')} "
                "(a stale run directory needs `hyperctl cleanup`)"
            )
        if time.monotonic() > deadline:
            raise BenchError(f"the hypervisor did not answer in 30 s; see {RUN.log('hyperd')}")
        time.sleep(0.05)


def hyperd_pid() -> int:
    return int(RUN.pidfile.read_text().split()[0])


def list_domains() -> list[dict[str, Any]]:
    return list(json.loads(hyperctl("list", "--json")))


class Domains:
    """Idle domains made from generated YAML; remembers each one until it is destroyed."""

    def __init__(self, workdir: Path, devices: bool = False) -> None:
        self.workdir = workdir
        self.prefix = f"bench{os.getpid()}"
        self.serial = 0
        self.live: list[str] = []
        self.devices = devices  # each domain gets a vif and a disk (their data paths idle)

    def _config(self) -> tuple[str, Path]:
        self.serial += 1
        name = f"{self.prefix}-{self.serial}"
        path = self.workdir / f"{name}.yaml"
        body = f"name: {name}\n"
        if self.devices:
            body += (
                f"vif:\n  - bridge: {self.prefix[:10]}br\n"
                f"disk:\n  - target: {name}.img\n    size: 16M\n    vdev: xvda\n"
            )
        path.write_text(body)
        self.live.append(name)  # before the create: an interrupted create may still finish
        return name, path

    def create(self) -> tuple[str, float]:
        name, path = self._config()
        return name, timed(lambda: hyperctl("create", str(path)))

    def destroy(self, name: str) -> float:
        elapsed = timed(lambda: hyperctl("destroy", name))
        self.live.remove(name)
        return elapsed

    def create_raw(self) -> tuple[str, float]:
        name, path = self._config()
        return name, timed(
            lambda: control.call(
                RUN.toolstack_socket,
                control.Create(text=path.read_text(), source=str(path), base_dir=str(self.workdir)),
            )
        )

    def destroy_raw(self, name: str) -> float:
        elapsed = timed(lambda: control.call(RUN.toolstack_socket, control.Destroy(domain=name)))
        self.live.remove(name)
        return elapsed

    def destroy_all(self) -> None:
        """Best effort, on the way out after a failure or ^C."""
        for name in list(self.live):
            destroy_quietly(name)
            self.live.remove(name)


@contextmanager
def domains_from(workdir: Path, configs: dict[str, str]) -> Iterator[None]:
    """Create a domain from each YAML body, by name (the ``name:`` line is added); destroy them
    all on the way out, whatever happened."""
    created: list[str] = []
    try:
        for name, body in configs.items():
            path = workdir / f"{name}.yaml"
            path.write_text(f"name: {name}\n{body}")
            created.append(name)  # before the create: an interrupted create may still finish
            hyperctl("create", str(path))
        yield
    finally:
        for name in created:
            destroy_quietly(name)


IPERF3_LISTEN_TIMEOUT = 20.0


def start_iperf3_server(server: str) -> None:
    """`iperf3 -s -1 -D` in domain ``server``, returning once it listens (-D returns before)."""
    hyperctl("exec", server, "--", "iperf3", "-s", "-1", "-D")
    deadline = time.monotonic() + IPERF3_LISTEN_TIMEOUT
    while ":5201" not in hyperctl("exec", server, "--", "ss", "-ltn"):
        if time.monotonic() > deadline:
            raise BenchError(f"iperf3 -s did not listen in {server}")
        time.sleep(0.1)


def destroy_quietly(name: str) -> None:
    """`hyperctl destroy NAME`, best effort: on the way out, whatever happened before."""
    subprocess.run(
        [sys.executable, "-m", "hyper.cli", "destroy", name], cwd=REPO, env=ENV, capture_output=True
    )


# -- memory and CPU ---------------------------------------------------------------------------

SMAPS_KEYS = {"Rss": "rss", "Pss": "pss", "Private_Clean": "uss", "Private_Dirty": "uss"}


def smaps_bytes(pid: int) -> dict[str, int] | None:
    """RSS, PSS and USS of one process; None if it is gone. smaps_rollup, or smaps summed."""
    totals = {"rss": 0, "pss": 0, "uss": 0}
    for name in ("smaps_rollup", "smaps"):
        try:
            lines = Path(f"/proc/{pid}/{name}").read_text().splitlines()
        except FileNotFoundError:
            continue  # smaps_rollup is Linux >= 4.14; or the process is gone
        except ProcessLookupError:
            return None
        for line in lines:
            key, _, rest = line.partition(":")
            if key in SMAPS_KEYS:
                totals[SMAPS_KEYS[key]] += int(rest.split()[0]) * 1024
        return totals
    return None


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def group_memory(group: DomainGroup, charged: int) -> dict[str, Any]:
    """One cgroup's charge and the smaps totals of its processes, with a per-process split."""
    procs: list[dict[str, Any]] = []
    for pid in group.pids():
        sizes = smaps_bytes(pid)
        if sizes is not None:
            procs.append({"pid": pid, "comm": comm(pid), **sizes})
    figures = {key: sum(p[key] for p in procs) for key in ("pss", "uss", "rss")}
    return {"cgroup": charged, **figures, "processes": procs}


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu(groups: dict[str, DomainGroup], dom0: DomainGroup, seconds: float) -> dict[str, Any]:
    """CPU used over ``seconds`` by the domUs' cgroups (summed), dom0's and hyperd, as %."""
    pid = hyperd_pid()

    def sample() -> tuple[float, dict[str, int], int, float]:
        return (
            time.perf_counter(),
            {name: g.cpu_time_ns() for name, g in groups.items()},
            dom0.cpu_time_ns(),
            process_cpu_seconds(pid),
        )

    t0, domus0, dom0_0, hyperd0 = sample()
    time.sleep(seconds)
    t1, domus1, dom0_1, hyperd1 = sample()
    wall = t1 - t0
    per_domain = [(domus1[n] - domus0[n]) / 1e9 / wall * 100 for n in groups]
    return {
        "seconds": wall,
        "domUs_percent": sum(per_domain),
        "per_domU_percent": Series(per_domain).summary(),
        "dom0_percent": (dom0_1 - dom0_0) / 1e9 / wall * 100,
        "hyperd_percent": (hyperd1 - hyperd0) / wall * 100,
    }


# -- the phases ---------------------------------------------------------------------------------


def baselines(repeat: int) -> dict[str, Any]:
    """The floors: Python's start-up, one CLI round trip, and the kernel's own sandbox."""
    python, listing, unshare = Series(), Series(), Series()
    for _ in range(repeat):
        python.add(timed(lambda: run_quietly([sys.executable, "-c", "pass"])))
        listing.add(timed(lambda: hyperctl("list")))
        unshare.add(timed(lambda: run_quietly(UNSHARE)))
    return {
        "python_startup": python.summary(),
        "hyperctl_list": listing.summary(),
        "unshare": unshare.summary(),
    }


def single_domain(domains: Domains, repeat: int) -> dict[str, Any]:
    """Create then destroy one domain, repeat times, by CLI and by raw control call."""
    name, first = domains.create()
    first_destroy = domains.destroy(name)
    create, destroy, raw_create, raw_destroy = Series(), Series(), Series(), Series()
    for _ in range(repeat):
        name, elapsed = domains.create()
        create.add(elapsed)
        destroy.add(domains.destroy(name))
    for _ in range(repeat):
        name, elapsed = domains.create_raw()
        raw_create.add(elapsed)
        raw_destroy.add(domains.destroy_raw(name))
    return {
        "first_create": first,
        "first_destroy": first_destroy,
        "create": create.summary(),
        "destroy": destroy.summary(),
        "control_create": raw_create.summary(),
        "control_destroy": raw_destroy.summary(),
    }


def many_domains(domains: Domains, count: int, idle_seconds: float) -> dict[str, Any]:
    """Create count domains one after another, measure them idle, destroy them in turn."""
    names: list[str] = []
    create = Series()
    start = time.perf_counter()
    for _ in range(count):
        name, elapsed = domains.create()
        names.append(name)
        create.add(elapsed)
    create_wall = time.perf_counter() - start
    progress(f"{count} domains running; idle window of {idle_seconds:.0f} s")
    time.sleep(SETTLE_SECONDS)
    hierarchy = open_hierarchy()
    listed = {d["name"]: d for d in list_domains()}
    groups = {n: _open_group(hierarchy, listed[n]["domid"]) for n in names}
    cpu = idle_cpu(groups, _open_group(hierarchy, 0), idle_seconds)
    memory = idle_memory(groups, hierarchy)
    progress(f"destroying the {count} domains")
    destroy = Series()
    start = time.perf_counter()
    for name in names:
        destroy.add(domains.destroy(name))
    destroy_wall = time.perf_counter() - start
    return {
        "create": create.summary(),
        "create_wall": create_wall,
        "destroy": destroy.summary(),
        "destroy_wall": destroy_wall,
        "idle_cpu": cpu,
        "memory": memory,
    }


def _open_group(hierarchy: Hierarchy, domid: int) -> DomainGroup:
    try:
        return hierarchy.open(f"dom{domid}")
    except CgroupError as exc:
        raise BenchError(f"dom{domid} has no cgroup to measure: {exc}") from exc


def idle_memory(groups: dict[str, DomainGroup], hierarchy: Hierarchy) -> dict[str, Any]:
    """Per-domU memory (a fresh list --json for the charge), plus dom0's and hyperd's."""
    listed = {d["name"]: d for d in list_domains()}
    per_domain = [group_memory(g, int(listed[n]["mem_usage"])) for n, g in groups.items()]
    dom0 = group_memory(_open_group(hierarchy, 0), int(listed["Domain-0"]["mem_usage"]))
    hyperd = smaps_bytes(hyperd_pid()) or {}
    summary = {
        key: Series([float(m[key]) for m in per_domain]).summary()
        for key in ("cgroup", "pss", "uss", "rss")
    }
    return {"domU": summary, "one_domU": per_domain[0], "dom0": dom0, "hyperd": hyperd}


# -- the report ---------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def mib(count: float) -> str:
    return f"{count / MIB:.1f} MiB"


def time_row(what: str, s: dict[str, Any], total: float | None = None) -> list[str]:
    shown_total = ms(total) if total is not None else ""
    return [what, str(s["n"]), ms(s["median"]), ms(s["min"]), ms(s["max"]), shown_total]


def times_table(r: dict[str, Any]) -> Table:
    one, many, n = r["single"], r["many"], r["count"]
    t = Table(title="create-to-running and destroy (hyperctl, one process per call)")
    for col in ("", "n", "median", "min", "max", "total"):
        t.add_column(col, justify="left" if not col else "right")
    t.add_row("create 1 domain, first (cold)", "1", ms(one["first_create"]), "", "", "")
    t.add_row("destroy it", "1", ms(one["first_destroy"]), "", "", "")
    t.add_row(*time_row("create 1 domain", one["create"]))
    t.add_row(*time_row("destroy 1 domain", one["destroy"]))
    t.add_row(*time_row(f"create {n} in turn, per domain", many["create"], many["create_wall"]))
    t.add_row(*time_row(f"destroy {n} in turn, per domain", many["destroy"], many["destroy_wall"]))
    t.add_row(*time_row("create 1, raw control call", one["control_create"]))
    t.add_row(*time_row("destroy 1, raw control call", one["control_destroy"]))
    return t


def baseline_table(r: dict[str, Any]) -> Table:
    b, create = r["baseline"], r["single"]["create"]["median"]
    t = Table(title="floors and the kernel's own path")
    for col in ("", "median", "min", "max", "hyperctl create / this"):
        t.add_column(col, justify="left" if not col else "right")
    for key, what in (
        ("python_startup", "python3 -c pass"),
        ("hyperctl_list", "hyperctl list"),
        ("unshare", "unshare of 6 namespaces, then true"),
    ):
        s = b[key]
        ratio = f"{create / s['median']:.1f}x" if s["median"] else ""
        t.add_row(what, ms(s["median"]), ms(s["min"]), ms(s["max"]), ratio)
    return t


def memory_table(r: dict[str, Any]) -> Table:
    m = r["many"]["memory"]
    t = Table(title=f"resident memory per idle domU ({r['count']} running)")
    for col in ("", "median", "min", "max", f"total of {r['count']}"):
        t.add_column(col, justify="left" if not col else "right")
    for key, what in (
        ("cgroup", "cgroup charge (mem_usage)"),
        ("pss", "PSS of its processes"),
        ("uss", "USS (private) of its processes"),
        ("rss", "RSS of its processes"),
    ):
        s = m["domU"][key]
        t.add_row(what, mib(s["median"]), mib(s["min"]), mib(s["max"]), mib(s["total"]))
    return t


def processes_table(r: dict[str, Any]) -> Table:
    m = r["many"]["memory"]
    t = Table(title="where it goes: one idle domU's processes, and the fixed cost")
    for col in ("", "PSS", "USS", "RSS", "cgroup charge"):
        t.add_column(col, justify="left" if not col else "right")
    for p in m["one_domU"]["processes"]:
        t.add_row(f"domU {p['comm']} (pid {p['pid']})", mib(p["pss"]), mib(p["uss"]), mib(p["rss"]))
    one = m["one_domU"]
    t.add_row("domU total", mib(one["pss"]), mib(one["uss"]), mib(one["rss"]), mib(one["cgroup"]))
    dom0 = m["dom0"]
    t.add_row(
        "dom0 (all its processes)",
        mib(dom0["pss"]),
        mib(dom0["uss"]),
        mib(dom0["rss"]),
        mib(dom0["cgroup"]),
    )
    hyperd = m["hyperd"]
    if hyperd:
        t.add_row("hyperd", mib(hyperd["pss"]), mib(hyperd["uss"]), mib(hyperd["rss"]))
    return t


def cpu_table(r: dict[str, Any]) -> Table:
    c = r["many"]["idle_cpu"]
    t = Table(title=f"idle CPU over {c['seconds']:.1f} s")
    for col in ("", "% of one CPU", "CPU ms used"):
        t.add_column(col, justify="left" if not col else "right")

    def row(what: str, percent: float) -> None:
        t.add_row(what, f"{percent:.3f}", f"{percent / 100 * c['seconds'] * 1000:.1f}")

    row(f"{r['count']} idle domUs (sum of their cgroups)", c["domUs_percent"])
    row("  the busiest domU", c["per_domU_percent"]["max"])
    row("dom0 (its cgroup)", c["dom0_percent"])
    row("hyperd (its process)", c["hyperd_percent"])
    return t


def print_report(r: dict[str, Any]) -> None:
    out = Console()
    start = r["hypervisor_start"]
    started = f"started by the bench in {ms(start)}" if start is not None else "already running"
    out.print(f"hyper create benchmark: cgroup v{r['cgroup_version']}, hypervisor {started}")
    for table in (
        times_table(r),
        baseline_table(r),
        memory_table(r),
        processes_table(r),
        cpu_table(r),
    ):
        out.print(table)


# -- main ---------------------------------------------------------------------------------------


def measure(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "count": args.count,
        "repeat": args.repeat,
        "devices": args.devices,
    }
    with hypervisor() as start, tempfile.TemporaryDirectory(prefix="hyper-bench-") as tmp:
        results["hypervisor_start"] = start
        results["cgroup_version"] = open_hierarchy().version
        domains = Domains(Path(tmp), args.devices)
        try:
            progress("baselines")
            results["baseline"] = baselines(args.repeat)
            progress(
                f"one domain, {args.repeat + 1} times by CLI and {args.repeat} by control call"
            )
            results["single"] = single_domain(domains, args.repeat)
            progress(f"creating {args.count} domains one after another")
            results["many"] = many_domains(domains, args.count, args.idle_seconds)
        finally:
            domains.destroy_all()
    return results


def leftovers() -> list[str]:
    return [p.name for p in Path("/dev/shm").iterdir() if p.name.startswith("hyper.")]


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20, help="domains created in turn (20)")
    parser.add_argument("--repeat", type=int, default=5, help="single create/destroy cycles (5)")
    parser.add_argument("--idle-seconds", type=float, default=10.0, help="idle CPU window (10)")
    parser.add_argument(
        "--devices",
        action="store_true",
        help="give each domain a vif and a 16 MiB disk (their data paths idle with them)",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.count < 1 or args.repeat < 1 or args.idle_seconds <= 0:
        parser.error("--count and --repeat must be at least 1, --idle-seconds positive")
    if os.geteuid() != 0:
        parser.error("needs root (hyperctl talks to a root-only socket)")
    return run_bench(
        "bench/create.py",
        lambda: measure(args),
        print_report,
        args.json,
        "its domains are destroyed",
    )


def run_bench(
    name: str,
    measure_all: Callable[[], dict[str, Any]],
    report: Callable[[dict[str, Any]], None],
    as_json: bool,
    interrupted: str,
) -> int:
    """What every benchmark's main does after its arguments: measure, cleaning up on ^C or
    SIGTERM as on an error, print the figures, and say if anything of hyper's was left."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        results = measure_all()
    except BenchError as exc:
        err.print(f"[red]{name}: {exc}")
        return 1
    except KeyboardInterrupt:
        err.print(f"[red]{name}: interrupted; {interrupted}")
        return 130
    if as_json:
        print(json.dumps(results, indent=2))
    else:
        report(results)
    if not hypervisor_running() and leftovers():
        err.print(f"[red]left behind in /dev/shm: {' '.join(leftovers())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Network throughput and latency through hyper's netif rings, beside the kernel's own veth path.

Run as root: ``python3 bench/net.py [--time T] [--pings N] [--runs R] [--json] [--skip-slirp]``
(or ``python3 -m bench.net``). With ``--runs R`` it measures R times over, each run in a fresh
lab, and prints each run's figures and each ratio's median over the runs against the targets.
It uses the running hypervisor, or starts one and halts it at the end.

Paths, all measured in the same run:

- **veth**: two network namespaces joined by a veth pair, the kernel's own path and the
  baseline every ratio is taken against.
- **domU -> peer**: a domU's eth0 -> netfront -> tx ring -> netback in dom0 -> host TAP
  ``vif<domid>.0`` -> bridge -> a veth into a peer namespace the script makes. Each domU has as
  many vcpus as the host has CPUs (the namespaces of the veth path use them all too), so its
  vif has as many netif queues (channels/netif.py), each a pair of rings with its own pumps; a
  stream stays on one queue.
- **domU <-> domU**: two domains on the same bridge; every frame crosses two pairs of rings
  (the sender's tx ring, then the receiver's rx ring) and the bridge between their TAPs.
- **domU <-> domU, driver domain**: the same, but both vifs are served by a driver domain (a
  domU with ``backends: [vif]``, issue 15): the TAPs, the bridge and the netback workers are
  that domain's, in its namespaces and cgroup, not dom0's. No target: the figure is reported
  beside the previous path's, and the vifs' counters (dom0's) are not taken.
- **slirp4netns** (when installed, unless ``--skip-slirp``): a namespace whose tap is served
  by slirp4netns (the user-mode network stack of rootless containers) to a server on the host's
  loopback, reached at 10.0.2.2.

On each path: ping RTT (``ping -c N -i 0.2`` after a warm-up that resolves ARP), then iperf3
for ``--time`` seconds with one stream and with ``-P 4``; the client sends and the figure is
the receiver's (``end.sum_received.bits_per_second`` of ``iperf3 -J``). Programs inside a
domU run through ``hyperctl exec`` as the domain's unprivileged workload user, as a user does.
For the hyper paths it also records the vifs' counters (``hyperctl network-list --json``), the
host TAPs' and the domUs' eth0 kernel statistics, and the CPU that dom0 and the domUs' cgroups
used during each iperf3 run: errors, drops and stalls are printed, not hidden.

CPU (bench/stages.py), over each iperf3 run: on every path, the whole machine's busy time
(/proc/stat) per Gbit/s moved, so that hyper's paths and the kernel's compare; on hyper's paths,
the per-stage table: each thread (by name) of the domUs' kernels (netfront), the vifs' netback
workers and dom0, with its CPU and its voluntary and nonvoluntary context switches per 1,000
frames (its vif's netback packets, both ways).

The targets of issue 13 are printed beside the figures: domU -> peer >= 0.5x veth for one
stream and >= 0.4x for ``-P 4``, ping RTT <= 6x veth; domU <-> domU >= 0.3x and >= 0.25x, RTT
<= 12x. Benchmarks measure, never assert: nothing here fails because a figure is slow.
Everything the script makes (namespaces, veths, domains, their bridge) is removed at the end,
also after an error, ^C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))  # run as `python3 bench/net.py`

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from backends.netback.datapath import COUNTER_FIELDS  # noqa: E402
from bench.create import (  # noqa: E402
    ENV,
    BenchError,
    attempt,
    hyperctl,
    hypervisor,
    progress,
    ratio,
    run_bench,
    shielded,
)
from bench.stages import (  # noqa: E402
    MachineClock,
    Probe,
    Stage,
    StageMeter,
    ask,
    per_thousand,
    percent_per,
    sample_all,
    since_all,
    stage_table,
)
from channels import control  # noqa: E402
from hyperd.cgroup import CgroupError, DomainGroup, open_hierarchy  # noqa: E402

VETH, PEER, DOMU, SLIRP = "veth", "domU -> peer", "domU <-> domU", "slirp4netns"
DRIVER = "domU <-> domU, driver domain"  # both vifs served by a domU, not dom0 (issue 15)
PATHS = (VETH, PEER, DOMU, DRIVER, SLIRP)
PARALLEL = 4


@dataclass(frozen=True)
class Target:
    """A path's target, as multiples of veth's: the least throughput for one stream and for
    ``-P 4``, the most ping RTT (issue 13; printed, never asserted)."""

    single: float
    parallel: float
    rtt: float

    def __str__(self) -> str:
        return f">= {self.single}x, -P {PARALLEL} >= {self.parallel}x, RTT <= {self.rtt:g}x"

    def misses(self, single: float | None, parallel: float | None, rtt: float | None) -> str:
        """ "met", or what the ratios to veth miss; a throughput not measured is no miss, an
        RTT not measured (every echo lost) is."""
        found = [
            f"{what} {value:.2f}x"
            for what, value, least in (
                ("1 stream", single, self.single),
                (f"-P {PARALLEL}", parallel, self.parallel),
            )
            if value is not None and value < least
        ]
        if rtt is None or rtt > self.rtt:
            found.append("RTT " + ("lost" if rtt is None else f"{rtt:.1f}x"))
        return "met" if not found else "missed: " + ", ".join(found)


TARGETS = {PEER: Target(0.5, 0.4, 6.0), DOMU: Target(0.3, 0.25, 12.0)}
HYPER_NET = "10.88.0"  # the bench bridge's /24; nothing on the host gets an address in it
VETH_NET = "10.88.1"  # inside the two baseline namespaces only
DRIVER_NET = "10.88.2"  # on the driver domain's bridge, inside it
SLIRP_HOST = "10.0.2.2"  # slirp4netns's alias for the host's loopback
SLIRP_MTU = 65520  # what rootless Podman and Docker give slirp4netns
LISTEN_TIMEOUT = 20.0
READY_TIMEOUT = 10.0
BRIDGE_GONE_TIMEOUT = 10.0
RTT_RE = re.compile(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms")
SENT_RE = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")
TIME_RE = re.compile(r"time=([\d.]+) ms")
NETBACK_KEYS = COUNTER_FIELDS
KERNEL_KEYS = ("packets", "bytes", "errors", "dropped")

# Wide enough for the main table when piped (rich assumes 80 columns off a terminal).
out = Console(width=None if sys.stdout.isatty() else 150)
err = Console(stderr=True)


# -- running commands -------------------------------------------------------------------------


def run(argv: list[str], timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``argv`` in a session of its own (a ^C reaches only us; we stop it on the way out)."""
    try:
        proc = subprocess.run(
            argv,
            cwd=REPO,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{' '.join(argv)} did not finish in {timeout:.0f} s") from exc
    if check and proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def stop(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """Terminate a process we started (by its pid), then kill it if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass(frozen=True)
class Endpoint:
    """Where a program runs (a namespace, a domU, the host) and how the other end reaches it."""

    label: str
    prefix: tuple[str, ...]
    address: str
    bind: str | None = None  # a host server listens on loopback only, never on the LAN

    def argv(self, *command: str) -> list[str]:
        return [*self.prefix, *command]


def in_netns(ns: str, address: str) -> Endpoint:
    return Endpoint(f"netns {ns}", ("ip", "netns", "exec", ns), address)


def in_domain(name: str, address: str) -> Endpoint:
    return Endpoint(
        f"domU {name}", (sys.executable, "-m", "hyper.cli", "exec", name, "--"), address
    )


def on_host(address: str, bind: str) -> Endpoint:
    return Endpoint("host", (), address, bind)


def free_port() -> int:
    """A TCP port free on the host's loopback (namespaces and domUs have every port free)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- ping ---------------------------------------------------------------------------------------


def ping(client: Endpoint, server: Endpoint, count: int) -> dict[str, Any]:
    """RTT from ``client`` to ``server``: ``count`` echoes 0.2 s apart, after a warm-up."""
    warm = run(client.argv("ping", "-n", "-c", "2", "-W", "5", server.address), check=False)
    if warm.returncode != 0:
        raise BenchError(f"{client.label} cannot ping {server.address}: {warm.stdout.strip()}")
    argv = client.argv("ping", "-n", "-c", str(count), "-i", "0.2", "-W", "2", server.address)
    text = run(argv, timeout=count * 0.2 + 30, check=False).stdout
    sent = SENT_RE.search(text)
    rtt = RTT_RE.search(text)
    times = [float(t) for t in TIME_RE.findall(text)]
    result: dict[str, Any] = {
        "transmitted": int(sent.group(1)) if sent else 0,
        "received": int(sent.group(2)) if sent else 0,
        "samples_ms": times,
    }
    if rtt:
        keys = ("min_ms", "avg_ms", "max_ms", "mdev_ms")
        result.update({k: float(v) for k, v in zip(keys, rtt.groups(), strict=True)})
        result["median_ms"] = statistics.median(times) if times else None
    return result


# -- iperf3 -------------------------------------------------------------------------------------


@dataclass
class Flow:
    """One iperf3 measurement between two endpoints, with optional CPU accounting around it."""

    client: Endpoint
    server: Endpoint
    port: int
    seconds: int
    workdir: Path
    probes: dict[str, Probe] = field(default_factory=dict)


def iperf3(flow: Flow, streams: int) -> dict[str, Any]:
    """Start a one-shot server, run the client, return the receiver's figures."""
    log = flow.workdir / f"iperf3-server-{flow.port}-{streams}.log"
    bind = ("-B", flow.server.bind) if flow.server.bind else ()
    argv = flow.server.argv("iperf3", "-s", "-1", "-p", str(flow.port), *bind)
    with log.open("wb") as sink:
        server = subprocess.Popen(
            argv, cwd=REPO, env=ENV, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink,
            start_new_session=True,
        )  # fmt: skip
    try:
        wait_listening(flow.server, flow.port, server, log)
        before = sample_all(flow.probes)
        report = run_client(flow, streams)
        used = since_all(flow.probes, before, report["end"]["sum_received"].get("seconds", 0.0))
        server.wait(timeout=15)  # -1: it exits once the test is over
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"the iperf3 server on {flow.server.label} did not exit") from exc
    finally:
        stop(server)
    return summarise(report, streams, used)


def wait_listening(server: Endpoint, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + LISTEN_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise BenchError(
                f"the iperf3 server on {server.label} exited {proc.returncode}: "
                f"{log.read_text(errors='replace').strip()}"
            )
        listing = run(server.argv("ss", "-Hltn", "sport", "=", f":{port}"), check=False)
        if listing.stdout.strip():
            return
        if time.monotonic() > deadline:
            raise BenchError(f"the iperf3 server on {server.label} did not listen on {port}")
        time.sleep(0.1)


def run_client(flow: Flow, streams: int) -> dict[str, Any]:
    argv = flow.client.argv(
        "iperf3", "-c", flow.server.address, "-p", str(flow.port), "-t", str(flow.seconds),
        "-P", str(streams), "-J",
    )  # fmt: skip
    proc = run(argv, timeout=flow.seconds + 60, check=False)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise BenchError(
            f"iperf3 on {flow.client.label} exited {proc.returncode} without a JSON report: "
            f"{proc.stderr.strip() or proc.stdout.strip()}"
        ) from exc
    if proc.returncode != 0 or "error" in report:
        raise BenchError(f"iperf3 on {flow.client.label}: {report.get('error', proc.stderr)}")
    return dict(report)


def summarise(report: dict[str, Any], streams: int, used: dict[str, Any]) -> dict[str, Any]:
    end = report["end"]
    intervals = [i["sum"]["bits_per_second"] for i in report.get("intervals", [])]
    result: dict[str, Any] = {
        "streams": streams,
        "bits_per_second": end["sum_received"]["bits_per_second"],
        "bytes": end["sum_received"]["bytes"],
        "sent_bits_per_second": end["sum_sent"]["bits_per_second"],
        "retransmits": end["sum_sent"].get("retransmits"),
        "interval_bits_per_second": intervals,
        "worst_interval_bits_per_second": min(intervals) if intervals else None,
        "iperf3_cpu_percent": end.get("cpu_utilization_percent"),
        "cgroup_cpu_percent": used.get("cgroups"),
        **{key: used[key] for key in ("machine", "vif_packets", "stages") if key in used},
    }
    gbits = result["bytes"] * 8 / 1e9
    if "machine" in used:
        used["machine"]["percent_per_gbit_s"] = percent_per(used["machine"]["busy_seconds"], gbits)
    if "stages" in used:
        frames = {n: c["tx_packets"] + c["rx_packets"] for n, c in used["vif_packets"].items()}
        per_thousand(used["stages"], frames)
    return result


# -- CPU and counters of the hyper paths --------------------------------------------------------


class CpuMeter:
    """CPU time of dom0's and some domUs' cgroups over an interval, as % of one CPU."""

    def __init__(self, groups: dict[str, DomainGroup]) -> None:
        self.groups = groups

    @classmethod
    def for_domains(cls, domids: dict[str, int]) -> CpuMeter | None:
        try:
            hierarchy = open_hierarchy()
            groups = {"dom0": hierarchy.open("dom0")}
            groups.update({name: hierarchy.open(f"dom{d}") for name, d in domids.items()})
        except CgroupError as exc:
            progress(f"[yellow]no CPU figures: {exc}")
            return None
        return cls(groups)

    def sample(self) -> tuple[float, dict[str, int]]:
        return time.perf_counter(), {n: g.cpu_time_ns() for n, g in self.groups.items()}

    def since(self, before: tuple[float, dict[str, int]], seconds: float = 0.0) -> dict[str, float]:
        """% of one CPU over the wall time since ``before`` (``seconds`` is not used)."""
        t1, now = self.sample()
        wall = t1 - before[0]
        return {n: (now[n] - before[1][n]) / 1e9 / wall * 100 for n in self.groups}


def kernel_stats(prefix: tuple[str, ...], ifname: str) -> dict[str, int]:
    """An interface's kernel counters, asked of the network namespace ``prefix`` runs in.

    Through netlink (``ip -j -s link``), not /sys/class/net: a mount namespace's sysfs shows
    the interfaces of the namespace that mounted it, which need not be the domU's.
    """
    proc = run([*prefix, "ip", "-j", "-s", "link", "show", "dev", ifname], check=False)
    if proc.returncode != 0:
        return {}
    stats = json.loads(proc.stdout)[0].get("stats64", {})
    return {
        f"{way}_{key}": int(stats.get(way, {}).get(key, 0))
        for way in ("rx", "tx")
        for key in KERNEL_KEYS
    }


def first_vif(name: str) -> dict[str, Any]:
    """What the toolstack says of a domain's first vif: counters, worker_pid ({} if none)."""
    vifs = ask(control.DeviceList(domain=name, kind="vif"))
    return dict(vifs[0]) if vifs else {}


class VifPackets:
    """netback's counters of each domain's first vif, over a run."""

    def __init__(self, domains: list[str]) -> None:
        self.domains = domains

    def sample(self) -> dict[str, dict[str, int]]:
        return {name: first_vif(name) for name in self.domains}

    def since(self, before: dict[str, dict[str, int]], seconds: float) -> dict[str, Any]:
        now = self.sample()
        return {
            n: {k: now[n].get(k, 0) - before[n].get(k, 0) for k in NETBACK_KEYS}
            for n in self.domains
        }


def net_stages(domains: list[str]) -> list[Stage]:
    """The processes on the hyper paths' data path: each domU's kernel (netfront), its vif's
    netback worker, and dom0; a domain's stages do the work of its vif."""
    listed = {d["name"]: d for d in ask(control.List())}
    kernels, workers = [], []
    for name in domains:
        role = name.rsplit("-", 1)[-1]
        kernels.append(Stage(f"domU {role} kernel", int(listed[name]["pid"]), (name,)))
        worker = first_vif(name).get("worker_pid")
        if worker:  # none between a worker's death and its restart
            workers.append(Stage(f"netback {role} worker", int(worker), (name,)))
    dom0 = Stage("dom0", int(listed["Domain-0"]["pid"]), tuple(domains))
    return [*kernels, *workers, dom0]


def vif_snapshot(name: str, domid: int) -> dict[str, Any]:
    """netback's counters of a domain's first vif, its host TAP's and its eth0's statistics."""
    vif = first_vif(name)
    return {
        "netback": {k: vif.get(k, 0) for k in NETBACK_KEYS},
        "host_tap": kernel_stats((), f"vif{domid}.0"),
        "domU_eth0": kernel_stats(in_domain(name, "").prefix, "eth0"),
    }


def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Counter increments between two snapshots."""
    result: dict[str, Any] = {}
    for part in ("netback", "host_tap", "domU_eth0"):
        result[part] = {k: after[part][k] - before[part].get(k, 0) for k in after[part]}
    return result


def with_counters(domids: dict[str, int], measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``measure`` and attach the increments of the domains' vif counters over it."""
    before = {n: vif_snapshot(n, d) for n, d in domids.items()}
    result = measure()
    after = {n: vif_snapshot(n, d) for n, d in domids.items()}
    result["vifs"] = {n: delta(before[n], after[n]) for n in domids}
    return result


# -- what the script makes ----------------------------------------------------------------------


class Lab:
    """Namespaces, veths and domains made by the script; ``close`` removes them, newest first."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.tag = f"hybn{os.getpid() % 100000}"
        self.bridge = f"{self.tag}br"
        self.cleanup = contextlib.ExitStack()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        # A second ^C must not cut the cleanup short and leave domains or namespaces behind.
        with shielded():
            self.cleanup.close()
            self._check_bridge_gone()

    def _check_bridge_gone(self) -> None:
        bridge = Path(f"/sys/class/net/{self.bridge}")
        deadline = time.monotonic() + BRIDGE_GONE_TIMEOUT
        while bridge.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if not bridge.exists():
            return
        ports = sorted(p.name for p in (bridge / "brif").iterdir())
        if ports:  # a domain the script could not destroy: say so, do not cut its vif off
            progress(f"[red]bridge {self.bridge} is still there, with {' '.join(ports)}")
        else:
            progress(f"[red]hyper left bridge {self.bridge} behind after its last vif; removing")
            run(["ip", "link", "del", self.bridge], check=False)

    def netns(self, role: str) -> str:
        name = f"{self.tag}-{role}"
        self.cleanup.callback(run, ["ip", "netns", "del", name], check=False)
        run(["ip", "netns", "add", name])
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        return name

    def veth_pair(self, ns_a: str, ns_b: str) -> None:
        """eth0 in each namespace, one veth pair between them (deleted with the namespaces)."""
        run(
            ["ip", "-n", ns_a, "link", "add", "eth0", "type", "veth",
             "peer", "name", "eth0", "netns", ns_b]
        )  # fmt: skip
        for ns, host in ((ns_a, 1), (ns_b, 2)):
            run(["ip", "-n", ns, "addr", "add", f"{VETH_NET}.{host}/24", "dev", "eth0"])
            run(["ip", "-n", ns, "link", "set", "eth0", "up"])

    def peer_on_bridge(self, ns: str, address: str) -> None:
        """A veth from the bench bridge into ``ns``, as eth0 with ``address``/24."""
        host_end = f"{self.tag}p"
        self.cleanup.callback(run, ["ip", "link", "del", host_end], check=False)
        run(["ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns])
        run(["ip", "link", "set", host_end, "master", self.bridge, "up"])
        run(["ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0"])
        run(["ip", "-n", ns, "link", "set", "eth0", "up"])

    def domain(
        self, role: str, address: str | None, backend: str = "0", extra: str = ""
    ) -> tuple[str, int]:
        """An idle domU with a vcpu per host CPU and one vif with ``address`` on the bench
        bridge (served by ``backend``: dom0, or a driver domain, in whose namespace the bridge
        then is), none without an address, and ``extra`` config; its name and domid."""
        name = f"{self.tag}-{role}"
        config = self.workdir / f"{name}.yaml"
        vif = (
            f"vif:\n  - bridge: {self.bridge}\n    ip: {address}/24\n    backend: {backend}\n"
            if address
            else ""
        )
        config.write_text(f"name: {name}\nvcpus: {os.cpu_count() or 1}\n{extra}{vif}")
        # Registered before the create: an interrupted create may still finish.
        self.cleanup.callback(self._destroy, name)
        hyperctl("create", str(config))
        listed = json.loads(hyperctl("list", "--json"))
        return name, int(next(d["domid"] for d in listed if d["name"] == name))

    def _destroy(self, name: str) -> None:
        argv = [sys.executable, "-m", "hyper.cli", "destroy", name]
        run(argv, timeout=120, check=False)

    def slirp(self, ns: str, binary: str) -> None:
        """slirp4netns serving ``ns`` as tap0, stopped on close; returns once it is ready."""
        ready_r, ready_w = os.pipe()
        argv = [
            binary, "--configure", f"--mtu={SLIRP_MTU}", f"--ready-fd={ready_w}",
            "--netns-type=path", f"/run/netns/{ns}", "tap0",
        ]  # fmt: skip
        log = (self.workdir / "slirp4netns.log").open("wb")
        try:
            proc = subprocess.Popen(
                argv, stdout=log, stderr=log, pass_fds=(ready_w,), start_new_session=True
            )
        finally:
            os.close(ready_w)
            log.close()
        self.cleanup.callback(stop, proc)
        try:
            readable, _, _ = select.select([ready_r], [], [], READY_TIMEOUT)
            if not readable or not os.read(ready_r, 1):
                text = (self.workdir / "slirp4netns.log").read_text(errors="replace")
                raise BenchError(f"slirp4netns for {ns} did not become ready: {text.strip()}")
        finally:
            os.close(ready_r)


# -- the paths ----------------------------------------------------------------------------------


@dataclass
class Settings:
    seconds: int
    pings: int
    workdir: Path


def measure_path(
    client: Endpoint, server: Endpoint, settings: Settings, probes: dict[str, Probe]
) -> dict[str, Any]:
    flow = Flow(client, server, free_port(), settings.seconds, settings.workdir, probes)
    return {
        "client": client.label,
        "server": server.label,
        "ping": ping(client, server, settings.pings),
        "single": iperf3(flow, 1),
        "parallel": iperf3(flow, PARALLEL),
    }


def veth_path(lab: Lab, settings: Settings) -> dict[str, Any]:
    progress("veth: two namespaces, one veth pair")
    a, b = lab.netns("va"), lab.netns("vb")
    lab.veth_pair(a, b)
    probes: dict[str, Probe] = {"machine": MachineClock()}
    return measure_path(
        in_netns(a, f"{VETH_NET}.1"), in_netns(b, f"{VETH_NET}.2"), settings, probes
    )


def hyper_paths(lab: Lab, settings: Settings) -> dict[str, dict[str, Any]]:
    progress(f"hyper: two domUs and a peer namespace on bridge {lab.bridge}")
    try:
        return _hyper_paths(lab, settings)
    except BenchError as exc:  # the set-up failed; a path's own failure is caught by attempt
        progress(f"[red]hyper: {exc}")
        return {PEER: {"error": str(exc)}, DOMU: {"error": str(exc)}}


def _hyper_paths(lab: Lab, settings: Settings) -> dict[str, dict[str, Any]]:
    a_name, a_id = lab.domain("a", f"{HYPER_NET}.2")
    b_name, b_id = lab.domain("b", f"{HYPER_NET}.3")
    peer = lab.netns("peer")
    lab.peer_on_bridge(peer, f"{HYPER_NET}.100")
    a = in_domain(a_name, f"{HYPER_NET}.2")
    b = in_domain(b_name, f"{HYPER_NET}.3")
    results = {}
    start_cost = exec_cost(a.prefix)
    progress(f"{PEER}: {a.label} sends to {peer}")
    peer_end = in_netns(peer, f"{HYPER_NET}.100")
    results[PEER] = attempt(PEER, lambda: hyper_path(a, peer_end, {a_name: a_id}, settings))
    progress(f"{DOMU}: {a.label} sends to {b.label}")
    domids = {a_name: a_id, b_name: b_id}
    results[DOMU] = attempt(DOMU, lambda: hyper_path(a, b, domids, settings))
    for path in results.values():
        path["exec_cpu_seconds"] = start_cost
    return results


def hyper_path(
    client: Endpoint, server: Endpoint, domids: dict[str, int], settings: Settings
) -> dict[str, Any]:
    domains = list(domids)
    # Costly first (toolstack calls): sampled last after the run, outside the others' windows.
    probes: dict[str, Probe] = {
        "vif_packets": VifPackets(domains),
        "stages": StageMeter(lambda: net_stages(domains)),
        **cpu_probes(domids),
    }
    return with_counters(domids, lambda: measure_path(client, server, settings, probes))


def cpu_probes(domids: dict[str, int]) -> dict[str, Probe]:
    """The CPU probes every hyper path takes, in their order: dom0's and ``domids``' cgroups
    (when readable), then the whole machine's."""
    probes: dict[str, Probe] = {}
    cpu = CpuMeter.for_domains(domids)
    if cpu is not None:
        probes["cgroups"] = cpu
    probes["machine"] = MachineClock()
    return probes


def driver_path(lab: Lab, settings: Settings) -> dict[str, Any]:
    """Two domUs whose vifs a driver domain serves: its netback workers, not dom0's, carry
    every frame between them (its CPU shows in the cgroup figures as ``netvm``)."""
    progress(f"{DRIVER}: two domUs whose vifs a driver domain serves")
    netvm, netvm_id = lab.domain("netvm", None, extra="memory: 512\nbackends: [vif]\n")
    a_name, a_id = lab.domain("da", f"{DRIVER_NET}.2", backend=netvm)
    b_name, b_id = lab.domain("db", f"{DRIVER_NET}.3", backend=netvm)
    a, b = in_domain(a_name, f"{DRIVER_NET}.2"), in_domain(b_name, f"{DRIVER_NET}.3")
    probes = cpu_probes({a_name: a_id, b_name: b_id, "netvm": netvm_id})
    result = measure_path(a, b, settings, probes)
    result["exec_cpu_seconds"] = exec_cost(a.prefix)
    return result


def exec_cost(prefix: tuple[str, ...]) -> float:
    """The machine's CPU seconds for starting one program in a domU (``hyperctl exec ... --
    true``): what each client run on a hyper path pays before it does anything."""
    clock = MachineClock()
    before = clock.sample()
    run([*prefix, "true"])
    return clock.since(before, 0.0)["busy_seconds"]


def slirp_path(lab: Lab, settings: Settings) -> dict[str, Any]:
    binary = shutil.which("slirp4netns")
    if binary is None:
        return {"skipped": "not installed"}
    progress(f"{SLIRP}: a namespace served by {binary}, to the host's loopback")
    ns = lab.netns("slirp")
    lab.slirp(ns, binary)
    version = run([binary, "--version"], check=False).stdout.splitlines()[:1]
    probes: dict[str, Probe] = {"machine": MachineClock()}
    result = measure_path(in_netns(ns, ""), on_host(SLIRP_HOST, "127.0.0.1"), settings, probes)
    result["version"] = version[0] if version else None
    return result


# -- the report ---------------------------------------------------------------------------------


def gbit(bits: float | None) -> str:
    return "" if bits is None else f"{bits / 1e9:.2f}"


def throughput(path: dict[str, Any], key: str) -> float | None:
    return path[key]["bits_per_second"] if key in path else None


def rtt(path: dict[str, Any]) -> float | None:
    return path["ping"].get("avg_ms") if "ping" in path else None


def _ratio_of(figure: Callable[[dict[str, Any]], float | None]) -> Callable[..., float | None]:
    def of(path: dict[str, Any], veth: dict[str, Any]) -> float | None:
        value, base = figure(path), figure(veth)
        return value / base if value is not None and base else None

    return of


#: A path's ratios to veth's figures in the same run (None where either is missing): the
#: targets' three, in their order.
RATIOS: tuple[tuple[str, Callable[[dict[str, Any], dict[str, Any]], float | None]], ...] = (
    ("single", _ratio_of(lambda path: throughput(path, "single"))),
    ("parallel", _ratio_of(lambda path: throughput(path, "parallel"))),
    ("rtt", _ratio_of(rtt)),
)


def verdict(name: str, path: dict[str, Any], veth: dict[str, Any]) -> tuple[str, str]:
    """The target of a path, and whether this run met it (printed, never asserted)."""
    if name not in TARGETS:
        return "", ""
    goal = TARGETS[name]
    if "skipped" in path or "error" in path:
        return str(goal), ""
    return str(goal), goal.misses(*(of(path, veth) for _, of in RATIOS))


def main_table(results: dict[str, Any]) -> Table:
    paths, veth = results["paths"], results["paths"].get(VETH, {})
    t = Table(title=f"iperf3 ({results['seconds']} s per run) and ping ({results['pings']} echoes)")
    columns = (
        "path", "1 stream Gbit/s", "x veth", f"-P {PARALLEL} Gbit/s", "x veth",
        "ping avg ms", "x veth", "target", "this run",
    )  # fmt: skip
    for col in columns:
        t.add_column(col, justify="left" if col in ("path", "target", "this run") else "right")
    for name in PATHS:
        path = paths.get(name)
        if path is None:
            continue
        if "skipped" in path or "error" in path:
            target, _ = verdict(name, path, veth)
            note = path.get("skipped") or f"failed: {path['error']}"
            t.add_row(name, note, "", "", "", "", "", target, "")
            continue
        single, parallel, avg = throughput(path, "single"), throughput(path, "parallel"), rtt(path)
        t.add_row(
            name,
            gbit(single),
            ratio(single, throughput(veth, "single")),
            gbit(parallel),
            ratio(parallel, throughput(veth, "parallel")),
            "lost" if avg is None else f"{avg:.3f}",
            ratio(avg, rtt(veth)),
            *verdict(name, path, veth),
        )
    return t


def detail_table(results: dict[str, Any]) -> Table:
    t = Table(title="per run: retransmits, the worst 1 s interval, CPU during the run")
    for col in ("path", "run", "Gbit/s", "retransmits", "worst 1 s", "CPU % of one CPU"):
        t.add_column(col, justify="left" if col in ("path", "run", "CPU % of one CPU") else "right")
    for name in PATHS:
        path = results["paths"].get(name, {})
        for key in ("single", "parallel"):
            if key not in path:
                continue
            r = path[key]
            cpu = r["cgroup_cpu_percent"] or {}
            t.add_row(
                name,
                "1 stream" if key == "single" else f"-P {PARALLEL}",
                gbit(r["bits_per_second"]),
                str(r["retransmits"]),
                gbit(r["worst_interval_bits_per_second"]),
                ", ".join(f"{n} {p:.0f}" for n, p in cpu.items()),
            )
        if "ping" in path:
            p = path["ping"]
            lost = p["transmitted"] - p["received"]
            spread = f"min {p.get('min_ms')} max {p.get('max_ms')} mdev {p.get('mdev_ms')} ms"
            t.add_row(name, "ping", "", "", "", f"{lost} of {p['transmitted']} lost; {spread}")
    return t


RUNS = (("single", "1 stream"), ("parallel", f"-P {PARALLEL}"))


def machine_cpu(path: dict[str, Any], key: str) -> float | None:
    """The machine's CPU per Gbit/s over one run of a path (% of one CPU per Gbit/s)."""
    machine = path.get(key, {}).get("machine")
    return machine.get("percent_per_gbit_s") if machine else None


def cpu_table(results: dict[str, Any]) -> Table:
    paths, veth = results["paths"], results["paths"].get(VETH, {})
    t = Table(
        title="CPU per Gbit/s over each iperf3 run: the whole machine (/proc/stat), and hyper's "
        "cgroups (dom0 and the domUs, iperf3 in them included)"
    )
    columns = (
        "path", "run", "Gbit/s", "machine busy %", "% CPU per Gbit/s", "x veth",
        "hyper cgroups %", "% per Gbit/s",
    )  # fmt: skip
    for col in columns:
        t.add_column(col, justify="left" if col in ("path", "run") else "right")
    for name in PATHS:
        path = paths.get(name, {})
        for key, label in RUNS:
            run_ = path.get(key)
            if run_ is None or "machine" not in run_:
                continue
            per_gbit = machine_cpu(path, key)
            cgroups = sum((run_.get("cgroup_cpu_percent") or {}).values())
            gbps = run_["bits_per_second"] / 1e9
            t.add_row(
                name, label, f"{gbps:.2f}", f"{run_['machine']['busy_percent']:.0f}",
                f"{per_gbit:.1f}" if per_gbit is not None else "",
                ratio(per_gbit, machine_cpu(veth, key)),
                f"{cgroups:.0f}" if cgroups else "",
                f"{cgroups / gbps:.1f}" if cgroups and gbps else "",
            )  # fmt: skip
    return t


def stage_tables(results: dict[str, Any]) -> list[Table]:
    tables = []
    for name in (PEER, DOMU):
        path = results["paths"].get(name, {})
        runs = {label: path[key]["stages"] for key, label in RUNS if "stages" in path.get(key, {})}
        if runs:
            title = (
                f"{name}: per stage and thread name, per 1,000 frames of the stage's vif "
                "(netback's packets, both ways; dom0: all the path's vifs); run = schedstat's "
                "time on a CPU"
            )
            tables.append(stage_table(title, runs, "frames"))
    return tables


def counters_table(results: dict[str, Any]) -> Table:
    t = Table(title="hyper vifs over each path's runs (increments; domU's view: tx = sent)")
    for col in ("path", "domain", "where", "tx pkts", "rx pkts", "errors", "dropped"):
        t.add_column(col, justify="left" if col in ("path", "domain", "where") else "right")
    for name in (PEER, DOMU):
        for domain, v in results["paths"].get(name, {}).get("vifs", {}).items():
            nb = v["netback"]
            t.add_row(
                name,
                domain,
                "netback",
                str(nb["tx_packets"]),
                str(nb["rx_packets"]),
                str(nb["tx_errors"] + nb["rx_errors"]),
                str(nb["tx_dropped"] + nb["rx_dropped"]),
            )
            for where in ("host_tap", "domU_eth0"):
                k = v[where]
                if k:
                    t.add_row(
                        "", "", where, str(k["tx_packets"]), str(k["rx_packets"]),
                        str(k["rx_errors"] + k["tx_errors"]),
                        str(k["rx_dropped"] + k["tx_dropped"]),
                    )  # fmt: skip
    return t


def print_report(results: dict[str, Any]) -> None:
    start = results["hypervisor_start"]
    started = f"started by the bench in {start:.1f} s" if start is not None else "already running"
    h = results["host"]
    out.print(
        f"hyper network benchmark: {h['cpus']} CPUs, Linux {h['kernel']}, hypervisor {started}; "
        f"bridge-nf-call-iptables={h['bridge_nf_call_iptables']}"
    )
    tables = [main_table(results), cpu_table(results), *stage_tables(results)]
    for table in (*tables, detail_table(results), counters_table(results)):
        out.print(table)
    cost = results["paths"].get(PEER, {}).get("exec_cpu_seconds")
    if cost is not None:
        out.print(
            f"Each run on hyper's paths starts its client with hyperctl exec: {cost * 1000:.0f} "
            "CPU ms of the machine's, counted in its figures above (veth's ip netns exec: ~0)."
        )


# -- main ---------------------------------------------------------------------------------------


def host_facts() -> dict[str, Any]:
    nf = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
    return {
        "cpus": os.cpu_count(),
        "kernel": os.uname().release,
        # Bridged frames (the hyper paths, not veth) go through iptables when this is 1.
        "bridge_nf_call_iptables": nf.read_text().strip() if nf.exists() else "absent",
    }


def measure_runs(args: argparse.Namespace) -> dict[str, Any]:
    """``--runs`` whole measurements one after another (a fresh lab each): one run's figures,
    or every run's and each ratio's median over them (``medians``)."""
    if args.runs == 1:
        return measure(args)
    runs = []
    for n in range(args.runs):
        progress(f"run {n + 1} of {args.runs}")
        runs.append(measure(args))
    return {"runs": runs, "medians": medians(runs)}


def medians(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """For each hyper path with a target, each ratio to the same run's veth: every run's
    (``runs``, None where a figure is missing) and the median of those there are."""
    found: dict[str, dict[str, dict[str, Any]]] = {}
    for name in TARGETS:
        found[name] = {}
        for key, of in RATIOS:
            ratios = [of(r["paths"].get(name, {}), r["paths"].get(VETH, {})) for r in runs]
            present = [r for r in ratios if r is not None]
            median = statistics.median(present) if present else None
            found[name][key] = {"runs": ratios, "median": median}
    return found


def medians_table(results: dict[str, Any]) -> Table:
    """The medians of ``--runs``, each with every run's ratio, against the targets."""
    t = Table(title=f"medians of {len(results['runs'])} runs, ratios to veth in the same run")
    columns = ("path", "1 stream x veth", f"-P {PARALLEL} x veth", "ping x veth", "target")
    for col in (*columns, "medians"):
        t.add_column(col, justify="left" if col in ("path", "target", "medians") else "right")
    for name, goal in TARGETS.items():
        figures = results["medians"][name]
        cells = []
        for key, _ in RATIOS:
            each = ", ".join("-" if r is None else f"{r:.2f}" for r in figures[key]["runs"])
            median = figures[key]["median"]
            cells.append(f"{'-' if median is None else f'{median:.2f}x'} ({each})")
        verdict_ = goal.misses(*(figures[key]["median"] for key, _ in RATIOS))
        t.add_row(name, *cells, str(goal), verdict_)
    return t


def print_runs(results: dict[str, Any]) -> None:
    """One run's whole report, or each run's main table and the medians."""
    if "runs" not in results:
        print_report(results)
        return
    for n, run in enumerate(results["runs"], 1):
        out.print(f"run {n}:")
        out.print(main_table(run))
    out.print(medians_table(results))


def measure(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"seconds": args.time, "pings": args.pings, "host": host_facts()}
    paths: dict[str, Any] = {}
    results["paths"] = paths
    with (
        hypervisor() as start,
        tempfile.TemporaryDirectory(prefix="hyper-bench-net-") as tmp,
        Lab(Path(tmp)) as lab,
    ):
        results["hypervisor_start"] = start
        settings = Settings(args.time, args.pings, Path(tmp))
        paths[VETH] = attempt(VETH, lambda: veth_path(lab, settings))
        paths.update(hyper_paths(lab, settings))
        paths[DRIVER] = attempt(DRIVER, lambda: driver_path(lab, settings))
        if args.skip_slirp:
            paths[SLIRP] = {"skipped": "skipped (--skip-slirp)"}
        else:
            paths[SLIRP] = attempt(SLIRP, lambda: slirp_path(lab, settings))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time", type=int, default=5, help="seconds per iperf3 run (5)")
    parser.add_argument("--pings", type=int, default=20, help="echoes per ping RTT (20)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--skip-slirp", action="store_true", help="do not measure slirp4netns")
    parser.add_argument(
        "--runs", type=int, default=1, help="whole runs, and each ratio's median over them (1)"
    )
    args = parser.parse_args(argv)
    if args.time < 1 or args.pings < 1 or args.runs < 1:
        parser.error("--time, --pings and --runs must be at least 1")
    if os.geteuid() != 0:
        parser.error("needs root (namespaces, veths, and hyperctl's root-only socket)")
    return run_bench(
        "bench/net.py", lambda: measure_runs(args), print_runs, args.json, "what it made is removed"
    )


if __name__ == "__main__":
    sys.exit(main())

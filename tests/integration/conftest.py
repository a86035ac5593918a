"""Fixtures for the real-system tests: a running hypervisor, domains, and leak checks.

Everything here is real: hyperd, dom0 and the domains are processes in namespaces and cgroups,
driven through `hyperctl` and the Python API exactly as a user would. The session's hypervisor
and the domains tests make come from hyper's own pytest plugin (hyper/pytest_plugin.py: the
``hyper`` and ``hyper_domain`` fixtures an outside project gets); around them, the session
asserts the machine is clean before and after. Each domain a test creates is destroyed by the
fixture that made it, even when the test fails; a failing test also gets the logs of the
hypervisor and of its domains, and the host's network, in its report.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import pluggy

from backends.netback import firewall
from channels import pumps
from channels.paths import RunDir
from hyper import api, pytest_plugin
from hyper.pytest_plugin import TestDomain, made_domains
from hyperd import cgroup

REPO = Path(__file__).resolve().parents[2]
RUN = RunDir()

pytestmark = pytest.mark.root


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: real namespaces, cgroups and /dev/shm objects")


class Result:
    def __init__(self, proc: subprocess.CompletedProcess[str]) -> None:
        self.status = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr

    def __repr__(self) -> str:
        return f"Result(status={self.status}, out={self.out!r}, err={self.err!r})"


def hyperctl(
    *args: str, check: bool = True, input: str | None = None, timeout: float = 120.0
) -> Result:
    """Run `hyperctl ARGS` as a user would; fail the test on a non-zero status if ``check``."""
    proc = subprocess.run(
        [sys.executable, "-m", "hyper.cli", *args],
        cwd=REPO,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    result = Result(proc)
    if check and result.status != 0:
        raise AssertionError(f"hyperctl {' '.join(args)} failed: {result}")
    return result


def domains() -> list[dict[str, Any]]:
    return list(json.loads(hyperctl("list", "--json").out))


def domain_info(name: str) -> dict[str, Any] | None:
    return next((d for d in domains() if d["name"] == name), None)


def wait_for(
    condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll ``condition`` until it is truthy; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


#: What hyper's processes call themselves (channels/forkserver.py's children are named so, and
#: their command lines are their fork server's).
OUR_COMMS = (
    "hyper-kernel",
    "hyper-init",
    "hyper-forksrv",
    "hyper-boot",
    "hyper-dom0",
    "hyper-xenstored",
    "hyper-keeper",
    "hyper-relay",
    "hyper-blkfront",
    "hyper-p9front",
)


def leftovers() -> list[str]:
    """Everything of hyper's that could be on the host: it must be empty when nothing runs."""
    found = [f"/dev/shm/{p.name}" for p in Path("/dev/shm").iterdir() if "hyper." in p.name]
    found += [str(group) for group in cgroup.open_hierarchy().parent_dirs() if group.exists()]
    for mount in Path("/proc/self/mounts").read_text().splitlines():
        if "/run/hyper" in mount:
            found.append(f"mount {mount.split()[1]}")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            comm = (proc / "comm").read_text().strip()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if comm == "hyper-forksrv" and _parent(proc) == os.getpid():
            continue  # a unit test's own fork server (dom0.spawn's, say): it ends with us
        if (
            comm in OUR_COMMS
            or "hyperd.hypervisor" in cmdline
            or "hyperd.keeper" in cmdline
            or ("-m dom0" in cmdline or "domu.boot" in cmdline or "domu.blkfront" in cmdline)
        ):
            found.append(f"process {proc.name} {comm}")
    if RUN.root.exists():
        found.append(str(RUN.root))
    found += [f"interface {name}" for name in _our_interfaces()]
    found += [f"loop device {loop}" for loop in _our_loops()]
    found += [f"{tool} FORWARD rule for bridge {bridge}" for tool, bridge in firewall.ours()]
    return found


def _parent(proc: Path) -> int:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _our_loops() -> list[str]:
    """Loop devices over a test's or the demo's images (other loops on the host are not ours)."""
    loops = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            path = backing.read_text().strip()
        except OSError:
            continue
        if "/pytest-of-" in path or "hyper-demo" in path:
            loops.append(f"{backing.parts[3]} ({path})")
    return loops


def _our_interfaces() -> list[str]:
    from pyroute2 import IPRoute

    from backends.netback.tap import OURS

    with IPRoute() as ipr:
        return [
            link.get_attr("IFLA_IFNAME")
            for link in ipr.get_links()
            if link.get_attr("IFLA_IFALIAS") == OURS
            or (link.get_attr("IFLA_IFNAME") or "").startswith("vif")
        ]


#: What the hypervisor running now was started with (start_hypervisor's ``env``).
_started_with: dict[str, str] = {}


def start_hypervisor(env: dict[str, str] | None = None, args: Sequence[str] = ()) -> None:
    """Start hyperd with ``args``, and ``env`` added to its environment (which dom0, every
    domain and every data-path worker inherit)."""
    _started_with.clear()
    _started_with.update(env or {})
    subprocess.Popen(
        [sys.executable, "-m", "hyperd.hypervisor", *args],
        cwd="/",
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {}), "PYTHONPATH": str(REPO)},
    )
    wait_for(lambda: hyperctl("list", check=False).status == 0, 30, "the hypervisor to start")


def kill_hyperd() -> None:
    """SIGKILL hyperd; returns once it is dead."""
    pid = int(RUN.pidfile.read_text().split()[0])
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid), 10, "hyperd to die")


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (PID 1 reaps orphans only now and then)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_hypervisor() -> None:
    hyperctl("halt", check=False)
    wait_for(lambda: not leftovers(), 30, "the hypervisor to leave nothing behind")


@pytest.fixture(scope="session")
def clean_machine() -> Iterator[None]:
    """The machine is clean before the session's hypervisor starts, and once it has halted;
    it has what hyper needs (the plugin's ``hyper`` would skip without it: here, a host that
    cannot run the tests fails them)."""
    require_root()
    missing = pytest_plugin.missing_requirements()
    assert not missing, f"hyper cannot run on this host: missing {', '.join(missing)}"
    stale = leftovers()
    assert not stale, f"the machine is not clean before the tests: {stale}"
    yield
    wait_for(lambda: not leftovers(), 30, "the hypervisor to leave nothing behind")


@pytest.fixture(scope="session")
def hypervisor(clean_machine: None, hyper: api.Hypervisor) -> None:
    """One hypervisor for the session: the one hyper's pytest plugin starts for its ``hyper``
    fixture (hyper/pytest_plugin.py), as an outside project's tests get it, on a clean
    machine."""


@pytest.fixture
def own_hypervisor() -> Iterator[None]:
    """A hypervisor for this test alone, which it may break: one already running is halted
    first and started again afterwards."""
    with hypervisor_of_its_own():
        yield


@contextlib.contextmanager
def hypervisor_of_its_own(
    env: dict[str, str] | None = None, args: Sequence[str] = ()
) -> Iterator[None]:
    """A hypervisor started with ``args`` and ``env`` added to its environment (by default,
    what the one running now was started with), halted and cleaned up at the end; one already
    running is halted first and started again afterwards, as it was."""
    require_root()
    shared = RUN.pidfile.exists()
    before = dict(_started_with)
    if shared:
        stop_hypervisor()
    start_hypervisor(before if env is None else env, args)
    try:
        yield
    finally:
        hyperctl("halt", check=False)
        cleanup = [sys.executable, "-m", "hyper.cli", "cleanup"]
        subprocess.run(cleanup, cwd=REPO, capture_output=True)
        wait_for(lambda: not leftovers(), 30, "the test's hypervisor to leave nothing behind")
        if shared:
            start_hypervisor(before)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A module that sets ``PUMPS = BOTH_PUMPS`` (and uses the ``data_path_pumps`` fixture) runs
    all its tests on the native pumps, then all on the Python reference."""
    if "data_path_pumps" in metafunc.fixturenames:
        kinds = getattr(metafunc.module, "PUMPS", ("native",))
        metafunc.parametrize("data_path_pumps", kinds, indirect=True, scope="module")


BOTH_PUMPS = ("native", "python")


@pytest.fixture(scope="module")
def data_path_pumps(request: pytest.FixtureRequest, hypervisor: None) -> Iterator[str]:
    """The pumps this module's tests run on: the session's hypervisor (native), or one of the
    module's own with ``HYPER_PUMPS=python`` (channels/pumps.py), which every domain kernel and
    data-path worker inherits."""
    if request.param == "python":
        with hypervisor_of_its_own({pumps.ENV: "python"}):
            yield "python"
    else:
        yield "native"


_names = itertools.count()


@pytest.fixture
def make_domain(
    hypervisor: None, hyper_domain: Callable[..., TestDomain], tmp_path: Path
) -> Callable[..., str]:
    """Create domains from YAML text (a unique name is filled in) with the plugin's
    ``hyper_domain``, which destroys them afterwards and puts their logs and consoles in the
    report of a test that failed; their names."""

    def make(body: str = "", name: str | None = None) -> str:
        name = name or f"t{os.getpid() % 1000}-{next(_names)}"
        config = tmp_path / f"{name}.yaml"
        config.write_text(f"name: {name}\n{body}")
        return hyper_domain(config).name

    return make


_subnets = itertools.count(10)


@pytest.fixture
def lan() -> Iterator[tuple[str, str]]:
    """A bridge name and a /24 prefix ("10.77.N") of our own."""
    n = next(_subnets)
    yield f"hytest{n}", f"10.77.{n}"
    subprocess.run(["ip", "link", "del", f"hytest{n}"], capture_output=True)
    firewall.revoke(f"hytest{n}")  # the bridge went by hand: its rule goes too


@pytest.fixture
def peer_namespace(lan: tuple[str, str]) -> Iterator[str]:
    """A network namespace of the test's own (which the test joins to its bridge by a veth, at
    .100 of its subnet); deleted afterwards with what is in it, and the veth's host end."""
    _bridge, _net = lan
    ns = f"hypeer{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", f"{ns}h"], capture_output=True)


def join_lan(ns: str, lan: tuple[str, str]) -> None:
    """Join namespace ``ns`` (``peer_namespace``) to the test's bridge, once a domain has made
    it, by a veth at .100 of its subnet."""
    bridge, net = lan
    for cmd in (
        ["ip", "link", "add", f"{ns}h", "type", "veth", "peer", "name", "eth0", "netns", ns],
        ["ip", "link", "set", f"{ns}h", "master", bridge, "up"],
        ["ip", "-n", ns, "addr", "add", f"{net}.100/24", "dev", "eth0"],
        ["ip", "-n", ns, "link", "set", "eth0", "up"],
    ):
        subprocess.run(cmd, check=True)


def hyperctl_started(*args: str) -> subprocess.Popen[str]:
    """`hyperctl ARGS` started, not waited for (stdout and stderr piped, text)."""
    return subprocess.Popen(
        [sys.executable, "-m", "hyper.cli", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def in_domain(name: str, *argv: str) -> subprocess.Popen[str]:
    """``argv`` run in domain ``name`` through hyperctl exec; started, not waited for."""
    return hyperctl_started("exec", name, "--", *argv)


def as_kernel(name: str, *argv: str, **popen: Any) -> subprocess.Popen[str]:
    """``argv`` run as domain ``name``'s kernel would be, were it hostile: root of the domain's
    user namespace (every capability there), in the kernel's mount, net, pid, uts, ipc and
    cgroup namespaces and in the domain's cgroup. Started, not waited for; ``popen`` overrides
    the pipes (stdout and stderr by default, text)."""
    info = domain_info(name)
    assert info is not None and info["pid"], f"no running domain {name}"
    group = cgroup.open_hierarchy().open(f"dom{info['domid']}")
    namespaces = ("--user", "--mount", "--net", "--pid", "--uts", "--ipc", "--cgroup")
    options: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen}
    return subprocess.Popen(
        ["nsenter", f"--target={info['pid']}", *namespaces, "--", *argv],
        preexec_fn=lambda: group.attach(os.getpid()),
        text=True,
        **options,
    )


def start_iperf3_server(domain: str, *options: str) -> None:
    """`iperf3 -s -1 -D` inside a domain, returning once it listens."""
    hyperctl("exec", domain, "--", "iperf3", "-s", "-1", "-D", *options)

    def listening() -> bool:
        probe = hyperctl("exec", domain, "--", "sh", "-c", "ss -ltn | grep -q 5201", check=False)
        return probe.status == 0

    wait_for(listening, 10, f"iperf3 to listen in {domain}")


def iperf3_report(text: str) -> dict[str, Any]:
    """An iperf3 ``-J`` report of a run that completed: one that says it failed, or has no
    receiver's sum (the server's results never came back), fails the test with what it says."""
    report: dict[str, Any] = json.loads(text)
    end = report.get("end", {})
    mbits = [round(i["sum"]["bits_per_second"] / 1e6) for i in report.get("intervals", [])]
    assert "error" not in report and "sum_received" in end, (
        f"iperf3 did not complete: error={report.get('error')!r}, end has {sorted(end)}, "
        f"Mbit/s each interval: {mbits}"
    )
    return report


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pluggy.Result[pytest.TestReport], None]:
    """What the plugin's report leaves out: the logs of the domains a test made by hand (with
    `hyperctl create`), hyperd's and dom0's for a test that did not use the plugin, and the
    host's network."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and RUN.logs.exists():
        for log in _logs_worth_showing(item):
            lines = log.read_text(errors="replace").splitlines()[-40:]
            if lines:
                report.sections.append((f"hyper log {log.name}", "\n".join(lines)))
        report.sections.append(("host network", _host_network()))


def _logs_worth_showing(item: pytest.Item) -> list[Path]:
    """The logs of the domains running now (the failed test's: its fixtures have not torn them
    down yet) that the plugin does not report, and hyperd's and dom0's unless the plugin does;
    every log if the domains cannot be listed. A domid's log from an earlier hypervisor would
    only mislead."""
    every = sorted(RUN.logs.glob("*.log"))
    try:
        running = {f"dom{d['domid']}.log" for d in domains()}
    except (AssertionError, ValueError, subprocess.TimeoutExpired):
        return every
    running -= {f"dom{d.domid}.log" for d in made_domains(item)}
    if not pytest_plugin.reports_hypervisor_logs(item):
        running |= {"hyperd.log", "dom0.log"}
    return [log for log in every if log.name in running]


def _host_network() -> str:
    """What a failed network test needs to be understood: each bridge port's state and each
    running domain's vif counters (frames through the rings, drops, errors)."""
    shown = []
    for argv in (
        ["bridge", "link", "show"],
        ["ip", "-s", "-o", "link", "show", "type", "bridge"],
        ["ip", "-s", "-o", "link", "show", "type", "tun"],
        ["cat", "/proc/net/softnet_stat"],
    ):
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        shown.append(f"$ {' '.join(argv)}\n{proc.stdout}{proc.stderr}")
    with contextlib.suppress(AssertionError, ValueError, subprocess.TimeoutExpired):
        for domain in domains():
            if domain["domid"] != 0:
                stats = hyperctl("network-list", "--json", domain["name"], check=False, timeout=10)
                shown.append(f"{domain['name']} (dom{domain['domid']}): {stats.out.strip()}")
    return "\n".join(shown)

"""A domain's kernel turned hostile reaches nothing of the host's: not /dev/shm, not its
processes through /proc, not its terminals, not its pseudo-terminal pool; and it can make hyperd
spend only a bounded share of its time and disk on it (its log, its hypercalls).

Each test plays the attacker from inside a real domain: as its kernel would, with
``as_kernel`` (root of the domain's user namespace, in its namespaces and cgroup), or as its
unprivileged workload. What it tries is what a kernel that wanted out would try first.
"""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from domu.sandbox import PTYS_MAX
from hyperd.budget import HYPERCALL_BURST, HYPERCALL_COST, HYPERCALL_RATE, LOG_MAX
from tests import hostile_kernel as hostile
from tests.integration.conftest import (
    REPO,
    RUN,
    as_kernel,
    domain_info,
    hyperctl,
    kill_hyperd,
    wait_for,
)

pytestmark = pytest.mark.root

SHM = Path("/dev/shm")


def kernel_python(name: str, code: str, *args: str) -> dict[str, str]:
    """Run ``code`` as the domain's kernel; it prints ``what: outcome`` lines, returned as a
    dict."""
    proc = as_kernel(name, sys.executable, "-c", code, *args)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, f"kernel-side script failed: {err}"
    return dict(line.split(": ", 1) for line in out.splitlines())


TRY = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
def attempt(what, fn):
    try:
        fn()
        print(f"{what}: done")
    except OSError as e:
        print(f"{what}: {type(e).__name__}")
def umount(path):
    if libc.umount2(path.encode(), 0) != 0:
        raise OSError(ctypes.get_errno(), path)
"""

SHM_ATTACKS = (
    TRY
    + """
ring = sys.argv[1]
attempt("create a file", lambda: open("/dev/shm/left-behind", "x"))
attempt("create a directory", lambda: os.mkdir("/dev/shm/hyper.x"))
attempt("create a symlink", lambda: os.symlink("/", "/dev/shm/hyper.y"))
attempt("create a fifo", lambda: os.mkfifo("/dev/shm/hyper.z"))
attempt("remove its ring", lambda: os.unlink("/dev/shm/" + ring))
attempt("rename its ring", lambda: os.rename("/dev/shm/" + ring, "/dev/shm/moved"))
attempt("unmount its shm", lambda: umount("/dev/shm"))
attempt("open its ring", lambda: open("/dev/shm/" + ring, "r+b").close())
"""
)


def test_the_kernel_cannot_write_the_hosts_shm_and_nothing_outlives_it(
    make_domain: Callable[..., str],
) -> None:
    name = make_domain()
    info = domain_info(name)
    assert info is not None
    ring = info["store"]["segment"]

    outcomes = kernel_python(name, SHM_ATTACKS, ring)

    assert outcomes.pop("open its ring") == "done", "its own ring stays usable"
    assert "done" not in outcomes.values(), outcomes
    assert outcomes["create a file"] == outcomes["create a directory"] == "PermissionError"
    made = ("left-behind", "hyper.x", "hyper.y", "hyper.z", "moved")
    places = (SHM, SHM / f"hyper.d{info['domid']}")  # the host's, and the domain's own view
    assert not [p / n for p in places for n in made if os.path.lexists(p / n)]
    assert (SHM / ring).exists()
    hyperctl("destroy", name)
    domid = info["domid"]
    names = (f"hyper.d{domid}.", f"sem.hyper.d{domid}.")
    mine = [
        p.name for p in SHM.iterdir() if p.name == f"hyper.d{domid}" or p.name.startswith(names)
    ]
    assert not mine, f"the domain's objects and view outlive it: {mine}"


PROC_ATTACKS = (
    TRY
    + """
for name in ("proc", "sys"):
    attempt(f"unmount its own {name}", lambda: umount("/" + name))
    print(f"{name} after: {' '.join(sorted(os.listdir('/' + name)))}")
    attempt(f"unmount the {name} cover", lambda: umount("/" + name))
    attempt(f"unmount the {name} .host cover", lambda: umount(f"/{name}/.host"))
    attempt(f"look under the {name} .host cover", lambda: os.listdir(f"/{name}/.host"))
    attempt(f"reach the host's {name} by path", lambda: os.listdir(f"/{name}/.host/fs"))
os.makedirs("/tmp/newproc", exist_ok=True)
attempt("mount a proc", lambda: os.system("mount -t proc proc /tmp/newproc") or None)
pids = [p for p in os.listdir("/tmp/newproc") if p.isdigit()]
print(f"pids: {' '.join(sorted(pids, key=int))}")
print(f"pid 1: {open('/tmp/newproc/1/comm').read().strip()}")
"""
)


def test_the_kernel_cannot_unmount_its_way_to_the_hosts_proc_or_sys(
    make_domain: Callable[..., str],
) -> None:
    name = make_domain()
    hyperd_pid = RUN.pidfile.read_text().split()[0]

    outcomes = kernel_python(name, PROC_ATTACKS)

    assert outcomes["unmount its own proc"] == "done", "what it mounted is its to unmount"
    for fs in ("proc", "sys"):
        assert outcomes[f"{fs} after"] == ".host", f"an empty cover, not the host's {fs}"
        assert outcomes[f"unmount the {fs} cover"] != "done"
        assert outcomes[f"unmount the {fs} .host cover"] != "done"
        assert outcomes[f"look under the {fs} .host cover"] == "PermissionError"
        assert outcomes[f"reach the host's {fs} by path"] != "done"
    pids = outcomes["pids"].split()
    assert hyperd_pid not in pids and len(pids) < 16, "a new proc shows the domain's own pids"
    assert outcomes["pid 1"] == "hyper-kernel"


OPEN_PTYS = """
import os, sys
held, refused = [], "nothing"
try:
    for _ in range(1000):
        held.append(os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY))
except OSError as e:
    refused = e.strerror
print(f"opened {len(held)}, refused: {refused}", flush=True)
sys.stdin.readline()  # hold them until the host has looked
"""


def host_pts() -> set[str]:
    return set(os.listdir("/dev/pts"))


def pty_count() -> int:
    return int(Path("/proc/sys/kernel/pty/nr").read_text())


def test_a_workload_that_opens_ptys_until_refused_takes_none_of_the_hosts(
    make_domain: Callable[..., str],
) -> None:
    name = make_domain()
    host_before, count_before = host_pts(), pty_count()
    proc = subprocess.Popen(
        [sys.executable, "-m", "hyper.cli", "exec", name, "--", "python3", "-c", OPEN_PTYS],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()
        assert line.endswith("refused: No space left on device\n"), line
        opened = int(line.split()[1].rstrip(","))
        assert 0 < opened < PTYS_MAX, "the domain's own limit stopped it (its console has one)"
        assert host_pts() == host_before, "the host's terminals: none new, none listed inside"
        assert pty_count() - count_before <= PTYS_MAX, "the global count: at most its limit"
        master, slave = pty.openpty()  # the host can still open one
        os.close(master)
        os.close(slave)
        proc.stdin.write("done\n")
        proc.stdin.flush()
    finally:
        proc.kill()
        proc.wait(30)


def test_a_workload_cannot_make_a_user_namespace_to_mount_a_devpts_of_its_own(
    make_domain: Callable[..., str],
) -> None:
    """In a user namespace of its own, the workload could mount a devpts without the domain's
    limit and take ptys until the kernel's global limit."""
    name = make_domain()
    attempt = "unshare -Urm sh -c 'mount -t devpts -o newinstance none /tmp && echo mounted'"
    result = hyperctl("exec", name, "--", "sh", "-c", attempt, check=False)
    assert result.status != 0 and "mounted" not in result.out, result


def host_terminals_in(name: str) -> list[str]:
    """Descriptors that any process in the domain's cgroup holds on one of the host's
    terminals (its devpts instance), seen from the host."""
    from hyperd import cgroup

    info = domain_info(name)
    assert info is not None
    host_devpts = os.stat("/dev/pts/ptmx").st_dev
    found = []
    for pid in cgroup.open_hierarchy().open(f"dom{info['domid']}").pids():
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                if os.stat(fd).st_dev == host_devpts:
                    found.append(f"{pid}:{fd.name} -> {os.readlink(fd)}")
            except OSError:
                continue
    return found


@pytest.fixture
def caller_terminal() -> Iterator[int]:
    """A terminal of the test's own, standing in for an administrator's."""
    master, slave = pty.openpty()
    yield slave
    os.close(master)
    os.close(slave)


@pytest.mark.parametrize("terminal", ["stdin", "stdout", "stdin and stdout"])
def test_exec_never_hands_a_host_terminal_to_the_domain(
    make_domain: Callable[..., str], caller_terminal: int, terminal: str
) -> None:
    """With one of stdin and stdout a terminal, hyperctl must relay the caller's, not pass it;
    with both, the command gets a terminal, and it must be one of the domain's own."""
    name = make_domain()
    stdio = {"stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE}
    for which in terminal.split(" and "):
        stdio[which] = caller_terminal
    proc = subprocess.Popen(
        [sys.executable, "-m", "hyper.cli", "exec", name, "--", "sh", "-c", "sleep 60"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=stdio["stdin"],
        stdout=stdio["stdout"],
        stderr=subprocess.PIPE,
    )
    try:
        sleeper = wait_for(lambda: running(name, "sleep"), 20, "the command to start")
        assert not host_terminals_in(name), "a descriptor of a host terminal inside"
        stdin = os.stat(f"/proc/{sleeper}/fd/0")
        has_terminal = os.major(stdin.st_rdev) in range(136, 144)
        assert has_terminal == (terminal == "stdin and stdout")
    finally:
        proc.kill()
        proc.wait(30)


def running(name: str, command: str) -> int | None:
    """The host pid of a process named ``command`` in domain ``name``, if one runs."""
    from hyperd import cgroup

    info = domain_info(name)
    assert info is not None
    for pid in cgroup.open_hierarchy().open(f"dom{info['domid']}").pids():
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == command:
                return pid
        except OSError:
            continue
    return None


def plant_strays() -> dict[Path, str]:
    """Entries in /dev/shm with hyper's prefix that hyper never made, of every file type; and
    what each must not take with it."""
    target = Path("/var/tmp/hyper-stray-target")
    target.write_text("must survive\n")
    (SHM / "hyper.x").mkdir()
    (SHM / "hyper.x" / "inner").mkdir()
    (SHM / "hyper.x" / "inner" / "file").write_text("x")
    os.mkfifo(SHM / "hyper.fifo")
    (SHM / "hyper.link").symlink_to(target)
    (SHM / "sem.hyper.dir").mkdir()
    (SHM / "hyper.odd\nname").write_text("x")
    return {target: "must survive\n"}


def strays() -> list[str]:
    names = ("hyper.x", "hyper.fifo", "hyper.link", "sem.hyper.dir", "hyper.odd\nname")
    return [n for n in names if os.path.lexists(SHM / n)]


@pytest.fixture
def stray_cleanup() -> Iterator[None]:
    yield
    for name in ("hyper.x", "sem.hyper.dir"):
        subprocess.run(["rm", "-rf", str(SHM / name)], check=False)
    for name in ("hyper.fifo", "hyper.link", "hyper.odd\nname"):
        (SHM / name).unlink(missing_ok=True)
    Path("/var/tmp/hyper-stray-target").unlink(missing_ok=True)


def test_stray_shm_entries_stop_neither_readoption_nor_cleanup(
    own_hypervisor: None, tmp_path: Path, stray_cleanup: None
) -> None:
    config = tmp_path / "stray.yaml"
    config.write_text("name: stray\n")
    hyperctl("create", str(config))
    pid = domain_info("stray")["pid"]  # type: ignore[index]

    kept = plant_strays()
    kill_hyperd()
    hyperctl("start")
    assert domain_info("stray")["pid"] == pid, "the domain was re-adopted"  # type: ignore[index]
    assert not strays(), "re-adoption removes what no domain holds"
    assert all(path.read_text() == text for path, text in kept.items()), "nothing followed"

    hyperctl("halt")
    kept = plant_strays()
    result = hyperctl("cleanup", check=False)
    assert result.status == 0, result
    assert not strays(), result.out
    assert all(path.read_text() == text for path, text in kept.items())


@pytest.fixture
def stopped_kernel(make_domain: Callable[..., str]) -> Iterator[str]:
    """A domain whose kernel is stopped, for a hostile one to act in its place."""
    name = make_domain()
    pid = domain_info(name)["pid"]  # type: ignore[index]
    os.kill(pid, signal.SIGSTOP)
    yield name
    os.kill(pid, signal.SIGCONT)


def hostile_kernel(name: str, attack: str, seconds: float) -> subprocess.Popen[str]:
    """tests/hostile_kernel.py, with the stopped kernel's own descriptor for ``attack``."""
    pid = domain_info(name)["pid"]  # type: ignore[index]
    fd = hostile.steal(pid, hostile.kernel_fds(pid)[attack])
    try:
        return as_kernel(
            name,
            sys.executable,
            "-m",
            "tests.hostile_kernel",
            attack,
            f"--fd={fd}",
            f"--seconds={seconds}",
            env={**os.environ, "PYTHONPATH": str(REPO)},
            pass_fds=(fd,),
        )
    finally:
        os.close(fd)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def hyperd_pid() -> int:
    return int(RUN.pidfile.read_text().split()[0])


FLOOD_SECONDS = 15.0  # the burst, then LOG_RATE: the log rotates twice meanwhile


def test_a_log_flood_leaves_the_log_under_its_cap(stopped_kernel: str) -> None:
    name = stopped_kernel
    domid = domain_info(name)["domid"]  # type: ignore[index]
    current, rotated = RUN.log(f"dom{domid}"), RUN.log(f"dom{domid}").with_suffix(".log.1")
    cpu_before = cpu_seconds(hyperd_pid())

    attacker = hostile_kernel(name, "log", FLOOD_SECONDS)
    sizes = []
    while attacker.poll() is None:
        sizes.append(sum(p.stat().st_size for p in (current, rotated) if p.exists()))
        assert hyperctl("list", timeout=10).status == 0, "hyperd answers during the flood"
    out, err = attacker.communicate(timeout=30)
    assert attacker.returncode == 0, err

    written = int(out.split("bytes=")[1].split()[0])
    assert written > 2 * LOG_MAX, "the attacker got more in than the cap (the socket's buffer)"
    assert rotated.exists(), "the log reached its cap and was rotated"
    assert max(sizes) <= 2 * LOG_MAX and current.stat().st_size <= LOG_MAX, sizes
    cpu_share = (cpu_seconds(hyperd_pid()) - cpu_before) / FLOOD_SECONDS
    assert cpu_share < 0.1, f"hyperd spent {cpu_share:.0%} of a CPU on the flood"


def test_a_hypercall_loop_is_served_no_faster_than_its_credit(stopped_kernel: str) -> None:
    cpu_before = cpu_seconds(hyperd_pid())

    attacker = hostile_kernel(stopped_kernel, "hypercalls", 5.0)
    while attacker.poll() is None:
        assert hyperctl("list", timeout=10).status == 0, "hyperd answers everybody else"
    out, err = attacker.communicate(timeout=60)
    assert attacker.returncode == 0, err

    fields = dict(word.split("=") for word in out.split()[1:])
    calls, seconds = int(fields["calls"]), float(fields["seconds"])
    credit = HYPERCALL_BURST + HYPERCALL_RATE * seconds
    assert 10 <= calls <= credit / HYPERCALL_COST[False] + 2, f"{calls} calls in {seconds} s"
    cpu_share = (cpu_seconds(hyperd_pid()) - cpu_before) / seconds
    assert cpu_share < 0.25, f"hyperd spent {cpu_share:.0%} of a CPU on the loop"

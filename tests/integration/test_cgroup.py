"""hyperd.cgroup on the host's real hierarchy, v1 or v2, whichever this kernel has (root).

Every test works under a parent group of its own ("hyper-test-<random>", never the real
"hyper", which a running hyperd may own) and its fixture removes that parent, its groups
and their processes even when the test fails.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hyperd.cgroup import DomainGroup, Hierarchy, Limits, open_hierarchy

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="creating cgroups needs root"),
]

MIB = 1 << 20
BURN = "while True: pass"
Spawn = Callable[..., subprocess.Popen[str]]


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test started; reaped after `hierarchy` has killed them (it is set up
    later, so torn down first: a v1-frozen child would ignore a SIGKILL from here)."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for child in started:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=30)


@pytest.fixture
def hierarchy(children: list[subprocess.Popen[str]]) -> Iterator[Hierarchy]:
    hierarchy = open_hierarchy(parent=f"hyper-test-{secrets.token_hex(4)}")
    hierarchy.prepare()  # as hyperd does (on a systemd host, the test joins hyper's scope)
    yield hierarchy
    hierarchy.remove_all(timeout=30)
    leftovers = [p for p in hierarchy.parent_dirs() if p.exists()]
    assert not leftovers, f"cgroups left behind: {leftovers}"


@pytest.fixture
def new_group(hierarchy: Hierarchy) -> Callable[[Limits], DomainGroup]:
    def create(limits: Limits) -> DomainGroup:
        return hierarchy.create(f"test-{secrets.token_hex(4)}", limits)

    return create


@pytest.fixture
def spawn(children: list[subprocess.Popen[str]]) -> Spawn:
    """Start a Python child; with `join`, it enters the group before exec, the way a domain's
    boot process does, so everything it allocates or forks is charged there."""

    def start(code: str, join: DomainGroup | None = None) -> subprocess.Popen[str]:
        procs_files = [str(p) for p in join.procs_file_paths()] if join else []

        def enter_group() -> None:
            for procs in procs_files:
                with open(procs, "w") as file:
                    file.write(str(os.getpid()))

        child = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=enter_group,
        )
        children.append(child)
        return child

    return start


def kernel_cgroup_paths(pid: int) -> dict[str, str]:
    """/proc/<pid>/cgroup as {controller: path}; v2's single line is keyed ''."""
    paths = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(","):
            paths[controller] = path
    return paths


def read(path: Path) -> str:
    return path.read_text().strip()


def test_limits_are_written_to_the_kernel_and_can_be_changed(new_group):
    group = new_group(Limits(memory_mib=64, cpu_weight=512, cap=50, pids_max=100))
    if group.path("memory") == group.path("pids"):  # v2: one directory
        d = group.path("memory")
        assert read(d / "memory.max") == str(64 * MIB)
        assert read(d / "cpu.weight") == "200"
        assert read(d / "cpu.max") == "50000 100000"
        assert read(d / "pids.max") == "100"
        if (d / "memory.swap.max").exists():
            assert read(d / "memory.swap.max") == "0"
    else:
        memory, cpu = group.path("memory"), group.path("cpu")
        assert read(memory / "memory.limit_in_bytes") == str(64 * MIB)
        assert read(cpu / "cpu.shares") == "2048"
        assert read(cpu / "cpu.cfs_period_us") == "100000"
        assert read(cpu / "cpu.cfs_quota_us") == "50000"
        assert read(group.path("pids") / "pids.max") == "100"

    # Raising, then lowering, the limit (v1 must order memsw around the plain limit).
    for memory_mib in (128, 48):
        group.set_limits(Limits(memory_mib=memory_mib))
        for name in ("memory.max", "memory.limit_in_bytes", "memory.memsw.limit_in_bytes"):
            if (group.path("memory") / name).exists():
                assert read(group.path("memory") / name) == str(memory_mib * MIB)
    uncapped = {"cpu.max": "max 100000", "cpu.cfs_quota_us": "-1"}
    for name, value in uncapped.items():
        if (group.path("cpu") / name).exists():
            assert read(group.path("cpu") / name) == value


def test_attached_process_is_in_the_group_in_every_controller(hierarchy, new_group, spawn):
    group = new_group(Limits(memory_mib=64))
    sleeper = spawn("import sys; sys.stdin.read()")
    group.attach(sleeper.pid)
    assert group.pids() == [sleeper.pid]
    expected = f"/{hierarchy.parent_dirs()[0].name}/{group.name}"
    paths = kernel_cgroup_paths(sleeper.pid)
    controllers = [""] if hierarchy.version == 2 else ["memory", "cpu", "cpuacct", "pids"]
    assert {c: paths[c] for c in controllers} == dict.fromkeys(controllers, expected)
    if hierarchy.version == 1:
        assert paths["freezer"] == expected
    assert os.getpid() not in group.pids()


def test_freeze_stops_cpu_time_and_thaw_resumes_it(new_group, spawn):
    paused, running = new_group(Limits(memory_mib=64)), new_group(Limits(memory_mib=64))
    spawn(BURN, join=paused)
    spawn(BURN, join=running)
    wait_until(lambda: paused.cpu_time_ns() > 50_000_000, "the burner to use CPU")

    paused.freeze()
    assert paused.frozen
    frozen_at = paused.cpu_time_ns()
    # The observation window is CPU time the other burner gets meanwhile, not wall time.
    window_start = running.cpu_time_ns()
    wait_until(lambda: running.cpu_time_ns() > window_start + 300_000_000, "300 ms of CPU")
    # A few ms of slack for accounting that lands after the freeze; a running burner
    # would have used hundreds.
    assert paused.cpu_time_ns() - frozen_at < 5_000_000

    paused.thaw()
    assert not paused.frozen
    wait_until(lambda: paused.cpu_time_ns() > frozen_at + 50_000_000, "the thawed burner")


def test_memory_is_charged_to_the_group(new_group, spawn):
    group = new_group(Limits(memory_mib=64))
    holder = spawn(
        "import sys; block = b'x' * (16 << 20); print('ready', flush=True); sys.stdin.read()",
        join=group,
    )
    assert holder.stdout.readline() == "ready\n"
    assert group.memory_bytes() >= 16 * MIB


def test_memory_hog_is_oom_killed_inside_its_group(new_group, spawn):
    group = new_group(Limits(memory_mib=32))
    assert group.oom_kills() == 0
    hog = spawn("block = b'x' * (256 << 20)", join=group)
    assert hog.wait(timeout=60) == -9
    assert group.oom_kills() >= 1
    assert os.getpid() not in group.pids()


def test_pids_limit_stops_forks(new_group, spawn):
    group = new_group(Limits(memory_mib=64, pids_max=4))
    forker = spawn(
        "import os, sys, time\n"
        "forked = 0\n"
        "for _ in range(10):\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(600)\n"
        "            os._exit(0)\n"
        "        forked += 1\n"
        "    except OSError:\n"
        "        pass\n"
        "print(forked, flush=True)\n"
        "sys.stdin.read()\n",
        join=group,
    )
    assert forker.stdout.readline() == "3\n"
    assert len(group.pids()) == 4


def test_remove_kills_a_frozen_process_tree_and_leaves_no_directory(new_group, spawn):
    group = new_group(Limits(memory_mib=64))
    parent = spawn(
        "import os, subprocess, sys\n"
        "kids = [subprocess.Popen(['sleep', '600']) for _ in range(3)]\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n",
        join=group,
    )
    assert parent.stdout.readline() == "ready\n"
    assert len(group.pids()) == 4
    group.freeze()

    group.remove(timeout=30)

    assert parent.wait(timeout=30) == -9
    assert not [d for d in group.dirs if d.exists()]
    group.remove(timeout=30)  # already gone: still fine


def test_remove_all_removes_every_group_and_the_parent(hierarchy, new_group, spawn):
    first, second = new_group(Limits(memory_mib=64)), new_group(Limits(memory_mib=64))
    sleeper = spawn("import sys; sys.stdin.read()", join=first)
    assert sorted(hierarchy.list()) == sorted([first.name, second.name])

    hierarchy.remove_all(timeout=30)

    assert sleeper.wait(timeout=30) == -9
    assert hierarchy.list() == []
    assert not [d for d in hierarchy.parent_dirs() if d.exists()]


def test_v2_controllers_are_enabled_in_hypers_parent_only(hierarchy, new_group):
    if hierarchy.version != 2:
        pytest.skip("cgroup v1 host: no subtree_control")
    parent = hierarchy.parent_dirs()[0]
    root_subtree = read(parent.parent / "cgroup.subtree_control")
    new_group(Limits(memory_mib=64))
    assert read(parent.parent / "cgroup.subtree_control") == root_subtree
    assert {"cpu", "memory", "pids"} <= set(read(parent / "cgroup.subtree_control").split())
    assert read(parent / "cgroup.procs") == ""

"""hyperd.cgroup against fake cgroup trees in a temporary directory (no root needed).

The fakes lay out files as the kernel exposes them: a v2 tree whose mkdir adds the files of
the controllers its parent's subtree_control enables, and v1 trees (cpu and cpuacct mounted
apart, as on this machine, or co-mounted as cpu,cpuacct) found through a fake mountinfo.
A written file holds the last value written, so a test reads back exactly what hyper wrote.

No test here puts a fake pid into a group it then kills: kill_all signals real pids.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from hyperd.cgroup import (
    CgroupError,
    CgroupFs,
    Hierarchy,
    Limits,
    cfs_quota_us,
    open_hierarchy,
    parse_cpu_list,
    place_vcpus,
    unit_object,
    v1_cpu_shares,
    v1_mounts,
    v2_cpu_weight,
)

MIB = 1 << 20
LIMITS = Limits(memory_mib=64, cpu_weight=512, cap=50, pids_max=100)

V2_CORE = {
    "cgroup.procs": "",
    "cgroup.events": "populated 0\nfrozen 0\n",
    "cgroup.freeze": "0",
    "cgroup.kill": "",
    "cgroup.subtree_control": "",
}
V2_CONTROLLER_FILES = {
    "memory": {
        "memory.max": "max\n",
        "memory.swap.max": "max\n",
        "memory.current": "0\n",
        "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
    },
    "cpu": {
        "cpu.weight": "100\n",
        "cpu.max": "max 100000\n",
        "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0\n",
    },
    "pids": {"pids.max": "max\n", "pids.current": "0\n"},
    "io": {"io.max": ""},
    # Empty cpuset.cpus: the parent's CPUs (what .effective shows).
    "cpuset": {
        "cpuset.cpus": "\n",
        "cpuset.cpus.effective": "0-3\n",
        "cpuset.mems": "\n",
        "cpuset.mems.effective": "0\n",
    },
}
V1_CONTROLLER_FILES = {
    "memory": {
        "memory.limit_in_bytes": "9223372036854771712\n",
        "memory.memsw.limit_in_bytes": "9223372036854771712\n",
        "memory.usage_in_bytes": "0\n",
        "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
    },
    "cpu": {"cpu.shares": "1024\n", "cpu.cfs_period_us": "100000\n", "cpu.cfs_quota_us": "-1\n"},
    "cpuacct": {"cpuacct.usage": "0\n"},
    "pids": {"pids.max": "max\n", "pids.current": "0\n"},
    "freezer": {"freezer.state": "THAWED\n"},
    # A new v1 cpuset group has no CPU and no memory node (cgroup.clone_children 0).
    "cpuset": {"cpuset.cpus": "\n", "cpuset.mems": "\n"},
}


def write_files(directory: Path, files: dict[str, str], omit: frozenset[str]) -> None:
    for name, text in files.items():
        if name not in omit:
            (directory / name).write_text(text)


def rmdir_like_cgroupfs(path: Path) -> None:
    if (path / "cgroup.procs").read_text().split() or any(p.is_dir() for p in path.iterdir()):
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(path))
    for file in path.iterdir():
        file.unlink()
    os.rmdir(path)


class FakeV2Fs(CgroupFs):
    """cgroupfs v2 as Documentation/admin-guide/cgroup-v2.rst describes it.

    mkdir adds the core files and those of the controllers the parent enables. A pid written
    into a group leaves every other. Enabling a controller the group's parent does not pass
    down fails with ENOENT; a process in a non-root group that enables controllers for its
    children, or enabling them in a non-root group that holds a process, fails with EBUSY
    (the no-internal-process rule). subtree_control reads back as the kernel writes it: names
    without '+', in the root's order.
    """

    def __init__(self, root: Path, omit: frozenset[str] = frozenset()) -> None:
        self.root = root
        self.omit = omit

    def mkdir(self, path: Path) -> None:
        os.mkdir(path)
        enabled = (path.parent / "cgroup.subtree_control").read_text().split()
        files = {**V2_CORE, "cgroup.controllers": " ".join(enabled)}
        for controller in enabled:
            files.update(V2_CONTROLLER_FILES[controller])
        write_files(path, files, self.omit)

    def rmdir(self, path: Path) -> None:
        rmdir_like_cgroupfs(path)

    def move(self, pid: int, procs: Path) -> None:
        group = procs.parent
        if group != self.root and (group / "cgroup.subtree_control").read_text().split():
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(procs))
        for other in self.root.rglob("cgroup.procs"):
            pids = other.read_text().split()
            if str(pid) in pids:
                other.write_text("".join(f"{p}\n" for p in pids if p != str(pid)))
        procs.write_text(procs.read_text() + f"{pid}\n")

    def enable(self, group: Path, controllers: Sequence[str]) -> None:
        subtree = group / "cgroup.subtree_control"
        if group != self.root and (group / "cgroup.procs").read_text().split():
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(subtree))
        available = (group / "cgroup.controllers").read_text().split()
        if any(c not in available for c in controllers):
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), str(subtree))
        enabled = {*subtree.read_text().split(), *controllers}
        order = (self.root / "cgroup.controllers").read_text().split()
        subtree.write_text(" ".join(c for c in order if c in enabled) + "\n")
        for child in (p for p in group.iterdir() if p.is_dir()):  # their files appear
            (child / "cgroup.controllers").write_text(subtree.read_text())
            for controller in controllers:
                files = V2_CONTROLLER_FILES[controller]
                absent = files.keys() - {p.name for p in child.iterdir()}
                write_files(child, {name: files[name] for name in absent}, self.omit)

    def own_group(self) -> str:
        for procs in self.root.rglob("cgroup.procs"):
            if str(os.getpid()) in procs.read_text().split():
                return "/" + str(procs.parent.relative_to(self.root)).removeprefix(".")
        raise AssertionError("this process is in no group of the fake tree")


class FakeSystemd(FakeV2Fs):
    """A v2 tree systemd owns: PID 1 in init.scope, services in system.slice, and the D-Bus
    calls hyper makes: a unit's ActiveState (a scope is active while a process is in its
    subtree), StartTransientUnit starting a delegated scope (its controllers enabled on the
    way down, as systemd does for Delegate=yes) holding the given pid, and
    AttachProcessesToUnit moving a pid into a running scope's subgroup. ``refuse``: the
    error every start gets; ``lingering``: starts refused as systemd refuses a name it still
    holds, before one succeeds."""

    DELEGATED = ("cpuset", "cpu", "io", "memory", "pids")

    def __init__(self, root: Path, refuse: str | None = None, lingering: int = 0) -> None:
        super().__init__(root)
        self.refuse = refuse
        self.lingering = lingering
        self.started: list[tuple[str, str, int]] = []
        self.joined: list[tuple[str, str, int]] = []

    def scope(self, unit: str) -> Path:
        return self.root / "system.slice" / unit

    def unit_state(self, unit: str) -> str:
        held = self.scope(unit).is_dir() and any(
            procs.read_text().split() for procs in self.scope(unit).rglob("cgroup.procs")
        )
        return "active" if held else "inactive"

    def start_scope(self, unit: str, slice_: str, pid: int) -> None:
        if self.refuse is not None:
            raise CgroupError(self.refuse)
        if self.lingering:
            self.lingering -= 1
            raise CgroupError(f"Unit {unit} was already loaded or has a fragment file.")
        self.started.append((unit, slice_, pid))
        for group in (self.root, self.root / slice_):
            self.enable(group, self.DELEGATED)
        if not self.scope(unit).is_dir():
            self.mkdir(self.scope(unit))
        self.move(pid, self.scope(unit) / "cgroup.procs")

    def join_unit(self, unit: str, subgroup: str, pid: int) -> None:
        assert self.unit_state(unit) == "active", "systemd refuses a unit that is not running"
        self.joined.append((unit, subgroup, pid))
        self.move(pid, self.scope(unit) / subgroup.lstrip("/") / "cgroup.procs")


class FakeV1Fs(CgroupFs):
    """mkdir adds the files of the controllers mounted on the hierarchy it is in."""

    def __init__(self, mounts: dict[Path, tuple[str, ...]], omit: frozenset[str]) -> None:
        self.mounts = mounts
        self.omit = omit

    def mkdir(self, path: Path) -> None:
        os.mkdir(path)
        controllers = next(cs for mount, cs in self.mounts.items() if path.is_relative_to(mount))
        files = {"cgroup.procs": "", "tasks": ""}
        for controller in controllers:
            files.update(V1_CONTROLLER_FILES[controller])
        write_files(path, files, self.omit)

    def rmdir(self, path: Path) -> None:
        rmdir_like_cgroupfs(path)


def make_v2(
    tmp_path: Path, delegated: str = "cpu io memory pids", omit: frozenset[str] = frozenset()
) -> tuple[Path, Hierarchy]:
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    (root / "cgroup.subtree_control").write_text(delegated + "\n")
    (root / "cgroup.procs").write_text("1\n")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"30 23 0:26 / {root} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n")
    return root, open_hierarchy(root, mountinfo=mountinfo, fs=FakeV2Fs(root, omit))


def make_systemd(
    tmp_path: Path, refuse: str | None = None, lingering: int = 0
) -> tuple[Path, FakeSystemd]:
    """A v2 tree as systemd leaves it: memory and pids enabled at the root, PID 1 in
    init.scope, and this process beside the runner's own in a service (no delegation)."""
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    (root / "cgroup.subtree_control").write_text("memory pids\n")
    (root / "cgroup.procs").write_text("")
    fs = FakeSystemd(root, refuse, lingering)
    for group in ("init.scope", "system.slice", "system.slice/runner.service"):
        fs.mkdir(root / group)
    fs.move(1, root / "init.scope/cgroup.procs")
    fs.move(4100, root / RUNNER / "cgroup.procs")
    fs.move(os.getpid(), root / RUNNER / "cgroup.procs")
    return root, fs


RUNNER = "system.slice/runner.service"
SCOPE = "system.slice/hyper.scope"


def make_v1(
    tmp_path: Path, hierarchies: Sequence[tuple[str, ...]], omit: frozenset[str] = frozenset()
) -> tuple[Path, Hierarchy]:
    """A tmpfs-like root with one mount per hierarchy, plus the empty cgroup2 beside them."""
    root = tmp_path / "cgroup"
    root.mkdir()
    lines = [f"31 23 0:28 / {root} rw,relatime - tmpfs tmpfs rw,mode=755"]
    mounts: dict[Path, tuple[str, ...]] = {}
    for number, controllers in enumerate(hierarchies, start=32):
        mount = root / ",".join(controllers)
        mount.mkdir()
        (mount / "cgroup.procs").write_text("1\n")
        if "cpuset" in controllers:  # the root's: every CPU and memory node
            (mount / "cpuset.cpus").write_text("0-3\n")
            (mount / "cpuset.mems").write_text("0\n")
        mounts[mount] = controllers
        options = ",".join(controllers)
        lines.append(f"{number} 31 0:{number} / {mount} rw,relatime - cgroup cgroup rw,{options}")
    (root / "unified").mkdir()
    (root / "unified" / "cgroup.controllers").write_text("")
    lines.append(f"41 31 0:38 / {root}/unified rw,relatime - cgroup2 cgroup2 rw")
    lines.append(f"40 31 0:37 / {root}/systemd rw,relatime - cgroup cgroup rw,name=systemd")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("\n".join(lines) + "\n")
    return root, open_hierarchy(root, mountinfo=mountinfo, fs=FakeV1Fs(mounts, omit))


SEPARATE = [("cpu",), ("cpuacct",), ("cpuset",), ("memory",), ("pids",), ("freezer",)]
COMOUNTED = [("cpu", "cpuacct"), ("memory",), ("pids",), ("freezer",), ("blkio",)]


def read(path: Path) -> str:
    return path.read_text().strip()


# --- conversions and validation ----------------------------------------------------------


@pytest.mark.parametrize(
    ("weight", "shares", "v2_weight"),
    [(256, 1024, 100), (512, 2048, 200), (128, 512, 50), (1, 4, 1), (65535, 262140, 10000)],
)
def test_cpu_weight_maps_to_shares_and_v2_weight(weight: int, shares: int, v2_weight: int):
    assert v1_cpu_shares(weight) == shares
    assert v2_cpu_weight(weight) == v2_weight


def test_cap_maps_to_quota_per_100ms_period():
    assert cfs_quota_us(0) is None
    assert cfs_quota_us(50) == 50_000
    assert cfs_quota_us(200) == 200_000


@pytest.mark.parametrize(
    ("cap", "vcpus", "quota"),
    [(0, 1, 100_000), (0, 3, 300_000), (50, 2, 50_000), (250, 2, 200_000), (0, None, None)],
)
def test_vcpus_are_a_ceiling_with_the_cap_below_it(cap: int, vcpus: int | None, quota: int | None):
    assert cfs_quota_us(cap, vcpus) == quota


def test_a_one_vcpu_domain_gets_one_cpus_time_per_period_on_v1_and_v2(tmp_path: Path):
    (tmp_path / "v1").mkdir()
    (tmp_path / "v2").mkdir()
    v1_root, v1 = make_v1(tmp_path / "v1", SEPARATE)
    v1.create("dom3", Limits(memory_mib=64, vcpus=1))
    assert read(v1_root / "cpu/hyper/dom3/cpu.cfs_quota_us") == "100000"
    v2_root, v2 = make_v2(tmp_path / "v2")
    v2.create("dom3", Limits(memory_mib=64, vcpus=1))
    assert read(v2_root / "hyper/dom3/cpu.max") == "100000 100000"


@pytest.mark.parametrize(
    ("vcpus", "placed", "cpus"),
    [
        (1, [], (0,)),
        (1, [(0,)], (1,)),  # the next domain goes where there is room
        (1, [(0,), (1,)], (2,)),
        (1, [(0,), (1,), (2,), (3,)], (0,)),
        (2, [(0, 1)], (2, 3)),
        (3, [(1,)], (0, 2, 3)),
        (4, [], None),  # no CPU to spare: every CPU, the quota alone limits it
        (8, [], None),
    ],
)
def test_a_domain_is_placed_on_as_many_cpus_as_its_vcpus_where_the_host_has_some_to_spare(
    vcpus: int, placed: list[tuple[int, ...]], cpus: tuple[int, ...] | None
):
    assert place_vcpus(vcpus, (0, 1, 2, 3), placed) == cpus


def test_cpu_lists_are_read_as_the_kernel_writes_them():
    assert parse_cpu_list("0-3,8,10-11\n") == (0, 1, 2, 3, 8, 10, 11)
    assert parse_cpu_list("\n") == ()
    with pytest.raises(CgroupError, match="not a CPU list"):
        parse_cpu_list("0-x")


def test_v1_cpuset_places_a_domain_and_gives_dom0_every_cpu(tmp_path: Path):
    root, hierarchy = make_v1(tmp_path, SEPARATE)
    assert hierarchy.host_cpus() == (0, 1, 2, 3)
    parent = root / "cpuset/hyper"
    assert (read(parent / "cpuset.cpus"), read(parent / "cpuset.mems")) == ("0-3", "0")
    one_vcpu = Limits(memory_mib=64, vcpus=1)
    dom2 = hierarchy.create("dom2", one_vcpu)
    dom3 = hierarchy.create("dom3", one_vcpu)  # the next CPU: the first is dom2's
    dom4 = hierarchy.create("dom4", Limits(memory_mib=64, vcpus=2))
    dom0 = hierarchy.create("dom0", LIMITS)  # no vcpus: every CPU
    assert (read(parent / "dom3/cpuset.cpus"), read(parent / "dom3/cpuset.mems")) == ("1", "0")
    assert read(parent / "dom0/cpuset.cpus") == "0-3"
    assert parent / "dom3/cgroup.procs" in dom3.procs_file_paths()
    assert (dom2.placement(), dom4.placement()) == ((0,), (2, 3))
    assert (dom3.placement(), dom0.placement()) == ((1,), None)
    dom3.set_limits(LIMITS)  # sched-credit, mem-set: the placement stays
    assert hierarchy.open("dom3").placement() == (1,)
    assert hierarchy.create("dom5", Limits(memory_mib=64, vcpus=4)).placement() is None


def test_v1_without_cpuset_places_nothing(tmp_path: Path):
    root, hierarchy = make_v1(tmp_path, COMOUNTED)
    assert hierarchy.host_cpus() is None
    group = hierarchy.create("dom3", Limits(memory_mib=64, vcpus=1))
    assert group.placement() is None
    assert not list(root.glob("*/hyper/dom3/cpuset.*"))


def test_v2_cpuset_where_delegated_places_a_domain(tmp_path: Path):
    root, hierarchy = make_v2(tmp_path, delegated="cpuset cpu io memory pids")
    assert hierarchy.host_cpus() == (0, 1, 2, 3)
    assert "cpuset" in read(root / "hyper/cgroup.subtree_control").split()
    hierarchy.create("dom2", Limits(memory_mib=64, vcpus=2))
    group = hierarchy.create("dom3", Limits(memory_mib=64, vcpus=2))  # beside dom2's
    assert read(root / "hyper/dom3/cpuset.cpus") == "2,3"
    assert group.placement() == (2, 3)
    assert hierarchy.create("dom0", LIMITS).placement() is None  # empty: the parent's


def test_v2_without_delegated_cpuset_places_nothing(tmp_path: Path):
    root, hierarchy = make_v2(tmp_path)
    assert hierarchy.host_cpus() is None
    assert hierarchy.create("dom3", Limits(memory_mib=64, vcpus=1)).placement() is None
    assert not (root / "hyper/dom3/cpuset.cpus").exists()


@pytest.mark.parametrize(
    "bad",
    [
        {"memory_mib": 0},
        {"memory_mib": 64, "cpu_weight": 0},
        {"memory_mib": 64, "cpu_weight": 65536},
        {"memory_mib": 64, "cap": -1},
        {"memory_mib": 64, "pids_max": 0},
    ],
)
def test_limits_refuse_out_of_range_values(bad: dict[str, int]):
    with pytest.raises(ValueError):
        Limits(**bad)


@pytest.mark.parametrize("name", ["", ".", "..", "../etc", "a/b", "memory.max", "x" * 65, "-a"])
def test_group_and_parent_names_are_validated(tmp_path: Path, name: str):
    root, hierarchy = make_v2(tmp_path)
    with pytest.raises(CgroupError, match="invalid cgroup name"):
        hierarchy.create(name, LIMITS)
    with pytest.raises(CgroupError, match="invalid cgroup name"):
        open_hierarchy(root, parent=name, fs=FakeV2Fs(root))
    assert not (root / "hyper").exists()


# --- detection ------------------------------------------------------------------------------


def test_v2_is_detected_from_the_root_controllers(tmp_path: Path):
    _, hierarchy = make_v2(tmp_path)
    assert hierarchy.version == 2


def test_v1_is_detected_beside_an_empty_cgroup2(tmp_path: Path):
    _, hierarchy = make_v1(tmp_path, SEPARATE)
    assert hierarchy.version == 1


def test_an_empty_cgroup2_root_without_v1_is_not_usable(tmp_path: Path):
    root = tmp_path / "unified"
    root.mkdir()
    (root / "cgroup.controllers").write_text("\n")
    with pytest.raises(CgroupError, match="lacks controllers cpu, memory, pids"):
        open_hierarchy(root, mountinfo=tmp_path / "absent")


def test_v1_without_a_freezer_mount_is_refused(tmp_path: Path):
    with pytest.raises(CgroupError, match="no v1 mount for freezer"):
        make_v1(tmp_path, [("cpu", "cpuacct"), ("memory",), ("pids",)])


def test_v1_mounts_reads_separate_comounted_and_escaped_mount_points(tmp_path: Path):
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "32 31 0:29 / /cg/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct\n"
        "35 31 0:32 / /cg/my\\040memory rw,relatime - cgroup cgroup rw,memory\n"
        "36 31 0:33 / /cg/pids rw,relatime - cgroup cgroup rw,pids\n"
        "40 31 0:37 / /cg/systemd rw,relatime - cgroup cgroup rw,name=systemd\n"
        "41 31 0:38 / /cg/unified rw,relatime - cgroup2 cgroup2 rw\n"
        "42 31 0:39 / /cg/pids2 rw,relatime - cgroup cgroup rw,pids\n"
    )
    assert v1_mounts(mountinfo) == {
        "cpu": Path("/cg/cpu,cpuacct"),
        "cpuacct": Path("/cg/cpu,cpuacct"),
        "memory": Path("/cg/my memory"),
        "pids": Path("/cg/pids"),
    }


# --- v2 -------------------------------------------------------------------------------------


def test_v2_create_writes_each_limit(tmp_path: Path):
    root, hierarchy = make_v2(tmp_path)
    group = hierarchy.create("dom3", LIMITS)
    directory = root / "hyper" / "dom3"
    assert group.dirs == [directory]
    assert read(directory / "memory.max") == str(64 * MIB)
    assert read(directory / "memory.swap.max") == "0"
    assert read(directory / "cpu.weight") == "200"
    assert read(directory / "cpu.max") == "50000 100000"
    assert read(directory / "pids.max") == "100"


def test_v2_set_limits_without_cap_writes_max_quota(tmp_path: Path):
    root, hierarchy = make_v2(tmp_path)
    group = hierarchy.create("dom3", LIMITS)
    group.set_limits(Limits(memory_mib=32))
    directory = root / "hyper" / "dom3"
    assert read(directory / "memory.max") == str(32 * MIB)
    assert read(directory / "cpu.weight") == "100"
    assert read(directory / "cpu.max") == "max 100000"
    assert read(directory / "pids.max") == "512"


def test_v2_without_swap_accounting_skips_swap_max(tmp_path: Path):
    root, hierarchy = make_v2(tmp_path, omit=frozenset({"memory.swap.max"}))
    hierarchy.create("dom3", LIMITS)
    assert read(root / "hyper" / "dom3" / "memory.max") == str(64 * MIB)
    assert not (root / "hyper" / "dom3" / "memory.swap.max").exists()


def test_v2_enables_controllers_in_hypers_own_subtree_control_only(tmp_path: Path):
    root, hierarchy = make_v2(tmp_path)
    hierarchy.create("dom3", LIMITS)
    assert read(root / "cgroup.subtree_control") == "cpu io memory pids"
    assert read(root / "hyper" / "cgroup.subtree_control") == "cpu memory pids"
    assert read(root / "hyper" / "cgroup.procs") == ""


def test_v2_undelegated_controller_is_an_error_and_leaves_nothing(tmp_path: Path):
    root, hierarchy = make_v2(tmp_path, delegated="memory pids")
    with pytest.raises(CgroupError, match="does not delegate cpu"):
        hierarchy.create("dom3", LIMITS)
    assert read(root / "cgroup.subtree_control") == "memory pids"
    assert not (root / "hyper").exists()


def test_v2_failed_create_removes_the_group(tmp_path: Path):
    root, hierarchy = make_v2(tmp_path, omit=frozenset({"pids.max"}))
    with pytest.raises(CgroupError, match=r"dom3/pids\.max"):
        hierarchy.create("dom3", LIMITS)
    assert not (root / "hyper" / "dom3").exists()
    assert hierarchy.list() == []


def test_v2_create_refuses_an_existing_group(tmp_path: Path):
    root, hierarchy = make_v2(tmp_path)
    hierarchy.create("dom3", LIMITS)
    with pytest.raises(CgroupError, match="already exists"):
        hierarchy.create("dom3", Limits(memory_mib=32))
    assert read(root / "hyper" / "dom3" / "memory.max") == str(64 * MIB)


def test_v2_open_finds_existing_groups_only(tmp_path: Path):
    root, hierarchy = make_v2(tmp_path)
    hierarchy.create("dom3", LIMITS)
    assert hierarchy.open("dom3").dirs == [root / "hyper" / "dom3"]
    with pytest.raises(CgroupError, match="dom4 does not exist"):
        hierarchy.open("dom4")


def test_v2_procs_file_is_the_groups_one_cgroup_procs(tmp_path: Path):
    root, hierarchy = make_v2(tmp_path)
    group = hierarchy.create("dom3", LIMITS)
    assert group.procs_file_paths() == [root / "hyper" / "dom3" / "cgroup.procs"]
    group.attach(4242)
    assert read(root / "hyper" / "dom3" / "cgroup.procs") == "4242"


def test_v2_freeze_writes_cgroup_freeze_and_waits_for_frozen_event(tmp_path: Path):
    root, hierarchy = make_v2(tmp_path)
    group = hierarchy.create("dom3", LIMITS)
    directory = root / "hyper" / "dom3"
    (directory / "cgroup.events").write_text("populated 1\nfrozen 1\n")
    group.freeze(timeout=1.0)
    assert read(directory / "cgroup.freeze") == "1"
    assert group.frozen
    group.thaw()
    assert read(directory / "cgroup.freeze") == "0"


def test_v2_freeze_that_never_completes_times_out_and_thaws(tmp_path: Path):
    root, hierarchy = make_v2(tmp_path)
    group = hierarchy.create("dom3", LIMITS)
    with pytest.raises(CgroupError, match="dom3 to freeze"):
        group.freeze(timeout=0.05)
    assert read(root / "hyper" / "dom3" / "cgroup.freeze") == "0"
    assert not group.frozen


def test_v2_statistics_are_parsed_from_keyed_files(tmp_path: Path):
    root, hierarchy = make_v2(tmp_path)
    group = hierarchy.create("dom3", LIMITS)
    directory = root / "hyper" / "dom3"
    (directory / "cpu.stat").write_text("usage_usec 1234567\nuser_usec 1000000\n")
    (directory / "memory.current").write_text("3145728\n")
    (directory / "memory.events").write_text("low 0\nhigh 0\nmax 9\noom 3\noom_kill 2\n")
    assert group.cpu_time_ns() == 1_234_567_000
    assert group.memory_bytes() == 3 * MIB
    assert group.oom_kills() == 2


def test_v2_kill_all_writes_cgroup_kill(tmp_path: Path):
    root, hierarchy = make_v2(tmp_path)
    group = hierarchy.create("dom3", LIMITS)
    group.kill_all(timeout=1.0)
    assert read(root / "hyper" / "dom3" / "cgroup.kill") == "1"


def test_v2_remove_all_removes_every_group_and_the_parent(tmp_path: Path):
    root, hierarchy = make_v2(tmp_path)
    hierarchy.create("dom3", LIMITS)
    hierarchy.create("dom4", LIMITS)
    assert hierarchy.list() == ["dom3", "dom4"]
    hierarchy.remove_all(timeout=1.0)
    assert not (root / "hyper").exists()
    assert read(root / "cgroup.subtree_control") == "cpu io memory pids"
    hierarchy.remove_all(timeout=1.0)  # nothing left: still fine


def test_remove_of_a_missing_group_is_fine(tmp_path: Path):
    root, hierarchy = make_v2(tmp_path)
    group = hierarchy.create("dom3", LIMITS)
    group.remove(timeout=1.0)
    group.remove(timeout=1.0)
    assert not (root / "hyper" / "dom3").exists()


# --- v2 under systemd -----------------------------------------------------------------------


def test_under_systemd_hyperd_gets_a_delegated_scope_and_lives_in_its_leaf(tmp_path: Path):
    root, fs = make_systemd(tmp_path)
    hierarchy = open_hierarchy(root, fs=fs)
    hierarchy.prepare()
    assert fs.started == [("hyper.scope", "system.slice", os.getpid())]
    assert fs.own_group() == f"/{SCOPE}/supervisor"
    assert read(root / SCOPE / "cgroup.procs") == ""  # no process in an inner node
    assert read(root / SCOPE / "cgroup.subtree_control") == "cpuset cpu memory pids"
    assert read(root / RUNNER / "cgroup.procs") == "4100"  # the runner's own is left alone

    group = hierarchy.create("dom3", LIMITS)
    assert group.dirs == [root / SCOPE / "hyper/dom3"]
    assert read(root / SCOPE / "hyper/dom3/memory.max") == str(64 * MIB)
    assert read(root / SCOPE / "hyper/dom3/cpu.max") == "50000 100000"
    assert read(root / SCOPE / "hyper/cgroup.procs") == ""
    group.attach(4300)
    assert read(root / SCOPE / "hyper/dom3/cgroup.procs") == "4300"


def test_under_systemd_every_process_in_the_scope_moves_to_its_leaf(tmp_path: Path):
    # A scope started by someone else (systemd-run --scope -p Delegate=yes), with a process
    # at its root: the controllers cannot be enabled for its children until it moves.
    root, fs = make_systemd(tmp_path)
    FakeSystemd.start_scope(fs, "hyper.scope", "system.slice", 4100)
    fs.move(os.getpid(), root / SCOPE / "cgroup.procs")
    open_hierarchy(root, fs=fs).prepare()
    assert read(root / SCOPE / "cgroup.procs") == ""
    assert sorted(read(root / SCOPE / "supervisor/cgroup.procs").split()) == sorted(
        ["4100", str(os.getpid())]
    )
    assert "cpu" in read(root / SCOPE / "cgroup.subtree_control").split()


def test_under_systemd_a_restarted_hyperd_joins_the_running_scope(tmp_path: Path):
    root, fs = make_systemd(tmp_path)
    first = open_hierarchy(root, fs=fs)
    first.prepare()
    first.create("dom3", LIMITS).attach(4300)
    fs.move(os.getpid(), root / RUNNER / "cgroup.procs")  # as a new hyperd starts outside

    second = open_hierarchy(root, fs=fs)
    second.prepare()
    assert len(fs.started) == 1  # joined through systemd, not started again
    assert fs.joined == [("hyper.scope", "/supervisor", os.getpid())]
    assert fs.own_group() == f"/{SCOPE}/supervisor"
    assert second.list() == ["dom3"]
    assert second.open("dom3").pids() == [4300]


def test_under_systemd_a_scope_it_still_holds_is_started_again(tmp_path: Path):
    root, fs = make_systemd(tmp_path, lingering=2)  # the last one stopping, then collected
    open_hierarchy(root, fs=fs).prepare()
    assert fs.started == [("hyper.scope", "system.slice", os.getpid())]
    assert fs.own_group() == f"/{SCOPE}/supervisor"


def test_under_systemd_only_prepare_takes_the_scope(tmp_path: Path):
    root, fs = make_systemd(tmp_path)
    with pytest.raises(CgroupError, match=r"hyper\.scope does not exist: hyperd starts it"):
        open_hierarchy(root, fs=fs).create("dom3", LIMITS)
    assert fs.started == [] and fs.own_group() == f"/{RUNNER}"
    assert not (root / SCOPE).exists()


def test_under_systemd_other_processes_find_the_groups_without_joining(tmp_path: Path):
    root, fs = make_systemd(tmp_path)
    hyperd = open_hierarchy(root, fs=fs)
    hyperd.prepare()
    hyperd.create("dom3", LIMITS)
    fs.move(os.getpid(), root / RUNNER / "cgroup.procs")  # hyperctl, or a test
    assert open_hierarchy(root, fs=fs).open("dom3").dirs == [root / SCOPE / "hyper/dom3"]
    assert fs.own_group() == f"/{RUNNER}"


def test_under_systemd_a_refused_scope_is_one_error_and_creates_nothing(tmp_path: Path):
    root, fs = make_systemd(tmp_path, refuse="Access denied")
    with pytest.raises(CgroupError, match=r"systemd did not start hyper\.scope: Access denied"):
        open_hierarchy(root, fs=fs).prepare()
    assert not (root / SCOPE).exists()
    assert fs.own_group() == f"/{RUNNER}"


def test_under_systemd_remove_all_leaves_the_scope_to_systemd(tmp_path: Path):
    root, fs = make_systemd(tmp_path)
    hierarchy = open_hierarchy(root, fs=fs)
    hierarchy.prepare()
    hierarchy.create("dom3", LIMITS)
    hierarchy.remove_all(timeout=1.0)
    assert not (root / SCOPE / "hyper").exists()
    assert (root / SCOPE).is_dir()  # systemd removes it once hyperd exits
    assert fs.own_group() == f"/{SCOPE}/supervisor"


def test_units_are_named_on_the_bus_as_systemd_escapes_them():
    assert unit_object("hyper.scope") == "/org/freedesktop/systemd1/unit/hyper_2escope"
    assert unit_object("a-b@1.service") == "/org/freedesktop/systemd1/unit/a_2db_401_2eservice"
    assert unit_object("0x") == "/org/freedesktop/systemd1/unit/_30x"


def test_the_fake_tree_keeps_the_no_internal_process_rule(tmp_path: Path):
    root, fs = make_systemd(tmp_path)
    with pytest.raises(OSError, match="busy"):
        fs.enable(root / RUNNER, ["memory"])  # it holds processes
    fs.enable(root / "system.slice", ["memory"])
    with pytest.raises(OSError, match="busy"):
        fs.move(4242, root / "system.slice" / "cgroup.procs")
    with pytest.raises(OSError, match="No such file"):
        fs.enable(root / "system.slice", ["cpu"])  # the root does not pass cpu down


# --- v1 -------------------------------------------------------------------------------------


def test_v1_create_writes_each_limit_with_cpu_and_cpuacct_apart(tmp_path: Path):
    root, hierarchy = make_v1(tmp_path, SEPARATE)
    group = hierarchy.create("dom3", LIMITS)
    assert read(root / "memory/hyper/dom3/memory.limit_in_bytes") == str(64 * MIB)
    assert read(root / "memory/hyper/dom3/memory.memsw.limit_in_bytes") == str(64 * MIB)
    assert read(root / "cpu/hyper/dom3/cpu.shares") == "2048"
    assert read(root / "cpu/hyper/dom3/cpu.cfs_period_us") == "100000"
    assert read(root / "cpu/hyper/dom3/cpu.cfs_quota_us") == "50000"
    assert read(root / "pids/hyper/dom3/pids.max") == "100"
    assert sorted(group.procs_file_paths()) == sorted(
        root / c / "hyper/dom3/cgroup.procs"
        for c in ("memory", "cpu", "cpuacct", "pids", "freezer", "cpuset")
    )


def test_v1_co_mounted_cpu_cpuacct_is_one_directory(tmp_path: Path):
    root, hierarchy = make_v1(tmp_path, COMOUNTED)
    group = hierarchy.create("dom3", LIMITS)
    both = root / "cpu,cpuacct" / "hyper" / "dom3"
    assert group.path("cpu") == group.path("cpuacct") == both
    assert len(group.procs_file_paths()) == 4
    assert read(both / "cpu.shares") == "2048"
    (both / "cpuacct.usage").write_text("987654321\n")
    assert group.cpu_time_ns() == 987_654_321


def test_v1_set_limits_without_cap_writes_minus_one_quota(tmp_path: Path):
    root, hierarchy = make_v1(tmp_path, SEPARATE)
    group = hierarchy.create("dom3", LIMITS)
    group.set_limits(Limits(memory_mib=128))
    assert read(root / "cpu/hyper/dom3/cpu.cfs_quota_us") == "-1"
    assert read(root / "cpu/hyper/dom3/cpu.shares") == "1024"
    assert read(root / "memory/hyper/dom3/memory.limit_in_bytes") == str(128 * MIB)
    assert read(root / "memory/hyper/dom3/memory.memsw.limit_in_bytes") == str(128 * MIB)


def test_v1_without_swap_accounting_writes_the_plain_limit(tmp_path: Path):
    root, hierarchy = make_v1(tmp_path, SEPARATE, omit=frozenset({"memory.memsw.limit_in_bytes"}))
    hierarchy.create("dom3", LIMITS)
    assert read(root / "memory/hyper/dom3/memory.limit_in_bytes") == str(64 * MIB)


def test_v1_attach_writes_the_pid_into_every_controller(tmp_path: Path):
    _, hierarchy = make_v1(tmp_path, COMOUNTED)
    group = hierarchy.create("dom3", LIMITS)
    group.attach(4242)
    assert [read(p) for p in group.procs_file_paths()] == ["4242"] * 4
    assert group.pids() == [4242]


def test_v1_freeze_writes_frozen_and_waits_for_it_to_read_back(tmp_path: Path):
    root, hierarchy = make_v1(tmp_path, SEPARATE)
    group = hierarchy.create("dom3", LIMITS)
    group.freeze(timeout=1.0)
    assert read(root / "freezer/hyper/dom3/freezer.state") == "FROZEN"
    assert group.frozen
    group.thaw()
    assert read(root / "freezer/hyper/dom3/freezer.state") == "THAWED"
    assert not group.frozen


def test_v1_statistics_are_parsed(tmp_path: Path):
    root, hierarchy = make_v1(tmp_path, SEPARATE)
    group = hierarchy.create("dom3", LIMITS)
    (root / "memory/hyper/dom3/memory.usage_in_bytes").write_text("1048576\n")
    (root / "memory/hyper/dom3/memory.oom_control").write_text(
        "oom_kill_disable 0\nunder_oom 0\noom_kill 5\n"
    )
    assert group.memory_bytes() == MIB
    assert group.oom_kills() == 5


def test_v1_kernel_without_oom_kill_count_is_reported(tmp_path: Path):
    root, hierarchy = make_v1(tmp_path, SEPARATE)
    group = hierarchy.create("dom3", LIMITS)
    (root / "memory/hyper/dom3/memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\n")
    with pytest.raises(CgroupError, match="no 'oom_kill' entry"):
        group.oom_kills()


def test_v1_failed_create_removes_the_group_in_every_controller(tmp_path: Path):
    _, hierarchy = make_v1(tmp_path, SEPARATE, omit=frozenset({"pids.max"}))
    with pytest.raises(CgroupError, match=r"pids/hyper/dom3/pids\.max"):
        hierarchy.create("dom3", LIMITS)
    assert hierarchy.list() == []
    assert all(p.is_dir() for p in hierarchy.parent_dirs())


def test_v1_open_refuses_a_partial_group_and_remove_all_cleans_it(tmp_path: Path):
    root, hierarchy = make_v1(tmp_path, SEPARATE)
    hierarchy.create("dom3", LIMITS)
    hierarchy.create("dom4", LIMITS)
    rmdir_like_cgroupfs(root / "freezer/hyper/dom4")
    with pytest.raises(CgroupError, match="dom4 does not exist"):
        hierarchy.open("dom4")
    assert hierarchy.list() == ["dom3", "dom4"]
    hierarchy.remove_all(timeout=1.0)
    assert not any(p.exists() for p in hierarchy.parent_dirs())
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [",".join(cs) for cs in SEPARATE] + ["unified"]
    )

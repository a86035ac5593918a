"""Per-domain cgroups on cgroup v1 or v2: one API over whichever hierarchy the host has.

hyperd gives every domain a group of its own, ``<parent>/<name>`` (``hyper/dom3``), under a
parent group that hyper creates and owns (default ``hyper``). hyper never moves, writes or
removes a cgroup it did not create: on v2 it enables controllers in its own parent's
``cgroup.subtree_control`` only, and fails if the root does not already delegate them.

Detection (``open_hierarchy``):

- **v2** when ``<root>/cgroup.controllers`` exists (``root`` defaults to ``/sys/fs/cgroup``)
  and lists ``cpu``, ``memory`` and ``pids``. Domain groups are children of the parent; the
  parent itself never holds a process (v2's no-internal-process rule). Freezing is the core
  ``cgroup.freeze`` interface and needs no controller.
- **v2 owned by systemd** when the root also has ``init.scope`` (systemd puts PID 1 there):
  systemd's rule is that a program changes only a subtree delegated to it, so hyper asks for
  one. ``prepare()``, which hyperd alone calls, starts the transient unit ``hyper.scope`` in
  ``system.slice`` with ``Delegate=yes`` (systemd's D-Bus ``StartTransientUnit``, through
  ``busctl``), holding hyperd; or, when systemd says the scope is active (domains outlive a
  restarted hyperd), has systemd move hyperd into it (``AttachProcessesToUnit``). Then,
  because a group whose ``subtree_control`` enables controllers may hold no process, every
  process in the scope moves to its leaf ``hyper.scope/supervisor``, and the scope enables the
  controllers for its children. hyper's parent is ``system.slice/hyper.scope/hyper``; other
  processes (hyperctl, tests) find the groups there without joining. systemd removes the
  scope when its last process exits.
- **v1** otherwise, when ``memory``, ``cpu``, ``cpuacct``, ``pids`` and ``freezer`` are all
  mounted. Each controller's mount point comes from ``/proc/self/mountinfo``, so separate
  mounts (``/sys/fs/cgroup/cpu`` and ``/sys/fs/cgroup/cpuacct``) and co-mounted ones
  (``/sys/fs/cgroup/cpu,cpuacct``) both work; a group has one directory per distinct mount.
  An empty cgroup2 mount beside the v1 controllers (``/sys/fs/cgroup/unified``) is ignored.

Mapping of a domain's ``Limits`` (xl.cfg names) to the kernel's files:

=================  ==========================================  ===============================
Limits field       cgroup v1                                   cgroup v2
=================  ==========================================  ===============================
memory_mib (MiB)   memory.limit_in_bytes, and                  memory.max, and
                   memory.memsw.limit_in_bytes if present      memory.swap.max = 0 if present
                   (so swap does not escape the limit)
cpu_weight         cpu.shares = weight * 1024 / 256,           cpu.weight = weight * 100 / 256
(1..65535, 256)    clamped to 2..262144                        rounded half up, clamped 1..10000
cap (% of one      cpu.cfs_period_us = 100000,                 cpu.max = "<cap*1000> 100000",
CPU, 0 = none)     cpu.cfs_quota_us = cap * 1000 (-1 = none)   or "max 100000"
and vcpus          (cap, or at most vcpus * 100)               (the same)
pids_max           pids.max                                    pids.max
cpus (placement,   cpuset.cpus (and cpuset.mems, the           cpuset.cpus (empty: the
at create only)    parent's), when cpuset is mounted           parent's), when the parent's
                                                               cgroup.controllers lists cpuset
=================  ==========================================  ===============================

``cpuset`` is optional on both: a host without it gets the CPU quota alone. A domain's CPUs are
chosen once, when its group is created (``place_vcpus``), and kept across limit changes.

Controls and statistics:

=================  ==========================================  ===============================
operation          cgroup v1                                   cgroup v2
=================  ==========================================  ===============================
freeze / thaw      freezer.state FROZEN / THAWED; freeze waits cgroup.freeze 1 / 0; freeze
                   until it reads back FROZEN (FREEZING is     waits for "frozen 1" in
                   transitional)                               cgroup.events
kill_all           SIGKILL each member until empty             cgroup.kill (Linux >= 5.14),
                                                               then the same loop
cpu_time_ns        cpuacct.usage (ns)                          cpu.stat usage_usec * 1000
memory_bytes       memory.usage_in_bytes                       memory.current
oom_kills          memory.oom_control "oom_kill N"             memory.events "oom_kill N"
                   (Linux >= 4.13)
=================  ==========================================  ===============================

A process joins a domain by writing its pid into every file ``procs_file_paths()`` names;
the domain's boot process does that itself before it unshares its namespaces. Every
failure is a ``CgroupError`` naming the file or group.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from channels.errors import HyperError

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
MOUNTINFO = Path("/proc/self/mountinfo")
PARENT = "hyper"
CFS_PERIOD_US = 100_000
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "freezer")
V2_CONTROLLERS = ("cpu", "memory", "pids")
#: Used where the host has it, for placement only (the quota is the vcpus ceiling).
CPUSET = "cpuset"
#: hyper's delegated subtree on a host whose cgroups systemd owns, and the leaf in it where
#: the processes that are not domains (hyperd and its helpers) live.
SYSTEMD_SLICE = "system.slice"
SYSTEMD_SCOPE = "hyper.scope"
SUPERVISOR = "supervisor"
SYSTEMD_TIMEOUT = 10.0
SYSTEMD_RETRY = 0.25  # seconds between starts of a scope systemd still holds the last one of

# Letters, digits, '-' and '_': no '/', no '..', and no '.' at all, so a group can never be
# mistaken for (or collide with) an interface file such as "memory.max" or "cgroup.procs".
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_MIB = 1 << 20


class CgroupError(HyperError):
    """A cgroup could not be found, created, configured, frozen, emptied or removed."""


@dataclass(frozen=True)
class Limits:
    """A domain's resource limits, in xl.cfg's units."""

    memory_mib: int
    cpu_weight: int = 256
    cap: int = 0
    pids_max: int = 512
    #: A ceiling of this many CPUs' time (None: none, as for dom0).
    vcpus: int | None = None

    def __post_init__(self) -> None:
        if self.memory_mib < 1:
            raise ValueError(f"memory_mib must be >= 1, not {self.memory_mib}")
        if not 1 <= self.cpu_weight <= 65535:
            raise ValueError(f"cpu_weight must be in 1..65535, not {self.cpu_weight}")
        if self.cap < 0:
            raise ValueError(f"cap must be >= 0 (0 = no cap), not {self.cap}")
        if self.pids_max < 1:
            raise ValueError(f"pids_max must be >= 1, not {self.pids_max}")
        if self.vcpus is not None and self.vcpus < 1:
            raise ValueError(f"vcpus must be >= 1, not {self.vcpus}")


def place_vcpus(
    vcpus: int, host_cpus: Sequence[int], placed: Iterable[Sequence[int]]
) -> tuple[int, ...] | None:
    """The CPUs a domain of ``vcpus`` vCPUs runs on, where the host has CPUs to spare: the
    ``vcpus`` least used by the domains ``placed`` already (lowest numbers first), so that
    domains spread over the host. None (every CPU hyper may use) when it has none to spare."""
    if vcpus >= len(host_cpus):
        return None
    load = dict.fromkeys(host_cpus, 0)
    for cpus in placed:
        for cpu in cpus:
            if cpu in load:
                load[cpu] += 1
    return tuple(sorted(sorted(load, key=lambda cpu: (load[cpu], cpu))[:vcpus]))


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """The kernel's CPU list format (``0-3,8,10-11``), as a sorted tuple; empty for ``""``."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        try:
            cpus.update(range(int(first), int(last or first) + 1))
        except ValueError as exc:
            raise CgroupError(f"not a CPU list: {text.strip()!r}") from exc
    return tuple(sorted(cpus))


def format_cpu_list(cpus: Iterable[int]) -> str:
    return ",".join(str(cpu) for cpu in sorted(cpus))


def v1_cpu_shares(cpu_weight: int) -> int:
    """xl's credit weight (256 = default) as v1 cpu.shares (1024 = default)."""
    return min(max(cpu_weight * 1024 // 256, 2), 262144)


def v2_cpu_weight(cpu_weight: int) -> int:
    """xl's credit weight (256 = default) as v2 cpu.weight (100 = default)."""
    return min(max((cpu_weight * 100 + 128) // 256, 1), 10000)


def cfs_quota_us(cap: int, vcpus: int | None = None) -> int | None:
    """CPU time per CFS_PERIOD_US period: ``cap`` (% of one CPU) when set, bounded by the
    ``vcpus`` ceiling (each vCPU at most one CPU's time, as a Xen guest's: a 1-vCPU domain
    never gets more than one CPU, however many threads it runs); None for neither."""
    ceiling = 100 * vcpus if vcpus else 0
    percent = min(cap, ceiling) if cap and ceiling else cap or ceiling
    return percent * CFS_PERIOD_US // 100 if percent else None


# ---------------------------------------------------------------------------------------
# File access: every read and write goes through these, so every failure names its file.


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise CgroupError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _write_file(path: Path, value: str) -> None:
    # No O_CREAT: an interface file the kernel does not provide is an error, not a new file.
    # One write() call, because the kernel parses each write to a cgroup file on its own.
    # O_TRUNC is what a shell's '>' does; the kernel ignores it.
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _write(path: Path, value: str) -> None:
    try:
        _write_file(path, value)
    except OSError as exc:
        raise CgroupError(f"cannot write {value!r} to {path}: {exc.strerror or exc}") from exc


def _read_int(path: Path) -> int:
    text = _read(path).strip()
    try:
        return int(text)
    except ValueError as exc:
        raise CgroupError(f"{path}: expected an integer, read {text!r}") from exc


def _read_keyed(path: Path, key: str) -> int:
    """One value of a flat keyed file ("key value" per line: cpu.stat, memory.events, ...)."""
    for line in _read(path).splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            try:
                return int(value)
            except ValueError as exc:
                raise CgroupError(f"{path}: {key} is not an integer: {value!r}") from exc
    raise CgroupError(f"{path}: no {key!r} entry (kernel too old?)")


def _wait_for(done: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.001
    while not done():
        if time.monotonic() >= deadline:
            raise CgroupError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


class CgroupFs:
    """The operations where cgroupfs (and systemd, its owner on most v2 hosts) differs from an
    ordinary filesystem.

    The kernel fills a new group with its interface files, rmdir removes a group with them, a
    pid written into one group's ``cgroup.procs`` leaves every other, and v2 refuses a process
    in a group that enables controllers for its children (and the reverse) with EBUSY. A test
    substitutes a fake that does the same in a temporary directory.
    """

    def mkdir(self, path: Path) -> None:
        os.mkdir(path)

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)

    def move(self, pid: int, procs: Path) -> None:
        """Move process pid (all its threads) into the group whose cgroup.procs is procs."""
        _write_file(procs, str(pid))

    def enable(self, group: Path, controllers: Sequence[str]) -> None:
        """Enable controllers for group's children (v2's cgroup.subtree_control)."""
        _write_file(group / "cgroup.subtree_control", " ".join(f"+{c}" for c in controllers))

    def own_group(self) -> str:
        """This process's v2 group, from the hierarchy's root: "/system.slice/x.service"."""
        for line in _read(Path("/proc/self/cgroup")).splitlines():
            if line.startswith("0::"):
                return line[3:]
        raise CgroupError("/proc/self/cgroup has no cgroup v2 line")

    # systemd's Manager, through ``busctl`` (which every systemd host has) rather than a
    # D-Bus library only these three calls would need.

    def unit_state(self, unit: str) -> str:
        """systemd's ActiveState of ``unit``: "active", "inactive", "deactivating", ..."""
        reply = _busctl(
            "get-property", "org.freedesktop.systemd1", unit_object(unit),
            "org.freedesktop.systemd1.Unit", "ActiveState",
        )  # fmt: skip
        return reply.split('"')[1] if reply.count('"') == 2 else reply

    def start_scope(self, unit: str, slice_: str, pid: int) -> None:
        """Have systemd start the transient scope ``unit`` in ``slice_``, holding pid, with its
        subtree delegated (StartTransientUnit)."""
        # StartTransientUnit(name, mode, properties a(sv), aux a(sa(sv))): busctl writes an
        # array as its length then its items, and a variant as its signature then its value.
        properties = [
            ("PIDs", "au", "1", str(pid)),
            ("Delegate", "b", "true"),
            ("Slice", "s", slice_),
            ("CollectMode", "s", "inactive-or-failed"),
            ("Description", "s", "hyper: the hypervisor and its domains"),
        ]
        _busctl(
            "call", *_MANAGER, "StartTransientUnit", "ssa(sv)a(sa(sv))", unit, "fail",
            str(len(properties)), *(item for p in properties for item in p), "0",
        )  # fmt: skip

    def join_unit(self, unit: str, subgroup: str, pid: int) -> None:
        """Have systemd move pid into ``subgroup`` of the running ``unit``'s delegated subtree
        (AttachProcessesToUnit, systemd 238 and later)."""
        _busctl("call", *_MANAGER, "AttachProcessesToUnit", "ssau", unit, subgroup, "1", str(pid))


_MANAGER = (
    "org.freedesktop.systemd1",
    "/org/freedesktop/systemd1",
    "org.freedesktop.systemd1.Manager",
)


def unit_object(unit: str) -> str:
    """systemd's D-Bus object of ``unit``, named as sd_bus_path_encode escapes it: every byte
    but a letter or a digit (a leading digit too) as ``_`` and two hex digits."""
    escaped = "".join(
        c if c.isascii() and c.isalnum() and not (i == 0 and c.isdigit()) else f"_{ord(c):02x}"
        for i, c in enumerate(unit)
    )
    return f"/org/freedesktop/systemd1/unit/{escaped}"


def _busctl(*args: str) -> str:
    busctl = shutil.which("busctl")
    if busctl is None:
        raise CgroupError("systemd owns the cgroup tree, but busctl is missing")
    done = subprocess.run([busctl, *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        reason = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        raise CgroupError(reason[0])
    return done.stdout.strip()


def _mkdir(fs: CgroupFs, path: Path) -> None:
    try:
        fs.mkdir(path)
    except FileExistsError as exc:
        raise CgroupError(f"cgroup {path} already exists") from exc
    except OSError as exc:
        raise CgroupError(f"cannot create cgroup {path}: {exc.strerror or exc}") from exc


def _rmdir(fs: CgroupFs, path: Path, timeout: float) -> None:
    """Remove a group directory; a missing one is fine.

    EBUSY is retried: the last member may still be exiting when cgroup.procs reads empty.
    """

    def removed() -> bool:
        try:
            fs.rmdir(path)
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                return False
            raise CgroupError(f"cannot remove cgroup {path}: {exc.strerror or exc}") from exc
        return True

    _wait_for(removed, timeout, f"cgroup {path} to become removable")


def _move(fs: CgroupFs, pid: int, procs: Path) -> None:
    try:
        fs.move(pid, procs)
    except OSError as exc:
        raise CgroupError(f"cannot move process {pid} into {procs.parent}: {exc.strerror}") from exc


def _unique(paths: Mapping[str, Path]) -> tuple[Path, ...]:
    return tuple(dict.fromkeys(paths.values()))


def check_name(name: str) -> str:
    """Return name if it is a valid group name, else raise CgroupError."""
    if not _NAME.fullmatch(name):
        raise CgroupError(
            f"invalid cgroup name {name!r}: use 1-64 letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return name


# ---------------------------------------------------------------------------------------
# Mount discovery


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def v1_mounts(mountinfo: Path = MOUNTINFO) -> dict[str, Path]:
    """Mount point of each mounted v1 controller, read from a mountinfo file."""
    mounts: dict[str, Path] = {}
    for line in _read(mountinfo).splitlines():
        before, sep, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if not sep or len(fields) < 5 or len(tail) < 3 or tail[0] != "cgroup":
            continue
        for option in tail[2].split(","):
            if option in V1_CONTROLLERS or option == CPUSET:
                mounts.setdefault(option, Path(_unescape(fields[4])))
    return mounts


def open_hierarchy(
    root: Path = CGROUP_ROOT,
    *,
    parent: str = PARENT,
    mountinfo: Path = MOUNTINFO,
    fs: CgroupFs | None = None,
) -> Hierarchy:
    """Detect the host's cgroup version and return hyper's hierarchy on it.

    ``root`` is where a v2 hierarchy would be mounted, ``mountinfo`` where v1 mount points
    are read from, ``parent`` the name of hyper's own group; nothing is created yet.
    """
    check_name(parent)
    fs = fs or CgroupFs()
    if (root / "cgroup.controllers").exists():
        available, missing = _v2_controllers(root)
        if missing:
            raise CgroupError(
                f"cgroup v2 at {root} lacks controllers {', '.join(missing)} "
                f"(cgroup.controllers: {' '.join(available) or 'empty'})"
            )
        if (root / "init.scope").is_dir():  # systemd's: PID 1 lives there
            scope = SystemdScope(root, fs)
            return V2Hierarchy(scope.path / parent, fs, scope)
        return V2Hierarchy(root / parent, fs)
    mounts = v1_mounts(mountinfo)
    missing = [c for c in V1_CONTROLLERS if c not in mounts]
    if missing:
        raise CgroupError(
            f"no usable cgroup hierarchy: {root} is not cgroup v2 and {mountinfo} "
            f"shows no v1 mount for {', '.join(missing)}"
        )
    used = [*V1_CONTROLLERS, *([CPUSET] if CPUSET in mounts else [])]
    return V1Hierarchy({c: mounts[c] / parent for c in used}, fs)


# ---------------------------------------------------------------------------------------
# Domain groups


class DomainGroup(ABC):
    """One domain's group: ``<parent>/<name>`` in every controller hyper uses."""

    def __init__(self, name: str, dirs: Mapping[str, Path], fs: CgroupFs) -> None:
        self.name = name
        self._by_controller = dict(dirs)
        self._dirs = _unique(dirs)
        self._fs = fs

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} at {', '.join(map(str, self._dirs))}>"

    @property
    def dirs(self) -> list[Path]:
        """The group's directories, one per distinct controller mount (one on v2)."""
        return list(self._dirs)

    def path(self, controller: str) -> Path:
        """The directory holding one controller's files (on v2, always the same one)."""
        try:
            return self._by_controller[controller]
        except KeyError as exc:
            raise CgroupError(f"cgroup {self.name}: no {controller!r} controller") from exc

    def place(self, cpus: Sequence[int] | None) -> None:
        """Run the group on ``cpus`` (None: every CPU of its parent's), where the host has the
        cpuset controller; nothing without it."""
        path = self._cpuset_dir()
        if path is not None:
            self._place(path, cpus)

    @abstractmethod
    def _place(self, path: Path, cpus: Sequence[int] | None) -> None: ...

    def placement(self) -> tuple[int, ...] | None:
        """The CPUs the group was placed on; None without cpuset, or when it has its parent's."""
        path = self._cpuset_dir()
        if path is None or not path.is_dir():
            return None
        mine = parse_cpu_list(_read(path / "cpuset.cpus"))
        if not mine or mine == parse_cpu_list(_read(path.parent / "cpuset.cpus")):
            return None
        return mine

    def _cpuset_dir(self) -> Path | None:
        path = self._by_controller.get(CPUSET)
        return path if path is not None and (path / "cpuset.cpus").exists() else None

    def procs_file_paths(self) -> list[Path]:
        """Every cgroup.procs file a process must write its own pid into to join."""
        return [d / "cgroup.procs" for d in self._dirs]

    def attach(self, pid: int) -> None:
        """Move process pid (with all its threads) into this group."""
        for procs in self.procs_file_paths():
            _move(self._fs, pid, procs)

    def pids(self) -> list[int]:
        """Every process in the group, in any controller (a partly removed group is fine)."""
        found: set[int] = set()
        for procs in self.procs_file_paths():
            if procs.parent.is_dir():
                found.update(int(pid) for pid in _read(procs).split())
        return sorted(found)

    def kill(self) -> bool:
        """SIGKILL every process in the group, once, without waiting for any to die; True while
        some are left after it (still dying, or out of reach). A process dies only once it
        leaves the system call it is in (an O_DIRECT write finishes first), and leaves ``pids``
        then."""
        if self.path("freezer").is_dir():
            self.thaw()  # a v1-frozen process cannot act on its SIGKILL until thawed
        self._kill_at_once()
        pids = self.pids()  # after the kill: those still dying, and any it could not reach
        if pids:
            self._sigkill_members(pids)
        return bool(pids)

    def kill_all(self, timeout: float = 10.0) -> None:
        """SIGKILL every process in the group, again and again, until the group is empty."""
        _wait_for(lambda: not self.kill(), timeout, f"cgroup {self.name} to empty")

    def remove(self, timeout: float = 10.0) -> None:
        """Kill every process, then remove the group in every controller (missing is fine)."""
        if any(d.is_dir() for d in self._dirs):
            self.kill_all(timeout)
        for d in self._dirs:
            _rmdir(self._fs, d, timeout)
        log.debug("removed cgroup %s", self.name)

    def _sigkill_members(self, pids: list[int]) -> None:
        # A pid read from cgroup.procs may exit and be reused by an unrelated host process
        # before we signal it. A pidfd pins one process; signalling only the pidfds whose pid
        # is still a member after they were opened can never hit a stranger.
        pidfds: dict[int, int] = {}
        try:
            for pid in pids:
                try:
                    pidfds[pid] = os.pidfd_open(pid)
                except ProcessLookupError:
                    continue
            members = set(self.pids())
            for pid, pidfd in pidfds.items():
                if pid in members:
                    try:
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                    except ProcessLookupError:
                        continue
        except OSError as exc:
            raise CgroupError(f"cgroup {self.name}: cannot kill members: {exc}") from exc
        finally:
            for pidfd in pidfds.values():
                os.close(pidfd)

    @abstractmethod
    def _kill_at_once(self) -> None:
        """Kill the whole group with one write where the kernel offers it."""

    @abstractmethod
    def set_limits(self, limits: Limits) -> None:
        """Write every limit; later calls change them (xl mem-set, sched-credit)."""

    @abstractmethod
    def freeze(self, timeout: float = 10.0) -> None:
        """Stop every process and return once all are frozen (xl pause)."""

    @abstractmethod
    def thaw(self) -> None:
        """Let every process run again (xl unpause)."""

    @property
    @abstractmethod
    def frozen(self) -> bool:
        """Whether the whole group is frozen (not merely freezing)."""

    @abstractmethod
    def cpu_time_ns(self) -> int:
        """CPU time consumed by the group's processes, in nanoseconds."""

    @abstractmethod
    def memory_bytes(self) -> int:
        """Memory currently charged to the group, in bytes."""

    @abstractmethod
    def oom_kills(self) -> int:
        """How many processes the OOM killer has killed in the group."""


class V1Group(DomainGroup):
    """A domain group on v1 controllers: one directory per distinct controller mount."""

    def _place(self, path: Path, cpus: Sequence[int] | None) -> None:
        # A v1 cpuset group with no memory node or no CPU takes no process: both are written.
        _write(path / "cpuset.mems", _read(path.parent / "cpuset.mems").strip())
        chosen = format_cpu_list(cpus) if cpus else _read(path.parent / "cpuset.cpus").strip()
        _write(path / "cpuset.cpus", chosen)

    def set_limits(self, limits: Limits) -> None:
        self._set_memory(limits.memory_mib * _MIB)
        cpu = self.path("cpu")
        _write(cpu / "cpu.shares", str(v1_cpu_shares(limits.cpu_weight)))
        _write(cpu / "cpu.cfs_period_us", str(CFS_PERIOD_US))
        _write(cpu / "cpu.cfs_quota_us", str(cfs_quota_us(limits.cap, limits.vcpus) or -1))
        _write(self.path("pids") / "pids.max", str(limits.pids_max))

    def _set_memory(self, limit: int) -> None:
        memory = self.path("memory") / "memory.limit_in_bytes"
        memsw = self.path("memory") / "memory.memsw.limit_in_bytes"
        order = [memory]
        if memsw.exists():
            # The kernel refuses memsw.limit < limit at every step: when raising, raise
            # memsw first; when lowering, lower the plain limit first.
            order = [memsw, memory] if limit >= _read_int(memory) else [memory, memsw]
        for path in order:
            _write(path, str(limit))

    def freeze(self, timeout: float = 10.0) -> None:
        _write(self._state_file, "FROZEN")
        try:
            _wait_for(lambda: self.frozen, timeout, f"cgroup {self.name} to freeze")
        except CgroupError:
            self.thaw()  # a domain stuck in FREEZING is neither running nor paused
            raise

    def thaw(self) -> None:
        _write(self._state_file, "THAWED")

    @property
    def frozen(self) -> bool:
        return _read(self._state_file).strip() == "FROZEN"

    @property
    def _state_file(self) -> Path:
        return self.path("freezer") / "freezer.state"

    def cpu_time_ns(self) -> int:
        return _read_int(self.path("cpuacct") / "cpuacct.usage")

    def memory_bytes(self) -> int:
        return _read_int(self.path("memory") / "memory.usage_in_bytes")

    def oom_kills(self) -> int:
        return _read_keyed(self.path("memory") / "memory.oom_control", "oom_kill")

    def _kill_at_once(self) -> None:
        """v1 has no cgroup.kill: kill_all's loop does it all."""


class V2Group(DomainGroup):
    """A domain group on the unified hierarchy: one directory for every controller."""

    def _place(self, path: Path, cpus: Sequence[int] | None) -> None:
        if cpus:  # empty: the parent's CPUs
            _write(path / "cpuset.cpus", format_cpu_list(cpus))

    @property
    def _dir(self) -> Path:
        return self._dirs[0]

    def set_limits(self, limits: Limits) -> None:
        _write(self._dir / "memory.max", str(limits.memory_mib * _MIB))
        if (self._dir / "memory.swap.max").exists():
            _write(self._dir / "memory.swap.max", "0")
        _write(self._dir / "cpu.weight", str(v2_cpu_weight(limits.cpu_weight)))
        quota = cfs_quota_us(limits.cap, limits.vcpus)
        _write(self._dir / "cpu.max", f"{quota or 'max'} {CFS_PERIOD_US}")
        _write(self._dir / "pids.max", str(limits.pids_max))

    def freeze(self, timeout: float = 10.0) -> None:
        _write(self._dir / "cgroup.freeze", "1")
        try:
            _wait_for(lambda: self.frozen, timeout, f"cgroup {self.name} to freeze")
        except CgroupError:
            self.thaw()
            raise

    def thaw(self) -> None:
        _write(self._dir / "cgroup.freeze", "0")

    @property
    def frozen(self) -> bool:
        return _read_keyed(self._dir / "cgroup.events", "frozen") == 1

    def cpu_time_ns(self) -> int:
        return _read_keyed(self._dir / "cpu.stat", "usage_usec") * 1000

    def memory_bytes(self) -> int:
        return _read_int(self._dir / "memory.current")

    def oom_kills(self) -> int:
        return _read_keyed(self._dir / "memory.events", "oom_kill")

    def _kill_at_once(self) -> None:
        if (self._dir / "cgroup.kill").exists():
            _write(self._dir / "cgroup.kill", "1")


# ---------------------------------------------------------------------------------------
# Hierarchies


class Hierarchy(ABC):
    """hyper's parent group on one host hierarchy, and the domain groups under it."""

    version: ClassVar[Literal[1, 2]]
    #: The subtree systemd delegated to hyper, where it owns the host's (v2) tree.
    scope: SystemdScope | None = None

    def __init__(self, parents: Mapping[str, Path], fs: CgroupFs) -> None:
        self._parents = dict(parents)  # controller -> <mount>/<parent>
        self._fs = fs

    def __repr__(self) -> str:
        dirs = ", ".join(map(str, _unique(self._parents)))
        return f"<{type(self).__name__} v{self.version} at {dirs}>"

    def parent_dirs(self) -> list[Path]:
        """hyper's parent group, one directory per distinct controller mount."""
        return list(_unique(self._parents))

    def create(self, name: str, limits: Limits) -> DomainGroup:
        """Create ``<parent>/<name>`` with limits, placed on ``limits.vcpus`` CPUs where the
        host has them to spare (``place_vcpus``, against the groups already placed); on
        failure, remove whatever was created."""
        check_name(name)
        self._ensure_parent()
        cpus = self._placement(limits.vcpus)
        group = self._group(name)
        created: list[Path] = []
        try:
            for path in group.dirs:
                _mkdir(self._fs, path)
                created.append(path)
            group.place(cpus)
            group.set_limits(limits)
        except BaseException:
            for path in reversed(created):
                self._discard(path)
            raise
        log.debug("created cgroup %r with %s", group, limits)
        return group

    def prepare(self) -> None:
        """Make hyper's parent group ready for domains, as ``create`` does, first taking the
        subtree systemd delegates to hyper where it owns the tree: hyperd calls it when it
        starts, so that it and its helpers live in hyper's own scope, and only hyperd does."""
        if self.scope is not None:
            self.scope.claim()
        self._ensure_parent()

    def host_cpus(self) -> tuple[int, ...] | None:
        """The CPUs hyper's groups may be placed on; None where the host has no cpuset."""
        self._ensure_parent()
        return self._host_cpus()

    def _placement(self, vcpus: int | None) -> tuple[int, ...] | None:
        host = self._host_cpus() if vcpus is not None else None
        if vcpus is None or host is None:
            return None
        placed = [self._group(name).placement() for name in self.list()]
        return place_vcpus(vcpus, host, [cpus for cpus in placed if cpus is not None])

    def _host_cpus(self) -> tuple[int, ...] | None:
        parent = self._parents.get(CPUSET)
        if parent is None:
            return None
        for name in ("cpuset.cpus.effective", "cpuset.cpus"):  # v2's, then v1's
            if (parent / name).exists():
                return parse_cpu_list(_read(parent / name)) or None
        return None

    def open(self, name: str) -> DomainGroup:
        """An existing domain group; CgroupError if it is missing in any controller."""
        group = self._group(check_name(name))
        for path in group.dirs:
            if not path.is_dir():
                raise CgroupError(f"cgroup {name} does not exist: no {path}")
        return group

    def list(self) -> list[str]:
        """Names of every group under hyper's parent, complete or not (for cleanup)."""
        names: set[str] = set()
        for parent in self.parent_dirs():
            if parent.is_dir():
                names.update(p.name for p in parent.iterdir() if p.is_dir())
        return sorted(names)

    def remove_all(self, timeout: float = 10.0) -> None:
        """Kill and remove every group under hyper's parent, then the parent itself."""
        for name in self.list():
            self._group(name).remove(timeout)
        for parent in self.parent_dirs():
            _rmdir(self._fs, parent, timeout)

    def _ensure_parent(self) -> None:
        if self.scope is not None and not self.scope.path.is_dir():
            raise CgroupError(f"{self.scope.path} does not exist: hyperd starts it (prepare)")
        created: list[Path] = []
        try:
            created += [parent for parent in self.parent_dirs() if _make_group(self._fs, parent)]
            self._enable_controllers()
        except BaseException:
            for path in reversed(created):
                self._discard(path)
            raise

    def _discard(self, path: Path) -> None:
        """Best-effort removal of an empty group just created, while unwinding a failure."""
        try:
            self._fs.rmdir(path)
        except OSError as exc:
            log.warning("could not remove cgroup %s after a failure: %s", path, exc)

    @abstractmethod
    def _enable_controllers(self) -> None:
        """Make the controllers available to the parent's children."""

    @abstractmethod
    def _group(self, name: str) -> DomainGroup: ...


class V1Hierarchy(Hierarchy):
    """hyper's groups on v1 controllers, each controller mounted on its own or co-mounted."""

    version = 1

    def _group(self, name: str) -> DomainGroup:
        dirs = {c: parent / name for c, parent in self._parents.items()}
        return V1Group(name, dirs, self._fs)

    def _enable_controllers(self) -> None:
        """Each v1 controller is its own hierarchy: a new group has it already. A new cpuset
        group has no CPU and no memory node, and takes no process until given some: hyper's
        parent gets its own parent's."""
        parent = self._parents.get(CPUSET)
        if parent is None:
            return
        for name in ("cpuset.cpus", "cpuset.mems"):
            if not _read(parent / name).strip():
                _write(parent / name, _read(parent.parent / name).strip())


class V2Hierarchy(Hierarchy):
    """hyper's groups on the unified (v2) hierarchy."""

    version = 2

    def __init__(self, parent: Path, fs: CgroupFs, scope: SystemdScope | None = None) -> None:
        # cpuset only where delegated: its files are in a group only if it is enabled there.
        controllers = (*V2_CONTROLLERS, "cpuacct", "freezer", CPUSET)
        super().__init__({c: parent for c in controllers}, fs)
        self._parent = parent
        self.scope = scope

    def _group(self, name: str) -> DomainGroup:
        dirs = {c: parent / name for c, parent in self._parents.items()}
        return V2Group(name, dirs, self._fs)

    def _enable_controllers(self) -> None:
        # A controller reaches the parent only if its own parent's subtree_control enables
        # it; that file belongs to the host (or to hyper's scope, enabled when claimed).
        _enable_v2(self._fs, self._parent)


def _v2_controllers(group: Path) -> tuple[list[str], list[str]]:
    """The controllers a v2 group may enable (its cgroup.controllers), and hyper's among the
    ones it may not."""
    available = _read(group / "cgroup.controllers").split()
    return available, [c for c in V2_CONTROLLERS if c not in available]


def _enable_v2(fs: CgroupFs, group: Path) -> None:
    """Enable hyper's controllers (and cpuset, where group has it) for group's children;
    CgroupError naming the file to change if group's parent does not pass one down."""
    available, missing = _v2_controllers(group)
    if missing:
        raise CgroupError(
            f"{group.parent / 'cgroup.subtree_control'} does not delegate "
            f"{', '.join(missing)} to {group}; enable them there (hyper changes only the "
            "groups it made and those systemd delegates to it)"
        )
    enabled = _read(group / "cgroup.subtree_control").split()
    optional = [CPUSET] if CPUSET in available else []
    wanted = [c for c in (*V2_CONTROLLERS, *optional) if c not in enabled]
    if wanted:
        try:
            fs.enable(group, wanted)
        except OSError as exc:
            raise CgroupError(
                f"cannot enable {' '.join(wanted)} in {group / 'cgroup.subtree_control'}: "
                f"{exc.strerror}"
            ) from exc


class SystemdScope:
    """hyper's delegated subtree, ``system.slice/hyper.scope``, on a host whose cgroup tree
    systemd owns (the module's docstring says why and how)."""

    def __init__(self, root: Path, fs: CgroupFs) -> None:
        self.root = root
        self.path = root / SYSTEMD_SLICE / SYSTEMD_SCOPE
        self._fs = fs

    def __repr__(self) -> str:
        return f"<SystemdScope {self.path}>"

    def inside(self) -> bool:
        """Whether this process is in the scope (or a group under it)."""
        own = self.root / self._fs.own_group().lstrip("/")
        return own == self.path or self.path in own.parents

    def claim(self) -> None:
        """Put this process in the scope's leaf: systemd moves it there if the scope runs,
        else starts the scope holding it. Then move every other process out of the scope
        itself into the leaf, and enable the controllers for the scope's children."""
        leaf = self.path / SUPERVISOR
        running = False
        try:
            running = self._fs.unit_state(SYSTEMD_SCOPE) == "active"
            if running:  # domains outlived the last hyperd: join them
                _make_group(self._fs, leaf)
                if not self.inside():
                    self._fs.join_unit(SYSTEMD_SCOPE, f"/{SUPERVISOR}", os.getpid())
            else:
                self._start()
        except CgroupError as exc:
            verb = "join" if running else "start"
            raise CgroupError(f"systemd did not {verb} {SYSTEMD_SCOPE}: {exc}") from exc
        _wait_for(self.inside, SYSTEMD_TIMEOUT, f"systemd to put us in {SYSTEMD_SCOPE}")
        if not running:
            _make_group(self._fs, leaf)
        for pid in _read(self.path / "cgroup.procs").split():
            try:
                _move(self._fs, int(pid), leaf / "cgroup.procs")
            except CgroupError:
                if pid in _read(self.path / "cgroup.procs").split():
                    raise  # else it exited meanwhile
        _enable_v2(self._fs, self.path)

    def _start(self) -> None:
        """StartTransientUnit, again while systemd still holds the last scope of that name
        (stopping, or not yet collected): "Unit hyper.scope was already loaded"."""
        deadline = time.monotonic() + SYSTEMD_TIMEOUT
        while True:
            try:
                self._fs.start_scope(SYSTEMD_SCOPE, SYSTEMD_SLICE, os.getpid())
                return
            except CgroupError as exc:
                if "already" not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(SYSTEMD_RETRY)


def _make_group(fs: CgroupFs, path: Path) -> bool:
    """Create group ``path`` unless it exists (another process may make it at the same time):
    True if this call made it."""
    if path.is_dir():
        return False
    try:
        _mkdir(fs, path)
    except CgroupError:
        if not path.is_dir():  # else another process made it first
            raise
        return False
    return True

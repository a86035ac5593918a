"""What a data-path worker keeps of host privilege: nothing.

A worker (backends/datapath_worker.py) parses memory a domU writes, in Python or in native code, so
a memory-safety bug there must not become host root. dom0 starts it as root; once it has opened
what it can only open by name (its event channels' doorbells: a POSIX semaphore has no fd to
hand over) and before it reads a byte of the frontend's memory or starts a thread, it calls
``drop``:

- a network and an IPC namespace of its own, empty: it reaches no network, no host service and
  no abstract unix socket (its TAP queue works through its fd, whatever the namespace);
- ``setgroups([])``, then ``setresgid`` to its domain's host gid and ``setresuid`` to a uid of
  its own (below);
- no capability in any set: the bounding set is dropped while it still may (CAP_SETPCAP),
  changing uids from 0 empties the effective, permitted and ambient sets, and ``capset`` the
  inheritable one, which a uid change keeps;
- ``PR_SET_NO_NEW_PRIVS``: no execve gains anything (a set-uid file, file capabilities);
- ``PR_SET_DUMPABLE`` 0, after the uid change (which resets it): no process of its uid may
  ptrace it or read its memory, and it leaves no core;
- then it reads the result back from ``/proc/self/status`` and fails unless it holds nothing.

A process of the worker's uid outlives it only if a subverted worker forked one (an honest
worker starts threads only): it would go on holding the device's fds. So once dom0 has reaped a
worker, ``kill_processes_of`` kills whatever still runs as its uid, before the id is handed
out again.

Capabilities and no-new-privs belong to a thread, not a process: the drop refuses to run
beside another thread, so every thread the worker starts afterwards inherits the dropped state.
Whatever it uses afterwards it already holds as an fd or a mapping (its native device, its
control socket to dom0, its counter page, the grant pools dom0 opens for it), and it imports
nothing afterwards: Python itself may live where its uid cannot read (``/root/.pyenv``).

Ids: dom0 gives each running worker a uid of its own (``WorkerIds``), taken from
``WORKER_IDS`` ids at ``WORKER_ID_BASE``: past every domain's host range (channels/ids.py,
``uid_base``), and skipping any id a host account or group, or a subordinate-id range
(``/etc/subuid``, ``/etc/subgid``), holds. One id per worker, not one for all: a subverted
worker can neither signal nor ptrace another device's worker. An id goes back to the table once
its worker has been reaped.

In a driver domain (a domU running backends: backends/host.py) the ids are the domain's own,
inside its user namespace: a uid of its range per worker, and gid 0, which maps to the domain's
host gid, the group its shared objects name (so ``held`` accepts gid 0 there, and only there).

In dom0, its gid is its domain's host gid (hyperd/resources.py ``host_gid``), the group of every
object hyperd made for that domain: so the worker can open what the domain itself can open (its
rings, pools and doorbells; those of its other devices too), and nothing of dom0's or another
domain's.
The native netif pumps need that: they open their doorbells by name (channels/native,
``sem_open``) in the data-path threads, after the drop. Once they take them as fds opened
before the drop, the gid can be the worker's own id as well (``drop(worker_id, worker_id)``).

A worker started by a user other than root (the unit tests, run unprivileged) cannot change
ids or namespaces: it drops what it may (no-new-privs, the inheritable and ambient sets,
dumpable) and checks that it holds no capability and is not uid 0.
"""

from __future__ import annotations

import ctypes
import grp
import logging
import os
import pwd
import shutil
import subprocess
import threading
from pathlib import Path

from channels import linux
from channels.errors import HyperError
from channels.hypercall import DOMID_MAX
from channels.ids import ID_RANGE, uid_base

#: Worker ids: past the last domain's range (uid_base(DOMID_MAX) + ID_RANGE, about 3.15e9), and
#: below 2**32 - 1 (``(uid_t) -1`` is no id).
WORKER_ID_BASE = 3_500_000_000
WORKER_IDS = 1 << 16
assert uid_base(DOMID_MAX) + ID_RANGE <= WORKER_ID_BASE
assert WORKER_ID_BASE + WORKER_IDS < (1 << 32) - 1

# <linux/prctl.h>
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
# <linux/capability.h>
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

SUBORDINATE_IDS = ("/etc/subuid", "/etc/subgid")

_libc = ctypes.CDLL(None, use_errno=True)
log = logging.getLogger(__name__)


class PrivilegeError(HyperError):
    """A worker that cannot give up host privilege, or no id to give it."""


# -- dom0's side: the ids ------------------------------------------------------------------------


class WorkerIds:
    """The worker ids in use in this dom0, handed out in turn (an id is reused as late as
    possible)."""

    def __init__(self, base: int = WORKER_ID_BASE, count: int = WORKER_IDS) -> None:
        self.base = base
        self.count = count
        self._used: set[int] = set()
        self._next = 0
        self._lock = threading.Lock()

    def take(self) -> int:
        """A free id no host account, group or subordinate range holds; PrivilegeError if none
        is left."""
        with self._lock:
            for step in range(self.count):
                candidate = self.base + (self._next + step) % self.count
                if candidate not in self._used and not host_uses(candidate):
                    self._used.add(candidate)
                    self._next = (candidate - self.base + 1) % self.count
                    return candidate
        raise PrivilegeError(f"no worker id free in {self.base}+{self.count}")

    def give_back(self, worker_id: int) -> None:
        """Once the worker that had ``worker_id`` has been reaped."""
        with self._lock:
            self._used.discard(worker_id)


def host_uses(an_id: int) -> bool:
    """Whether a host account or group has ``an_id``, or a subordinate-id range holds it."""
    try:
        pwd.getpwuid(an_id)
        return True
    except KeyError:
        pass
    try:
        grp.getgrgid(an_id)
        return True
    except KeyError:
        pass
    return any(an_id in ids for ids in _subordinate_ranges())


def _subordinate_ranges() -> list[range]:
    """The ranges of ``/etc/subuid`` and ``/etc/subgid`` (``name:first:count`` lines)."""
    ranges = []
    for path in SUBORDINATE_IDS:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            fields = line.split(":")
            if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
                ranges.append(range(int(fields[1]), int(fields[1]) + int(fields[2])))
    return ranges


#: This dom0's table.
worker_ids = WorkerIds()


def kill_processes_of(uid: int) -> None:
    """SIGKILL every process running as ``uid`` (dom0 as root, once the worker that had it was
    reaped): ``kill -KILL -1`` run as ``uid`` signals all of them in one sweep of the process
    table, which no fork slips past (one signalled in the middle of a fork has the fork fail)."""
    if os.geteuid() != 0:
        return  # no worker ran as another uid
    kill = shutil.which("kill")
    if kill is None:
        log.warning("no kill command: processes left by worker uid %d are not looked for", uid)
        return
    subprocess.run([kill, "-KILL", "-1"], user=uid, group=uid, extra_groups=[], capture_output=True)


# -- the worker's side: the drop -----------------------------------------------------------------


def drop(uid: int, gid: int) -> None:
    """Give up every host privilege for good, becoming ``uid`` and ``gid`` (as root; see the
    module docstring). PrivilegeError if anything is left."""
    tasks = os.listdir("/proc/self/task")
    if len(tasks) != 1:
        raise PrivilegeError(f"{len(tasks)} threads: capabilities would stay with the others")
    privileged = os.geteuid() == 0
    try:
        linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
        if privileged:
            linux.unshare(linux.CLONE_NEWNET | linux.CLONE_NEWIPC)
            for cap in range(_last_cap() + 1):
                linux.prctl(PR_CAPBSET_DROP, cap)
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        linux.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
        _clear_capabilities()
        linux.prctl(PR_SET_DUMPABLE, 0)
    except OSError as exc:
        raise PrivilegeError(f"dropping privilege: {exc}") from exc
    left = held(expected=(uid, gid) if privileged else None)
    if not privileged:  # a user's bounding set is full, only root may empty it; unusable now
        left = [what for what in left if not what.startswith("CapBnd")]
    if left:
        raise PrivilegeError(f"privilege left after the drop: {', '.join(left)}")


def held(pid: int | str = "self", expected: tuple[int, int] | None = None) -> list[str]:
    """What process ``pid`` holds of host privilege, from its ``/proc/<pid>/status``: each
    capability set not empty, uid or gid 0 (or, with ``expected`` (uid, gid), any id but
    those), supplementary groups, no-new-privs unset. Empty: nothing."""
    status = _status(pid)
    left = [name for name in CAP_SETS if int(status[name], 16)]
    if status["NoNewPrivs"] != "1":
        left.append("NoNewPrivs 0")
    root_group_is_ours = expected is not None and expected[1] == 0 and not _in_initial_user_ns()
    for index, name in enumerate(("Uid", "Gid")):
        ids = {int(field) for field in status[name].split()}
        is_root = 0 in ids and not (name == "Gid" and root_group_is_ours)
        if is_root or (expected is not None and ids != {expected[index]}):
            left.append(f"{name} {status[name]}")
    if expected is not None and status["Groups"]:
        left.append(f"Groups {status['Groups']}")
    return left


def _in_initial_user_ns() -> bool:
    """Whether this process's ids are the host's (its user namespace maps every id to
    itself)."""
    return Path("/proc/self/uid_map").read_text().split() == ["0", "0", "4294967295"]


#: The capability sets of /proc/<pid>/status.
CAP_SETS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


def _status(pid: int | str) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict((key, value.strip()) for key, _, value in (line.partition(":") for line in lines))


def _last_cap() -> int:
    return int(Path("/proc/sys/kernel/cap_last_cap").read_text())


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


def _clear_capabilities() -> None:
    """capset(2): every set of this thread empty (the one a uid change leaves is the
    inheritable)."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()  # version 3: two 32-bit halves, all zero
    if _libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")

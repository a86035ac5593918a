"""A domain as hyperd sees it: its record, and the privileged steps that build one.

Building a domU (the domain builder of Xen's toolstack, here inside the hypervisor):

1. a cgroup with the config's limits (hyperd/cgroup.py);
2. the store ring and the console ring, each one page of shared memory, with an event channel
   bound between the domU and dom0 (ports allocated in hyperd's tables);
3. the boot process ``domu.boot:main``, forked by hyperd's fork server (channels/forkserver.py)
   into the cgroup before it runs, given its hypercall socket and, over a private sync socket,
   its boot parameters. It builds the sandbox root as host root,
   creates the domain's user namespace and asks hyperd (``needs_id_map``) to write the uid and
   gid maps, which only a process privileged in the host namespace may do; then it forks the
   domain's kernel as pid 1 of a new pid namespace and reports that pid (``kernel_pid``).
"""

from __future__ import annotations

import collections
import enum
import json
import os
import socket
import subprocess
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from channels import pumps
from channels.bytering import CONSOLE_PAGE_SIZE, XENSTORE_PAGE_SIZE
from channels.config import DOM0_NAME, RECEIVED, DomainConfig
from channels.credit import Credit
from channels.forkserver import Child, ChildSetup, ForkServer
from channels.ids import id_map
from hyperd.budget import HYPERCALL_BURST, HYPERCALL_RATE, GuestLog
from hyperd.cgroup import DomainGroup, Limits
from hyperd.resources import Resources

PIDS_MAX = 1024  # processes in one domU's cgroup


class Status(enum.Enum):
    BUILDING = "building"
    RUNNING = "running"
    SHUTDOWN = "shutdown"  # preserved after poweroff/reboot
    CRASHED = "crashed"  # preserved after a crash
    DYING = "dying"


@dataclass
class RingInfo:
    """A ring page and the two ends of its event channel: the domain's, and its server's
    (``dom0_port``: dom0's, or the store domain's for a store ring when there is one)."""

    segment: str
    domu_port: int
    dom0_port: int

    def as_dict(self) -> dict[str, Any]:
        return {"segment": self.segment, "domu_port": self.domu_port, "dom0_port": self.dom0_port}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> RingInfo | None:
        if data is None:
            return None
        return cls(str(data["segment"]), int(data["domu_port"]), int(data["dom0_port"]))


@dataclass
class Domain:
    domid: int
    name: str
    config: DomainConfig
    resources: Resources
    cgroup: DomainGroup | None = None
    status: Status = Status.BUILDING
    uuid: str = field(default_factory=lambda: str(uuidlib.uuid4()))
    created: float = field(default_factory=time.time)
    owner: int = 0  # the uid of the user who asked for it (see hypercall.DomctlCreate)
    sock: socket.socket | None = None  # hyperd's end of the hypercall socket
    boot: Child | None = None  # the boot process, until it exits (hyperd._reap)
    sync: socket.socket | None = None  # hyperd's end of the boot sync socket
    sync_buffer: bytes = b""
    pid: int | None = None  # the domain's main process: dom0 itself, or a domU's kernel
    #: When ``pid`` started (/proc/<pid>/stat), so that a re-adopting hyperd never takes a
    #: reused pid for the domain.
    pid_start: int | None = None
    reaped: bool = False  # hyperd has collected the main process's exit status (or never will)
    #: A pidfd on ``pid`` when the process is not hyperd's child: it was adopted from a killed
    #: hyperd (it is PID 1's child now), so its death comes through the pidfd, not SIGCHLD.
    pidfd: int | None = None
    store: RingInfo | None = None
    console: RingInfo | None = None
    shutdown_reason: str | None = None  # what the domain said in sched_shutdown
    exit_code: int | None = None
    final_cpu_ns: int = 0
    #: Unsent replies, each with the descriptor it hands on (DeviceTakeFd) or None; a
    #: descriptor is hyperd's to close until sent.
    outq: collections.deque[tuple[bytes, int | None]] = field(default_factory=collections.deque)
    bad_calls: int = 0
    #: What its hypercalls may still cost hyperd (hyperd/budget.py), and until when
    #: (monotonic) hyperd reads none of them, having run out (0: reading).
    credit: Credit = field(default_factory=lambda: Credit(HYPERCALL_RATE, HYPERCALL_BURST))
    calls_paused_until: float = 0.0
    log: GuestLog | None = None  # hyperd's end of a domU's output (hyperd/budget.py)
    process: Child | None = None  # dom0's process (its status set by hyperd._reap)

    @property
    def memory(self) -> int:
        return self.config.memory

    @property
    def vcpus(self) -> int:
        return self.config.vcpus

    def set_pid(self, pid: int) -> None:
        """The main process is ``pid``, not yet reaped (so its number cannot be reused yet)."""
        self.pid = pid
        self.pid_start = process_start_time(pid)
        self.reaped = False

    def to_dict(self) -> dict[str, Any]:
        """The record, for hyperd's state file (hyperd/state.py); sockets and processes are not
        in it: a re-adopting hyperd gets them back from the fd keeper and /proc."""
        return {
            "domid": self.domid,
            "name": self.name,
            "config": self.config.model_dump(mode="json"),
            "resources": self.resources.to_dict(),
            "cgroup": self.cgroup.name if self.cgroup is not None else None,
            "status": self.status.value,
            "uuid": self.uuid,
            "created": self.created,
            "owner": self.owner,
            "pid": self.pid,
            "pid_start": self.pid_start,
            "reaped": self.reaped,
            "store": self.store.as_dict() if self.store else None,
            "console": self.console.as_dict() if self.console else None,
            "shutdown_reason": self.shutdown_reason,
            "exit_code": self.exit_code,
            "final_cpu_ns": self.final_cpu_ns,
        }

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], open_group: Callable[[str], DomainGroup | None]
    ) -> Domain:
        """The record ``to_dict`` wrote; ``open_group`` re-opens its existing cgroup by name."""
        group = data["cgroup"]
        domid = int(data["domid"])
        config = data["config"]
        return cls(
            domid,
            str(data["name"]),
            dom0_config(config["memory"], config["vcpus"])
            if domid == 0
            else DomainConfig.model_validate(config, context=RECEIVED),
            Resources.from_dict(data["resources"]),
            cgroup=open_group(str(group)) if group is not None else None,
            status=Status(data["status"]),
            uuid=str(data["uuid"]),
            created=float(data["created"]),
            owner=int(data.get("owner", 0)),  # 0 in a state file from before owners
            pid=_optional_int(data["pid"]),
            pid_start=_optional_int(data["pid_start"]),
            reaped=bool(data["reaped"]),
            store=RingInfo.from_dict(data["store"]),
            console=RingInfo.from_dict(data["console"]),
            shutdown_reason=data["shutdown_reason"],
            exit_code=_optional_int(data["exit_code"]),
            final_cpu_ns=int(data["final_cpu_ns"]),
        )

    def info(self, state: str, cpu_ns: int) -> dict[str, Any]:
        return {
            "domid": self.domid,
            "name": self.name,
            "uuid": self.uuid,
            "state": state,
            "status": self.status.value,
            "memory": self.memory,
            "vcpus": self.vcpus,
            "cpu_time": cpu_ns / 1e9,
            "pid": self.pid,
            "created": self.created,
            "owner": self.owner,
            "shutdown_reason": self.shutdown_reason,
            "exit_code": self.exit_code,
            "store": self.store.as_dict() if self.store else None,
            "console": self.console.as_dict() if self.console else None,
            "config": self.config.model_dump(mode="json"),
        }


def cgroup_limits(config: DomainConfig) -> Limits:
    return Limits(
        memory_mib=config.memory,
        cpu_weight=config.cpu_weight,
        cap=config.cap,
        pids_max=PIDS_MAX,
        vcpus=config.vcpus,
    )


def dom0_config(memory_mib: int, vcpus: int) -> DomainConfig:
    """dom0's record of itself: the host's memory and CPUs. Not validated: no user wrote it,
    and its name is the one a user's config may not take."""
    return DomainConfig.model_construct(name=DOM0_NAME, memory=memory_mib, vcpus=vcpus)


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def process_start_time(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot; None if there is no such process.
    Two processes that had the same pid never have the same start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    return int(stat.rsplit(")", 1)[1].split()[19])


def describe_wait_status(status: int | None) -> str:
    """How a domain's process ended, from its wait status (None: not our child to reap)."""
    if status is None:
        return "not our child: exit status unknown"
    code = os.waitstatus_to_exitcode(status)
    return f"signal {-code}" if code < 0 else f"exit status {code}"


def ring_sizes() -> dict[str, int]:
    return {"store": XENSTORE_PAGE_SIZE, "console": CONSOLE_PAGE_SIZE}


SO_SNDBUFFORCE = 32  # <asm-generic/socket.h>: root may set a buffer past wmem_max
LOG_BUFFER = 1 << 20


#: Where the boot process finds its hypercall and sync sockets; its kernel keeps the first.
BOOT_HYPERCALL_FD = 3
BOOT_SYNC_FD = 4


def spawn_boot(
    domain: Domain,
    rootfs: Path,
    log_path: Path,
    spawner: ForkServer,
    extra: dict[str, Any] | None = None,
    fresh_log: bool = True,
) -> None:
    """Start the domain's boot process; its progress arrives on ``domain.sync``, and what it
    and the kernel write on their output on ``domain.log`` (a new domain, a new log: domids
    are reused; a store domain restarted in place adds to its own, ``fresh_log`` False).
    ``extra``: more boot parameters (the store domain's, hyperd/store_domain.py)."""
    hyper_end, domain_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sync_here, sync_there = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    log_here, log_there = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    # Room for what an honest kernel says while no hyperd reads (killed, or the domain past
    # its rate): its writes wait only past this.
    log_there.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, LOG_BUFFER)
    domain.log = GuestLog(log_path, log_here, fresh=fresh_log)
    assert domain.cgroup is not None
    domain.boot = spawner.spawn(
        "domu.boot:main",
        [str(BOOT_HYPERCALL_FD), str(BOOT_SYNC_FD)],
        env=_boot_environment(),
        stdin=subprocess.DEVNULL,
        stdout=log_there.fileno(),
        stderr=log_there.fileno(),
        pass_fds={BOOT_HYPERCALL_FD: domain_end.fileno(), BOOT_SYNC_FD: sync_there.fileno()},
        # In its cgroup before it runs a line: nothing of a domain is ever outside its limits.
        setup=ChildSetup(
            cwd="/",
            cgroup_procs=tuple(map(str, domain.cgroup.procs_file_paths())),
            comm="hyper-boot",
        ),
    )
    domain_end.close()
    sync_there.close()
    log_there.close()
    domain.sock = hyper_end
    domain.sync = sync_here
    params = {
        "domid": domain.domid,
        "name": domain.name,
        "rootfs": str(rootfs),
        "shm": str(domain.resources.view),
        "store": domain.store.as_dict() if domain.store else None,
        "console": domain.console.as_dict() if domain.console else None,
        "command": domain.config.command,
        "env": domain.config.env,
        "backends": domain.config.backends,
        "nics": [nic.model_dump() for nic in domain.config.nics],
        **(extra or {}),
    }
    sync_here.sendall(json.dumps(params).encode() + b"\n")


def write_id_maps(pid: int, domid: int) -> None:
    """Map the domain's user namespace onto its private host id range (channels/ids.py)."""
    for name in ("uid_map", "gid_map"):
        Path(f"/proc/{pid}/{name}").write_text(id_map(domid))


def _boot_environment() -> dict[str, str]:
    """What a domU's boot process inherits: a PATH, where hyper's code is, and the choice of
    data-path pumps (channels.pumps: ``HYPER_PUMPS=python`` in hyperd's environment makes the
    frontends run the Python reference too); nothing else of the host's environment."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": _source_root()}
    if pumps.ENV in os.environ:
        env[pumps.ENV] = os.environ[pumps.ENV]
    return env


def _source_root() -> str:
    """The directory holding the hyper packages, so the boot process imports the same code."""
    return str(Path(__file__).resolve().parent.parent)


def find_workload_init(kernel_pid: int) -> int | None:
    """The host pid of the domain's workload init: the one child of the domain's kernel."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("PPid:"):
                if int(line.split()[1]) == kernel_pid:
                    return int(entry.name)
                break
    return None

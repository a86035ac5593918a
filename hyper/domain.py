"""A domain as hyperd sees it: its record, and the privileged steps that build one.

Building a domU (the domain builder of Xen's toolstack, here inside the hypervisor):

1. a cgroup with the config's limits (hyper/cgroup.py);
2. the store ring and the console ring, each one page of shared memory, with an event channel
   bound between the domU and dom0 (ports allocated in hyperd's tables);
3. the boot process ``python -m domu.boot``, placed in the cgroup, given its hypercall socket
   and, over a private sync socket, its boot parameters. It builds the sandbox root as host root,
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
import sys
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from channels.bytering import CONSOLE_PAGE_SIZE, XENSTORE_PAGE_SIZE
from domu.sandbox import id_map
from hyper.cgroup import DomainGroup
from hyper.resources import Resources


class Status(enum.Enum):
    BUILDING = "building"
    RUNNING = "running"
    SHUTDOWN = "shutdown"  # preserved after poweroff/reboot
    CRASHED = "crashed"  # preserved after a crash
    DYING = "dying"


@dataclass
class RingInfo:
    """A ring page and the two ends of its event channel."""

    segment: str
    domu_port: int
    dom0_port: int

    def as_dict(self) -> dict[str, Any]:
        return {"segment": self.segment, "domu_port": self.domu_port, "dom0_port": self.dom0_port}


@dataclass
class Domain:
    domid: int
    name: str
    config: dict[str, Any]
    resources: Resources
    cgroup: DomainGroup | None = None
    status: Status = Status.BUILDING
    uuid: str = field(default_factory=lambda: str(uuidlib.uuid4()))
    created: float = field(default_factory=time.time)
    sock: socket.socket | None = None  # hyperd's end of the hypercall socket
    boot: subprocess.Popen[bytes] | None = None
    sync: socket.socket | None = None  # hyperd's end of the boot sync socket
    sync_buffer: bytes = b""
    pid: int | None = None  # the domain's main process: dom0 itself, or a domU's kernel
    reaped: bool = False  # hyperd has collected the main process's exit status
    store: RingInfo | None = None
    console: RingInfo | None = None
    shutdown_reason: str | None = None  # what the domain said in sched_shutdown
    exit_code: int | None = None
    final_cpu_ns: int = 0
    outq: collections.deque[bytes] = field(default_factory=collections.deque)  # unsent replies
    bad_calls: int = 0
    process: subprocess.Popen[bytes] | None = None  # dom0's process (kept: see hyperd._reap)

    @property
    def memory(self) -> int:
        return int(self.config.get("memory", 0))

    @property
    def vcpus(self) -> int:
        return int(self.config.get("vcpus", 1))

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
            "shutdown_reason": self.shutdown_reason,
            "exit_code": self.exit_code,
            "store": self.store.as_dict() if self.store else None,
            "console": self.console.as_dict() if self.console else None,
            "config": self.config,
        }


def ring_sizes() -> dict[str, int]:
    return {"store": XENSTORE_PAGE_SIZE, "console": CONSOLE_PAGE_SIZE}


def spawn_boot(domain: Domain, rootfs: Path, log_path: Path) -> None:
    """Start the domain's boot process; its progress arrives on ``domain.sync``."""
    hyper_end, domain_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sync_here, sync_there = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with open(log_path, "wb") as log:  # a new domain, a new log (domids are reused)
        domain.boot = subprocess.Popen(
            [sys.executable, "-m", "domu.boot", str(domain_end.fileno()), str(sync_there.fileno())],
            pass_fds=(domain_end.fileno(), sync_there.fileno()),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            cwd="/",
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": _source_root()},
        )
    domain_end.close()
    sync_there.close()
    domain.sock = hyper_end
    domain.sync = sync_here
    assert domain.cgroup is not None
    domain.cgroup.attach(domain.boot.pid)
    params = {
        "domid": domain.domid,
        "name": domain.name,
        "rootfs": str(rootfs),
        "store": domain.store.as_dict() if domain.store else None,
        "console": domain.console.as_dict() if domain.console else None,
        "command": domain.config.get("command"),
        "env": domain.config.get("env") or {},
    }
    sync_here.sendall(json.dumps(params).encode() + b"\n")


def write_id_maps(pid: int, domid: int) -> None:
    """Map the domain's user namespace onto its private host id range (domu/sandbox.py)."""
    for name in ("uid_map", "gid_map"):
        Path(f"/proc/{pid}/{name}").write_text(id_map(domid))


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

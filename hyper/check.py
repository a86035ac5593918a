"""`hyperctl check`: can hyper run on this host? Each thing it needs, probed, with ``ok``,
``missing`` or ``will be changed`` (what hyper itself adjusts when it runs) and one line of
remedy. ``scripts/setup.sh``, the demo and the pytest plugin ask it before they start, so a
host that cannot run hyper gets these lines instead of a traceback.

The probes read the host through a ``Host``: the real one by default, a prepared directory in
the tests (``Host(root=...)``), so that each missing piece can be shown on a fake host.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

OK, MISSING, CHANGED = "ok", "missing", "will be changed"
#: The host tools hyper runs (nsenter for exec, setpriv for workers, ip for the tests' and the
#: users' own plumbing), and those the demo runs inside its domains.
TOOLS = ("ip", "nsenter", "setpriv")
DEMO_TOOLS = ("iperf3", "fio")
NAMESPACES = ("user", "mnt", "net", "pid", "ipc", "uts", "cgroup")


@dataclass(frozen=True)
class Finding:
    what: str
    status: str  # OK, MISSING or CHANGED
    detail: str
    remedy: str = ""


@dataclass(frozen=True)
class Host:
    """Where the probes look: ``root`` prefixes every path of the host's (``/dev``, ``/proc``,
    ``/sys``); ``euid``, ``python`` and ``which`` stand for the process's own."""

    root: Path = Path("/")
    euid: int = field(default_factory=os.geteuid)
    python: tuple[int, int] = (sys.version_info[0], sys.version_info[1])
    which: Callable[[str], str | None] = shutil.which

    def path(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")

    def read(self, absolute: str) -> str | None:
        try:
            return self.path(absolute).read_text().strip()
        except OSError:
            return None


def check(host: Host | None = None, demo: bool = False) -> list[Finding]:
    """Every probe's finding, in the order a user should read them."""
    host = host or Host()
    findings = [_root(host), _python(host)]
    findings += [
        _device(host, "/dev/net/tun", "TUN/TAP", "modprobe tun"),
        _device(host, "/dev/loop-control", "loop devices", "modprobe loop"),
        _device(host, "/dev/fuse", "FUSE", "modprobe fuse"),
        _namespaces(host),
        _user_namespaces(host),
        _apparmor_userns(host),
        _cgroups(host),
        _bridge_firewall(host),
    ]
    findings += [_tool(host, tool, "") for tool in TOOLS]
    if demo:
        findings += [_tool(host, tool, " (the demo runs it)") for tool in DEMO_TOOLS]
    return findings


def can_run(findings: list[Finding]) -> bool:
    return all(f.status != MISSING for f in findings)


def _root(host: Host) -> Finding:
    if host.euid == 0:
        return Finding("root", OK, "running as root")
    return Finding("root", MISSING, f"running as uid {host.euid}", "run it as root (sudo)")


def _python(host: Host) -> Finding:
    version = ".".join(map(str, host.python))
    if host.python >= (3, 11):
        return Finding("Python", OK, version)
    return Finding("Python", MISSING, f"{version}, older than 3.11", "install Python 3.11 or newer")


def _device(host: Host, device: str, what: str, remedy: str) -> Finding:
    if host.path(device).exists():
        return Finding(what, OK, device)
    return Finding(what, MISSING, f"no {device}", remedy)


def _namespaces(host: Host) -> Finding:
    absent = [ns for ns in NAMESPACES if not host.path(f"/proc/self/ns/{ns}").exists()]
    if not absent:
        return Finding("namespaces", OK, ", ".join(NAMESPACES))
    return Finding(
        "namespaces",
        MISSING,
        f"the kernel has no {', '.join(absent)} namespaces",
        "a kernel built with them (CONFIG_USER_NS, CONFIG_NET_NS, ...)",
    )


def _user_namespaces(host: Host) -> Finding:
    limit = host.read("/proc/sys/user/max_user_namespaces")
    if limit is None or not limit.isdecimal() or int(limit) > 0:
        return Finding("user namespaces", OK, f"max_user_namespaces {limit or 'unset'}")
    return Finding(
        "user namespaces",
        MISSING,
        "max_user_namespaces is 0",
        "sysctl -w user.max_user_namespaces=15000",
    )


def _apparmor_userns(host: Host) -> Finding:
    """Ubuntu 24.04's AppArmor restriction on unprivileged user namespaces: it covers a process
    without CAP_SYS_ADMIN, and a domain's boot process makes its user namespace as host root
    (domu/boot.py), before it drops anything."""
    setting = host.read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns")
    if setting != "1":
        return Finding("AppArmor userns", OK, "no restriction on user namespaces")
    return Finding(
        "AppArmor userns",
        OK,
        "restricted for unprivileged processes; hyper makes its user namespaces as root",
    )


def _cgroups(host: Host) -> Finding:
    from hyperd import cgroup  # the hypervisor's own detection, on the host's paths

    try:
        hierarchy = cgroup.open_hierarchy(
            host.path("/sys/fs/cgroup"), mountinfo=host.path("/proc/self/mountinfo")
        )
    except cgroup.CgroupError as exc:
        return Finding(
            "cgroups",
            MISSING,
            str(exc),
            "mount cgroup v2 with cpu, memory and pids delegated, or the v1 controllers",
        )
    if hierarchy.scope is None:
        return Finding("cgroups", OK, f"v{hierarchy.version}")
    scope = f"{cgroup.SYSTEMD_SLICE}/{cgroup.SYSTEMD_SCOPE}"
    if host.which("busctl") is None:
        return Finding(
            "cgroups",
            MISSING,
            f"v2, owned by systemd, and no busctl to ask it for {scope}",
            "install systemd's busctl (the systemd package)",
        )
    return Finding("cgroups", CHANGED, f"v2, owned by systemd: hyperd runs in {scope}, delegated")


def _bridge_firewall(host: Host) -> Finding:
    if host.read("/proc/sys/net/bridge/bridge-nf-call-iptables") != "1":
        return Finding("bridge firewall", OK, "bridged frames skip iptables")
    return Finding(
        "bridge firewall",
        CHANGED,
        "bridged frames pass iptables (br_netfilter), whose FORWARD policy may drop them",
        "none needed: hyper adds an ACCEPT rule for each bridge it makes, and removes it",
    )


def _tool(host: Host, tool: str, why: str) -> Finding:
    found = host.which(tool)
    if found:
        return Finding(tool, OK, found)
    return Finding(tool, MISSING, f"no {tool} on PATH{why}", "scripts/setup.sh installs it")

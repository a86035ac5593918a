"""`hyperctl check` (hyper/check.py) on fake hosts: a prepared directory holding what a host's
/dev, /proc and /sys would, complete (everything ok) and then with each piece taken away (that
piece, and only it, is missing, with its remedy)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from hyper.check import CHANGED, MISSING, NAMESPACES, OK, Finding, Host, can_run, check


def fake_host(root: Path, cgroup: str = "v2", systemd: bool = False) -> Path:
    """A host with everything hyper needs: devices, namespaces, a cgroup hierarchy."""
    for device in ("dev/net/tun", "dev/loop-control", "dev/fuse"):
        (root / device).parent.mkdir(parents=True, exist_ok=True)
        (root / device).touch()
    (root / "proc/self/ns").mkdir(parents=True)
    for ns in NAMESPACES:
        (root / "proc/self/ns" / ns).touch()
    (root / "proc/sys/user").mkdir(parents=True)
    (root / "proc/sys/user/max_user_namespaces").write_text("15000\n")
    (root / "sys/fs/cgroup").mkdir(parents=True)
    if cgroup == "v2":
        (root / "sys/fs/cgroup/cgroup.controllers").write_text("cpuset cpu io memory pids\n")
        if systemd:
            (root / "sys/fs/cgroup/init.scope").mkdir()
        (root / "proc/self/mountinfo").write_text("")
    else:
        mounts = "".join(
            f"3{i} 25 0:2{i} / {root}/sys/fs/cgroup/{c} rw - cgroup cgroup rw,{c}\n"
            for i, c in enumerate(("memory", "cpu", "cpuacct", "pids", "freezer"))
        )
        (root / "proc/self/mountinfo").write_text(mounts)
    return root


def found(tool: str) -> str | None:
    return f"/usr/bin/{tool}"


def without(missing: str) -> Callable[[str], str | None]:
    """A PATH on which every tool is but ``missing``."""
    return lambda tool: None if tool == missing else found(tool)


def host(root: Path, *, euid: int = 0, python: tuple[int, int] = (3, 11), which=found) -> Host:
    """The probes pointed at ``root``, as root with Python 3.11 and every tool but those
    ``which`` does not find."""
    return Host(root=root, euid=euid, python=python, which=which)


def statuses(findings: list[Finding]) -> dict[str, str]:
    return {f.what: f.status for f in findings}


@pytest.mark.parametrize("cgroup", ["v1", "v2"])
def test_a_complete_host_is_all_ok(tmp_path: Path, cgroup: str) -> None:
    findings = check(host(fake_host(tmp_path, cgroup)))
    assert {f.status for f in findings} == {OK}, findings
    assert can_run(findings)
    assert [f.detail for f in findings if f.what == "cgroups"] == [cgroup]


TAKEN_AWAY: dict[str, Callable[[Path], object]] = {
    "TUN/TAP": lambda root: (root / "dev/net/tun").unlink(),
    "loop devices": lambda root: (root / "dev/loop-control").unlink(),
    "FUSE": lambda root: (root / "dev/fuse").unlink(),
    "namespaces": lambda root: (root / "proc/self/ns/user").unlink(),
    "user namespaces": lambda root: (root / "proc/sys/user/max_user_namespaces").write_text("0"),
    "cgroups": lambda root: (root / "sys/fs/cgroup/cgroup.controllers").write_text("cpu io\n"),
}


@pytest.mark.parametrize("what", TAKEN_AWAY)
def test_each_missing_piece_is_reported_alone_with_its_remedy(tmp_path: Path, what: str) -> None:
    root = fake_host(tmp_path)
    TAKEN_AWAY[what](root)
    findings = check(host(root))

    assert [f.what for f in findings if f.status != OK] == [what]
    (finding,) = [f for f in findings if f.what == what]
    assert finding.status == MISSING and finding.remedy
    assert not can_run(findings)


def test_no_root_an_old_python_and_a_missing_tool_are_each_reported(tmp_path: Path) -> None:
    findings = check(host(fake_host(tmp_path), euid=1000, python=(3, 9), which=without("nsenter")))
    assert {w: s for w, s in statuses(findings).items() if s != OK} == {
        "root": MISSING,
        "Python": MISSING,
        "nsenter": MISSING,
    }


def test_the_demo_also_needs_iperf3_and_fio(tmp_path: Path) -> None:
    without_fio = host(fake_host(tmp_path), which=without("fio"))
    assert can_run(check(without_fio))
    demo = statuses(check(without_fio, demo=True))
    assert demo["fio"] == MISSING and demo["iperf3"] == OK


def test_a_bridge_firewall_is_what_hyper_changes_not_a_lack(tmp_path: Path) -> None:
    root = fake_host(tmp_path)
    (root / "proc/sys/net/bridge").mkdir(parents=True)
    (root / "proc/sys/net/bridge/bridge-nf-call-iptables").write_text("1\n")
    findings = check(host(root))
    assert statuses(findings)["bridge firewall"] == CHANGED
    assert can_run(findings)


def test_hyperctl_check_lists_every_finding_and_exits_0_only_if_hyper_can_run() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "hyper.cli", "check"], capture_output=True, text=True
    )
    assert {line.split("  ")[0].strip() for line in run.stdout.splitlines()} <= {
        OK,
        MISSING,
        CHANGED,
    }
    assert len(run.stdout.splitlines()) == len(check())
    assert run.returncode == (0 if can_run(check()) else 1), run.stdout
    # This host (and CI's) runs hyper as root; without root, that is what is missing.
    assert run.returncode == (0 if os.geteuid() == 0 else 1), run.stdout


def test_ubuntus_apparmor_restriction_is_reported_and_does_not_stop_hyper(tmp_path: Path) -> None:
    root = fake_host(tmp_path)
    (root / "proc/sys/kernel").mkdir(parents=True)
    (root / "proc/sys/kernel/apparmor_restrict_unprivileged_userns").write_text("1\n")
    findings = check(host(root))
    (apparmor,) = [f for f in findings if f.what == "AppArmor userns"]
    assert apparmor.status == OK and "as root" in apparmor.detail
    assert can_run(findings)


def test_a_systemd_host_gets_a_delegated_scope_which_needs_busctl(tmp_path: Path) -> None:
    root = fake_host(tmp_path, systemd=True)
    (cgroups,) = [f for f in check(host(root)) if f.what == "cgroups"]
    assert cgroups.status == CHANGED and "system.slice/hyper.scope" in cgroups.detail
    findings = check(host(root, which=without("busctl")))
    assert statuses(findings)["cgroups"] == MISSING
    assert not can_run(findings)

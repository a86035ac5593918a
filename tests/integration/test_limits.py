"""cgroup limits hold a domain in, and idle domains cost nothing.

CPU figures are measured from the domains' own cgroup accounting over a window of wall time;
the bounds are deliberately wide (these machines are small and noisy), they assert what the
mechanism guarantees, not a speed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from hyperd import cgroup
from tests.integration.conftest import domain_info, domains, hyperctl, wait_for

pytestmark = pytest.mark.root

BURNER = 'command: ["sh", "-c", "while :; do :; done"]\n'


def cpu_seconds(name: str) -> float:
    info = domain_info(name)
    assert info is not None, f"{name} is gone"
    return float(info["cpu_time"])


def cpu_used_over(name: str, window: float) -> float:
    """CPU seconds the domain used during ``window`` seconds of wall time."""
    before = cpu_seconds(name)
    time.sleep(window)
    return cpu_seconds(name) - before


def test_a_memory_hog_is_killed_inside_its_own_domain(make_domain: Callable[..., str]) -> None:
    neighbour = make_domain()
    hog = make_domain(
        'memory: 64\non_crash: preserve\ncommand: ["python3", "-c", "x = b\'x\' * (512 << 20)"]\n'
    )
    info = wait_for(
        lambda: (d := domain_info(hog)) and d["status"] == "crashed" and d,
        60,
        "the hog to be killed",
    )
    assert info["state"] == "----c-"
    assert "crash -> preserve" in hyperctl("dmesg").out
    assert hyperctl("exec", neighbour, "--", "echo", "alive").out == "alive\n"
    assert any(d["name"] == "Domain-0" for d in domains())


def test_pause_stops_a_burner_and_unpause_resumes_it(make_domain: Callable[..., str]) -> None:
    name = make_domain(BURNER)
    assert cpu_used_over(name, 1.0) > 0.3, "the burner runs before the pause"
    hyperctl("pause", name)
    assert cpu_used_over(name, 1.0) < 0.02
    hyperctl("unpause", name)
    assert cpu_used_over(name, 1.0) > 0.3


def test_cap_20_holds_a_burner_well_under_half_a_cpu(make_domain: Callable[..., str]) -> None:
    name = make_domain("cap: 20\n" + BURNER)
    used = cpu_used_over(name, 3.0)
    assert 0.05 < used < 1.5, f"cap 20 let the burner use {used:.2f} s of CPU in 3 s"


def test_a_one_vcpu_domain_uses_at_most_about_one_cpu(make_domain: Callable[..., str]) -> None:
    """Two busy threads, one vCPU: the domain's quota is one CPU's time, however many CPUs the
    host has (this one has two; unbounded, the burners would use both)."""
    burners = 'command: ["sh", "-c", "(while :; do :; done) & while :; do :; done"]\n'
    name = make_domain("vcpus: 1\n" + burners)
    used = cpu_used_over(name, 3.0)
    assert 1.5 < used < 3.0 * 1.25, f"a 1-vcpu domain used {used:.2f} s of CPU in 3 s"


def cpus_allowed(name: str) -> str:
    """The CPU list a process inside the domain may run on (its cpuset's)."""
    status = hyperctl("exec", name, "--", "grep", "Cpus_allowed_list", "/proc/self/status").out
    return status.split()[-1]


def test_one_vcpu_domains_get_a_cpu_each_where_the_host_has_cpus_to_spare(
    make_domain: Callable[..., str],
) -> None:
    host = cgroup.open_hierarchy().host_cpus()
    if host is None or len(host) < 2:
        pytest.skip("needs the cpuset controller and two CPUs")
    first, second = make_domain("vcpus: 1\n"), make_domain("vcpus: 1\n")
    a, b = cpus_allowed(first), cpus_allowed(second)
    assert a.isdigit() and b.isdigit() and a != b, (a, b)
    wide = make_domain(f"vcpus: {len(host)}\n")  # none to spare: every CPU, the quota alone
    assert cgroup.parse_cpu_list(cpus_allowed(wide)) == host


def test_sched_credit_refuses_a_cap_beyond_the_vcpus(make_domain: Callable[..., str]) -> None:
    name = make_domain("vcpus: 1\n")
    result = hyperctl("sched-credit", "-d", name, "-c", "150", check=False)
    assert result.status != 0 and "cap 150% is more than 1 vcpus can use (100%)" in result.err
    assert hyperctl("sched-credit", "-d", name, "-c", "100").status == 0


def test_twenty_idle_domains_cost_almost_nothing(make_domain: Callable[..., str]) -> None:
    names = [make_domain() for _ in range(20)]
    time.sleep(1.0)  # let the boots' last work (the shells starting) finish
    before = {d["name"]: d["cpu_time"] for d in domains() if d["name"] in names}
    time.sleep(10.0)
    after = {d["name"]: d["cpu_time"] for d in domains() if d["name"] in names}
    used = sum(after[n] - before[n] for n in names)
    assert len(after) == 20
    assert used < 0.2, f"20 idle domains used {used:.3f} s of CPU in 10 s (limit 2% = 0.2 s)"


def test_mem_set_changes_the_limit_and_the_store(make_domain: Callable[..., str]) -> None:
    name = make_domain("memory: 128\n")
    hyperctl("mem-set", name, "96")
    info = domain_info(name)
    assert info is not None and info["memory"] == 96
    target = hyperctl("store", "read", f"/local/domain/{info['domid']}/memory/target").out
    assert target.strip() == str(96 * 1024)
    assert hyperctl("mem-set", name, "not-a-size", check=False).status == 2
    # The new limit holds: a 200 MiB allocation inside is OOM-killed.
    hog = hyperctl("exec", name, "--", "python3", "-c", "x = b'x' * (200 << 20)", check=False)
    assert hog.status != 0

"""hyper's pytest plugin used as an outside project uses it (issue 16): a throwaway project,
outside this repository, whose test files use only the plugin's fixtures, run by pytest in a
subprocess with hyper as installed; no hypervisor runs before, and nothing is left after."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration import conftest
from tests.integration.conftest import (
    REPO,
    RUN,
    leftovers,
    require_root,
    start_hypervisor,
    stop_hypervisor,
    wait_for,
)

pytestmark = pytest.mark.root

PASSING = """
def test_two_domains_on_a_bridge_ping_each_other(hyper_network):
    a, b = hyper_network(2)
    result = a.exec(["ping", "-c", "1", "-W", "5", b.ip], timeout=60)
    assert result.status == 0, result.err


def test_ping_through_a_lossy_link(hyper_network):
    client, server = hyper_network(2)
    client.set_faults("vif0", "drop=20,dir=tx,seed=1")  # 20 % of what it sends is lost
    result = client.exec(["ping", "-c", "20", "-i", "0.2", "-W", "1", server.ip], timeout=60)
    assert " 0% packet loss" not in result.out  # some were lost ...
    assert client.faults()["vif0"][1] > 0  # ... and counted: the frames the faults hit


def test_a_domain_runs_a_command_under_its_name(hyper_domain):
    domain = hyper_domain(memory=96)
    assert domain.exec(["hostname"]).out.strip() == domain.name


def test_a_disk_keeps_what_was_written(hyper_domain, tmp_path):
    disk = {"target": "d.img", "size": "64M", "vdev": "xvda"}
    domain = hyper_domain({"memory": 96, "disk": [disk]})
    assert domain.exec(["dd", "if=/dev/zero", "of=/dev/xvda", "bs=1M", "count=8",
                        "conv=fsync"]).status == 0
    assert (tmp_path / "d.img").stat().st_size == 64 << 20
"""

FAILING = """
def test_that_fails_inside_a_domain(hyper_domain):
    domain = hyper_domain(command=["sh", "-c", "echo console-mark-4711; exec sleep 600"])
    assert domain.exec(["false"]).status == 0, "false failed, as it does"
"""


@pytest.fixture
def no_hypervisor() -> Iterator[None]:
    """No hypervisor runs during the test (the session's is halted, and started again after)."""
    require_root()
    shared = RUN.pidfile.exists()
    before = dict(conftest._started_with)
    if shared:
        stop_hypervisor()
    try:
        yield
    finally:
        subprocess.run([sys.executable, "-m", "hyper.cli", "cleanup"], capture_output=True)
        wait_for(lambda: not leftovers(), 30, "the machine to be clean")
        if shared:
            start_hypervisor(before)


def run_pytest(project: Path, test_file: str) -> subprocess.CompletedProcess[str]:
    """pytest on one file of the project, from the project's directory, as its user would."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", test_file],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_an_outside_project_tests_with_the_plugins_fixtures_alone(
    no_hypervisor: None, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    assert REPO not in project.parents
    (project / "test_network.py").write_text(PASSING)
    (project / "test_broken.py").write_text(FAILING)

    passed = run_pytest(project, "test_network.py")
    assert passed.returncode == 0, passed.stdout[-4000:] + passed.stderr[-2000:]
    assert "4 passed" in passed.stdout
    wait_for(lambda: not leftovers(), 30, "the plugin's hypervisor to leave nothing behind")

    failed = run_pytest(project, "test_broken.py")
    assert failed.returncode == 1, failed.stdout[-4000:] + failed.stderr[-2000:]
    assert "1 failed" in failed.stdout
    log_section = re.search(r"hyper: t\d+-\d+'s log \(\S+/dom\d+\.log\)", failed.stdout)
    assert log_section is not None, failed.stdout[-4000:]
    assert "console-mark-4711" in failed.stdout, "the domain's console is not in the report"
    wait_for(lambda: not leftovers(), 30, "a failed test's domain and hypervisor to be gone")

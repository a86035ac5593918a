"""The GitHub Actions workflow (.github/workflows/test.yml): valid YAML that runs the README's
test command as root on ubuntu-latest for every push and pull request, with the interpreter it
sets up handed to the scripts, and that uploads hyper's logs when it fails; checked by
actionlint too where it is installed (it cannot be from this machine's package registries)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

WORKFLOW = Path(__file__).resolve().parents[2] / ".github/workflows/test.yml"


@pytest.fixture
def workflow() -> dict[Any, Any]:
    loaded: dict[Any, Any] = yaml.safe_load(WORKFLOW.read_text())
    return loaded


def steps(workflow: dict[Any, Any]) -> list[dict[str, Any]]:
    (job,) = workflow["jobs"].values()
    found: list[dict[str, Any]] = job["steps"]
    return found


def using(workflow: dict[Any, Any], action: str) -> list[dict[str, Any]]:
    """The steps that use ``action`` (any version)."""
    return [s for s in steps(workflow) if str(s.get("uses", "")).startswith(action + "@")]


def test_it_runs_on_every_push_and_pull_request_on_ubuntu(workflow: dict[Any, Any]) -> None:
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as True
    assert set(triggers) == {"push", "pull_request"}
    (job,) = workflow["jobs"].values()
    assert job["runs-on"] == "ubuntu-latest"


def test_it_runs_the_readmes_test_command_as_root_with_its_interpreter(
    workflow: dict[Any, Any],
) -> None:
    runs = [s.get("run", "") for s in steps(workflow)]
    (test,) = [r for r in runs if "scripts/test.sh" in r]
    assert test.startswith("sudo ") and "PYTHON=${{ steps.python.outputs.python-path }}" in test
    (python,) = using(workflow, "actions/setup-python")
    assert python["id"] == "python"
    readme = WORKFLOW.parents[2].joinpath("README.md").read_text()
    assert "scripts/test.sh" in readme


def test_it_uploads_hypers_logs_when_it_fails(workflow: dict[Any, Any]) -> None:
    failing = [s for s in steps(workflow) if s.get("if") == "failure()"]
    assert any("/var/log/hyper" in s.get("run", "") for s in failing)
    (upload,) = using(workflow, "actions/upload-artifact")
    assert upload in failing
    assert upload["with"]["path"] == "hyper-logs/"


@pytest.mark.skipif(shutil.which("actionlint") is None, reason="actionlint is not installed")
def test_actionlint_finds_nothing() -> None:
    run = subprocess.run(["actionlint", str(WORKFLOW)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr

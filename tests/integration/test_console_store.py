"""The console ring and the store, from hyperctl's side."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import REPO, domain_info, hyperctl, wait_for

pytestmark = pytest.mark.root


def read_until(proc: subprocess.Popen[bytes], marker: bytes, timeout: float) -> bytes:
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"{marker!r} not seen in {timeout} s; got {seen[-500:]!r}")
        ready, _, _ = select.select([proc.stdout], [], [], remaining)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                raise AssertionError(f"console closed before {marker!r}; got {seen[-500:]!r}")
            seen += chunk
    return seen


def hyperctl_process(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "hyper.cli", *args],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_console_shows_the_workloads_output(make_domain: Callable[..., str]) -> None:
    name = make_domain('command: ["sh", "-c", "echo hello-on-console; sleep 600"]\n')
    console = hyperctl_process("console", name)
    try:
        read_until(console, b"hello-on-console", 15)
    finally:
        console.kill()
        console.wait()


def test_console_carries_input_to_the_idle_shell_and_back(
    make_domain: Callable[..., str],
) -> None:
    name = make_domain()
    console = hyperctl_process("console", name)
    assert console.stdin is not None
    try:
        console.stdin.write(b"echo marker-$((6*7))\n")
        console.stdin.flush()
        read_until(console, b"marker-42", 15)
    finally:
        console.kill()
        console.wait()


def test_store_write_read_rm_and_watch(make_domain: Callable[..., str]) -> None:
    name = make_domain()
    info = domain_info(name)
    assert info is not None
    path = f"/local/domain/{info['domid']}/data/greeting"
    watcher = hyperctl_process("store", "watch", f"/local/domain/{info['domid']}/data", "-n", "2")
    try:
        read_until(watcher, b"/data ", 10)  # the event every watch fires on registration
        hyperctl("store", "write", path, "hello")
        assert hyperctl("store", "read", path).out == "hello\n"
        read_until(watcher, path.encode(), 10)
        assert watcher.wait(10) == 0
    finally:
        watcher.kill()
        watcher.wait()
    hyperctl("store", "rm", path)
    assert hyperctl("store", "read", path, check=False).status == 1


def test_the_guest_sees_the_store_through_its_ring(make_domain: Callable[..., str]) -> None:
    """The domain kernel wrote control/feature-poweroff over its ring; shutdown uses it."""
    name = make_domain()
    info = domain_info(name)
    assert info is not None
    feature = f"/local/domain/{info['domid']}/control/feature-poweroff"
    assert hyperctl("store", "read", feature).out == "1\n"
    hyperctl("shutdown", name)
    wait_for(lambda: domain_info(name) is None, 30, "the domain to power off")


def test_ctrl_right_bracket_detaches_the_console(make_domain: Callable[..., str]) -> None:
    """On a terminal, Ctrl-] ends `hyperctl console` and leaves the domain running."""
    import pty

    name = make_domain()
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(REPO)
        os.execvpe(
            sys.executable,
            [sys.executable, "-m", "hyper.cli", "console", name],
            {**os.environ, "PYTHONPATH": str(REPO)},
        )
    try:
        seen = b""
        deadline = time.monotonic() + 15
        while b"detaches" not in seen and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.5)[0]:
                seen += os.read(fd, 4096)
        os.write(fd, b"\x1d")
        _, status = wait_for(
            lambda: (r := os.waitpid(pid, os.WNOHANG)) != (0, 0) and r,
            10,
            "hyperctl console to detach",
        )
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)
    assert domain_info(name) is not None


def test_top_in_batch_mode_shows_every_domain(make_domain: Callable[..., str]) -> None:
    name = make_domain()
    out = hyperctl("top", "-b", "-n", "2", "-d", "0.2").out.splitlines()
    headers = [line for line in out if "CPU(%)" in line]
    assert len(headers) == 2
    assert any(line.split()[0] == "Domain-0" for line in out)
    assert any(line.split()[0] == name for line in out)


def test_create_in_the_foreground_returns_when_the_domain_ends(
    hypervisor: None, tmp_path: Path
) -> None:
    config = tmp_path / "fg.yaml"
    config.write_text('name: fg\ncommand: ["sh", "-c", "sleep 1"]\n')
    result = hyperctl("create", "-F", str(config), timeout=60)
    assert result.status == 0
    assert domain_info("fg") is None

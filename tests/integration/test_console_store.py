"""The console ring and the store, from hyperctl's side."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Callable

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

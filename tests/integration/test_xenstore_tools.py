"""Xen's own store tools against a running dom0 (issue 17): Debian's xenstore-utils (Xen's
``xenstore-ls``, ``-read``, ``-write``, ``-rm``, ``-chmod``, ``-watch``) and PyPI's pyxs,
through the socket dom0 serves (``/run/hyper/xenstored/socket``, ``XENSTORED_PATH``), see the
domains' real nodes and change the store as dom0 would."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable

import pytest

from tests.integration.conftest import RUN, domain_info, hyperctl

pytestmark = pytest.mark.root

TOOLS_ENV = {**os.environ, "XENSTORED_PATH": str(RUN.store_socket)}


def xs(tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Xen's ``xenstore-<tool>`` on dom0's socket."""
    run = subprocess.run(
        [f"xenstore-{tool}", *args], env=TOOLS_ENV, capture_output=True, text=True, timeout=30
    )
    assert not check or run.returncode == 0, run
    return run


def test_info_names_the_socket_xen_tools_use(hypervisor: None) -> None:
    info = hyperctl("info").out
    assert str(RUN.store_socket) in info
    assert oct(RUN.store_socket.stat().st_mode & 0o777) == oct(0o600)


def test_the_tools_read_a_domains_nodes_and_change_the_store(
    make_domain: Callable[..., str],
) -> None:
    name = make_domain()
    info = domain_info(name)
    assert info is not None
    home = f"/local/domain/{info['domid']}"

    assert xs("read", f"{home}/name").stdout.strip() == name
    listing = xs("ls", "-p", home).stdout
    assert f'name = "{name}"' in listing and f"(n0,r{info['domid']})" in listing

    xs("write", "/tool-test/a", "one")
    assert hyperctl("store", "read", "/tool-test/a").out.strip() == "one"
    xs("chmod", "/tool-test/a", "n0", f"r{info['domid']}")
    assert f"(n0,r{info['domid']})" in xs("ls", "-p", "/tool-test").stdout
    xs("rm", "/tool-test")
    assert xs("read", "/tool-test/a", check=False).returncode != 0


def test_xenstore_watch_sees_a_change(hypervisor: None) -> None:
    watch = subprocess.Popen(
        ["xenstore-watch", "-n", "2", "/tool-watch"],
        env=TOOLS_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watch.stdout is not None
        assert watch.stdout.readline().strip() == "/tool-watch"  # the first event: set up
        xs("write", "/tool-watch/x", "1")
        assert watch.stdout.readline().strip() == "/tool-watch/x"
        assert watch.wait(timeout=10) == 0
    finally:
        watch.kill()
        watch.wait()
        xs("rm", "/tool-watch", check=False)


def test_a_pyxs_transaction_that_meets_a_write_fails_with_eagain_and_its_retry_commits(
    hypervisor: None,
) -> None:
    from pyxs import Client

    path = str(RUN.store_socket)
    with Client(unix_socket_path=path) as mine, Client(unix_socket_path=path) as theirs:
        mine.write(b"/tool-tx/count", b"1")

        def increment() -> bool:
            """Read, add one, write, in one transaction; whether it committed."""
            mine.transaction()
            count = int(mine.read(b"/tool-tx/count"))
            if count == 1:  # the first try meets another client's write in between
                theirs.write(b"/tool-tx/count", b"10")
            mine.write(b"/tool-tx/count", str(count + 1).encode())
            return bool(mine.commit())

        assert increment() is False  # pyxs's commit: the store answered EAGAIN
        assert mine.read(b"/tool-tx/count") == b"10"
        assert increment() is True
        assert mine.read(b"/tool-tx/count") == b"11"
        mine.delete(b"/tool-tx")

"""hyper's pytest plugin: fixtures for a project's own integration tests, loaded by pytest itself
(the ``pytest11`` entry point) wherever hyper is installed.

::

    def test_two_domains_ping(hyper_network):
        a, b = hyper_network(2)
        assert a.exec(["ping", "-c", "1", "-W", "5", b.ip]).status == 0

    def test_a_disk(hyper_domain, tmp_path):
        dom = hyper_domain({"disk": [{"target": str(tmp_path / "d.img"), "size": "64M"}]})
        assert dom.exec(["dd", "if=/dev/xvda", "of=/dev/null", "bs=1M", "count=8"]).status == 0

- ``hyper`` (session): the hypervisor, as an ``api.Hypervisor``. One already running is used as
  it is; otherwise one is started for the session and halted at its end. The first test that
  asks for it checks, once, what hyper needs (`hyperctl check`: root, ``/dev/net/tun``,
  ``/dev/fuse``, namespaces, cgroups, ``nsenter``, ...); where one is missing every such test is
  skipped with one line saying which, and its remedy.
- ``hyper_domain`` (function): a factory. ``hyper_domain(config=None, **keys)`` creates a domain
  from a dict (or a YAML path, or a config model), with ``keys`` added and a unique name unless
  one is given, and returns it once it runs; every domain it made is destroyed at teardown,
  whatever the test met.
- ``hyper_network`` (function): a factory. ``hyper_network(n, **keys)`` makes a bridge of the
  test's own and ``n`` domains on it, at .2, .3, ... of a /24 of their own (each domain's
  address is its ``ip``); they and the bridge go at teardown.

When a test that used them fails, its report carries the last of hyperd's and dom0's logs, the
log of each domain it made (hyper's ``dom<N>.log``) and what each wrote on its console lately.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pluggy
import pytest

from backends.netback import firewall
from channels.errors import HyperError
from hyper import api

_names = itertools.count(1)
_subnets = itertools.count(1)
_REPORTED = pytest.StashKey[list[api.Domain]]()


def missing_requirements() -> list[str]:
    """What hyper needs of this host and does not find here (`hyperctl check`), one short
    phrase each, with its remedy."""
    from hyper.check import MISSING, check

    return [f"{f.what} ({f.remedy})" for f in check() if f.status == MISSING]


class TestDomain(api.Domain):
    """A domain a fixture made: an ``api.Domain`` with the address it was given, if any."""

    __test__ = False  # not a test class, whatever its name

    ip: str | None = None


@pytest.fixture(scope="session")
def hyper() -> Iterator[api.Hypervisor]:
    missing = missing_requirements()
    if missing:
        pytest.skip(f"hyper cannot run here: missing {', '.join(missing)}")
    started = not api.hyperd_running()
    hv = api.start()
    try:
        yield hv
    finally:
        if started:
            api.halt()


@pytest.fixture
def hyper_domain(
    hyper: api.Hypervisor, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., TestDomain]]:
    made: list[api.Domain] = request.node.stash.setdefault(_REPORTED, [])
    mine: list[TestDomain] = []

    def make(config: Any = None, **keys: Any) -> TestDomain:
        if config is None or isinstance(config, dict):
            data = {**(config or {}), **keys}
            data.setdefault("name", f"t{os.getpid() % 100000}-{next(_names)}")
            created = hyper.create(data, base_dir=tmp_path)
        else:
            created = hyper.create(config, base_dir=tmp_path)
        domain = TestDomain(hyper, created.name, created.domid)
        made.append(domain)
        mine.append(domain)
        return domain

    yield make
    _destroy(mine)


@pytest.fixture
def hyper_network(
    hyper_domain: Callable[..., TestDomain],
) -> Iterator[Callable[..., list[TestDomain]]]:
    bridges: list[str] = []
    made: list[TestDomain] = []

    def make(count: int, **keys: Any) -> list[TestDomain]:
        n = next(_subnets)
        bridge, prefix = f"hyptb{os.getpid() % 1000}x{n}", f"10.{200 + n // 250}.{n % 250}"
        bridges.append(bridge)
        domains = []
        for host in range(2, 2 + count):
            ip = f"{prefix}.{host}"
            domain = hyper_domain(vif=[{"bridge": bridge, "ip": f"{ip}/24"}], **keys)
            domain.ip = ip
            domains.append(domain)
        made.extend(domains)
        return domains

    yield make
    # Its domains first (hyper_domain's own teardown comes after ours), then the bridges dom0
    # made for them, with the firewall rule that let their frames through.
    _destroy(made)
    for bridge in bridges:
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
        firewall.revoke(bridge)


def _destroy(domains: list[TestDomain]) -> None:
    for domain in domains:
        with contextlib.suppress(HyperError):
            domain.destroy()


def made_domains(item: pytest.Item) -> list[api.Domain]:
    """The domains the fixtures made for test ``item`` (their logs go in its failed report)."""
    return item.stash.get(_REPORTED, [])


def reports_hypervisor_logs(item: pytest.Item) -> bool:
    """Whether a failed report of ``item`` carries hyperd's and dom0's logs: it used ``hyper``."""
    return "hyper" in getattr(item, "fixturenames", ())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pluggy.Result[pytest.TestReport], None]:
    outcome = yield
    report = outcome.get_result()
    if not report.failed or not reports_hypervisor_logs(item):
        return
    run = api.run_dir()
    for name in ("hyperd", "dom0"):
        log = run.log(name)
        with contextlib.suppress(OSError):
            lines = log.read_text(errors="replace").splitlines()[-40:]
            report.sections.append((f"hyper: {name}'s log ({log})", "\n".join(lines)))
    for domain in made_domains(item):
        log = run.log(f"dom{domain.domid}")
        with contextlib.suppress(OSError):
            lines = log.read_text(errors="replace").splitlines()[-60:]
            report.sections.append((f"hyper: {domain.name}'s log ({log})", "\n".join(lines)))
        with contextlib.suppress(HyperError, OSError):
            console = domain.console_output(wait=0.2).decode(errors="replace")
            if console.strip():
                report.sections.append((f"hyper: {domain.name}'s console", console[-4000:]))

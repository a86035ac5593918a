"""The store in a stub domain of its own (issue 15): ``hyperctl start --store-domain``.

The store then runs in the domain ``Xenstore``, unprivileged on the host like any domU; dom0's
toolstack is one of its clients over a ring. Killing the store domain is survived as a dom0
restart is: its tree is kept, clients reconnect and resend, their watches registered again;
dom0 keeps working while the store is away, and the store keeps its data while dom0 restarts.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import (
    RUN,
    domain_info,
    hyperctl,
    hypervisor_of_its_own,
    kill_hyperd,
    wait_for,
)
from tests.integration.test_faults import dom0_pid, kill_dom0

pytestmark = pytest.mark.root

_names = itertools.count(1)


@pytest.fixture(scope="module")
def store_domain() -> Iterator[None]:
    """A hypervisor whose store runs in the Xenstore domain, for this module."""
    with hypervisor_of_its_own(args=["--store-domain"]):
        yield


@pytest.fixture
def guest(store_domain: None, tmp_path: Path) -> Iterator[Callable[[], str]]:
    """Creates idle guests, destroyed at the end."""
    made: list[str] = []

    def make() -> str:
        name = f"sd{next(_names)}"
        config = tmp_path / f"{name}.yaml"
        config.write_text(f"name: {name}\non_crash: destroy\n")
        made.append(name)
        hyperctl("create", str(config))
        return name

    yield make
    for name in made:
        if domain_info(name) is not None:
            hyperctl("destroy", name, check=False)


def the_domain(name: str) -> dict[str, Any]:
    info = domain_info(name)
    assert info is not None, f"no domain {name}"
    return info


def the_store_domain() -> dict[str, Any]:
    return the_domain("Xenstore")


def domid(name: str) -> int:
    info = domain_info(name)
    assert info is not None, f"no domain {name}"
    return int(info["domid"])


def store_tree() -> list[str]:
    """Every node of the store, with its value and permissions, as dom0 sees it."""
    return hyperctl("store", "ls", "/").out.splitlines()


def kill_the_store_domain() -> int:
    """SIGKILL the store domain's kernel; returns once a new one serves (its old pid)."""
    first = the_store_domain()
    os.kill(first["pid"], signal.SIGKILL)
    wait_for(
        lambda: (
            (info := domain_info("Xenstore")) is not None
            and info["pid"] not in (None, first["pid"])
            and info["status"] == "running"
        ),
        30,
        "the store domain to be running again",
    )
    return int(first["pid"])


def host_uid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:")))


def test_the_store_runs_in_its_own_unprivileged_domain(guest: Callable[[], str]) -> None:
    name = guest()
    store = the_store_domain()
    assert store["domid"] != 0 and store["status"] == "running"
    assert host_uid(store["pid"]) != 0, "the store domain runs as host root"
    # Its tree is kept in its own directory, which the store domain's kernel owns.
    state = RUN.root / "xenstored"
    assert state.stat().st_uid == host_uid(store["pid"])
    assert any(state.iterdir()), "no journal in the store domain's directory"
    listing = hyperctl("store", "ls", "/local/domain").out
    assert f'/local/domain/{domid(name)}/name = "{name}"' in listing
    for ask in (["destroy"], ["shutdown"], ["console"], ["exec"], ["block-list"]):
        refused = hyperctl(
            *ask, "Xenstore", *(["--", "true"] if ask == ["exec"] else []), check=False
        )
        assert refused.status != 0 and "store" in refused.err, (ask, refused)
    assert the_store_domain()["pid"] == store["pid"]


def test_guests_survive_a_killed_store_domain_and_its_tree_is_kept(
    guest: Callable[[], str],
) -> None:
    """The guest's kernel watches control/shutdown from its boot on: that watch, registered
    before the kill, must fire after it for the shutdown to happen."""
    name = guest()
    home = f"/local/domain/{domid(name)}"
    hyperctl("store", "write", f"{home}/data/before", "kept")
    before = store_tree()

    dom0 = dom0_pid()
    kill_the_store_domain()

    assert dom0_pid() == dom0, "dom0 restarted with the store"
    assert store_tree() == before, "the store lost or changed nodes across its restart"
    hyperctl("store", "write", f"{home}/data/after", "written")
    assert hyperctl("store", "read", f"{home}/data/after").out.strip() == "written"
    assert hyperctl("exec", name, "--", "true").status == 0
    hyperctl("shutdown", "-w", name)
    assert domain_info(name) is None
    # Domains come and go through the new store as through the first.
    again = guest()
    assert hyperctl("exec", again, "--", "true").status == 0
    hyperctl("destroy", again)
    assert domain_info(again) is None


def test_dom0_works_on_while_the_store_is_away(guest: Callable[[], str]) -> None:
    """The store domain paused stands for one that is dead: dom0 answers what needs no store."""
    name = guest()
    dom0 = dom0_pid()
    hyperctl("pause", "Xenstore")
    try:
        assert hyperctl("exec", name, "--", "echo", "up").out.strip() == "up"
        listing = json.loads(hyperctl("list", "--json").out)
        assert {d["name"] for d in listing} >= {"Domain-0", "Xenstore", name}
    finally:
        hyperctl("unpause", "Xenstore")
    assert dom0_pid() == dom0, "dom0 restarted while the store was away"
    assert hyperctl("store", "read", f"/local/domain/{domid(name)}/name").out.strip() == name
    hyperctl("shutdown", "-w", name)


def test_the_store_keeps_its_data_while_dom0_restarts(guest: Callable[[], str]) -> None:
    name = guest()
    home = f"/local/domain/{domid(name)}"
    hyperctl("store", "write", f"{home}/data/across", "dom0's death")
    store = the_store_domain()["pid"]
    before = store_tree()

    old, _ = kill_dom0()
    wait_for(lambda: dom0_pid() not in (None, old), 30, "dom0 to serve again")

    assert the_store_domain()["pid"] == store, "the store domain restarted with dom0"
    assert store_tree() == before
    hyperctl("store", "write", f"{home}/data/later", "1")
    hyperctl("shutdown", "-w", name)
    assert domain_info(name) is None


def test_a_restarted_hyperd_adopts_the_store_domain_and_restarts_it_when_it_dies(
    guest: Callable[[], str],
) -> None:
    name = guest()
    store = the_store_domain()["pid"]

    kill_hyperd()
    hyperctl("start")

    assert the_store_domain()["pid"] == store, "the adopting hyperd replaced the store domain"
    kill_the_store_domain()
    hyperctl("store", "write", f"/local/domain/{domid(name)}/data/adopted", "1")
    hyperctl("shutdown", "-w", name)
    assert domain_info(name) is None


def store_relays() -> int:
    """The relay processes the store domain runs (one per domain whose store ring it serves)."""
    group = f"dom{the_store_domain()['domid']}"
    count = 0
    for proc in Path("/proc").iterdir():
        try:
            if (proc / "comm").read_text().strip() != "hyper-relay":
                continue
            if f"/{group}\n" in (proc / "cgroup").read_text() + "\n":
                count += 1
        except OSError:
            continue
    return count


def test_a_domain_that_dies_as_dom0_dies_leaves_the_store(guest: Callable[[], str]) -> None:
    """Whether its end reaches the restarted dom0 as an event or, dropped with the dead dom0's
    events, through the restarted dom0's recovery, the store releases it: its relay stops, and
    its nodes go. (Which of the two happens is not in the test's hands.)"""
    keep, doomed = guest(), guest()
    doomed_id, doomed_pid = domid(doomed), the_domain(doomed)["pid"]
    assert store_relays() == 3  # dom0's and the two guests'

    old, _ = kill_dom0()
    os.kill(doomed_pid, signal.SIGKILL)  # on_crash: destroy
    wait_for(lambda: dom0_pid() not in (None, old), 30, "dom0 to serve again")

    wait_for(lambda: domain_info(doomed) is None, 30, "the dead domain to be gone")
    wait_for(lambda: store_relays() == 2, 30, "the store to stop serving the dead domain's ring")
    assert not any(f"/local/domain/{doomed_id}/" in line for line in store_tree())
    assert hyperctl("exec", keep, "--", "true").status == 0

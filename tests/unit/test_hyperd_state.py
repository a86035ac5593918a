"""What a restarted hyperd re-adopts from: its tables through the state file, and its hypercall
sockets through the fd keeper (hyperd/state.py, hyperd/keeper.py). No root needed: the tables
name objects they never create here, and the keeper runs as whoever runs the tests."""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from channels.config import Action, DomainConfig
from channels.forkserver import Child, Spawner
from channels.paths import RunDir
from hyperd import adopt, keeper, state
from hyperd.cgroup import CgroupFs, DomainGroup, V2Group
from hyperd.devlinks import DeviceLinks
from hyperd.domain import Domain, RingInfo, Status, dom0_config
from hyperd.evtchn import EventChannels
from hyperd.gnttab import GrantTables
from hyperd.hypercalls import Descriptors
from hyperd.hypervisor import DmesgHandler, Hypervisor, refuse_state
from hyperd.keeper import KeeperClient
from hyperd.resources import Resources
from tests.unit.backend_hypercalls import PaperResources

TIMEOUT = 10.0


def request(op: str, **args: object) -> bytes:
    return json.dumps({"id": 1, "op": op, "args": args}).encode()


class GroupsOnPaper:
    """The one Hierarchy method re-adoption uses: open an existing group by name."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.opened: list[str] = []

    def open(self, name: str) -> DomainGroup:
        self.opened.append(name)
        return V2Group(name, {"cpu": self.root / name}, CgroupFs())


WEB = DomainConfig(name="web", memory=128, on_crash=Action.RESTART)


def hypervisor(tmp_path: Path) -> Hypervisor:
    run = RunDir(tmp_path / "run", tmp_path / "logs")
    run.root.mkdir(exist_ok=True)
    return Hypervisor(run, GroupsOnPaper(tmp_path / "cg"), DmesgHandler())  # type: ignore[arg-type]


def populate(hv: Hypervisor, tmp_path: Path) -> None:
    """dom0 and dom3, as hyperd builds them: a store ring with its channel, a vif's channel
    and grant pool; then dom0 dies, so its ports are stale, waiting for the next dom0."""
    group = V2Group("dom3", {"cpu": tmp_path / "cg" / "dom3"}, CgroupFs())
    dom0 = Domain(0, "Domain-0", dom0_config(4096, 2), PaperResources(0), status=Status.RUNNING)
    dom3 = Domain(3, "web", WEB, PaperResources(3))
    dom3.cgroup, dom3.status, dom3.pid, dom3.pid_start = group, Status.RUNNING, 4242, 987654
    dom3.shutdown_reason = None
    segment = dom3.resources.new_segment("store", 4096, 0)
    evtchn, gnttab = hv.evtchn, hv.gnttab
    store_domu = evtchn.alloc_unbound(3, 0, dom3.resources)
    store_dom0 = evtchn.bind_interdomain(0, 3, store_domu.port, dom3.resources)
    dom3.store = RingInfo(segment, store_domu.port, store_dom0.port)
    vif_domu = evtchn.alloc_unbound(3, 0, dom3.resources)
    evtchn.bind_interdomain(0, 3, vif_domu.port, dom3.resources)
    evtchn.alloc_unbound(3, 0, dom3.resources)  # still unbound
    gnttab.setup_pool(3, 0, "vif/0", 16, dom3.resources)
    # dom3's second vif is served by a driver domain, dom4 (hyperd/devlinks.py).
    hv.links.link(3, 4, "vif/1")
    evtchn.alloc_unbound(3, 4, dom3.resources)
    gnttab.setup_pool(3, 4, "vif/1", 8, dom3.resources)
    evtchn.orphan(0)
    hv.domains = {0: dom0, 3: dom3}
    hv.last_domid, hv.dom0_restarts = 3, 1


def through_the_file(hv: Hypervisor, tmp_path: Path) -> Hypervisor:
    state.write(hv.run.state_file, state.encode(hv.snapshot()))
    saved = state.read(hv.run.state_file)
    assert saved is not None
    restored = hypervisor(tmp_path)
    restored.load(saved)
    return restored


# -- the tables through the state file -----------------------------------------------------------


def test_the_tables_come_back_from_the_state_file_as_they_were(tmp_path: Path) -> None:
    before = hypervisor(tmp_path)
    populate(before, tmp_path)
    after = through_the_file(before, tmp_path)

    assert after.snapshot() == before.snapshot()
    dom3 = after.domains[3]
    assert (dom3.name, dom3.status, dom3.pid, dom3.pid_start) == (
        "web",
        Status.RUNNING,
        4242,
        987654,
    )
    assert dom3.config == WEB
    assert dom3.store == before.domains[3].store
    assert dom3.resources.segments == before.domains[3].resources.segments
    assert dom3.resources.doorbells == before.domains[3].resources.doorbells
    assert dom3.cgroup is not None and dom3.cgroup.name == "dom3"
    assert after.cgroups.opened == ["dom3"]  # type: ignore[attr-defined]
    assert (after.last_domid, after.dom0_restarts) == (3, 1)


def test_restored_ports_belong_to_their_domain_and_stay_bound(tmp_path: Path) -> None:
    before = hypervisor(tmp_path)
    populate(before, tmp_path)
    after = through_the_file(before, tmp_path)
    dom3 = after.domains[3]
    assert dom3.store is not None

    store = after.evtchn.get(3, dom3.store.domu_port)
    assert store.owner is dom3.resources  # its doorbell dies with dom3, not with a copy
    peer = after.evtchn.get(0, dom3.store.dom0_port)
    assert (peer.remote_dom, peer.remote_port, peer.stale) == (3, store.port, True)
    assert after.evtchn.peer_doorbell(store) == peer.doorbell
    # The next dom0 binding the frontend's port gets the stale one back, as before the restart.
    rebound = after.evtchn.bind_interdomain(0, 3, store.port, dom3.resources)
    assert rebound is peer and not rebound.stale


def test_restored_tables_go_on_numbering_where_they_stopped(tmp_path: Path) -> None:
    before = hypervisor(tmp_path)
    populate(before, tmp_path)
    after = through_the_file(before, tmp_path)
    paper = PaperResources(3)

    last_port = max(p.port for p in before.evtchn.ports_of(3))
    assert after.evtchn.alloc_unbound(3, 0, paper).port == last_port + 1
    old_pool = before.gnttab.pools_of(3)[-1]
    new_pool = after.gnttab.setup_pool(3, 0, "vif/0", 1, paper)
    assert new_pool.pool == old_pool.pool + 1
    assert new_pool.gref_base == old_pool.gref_base + old_pool.pages


def test_restored_grants_are_still_checked(tmp_path: Path) -> None:
    before = hypervisor(tmp_path)
    populate(before, tmp_path)
    after = through_the_file(before, tmp_path)
    pool = after.gnttab.pools_of(3)[0]

    assert after.gnttab.pools_for(0, 3, "vif/0") == [pool]
    assert after.gnttab.pools_for(0, 3, "vbd/51712") == [], "for the vif, not the vbd"
    assert after.gnttab.pools_for(5, 3, "vif/0") == [], "granted to dom0, not to 5"
    assert after.gnttab.pools_for(4, 3, "vif/1") == after.gnttab.pools_of(3)[1:]
    assert after.links.serves(4, 3, "vif/1") and not after.links.serves(4, 3, "vif/0")


def test_only_a_hypercall_that_changes_the_tables_rewrites_the_state_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A domain calling evtchn_status in a loop must not cost hyperd an encode of every table
    per call."""
    hv = hypervisor(tmp_path)
    populate(hv, tmp_path)
    hv._commit()
    encodes: list[int] = []
    real_encode = state.encode

    def counted(tables: dict[str, Any]) -> bytes:
        encodes.append(1)
        return real_encode(tables)

    monkeypatch.setattr(state, "encode", counted)
    dom3 = hv.domains[3]
    port = dom3.store.domu_port if dom3.store else 0

    for _ in range(100):
        reply, read_only = hv._answer(dom3, request("evtchn_status", port=port), Descriptors())
        assert reply["ok"] and read_only, reply
        hv._commit()
    assert encodes == []

    reply, read_only = hv._answer(
        dom3, request("evtchn_alloc_unbound", remote_dom=0), Descriptors()
    )
    hv._commit()
    assert reply["ok"] and not read_only and encodes == [1]
    assert str(reply["result"]["port"]) in hv.run.state_file.read_text()


def test_a_destruction_is_in_the_state_file_before_anything_is_torn_down(tmp_path: Path) -> None:
    """A hyperd killed half way through a destroy finishes it on adoption, rather than taking
    the domain's end for a crash and applying on_crash (dom3's is restart)."""
    hv = hypervisor(tmp_path)
    populate(hv, tmp_path)
    hv._commit()
    seen: list[str] = []

    def release(domain: Domain) -> None:
        saved = state.read(hv.run.state_file)
        assert saved is not None
        seen.extend(d["status"] for d in saved["domains"] if d["domid"] == domain.domid)

    hv.release = release  # type: ignore[method-assign]
    hv.destroy(hv.domains[3])
    assert seen == [Status.DYING.value]


def test_a_halt_that_had_begun_is_finished_by_the_next_hyperd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No on_crash (dom3's is restart) and no new dom0: everything the halt had not yet
    stopped is destroyed at adoption."""
    before = hypervisor(tmp_path)
    populate(before, tmp_path)
    assert not through_the_file(before, tmp_path).halt_requested
    before.halting = True
    after = through_the_file(before, tmp_path)
    released: list[Domain] = []
    monkeypatch.setattr(adopt, "reconcile", lambda domains, cgroups: None)  # (it scans /dev/shm)
    after.release = lambda domain: released.append(domain)  # type: ignore[method-assign]

    adopt.adopt_all(after, {})  # dom3's process (pid 4242 of another start time) is gone
    after._commit()

    assert [d.domid for d in released] == [3]
    assert after.domains == {}
    saved = state.read(after.run.state_file)
    assert saved is not None and saved["halting"] is True and saved["domains"] == []


class Stragglers:
    """dom0's cgroup on paper, holding processes the dead dom0 left until the test lets them
    die; it counts the SIGKILL rounds hyperd sends."""

    name = "dom0"

    def __init__(self, *pids: int) -> None:
        self.members = list(pids)
        self.kills = 0

    def kill(self) -> bool:
        self.kills += 1
        return bool(self.members)

    def pids(self) -> list[int]:
        return list(self.members)


def minutes_later(n: int) -> float:
    """A time when any restart hyperd scheduled before is due (its clock is time.monotonic)."""
    return time.monotonic() + 60.0 * n


def dead_dom0(hv: Hypervisor, group: Stragglers) -> list[str]:
    """hyperd with a dom0 that has died, in ``group``; the list its dom0 start appends to."""
    dom0 = Domain(0, "Domain-0", dom0_config(4096, 2), PaperResources(0), status=Status.RUNNING)
    dom0.cgroup = group  # type: ignore[assignment]
    hv.domains = {0: dom0}
    started: list[str] = []
    hv.dom0_lifecycle.start = lambda: started.append("dom0")  # type: ignore[method-assign]
    return started


def test_a_dead_dom0_is_restarted_only_once_every_process_it_left_is_gone(tmp_path: Path) -> None:
    """A blkback worker of the dead dom0 still writing to the old loop device must not land
    its write after the new dom0 acknowledged a newer one: nothing of the old dom0 may run
    when the new one starts."""
    hv = hypervisor(tmp_path)
    group = Stragglers(4243, 4244)  # two workers, stopped or in the middle of a write
    started = dead_dom0(hv, group)

    hv.dom0_lifecycle.on_death(9)
    assert started == [] and group.kills == 1, "killed at once, and the restart waits"
    assert not hv.dom0_lifecycle.restart_when_due(minutes_later(1))
    assert started == [] and group.kills == 2, "killed again at each look"

    group.members = []
    assert hv.dom0_lifecycle.restart_when_due(minutes_later(2)) and started == ["dom0"]
    assert not hv.dom0_lifecycle.restart_when_due(minutes_later(3)), "and only once"


def test_a_dom0_found_dead_at_re_adoption_is_restarted_once_its_processes_are_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hv = hypervisor(tmp_path)
    group = Stragglers(4243)
    started = dead_dom0(hv, group)
    monkeypatch.setattr(adopt, "reconcile", lambda domains, cgroups: None)  # (it scans /dev/shm)

    adopt.adopt_all(hv, {})  # dom0's pid is None: it died while no hyperd ran
    assert started == [] and group.kills == 1
    assert not hv.dom0_lifecycle.restart_when_due(minutes_later(1))
    assert started == [] and group.kills == 2

    group.members = []
    assert hv.dom0_lifecycle.restart_when_due(minutes_later(2)) and started == ["dom0"]


def test_each_table_round_trips_on_its_own(tmp_path: Path) -> None:
    hv = hypervisor(tmp_path)
    populate(hv, tmp_path)
    owners = {domid: d.resources for domid, d in hv.domains.items()}

    evtchn = EventChannels.from_dict(hv.evtchn.to_dict(), owners)
    assert evtchn.to_dict() == hv.evtchn.to_dict()
    assert GrantTables.from_dict(hv.gnttab.to_dict()).to_dict() == hv.gnttab.to_dict()
    resources = hv.domains[3].resources
    assert len(resources.peers) == 2, "the pool and the doorbell dom4 opens too"
    assert Resources.from_dict(resources.to_dict()) == Resources(
        3, resources.segments, resources.doorbells, resources.peers
    )
    assert DeviceLinks.from_dict(hv.links.to_dict()).to_dict() == hv.links.to_dict()
    assert hv.links.serves(4, 3, "vif/1")


# -- a missing, torn or foreign state file -------------------------------------------------------


def test_no_state_file_is_a_first_start(tmp_path: Path) -> None:
    assert state.read(tmp_path / "hyperd.state") is None


def test_a_torn_state_file_is_refused_naming_it(tmp_path: Path) -> None:
    hv = hypervisor(tmp_path)
    populate(hv, tmp_path)
    data = state.encode(hv.snapshot())
    path = hv.run.state_file
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(state.StateError, match=r"hyperd\.state: not JSON"):
        state.read(path)


@pytest.mark.parametrize(
    ("content", "fault"),
    [
        (b"[]", "not a JSON object"),
        (b'{"version": 99}', "version 99"),
        (b'{"version": %d, "domains": []}' % state.VERSION, "no last_domid"),
    ],
)
def test_a_state_file_that_is_not_hyperds_is_refused(
    tmp_path: Path, content: bytes, fault: str
) -> None:
    path = tmp_path / "hyperd.state"
    path.write_bytes(content)
    with pytest.raises(state.StateError, match=fault):
        state.read(path)


def test_a_state_file_from_before_per_device_pools_is_refused_naming_its_version(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Version 1 was hyperd's before grant pools named their device. A hyperd upgraded while
    such domains run says which version it found and what to do, not "KeyError: 'device'"."""
    hv = hypervisor(tmp_path)
    populate(hv, tmp_path)
    tables = hv.snapshot()
    for pool in tables["gnttab"]["pools"]:
        del pool["device"]
    path = hv.run.state_file
    path.write_text(json.dumps({"version": 1, **tables}))

    with pytest.raises(state.StateError) as refused:
        state.read(path)
    assert str(refused.value).startswith(
        f"{path}: version 1, this hyperd reads version {state.VERSION}: "
    )
    assert "`hyperctl halt`" in str(refused.value)
    with caplog.at_level(logging.ERROR, logger="hyperd.hypervisor"):
        assert refuse_state(refused.value) == 1
    assert "`hyperctl cleanup` ends the domains it describes" in caplog.text


def test_tables_that_do_not_hold_together_are_refused(tmp_path: Path) -> None:
    hv = hypervisor(tmp_path)
    populate(hv, tmp_path)
    saved = hv.snapshot()
    saved["domains"] = [d for d in saved["domains"] if d["domid"] != 3]  # its ports remain

    with pytest.raises(state.StateError, match="KeyError"):
        hypervisor(tmp_path).load(saved)


def test_a_write_replaces_the_file_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "hyperd.state"
    state.write(path, b"old")
    state.write(path, b"new")

    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["hyperd.state"]
    assert path.stat().st_mode & 0o777 == 0o600


# -- the fd keeper -------------------------------------------------------------------------------


@pytest.fixture
def keeper_process(tmp_path: Path) -> Iterator[tuple[Path, Child]]:
    path = tmp_path / "keeper.sock"
    spawner = Spawner(["hyperd.keeper"])
    process = keeper.start(path, spawner, tmp_path / "keeper.log")
    yield path, process
    if process.poll() is None:
        process.kill()
    process.wait(TIMEOUT)
    spawner.close()


def kept_domain(client: KeeperClient, name: str) -> socket.socket:
    """A new hypercall socket whose hyperd end only the keeper holds (as ``name``); the
    domain's end."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.settimeout(TIMEOUT)
    client.put(name, ours.fileno())
    ours.close()
    return theirs


def test_a_new_client_gets_back_the_socket_a_dead_one_handed_over(
    keeper_process: tuple[Path, Child],
) -> None:
    path, _ = keeper_process
    first = KeeperClient.connect(path)
    domain = kept_domain(first, "hc.7")
    first.close()  # hyperd killed: only the keeper still holds our end

    domain.send(b"a call made while no hyperd runs")
    second = KeeperClient.connect(path)
    back = second.fetch()
    second.close()

    assert list(back) == ["hc.7"]
    kept = back["hc.7"]
    kept.settimeout(TIMEOUT)
    assert kept.recv(100) == b"a call made while no hyperd runs"
    kept.send(b"the answer")
    assert domain.recv(100) == b"the answer"
    kept.close()
    domain.close()


def test_a_dropped_socket_is_closed_so_the_domain_sees_the_end(
    keeper_process: tuple[Path, Child],
) -> None:
    path, _ = keeper_process
    client = KeeperClient.connect(path)
    domain = kept_domain(client, "hc.3")

    client.drop("hc.3")

    assert domain.recv(100) == b""  # EOF: nobody holds hyperd's end any more
    assert client.fetch() == {}
    client.close()
    domain.close()


def test_a_hand_over_larger_than_one_message_arrives_whole(
    keeper_process: tuple[Path, Child],
) -> None:
    path, _ = keeper_process
    client = KeeperClient.connect(path)
    domains = [kept_domain(client, f"hc.{domid}") for domid in range(keeper.GET_BATCH + 50)]

    back = client.fetch()

    assert sorted(back) == sorted(f"hc.{d}" for d in range(keeper.GET_BATCH + 50))
    back["hc.230"].send(b"ping")
    assert domains[230].recv(10) == b"ping"
    for sock in [*back.values(), *domains]:
        sock.close()
    client.close()


def test_the_keeper_waits_for_a_hyperd_while_a_domain_lives_and_then_leaves(
    keeper_process: tuple[Path, Child],
) -> None:
    path, process = keeper_process
    client = KeeperClient.connect(path)
    domain = kept_domain(client, "hc.1")
    client.close()

    KeeperClient.connect(path).close()  # still there for the next hyperd
    domain.close()  # the last domain dies while no hyperd runs: nothing is left to keep

    assert process.wait(TIMEOUT) == 0
    assert not path.exists()


def test_exit_stops_the_keeper(keeper_process: tuple[Path, Child]) -> None:
    path, process = keeper_process
    client = KeeperClient.connect(path)
    domain = kept_domain(client, "hc.1")

    client.exit()

    assert process.wait(TIMEOUT) == 0
    assert domain.recv(100) == b""
    assert keeper.stop(path) is None  # nothing answers any more
    domain.close()


def test_stop_ends_a_keeper_left_by_a_killed_hyperd(
    keeper_process: tuple[Path, Child],
) -> None:
    path, process = keeper_process
    client = KeeperClient.connect(path)
    domain = kept_domain(client, "hc.0")
    client.close()

    assert keeper.stop(path) == process.pid
    assert process.wait(TIMEOUT) == 0
    domain.close()

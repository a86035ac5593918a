"""dom0's side of a backend device's worker process: what a worker can ask dom0 for, and what
it holds.

The worker maps the frontend's pages and parses what the frontend writes there, so it may be
subverted; dom0 holds the hypercall socket. Whatever the worker's request names, dom0 answers
with the grant pools of the device it started that worker for, at a bounded rate; a line that
is no request fails that device (tests/unit/subverted_worker.py plays the worker). A setup the
frontend broke fails the device at once, saying why (the real workers, over fake pools). The
worker serves with no privilege, mapping what dom0 opened for it, never a name
(tests/unit/mapping_worker.py), and what it shares with dom0 cannot be turned against dom0."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backends import datapath_worker
from backends.datapath_worker import MAX_LINE, SCM_MAX_FD, DataPath, WorkerProcess
from backends.host import BackendHost
from channels import blkif as B
from channels import credit, grants
from channels import hypercall as hc
from channels import netif as N
from channels.doorbell import create_doorbell, unlink_doorbell
from channels.forkserver import Spawner
from channels.gnttab import GrantPool, pool_bytes
from channels.grants import REFRESH_BURST, REFRESHES_PER_SECOND
from channels.ids import host_gid
from channels.shm import create_segment, unlink_segment
from channels.xenbus import XenbusState
from dom0 import spawn
from tests.unit import mapping_worker, subverted_worker
from tests.unit.test_gnttab import Clock, Granter
from tests.unit.test_store_connection import wait_until

TIMEOUT = 30.0


#: The fork server this module's workers come from, while its tests run.
_workers: list[Spawner] = []


@pytest.fixture(autouse=True, scope="module")
def workers_spawner() -> Iterator[None]:
    """dom0's fork server, with this module's stand-in workers among what it preloads (a fork
    server runs nothing it did not import first); closed with the module."""
    spawner = Spawner([*spawn.PRELOAD, "tests.unit.subverted_worker", "tests.unit.mapping_worker"])
    _workers.append(spawner)
    yield
    _workers.clear()
    spawner.close()


def pool(name: str, pages: int) -> dict[str, Any]:
    return {"pool": 0, "name": name, "gref_base": 8, "pages": pages}


class Hyperd:
    """hyperd as dom0's hypercall client sees it: the pools it is given for any device (by
    default one page, named after the device asked for), every question kept."""

    def __init__(self, pools: list[dict[str, Any]] | None = None, max_pages: int = 1) -> None:
        self.pools = pools
        self.max_pages = max_pages
        self.asked: list[tuple[int, str | None]] = []

    def call(self, op: hc.Op) -> dict[str, Any]:
        assert isinstance(op, hc.GnttabMapPools), op
        device = getattr(op, "device", None)  # None: asked for every device (before issue 12)
        self.asked.append((op.granter, device))
        pools = self.pools or [pool(f"pool of {device} of {op.granter}", 1)]
        return {"pools": pools, "max_pages": self.max_pages}


class Device:
    """A backend device of domain 5 as DataPath sees it, keeping what it is told: a fatal
    error, or a new state (a restart through the frontend)."""

    frontend_id = 5

    def __init__(self, name: str = "vif/0", state: XenbusState = XenbusState.Connected) -> None:
        self.device_name = name
        self.state = state
        self.told: list[str] = []
        self.changed = threading.Event()

    def fatal(self, message: str) -> None:
        self.told.append(f"fatal: {message}")
        self.state = XenbusState.Closing
        self.changed.set()

    def switch_state(self, state: XenbusState) -> None:
        self.told.append(f"state: {state.name}")
        self.state = state
        self.changed.set()


@contextlib.contextmanager
def running(
    module: str, params: dict[str, Any], hyperd: Hyperd, dev: Device
) -> Iterator[WorkerProcess]:
    """``module`` started as the data path of ``dev`` (named vif5.0 in messages): its worker."""
    path = DataPath(())
    device_fd = os.open(os.devnull, os.O_RDONLY)
    host = BackendHost(hyperd, _workers[0])  # type: ignore[arg-type]
    try:
        path.start(module, params, device_fd, host, dev, "vif5.0")  # type: ignore[arg-type]
        assert path.worker is not None
        yield path.worker
    finally:
        path.stop()
        os.close(device_fd)


def ended(worker: WorkerProcess) -> int:
    """The worker's exit status, once dom0's link to it is done with it too."""
    code = worker.process.wait(TIMEOUT)
    worker._thread.join(TIMEOUT)
    return code


def attack(tmp_path: Path, name: str, **params: object) -> dict[str, object]:
    """Parameters that have tests/unit/subverted_worker.py play ``name``."""
    return {"attack": name, "answer": str(tmp_path / "answer"), **params}


def answer(tmp_path: Path) -> Any:
    return json.loads((tmp_path / "answer").read_text())


# -- what dom0 answers a worker -----------------------------------------------------------------


def test_a_worker_hears_of_its_own_devices_pools_whatever_it_asks(tmp_path: Path) -> None:
    hyperd = Hyperd()
    dev = Device(state=XenbusState.Closed)  # its worker's death restarts nothing
    with running(
        "tests.unit.subverted_worker", attack(tmp_path, "ask_other"), hyperd, dev
    ) as worker:
        assert ended(worker) == 0, "the worker ran to its end"
    told = answer(tmp_path)
    assert (subverted_worker.ASKED_GRANTER, subverted_worker.ASKED_DEVICE) not in hyperd.asked
    assert hyperd.asked == [(5, "vif/0"), (5, "vif/0")], "as it started, then as it asked"
    assert told["params"]["frontend"] == 5 and told["params"]["device"] == "vif/0"
    assert told["params"]["pools"]["pools"][0]["name"] == "pool of vif/0 of 5"
    assert told["answer"]["result"]["pools"][0]["name"] == "pool of vif/0 of 5"


def test_a_worker_asking_in_a_loop_is_answered_at_an_honest_mappers_pace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each answer is a hypercall on dom0's socket, which hyperd does not charge: past a burst,
    dom0 answers a worker's refreshes no faster than an honest grant mapper makes them."""
    clock = Clock()
    monkeypatch.setattr(credit, "time", clock)
    monkeypatch.setattr(datapath_worker, "time", clock)
    hyperd = Hyperd()
    dev = Device(state=XenbusState.Closed)
    count = REFRESH_BURST + 10
    flood = attack(tmp_path, "flood", count=count)
    with running("tests.unit.subverted_worker", flood, hyperd, dev) as worker:
        assert ended(worker) == 0, "the worker ran to its end"
    replies = answer(tmp_path)["answer"]
    assert [reply["id"] for reply in replies if "result" in reply] == list(range(count))
    assert len(hyperd.asked) == 1 + count
    assert clock.slept == pytest.approx(10 / REFRESHES_PER_SECOND)


@pytest.mark.parametrize(
    "raw",
    [
        '"a JSON string"\n',
        "[1, 2]\n",
        "{not json\n",
        "x" * (MAX_LINE + 1),
        '{"id": 1, "unmap": {}}\n',
        '{"map_pools": {}}\n',
    ],
    ids=["string", "list", "not-json", "endless-line", "unknown-request", "no-id"],
)
def test_a_line_that_is_no_request_fails_the_device_and_dom0_hangs_up(
    tmp_path: Path, raw: str
) -> None:
    dev = Device()
    with running(
        "tests.unit.subverted_worker", attack(tmp_path, "send", raw=raw), Hyperd(), dev
    ) as worker:
        assert dev.changed.wait(TIMEOUT), "dom0 must fail the device"
        assert ended(worker) == 0
    assert len(dev.told) == 1, dev.told  # and no restart after it
    assert dev.told[0].startswith("fatal: vif5.0: the data path broke its link to dom0: ")
    assert answer(tmp_path)["answer"] == {"hung_up": True, "received": ""}


def test_a_worker_reporting_fatal_errors_in_a_loop_is_heard_once(tmp_path: Path) -> None:
    dev = Device()
    raw = '{"fatal": "the frontend lied"}\n' * 1000
    with running(
        "tests.unit.subverted_worker", attack(tmp_path, "send", raw=raw), Hyperd(), dev
    ) as worker:
        assert dev.changed.wait(TIMEOUT), "dom0 must fail the device"
        assert ended(worker) == 0
    assert dev.told == ["fatal: vif5.0: the frontend lied"]
    assert answer(tmp_path)["answer"]["hung_up"]


# -- a setup the frontend broke ------------------------------------------------------------------

WORKERS = pytest.mark.parametrize(
    ("module", "device", "queues", "bound"),
    [
        ("backends.netback.worker", "vif/0", 1, N.MAX_GRANT_PAGES),
        ("backends.netback.worker", "vif/0", 2, 2 * N.MAX_GRANT_PAGES),
        ("backends.blkback.worker", "vbd/51712", 1, B.MAX_GRANT_PAGES),
    ],
    ids=["netback", "netback-2-queues", "blkback"],
)


def ring_params(queues: int, doorbells: list[str]) -> dict[str, object]:
    """What each worker is given of its rings: every ring ref the first gref, every event
    channel ``doorbells``; netback's two rings per queue (its TAP queues are never reached),
    blkback's one ring."""
    queue = {
        "tx_ring_ref": 8,
        "rx_ring_ref": 8,
        "tx_doorbells": doorbells,
        "rx_doorbells": doorbells,
        "tap_fd": -1,
    }
    return {"name": "vif5.0", "queues": [queue] * queues, "ring_ref": 8, "doorbells": doorbells}


@pytest.fixture
def doorbells() -> Iterator[list[str]]:
    """Two doorbells, the names of an event channel's two ends."""
    names = [f"hyper-test-worker-{os.getpid()}-{side}" for side in ("back", "front")]
    for name in names:
        create_doorbell(name)
    yield names
    for name in names:
        unlink_doorbell(name)


@WORKERS
def test_more_pages_than_a_device_can_use_fail_it_at_once_saying_so(
    module: str, device: str, queues: int, bound: int, doorbells: list[str]
) -> None:
    """A frontend that set up more pages for its device than the protocol can use before it
    connected (hyperd checks only the domain's whole budget; a vif can use as many again for
    each queue): the worker refuses to map them as it starts, and the device fails with that
    reason, not restarted as a crashed worker."""
    hyperd = Hyperd([pool("never-opened", bound + 1)], max_pages=1 << 16)
    dev = Device(device)
    with running(module, ring_params(queues, doorbells), hyperd, dev) as worker:
        assert dev.changed.wait(TIMEOUT), "the device must be told"
        ended(worker)
    assert len(dev.told) == 1, dev.told
    assert dev.told[0].startswith(f"fatal: vif5.0: connecting: the pools of {device} of domain 5")
    assert f"map {bound + 1} pages, more than the {bound} its protocol can use" in dev.told[0]


@pytest.fixture
def ungranted_page() -> Iterator[str]:
    """A pool of one page, its entry not granted to anyone."""
    name = f"hyper-test-worker-{os.getpid()}"
    create_segment(name, pool_bytes(1))
    yield name
    unlink_segment(name)


@WORKERS
def test_a_ring_ref_the_frontend_did_not_grant_fails_the_device_at_once(
    module: str, device: str, queues: int, bound: int, ungranted_page: str, doorbells: list[str]
) -> None:
    dev = Device(device)
    params = ring_params(queues, doorbells)
    with running(module, params, Hyperd([pool(ungranted_page, 1)]), dev) as worker:
        assert dev.changed.wait(TIMEOUT), "the device must be told"
        ended(worker)
    assert dev.told == ["fatal: vif5.0: connecting: gref 8 is not granted"]


# -- what a worker holds -------------------------------------------------------------------------


class Dealt(Hyperd):
    """hyperd naming ``answers[n]`` as the pools live at its n-th question (the last one again
    after)."""

    def __init__(self, answers: list[list[GrantPool]]) -> None:
        super().__init__(max_pages=1 << 16)
        self.answers = answers

    def call(self, op: hc.Op) -> dict[str, Any]:
        live = self.answers[min(len(self.asked), len(self.answers) - 1)]
        self.pools = [
            {"pool": i, "name": p.name, "gref_base": p.gref_base, "pages": p.pages}
            for i, p in enumerate(live)
        ]
        return super().call(op)


@pytest.fixture
def granter() -> Iterator[Granter]:
    """Domain 5's pools, every page granted to dom0."""
    domain = Granter(max_pages=1 << 16)
    yield domain
    domain.close()


def written(pool: GrantPool, text: bytes) -> GrantPool:
    """``pool`` with ``text`` at the start of its first page."""
    pool.page(0)[: len(text)] = text
    return pool


def found(worker: WorkerProcess) -> dict[str, int]:
    """What tests/unit/mapping_worker.py read, once it is done (its page has no doorbell)."""
    wait_until(lambda: worker.counter_values(mapping_worker.FIELDS)["done"] == 1, TIMEOUT)
    return worker.counter_values(mapping_worker.FIELDS)


def first_bytes(text: bytes) -> int:
    return int.from_bytes(text[:8].ljust(8, b"\0"), "little")


@pytest.fixture
def names_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each pool's name is unlinked as soon as dom0 has opened it for a worker: the worker can
    reach a pool only through the fd dom0 hands it, as a worker that dropped privilege can
    reach none of the root-owned names in /dev/shm."""
    opened = grants.open_pools

    def open_then_unlink(known: dict[str, Any]) -> dict[str, Any]:
        answer = opened(known)
        for entry in known["pools"]:
            unlink_segment(entry["name"])
        return answer

    monkeypatch.setattr(grants, "open_pools", open_then_unlink)


def test_a_worker_maps_a_pool_set_up_after_it_started_from_the_fd_dom0_sends(
    granter: Granter, names_gone: None
) -> None:
    """A miss refreshes through dom0, which answers with the pools opened: the worker maps
    the new one from its fd, as it did the ones it was started with."""
    first = written(granter.setup(1), b"first")
    later = written(granter.setup(2), b"later")
    hyperd = Dealt([[first], [first, later]])  # as the worker starts, then as it misses
    params = {"grefs": [first.gref_base, later.gref_base], "max_pages": 8}
    with running("tests.unit.mapping_worker", params, hyperd, Device()) as worker:
        values = found(worker)
    assert len(hyperd.asked) == 2, "one refresh, for the ref it was not started with"
    assert values["ref0"] == first_bytes(b"first")
    assert values["ref1"] == first_bytes(b"later")


def test_a_refresh_naming_more_pools_than_one_message_carries_maps_them_all(
    granter: Granter, names_gone: None
) -> None:
    pools = [written(granter.setup(1), b"pool %d" % i) for i in range(SCM_MAX_FD + 7)]
    last = pools[-1]
    params = {"grefs": [last.gref_base], "max_pages": len(pools)}
    with running(
        "tests.unit.mapping_worker", params, Dealt([pools[:1], pools]), Device()
    ) as worker:
        values = found(worker)
    assert values["ref0"] == first_bytes(b"pool %d" % (SCM_MAX_FD + 6))


CAPABILITY_SETS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


def privilege_of(pid: int) -> list[dict[str, str]]:
    """What each thread of process ``pid`` holds, from its /proc status: its ids, supplementary
    groups, capability sets and no-new-privs."""
    threads = []
    for task in sorted(Path(f"/proc/{pid}/task").iterdir()):
        lines = (task / "status").read_text().splitlines()
        status = {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}
        threads.append({k: status[k] for k in ("Uid", "Gid", "Groups", "NoNewPrivs")})
        threads[-1].update({k: status[k] for k in CAPABILITY_SETS})
    return threads


def assert_unprivileged(pid: int, worker_id: int) -> None:
    """Process ``pid`` holds no host privilege: as the uid ``worker_id`` and its domain's gid
    alone (or, if dom0 is no root itself, as its own user), with no capability (no bounding set
    either, when root started it), and no new privileges for it or any program it runs; in
    network and IPC namespaces of its own, when root started it."""
    as_root = os.geteuid() == 0
    uids, gids = (f"{n}\t{n}\t{n}\t{n}" for n in (worker_id, host_gid(Device.frontend_id)))
    for thread in privilege_of(pid):
        if as_root:
            assert (thread["Uid"], thread["Gid"], thread["Groups"]) == (uids, gids, ""), thread
        assert "0" not in thread["Uid"].split(), thread
        sets = CAPABILITY_SETS if as_root else ("CapInh", "CapPrm", "CapEff", "CapAmb")
        assert all(int(thread[name], 16) == 0 for name in sets), thread
        assert thread["NoNewPrivs"] == "1", thread
    if as_root:
        for ns in ("net", "ipc"):
            assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns


def reading(page: GrantPool, device: str) -> contextlib.AbstractContextManager[WorkerProcess]:
    """tests/unit/mapping_worker.py as the worker of ``device``, started with ``page``'s pool
    and reading it."""
    params = {"grefs": [page.gref_base], "max_pages": page.pages}
    return running("tests.unit.mapping_worker", params, Dealt([[page]]), Device(device))


def test_a_worker_serves_with_no_privilege_and_an_id_of_its_own(
    granter: Granter, names_gone: None
) -> None:
    pages = [written(granter.setup(1), b"page %d" % i) for i in range(2)]
    with reading(pages[0], "vif/0") as one, reading(pages[1], "vif/1") as other:
        for i, worker in enumerate((one, other)):
            assert found(worker)["ref0"] == first_bytes(b"page %d" % i)
            assert_unprivileged(worker.process.pid, worker.worker_id)
        assert one.worker_id != other.worker_id


def test_a_worker_cannot_shrink_the_counter_page_dom0_reads(tmp_path: Path) -> None:
    """dom0 maps each worker's counter page and reads it on request: a page a worker could
    truncate would fault dom0 (SIGBUS), not the worker."""
    dev = Device(state=XenbusState.Closed)
    with running(
        "tests.unit.subverted_worker", attack(tmp_path, "truncate"), Hyperd(), dev
    ) as worker:
        assert ended(worker) == 0, "the worker ran to its end"
        assert answer(tmp_path)["answer"] == {"shrunk": "EPERM", "grown": "EPERM"}
        assert worker.counter_values(("first",)) == {"first": 0}, "dom0 still reads it"


def test_a_stopped_workers_counters_read_as_zero_not_as_an_error(tmp_path: Path) -> None:
    """`hyperctl top` asks for a device's counters as the device disconnects: a stats call
    that took the worker just before DataPath retired it reads the page after the worker's
    stop closed it (DataPath holds what it counted by then)."""
    dev = Device(state=XenbusState.Closed)
    with running(
        "tests.unit.subverted_worker", attack(tmp_path, "truncate"), Hyperd(), dev
    ) as worker:
        ended(worker)
        worker.stop()
        assert worker.counter_values(("first",)) == {"first": 0}
        assert worker.ring_values(("first",)) == []


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(os.geteuid() != 0, reason="a worker changes uid only when root starts it")
def test_a_process_a_subverted_worker_forked_does_not_outlive_it(tmp_path: Path) -> None:
    """It would go on holding the worker's fds (its device's): once dom0 has reaped the worker,
    whatever still runs as its uid is killed."""
    dev = Device(state=XenbusState.Closed)
    child = 0
    try:
        with running("tests.unit.subverted_worker", attack(tmp_path, "fork"), Hyperd(), dev):
            wait_until(lambda: (tmp_path / "answer").exists(), TIMEOUT)
            child = answer(tmp_path)["answer"]["child"]
            assert alive(child), "the worker's child runs while the worker does"
        wait_until(lambda: not alive(child), TIMEOUT)
    finally:
        if child and alive(child):
            os.kill(child, signal.SIGKILL)

"""dom0's side of a backend device's worker process: what a worker can ask dom0 for.

The worker maps the frontend's pages and parses what the frontend writes there, so it may be
subverted; dom0 holds the hypercall socket. Whatever the worker's request names, dom0 answers
with the grant pools of the device it started that worker for, at a bounded rate; a line that
is no request fails that device (tests/unit/subverted_worker.py plays the worker). A setup the
frontend broke fails the device at once, saying why (the real workers, over fake pools)."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from channels import blkif as B
from channels import credit
from channels import hypercall as hc
from channels import netif as N
from channels.gnttab import pool_bytes
from channels.grants import REFRESH_BURST, REFRESHES_PER_SECOND
from channels.shm import create_segment, unlink_segment
from channels.xenbus import XenbusState
from dom0 import datapath_worker
from dom0.datapath_worker import MAX_LINE, DataPath, WorkerProcess
from tests.unit import subverted_worker
from tests.unit.test_gnttab import Clock

TIMEOUT = 30.0


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
    try:
        path.start(module, params, device_fd, hyperd, dev, "vif5.0")  # type: ignore[arg-type]
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
    ("module", "device", "bound"),
    [
        ("dom0.netback.worker", "vif/0", N.MAX_GRANT_PAGES),
        ("dom0.blkback.worker", "vbd/51712", B.MAX_GRANT_PAGES),
    ],
    ids=["netback", "blkback"],
)
#: The ring refs each worker is given (netback's two, blkback's one): the first gref.
RING_REFS = {"tx_ring_ref": 8, "rx_ring_ref": 8, "ring_ref": 8, "name": "vif5.0"}


@WORKERS
def test_more_pages_than_a_device_can_use_fail_it_at_once_saying_so(
    module: str, device: str, bound: int
) -> None:
    """A frontend that set up more pages for its device than the protocol can use before it
    connected (hyperd checks only the domain's whole budget): the worker refuses to map them
    as it starts, and the device fails with that reason, not restarted as a crashed worker."""
    hyperd = Hyperd([pool("never-opened", bound + 1)], max_pages=1 << 16)
    dev = Device(device)
    with running(module, RING_REFS, hyperd, dev) as worker:
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
    module: str, device: str, bound: int, ungranted_page: str
) -> None:
    dev = Device(device)
    with running(module, RING_REFS, Hyperd([pool(ungranted_page, 1)]), dev) as worker:
        assert dev.changed.wait(TIMEOUT), "the device must be told"
        ended(worker)
    assert dev.told == ["fatal: vif5.0: connecting: gref 8 is not granted"]

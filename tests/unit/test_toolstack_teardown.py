"""The toolstack's teardown of a destroyed domain, over a store whose files cannot be written
(dom0/toolstack.py, xenstored/core.py); and the control socket's dispatch (dom0/control.py)."""

from __future__ import annotations

import logging
import queue
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from channels import control, xenbus
from dom0.control import ControlServer
from dom0.storeview import StoreView
from dom0.toolstack import DomainState, Toolstack
from tests.unit.test_store_journal import _break_journal
from xenstored import Store, connect_local
from xenstored.journal import Journal

DOMID = 1


def _info(domid: int) -> dict[str, Any]:
    """What hyperd's domain_introduced event carries, as far as the skeleton needs it."""
    return {
        "domid": domid,
        "name": f"guest{domid}",
        "uuid": str(uuid.uuid4()),
        "memory": 64,
        "vcpus": 1,
        "console": {"domu_port": 3},
        "config": {},
    }


@pytest.fixture
def toolstack(tmp_path: Path) -> Iterator[Toolstack]:
    """A toolstack over a recorded store, without hyperd (teardown needs none)."""
    store = Store(journal=Journal(tmp_path))
    with connect_local(store, 0) as dom0:
        events: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        no_hyperd: Any = None
        yield Toolstack(no_hyperd, store, dom0.client, events)
    assert store.tree.journal is not None
    store.tree.journal.close()


def _store(toolstack: Toolstack) -> Store:
    """The toolstack's own store (these toolstacks run with the store in dom0)."""
    assert toolstack.store is not None
    return toolstack.store


def _introduce(toolstack: Toolstack, info: dict[str, Any]) -> DomainState:
    """The store side of on_domain_introduced (no relay, no devices)."""
    toolstack._write_skeleton(info)
    _store(toolstack).introduce_domain(info["domid"])
    state = DomainState(info["domid"], info["name"], info)
    toolstack.domains[info["domid"]] = state
    return state


def test_a_destroyed_domain_is_torn_down_whole_though_the_store_files_cannot_be_written(
    toolstack: Toolstack,
) -> None:
    info = _info(DOMID)
    state = _introduce(toolstack, info)
    toolstack.xs.write(xenbus.domain_key_path(DOMID, "data") + "/mine", "guest's")
    store = _store(toolstack)
    assert store.node_count(DOMID) > 0
    _break_journal(store)  # as on a full tmpfs

    toolstack.on_domain_destroyed({"domid": DOMID})

    assert state.gone.is_set()
    assert not store.is_introduced(DOMID) and store.node_count(DOMID) == 0
    for path in (
        xenbus.domain_path(DOMID),
        xenbus.vm_path(info["uuid"]),
        xenbus.tool_path(DOMID),
    ):
        assert toolstack.xs.read_optional(path) is None, path


class Backend:
    """A console backend or relay whose ``close``/``stop`` may fail."""

    def __init__(self, failure: Exception | None = None) -> None:
        self.failure = failure
        self.stopped = False

    def close(self) -> None:
        self.stopped = True
        if self.failure is not None:
            raise self.failure

    stop = close


def test_a_destroyed_domain_is_torn_down_whole_though_its_backends_fail_to_stop(
    toolstack: Toolstack, caplog: pytest.LogCaptureFixture
) -> None:
    info = _info(DOMID)
    state = _introduce(toolstack, info)
    relay = Backend()
    state.console = Backend(RuntimeError("console backend wedged"))  # type: ignore[assignment]
    state.relay = relay  # type: ignore[assignment]
    store = _store(toolstack)

    with caplog.at_level(logging.ERROR):
        toolstack.on_domain_destroyed({"domid": DOMID})

    assert state.gone.is_set()
    assert relay.stopped  # the guest's rings are unmapped all the same
    assert not store.is_introduced(DOMID) and store.node_count(DOMID) == 0
    for path in (xenbus.domain_path(DOMID), xenbus.vm_path(info["uuid"])):
        assert toolstack.xs.read_optional(path) is None, path
    assert f"teardown of dom{DOMID}: stopping its backends failed" in caplog.text
    assert "console backend wedged" in caplog.text


def test_every_control_request_has_exactly_one_handler(
    toolstack: Toolstack, tmp_path: Path
) -> None:
    server = ControlServer(
        tmp_path / "toolstack.sock", toolstack, StoreView(toolstack.xs), toolstack.stopped
    )
    handled = set(server._request_table()) | set(server._stream_table())
    assert handled == set(control.REQUESTS.values())
    streaming = {cls for cls in control.REQUESTS.values() if cls.streaming}
    assert set(server._stream_table()) == streaming

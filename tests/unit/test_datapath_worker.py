"""dom0's side of a backend device's worker process: what a worker can ask dom0 for.

The worker maps the frontend's pages and parses what the frontend writes there, so it may be
subverted; dom0 holds the hypercall socket. Whatever the worker's request names, dom0 answers
with the grant pools of the device it started that worker for (tests/unit/subverted_worker.py
plays the worker)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from channels import hypercall as hc
from channels.xenbus import XenbusState
from channels.xenbus_bus import XenbusDevice
from dom0.datapath_worker import DataPath
from tests.unit import subverted_worker


class Hyperd:
    """hyperd as dom0's hypercall client sees it: any device's pools, every question kept."""

    def __init__(self) -> None:
        self.asked: list[tuple[int, str | None]] = []

    def call(self, op: hc.Op) -> dict[str, Any]:
        assert isinstance(op, hc.GnttabMapPools), op
        device = getattr(op, "device", None)  # None: asked for every device (before issue 12)
        self.asked.append((op.granter, device))
        pool = {"pool": 0, "name": f"pool of {device} of {op.granter}", "gref_base": 8}
        return {"pools": [{**pool, "pages": 1}], "max_pages": 1}


def test_a_worker_hears_of_its_own_devices_pools_whatever_it_asks(tmp_path: Path) -> None:
    hyperd = Hyperd()
    vif = XenbusDevice(
        xs=None,  # type: ignore[arg-type]
        devtype="vif",
        devid=0,
        nodename="/local/domain/0/backend/vif/5/0",
        otherend="/local/domain/5/device/vif/0",
        otherend_id=5,
        frontend_id=5,
        state=XenbusState.Closed,  # its worker's death restarts nothing
    )
    path = DataPath(())
    answer = tmp_path / "answer"
    device_fd = os.open(os.devnull, os.O_RDONLY)
    try:
        path.start(
            "tests.unit.subverted_worker",
            {"answer": str(answer)},
            device_fd,
            hyperd,  # type: ignore[arg-type]
            vif,
            "vif5.0",
        )
        assert path.worker is not None
        assert path.worker.process.wait(30) == 0, "the worker ran to its end"
    finally:
        path.stop()
        os.close(device_fd)
    told = json.loads(answer.read_text())
    assert (subverted_worker.ASKED_GRANTER, subverted_worker.ASKED_DEVICE) not in hyperd.asked
    assert hyperd.asked == [(5, "vif/0"), (5, "vif/0")], "as it started, then as it asked"
    assert told["params"]["frontend"] == 5 and told["params"]["device"] == "vif/0"
    assert told["params"]["pools"]["pools"][0]["name"] == "pool of vif/0 of 5"
    assert told["answer"]["result"]["pools"][0]["name"] == "pool of vif/0 of 5"

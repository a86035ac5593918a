"""The ids data-path workers drop to: one per running worker, shared with nothing else.

(That a worker holds no privilege as it serves: test_datapath_worker.py, and for the real
workers of a running domain, tests/integration/test_worker_privilege.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from backends import privilege
from backends.privilege import WORKER_ID_BASE, WORKER_IDS, PrivilegeError, WorkerIds
from channels.hypercall import DOMID_MAX
from channels.ids import ID_RANGE, uid_base


def test_worker_ids_lie_past_every_domains_host_ids() -> None:
    domains = range(uid_base(1), uid_base(DOMID_MAX) + ID_RANGE)
    workers = range(WORKER_ID_BASE, WORKER_ID_BASE + WORKER_IDS)
    assert workers.start >= domains.stop
    assert workers.stop <= (1 << 32) - 1, "(uid_t) -1 is no id"


def test_each_running_worker_has_an_id_of_its_own_reused_as_late_as_possible() -> None:
    ids = WorkerIds(base=WORKER_ID_BASE, count=3)
    first, second = ids.take(), ids.take()
    assert first != second
    ids.give_back(first)
    third = ids.take()
    assert third not in (first, second), "a free id never used yet comes first"
    assert ids.take() == first, "then the one given back"
    with pytest.raises(PrivilegeError, match="no worker id free"):
        ids.take()


def test_an_id_a_host_account_or_subordinate_range_holds_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    subuid = tmp_path / "subuid"
    subuid.write_text(f"someone:{WORKER_ID_BASE + 1}:2\nnot a range\n")
    monkeypatch.setattr(privilege, "SUBORDINATE_IDS", (str(subuid), str(tmp_path / "none")))
    assert privilege.host_uses(0), "root's"
    assert privilege.host_uses(WORKER_ID_BASE + 2)
    assert not privilege.host_uses(WORKER_ID_BASE + 3)
    ids = WorkerIds(base=WORKER_ID_BASE, count=4)
    assert [ids.take(), ids.take()] == [WORKER_ID_BASE, WORKER_ID_BASE + 3]

"""The store's tree on disk: what a restarted dom0 finds (dom0/store/journal.py)."""

from __future__ import annotations

from pathlib import Path

from channels.xs_wire import Perm
from dom0.store import Store, connect_local
from dom0.store import journal as journal_module
from dom0.store.journal import Journal


def _tree(store: Store) -> dict[str, tuple[bytes, tuple[Perm, ...], frozenset[str]]]:
    return {
        path: (node.value, node.perms, node.children) for path, node in store.tree._nodes.items()
    }


def _populate(store: Store) -> None:
    with connect_local(store, 0) as dom0:
        xs = dom0.client
        xs.write("/local/domain/3/name", "web")
        xs.write("/local/domain/3/data/blob", b"\x00\xff binary \x80")
        xs.set_perms("/local/domain/3/data", [Perm(3, "n"), Perm(0, "r")])
        xs.write("/local/domain/3/gone", "soon")
        xs.rm("/local/domain/3/gone")

        def change(tx: object) -> None:
            xs.write("/local/domain/3/tx", "committed", tx)  # type: ignore[arg-type]

        xs.transaction(change)


def test_a_recovering_store_has_every_node_with_its_value_and_permissions(tmp_path: Path) -> None:
    first = Store(journal=Journal(tmp_path))
    _populate(first)

    second = Store(journal=Journal(tmp_path), recover=True)

    assert _tree(second) == _tree(first)
    assert second.tree.get("/local/domain/3/gone") is None
    assert second.tree.get("/local/domain/3/data/blob").value == b"\x00\xff binary \x80"


def test_a_store_that_does_not_recover_starts_empty(tmp_path: Path) -> None:
    _populate(Store(journal=Journal(tmp_path)))

    fresh = Store(journal=Journal(tmp_path))

    assert fresh.tree.get("/local/domain/3/name") is None
    assert _tree(Store(journal=Journal(tmp_path), recover=True)) == _tree(fresh)


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    store = Store(journal=Journal(tmp_path))
    _populate(store)
    with open(tmp_path / "store.journal", "a") as journal:
        journal.write('["p","/local/domain/3/half')  # the crash came mid-write

    recovered = Store(journal=Journal(tmp_path), recover=True)

    assert _tree(recovered) == _tree(store)


def test_a_long_journal_is_folded_into_the_snapshot(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(journal_module, "COMPACT_AFTER", 50)
    store = Store(journal=Journal(tmp_path))
    with connect_local(store, 0) as dom0:
        for i in range(400):
            dom0.client.write("/local/domain/3/counter", str(i))

    lines = (tmp_path / "store.journal").read_text().count("\n")
    assert lines < 200
    recovered = Store(journal=Journal(tmp_path), recover=True)
    assert recovered.tree.get("/local/domain/3/counter").value == b"399"
    assert _tree(recovered) == _tree(store)

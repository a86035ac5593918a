"""The store's tree on disk: what a restarted dom0 finds, and what recording costs the host
(xenstored/journal.py)."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from channels.xenbus import RELEASE_DOMAIN_WATCH, guest_rw_perms, home_perms
from channels.xs import XsClient, XsConnectionLost, XsError
from channels.xs_wire import Perm
from dom0.main import main as dom0_main
from xenstored import Quota, Store, connect_local
from xenstored import journal as journal_module
from xenstored.journal import COMPACT_FLOOR, Journal
from xenstored.tree import Node

TIMEOUT = 5.0
NAME = "n" * 3000  # a child's name of 3 KB, as issue 12's guest wrote them


def _tree(store: Store) -> dict[str, tuple[bytes, tuple[Perm, ...], frozenset[str]]]:
    return {
        path: (node.value, node.perms, node.children) for path, node in store.tree._nodes.items()
    }


def _node(store: Store, path: str) -> Node:
    """The node at ``path``, which must be there."""
    node = store.tree.get(path)
    assert node is not None, f"no node {path}"
    return node


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


Around = Callable[[], AbstractContextManager[object]]


class Deferred:
    """A background job that runs only once joined: a snapshot slower to write than any number
    of requests. It runs ``around`` what ``around()`` returns (a failure to inject); like a
    thread, it ends quietly whatever the job raised, which it keeps in ``died``."""

    def __init__(self, job: Callable[[], None], around: Around = contextlib.nullcontext) -> None:
        self._job: Callable[[], None] | None = job
        self._around = around
        self.died: BaseException | None = None

    def is_alive(self) -> bool:
        return self._job is not None

    def join(self, timeout: float | None = None) -> None:
        job, self._job = self._job, None
        if job is not None:
            try:
                with self._around():
                    job()
            except BaseException as exc:  # a thread's end: threading.excepthook reports it
                self.died = exc


def run_now(job: Callable[[], None]) -> Deferred:
    """A background job done before the request that started it is answered."""
    done = Deferred(job)
    done.join()
    return done


def _journal_bytes(directory: Path) -> int:
    return (directory / "store.journal").stat().st_size


def _journal(directory: Path) -> bytes:
    return (directory / "store.journal").read_bytes()


def _files_bytes(directory: Path) -> int:
    """What the store's files take on disk."""
    return sum(f.stat().st_size for f in directory.iterdir() if f.name.startswith("store."))


@pytest.fixture
def recorded(tmp_path: Path) -> Iterator[tuple[Store, XsClient, XsClient]]:
    """A recorded store with domain 1's home, dom0's client and domain 1's (its snapshots are
    folded before the next request)."""
    store = Store(journal=Journal(tmp_path, background=run_now))
    with connect_local(store, 0, timeout=TIMEOUT) as dom0, connect_local(store, 1) as dom1:
        dom0.client.mkdir("/local/domain/1/data")
        dom0.client.set_perms("/local/domain/1", home_perms(1))
        dom0.client.set_perms("/local/domain/1/data", guest_rw_perms(1))
        dom0.client.introduce(1)
        yield store, dom0.client, dom1.client
    assert store.tree.journal is not None
    store.tree.journal.close()


def test_a_recovering_store_has_every_node_with_its_value_and_permissions(tmp_path: Path) -> None:
    first = Store(journal=Journal(tmp_path))
    _populate(first)

    second = Store(journal=Journal(tmp_path), recover=True)

    assert _tree(second) == _tree(first)
    assert second.tree.get("/local/domain/3/gone") is None
    assert _node(second, "/local/domain/3/data/blob").value == b"\x00\xff binary \x80"


def test_a_store_that_does_not_recover_starts_empty(tmp_path: Path) -> None:
    _populate(Store(journal=Journal(tmp_path)))

    fresh = Store(journal=Journal(tmp_path))

    assert fresh.tree.get("/local/domain/3/name") is None
    assert _tree(Store(journal=Journal(tmp_path), recover=True)) == _tree(fresh)


def test_loading_rebuilds_children_from_the_paths_and_drops_orphans(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store(journal=Journal(tmp_path))
    _populate(store)
    with open(tmp_path / "store.journal", "a") as journal:  # damage: a node without a parent
        journal.write('[["p","/nowhere/lost","eA==",["n0"]]]\n')

    with caplog.at_level(logging.WARNING):
        recovered = Store(journal=Journal(tmp_path), recover=True)

    assert _tree(recovered) == _tree(store)
    assert _node(recovered, "/local/domain/3").children == {"name", "data", "tx"}
    assert "1 nodes without a parent dropped, /nowhere/lost first" in caplog.text


def test_a_torn_last_line_loses_its_whole_request_and_nothing_else(tmp_path: Path) -> None:
    store = Store(journal=Journal(tmp_path))
    _populate(store)
    before = _tree(store)
    with connect_local(store, 0) as dom0:

        def two_writes(tx: object) -> None:
            dom0.client.write("/local/domain/3/a", "1", tx)  # type: ignore[arg-type]
            dom0.client.write("/local/domain/3/b", "2", tx)  # type: ignore[arg-type]

        dom0.client.transaction(two_writes)
    journal = tmp_path / "store.journal"
    whole = journal.read_bytes()
    journal.write_bytes(whole[: whole.rindex(b'"/local/domain/3/b"')])  # the crash came mid-line

    recovered = Store(journal=Journal(tmp_path), recover=True)

    assert _tree(recovered) == before


def test_a_last_line_without_its_newline_is_torn_and_not_replayed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store(journal=Journal(tmp_path))
    _populate(store)
    before = _tree(store)
    with connect_local(store, 0) as dom0:
        dom0.client.write("/local/domain/3/late", "answered EIO")
    journal = tmp_path / "store.journal"
    journal.write_bytes(journal.read_bytes()[:-1])  # its write stored all but the newline

    with caplog.at_level(logging.WARNING):
        recovered = Store(journal=Journal(tmp_path), recover=True)

    assert _tree(recovered) == before
    assert "last line without its newline skipped" in caplog.text


def test_temporary_files_a_crash_left_behind_are_removed_at_startup(tmp_path: Path) -> None:
    store = Store(journal=Journal(tmp_path))
    _populate(store)
    for name in ("store.snapshot.tmp", "store.journal.tmp"):  # dom0 died during a fold
        (tmp_path / name).write_bytes(b"x" * 4096)

    recovered = Store(journal=Journal(tmp_path), recover=True)

    assert not list(tmp_path.glob("*.tmp"))
    assert _tree(recovered) == _tree(store)


def test_a_journal_that_follows_an_older_snapshot_is_ignored(tmp_path: Path) -> None:
    store = Store(journal=Journal(tmp_path))
    _populate(store)
    stale = (tmp_path / "store.journal").read_bytes()
    with connect_local(store, 0) as dom0:
        dom0.client.write("/local/domain/3/name", "renamed")
    assert store.tree.journal is not None
    store.tree.journal.compact(store.tree._nodes)
    (tmp_path / "store.journal").write_bytes(stale)  # as if the new one was never started

    recovered = Store(journal=Journal(tmp_path), recover=True)

    assert _node(recovered, "/local/domain/3/name").value == b"renamed"
    assert _tree(recovered) == _tree(store)


# -- formats: another layout is refused by name, never taken for an empty store -----------------

FORMAT_1 = '["p","/","",["n0"],["local"]]\n["p","/local","",["n0"],[]]\n'  # before issue 12


@pytest.mark.parametrize(
    ("snapshot", "refusal"),
    [
        (FORMAT_1, "store format 1, this dom0 reads format 2"),
        ('{"format": 3, "snapshot": "x"}\n', "store format 3, this dom0 reads format 2"),
        ("", "no header line naming its format"),
    ],
)
def test_a_snapshot_of_another_format_is_refused_by_name_and_left_as_it_is(
    tmp_path: Path, snapshot: str, refusal: str
) -> None:
    (tmp_path / "store.snapshot").write_text(snapshot)
    (tmp_path / "store.journal").write_text(FORMAT_1)

    with pytest.raises(journal_module.StoreFormatError) as refused:
        Store(journal=Journal(tmp_path), recover=True)

    assert str(refused.value).startswith(f"{tmp_path / 'store.snapshot'}: {refusal}")
    assert (tmp_path / "store.snapshot").read_text() == snapshot
    assert (tmp_path / "store.journal").read_text() == FORMAT_1


def test_a_journal_of_another_format_is_refused_by_name(tmp_path: Path) -> None:
    Store(journal=Journal(tmp_path))
    (tmp_path / "store.journal").write_text(FORMAT_1)

    with pytest.raises(journal_module.StoreFormatError, match=r"store\.journal: store format 1"):
        Store(journal=Journal(tmp_path), recover=True)


def test_files_whose_header_names_no_format_are_read_as_format_2(tmp_path: Path) -> None:
    store = Store(journal=Journal(tmp_path))
    _populate(store)
    for name in ("store.snapshot", "store.journal"):  # as hyper wrote them before the format
        path = tmp_path / name
        path.write_text(path.read_text().replace('"format": 2, ', "", 1))

    assert _tree(Store(journal=Journal(tmp_path), recover=True)) == _tree(store)


def test_dom0_recovering_from_files_of_another_format_stops_with_status_2(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "store.snapshot").write_text(FORMAT_1)

    with caplog.at_level(logging.ERROR):
        status = dom0_main(["--hypercall-fd", "-1", "--run-dir", str(tmp_path), "--recover"])

    assert status == 2
    assert f"{tmp_path / 'store.snapshot'}: store format 1" in caplog.text
    assert (tmp_path / "store.snapshot").read_text() == FORMAT_1


# -- size: bounded by the live tree, whatever is written -----------------------------------------


def test_rewriting_a_parent_costs_the_journal_its_own_bytes_not_its_children(
    recorded: tuple[Store, XsClient, XsClient], tmp_path: Path
) -> None:
    store, _, dom1 = recorded
    for i in range(200):  # issue 12's guest: 600 KB of names
        dom1.write(f"/local/domain/1/data/{i:03d}{NAME}", "")
    before = _journal_bytes(tmp_path)

    for i in range(100):
        dom1.write("data", str(i))

    assert _journal_bytes(tmp_path) - before < 100 * 100  # about 70 bytes a line
    recovered = Store(journal=Journal(tmp_path), recover=True)
    assert _tree(recovered) == _tree(store)


def test_the_journal_stays_bounded_by_the_live_tree_under_a_write_loop(
    recorded: tuple[Store, XsClient, XsClient], tmp_path: Path
) -> None:
    store, _, dom1 = recorded
    for i in range(300):
        dom1.write(f"/local/domain/1/data/{i:03d}{NAME}", "v" * 1000)
    largest = written = 0

    for i in range(3000):  # 12 MiB of requests over a live tree of 1.2 MiB
        value = str(i % 10) * 1000
        dom1.write(f"/local/domain/1/data/{i % 300:03d}{NAME}", value)
        written += 3000 + 1000
        largest = max(largest, _journal_bytes(tmp_path))

    snapshot = (tmp_path / "store.snapshot").stat().st_size
    assert written > 8 * max(COMPACT_FLOOR, snapshot)
    assert largest <= max(COMPACT_FLOOR, snapshot) + 6000  # the bound, plus one line
    assert snapshot < 2 * store.memory_used(1)
    assert _tree(Store(journal=Journal(tmp_path), recover=True)) == _tree(store)


def test_a_long_journal_is_folded_into_the_snapshot(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(journal_module, "COMPACT_FLOOR", 4096)
    store = Store(journal=Journal(tmp_path, background=run_now))
    with connect_local(store, 0) as dom0:
        for i in range(400):
            dom0.client.write("/local/domain/3/counter", str(i))

    assert _journal_bytes(tmp_path) < 4096 + 100
    recovered = Store(journal=Journal(tmp_path), recover=True)
    assert _node(recovered, "/local/domain/3/counter").value == b"399"
    assert _tree(recovered) == _tree(store)


# -- folding: the new snapshot is written beside the store, not under its lock ------------------


class Folds(list[Deferred]):
    """The folds a store started (its ``background`` is ``start``), as Deferred jobs. With a
    ``refusal``, starting one raises it instead (as Thread.start does under a pids limit, or
    copying the tree out of memory); the next ones run ``around`` what ``around()`` returns."""

    refusal: Exception | None = None
    around: Around = contextlib.nullcontext

    def start(self, job: Callable[[], None]) -> Deferred:
        if self.refusal is not None:
            raise self.refusal
        self.append(Deferred(job, self.around))
        return self[-1]


@pytest.fixture
def folding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Store, XsClient, Folds]]:
    """A store folding its journal past 4 KiB, whose snapshots are written only when the test
    (or a request that must wait) joins them; dom0's client."""
    monkeypatch.setattr(journal_module, "COMPACT_FLOOR", 4096)
    folds = Folds()
    store = Store(journal=Journal(tmp_path, background=folds.start))
    with connect_local(store, 0, timeout=TIMEOUT) as dom0:
        yield store, dom0.client, folds
    assert store.tree.journal is not None
    store.tree.journal.close()
    assert not list(tmp_path.glob("*.tmp"))


def _rewrite_until(xs: XsClient, done: Callable[[], bool]) -> None:
    """Rewrite 50 nodes of dom0's with fresh values until ``done()``."""
    for i in range(10_000):
        xs.write(f"/tool/n{i % 50}", f"{i:040d}")
        if done():
            return
    raise AssertionError("never done")


def _recorded(directory: Path) -> dict[str, tuple[bytes, tuple[Perm, ...], frozenset[str]]]:
    """The tree a dom0 restarted now would recover (read without writing the files)."""
    nodes = Journal(directory).load()
    return {path: (node.value, node.perms, node.children) for path, node in nodes.items()}


def _header(path: Path) -> dict[str, str]:
    with open(path) as file:
        return json.loads(file.readline())


def test_the_journal_records_on_while_a_snapshot_is_written_and_its_successor_keeps_that(
    folding: tuple[Store, XsClient, Folds], tmp_path: Path
) -> None:
    store, xs, folds = folding
    _rewrite_until(xs, lambda: bool(folds))
    snapshot = tmp_path / "store.snapshot"
    old = _header(snapshot)["snapshot"]

    for i in range(20):  # answered while the snapshot waits to be written
        xs.write(f"/tool/meanwhile/{i}", "x")
    assert _recorded(tmp_path) == _tree(store)  # were dom0 to die now
    folds[0].join()
    assert _header(snapshot)["snapshot"] == old  # written, not yet in place
    xs.write("/tool/after", "1")  # the next change puts it in place

    assert _header(snapshot)["after"] == old != _header(snapshot)["snapshot"]
    assert _header(tmp_path / "store.journal")["snapshot"] == _header(snapshot)["snapshot"]
    assert _journal_bytes(tmp_path) < 22 * 100  # the 21 lines since the copy, and a header
    assert _recorded(tmp_path) == _tree(store)


def test_a_change_that_finds_the_journal_at_twice_its_bound_waits_for_the_snapshot(
    folding: tuple[Store, XsClient, Folds], tmp_path: Path
) -> None:
    store, xs, folds = folding
    largest = 0

    def measure() -> bool:
        nonlocal largest
        largest = max(largest, _journal_bytes(tmp_path))
        return len(folds) == 4

    _rewrite_until(xs, measure)

    assert not any(fold.is_alive() for fold in folds[:3])  # joined by the change that waited
    bound = max(4096, (tmp_path / "store.snapshot").stat().st_size)
    assert bound < largest <= 2 * bound + 100
    assert _recorded(tmp_path) == _tree(store)


def test_a_crash_between_a_snapshot_and_its_journal_replays_the_old_journal_over_it(
    folding: tuple[Store, XsClient, Folds],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store, xs, folds = folding
    _rewrite_until(xs, lambda: bool(folds))
    old = _header(tmp_path / "store.journal")["snapshot"]
    xs.write("/tool/n0", "rewritten while the snapshot is written")
    folds[0].join()
    journal = store.tree.journal
    assert journal is not None
    replace = os.replace

    def no_new_journal(source: Path, target: Path) -> None:
        if Path(source) == journal.temporary_journal_path:
            raise OSError(errno.EIO, "as if dom0 died here")
        replace(source, target)

    with monkeypatch.context() as patched, caplog.at_level(logging.WARNING):
        patched.setattr(os, "replace", no_new_journal)
        xs.write("/tool/after", "1")

    assert "as if dom0 died here" in caplog.text
    assert _header(tmp_path / "store.snapshot")["after"] == old
    assert _header(tmp_path / "store.journal")["snapshot"] == old
    assert _recorded(tmp_path) == _tree(store)
    xs.write("/tool/later", "2")  # the old journal goes on
    assert _recorded(tmp_path) == _tree(store)


def test_a_snapshot_being_written_is_dropped_once_the_journal_lacks_a_change(
    folding: tuple[Store, XsClient, Folds], tmp_path: Path
) -> None:
    store, xs, folds = folding
    _rewrite_until(xs, lambda: bool(folds))
    _break_journal(store)
    xs.write("/tool/kept", "in memory only")  # dom0's: it stands, the files lack it
    _mend_journal(store)

    xs.write("/tool/mended", "1")  # a whole snapshot, at once

    assert not folds[0].is_alive()  # dropped, not left to follow a journal that lacks a change
    assert "after" not in _header(tmp_path / "store.snapshot")
    assert not list(tmp_path.glob("*.tmp"))
    assert _recorded(tmp_path) == _tree(store)


def test_a_snapshot_is_written_on_a_thread_of_its_own(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(journal_module, "COMPACT_FLOOR", 4096)
    store = Store(journal=Journal(tmp_path))
    journal = store.tree.journal
    assert journal is not None
    with connect_local(store, 0) as dom0:
        _rewrite_until(dom0.client, lambda: journal._fold is not None)
        assert journal._fold is not None
        worker = journal._fold[1]
        assert isinstance(worker, threading.Thread)
        worker.join(TIMEOUT)
        dom0.client.write("/tool/after", "1")

    assert journal._fold is None
    assert "after" in _header(tmp_path / "store.snapshot")
    assert _recorded(tmp_path) == _tree(store)
    journal.close()


def test_a_fold_copies_the_lines_since_its_copy_and_the_switch_only_those_after_it(
    folding: tuple[Store, XsClient, Folds], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, xs, folds = folding
    _rewrite_until(xs, lambda: bool(folds))
    for i in range(20):
        xs.write(f"/tool/meanwhile/{i}", "x")
    folds[0].join()  # writes the snapshot, then its journal: a header and the lines since
    tail = (tmp_path / "store.journal.tmp").read_bytes()
    assert tail.count(b"/tool/meanwhile/") == 20
    assert tail.splitlines()[1:] == _journal(tmp_path).splitlines()[-20:]
    copied: list[int] = []
    copy_file_range = os.copy_file_range

    def counted(*args: int) -> int:
        copied.append(copy_file_range(*args))
        return copied[-1]

    monkeypatch.setattr(os, "copy_file_range", counted)
    xs.write("/tool/after", "1")  # puts it in place, under the store lock

    journal = _journal(tmp_path)
    assert journal.startswith(tail) and journal[len(tail) :].count(b"\n") == 1
    assert sum(copied) == len(journal) - len(tail)  # that line alone was copied under the lock
    assert (
        _header(tmp_path / "store.snapshot")["snapshot"]
        == _header(tmp_path / "store.journal")["snapshot"]
    )
    assert _recorded(tmp_path) == _tree(store)


@contextlib.contextmanager
def _out_of_memory_after(nodes: int) -> Iterator[None]:
    """Writing a snapshot runs out of memory after ``nodes`` nodes (lines written so far)."""
    entry, left = journal_module._entry, nodes

    def failing(path: str, node: object) -> list[object]:
        nonlocal left
        if node is not None and path.startswith("/tool/live/"):
            if left == 0:
                raise MemoryError
            left -= 1
        return entry(path, node)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(journal_module, "_entry", failing)
        yield


def test_a_fold_that_dies_of_anything_is_never_put_in_place(
    folding: tuple[Store, XsClient, Folds], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store, xs, folds = folding
    for i in range(80):
        xs.write(f"/tool/live/{i}", "x")
    folds.around = lambda: _out_of_memory_after(20)
    _rewrite_until(xs, lambda: bool(folds))
    snapshot = _header(tmp_path / "store.snapshot")["snapshot"]
    folds[0].join()  # dies of MemoryError, 20 nodes in

    with caplog.at_level(logging.WARNING):
        xs.write("/tool/after", "1")  # the change that would put it in place

    assert _recorded(tmp_path) == _tree(store)
    assert _header(tmp_path / "store.snapshot")["snapshot"] == snapshot
    assert not list(tmp_path.glob("*.tmp"))
    assert "not folded (MemoryError); compacting again" in caplog.text


@pytest.mark.parametrize(
    "refusal", [RuntimeError("can't start new thread"), MemoryError()], ids=["thread", "memory"]
)
def test_a_fold_that_cannot_start_fails_no_request_and_is_tried_again(
    folding: tuple[Store, XsClient, Folds],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    refusal: Exception,
) -> None:
    store, xs, folds = folding
    folds.refusal = refusal
    failures = "compacting again after 4096 more bytes"

    with caplog.at_level(logging.WARNING):  # each request answered: its line is written
        _rewrite_until(xs, lambda: caplog.text.count(failures) == 2)

    assert _journal_bytes(tmp_path) > 2 * 4096  # past the bound, and past it again later
    assert f"not folded ({type(refusal).__name__}" in caplog.text
    assert _recorded(tmp_path) == _tree(store)
    folds.refusal = None
    _rewrite_until(xs, lambda: bool(folds))
    folds[0].join()
    xs.write("/tool/after", "1")
    assert _journal_bytes(tmp_path) < 4096
    assert _recorded(tmp_path) == _tree(store)


def _open_files(directory: Path) -> list[str]:
    """What this process holds open in ``directory`` (removed files too)."""
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own, closed by now
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
    return sorted(t for t in targets if t.startswith(f"{directory}/"))


@pytest.mark.parametrize("failing", ["copy", "journal"])
def test_a_switch_that_fails_of_anything_leaves_nothing_open_or_behind(
    folding: tuple[Store, XsClient, Folds],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    failing: str,
) -> None:
    store, xs, folds = folding
    _rewrite_until(xs, lambda: bool(folds))
    folds[0].join()
    held = _open_files(tmp_path)
    replace = os.replace

    def out_of_memory(*args: object) -> None:
        raise MemoryError

    def no_new_journal(source: Path, target: Path) -> None:
        if Path(source).name == "store.journal.tmp":  # after the snapshot is in place
            raise MemoryError
        replace(source, target)

    with monkeypatch.context() as patched, caplog.at_level(logging.WARNING):
        if failing == "copy":
            patched.setattr(os, "copy_file_range", out_of_memory)
        else:
            patched.setattr(os, "replace", no_new_journal)
        xs.write("/tool/after", "1")  # answered: its line is written

    assert "not folded (MemoryError)" in caplog.text
    assert _open_files(tmp_path) == held
    assert not list(tmp_path.glob("*.tmp"))
    assert _recorded(tmp_path) == _tree(store)
    xs.write("/tool/later", "2")  # the journal goes on
    assert _recorded(tmp_path) == _tree(store)


# -- failures: the request fails, the store goes on ----------------------------------------------


def _break_journal(store: Store) -> None:
    """Make every write to the journal fail (ENOSPC), and every new snapshot too."""
    journal = store.tree.journal
    assert journal is not None and journal._fd is not None
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, journal._fd)  # a write fails, and /dev/full cannot be cut back either
    os.close(full)
    journal.temporary_path.mkdir()  # the snapshot cannot be written


def _mend_journal(store: Store) -> None:
    assert store.tree.journal is not None
    store.tree.journal.temporary_path.rmdir()


def test_a_write_the_journal_cannot_record_is_undone_and_answered_eio(
    recorded: tuple[Store, XsClient, XsClient], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store, dom0, dom1 = recorded
    dom1.write("data/kept", "old")
    events = dom0.watch("/local/domain/1/data")
    assert events.get(TIMEOUT).path == "/local/domain/1/data"
    before, used = _tree(store), store.memory_used(1)
    _break_journal(store)

    with pytest.raises(XsError) as refused, caplog.at_level(logging.ERROR):
        dom1.write("data/new/deeper", "x")
    with pytest.raises(XsError) as refused_too, caplog.at_level(logging.ERROR):
        dom1.write("data/kept", "changed")

    assert refused.value.errno_name == refused_too.value.errno_name == "EIO"
    assert caplog.text.count("logged once") == 1
    assert _tree(store) == before
    assert store.memory_used(1) == used and store.node_count(1) == 2
    assert dom1.read("data/kept") == "old"  # the store still serves
    _mend_journal(store)
    dom1.write("data/after", "recorded")
    assert events.get(TIMEOUT).path == "/local/domain/1/data/after"  # none for the failures
    recovered = Store(journal=Journal(tmp_path), recover=True)
    assert _node(recovered, "/local/domain/1/data/after").value == b"recorded"
    assert _tree(recovered) == _tree(store)


def test_a_commit_the_journal_cannot_record_applies_nothing(
    recorded: tuple[Store, XsClient, XsClient],
) -> None:
    store, _, dom1 = recorded
    before = _tree(store)
    tx = dom1.transaction_start()
    tx.write("data/a", "1")
    tx.write("data/b/c", "2")
    _break_journal(store)

    with pytest.raises(XsError) as refused:
        dom1.transaction_end(tx)

    assert refused.value.errno_name == "EIO"
    assert _tree(store) == before


def test_a_request_of_dom0s_the_journal_cannot_record_stands_and_is_written_later(
    recorded: tuple[Store, XsClient, XsClient], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store, dom0, dom1 = recorded
    dom1.write("data/x", "1")
    released = dom0.watch(RELEASE_DOMAIN_WATCH)
    assert released.get(TIMEOUT).path == RELEASE_DOMAIN_WATCH
    _break_journal(store)

    with caplog.at_level(logging.WARNING):
        dom0.release(1)  # the whole release: nodes, connections, @releaseDomain
        dom0.write("/tool/after", "1")

    assert released.get(TIMEOUT).path == RELEASE_DOMAIN_WATCH
    assert not store.is_introduced(1) and store.node_count(1) == 0
    with pytest.raises(XsConnectionLost):
        dom1.read("data/x")
    assert dom0.read("/tool/after") == "1"
    assert caplog.text.count("lack changes of dom0's") == 1
    _mend_journal(store)
    dom0.write("/tool/mended", "1")  # the next change writes a whole snapshot, which holds all
    assert _tree(Store(journal=Journal(tmp_path), recover=True)) == _tree(store)


def test_a_compaction_that_fails_does_not_fail_the_request_and_is_tried_again(
    tmp_path: Path, monkeypatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(journal_module, "COMPACT_FLOOR", 4096)
    store = Store(journal=Journal(tmp_path, background=run_now))
    assert store.tree.journal is not None
    store.tree.journal.temporary_path.mkdir()  # no snapshot can be written
    with connect_local(store, 0) as dom0, caplog.at_level(logging.WARNING):
        for i in range(100):  # past the floor: compaction fails, and again 4096 bytes later
            dom0.client.write("/tool/counter", f"{i:040d}")
        assert _journal_bytes(tmp_path) > 4096
        assert caplog.text.count("compacting again after 4096 more bytes") == 2

        store.tree.journal.temporary_path.rmdir()
        for i in range(100):
            dom0.client.write("/tool/counter", f"{i:040d}")

    assert _journal_bytes(tmp_path) < 4096 + 100
    assert _tree(Store(journal=Journal(tmp_path), recover=True)) == _tree(store)


def test_a_domu_rewriting_its_nodes_at_its_memory_quota_keeps_the_store_files_bounded(
    recorded: tuple[Store, XsClient, XsClient], tmp_path: Path
) -> None:
    store, _, dom1 = recorded
    quota = Quota().memory
    paths: list[str] = []
    with pytest.raises(XsError, match="ENOSPC"):
        for i in range(1000):
            paths.append(f"/local/domain/1/data/{i:03d}{NAME}")
            dom1.write(paths[-1], "v" * 1000)
    paths.pop()  # refused
    assert store.memory_used(1) <= quota
    largest = written = 0

    for round_ in range(10):  # 20 MiB of requests, each rewriting a node at the quota
        for path in paths:
            dom1.write(path, str(round_) * 1000)
            written += len(path) + 1000
            largest = max(largest, _files_bytes(tmp_path))

    assert written > 8 * quota
    assert largest < 3.5 * quota  # two snapshots of about the quota, a journal up to that size
    assert _tree(Store(journal=Journal(tmp_path), recover=True)) == _tree(store)

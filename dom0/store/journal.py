"""The live tree on disk, so that a dom0 restarted after a crash finds the store it had.

Two files in hyper's run directory (a tmpfs, so host RAM: they outlive dom0, not the host, and so
do the domains they describe):

- ``store.snapshot``: every node, written to a temporary file and renamed into place, so it is
  always whole;
- ``store.journal``: every request that changed the tree since that snapshot, one line each,
  appended with one ``write`` before the request is answered.

Both are JSON lines. The first line is a header ``{"format": 2, "snapshot": id}``: the layout
(FORMAT), and in the snapshot its own id, in the journal the id of the snapshot it follows (a
folded snapshot's also names the one before it, ``"after"``: see Loading). Every other line is
a list of entries, ``["p", path, value, perms]`` (the node's value in base64, its permissions) or
``["d", path]`` (removed). A journal line holds every path one request changed, in its final
state, so a line torn by a crash loses one unanswered request, never half of one.

Children are not recorded: they follow from the paths, and loading rebuilds them (a node whose
parent is missing, which only a damaged file holds, is dropped with a warning). So a request
costs the journal the bytes of what it changed, never a parent's list of children; a parent
that only gained or lost a child is not written at all.

Size. Once the journal outgrows max(COMPACT_FLOOR, the snapshot), it is folded into a new
snapshot. That snapshot is written from a copy of the tree (a copy of the map: nodes are
immutable) on a thread of its own, and written out to the disk there, while the store goes on
answering and the journal recording. The first change after it is written puts it in place and
starts its journal with the lines recorded since the copy; a change that finds the journal at
twice its bound waits for it. (Measured with 100 domains at their quota, 265 MiB of snapshot:
written under the store lock, it stopped every request for 1.5 s; folded, the copy holds the
lock 4 ms and putting it in place under 1 ms.) So the journal stays under twice that bound plus
one line, the snapshot under the live tree's size (values take 4/3 of their bytes), a second
snapshot exists from the fold to the next change, the copy keeps the nodes it holds alive until
then (at most the tree's size again), and each byte written costs O(1) amortised. A fold that
fails does not fail the request whose line is already written: it is logged and tried again
once the journal has grown by another COMPACT_FLOOR.

Failures. A line that cannot be written whole raises JournalError (the store then undoes the
request and answers it with an error), and the journal is cut back to its last whole line. If
it cannot be cut back, the next change is recorded by a whole new snapshot and journal instead;
so is the next change after one whose record was not ``required`` (dom0's, which the store keeps
whether or not it is recorded: see core.py). Failures are logged once a run, however many
requests meet them.

Loading reads the snapshot, then replays the journal if it follows that snapshot. One that
follows an older snapshot (a crash, or a failure, between writing a snapshot and starting its
journal) holds nothing the newer snapshot lacks, and is ignored; except the journal a folded
snapshot was copied during, which its header names (``"after"``): a crash between putting the
snapshot in place and its own journal leaves that one, which is whole and holds every request
since an older snapshot, each line the final state of what it changed, so replaying all of it
over the newer snapshot ends with the latest state. (A journal that stopped being whole while
a snapshot was written, by a line not cut back or a change of dom0's it lacks, is never
followed by that snapshot: the store writes a whole one at once instead.)

Formats. A file of another format (FORMAT 1 was hyper's layout before issue 12: no header, one
node with its children a line), or a snapshot without a header, raises StoreFormatError naming
it, and the files are left as they are: a dom0 upgraded while domains run must not take
another layout's lines for damage and start an empty store over the one they hold. dom0
--recover then stops with that error (see dom0/main.py). A header without ``format`` (written
before the header named it) is FORMAT 2's layout, and read as such.

Only the tree is kept. Connections, watches and transactions belong to processes that a dom0
crash ends or disconnects (XenStore's own reconnection protocol drops them too); the store's
clients register their watches again when they reconnect.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from channels.xenbus import basename, parent_path, validate_path
from channels.xs_wire import Perm
from dom0.store.tree import Node

log = logging.getLogger(__name__)

#: The journal may grow to this many bytes, or to the snapshot's size if larger, before it is
#: folded into a new snapshot.
COMPACT_FLOOR = 1 << 20

#: The layout of the store files, named in their header line.
FORMAT = 2

_JOURNAL_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC

#: One change as the journal records it: a path and its node, or None if it was removed.
Recorded = tuple[str, Node | None]
_State = dict[str, tuple[bytes, tuple[Perm, ...]]]


class JournalError(Exception):
    """A store file cannot be written: the request that needed it fails, the store goes on."""


class StoreFormatError(Exception):
    """A store file was written in a layout this dom0 does not read: it cannot recover from it."""


class Worker(Protocol):
    def is_alive(self) -> bool: ...

    def join(self, timeout: float | None = None) -> None: ...


#: ``background(job)``: start running ``job`` away from the caller, and return its Worker.
Background = Callable[[Callable[[], None]], Worker]


def _thread(job: Callable[[], None]) -> Worker:
    thread = threading.Thread(target=job, name="store-snapshot", daemon=True)
    thread.start()
    return thread


@dataclass(eq=False)
class _Fold:
    """A snapshot being written from a copy of the tree, while the journal goes on."""

    snapshot_id: str
    after: str  # the snapshot that the journal it was copied during follows
    offset: int  # bytes of that journal the copy holds
    nodes: dict[str, Node]
    temporary: Path
    size: int = 0
    error: OSError | None = None
    cancelled: bool = False

    def run(self) -> None:
        header = _header(self.snapshot_id, self.after)
        try:
            self.size = _write_snapshot(self.temporary, header, self.nodes, lambda: self.cancelled)
        except OSError as exc:
            self.error = exc
        finally:
            self.nodes = {}


class Journal:
    def __init__(self, directory: Path, background: Background = _thread) -> None:
        """The store files in ``directory``; ``background`` runs the writing of a folded
        snapshot (tests run it by hand)."""
        self.snapshot_path = directory / "store.snapshot"
        self.journal_path = directory / "store.journal"
        self.temporary_path = directory / "store.snapshot.tmp"
        self.temporary_journal_path = directory / "store.journal.tmp"
        self._background = background
        self._fd: int | None = None
        self._size = 0  # bytes of whole lines in the journal
        self._follows = ""  # the id of the snapshot the journal follows
        self._compact_at = COMPACT_FLOOR
        self._whole = False  # the journal follows the snapshot and ends with a whole line
        self._failing = False  # the last attempt to record something failed
        self._missed = False  # since then, the live tree kept a change the files lack
        self._fold: tuple[_Fold, Worker] | None = None  # a snapshot being written

    # -- loading -------------------------------------------------------------------------------

    def load(self) -> dict[str, Node]:
        """The tree as it was last recorded (empty if nothing was). StoreFormatError if the files
        are of another format, or the snapshot has no header."""
        header, snapshot = _read(self.snapshot_path)
        if header is None and self.snapshot_path.exists():
            raise StoreFormatError(f"{self.snapshot_path}: no header line naming its format")
        journal_header, journal = _read(self.journal_path)
        state: _State = {}
        for where, line in snapshot:
            _apply(state, where, line)
        follows = _field(journal_header, "snapshot")
        if follows is not None and follows in (_field(header, "snapshot"), _field(header, "after")):
            for where, line in journal:
                _apply(state, where, line)
        elif journal:
            log.warning("%s follows another snapshot: ignored", self.journal_path)
        return _with_children(state)

    # -- recording -----------------------------------------------------------------------------

    def append(
        self, changes: Sequence[Recorded], nodes: Mapping[str, Node], required: bool = True
    ) -> None:
        """Record one request's ``changes`` before it is answered; ``nodes`` is the live tree,
        already changed. If they could not be recorded: JournalError, or if the record is not
        ``required``, the next change writes a whole snapshot, which holds them."""
        try:
            if self._whole:
                self._write(_line([_entry(path, node) for path, node in changes]))
            else:
                self.compact(nodes)  # the new snapshot holds the changes
        except JournalError as exc:
            self._complain(exc)
            if required:
                raise
            self._miss()
            return
        if not self._whole:
            return
        self._recovered()
        try:
            self._fold_when_due(nodes)
        except JournalError as exc:
            self._compact_at = self._size + COMPACT_FLOOR
            log.warning("%s; compacting again after %d more bytes", exc, COMPACT_FLOOR)

    def compact(self, nodes: Mapping[str, Node]) -> None:
        """Write every node as a new snapshot and start an empty journal after it, at once.
        JournalError if the snapshot could not be written (the old files stand as they were)."""
        self._drop_fold()
        snapshot_id = os.urandom(8).hex()
        try:
            size = _write_snapshot(self.temporary_path, _header(snapshot_id), nodes)
            os.replace(self.temporary_path, self.snapshot_path)
        except OSError as exc:
            _remove(self.temporary_path)
            raise JournalError(f"store snapshot {self.snapshot_path}: {exc}") from exc
        self._compact_at = max(COMPACT_FLOOR, size)
        self._start_journal(snapshot_id)

    def close(self) -> None:
        self._drop_fold()
        self._whole = False
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- folding (see Size in the module's docstring) ------------------------------------------

    def _fold_when_due(self, nodes: Mapping[str, Node]) -> None:
        if self._fold is None:
            if self._size > self._compact_at:
                fold = _Fold(
                    os.urandom(8).hex(), self._follows, self._size, dict(nodes), self.temporary_path
                )
                self._fold = fold, self._background(fold.run)
            return
        fold, worker = self._fold
        if worker.is_alive() and self._size <= 2 * self._compact_at:
            return
        self._fold = None
        worker.join()
        if fold.error is not None:
            raise JournalError(f"store snapshot {self.snapshot_path}: {fold.error}") from fold.error
        self._switch(fold)

    def _switch(self, fold: _Fold) -> None:
        """Put ``fold``'s snapshot in place, then its journal: a header and the lines this one
        recorded since the copy. A crash between the two leaves this journal, which loading
        replays over the new snapshot."""
        old_snapshot = fd = None
        try:
            # Held open, the old snapshot's blocks are freed when it is closed, not as it is
            # replaced: 80 ms for 265 MiB on a disk, which _close_away spends off the lock.
            with contextlib.suppress(FileNotFoundError):
                old_snapshot = os.open(self.snapshot_path, os.O_RDONLY | os.O_CLOEXEC)
            data = _header(fold.snapshot_id).encode("ascii") + self._since(fold.offset)
            fd = os.open(self.temporary_journal_path, _JOURNAL_FLAGS, 0o600)
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, f"{self.temporary_journal_path}: a short write")
            os.replace(fold.temporary, self.snapshot_path)
            os.replace(self.temporary_journal_path, self.journal_path)
        except OSError as exc:
            for opened in (old_snapshot, fd):
                if opened is not None:
                    os.close(opened)
            _remove(fold.temporary)
            _remove(self.temporary_journal_path)
            raise JournalError(f"store journal {self.journal_path}: {exc}") from exc
        assert self._fd is not None
        _close_away(self._fd, *([] if old_snapshot is None else [old_snapshot]))
        self._fd, self._size, self._follows = fd, len(data), fold.snapshot_id
        self._compact_at = max(COMPACT_FLOOR, fold.size)

    def _since(self, offset: int) -> bytes:
        """The journal's whole lines from byte ``offset`` on."""
        with open(self.journal_path, "rb") as journal:
            journal.seek(offset)
            return journal.read(self._size - offset)

    def _drop_fold(self) -> None:
        """Stop writing a folded snapshot (the store writes a whole one, or stops)."""
        if self._fold is not None:
            fold, worker = self._fold
            self._fold = None
            fold.cancelled = True
            worker.join()
            _remove(fold.temporary)

    def _start_journal(self, snapshot_id: str) -> None:
        """Start the journal after a new snapshot; if it cannot be, the snapshot has recorded
        everything all the same, and the next change writes another."""
        self.close()
        try:
            try:
                self._fd = os.open(self.journal_path, _JOURNAL_FLAGS, 0o600)
            except OSError as exc:
                raise JournalError(f"store journal {self.journal_path}: {exc}") from exc
            self._size = 0
            self._write(_header(snapshot_id))
        except JournalError as exc:
            self._complain(exc)
            return
        self._follows = snapshot_id
        self._whole = True

    def _write(self, line: str) -> None:
        """Append ``line`` whole (one write: a crash leaves all of it, none, or a torn last
        line), or cut it off again and raise JournalError."""
        assert self._fd is not None
        data = line.encode("ascii")
        try:
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, f"wrote {written} of {len(data)} bytes")
        except OSError as exc:
            self._cut()
            raise JournalError(f"store journal {self.journal_path}: {exc}") from exc
        self._size += len(data)

    def _cut(self) -> None:
        try:
            os.ftruncate(self._fd, self._size)  # type: ignore[arg-type]
        except OSError as exc:
            log.debug("%s not cut back to its last whole line: %s", self.journal_path, exc)
            self._whole = False  # the next change writes a new snapshot and journal

    def _complain(self, error: JournalError) -> None:
        """Log the first of a run of failures: a guest's requests must not flood the log."""
        if not self._failing:
            log.error("%s (logged once, until the store files are written again)", error)
        self._failing = True

    def _miss(self) -> None:
        """The live tree keeps a change the files lack: the next change writes a snapshot."""
        if not self._missed:
            log.warning(
                "store files in %s lack changes of dom0's, kept in memory until the files "
                "are written again",
                self.snapshot_path.parent,
            )
        self._missed = True
        self._whole = False

    def _recovered(self) -> None:
        if self._failing:
            log.warning("store files in %s written again", self.snapshot_path.parent)
        self._failing = self._missed = False


def _entry(path: str, node: Node | None) -> list[object]:
    if node is None:
        return ["d", path]
    value = base64.b64encode(node.value).decode("ascii")
    return ["p", path, value, [p.encode() for p in node.perms]]


def _line(entries: list[list[object]]) -> str:
    return json.dumps(entries, ensure_ascii=True, separators=(",", ":")) + "\n"


def _header(snapshot_id: str, after: str | None = None) -> str:
    fields = {"format": FORMAT, "snapshot": snapshot_id}
    if after is not None:
        fields["after"] = after
    return json.dumps(fields) + "\n"


def _write_snapshot(
    temporary: Path,
    header: str,
    nodes: Mapping[str, Node],
    cancelled: Callable[[], bool] | None = None,
) -> int:
    """Write ``nodes`` to ``temporary`` as a snapshot; its size. OSError if it could not be (or
    was ``cancelled``: a fold's, which is also written out to the disk), and then it is
    removed."""
    try:
        with open(temporary, "w", encoding="ascii") as out:
            out.write(header)
            for path, node in nodes.items():
                if cancelled is not None and cancelled():
                    raise OSError(errno.ECANCELED, "cancelled")
                out.write(_line([_entry(path, node)]))
            if cancelled is not None:
                # Else, on a disk, the rename that puts it in place makes ext4 write it out
                # (auto_da_alloc), under the store lock: 190 ms for 265 MiB. (No-op on tmpfs.)
                out.flush()
                os.fdatasync(out.fileno())
            return out.tell()
    except OSError:
        _remove(temporary)
        raise


def _close_away(*fds: int) -> None:
    """Close ``fds`` on a thread of its own: closing the last reference to a large file that
    is no longer linked frees its blocks, which takes a while."""

    def close() -> None:
        for fd in fds:
            os.close(fd)

    try:
        threading.Thread(target=close, name="store-free", daemon=True).start()
    except RuntimeError:  # no thread to be had: close them here
        close()


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):  # it may never have been made
        os.unlink(path)


# -- reading -------------------------------------------------------------------------------------


def _read(path: Path) -> tuple[dict[str, object] | None, list[tuple[str, object]]]:
    """``path``'s header (None without one) and its other lines, parsed and each with its
    "file:line" (a line that is not JSON is skipped: torn by a crash, or damage).
    StoreFormatError if the file is of another format."""
    header: dict[str, object] | None = None
    lines: list[tuple[str, object]] = []
    for number, text in _text_lines(path):
        where = f"{path}:{number}"
        try:
            item = json.loads(text)
        except ValueError:
            log.warning("%s: unreadable line skipped (torn by a crash?)", where)
            continue
        if number == 1:
            header = _checked_header(path, item)
        else:
            lines.append((where, item))
    return header, lines


def _checked_header(path: Path, header: object) -> dict[str, object]:
    """A file's first line, if it is a header of FORMAT; StoreFormatError otherwise."""
    found = header.get("format", 2) if isinstance(header, dict) else 1  # see the docstring
    if found != FORMAT:
        raise StoreFormatError(
            f"{path}: store format {found!r:.20}, this dom0 reads format {FORMAT}: not "
            "recovering from it (use the hyper that wrote it, or move the store files aside "
            "to start from an empty store)"
        )
    assert isinstance(header, dict)
    return header


def _field(header: dict[str, object] | None, name: str) -> str | None:
    """A snapshot id a header names (None if it names none)."""
    value = header.get(name) if header is not None else None
    return value if isinstance(value, str) else None


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    with (
        contextlib.suppress(FileNotFoundError),
        open(path, encoding="ascii", errors="replace") as source,
    ):
        yield from enumerate(source, 1)


def _apply(state: _State, where: str, line: object) -> None:
    """Apply one line, all of it or (if any entry is malformed) none of it."""
    try:
        if not isinstance(line, list):
            raise ValueError("not a list of entries")
        changes = [_parse(entry) for entry in line]
    except (ValueError, TypeError) as exc:
        log.warning("%s: malformed line skipped: %s", where, exc)
        return
    for path, node in changes:
        if node is None:
            state.pop(path, None)
        else:
            state[path] = node


def _parse(entry: object) -> tuple[str, tuple[bytes, tuple[Perm, ...]] | None]:
    if not isinstance(entry, list) or len(entry) not in (2, 4):
        raise ValueError(f"malformed entry {entry!r:.80}")
    tag, path, *rest = entry
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError(f"malformed path {path!r:.80}")
    validate_path(path)
    if tag == "d" and not rest:
        return path, None
    value, perms = rest if tag == "p" and rest else (None, None)
    if not isinstance(value, str) or not isinstance(perms, list) or not perms:
        raise ValueError(f"malformed entry for {path[:80]}")
    return path, (base64.b64decode(value, validate=True), tuple(Perm.parse(p) for p in perms))


def _with_children(state: _State) -> dict[str, Node]:
    """The nodes of ``state`` with their children, rebuilt from the paths; a node whose parent
    is missing is dropped (with every node below it)."""
    children: dict[str, set[str]] = {}
    orphans: list[str] = []
    for path in sorted(state, key=lambda p: (0 if p == "/" else p.count("/"), p)):
        if path != "/":
            siblings = children.get(parent_path(path))
            if siblings is None:
                orphans.append(path)
                continue
            siblings.add(basename(path))
        children[path] = set()
    if orphans:
        log.warning(
            "store files: %d nodes without a parent dropped, %s first", len(orphans), orphans[0]
        )
    return {path: Node(*state[path], frozenset(names)) for path, names in children.items()}

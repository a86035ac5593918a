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
state, so a line torn by a crash loses one unanswered request, never half of one (a last line
without its newline is torn too: its write stored all but its end, and was answered EIO).

Children are not recorded: they follow from the paths, and loading rebuilds them (a node whose
parent is missing, which only a damaged file holds, is dropped with a warning). So a request
costs the journal the bytes of what it changed, never a parent's list of children; a parent
that only gained or lost a child is not written at all.

Size. Once the journal outgrows its bound, max(COMPACT_FLOOR, the snapshot), it is folded into a
new snapshot. That snapshot is written from a copy of the tree (a copy of the map: nodes are
immutable) on a thread of its own, and written out to the disk there, while the store goes on
answering and the journal recording. The same thread then starts the snapshot's journal: a
header and the lines recorded since the copy, copied by the kernel (copy_file_range) from the
journal by offset, up to its last whole line (the journal is only appended to, and a line that
fails is cut back, never one before it), and again for the lines recorded meanwhile. The first
change after that copies what is left (the lines of the last moments, again in the kernel) and
puts both in place; a change that finds the journal at twice its bound waits for the fold. A
snapshot is put in place only if its fold finished: one that fails (whatever it meets: a disk
error, no memory, no thread to be had) does not fail the request whose line is already
written; it is logged, its files are removed, and it is tried again once the journal has grown
by another COMPACT_FLOOR. (Measured with 100 domains at their quota, 259 MiB of snapshot, and
four clients rewriting nodes throughout: written under the store lock, a snapshot stopped
every request for 1.5 s; folded, the copy of the tree holds the lock 4 ms, and putting the fold
in place 0.2-0.5 ms on a tmpfs and 2-13 ms on a disk, for 1-147 MiB of journal since the copy,
where reading and rewriting those lines under the lock took 5-670 ms for 3-98 MiB on a tmpfs
and 170-570 ms for 7-39 MiB on a disk.)

So the journal stays under twice its bound plus one line, and a snapshot takes about the tree's
bytes (values take 4/3 of theirs in base64, a node some 20 more). Without a fold, the files
hold the snapshot and a journal of up to its bound: about twice the snapshot. A fold adds the
new snapshot and, once that is written, the copy of the lines since: at most about five times
the larger snapshot (old and new, a journal at twice its bound, the copy of its tail), which
only requests written faster than the fold reach (measured: 5.0 times the snapshot, 6.7 times
the live tree's bytes as the quota counts them). The copy of the tree keeps the nodes it holds
alive until the snapshot is written (at most the tree's size again, in dom0's memory), and each
byte written costs O(1) amortised. The temporary files (``store.snapshot.tmp``,
``store.journal.tmp``) are removed when what writes them fails, and at startup if a crash left
them.

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
import fcntl
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from channels.errors import HyperError
from channels.xenbus import basename, parent_path, validate_path
from channels.xs_wire import Perm
from xenstored.tree import Node

log = logging.getLogger(__name__)

#: The journal may grow to this many bytes, or to the snapshot's size if larger, before it is
#: folded into a new snapshot.
COMPACT_FLOOR = 1 << 20

#: The layout of the store files, named in their header line.
FORMAT = 2

#: A fold copies the journal's lines since its copy of the tree, then those recorded meanwhile,
#: and so on until none were or it made this many copies; the switch copies what is left.
TAIL_PASSES = 4
#: Bytes copied by one call, between which a fold that was dropped stops.
COPY_CHUNK = 16 << 20

_JOURNAL_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC

#: One change as the journal records it: a path and its node, or None if it was removed.
Recorded = tuple[str, Node | None]
_State = dict[str, tuple[bytes, tuple[Perm, ...]]]


class JournalError(HyperError):
    """A store file cannot be written: the request that needed it fails, the store goes on."""


class StoreFormatError(HyperError):
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
    """A snapshot being written from a copy of the tree, and the journal that will follow it
    (a header and the lines recorded since the copy), while the journal goes on."""

    snapshot_id: str
    after: str  # the snapshot that the journal it was copied during follows
    journal: Path  # that journal, appended to meanwhile (never rewritten while a fold lives)
    recorded: Callable[[], int]  # how many bytes of whole lines it holds now
    offset: int  # bytes of it the copy holds
    nodes: dict[str, Node]
    temporary: Path  # the new snapshot
    tail: Path  # its journal
    size: int = 0  # the new snapshot's
    copied: int = 0  # bytes of the journal ``tail`` holds a copy of (from ``offset``)
    error: BaseException | None = None
    cancelled: bool = False
    done: bool = False  # written whole: only then may it be put in place

    def run(self) -> None:
        header = _header(self.snapshot_id, self.after)
        try:
            self.size = _write_snapshot(self.temporary, header, self.nodes, self._cancelled)
            self.nodes = {}  # the copy is written out: its nodes need not live any longer
            self._copy_tail()
        except BaseException as exc:  # whatever ends it (MemoryError too), it is not done
            self.error = exc
            return
        finally:
            self.nodes = {}
        self.done = True

    def _copy_tail(self) -> None:
        """Start ``tail`` with a header and the journal's lines since the copy (see
        TAIL_PASSES), copied by the kernel."""
        self.copied = self.offset
        with (
            _opened(self.journal, os.O_RDONLY) as source,
            _opened(self.tail, os.O_WRONLY | os.O_CREAT | os.O_TRUNC) as target,
        ):
            _write_whole(target, _header(self.snapshot_id).encode("ascii"))
            for _ in range(TAIL_PASSES):
                end = self.recorded()  # only whole lines: they are never cut back
                if end == self.copied:
                    break
                _copy(source, self.copied, end, target, self._cancelled)
                self.copied = end
                os.fdatasync(target)  # as for the snapshot: not at the rename, under the lock

    def _cancelled(self) -> bool:
        return self.cancelled

    def discard(self) -> None:
        """Remove what it wrote (it is dropped, or it failed)."""
        _remove(self.temporary)
        _remove(self.tail)


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
        except Exception as exc:  # the line is written: the request stands, whatever this met
            self._compact_at = self._size + COMPACT_FLOOR
            log.warning(
                "store snapshot %s not folded (%s); compacting again after %d more bytes",
                self.snapshot_path,
                _reason(exc),
                COMPACT_FLOOR,
            )

    def compact(self, nodes: Mapping[str, Node]) -> None:
        """Write every node as a new snapshot and start an empty journal after it, at once.
        JournalError if the snapshot could not be written (the old files stand as they were)."""
        self._drop_fold()
        for leftover in (self.temporary_path, self.temporary_journal_path):  # a crash's: host RAM
            _remove(leftover)
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
        """Start a fold once the journal is past its bound; put a folded snapshot in place at the
        first change after it is written (or wait for it at twice the bound). Any exception:
        the fold failed, and its files are gone."""
        if self._fold is None:
            if self._size > self._compact_at:
                fold = _Fold(
                    snapshot_id=os.urandom(8).hex(),
                    after=self._follows,
                    journal=self.journal_path,
                    recorded=lambda: self._size,
                    offset=self._size,
                    nodes=dict(nodes),
                    temporary=self.temporary_path,
                    tail=self.temporary_journal_path,
                )
                self._fold = fold, self._background(fold.run)
            return
        fold, worker = self._fold
        if worker.is_alive() and self._size <= 2 * self._compact_at:
            return
        self._fold = None
        worker.join()
        if not fold.done:
            fold.discard()
            error = fold.error
            raise error if isinstance(error, Exception) else RuntimeError(f"it ended: {error!r}")
        self._switch(fold)

    def _switch(self, fold: _Fold) -> None:
        """Put ``fold``'s snapshot in place, then its journal, once the lines recorded since its
        last copy are copied over too. A crash between the two leaves this journal, which
        loading replays over the new snapshot."""
        old_snapshot = fd = None
        try:
            # Held open, the old snapshot's blocks are freed when it is closed, not as it is
            # replaced: 80 ms for 265 MiB on a disk, which _close_away spends off the lock.
            with contextlib.suppress(FileNotFoundError):
                old_snapshot = os.open(self.snapshot_path, os.O_RDONLY | os.O_CLOEXEC)
            fd = os.open(fold.tail, os.O_WRONLY | os.O_CLOEXEC)
            with _opened(self.journal_path, os.O_RDONLY) as source:
                _copy(source, fold.copied, self._size, fd)
            size = os.lseek(fd, 0, os.SEEK_END)
            # Appended to from now on (copy_file_range refuses a file opened to append to).
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
            os.replace(fold.temporary, self.snapshot_path)
            os.replace(fold.tail, self.journal_path)
        except BaseException:  # whatever it was, nothing of the fold is left open or behind
            for opened in (old_snapshot, fd):
                if opened is not None:
                    os.close(opened)
            fold.discard()
            raise
        assert self._fd is not None
        old_journal, self._fd = self._fd, fd
        self._size, self._follows = size, fold.snapshot_id
        self._compact_at = max(COMPACT_FLOOR, fold.size)
        _close_away(old_journal, *([] if old_snapshot is None else [old_snapshot]))

    def _drop_fold(self) -> None:
        """Stop writing a folded snapshot (the store writes a whole one, or stops)."""
        if self._fold is not None:
            fold, worker = self._fold
            self._fold = None
            fold.cancelled = True
            worker.join()
            fold.discard()

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
        fd = self._fd
        assert fd is not None
        data = line.encode("ascii")
        try:
            _write_whole(fd, data)
        except OSError as exc:
            self._cut(fd)
            raise JournalError(f"store journal {self.journal_path}: {exc}") from exc
        self._size += len(data)

    def _cut(self, fd: int) -> None:
        try:
            os.ftruncate(fd, self._size)
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
    was ``cancelled``: a fold's, which is also written out to the disk); on any exception it
    is removed."""
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
    except BaseException:
        _remove(temporary)
        raise


def _write_whole(fd: int, data: bytes) -> None:
    """Write ``data`` with one ``write``; OSError if only part of it was."""
    written = os.write(fd, data)
    if written != len(data):
        raise OSError(errno.ENOSPC, f"wrote {written} of {len(data)} bytes")


def _copy(
    source: int, start: int, end: int, target: int, cancelled: Callable[[], bool] | None = None
) -> None:
    """Append bytes ``start`` to ``end`` of ``source`` to ``target``, copied by the kernel
    (nothing passes through Python's buffers); OSError if they could not all be, or the copy
    was ``cancelled``."""
    at = os.lseek(target, 0, os.SEEK_END)
    while start < end:
        if cancelled is not None and cancelled():
            raise OSError(errno.ECANCELED, "cancelled")
        copied = os.copy_file_range(source, target, min(end - start, COPY_CHUNK), start, at)
        if copied == 0:
            raise OSError(errno.EIO, f"the journal ends before byte {end}")
        start, at = start + copied, at + copied


@contextlib.contextmanager
def _opened(path: Path, flags: int, mode: int = 0o600) -> Iterator[int]:
    fd = os.open(path, flags | os.O_CLOEXEC, mode)
    try:
        yield fd
    finally:
        os.close(fd)


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _close_away(*fds: int) -> None:
    """Close ``fds`` on a thread of its own: closing the last reference to a large file that
    is no longer linked frees its blocks, which takes a while."""

    def close() -> None:
        for fd in fds:
            os.close(fd)

    try:
        threading.Thread(target=close, name="store-free", daemon=True).start()
    except Exception:  # no thread to be had (RuntimeError, MemoryError): close them here
        close()


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):  # it may never have been made
        os.unlink(path)


# -- reading -------------------------------------------------------------------------------------


def _read(path: Path) -> tuple[dict[str, object] | None, list[tuple[str, object]]]:
    """``path``'s header (None without one) and its other lines, parsed and each with its
    "file:line" (a line that is not JSON, or a last line without its newline, is skipped: torn
    by a crash, or damage). StoreFormatError if the file is of another format."""
    header: dict[str, object] | None = None
    lines: list[tuple[str, object]] = []
    for number, text in _text_lines(path):
        where = f"{path}:{number}"
        if not text.endswith("\n"):  # its write stored all but its end: it was not answered
            log.warning("%s: last line without its newline skipped (torn by a crash?)", where)
            continue
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

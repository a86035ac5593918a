"""The live tree on disk, so that a dom0 restarted after a crash finds the store it had.

Two files in hyper's run directory (a tmpfs: they outlive dom0, not the host, and so do the
domains they describe):

- ``store.snapshot``: every node, one JSON line each, written to a temporary file and renamed
  into place, so it is always whole;
- ``store.journal``: every change to the live tree since that snapshot, one JSON line each,
  appended with one ``write`` as the change is made, before the request that made it is
  answered. A line is ``["p", path, value, perms, children]`` for a put or ``["d", path]``
  for a removal; values are bytes carried as latin-1 text.

Loading reads the snapshot, then replays the journal. Every line is absolute (a put names the
whole node, a removal is idempotent), so replaying lines the snapshot already holds changes
nothing: a crash between renaming a new snapshot and truncating the journal is harmless. A
last line torn by the crash is ignored. Once the journal holds many more lines than the tree has
nodes, it is folded into a new snapshot.

Only the tree is kept. Connections, watches and transactions belong to processes that a dom0
crash ends or disconnects (XenStore's own reconnection protocol drops them too); the store's
clients register their watches again when they reconnect.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from channels.xs_wire import Perm
from dom0.store.tree import Node

log = logging.getLogger(__name__)

#: Fold the journal into a snapshot past this many lines and 4 lines per node.
COMPACT_AFTER = 4096


class JournalError(Exception):
    """The store files cannot be written (the store then stops persisting, loudly)."""


class Journal:
    def __init__(self, directory: Path) -> None:
        self.snapshot_path = directory / "store.snapshot"
        self.journal_path = directory / "store.journal"
        self._fd: int | None = None
        self._lines = 0

    # -- loading -------------------------------------------------------------------------------

    def load(self) -> dict[str, Node]:
        """The tree as it was last recorded (empty if nothing was)."""
        nodes: dict[str, Node] = {}
        for entry in _lines(self.snapshot_path):
            _apply(nodes, entry)
        for entry in _lines(self.journal_path):
            _apply(nodes, entry)
        return nodes

    # -- recording -----------------------------------------------------------------------------

    def put(self, path: str, node: Node, nodes: dict[str, Node]) -> None:
        """Record that ``nodes`` (the live tree, already changed) now has ``node`` at ``path``."""
        self._append(_put_line(path, node), nodes)

    def delete(self, path: str, nodes: dict[str, Node]) -> None:
        self._append(_line(["d", path]), nodes)

    def compact(self, nodes: dict[str, Node]) -> None:
        """Write every node as the new snapshot and start an empty journal."""
        temporary = self.snapshot_path.with_suffix(".tmp")
        try:
            with open(temporary, "w", encoding="ascii") as out:
                for path, node in nodes.items():
                    out.write(_put_line(path, node))
            os.replace(temporary, self.snapshot_path)
            if self._fd is not None:
                os.close(self._fd)
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC
            self._fd = os.open(self.journal_path, flags, 0o600)
        except OSError as exc:
            raise JournalError(f"store journal in {self.journal_path.parent}: {exc}") from exc
        self._lines = 0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _append(self, line: str, nodes: dict[str, Node]) -> None:
        if self._fd is None:
            return
        if self._lines >= COMPACT_AFTER and self._lines >= 4 * len(nodes):
            self.compact(nodes)
            return  # the snapshot already holds this change: the caller made it first
        try:
            # One write: a crash leaves the whole line or none of it (or, at worst, a torn
            # last line, which loading skips).
            os.write(self._fd, line.encode())
        except OSError as exc:
            raise JournalError(f"{self.journal_path}: {exc}") from exc
        self._lines += 1


def _put_line(path: str, node: Node) -> str:
    perms = [p.encode() for p in node.perms]
    return _line(["p", path, node.value.decode("latin-1"), perms, sorted(node.children)])


def _line(entry: list[object]) -> str:
    return json.dumps(entry, ensure_ascii=True, separators=(",", ":")) + "\n"


def _lines(path: Path) -> Iterator[list[object]]:
    with (
        contextlib.suppress(FileNotFoundError),
        open(path, encoding="ascii", errors="replace") as source,
    ):
        for number, line in enumerate(source, 1):
            try:
                entry = json.loads(line)
            except ValueError:
                log.warning("%s:%d: unreadable line ignored (torn by a crash?)", path, number)
                continue
            if isinstance(entry, list):
                yield entry


def _apply(nodes: dict[str, Node], entry: list[object]) -> None:
    try:
        if entry[0] == "d" and isinstance(entry[1], str):
            nodes.pop(entry[1], None)
        elif entry[0] == "p":
            path, value, perms, children = entry[1:5]
            assert isinstance(path, str) and isinstance(value, str)
            children = frozenset(_strings(children))
            nodes[path] = Node(value.encode("latin-1"), _perms(perms), children)
    except (AssertionError, IndexError, ValueError, TypeError) as exc:
        log.warning("store journal: malformed entry ignored: %s", exc)


def _perms(items: object) -> tuple[Perm, ...]:
    perms = tuple(Perm.parse(p) for p in _strings(items))
    if not perms:
        raise ValueError("a node without an owner")
    return perms


def _strings(items: object) -> Iterable[str]:
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ValueError(f"expected a list of strings, not {items!r}")
    return items

"""The node tree: values, children and permissions, with a generation counter per node.

The tree is a flat map from absolute path to an immutable ``Node``. Every put stamps the node
with a new value of one store-wide counter, so "has this node changed since I looked" is one
integer comparison; that is how transactions detect conflicts. A node that is removed and made
again gets a fresh generation, and an absent node reads as generation None.

Requests are atomic. ``begin()`` starts an undo log (each path's node before its first change);
``commit()`` writes what the request changed to the journal as one line, and ``rollback()``
puts every node back as it was, owner counts included. A change made outside a request is not
journaled: only ``restore`` and the store's skeleton make those, and the store records the whole
tree right after them.

Each domain's footprint is counted as nodes change: the nodes it owns and their bytes
(``node_bytes``), which its quota bounds.

``View`` is what node operations run against: the live ``Tree`` itself, or a transaction's
private overlay (``transactions.Transaction``), so each operation is written once.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from channels.xs_wire import Perm

if TYPE_CHECKING:
    from xenstored.journal import Journal


@dataclass(frozen=True, slots=True)
class Node:
    value: bytes
    perms: tuple[Perm, ...]
    children: frozenset[str] = frozenset()
    generation: int = 0

    @property
    def owner(self) -> int:
        return self.perms[0].domid


def content_bytes(node: Node) -> int:
    """A node's value and permission entries as they go on the wire (each entry NUL-ended)."""
    return len(node.value) + sum(len(p.encode()) + 1 for p in node.perms)


def node_bytes(path: str, node: Node) -> int:
    """What a node costs its owner's memory quota: its path, value and permission entries
    (xenstored's quota-memory counts the same, plus its record header and the child list,
    which here is derived from the children's own paths)."""
    return len(path) + content_bytes(node)


class View(Protocol):
    """Read and change nodes."""

    def get(self, path: str) -> Node | None: ...

    def put(self, path: str, node: Node) -> None: ...

    def delete(self, path: str) -> None: ...


class Tree:
    """The live tree (a View). Callers hold the store lock. With a ``journal``, each request's
    changes are recorded when it commits (xenstored/journal.py)."""

    def __init__(self, journal: Journal | None = None) -> None:
        self._nodes: dict[str, Node] = {}
        self._generation = 0
        self._owned: Counter[int] = Counter()
        self._owned_bytes: Counter[int] = Counter()
        self._undo: dict[str, Node | None] | None = None
        self.journal = journal

    def restore(self, nodes: dict[str, Node]) -> None:
        """Fill an empty tree with nodes read back from a journal (not recorded again)."""
        for path, node in nodes.items():
            self.put(path, node)

    def __len__(self) -> int:
        return len(self._nodes)

    def get(self, path: str) -> Node | None:
        return self._nodes.get(path)

    def generation(self, path: str) -> int | None:
        node = self._nodes.get(path)
        return None if node is None else node.generation

    def put(self, path: str, node: Node) -> None:
        self._generation += 1
        self._set(path, Node(node.value, node.perms, node.children, self._generation))

    def delete(self, path: str) -> None:
        self._set(path, None)

    def _set(self, path: str, node: Node | None) -> None:
        old = self._nodes.get(path)
        if self._undo is not None and path not in self._undo:
            self._undo[path] = old
        if old is not None:
            self._count(path, old, -1)
        if node is None:
            self._nodes.pop(path, None)
        else:
            self._nodes[path] = node
            self._count(path, node, 1)

    def _count(self, path: str, node: Node, sign: int) -> None:
        self._owned[node.owner] += sign
        self._owned_bytes[node.owner] += sign * node_bytes(path, node)

    # -- requests ------------------------------------------------------------------------------

    def begin(self) -> None:
        """Start a request: its changes can be undone until ``commit()`` or ``rollback()``."""
        assert self._undo is None, "a request is already open on the store tree"
        self._undo = {}

    def grown(self) -> dict[int, str]:
        """Owners whose node count or bytes the open request increased, each with a path
        that did it (for the quota check before ``commit()``)."""
        assert self._undo is not None
        nodes: Counter[int] = Counter()
        size: Counter[int] = Counter()
        where: dict[int, str] = {}
        for path, old in self._undo.items():
            for node, sign in ((old, -1), (self._nodes.get(path), 1)):
                if node is not None:
                    nodes[node.owner] += sign
                    size[node.owner] += sign * node_bytes(path, node)
                    if sign > 0:
                        where.setdefault(node.owner, path)
        return {o: p for o, p in where.items() if nodes[o] > 0 or size[o] > 0}

    def commit(self, required: bool = True) -> None:
        """Record the open request's changes in the journal and close it. If the journal cannot
        record them: JournalError, and the request stays open for ``rollback()``; or, if the
        record is not ``required``, the changes stand and the journal learns that it lacks them
        (its next change writes a whole snapshot)."""
        assert self._undo is not None
        if self.journal is not None:
            changes = [
                (path, self._nodes.get(path))
                for path, old in self._undo.items()
                if _recorded_differently(old, self._nodes.get(path))
            ]
            if changes:
                self.journal.append(changes, self._nodes, required)
        self._undo = None

    def rollback(self) -> None:
        """Put back every node the open request changed, as it was, and close the request."""
        undo, self._undo = self._undo, None
        for path, old in (undo or {}).items():
            self._set(path, old)

    # -- accounting ----------------------------------------------------------------------------

    def record(self) -> None:
        """Write the whole tree to the journal as its new starting point."""
        if self.journal is not None:
            self.journal.compact(self._nodes)

    def owned(self, domid: int) -> int:
        return self._owned[domid]

    def owned_bytes(self, domid: int) -> int:
        """Bytes of the nodes ``domid`` owns (``node_bytes``), for its memory quota."""
        return self._owned_bytes[domid]

    def paths_owned_by(self, domid: int) -> list[str]:
        """Paths of the nodes ``domid`` owns, shallowest first."""
        paths = [p for p, n in self._nodes.items() if n.owner == domid]
        return sorted(paths, key=lambda p: (p.count("/"), p))


def _recorded_differently(old: Node | None, new: Node | None) -> bool:
    """Whether the journal must hear of a change: a node's children are not recorded (they
    follow from the paths), so a parent that only gained or lost a child costs nothing."""
    if old is None or new is None:
        return old is not new
    return old.value != new.value or old.perms != new.perms

"""The node tree: values, children and permissions, with a generation counter per node.

The tree is a flat map from absolute path to an immutable ``Node``. Every put stamps the node
with a new value of one store-wide counter, so "has this node changed since I looked" is one
integer comparison; that is how transactions detect conflicts. A node that is removed and made
again gets a fresh generation, and an absent node reads as generation None.

``View`` is what node operations run against: the live ``Tree`` itself, or a transaction's
private overlay (``transactions.Transaction``), so each operation is written once.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from channels.xs_wire import Perm

if TYPE_CHECKING:
    from dom0.store.journal import Journal


@dataclass(frozen=True, slots=True)
class Node:
    value: bytes
    perms: tuple[Perm, ...]
    children: frozenset[str] = frozenset()
    generation: int = 0

    @property
    def owner(self) -> int:
        return self.perms[0].domid


class View(Protocol):
    """Read and change nodes; ``owned`` counts the nodes a domain owns, for its quota."""

    def get(self, path: str) -> Node | None: ...

    def put(self, path: str, node: Node) -> None: ...

    def delete(self, path: str) -> None: ...

    def owned(self, domid: int) -> int: ...


class Tree:
    """The live tree (a View). Callers hold the store lock. With a ``journal``, every change
    is recorded as it is made (dom0/store/journal.py)."""

    def __init__(self, journal: Journal | None = None) -> None:
        self._nodes: dict[str, Node] = {}
        self._generation = 0
        self._owned: Counter[int] = Counter()
        self.journal = journal

    def restore(self, nodes: dict[str, Node]) -> None:
        """Fill an empty tree with nodes read back from a journal (not recorded again)."""
        journal, self.journal = self.journal, None
        for path, node in nodes.items():
            self.put(path, node)
        self.journal = journal

    def __len__(self) -> int:
        return len(self._nodes)

    def get(self, path: str) -> Node | None:
        return self._nodes.get(path)

    def generation(self, path: str) -> int | None:
        node = self._nodes.get(path)
        return None if node is None else node.generation

    def put(self, path: str, node: Node) -> None:
        self._generation += 1
        old = self._nodes.get(path)
        if old is not None:
            self._owned[old.owner] -= 1
        self._owned[node.owner] += 1
        self._nodes[path] = Node(node.value, node.perms, node.children, self._generation)
        if self.journal is not None:
            self.journal.put(path, node, self._nodes)

    def delete(self, path: str) -> None:
        old = self._nodes.pop(path, None)
        if old is not None:
            self._owned[old.owner] -= 1
            if self.journal is not None:
                self.journal.delete(path, self._nodes)

    def record(self) -> None:
        """Write the whole tree to the journal as its new starting point."""
        if self.journal is not None:
            self.journal.compact(self._nodes)

    def owned(self, domid: int) -> int:
        return self._owned[domid]

    def paths_owned_by(self, domid: int) -> list[str]:
        """Paths of the nodes ``domid`` owns, shallowest first."""
        paths = [p for p, n in self._nodes.items() if n.owner == domid]
        return sorted(paths, key=lambda p: (p.count("/"), p))

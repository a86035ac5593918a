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
from typing import Protocol

from channels.xs_wire import Perm


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
    """The live tree (a View). Callers hold the store lock."""

    def __init__(self) -> None:
        self._nodes: dict[str, Node] = {}
        self._generation = 0
        self._owned: Counter[int] = Counter()

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

    def delete(self, path: str) -> None:
        old = self._nodes.pop(path, None)
        if old is not None:
            self._owned[old.owner] -= 1

    def owned(self, domid: int) -> int:
        return self._owned[domid]

    def paths_owned_by(self, domid: int) -> list[str]:
        """Paths of the nodes ``domid`` owns, shallowest first."""
        paths = [p for p, n in self._nodes.items() if n.owner == domid]
        return sorted(paths, key=lambda p: (p.count("/"), p))

"""Store transactions: a private overlay per transaction, optimistic concurrency on commit.

A transaction is a View. Reads see the transaction's own changes, else the live tree; the first
time it touches a path (read, write, create, remove, list) it records that node's generation, or
None if absent. Changes go to a private overlay; watch changes are recorded, not fired.

Commit succeeds only if every recorded path still has the generation seen: then the overlay is
applied to the live tree and the recorded changes fire their watches. Otherwise the commit fails
with EAGAIN and the caller starts over. Abort drops everything. Because adding or removing a child
rewrites the parent, a transaction that listed a directory also conflicts with a new entry in it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from channels.xs_wire import Perm, XsErrno, XsError
from dom0.store.tree import Node, Tree

if TYPE_CHECKING:
    from dom0.store.connection import Connection


@dataclass(frozen=True, slots=True)
class Change:
    """One change for watches: ``path`` was written, or removed with its subtree.

    For a removal, ``removed`` maps every removed path to its permissions, so watchers can be
    checked against the node they could (or could not) read.
    """

    path: str
    removed: dict[str, tuple[Perm, ...]] | None = None


@dataclass(eq=False)
class Transaction:
    """An open transaction of one connection (a View over ``tree`` plus a private overlay)."""

    tx_id: int
    conn: Connection
    tree: Tree
    max_nodes: int | None  # None: unlimited (dom0)
    overlay: dict[str, Node | None] = field(default_factory=dict)
    accessed: dict[str, int | None] = field(default_factory=dict)
    changes: list[Change] = field(default_factory=list)
    owned_delta: Counter[int] = field(default_factory=Counter)

    def _touch(self, path: str) -> None:
        if path not in self.accessed:
            if self.max_nodes is not None and len(self.accessed) >= self.max_nodes:
                raise XsError(XsErrno.ENOSPC, path, "transaction touches too many nodes")
            self.accessed[path] = self.tree.generation(path)

    def get(self, path: str) -> Node | None:
        self._touch(path)
        if path in self.overlay:
            return self.overlay[path]
        return self.tree.get(path)

    def put(self, path: str, node: Node) -> None:
        old = self.get(path)
        if old is not None:
            self.owned_delta[old.owner] -= 1
        self.owned_delta[node.owner] += 1
        self.overlay[path] = node

    def delete(self, path: str) -> None:
        old = self.get(path)
        if old is not None:
            self.owned_delta[old.owner] -= 1
        self.overlay[path] = None

    def owned(self, domid: int) -> int:
        return self.tree.owned(domid) + self.owned_delta[domid]

    def conflicts(self) -> list[str]:
        """Paths changed in the live tree since this transaction first touched them."""
        return [p for p, gen in self.accessed.items() if self.tree.generation(p) != gen]

    def apply(self) -> None:
        """Write the overlay into the live tree (after ``conflicts()`` came back empty)."""
        for path, node in self.overlay.items():
            if node is None:
                self.tree.delete(path)
            else:
                self.tree.put(path, node)

"""Store transactions: a private overlay per transaction, optimistic concurrency on commit.

A transaction is a View. Reads see the transaction's own changes, else the live tree; the first
time it touches a path (read, write, create, remove, list) it records that node's generation, or
None if absent. Changes go to a private overlay; watch changes are recorded, not fired.

Commit succeeds only if every recorded path still has the generation seen: then the overlay is
applied to the live tree and the recorded changes fire their watches. Otherwise the commit fails
with EAGAIN and the caller starts over. Abort drops everything. Because adding or removing a child
rewrites the parent, a transaction that listed a directory also conflicts with a new entry in it.

Bounds, for a domU (dom0 has none). A transaction holds at most ``transaction_nodes`` paths, and
all the open transactions of its domain together hold at most ``memory`` bytes (the paths they
touched, and the values and permissions in their overlays), so that its transactions at most
double what a domain makes the store hold: past either, ENOSPC. What a domain's transactions
hold is counted as it changes, in one ``Held`` per domain, so the check costs O(1) however many
connections and transactions there are. A transaction lives at most
``transaction_lifetime`` seconds: then the store drops it, and its next request or its end gets
EAGAIN, so a client's transaction loop simply starts over.

Requests are atomic in a transaction too: ``begin()`` starts an undo log of the overlay, which
``end_request(ok=False)`` plays back (the paths touched stay recorded: the client saw them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from channels.xs_wire import Perm, XsErrno, XsError
from xenstored.quota import Quota
from xenstored.tree import Node, Tree, content_bytes

if TYPE_CHECKING:
    from xenstored.connection import Connection


@dataclass(frozen=True, slots=True)
class Change:
    """One change for watches: ``path`` was written, or removed with its subtree.

    For a removal, ``removed`` maps every removed path to its permissions, so watchers can be
    checked against the node they could (or could not) read.
    """

    path: str
    removed: dict[str, tuple[Perm, ...]] | None = None


@dataclass(eq=False)
class Held:
    """What the open transactions of one domain hold together: how many there are, and the bytes
    of their touched paths and their overlays' values and permissions."""

    transactions: int = 0
    bytes: int = 0


@dataclass(eq=False)
class Transaction:
    """An open transaction of one connection (a View over ``tree`` plus a private overlay)."""

    tx_id: int
    conn: Connection
    tree: Tree
    limits: Quota | None  # None: unbounded (dom0)
    deadline: float | None  # on the store's clock, past which it is dropped; None: never
    domain: Held  # what the open transactions of its domain hold, its own included
    overlay: dict[str, Node | None] = field(default_factory=dict)
    accessed: dict[str, int | None] = field(default_factory=dict)
    changes: dict[tuple[str, bool], Change] = field(default_factory=dict)
    held: int = 0  # bytes of the touched paths and the overlay's values and permissions
    ended: bool = False
    _undo: dict[str, tuple[bool, Node | None]] | None = None

    def __post_init__(self) -> None:
        self.domain.transactions += 1

    def end(self) -> None:
        """It is over (committed, aborted, expired, or its connection gone): what it held is its
        domain's no longer."""
        if not self.ended:
            self.ended = True
            self.domain.transactions -= 1
            self.domain.bytes -= self.held

    def _touch(self, path: str) -> None:
        if path not in self.accessed:
            if self.limits is not None:
                if len(self.accessed) >= self.limits.transaction_nodes:
                    raise XsError(XsErrno.ENOSPC, path, "transaction touches too many nodes")
                self._make_room(path, len(path))
            self.accessed[path] = self.tree.generation(path)
            self._hold(len(path))

    def _make_room(self, path: str, more: int) -> None:
        if self.limits is None or more <= 0:
            return
        held = self.domain.bytes
        if held + more > self.limits.memory:
            raise XsError(XsErrno.ENOSPC, path, f"the domain's transactions hold {held} bytes")

    def get(self, path: str) -> Node | None:
        self._touch(path)
        if path in self.overlay:
            return self.overlay[path]
        return self.tree.get(path)

    def put(self, path: str, node: Node) -> None:
        self.get(path)
        self._make_room(path, _held(node) - _held(self.overlay.get(path)))
        self._replace(path, True, node)

    def delete(self, path: str) -> None:
        self.get(path)
        self._replace(path, True, None)

    def _replace(self, path: str, present: bool, node: Node | None) -> None:
        """Make the overlay hold ``node`` for ``path`` (``present``) or nothing, counting what
        it holds."""
        was_present, was = path in self.overlay, self.overlay.get(path)
        self._hold(_held(node) - _held(was))
        if self._undo is not None:
            self._undo.setdefault(path, (was_present, was))
        if present:
            self.overlay[path] = node
        else:
            self.overlay.pop(path, None)

    def _hold(self, more: int) -> None:
        self.held += more
        if not self.ended:  # a failed request's undo may come after its TRANSACTION_END
            self.domain.bytes += more

    def record(self, change: Change) -> None:
        """Keep ``change`` for the watches to fire at commit (once per path and kind)."""
        self.changes.setdefault((change.path, change.removed is not None), change)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    # -- requests ------------------------------------------------------------------------------

    def begin(self) -> None:
        """A request starts using this transaction: its overlay changes can be undone."""
        if self._undo is None:
            self._undo = {}

    def end_request(self, ok: bool) -> None:
        """The request is over; if it failed, undo what it did to the overlay."""
        undo, self._undo = self._undo, None
        if not ok and undo:
            for path, (present, node) in undo.items():
                self._replace(path, present, node)

    # -- commit --------------------------------------------------------------------------------

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


def _held(node: Node | None) -> int:
    return 0 if node is None else content_bytes(node)

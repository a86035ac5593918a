"""The store: tree, connections, watches, transactions and domains behind one lock.

``Store`` is what dom0 runs. Transports attach clients with ``connect(domid, send)``; the
toolstack tells it about domains with ``introduce_domain``/``release_domain`` (or the INTRODUCE
and RELEASE requests). Request decoding lives in ``requests``, node semantics in ``nodes``.

Watch delivery. A change fires every node watch it matches (see ``watches``), but an event only
reaches a connection whose domain may read the node reported: for a write, the node as it now
is; for a removal, the removed node (the nearest removed ancestor of a watched path), checked
against the permissions it had. dom0 receives everything. Special watches fire only for dom0.
Every watch also fires once, for its own path, when it is registered.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable

from channels.xenbus import (
    INTRODUCE_DOMAIN_WATCH,
    RELEASE_DOMAIN_WATCH,
    STORE_SKELETON,
    basename,
    parent_path,
)
from channels.xs_wire import Message, Perm, XsErrno, XsError, check_domid
from dom0.store import nodes, perms, requests
from dom0.store.connection import Connection, Send
from dom0.store.domains import Domains
from dom0.store.journal import Journal
from dom0.store.quota import Quota
from dom0.store.transactions import Change, Transaction
from dom0.store.tree import Node, Tree, View
from dom0.store.watches import Watch, WatchTable

log = logging.getLogger(__name__)


class Store:
    """A XenStore-like store. Thread-safe: every entry point takes ``lock``."""

    def __init__(
        self, quota: Quota | None = None, journal: Journal | None = None, recover: bool = False
    ) -> None:
        """With a ``journal`` the tree is kept on disk; ``recover`` starts from what it holds
        (a restarted dom0) instead of an empty store."""
        self.lock = threading.RLock()
        self.tree = Tree(journal)
        self.domains = Domains(quota if quota is not None else Quota())
        self.watches = WatchTable()
        self._connections: set[Connection] = set()
        self._conn_ids = itertools.count(1)
        self._tx_ids = itertools.count(1)
        recovered = journal.load() if journal is not None and recover else {}
        if recovered:
            self.tree.restore(recovered)
        else:
            self._make_skeleton()
        self.tree.record()

    def _make_skeleton(self) -> None:
        dom0_only = (Perm(0, "n"),)
        for path in STORE_SKELETON:
            children = frozenset(
                basename(p) for p in STORE_SKELETON if p != "/" and parent_path(p) == path
            )
            self.tree.put(path, Node(b"", dom0_only, children))

    # -- public API ----------------------------------------------------------------------------

    def connect(
        self, domid: int, send: Send, on_close: Callable[[], None] | None = None
    ) -> Connection:
        """Attach a client of ``domid``; ``send`` is the transport's non-blocking writer and
        ``on_close`` is called if the store drops the connection (see connection.py)."""
        check_domid(domid)
        with self.lock:
            conn = Connection(self, domid, send, next(self._conn_ids), on_close)
            self._connections.add(conn)
            return conn

    def introduce_domain(self, domid: int) -> None:
        """``domid`` now exists (fires @introduceDomain if it is new)."""
        check_domid(domid)
        with self.lock:
            if self.domains.introduce(domid):
                self._fire_special(INTRODUCE_DOMAIN_WATCH)

    def release_domain(self, domid: int) -> None:
        """Forget ``domid``: drop its connections (their watches and transactions), remove the
        nodes it owns with their subtrees, and fire @releaseDomain."""
        if perms.is_privileged(check_domid(domid)):
            raise ValueError("dom0 cannot be released from the store")
        with self.lock:
            for conn in [c for c in self._connections if c.domid == domid]:
                conn.close()
            for path in self.tree.paths_owned_by(domid):
                if self.tree.get(path) is not None:  # not already gone with an ancestor
                    self._fire(Change(path, nodes.remove_subtree(self.tree, path)))
            self.domains.release(domid)
            self._fire_special(RELEASE_DOMAIN_WATCH)

    def is_introduced(self, domid: int) -> bool:
        with self.lock:
            return self.domains.is_introduced(domid)

    def set_quota(self, domid: int, quota: Quota) -> None:
        """Give ``domid`` its own quota (xl.cfg xenstore_quota); dom0 stays exempt."""
        with self.lock:
            self.domains.set_quota(domid, quota)

    def node_count(self, domid: int) -> int:
        """Nodes owned by ``domid``."""
        with self.lock:
            return self.tree.owned(domid)

    # -- used by connections and request handlers (store lock held) ---------------------------

    def dispatch(self, conn: Connection, msg: Message) -> bytes:
        with self.lock:
            return requests.dispatch(self, conn, msg)

    def forget_connection(self, conn: Connection) -> None:
        self._connections.discard(conn)
        self.watches.remove_conn(conn)
        conn.transactions.clear()

    def view(self, conn: Connection, tx_id: int) -> tuple[View, Transaction | None]:
        """The tree a request works on: live, or its transaction's overlay."""
        if tx_id == 0:
            return self.tree, None
        tx = conn.transactions.get(tx_id)
        if tx is None:
            raise XsError(XsErrno.ENOENT, "", f"no transaction {tx_id} on this connection")
        return tx, tx

    def changed(self, change: Change | None, tx: Transaction | None) -> None:
        """A node operation made ``change``: fire it now, or at commit if in a transaction."""
        if change is None:
            return
        if tx is None:
            self._fire(change)
        else:
            tx.changes.append(change)

    def add_watch(self, watch: Watch) -> None:
        limits = self.domains.quota(watch.conn.domid)
        if limits is not None and self._domain_watches(watch.conn.domid) >= limits.watches:
            raise XsError(XsErrno.E2BIG, watch.path, f"domain has {limits.watches} watches")
        if not self.watches.add(watch):
            raise XsError(XsErrno.EEXIST, watch.path, f"watch token {watch.token!r} exists")
        watch.conn.queue_event(watch, watch.path)  # the registration event

    def _domain_watches(self, domid: int) -> int:
        return sum(self.watches.count(c) for c in self._connections if c.domid == domid)

    def start_transaction(self, conn: Connection) -> Transaction:
        limits = self.domains.quota(conn.domid)
        if limits is not None:
            open_txs = sum(len(c.transactions) for c in self._connections if c.domid == conn.domid)
            if open_txs >= limits.transactions:
                raise XsError(XsErrno.ENOSPC, "", f"domain has {limits.transactions} transactions")
        tx_id = next(self._tx_ids) % 0xFFFFFFFF + 1  # never 0, which means "no transaction"
        max_nodes = limits.transaction_nodes if limits is not None else None
        tx = Transaction(tx_id, conn, self.tree, max_nodes)
        conn.transactions[tx_id] = tx
        return tx

    def end_transaction(self, conn: Connection, tx: Transaction, commit: bool) -> None:
        del conn.transactions[tx.tx_id]
        if not commit:
            return
        conflicts = tx.conflicts()
        if conflicts:
            raise XsError(XsErrno.EAGAIN, conflicts[0], "changed since the transaction read it")
        limits = self.domains.quota(conn.domid)
        if limits is not None and tx.owned(conn.domid) > limits.nodes:
            raise XsError(XsErrno.ENOSPC, "", f"domain {conn.domid} would own too many nodes")
        tx.apply()
        for change in _dedupe(tx.changes):
            self._fire(change)

    # -- watch firing --------------------------------------------------------------------------

    def _fire(self, change: Change) -> None:
        removal = change.removed is not None
        for watch in self.watches.nodes():
            path = watch.event_path(change.path, removal)
            if path is not None and self._may_see(watch.conn.domid, path, change):
                watch.conn.queue_event(watch, path)

    def _may_see(self, domid: int, path: str, change: Change) -> bool:
        if perms.is_privileged(domid):
            return True
        if change.removed is not None:
            node_perms = _removed_perms(change.removed, path)
        else:
            node = self.tree.get(path)
            node_perms = node.perms if node is not None else None
        return node_perms is not None and perms.allows(node_perms, domid, "r")

    def _fire_special(self, path: str) -> None:
        for watch in self.watches.special(path):
            if perms.is_privileged(watch.conn.domid):
                watch.conn.queue_event(watch, path)


def _removed_perms(removed: dict[str, tuple[Perm, ...]], path: str) -> tuple[Perm, ...] | None:
    """Permissions of ``path`` if it was removed, else of its nearest removed ancestor."""
    while True:
        if path in removed:
            return removed[path]
        if path == "/":
            return None
        path = parent_path(path)


def _dedupe(changes: list[Change]) -> list[Change]:
    seen: set[tuple[str, bool]] = set()
    unique = []
    for change in changes:
        key = (change.path, change.removed is not None)
        if key not in seen:
            seen.add(key)
            unique.append(change)
    return unique

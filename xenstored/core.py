"""The store: tree, connections, watches, transactions and domains behind one lock.

``Store`` is what dom0 runs. Transports attach clients with ``connect(domid, send)``; the
toolstack tells it about domains with ``introduce_domain``/``release_domain`` (or the INTRODUCE
and RELEASE requests). Request decoding lives in ``requests``, node semantics in ``nodes``.

Watch delivery. A change fires every node watch it matches (see ``watches``), but an event only
reaches a connection whose domain may read the node reported: for a write, the node as it now
is; for a removal, the removed node (the nearest removed ancestor of a watched path), checked
against the permissions it had. dom0 receives everything. Special watches fire only for dom0.
Every watch also fires once, for its own path, when it is registered.

Requests are atomic. Each request (and ``release_domain``) runs in ``_request``: its changes to
the live tree are checked against their owners' quotas and written to the journal as one line,
and only then do their watches fire and its other effects (a release's) take place, the latter
even if firing the former fails (a released domain is never left half forgotten). If anything
before that fails, the tree (and the transaction overlay the request used) is put back as it
was and the caller gets an error: ENOSPC past a quota, EIO if the journal could not be written
(as xenstored answers a failed database write). The store goes on.

dom0 is exempt from the journal as it is from quotas: a request of dom0's that the journal
cannot record stands all the same (logged once a run of failures), and the journal writes a
whole snapshot, which holds it, at the next change it can record. What dom0 writes is the host's
own state (a domain destroyed, a device connected): refusing it would undo a teardown that has
already happened in the host, leaving nodes and an introduced domain behind, to spare a file
that only serves a restarted dom0. Should dom0 crash before the files are written again, the
restarted dom0 reconciles the store it recovers with hyperd's domains (toolstack.recover).

Transaction expiry. A domU's transaction is dropped once it is ``transaction_lifetime`` seconds
old, whether or not its owner ever sends another request: one alarm, armed only while a domU
holds a transaction, wakes the store at the earliest deadline (coalescing those within
EXPIRY_SLACK of each other), so an idle store never wakes.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from channels.xenbus import (
    INTRODUCE_DOMAIN_WATCH,
    RELEASE_DOMAIN_WATCH,
    STORE_SKELETON,
    basename,
    parent_path,
)
from channels.xs_wire import Message, Perm, XsErrno, XsError, check_domid
from xenstored import nodes, perms, requests
from xenstored.connection import Connection, Send
from xenstored.domains import Domains
from xenstored.journal import Journal, JournalError
from xenstored.quota import Quota
from xenstored.transactions import Change, Held, Transaction
from xenstored.tree import Node, Tree, View
from xenstored.watches import Watch, WatchTable

log = logging.getLogger(__name__)

#: Transactions whose deadlines fall within this many seconds of each other expire together.
EXPIRY_SLACK = 1.0


class Alarm(Protocol):
    def cancel(self) -> None: ...


#: ``schedule(delay, callback)``: run ``callback`` once, on a thread of its own, after ``delay``
#: seconds unless cancelled.
Schedule = Callable[[float, Callable[[], None]], Alarm]


def _timer(delay: float, callback: Callable[[], None]) -> Alarm:
    timer = threading.Timer(delay, callback)
    timer.daemon = True
    timer.start()
    return timer


@dataclass
class _OpenRequest:
    """The request being run, and what it leaves to do once it is recorded."""

    changes: list[Change] = field(default_factory=list)  # to fire
    views: list[Transaction] = field(default_factory=list)  # transactions it used
    effects: list[Callable[[], None]] = field(default_factory=list)  # to run after its watches


class Store:
    """A XenStore-like store. Thread-safe: every entry point takes ``lock``."""

    def __init__(
        self,
        quota: Quota | None = None,
        journal: Journal | None = None,
        recover: bool = False,
        clock: Callable[[], float] = time.monotonic,
        schedule: Schedule = _timer,
    ) -> None:
        """With a ``journal`` the tree is kept on disk; ``recover`` starts from what it holds
        (a restarted dom0) instead of an empty store. ``clock`` and ``schedule`` time the
        transactions' lifetimes (tests drive them by hand)."""
        self.lock = threading.RLock()
        self.tree = Tree(journal)
        self.domains = Domains(quota if quota is not None else Quota())
        self.watches = WatchTable()
        self._connections: set[Connection] = set()
        self._conn_ids = itertools.count(1)
        self._tx_ids = itertools.count(1)
        self._clock = clock
        self._schedule = schedule
        self._alarm: tuple[float, Alarm] | None = None  # (when, alarm) for expiring transactions
        self._open: _OpenRequest | None = None
        self._held: dict[int, Held] = {}  # by domain, while it has open transactions
        #: Told (store lock held) of each INTRODUCE and of each domain released, by a store
        #: that serves the domains' rings itself (xenstored/rings.py).
        self.on_introduce: Callable[[int], None] | None = None
        self.on_release: Callable[[int], None] | None = None
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
            if self.on_introduce is not None:
                self.on_introduce(domid)

    def release_domain(self, domid: int) -> None:
        """Forget ``domid``: remove the nodes it owns with their subtrees, then (once that is
        recorded) drop its connections (their watches and transactions) and fire
        @releaseDomain. Within a request (RELEASE), all of it happens once that request is
        recorded, or none of it."""
        if perms.is_privileged(check_domid(domid)):
            raise ValueError("dom0 cannot be released from the store")
        with self.lock, self._request(perms.PRIVILEGED_DOMID):
            for path in self.tree.paths_owned_by(domid):
                if self.tree.get(path) is not None:  # not already gone with an ancestor
                    self.changed(Change(path, nodes.remove_subtree(self.tree, path)), None)
            assert self._open is not None
            self._open.effects.append(lambda: self._forget_domain(domid))

    def _forget_domain(self, domid: int) -> None:
        for conn in [c for c in self._connections if c.domid == domid]:
            conn.close()
        self.domains.release(domid)
        self._fire_special(RELEASE_DOMAIN_WATCH)
        if self.on_release is not None:
            self.on_release(domid)

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

    def memory_used(self, domid: int) -> int:
        """Bytes of the nodes owned by ``domid``, as its memory quota counts them."""
        with self.lock:
            return self.tree.owned_bytes(domid)

    # -- used by connections and request handlers (store lock held) ---------------------------

    def dispatch(self, conn: Connection, msg: Message) -> bytes:
        with self.lock, self._request(conn.domid):
            return requests.dispatch(self, conn, msg)

    @contextlib.contextmanager
    def _request(self, domid: int) -> Iterator[None]:
        """Run one request of ``domid`` all or nothing (see the module's docstring)."""
        if self._open is not None:  # a request within one (the lock is re-entrant): its
            yield  # changes and effects wait for the outermost one to be recorded
            return
        request = self._open = _OpenRequest()
        self.tree.begin()
        ok = False
        try:
            yield
            self._check_quotas(domid)
            self.tree.commit(required=not perms.is_privileged(domid))
            ok = True
        except JournalError as exc:  # logged by the journal
            raise XsError(XsErrno.EIO, "", f"the store could not record it: {exc}") from exc
        finally:
            self._open = None
            if not ok:
                self.tree.rollback()
            for tx in request.views:
                tx.end_request(ok)
        try:
            for change in request.changes:
                self._fire(change)
        finally:  # a release's effects take place however its watches went
            for effect in request.effects:
                effect()

    def _check_quotas(self, domid: int) -> None:
        """ENOSPC if the open request took a domain past its node or memory quota (a request of
        dom0's never does: it is exempt, whoever owns what it writes)."""
        if perms.is_privileged(domid):
            return
        for owner, path in self.tree.grown().items():
            limits = self.domains.quota(owner)
            if limits is None:
                continue
            if self.tree.owned(owner) > limits.nodes:
                raise XsError(XsErrno.ENOSPC, path, f"domain {owner} owns {limits.nodes} nodes")
            if self.tree.owned_bytes(owner) > limits.memory:
                raise XsError(XsErrno.ENOSPC, path, f"domain {owner} owns {limits.memory} bytes")

    def forget_connection(self, conn: Connection) -> None:
        self._connections.discard(conn)
        self.watches.remove_conn(conn)
        self.end_transactions(conn)

    def view(self, conn: Connection, tx_id: int) -> tuple[View, Transaction | None]:
        """The tree a request works on: live, or its transaction's overlay."""
        if tx_id == 0:
            return self.tree, None
        tx = conn.transactions.get(tx_id)
        if tx is not None and tx.expired(self._clock()):
            self._expire(tx)
            tx = None
        if tx is None:
            if tx_id in conn.expired_transactions:
                raise XsError(XsErrno.EAGAIN, "", f"transaction {tx_id} outlived its lifetime")
            raise XsError(XsErrno.ENOENT, "", f"no transaction {tx_id} on this connection")
        if self._open is not None and tx not in self._open.views:
            tx.begin()
            self._open.views.append(tx)
        return tx, tx

    def changed(self, change: Change | None, tx: Transaction | None) -> None:
        """A node operation made ``change``: it fires once the request is recorded, or once
        the transaction commits."""
        if change is None:
            return
        if tx is not None:
            tx.record(change)
        else:
            assert self._open is not None, "a change to the store outside a request"
            self._open.changes.append(change)

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
        domid = conn.domid
        limits = self.domains.quota(domid)
        held = self._held.setdefault(domid, Held())
        if limits is not None and held.transactions >= limits.transactions:
            raise XsError(XsErrno.ENOSPC, "", f"domain has {limits.transactions} transactions")
        tx_id = next(self._tx_ids) % 0xFFFFFFFF + 1  # never 0, which means "no transaction"
        deadline = None
        if limits is not None:
            deadline = self._clock() + limits.transaction_lifetime
            self._arm_expiry(deadline)
        tx = Transaction(tx_id, conn, self.tree, limits, deadline, held)
        conn.transactions[tx_id] = tx
        return tx

    def _end(self, tx: Transaction) -> None:
        """``tx`` is over: what it held is free (every way a transaction ends comes here)."""
        del tx.conn.transactions[tx.tx_id]
        tx.end()
        if tx.domain.transactions == 0:
            self._held.pop(tx.conn.domid, None)

    def end_transactions(self, conn: Connection) -> None:
        """End every transaction of ``conn`` (it is closed, or reset its watches)."""
        for tx in list(conn.transactions.values()):
            self._end(tx)

    def end_transaction(self, conn: Connection, tx: Transaction, commit: bool) -> None:
        """Commit (the request's quota check covers what it applies) or abort ``tx``."""
        self._end(tx)
        if not commit:
            return
        conflicts = tx.conflicts()
        if conflicts:
            raise XsError(XsErrno.EAGAIN, conflicts[0], "changed since the transaction read it")
        tx.apply()
        for change in tx.changes.values():
            self.changed(change, None)

    # -- transaction expiry --------------------------------------------------------------------

    def _arm_expiry(self, when: float) -> None:
        """Have ``_expire_transactions`` run at ``when`` at the latest."""
        if self._alarm is not None:
            if self._alarm[0] <= when:
                return
            self._alarm[1].cancel()
        delay = max(0.0, when - self._clock())
        self._alarm = (when, self._schedule(delay, self._expire_transactions))

    def _expire_transactions(self) -> None:
        """The alarm: drop every transaction past its deadline, arm for the next one. (An alarm
        cancelled as it went off only costs a spare pass.)"""
        with self.lock:
            self._alarm = None
            now = self._clock()
            upcoming = []
            for conn in list(self._connections):
                for tx in list(conn.transactions.values()):
                    if tx.expired(now):
                        self._expire(tx)
                    elif tx.deadline is not None:
                        upcoming.append(tx.deadline)
            if upcoming:
                self._arm_expiry(max(min(upcoming), now + EXPIRY_SLACK))

    def _expire(self, tx: Transaction) -> None:
        log.debug("%r: transaction %d dropped after its lifetime", tx.conn, tx.tx_id)
        self._end(tx)
        tx.conn.expired_transactions.append(tx.tx_id)

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

"""Store client (libxenstore's role), independent of the transport it runs over.

A transport is two callables and a thread:

* ``send(data: bytes) -> None`` given to ``XsClient``: writes one whole framed request. It may
  block; the client serialises calls to it, so messages never interleave.
* the transport's reader thread calls ``client.feed(data)`` with whatever bytes arrived, in order,
  and ``client.connection_lost(exc)`` once when the stream ends.

Any number of threads may call the client at once. Each request gets a fresh req_id and waits
(up to ``timeout`` seconds) for the reply carrying that req_id; replies may come in any order.
The server's ERROR replies raise ``XsError`` (``.errno_name`` such as ``"EACCES"``, ``.path``);
no reply in time raises ``XsTimeoutError``; a dead transport raises ``XsConnectionLost``.

Watches. ``watch(path)`` returns a ``Watch`` whose events land in a ``WatchQueue``, a
thread-safe queue that consumers block on with ``get(timeout)``. By default each watch has its
own queue; pass one shared ``WatchQueue`` to several ``watch`` calls to serve them from one
thread (each ``WatchEvent`` carries its token). Events are never delivered on the transport's
reader thread to user code, so a consumer may call the store freely. The queue is bounded
without losing information: a pending (path, token) pair is not queued twice, and once a queue
holds ``max_pending`` events, a watch's pending events collapse into one event for the watched
path itself, which tells the consumer "something below changed, re-read" and absorbs that
watch's further events until it is taken (a watch storm from a hostile peer costs bounded
memory; XSA-349). The server fires every watch once when it is registered, so the first
event is already queued when ``watch`` returns or shortly after.

Transactions. ``transaction_start()`` returns a ``Transaction``; pass it as ``tx=`` (or call its
own methods) so requests carry its tx_id, then ``transaction_end``. ``transaction(fn)`` runs
``fn(tx)`` and commits, starting over on EAGAIN up to ``attempts`` times, as every Xen client does.

Reconnection (the xenstore ring's, xenstore-ring.txt). A transport whose server restarted
calls ``suspend()`` when it sees the old server gone, resets its rings with the new one, and
calls ``resume(send)``. Meanwhile calls wait instead of failing (their timeouts start over at
``resume``); a send that finds the transport resetting raises ``XsResend`` inside ``send`` and
is sent again once the transport is back. ``resume`` sends again every request the old server
took but never answered, in the order first sent, and registers every watch again (each then
fires once, so consumers re-read what they watch). Transactions do not survive the server:
requests in one opened before ``resume`` fail with EAGAIN, and ``transaction(fn)`` starts over.

``XsStreamTransport`` runs a client over a connected stream socket (a Unix socket to dom0's
store, or one end of a socketpair).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Self, TypeVar

from channels.errors import Closed, HyperError, ProtocolViolation
from channels.xenbus import validate_path, validate_watch_path
from channels.xs_wire import (
    XENSTORE_PAYLOAD_MAX,
    Decoder,
    Message,
    Perm,
    XsErrno,
    XsError,
    XsType,
    check_domid,
    encode,
    join_strings,
    split_strings,
)

__all__ = [
    "Perm",
    "ProtocolViolation",
    "Transaction",
    "Watch",
    "WatchEvent",
    "WatchQueue",
    "XsClient",
    "XsConnectionLost",
    "XsError",
    "XsStreamTransport",
    "XsTimeoutError",
    "connect_unix",
]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
#: How long a call waits for a suspended transport to resume before it gives up.
RECONNECT_TIMEOUT = 120.0
T = TypeVar("T")


class XsTimeoutError(HyperError, TimeoutError):
    """No reply (or no watch event) arrived within the timeout."""


class XsConnectionLost(Closed, ConnectionError):
    """The transport to the store is gone (closed by us, or broken by the other side)."""


class XsResend(Exception):
    """Raised by a transport's ``send``: it is resetting its connection and did not send the
    message; the client sends it again after ``resume``."""


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """A watch fired: ``path`` changed (or is the watched path itself), for watch ``token``."""

    path: str
    token: str


class WatchQueue:
    """Thread-safe, bounded, coalescing queue of WatchEvents (see the module docstring)."""

    def __init__(self, max_pending: int = 256) -> None:
        self._cond = threading.Condition()
        self._events: OrderedDict[WatchEvent, None] = OrderedDict()
        self._max_pending = max_pending
        self._collapsed: dict[str, WatchEvent] = {}  # token -> its pending catch-all event
        self._lost: BaseException | None = None

    def __len__(self) -> int:
        with self._cond:
            return len(self._events)

    def put(self, event: WatchEvent, watched_path: str) -> None:
        """Queue ``event``; past ``max_pending`` it collapses to ``watched_path`` for its token."""
        with self._cond:
            if event in self._events or event.token in self._collapsed:
                return  # already pending, or covered by a pending catch-all event
            if len(self._events) >= self._max_pending:
                self._collapse(event.token, watched_path)
            else:
                self._events[event] = None
            self._cond.notify_all()

    def _collapse(self, token: str, watched_path: str) -> None:
        for pending in [e for e in self._events if e.token == token]:
            del self._events[pending]
        catch_all = WatchEvent(watched_path, token)
        self._events[catch_all] = None
        self._collapsed[token] = catch_all

    def _pop(self) -> WatchEvent:
        event = next(iter(self._events))
        del self._events[event]
        if self._collapsed.get(event.token) == event:
            del self._collapsed[event.token]
        return event

    def get(self, timeout: float | None = None) -> WatchEvent:
        """Pop the oldest event.

        Raises XsTimeoutError after ``timeout`` seconds, XsConnectionLost if the client died.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self._events or self._lost, timeout):
                raise XsTimeoutError(f"no store watch event within {timeout} s")
            if not self._events:
                lost = XsConnectionLost("store connection lost while waiting for a watch event")
                raise lost from self._lost
            return self._pop()

    def get_nowait(self) -> WatchEvent | None:
        with self._cond:
            return self._pop() if self._events else None

    def close(self, exc: BaseException) -> None:
        """Wake every consumer: the connection is gone (queued events are still returned first)."""
        with self._cond:
            self._lost = exc
            self._cond.notify_all()


class Watch:
    """A registered watch. ``get`` reads its queue (shared with other watches if one was passed).

    Use as a context manager to unwatch on exit.
    """

    def __init__(
        self,
        client: XsClient,
        path: str,
        token: str,
        queue: WatchQueue,
        depth: int | None = None,
    ) -> None:
        self.client = client
        self.path = path
        self.token = token
        self.queue = queue
        self.depth = depth

    def request(self) -> bytes:
        """The payload of the XS_WATCH that registers it (again, after a reconnection)."""
        if self.depth is None:
            return join_strings(self.path, self.token)
        return join_strings(self.path, self.token, str(int(self.depth)))

    def get(self, timeout: float | None = None) -> WatchEvent:
        try:
            return self.queue.get(timeout)
        except XsTimeoutError as exc:
            raise XsTimeoutError(
                f"no store watch event for {self.path} within {timeout} s"
            ) from exc

    def unwatch(self) -> None:
        self.client.unwatch(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.unwatch()
        except (XsError, XsConnectionLost, XsTimeoutError):
            if et is None:
                raise
            log.debug("unwatch %s during unwinding failed", self.path, exc_info=True)


class Transaction:
    """An open store transaction; its methods are the client's, carrying this tx_id."""

    def __init__(self, client: XsClient, tx_id: int, epoch: int = 0) -> None:
        self.client = client
        self.tx_id = tx_id
        self.epoch = epoch  # the client's connection epoch it was opened in

    def __repr__(self) -> str:
        return f"Transaction(tx_id={self.tx_id})"

    def read(self, path: str) -> str:
        return self.client.read(path, tx=self)

    def read_bytes(self, path: str) -> bytes:
        return self.client.read_bytes(path, tx=self)

    def read_optional(self, path: str) -> str | None:
        return self.client.read_optional(path, tx=self)

    def write(self, path: str, value: str | bytes) -> None:
        self.client.write(path, value, tx=self)

    def mkdir(self, path: str) -> None:
        self.client.mkdir(path, tx=self)

    def rm(self, path: str) -> None:
        self.client.rm(path, tx=self)

    def directory(self, path: str) -> list[str]:
        return self.client.directory(path, tx=self)

    def get_perms(self, path: str) -> list[Perm]:
        return self.client.get_perms(path, tx=self)

    def set_perms(self, path: str, perms: Iterable[Perm]) -> None:
        self.client.set_perms(path, perms, tx=self)


class _Pending:
    __slots__ = ("done", "message", "reply", "sent_epoch")

    def __init__(self, message: bytes) -> None:
        self.done = threading.Event()
        self.reply: Message | BaseException | None = None
        self.message = message
        self.sent_epoch: int | None = None  # the epoch whose server took it


class XsClient:
    """Store client over one transport; thread-safe. See the module docstring for the contract."""

    def __init__(self, send: Callable[[bytes], None], *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._send = send
        self.timeout = timeout
        self._send_lock = threading.Lock()
        self._feed_lock = threading.Lock()
        self._lock = threading.Lock()  # guards everything below
        self._decoder = Decoder()
        self._pending: dict[int, _Pending] = {}
        self._watches: dict[str, Watch] = {}  # by token
        self._req_ids = itertools.count(1)
        self._tokens = itertools.count(1)
        self._lost: BaseException | None = None
        self._epoch = 0  # bumped by every resume(): one per server connection
        self._suspended = False
        self._resumed = threading.Condition(self._lock)
        self._resumed_at = 0.0  # monotonic

    # -- transport side ------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Bytes from the store, in order; ProtocolViolation (failing the client) on garbage."""
        with self._feed_lock:
            try:
                messages = self._decoder.feed(data)
            except ProtocolViolation as exc:
                self.connection_lost(exc)
                raise
            for msg in messages:
                self._dispatch(msg)

    def connection_lost(self, exc: BaseException | None = None) -> None:
        """The transport ended: fail every waiting call and wake every watch consumer."""
        lost = exc if exc is not None else XsConnectionLost("store connection closed")
        with self._lock:
            if self._lost is not None:
                return
            self._lost = lost
            pending, self._pending = self._pending, {}
            queues = {id(w.queue): w.queue for w in self._watches.values()}
            self._resumed.notify_all()
        for waiter in pending.values():
            waiter.reply = lost
            waiter.done.set()
        for queue in queues.values():
            queue.close(lost)

    @property
    def connected(self) -> bool:
        with self._lock:
            return self._lost is None

    def suspend(self) -> None:
        """The transport lost its server and is reconnecting: calls wait for ``resume``."""
        with self._lock:
            self._suspended = True

    def resume(self, send: Callable[[bytes], None], reopen: Callable[[], None]) -> None:
        """The transport reaches a new server. Send again, with ``send`` (which bypasses the
        transport's resetting state), every request the old server took and never answered,
        then every watch; fail with EAGAIN the requests of transactions the old server held;
        then ``reopen()`` the transport to every caller."""
        with self._send_lock:
            with self._feed_lock:
                self._decoder = Decoder()  # a message the old server cut short is gone
            with self._lock:
                old = self._epoch
                self._epoch += 1
                unanswered = sorted((i, w) for i, w in self._pending.items() if w.sent_epoch == old)
                watches = list(self._watches.values())
            for req_id, waiter in unanswered:
                if _tx_id_of(waiter.message):
                    self._forget(req_id)
                    waiter.reply = XsError(XsErrno.EAGAIN, "", "the store restarted")
                    waiter.done.set()
                    continue
                send(waiter.message)
                waiter.sent_epoch = old + 1
            for watch in watches:
                with self._lock:
                    req_id = next(self._req_ids) & 0xFFFFFFFF
                    message = encode(XsType.WATCH, watch.request(), req_id=req_id)
                    waiter = _Pending(message)  # nobody waits: the reply is just dropped
                    waiter.sent_epoch = old + 1
                    self._pending[req_id] = waiter
                send(message)
            reopen()
            with self._lock:
                self._suspended = False
                self._resumed_at = time.monotonic()
                self._resumed.notify_all()
        log.info(
            "store connection resumed: %d requests and %d watches sent again",
            len(unanswered),
            len(watches),
        )

    def _dispatch(self, msg: Message) -> None:
        if msg.type is XsType.WATCH_EVENT:
            self._deliver_event(msg)
            return
        with self._lock:
            waiter = self._pending.pop(msg.req_id, None)
        if waiter is None:
            log.warning("store reply %s req_id=%d matches no request", msg.type.name, msg.req_id)
            return
        waiter.reply = msg
        waiter.done.set()

    def _deliver_event(self, msg: Message) -> None:
        parts = msg.strings()
        if len(parts) < 2:
            log.warning("malformed store watch event %r", msg.payload[:64])
            return
        with self._lock:
            watch = self._watches.get(parts[1])
        if watch is None:
            log.debug("store watch event for unknown token %r", parts[1])
            return
        watch.queue.put(WatchEvent(parts[0], parts[1]), watch.path)

    # -- request machinery ---------------------------------------------------------------------

    def _call(
        self, msg_type: XsType, payload: bytes, path: str = "", tx: Transaction | None = None
    ) -> bytes:
        if len(payload) > XENSTORE_PAYLOAD_MAX:
            raise XsError(XsErrno.E2BIG, path, f"request of {len(payload)} bytes is too large")
        tx_id = tx.tx_id if tx is not None else 0
        with self._lock:
            if self._lost is not None:
                raise XsConnectionLost(
                    f"store connection lost before {msg_type.name} {path}"
                ) from (self._lost)
            if tx is not None and tx.epoch != self._epoch:
                raise XsError(XsErrno.EAGAIN, path, "the store restarted during the transaction")
            req_id = next(self._req_ids) & 0xFFFFFFFF
            waiter = _Pending(encode(msg_type, payload, req_id=req_id, tx_id=tx_id))
            self._pending[req_id] = waiter
        self._send_pending(waiter, req_id, msg_type, path)
        return self._wait(waiter, req_id, msg_type, path, tx_id)

    def _send_pending(self, waiter: _Pending, req_id: int, msg_type: XsType, path: str) -> None:
        """Send one request; a transport that is resetting gets it again after resume."""
        while True:
            try:
                with self._send_lock:
                    epoch = self._epoch
                    self._send(waiter.message)
                    waiter.sent_epoch = epoch
                return
            except XsResend:
                if not self._wait_resumed():
                    break
            except OSError as exc:
                self._forget(req_id)
                raise XsConnectionLost(f"store {msg_type.name} {path}: send failed") from exc
        if self._lost is None:
            self._forget(req_id)
            raise XsTimeoutError(f"store {msg_type.name} {path}: the store did not come back")

    def _wait_resumed(self) -> bool:
        """Wait out a suspension: True once resumed, False if the connection was lost or the
        store did not come back in RECONNECT_TIMEOUT."""
        with self._lock:
            self._resumed.wait_for(
                lambda: not self._suspended or self._lost is not None, RECONNECT_TIMEOUT
            )
            return not self._suspended and self._lost is None

    def _forget(self, req_id: int) -> None:
        with self._lock:
            self._pending.pop(req_id, None)

    def _wait(
        self, waiter: _Pending, req_id: int, msg_type: XsType, path: str, tx_id: int
    ) -> bytes:
        asked = time.monotonic()
        while not waiter.done.is_set():
            with self._lock:
                suspended = self._suspended
                # A request sent again at resume gets its whole timeout from then.
                deadline = max(asked, self._resumed_at) + self.timeout
            if suspended:
                if not self._wait_resumed() and self._lost is None:
                    break
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            waiter.done.wait(remaining)
        if not waiter.done.is_set():
            self._forget(req_id)
            raise XsTimeoutError(
                f"store {msg_type.name} {path} got no reply within {self.timeout} s"
            )
        reply = waiter.reply
        if isinstance(reply, XsError):
            raise reply
        if isinstance(reply, BaseException):
            raise XsConnectionLost(
                f"store connection lost during {msg_type.name} {path}"
            ) from reply
        assert reply is not None
        if reply.type is XsType.ERROR:
            names = reply.strings()
            where = f" in transaction {tx_id}" if tx_id else ""
            raise XsError(names[0] if names else XsErrno.EINVAL, path, msg_type.name + where)
        if reply.type is not msg_type:
            raise ProtocolViolation(f"store answered {msg_type.name} {path} with {reply.type.name}")
        return reply.payload

    # -- nodes ---------------------------------------------------------------------------------

    def read_bytes(self, path: str, tx: Transaction | None = None) -> bytes:
        """The raw value of ``path``."""
        return self._call(XsType.READ, join_strings(validate_path(path)), path, tx)

    def read(self, path: str, tx: Transaction | None = None) -> str:
        """The value of ``path`` as text (bytes that are not UTF-8 become surrogate escapes)."""
        return self.read_bytes(path, tx).decode("utf-8", "surrogateescape")

    def read_optional(self, path: str, tx: Transaction | None = None) -> str | None:
        """Like ``read``, but None if the node does not exist."""
        try:
            return self.read(path, tx)
        except XsError as exc:
            if exc.errno_name == XsErrno.ENOENT:
                return None
            raise

    def write(self, path: str, value: str | bytes, tx: Transaction | None = None) -> None:
        """Set ``path`` to ``value``, creating it and any missing parents."""
        data = value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")
        self._call(XsType.WRITE, join_strings(validate_path(path)) + data, path, tx)

    def mkdir(self, path: str, tx: Transaction | None = None) -> None:
        """Create ``path`` with an empty value (no error if it exists)."""
        self._call(XsType.MKDIR, join_strings(validate_path(path)), path, tx)

    def rm(self, path: str, tx: Transaction | None = None) -> None:
        """Remove ``path`` and its subtree; no error if absent while its parent exists."""
        self._call(XsType.RM, join_strings(validate_path(path)), path, tx)

    def directory(self, path: str, tx: Transaction | None = None) -> list[str]:
        """The names of ``path``'s children."""
        return split_strings(
            self._call(XsType.DIRECTORY, join_strings(validate_path(path)), path, tx)
        )

    def get_perms(self, path: str, tx: Transaction | None = None) -> list[Perm]:
        """``path``'s permission list, owner first."""
        payload = self._call(XsType.GET_PERMS, join_strings(validate_path(path)), path, tx)
        try:
            return [Perm.parse(p) for p in split_strings(payload)]
        except ValueError as exc:
            raise ProtocolViolation(f"store sent malformed permissions for {path}") from exc

    def set_perms(self, path: str, perms: Iterable[Perm], tx: Transaction | None = None) -> None:
        """Replace ``path``'s permission list; the first entry is the owner."""
        encoded = [p.encode() for p in perms]
        if not encoded:
            raise ValueError(f"set_perms {path}: a permission list needs at least the owner")
        self._call(XsType.SET_PERMS, join_strings(validate_path(path), *encoded), path, tx)

    # -- watches -------------------------------------------------------------------------------

    def watch(
        self,
        path: str,
        token: str | None = None,
        queue: WatchQueue | None = None,
        depth: int | None = None,
    ) -> Watch:
        """Watch ``path`` and its subtree (or a special ``@`` path); see the module docstring.

        ``token`` defaults to a fresh one; it must be unique among this client's watches.
        ``depth`` limits how many levels below ``path`` still fire (0: the node itself).
        """
        validate_watch_path(path)
        token = token if token is not None else f"hyper-watch-{next(self._tokens)}"
        if not token or "\0" in token:
            raise ValueError(f"watch token {token!r} must be non-empty and contain no NUL")
        watch = Watch(self, path, token, queue if queue is not None else WatchQueue(), depth)
        # Registered before the request: the server's first event may beat its reply.
        with self._lock:
            if token in self._watches:
                raise ValueError(f"watch token {token!r} is already in use on this client")
            self._watches[token] = watch
        try:
            self._call(XsType.WATCH, watch.request(), path)
        except BaseException:
            self._drop_watch(watch)
            raise
        return watch

    def unwatch(self, watch: Watch) -> None:
        """Remove ``watch``; events already queued stay in its queue."""
        self._drop_watch(watch)
        self._call(XsType.UNWATCH, join_strings(watch.path, watch.token), watch.path)

    def _drop_watch(self, watch: Watch) -> None:
        with self._lock:
            if self._watches.get(watch.token) is watch:
                del self._watches[watch.token]

    # -- domains -------------------------------------------------------------------------------

    def get_domain_path(self, domid: int) -> str:
        """The home path of ``domid`` (``/local/domain/<domid>``)."""
        payload = self._call(XsType.GET_DOMAIN_PATH, join_strings(str(check_domid(domid))))
        return split_strings(payload)[0] if payload else ""

    def introduce(self, domid: int, gfn: int = 0, port: int = 0) -> None:
        """dom0 only: tell the store ``domid`` exists (fires @introduceDomain)."""
        self._call(XsType.INTRODUCE, join_strings(str(check_domid(domid)), str(gfn), str(port)))

    def release(self, domid: int) -> None:
        """dom0 only: forget ``domid`` and its nodes (fires @releaseDomain)."""
        self._call(XsType.RELEASE, join_strings(str(check_domid(domid))))

    def is_domain_introduced(self, domid: int) -> bool:
        payload = self._call(XsType.IS_DOMAIN_INTRODUCED, join_strings(str(check_domid(domid))))
        return split_strings(payload)[:1] == ["T"]

    # -- transactions --------------------------------------------------------------------------

    def transaction_start(self) -> Transaction:
        with self._lock:
            epoch = self._epoch
        payload = self._call(XsType.TRANSACTION_START, b"\0")
        text = split_strings(payload)[0] if payload else ""
        if not text.isdecimal() or not text.isascii() or int(text) == 0 or len(text) > 10:
            raise ProtocolViolation(f"store returned a malformed transaction id {text!r}")
        with self._lock:
            if epoch != self._epoch:  # the reply came from a server since restarted
                raise XsError(XsErrno.EAGAIN, "", "the store restarted")
        return Transaction(self, int(text), epoch)

    def transaction_end(self, tx: Transaction, commit: bool = True) -> None:
        """Commit (XsError EAGAIN if it conflicted) or abort ``tx``."""
        self._call(XsType.TRANSACTION_END, b"T\0" if commit else b"F\0", "", tx)

    def transaction(self, fn: Callable[[Transaction], T], attempts: int = 16) -> T:
        """Run ``fn(tx)`` in a transaction and commit, retrying the whole thing on EAGAIN.

        Any other error aborts the transaction and propagates. After ``attempts`` conflicts the
        last EAGAIN XsError is raised.
        """
        last: XsError | None = None
        for _ in range(attempts):
            tx = self.transaction_start()
            try:
                result = fn(tx)
            except XsError as exc:
                self._abort_quietly(tx)
                if exc.errno_name != XsErrno.EAGAIN:
                    raise
                last = exc
                continue
            except BaseException:
                self._abort_quietly(tx)
                raise
            try:
                self.transaction_end(tx, commit=True)
            except XsError as exc:
                if exc.errno_name != XsErrno.EAGAIN:
                    raise
                last = exc
                continue
            return result
        assert last is not None
        raise XsError(
            XsErrno.EAGAIN, "", f"transaction still conflicting after {attempts} attempts"
        ) from last

    def _abort_quietly(self, tx: Transaction) -> None:
        try:
            self.transaction_end(tx, commit=False)
        except (XsError, XsConnectionLost, XsTimeoutError):
            log.debug("aborting store transaction %d failed", tx.tx_id, exc_info=True)


class XsStreamTransport:
    """An XsClient over a connected stream socket, with its own reader thread.

    ``close()`` shuts the socket down and joins the reader; calls in flight then raise
    XsConnectionLost.
    """

    def __init__(self, sock: socket.socket, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._sock = sock
        self._closing = False
        self.client = XsClient(self._sock.sendall, timeout=timeout)
        self._reader = threading.Thread(
            target=self._read_loop, name="xs-client-reader", daemon=True
        )
        self._reader.start()

    def _read_loop(self) -> None:
        while True:
            try:
                data = self._sock.recv(65536)
            except OSError as exc:
                self.client.connection_lost(XsConnectionLost(f"store socket failed: {exc}"))
                return
            if not data:
                why = "closed by this side" if self._closing else "closed by the store"
                self.client.connection_lost(XsConnectionLost(f"store socket {why}"))
                return
            try:
                self.client.feed(data)
            except ProtocolViolation:
                log.warning(
                    "store sent a malformed message; dropping the connection", exc_info=True
                )
                self._shutdown()
                return

    def _shutdown(self) -> None:
        with contextlib.suppress(OSError):  # already disconnected
            self._sock.shutdown(socket.SHUT_RDWR)

    def close(self, timeout: float = 5.0) -> None:
        self._closing = True
        self._shutdown()
        if threading.current_thread() is not self._reader:
            self._reader.join(timeout)
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def connect_unix(path: str, *, timeout: float = DEFAULT_TIMEOUT) -> XsStreamTransport:
    """Connect to a store's Unix socket (dom0-local tools); use ``.client`` and ``close()``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise XsConnectionLost(f"cannot connect to the store socket {path}") from exc
    return XsStreamTransport(sock, timeout=timeout)


def _tx_id_of(message: bytes) -> int:
    """The tx_id of an encoded request (xsd_sockmsg: type, req_id, tx_id, len)."""
    return int(struct.unpack_from("<I", message, 8)[0])

"""One client connection to the store: framing, request processing, bounded output.

The transport that owns the connection (in-process, Unix socket, the guest's byte ring) drives it:

* ``feed(data)``: bytes from the client, any chunking. Complete requests are processed at once
  and their replies handed to ``send``. A framing violation (payload over 4096 bytes, unknown
  type, a client flooding requests while not reading replies) raises ProtocolViolation: drop this
  connection only. Every other failure of a request, including a bug, becomes an error reply.
* ``send(data) -> bool | None`` (given to ``Store.connect``): must not block and must take a whole
  message or refuse it. None or True means taken; False means "full, keep it": the connection
  queues it and sends nothing more until the transport calls ``output_drained()``. A transport
  with less room than one message (the 1 KiB XenStore ring, against messages of up to 4112
  bytes) accepts a message when its buffer is empty, keeps the unwritten rest itself, and
  refuses further messages until that rest is out.
* ``wants_input()``: False while the client has ``outstanding`` replies it has not taken. The
  transport should stop reading then (a ring transport leaves bytes in the ring); requests fed
  anyway wait, decoded, up to a bound. Watch events queued meanwhile are deduplicated and past
  ``queued_events`` collapse into one event per watch for the watched path, so a client that
  never reads costs bounded memory and no other connection waits for it.
* ``close()``: the transport is gone; the store forgets this connection's watches and
  transactions. The store also closes connections itself (a protocol violation, a failing
  ``send``, ``release_domain``). Either way ``closed`` becomes True and the ``on_close``
  callback given to ``Store.connect`` runs once, with the store lock held, so the transport
  can tear down.

Replies go out before the watch events that the same request caused. All state is guarded by
the store's lock, so a transport may call in from any thread.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from channels.errors import ProtocolViolation
from channels.xs_wire import (
    HEADER_SIZE,
    XENSTORE_PAYLOAD_MAX,
    Decoder,
    Message,
    XsErrno,
    XsError,
    XsType,
    encode,
    error_payload,
    join_strings,
)

if TYPE_CHECKING:
    from xenstored.core import Store
    from xenstored.transactions import Transaction
    from xenstored.watches import Watch

log = logging.getLogger(__name__)

Send = Callable[[bytes], "bool | None"]

# Requests a paused connection holds before the client counts as flooding: generous enough for
# any client that reads its replies, small enough to bound memory per connection.
MAX_INPUT_BACKLOG = 16 * (HEADER_SIZE + XENSTORE_PAYLOAD_MAX)

# Ids of transactions the store dropped after their lifetime, which answer EAGAIN (not ENOENT)
# until forgotten: more than a domain may have open, so that a whole round is remembered.
EXPIRED_REMEMBERED = 32


@dataclass(slots=True)
class _Out:
    data: bytes
    event_key: tuple[str, str] | None  # (reported path, token) for a watch event, None for a reply


class Connection:
    """A client of the store, as seen by the store. Create with ``Store.connect``."""

    def __init__(
        self,
        store: Store,
        domid: int,
        send: Send,
        conn_id: int,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.domid = domid
        self.conn_id = conn_id
        self._send = send
        self._on_close = on_close
        self._decoder = Decoder()
        self._requests: deque[Message] = deque()
        self._requests_bytes = 0
        self._out: deque[_Out] = deque()
        self._out_replies = 0
        self._out_events: set[tuple[str, str]] = set()
        self._overflowed: dict[int, Watch] = {}
        self._blocked = False
        self._handling = False
        self._deferred: list[tuple[Watch, str]] = []
        self._closed = False
        self.transactions: dict[int, Transaction] = {}
        self.expired_transactions: deque[int] = deque(maxlen=EXPIRED_REMEMBERED)

    def __repr__(self) -> str:
        return f"Connection(domid={self.domid}, conn_id={self.conn_id})"

    # -- transport interface -------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        with self.store.lock:
            if self._closed:
                log.debug("%r: ignoring %d bytes after close", self, len(data))
                return
            try:
                self._accept(data)
            except ProtocolViolation:
                log.warning("%r: protocol violation, dropping connection", self, exc_info=True)
                self._close_locked()
                raise
            self._process()

    def wants_input(self) -> bool:
        with self.store.lock:
            return self._wants_input_locked()

    def output_drained(self) -> None:
        """The transport can take messages again."""
        with self.store.lock:
            if self._closed:
                return
            self._blocked = False
            self._flush()
            self._process()

    def close(self) -> None:
        with self.store.lock:
            self._close_locked()

    @property
    def closed(self) -> bool:
        with self.store.lock:
            return self._closed

    @property
    def queued_output(self) -> int:
        """Messages waiting for the transport (replies and watch events)."""
        with self.store.lock:
            return len(self._out)

    # -- input ---------------------------------------------------------------------------------

    def _accept(self, data: bytes) -> None:
        for msg in self._decoder.feed(data):
            self._requests.append(msg)
            self._requests_bytes += HEADER_SIZE + len(msg.payload)
        if self._requests_bytes + self._decoder.buffered > MAX_INPUT_BACKLOG:
            raise ProtocolViolation(
                f"domain {self.domid} sent over {MAX_INPUT_BACKLOG} bytes of requests "
                "without reading its replies"
            )

    def _wants_input_locked(self) -> bool:
        limit = self.store.domains.limits(self.domid).outstanding
        return not self._closed and self._out_replies < limit

    def _process(self) -> None:
        while self._requests and self._wants_input_locked():
            msg = self._requests.popleft()
            self._requests_bytes -= HEADER_SIZE + len(msg.payload)
            self._handle(msg)

    def _handle(self, msg: Message) -> None:
        self._handling = True
        try:
            payload = self.store.dispatch(self, msg)
            reply = encode(msg.type, payload, req_id=msg.req_id, tx_id=msg.tx_id)
        except XsError as exc:
            log.debug("%r: %s -> %s", self, msg.type.name, exc)
            reply = self._error_reply(msg, exc.errno_name)
        except Exception:
            # A bug, or input nobody anticipated: answer this request, keep serving the rest.
            log.exception("%r: %s request failed", self, msg.type.name)
            reply = self._error_reply(msg, XsErrno.EINVAL)
        finally:
            self._handling = False
        self._emit(_Out(reply, None))
        deferred, self._deferred = self._deferred, []
        for watch, path in deferred:
            self.queue_event(watch, path)

    @staticmethod
    def _error_reply(msg: Message, errno_name: str) -> bytes:
        return encode(XsType.ERROR, error_payload(errno_name), req_id=msg.req_id, tx_id=msg.tx_id)

    # -- output --------------------------------------------------------------------------------

    def queue_event(self, watch: Watch, path: str) -> None:
        """Send (or queue) a watch event for ``watch`` reporting ``path``."""
        if self._closed:
            return
        if self._handling:
            self._deferred.append((watch, path))
            return
        reported = watch.reported(path)
        key = (reported, watch.token)
        if key in self._out_events:
            return
        limit = self.store.domains.limits(self.domid).queued_events
        if len(self._out_events) >= limit:
            self._overflowed[id(watch)] = watch
            return
        payload = join_strings(reported, watch.token)
        self._emit(_Out(encode(XsType.WATCH_EVENT, payload), key))

    def _emit(self, out: _Out) -> None:
        if self._closed:
            return
        if not self._out and not self._blocked and self._try_send(out.data):
            return
        self._out.append(out)
        if out.event_key is None:
            self._out_replies += 1
        else:
            self._out_events.add(out.event_key)

    def _try_send(self, data: bytes) -> bool:
        """Hand ``data`` to the transport; False if it refused (now blocked)."""
        try:
            accepted = self._send(data)
        except Exception:
            log.exception("%r: transport send failed, dropping connection", self)
            self._close_locked()
            return True  # nothing left to queue it for
        if accepted is False:
            self._blocked = True
            return False
        return True

    def _flush(self) -> None:
        while self._out and not self._blocked and not self._closed:
            out = self._out[0]
            if not self._try_send(out.data):
                return
            if self._closed:
                return
            self._out.popleft()
            if out.event_key is None:
                self._out_replies -= 1
            else:
                self._out_events.discard(out.event_key)
        if not self._out and not self._blocked:
            self._send_overflowed()

    def _send_overflowed(self) -> None:
        overflowed, self._overflowed = self._overflowed, {}
        for watch in overflowed.values():
            if self.store.watches.is_registered(watch):
                self.queue_event(watch, watch.path)

    def _close_locked(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._requests.clear()
        self._out.clear()
        self._out_events.clear()
        self._overflowed.clear()
        self._deferred.clear()
        self._out_replies = 0
        self.store.forget_connection(self)
        if self._on_close is not None:
            try:
                self._on_close()
            except Exception:
                log.exception("%r: on_close callback failed", self)

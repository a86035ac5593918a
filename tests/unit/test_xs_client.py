"""XsClient on its own: timeouts, lost connections, a misbehaving store, watch queues, retries.

``ScriptedStore`` plays the store: it decodes each request and answers with whatever the test's
``answer`` function returns (a list of messages to feed back, possibly empty).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import pytest

from channels.errors import ProtocolViolation
from channels.xenbus import XsPathError
from channels.xs import (
    Transaction,
    WatchEvent,
    WatchQueue,
    XsClient,
    XsConnectionLost,
    XsError,
    XsTimeoutError,
)
from channels.xs_wire import Decoder, Message, XsType, encode, join_strings

TIMEOUT = 5.0

Answer = Callable[[Message], list[bytes]]


class ScriptedStore:
    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.requests: list[Message] = []
        self._decoder = Decoder()
        self.client = XsClient(self.send, timeout=TIMEOUT)

    def send(self, data: bytes) -> None:
        for msg in self._decoder.feed(data):
            self.requests.append(msg)
            for reply in self.answer(msg):
                self.client.feed(reply)


def ok(msg: Message, payload: bytes = b"OK\0") -> list[bytes]:
    return [encode(msg.type, payload, req_id=msg.req_id, tx_id=msg.tx_id)]


def error(msg: Message, name: str) -> list[bytes]:
    return [encode(XsType.ERROR, join_strings(name), req_id=msg.req_id, tx_id=msg.tx_id)]


def test_a_request_without_a_reply_times_out_naming_the_path() -> None:
    client = XsClient(lambda data: None, timeout=0.05)

    with pytest.raises(XsTimeoutError, match="READ /tool/x"):
        client.read("/tool/x")


def test_a_late_reply_after_a_timeout_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    sent: list[bytes] = []
    client = XsClient(sent.append, timeout=0.05)
    with pytest.raises(XsTimeoutError):
        client.read("/tool/x")
    (request,) = Decoder().feed(sent[0])

    with caplog.at_level(logging.WARNING, logger="channels.xs"):
        client.feed(encode(XsType.READ, b"late", req_id=request.req_id))

    assert "matches no request" in caplog.text


def test_connection_lost_fails_a_waiting_call_and_wakes_watch_consumers() -> None:
    started = threading.Event()
    client = XsClient(lambda data: started.set(), timeout=TIMEOUT)
    queue = WatchQueue()
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            client.read("/tool/x")
        except BaseException as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    assert started.wait(TIMEOUT)
    client.connection_lost(ConnectionResetError("store went away"))
    caller.join(TIMEOUT)
    queue.close(ConnectionResetError("store went away"))

    assert len(outcome) == 1 and isinstance(outcome[0], XsConnectionLost)
    with pytest.raises(XsConnectionLost):
        client.read("/tool/y")
    with pytest.raises(XsConnectionLost):
        queue.get(TIMEOUT)


def test_a_send_failure_is_a_lost_connection() -> None:
    def broken(data: bytes) -> None:
        raise BrokenPipeError("gone")

    client = XsClient(broken, timeout=TIMEOUT)

    with pytest.raises(XsConnectionLost, match="READ /tool/x"):
        client.read("/tool/x")


def test_garbage_from_the_store_fails_the_client() -> None:
    client = XsClient(lambda data: None, timeout=TIMEOUT)

    with pytest.raises(ProtocolViolation):
        client.feed(b"\xff" * 16)

    with pytest.raises(XsConnectionLost):
        client.read("/tool/x")


def test_a_reply_of_the_wrong_type_is_a_protocol_error() -> None:
    store = ScriptedStore(lambda msg: [encode(XsType.DIRECTORY, b"", req_id=msg.req_id)])

    with pytest.raises(ProtocolViolation, match="READ /tool/x"):
        store.client.read("/tool/x")


def test_error_replies_raise_xs_error_with_the_errno_name() -> None:
    store = ScriptedStore(lambda msg: error(msg, "EACCES"))

    with pytest.raises(XsError) as info:
        store.client.write("/local/domain/2/x", "1")

    assert info.value.errno_name == "EACCES"
    assert "/local/domain/2/x" in str(info.value)


def test_invalid_paths_are_refused_before_anything_is_sent() -> None:
    store = ScriptedStore(ok)

    with pytest.raises(XsPathError):
        store.client.write("/a//b", "1")

    assert store.requests == []


def test_requests_carry_the_transaction_id() -> None:
    def answer(msg: Message) -> list[bytes]:
        if msg.type is XsType.TRANSACTION_START:
            return ok(msg, b"17\0")
        return ok(msg, b"value" if msg.type is XsType.READ else b"OK\0")

    store = ScriptedStore(answer)

    tx = store.client.transaction_start()
    tx.read("/tool/a")
    store.client.transaction_end(tx)

    assert [(m.type, m.tx_id) for m in store.requests] == [
        (XsType.TRANSACTION_START, 0),
        (XsType.READ, 17),
        (XsType.TRANSACTION_END, 17),
    ]
    assert store.requests[-1].payload == b"T\0"


def _transactions(commit_errors: list[str | None]) -> ScriptedStore:
    """A store whose successive commits fail with the given errno names (None: succeed)."""
    ids = iter(range(1, 100))
    results = iter(commit_errors)

    def answer(msg: Message) -> list[bytes]:
        if msg.type is XsType.TRANSACTION_START:
            return ok(msg, join_strings(str(next(ids))))
        if msg.type is XsType.TRANSACTION_END and msg.payload == b"T\0":
            name = next(results)
            return ok(msg) if name is None else error(msg, name)
        return ok(msg)

    return ScriptedStore(answer)


def test_the_retry_helper_gives_up_with_eagain_after_its_attempts() -> None:
    store = _transactions(["EAGAIN"] * 3)
    calls: list[int] = []

    with pytest.raises(XsError) as info:
        store.client.transaction(lambda tx: calls.append(tx.tx_id), attempts=3)

    assert info.value.errno_name == "EAGAIN"
    assert calls == [1, 2, 3]


def test_the_retry_helper_aborts_and_reraises_other_errors() -> None:
    store = _transactions([])

    def fail(tx: Transaction) -> None:
        raise KeyError("not a store error")

    with pytest.raises(KeyError):
        store.client.transaction(fail)

    assert store.requests[-1].type is XsType.TRANSACTION_END
    assert store.requests[-1].payload == b"F\0"


def test_the_retry_helper_does_not_retry_a_commit_refused_for_another_reason() -> None:
    store = _transactions(["ENOSPC", None])

    with pytest.raises(XsError) as info:
        store.client.transaction(lambda tx: None)

    assert info.value.errno_name == "ENOSPC"


def test_a_watch_event_that_beats_the_watch_reply_is_kept() -> None:
    def answer(msg: Message) -> list[bytes]:
        if msg.type is XsType.WATCH:
            path, token = msg.strings()
            return [encode(XsType.WATCH_EVENT, join_strings(path, token)), *ok(msg)]
        return ok(msg)

    store = ScriptedStore(answer)

    watch = store.client.watch("/tool/w", token="t")

    assert watch.get(TIMEOUT) == WatchEvent("/tool/w", "t")


def test_watch_tokens_are_unique_per_client() -> None:
    store = ScriptedStore(ok)
    store.client.watch("/tool/a", token="same")

    with pytest.raises(ValueError, match="already in use"):
        store.client.watch("/tool/b", token="same")


def test_a_failed_watch_registration_frees_its_token() -> None:
    store = ScriptedStore(lambda msg: error(msg, "E2BIG"))
    with pytest.raises(XsError):
        store.client.watch("/tool/a", token="t")

    store.answer = ok
    store.client.watch("/tool/a", token="t")


def test_watch_queue_drops_duplicates_of_pending_events() -> None:
    queue = WatchQueue()
    for _ in range(3):
        queue.put(WatchEvent("/a/b", "t"), "/a")

    assert len(queue) == 1


def test_watch_queue_collapses_a_storm_into_the_watched_path() -> None:
    queue = WatchQueue(max_pending=3)
    queue.put(WatchEvent("/other", "u"), "/other")
    for i in range(100):
        queue.put(WatchEvent(f"/a/{i}", "t"), "/a")

    events = [queue.get(TIMEOUT) for _ in range(len(queue))]

    assert events == [WatchEvent("/other", "u"), WatchEvent("/a", "t")]


def test_watch_queue_get_times_out() -> None:
    with pytest.raises(XsTimeoutError):
        WatchQueue().get(timeout=0.01)

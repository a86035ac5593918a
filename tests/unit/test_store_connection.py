"""The store's connection layer against raw bytes: hostile input, backpressure, teardown."""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from channels.errors import ProtocolViolation
from channels.xenbus import RELEASE_DOMAIN_WATCH, guest_rw_perms, home_perms
from channels.xs import XsClient, XsConnectionLost, connect_unix
from channels.xs_wire import (
    XENSTORE_PAYLOAD_MAX,
    Decoder,
    Message,
    XsType,
    encode,
    join_strings,
)
from xenstored import (
    Quota,
    Store,
    StreamConnection,
    UnixSocketServer,
    connect_local,
    requests,
)
from xenstored.connection import MAX_INPUT_BACKLOG
from xenstored.local import LocalTransport

TIMEOUT = 5.0


class RawPeer:
    """A store connection's transport, driven by hand: records what the store sends.

    ``accepting`` False makes ``send`` refuse, as a transport whose client stopped reading.
    """

    def __init__(self, store: Store, domid: int) -> None:
        self.accepting = True
        self.received: list[Message] = []
        self._decoder = Decoder()
        self.closed_by_store = False
        self.conn = store.connect(domid, self.send, self.on_close)

    def send(self, data: bytes) -> bool:
        if not self.accepting:
            return False
        self.received += self._decoder.feed(data)
        return True

    def on_close(self) -> None:
        self.closed_by_store = True

    def request(self, msg_type: XsType, payload: bytes, req_id: int = 1, tx_id: int = 0) -> None:
        self.conn.feed(encode(msg_type, payload, req_id=req_id, tx_id=tx_id))

    def reply(self, msg_type: XsType, payload: bytes) -> Message:
        """Send one request and return the store's answer to it."""
        before = len(self.received)
        self.request(msg_type, payload, req_id=4242)
        answers = [m for m in self.received[before:] if m.req_id == 4242]
        assert len(answers) == 1
        return answers[0]

    def drain(self) -> None:
        self.accepting = True
        self.conn.output_drained()


def error_name(msg: Message) -> str | None:
    return msg.strings()[0] if msg.type is XsType.ERROR else None


@pytest.fixture
def store() -> Store:
    store = Store(quota=Quota(outstanding=5, queued_events=4))
    with connect_local(store, 0) as dom0:
        for domid in (1, 2):
            home = f"/local/domain/{domid}"
            dom0.client.mkdir(home)
            dom0.client.set_perms(home, home_perms(domid))
            dom0.client.mkdir(f"{home}/data")
            dom0.client.set_perms(f"{home}/data", guest_rw_perms(domid))
            dom0.client.introduce(domid)
    return store


@pytest.fixture
def dom0(store: Store) -> Iterator[XsClient]:
    with connect_local(store, 0, timeout=TIMEOUT) as link:
        yield link.client


# -- framing -------------------------------------------------------------------------------------


def test_an_oversized_payload_drops_only_that_connection(store: Store, dom0: XsClient) -> None:
    hostile = RawPeer(store, 1)
    neighbour = RawPeer(store, 2)

    with pytest.raises(ProtocolViolation, match="4097"):
        hostile.conn.feed(struct.pack("<IIII", XsType.READ, 1, 0, XENSTORE_PAYLOAD_MAX + 1))

    assert hostile.conn.closed and hostile.closed_by_store
    assert hostile.received == []
    assert neighbour.reply(XsType.READ, b"data\0").type is XsType.READ
    dom0.write("/tool/still", "works")


def test_an_unknown_message_type_is_a_protocol_violation(store: Store) -> None:
    hostile = RawPeer(store, 1)

    with pytest.raises(ProtocolViolation, match="unknown type"):
        hostile.conn.feed(struct.pack("<IIII", 1000, 1, 0, 0))

    assert hostile.conn.closed


def test_bytes_after_a_violation_are_ignored(store: Store) -> None:
    hostile = RawPeer(store, 1)
    with pytest.raises(ProtocolViolation):
        hostile.conn.feed(struct.pack("<IIII", 1000, 1, 0, 0))

    hostile.request(XsType.READ, b"data\0")

    assert hostile.received == []


def test_requests_split_across_feeds_are_answered_once_complete(store: Store) -> None:
    peer = RawPeer(store, 1)
    data = encode(XsType.WRITE, b"data/x\0value", req_id=9) + encode(
        XsType.READ, b"data/x\0", req_id=10
    )

    for i in range(len(data)):
        peer.conn.feed(data[i : i + 1])

    assert [(m.type, m.req_id) for m in peer.received] == [(XsType.WRITE, 9), (XsType.READ, 10)]
    assert peer.received[1].payload == b"value"


# -- malformed requests --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("msg_type", "payload", "errno_name"),
    [
        (XsType.READ, b"data", "EINVAL"),  # not NUL-terminated
        (XsType.READ, b"data\0more\0", "EINVAL"),  # two strings for one
        (XsType.READ, b"/a//b\0", "EINVAL"),
        (XsType.READ, b"/a/\0", "EINVAL"),
        (XsType.READ, b"/\xc3\xa9\0", "EINVAL"),
        (XsType.WRITE, b"data/novalue", "EINVAL"),
        (XsType.SET_PERMS, b"data\0x1\0", "EINVAL"),
        (XsType.SET_PERMS, b"data\0", "EINVAL"),
        (XsType.WATCH, b"data\0", "EINVAL"),
        (XsType.WATCH, b"@nonsense\0tok\0", "EINVAL"),
        (XsType.WATCH, b"data\0tok\0deep\0", "EINVAL"),
        (XsType.WATCH, b"data\0" + b"t" * 1100 + b"\0", "EINVAL"),
        (XsType.TRANSACTION_END, b"X\0", "EINVAL"),
        (XsType.GET_DOMAIN_PATH, b"abc\0", "EINVAL"),
        (XsType.GET_DOMAIN_PATH, b"99999\0", "EINVAL"),
        (XsType.WATCH_EVENT, b"data\0tok\0", "EINVAL"),
        (XsType.ERROR, b"EINVAL\0", "EINVAL"),
        (XsType.DIRECTORY_PART, b"data\x000\0", "ENOSYS"),
        (XsType.INTRODUCE, b"5\x000\x000\0", "EACCES"),
    ],
)
def test_malformed_requests_get_error_replies(
    store: Store, msg_type: XsType, payload: bytes, errno_name: str
) -> None:
    peer = RawPeer(store, 1)

    answer = peer.reply(msg_type, payload)

    assert error_name(answer) == errno_name
    assert not peer.conn.closed
    assert peer.reply(XsType.READ, b"/local/domain/1\0").type is XsType.READ


def test_a_reply_echoes_type_req_id_and_tx_id(store: Store) -> None:
    peer = RawPeer(store, 1)
    peer.request(XsType.TRANSACTION_START, b"\0", req_id=77)
    tx_id = int(peer.received[-1].strings()[0])

    peer.request(XsType.WRITE, b"data/t\0v", req_id=78, tx_id=tx_id)

    assert peer.received[-1] == Message(XsType.WRITE, 78, tx_id, b"OK\0")


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    requests_=st.lists(
        st.tuples(
            st.sampled_from(list(XsType)),
            st.integers(0, 3),
            st.one_of(
                st.binary(max_size=64),
                st.lists(
                    st.sampled_from([b"data", b"/", b"/local/domain/2", b"T", b"b1", b"r0",
                                     b"1", b"@releaseDomain", b"data/x", b"tok", b""]),
                    max_size=4,
                ).map(lambda parts: b"".join(p + b"\0" for p in parts)),
            ),
        ),
        max_size=12,
    )
)  # fmt: skip
def test_hostile_requests_always_get_one_reply_and_never_crash(
    store: Store, requests_: list[tuple[XsType, int, bytes]]
) -> None:
    peer = RawPeer(store, 1)

    for n, (msg_type, tx_id, payload) in enumerate(requests_, start=1):
        peer.request(msg_type, payload, req_id=n, tx_id=tx_id)

    replies = [m for m in peer.received if m.type is not XsType.WATCH_EVENT]
    assert [m.req_id for m in replies] == list(range(1, len(requests_) + 1))
    assert not peer.conn.closed
    peer.conn.close()


def test_a_bug_in_a_handler_becomes_einval_and_is_logged(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*_: object) -> bytes:
        raise RuntimeError("handler bug")

    monkeypatch.setitem(requests.HANDLERS, XsType.READ, requests.Handler(broken))
    peer = RawPeer(store, 1)

    with caplog.at_level(logging.ERROR, logger="xenstored.connection"):
        answer = peer.reply(XsType.READ, b"data\0")

    assert error_name(answer) == "EINVAL"
    assert "handler bug" in caplog.text
    assert peer.reply(XsType.DIRECTORY, b"data\0").type is XsType.DIRECTORY


# -- backpressure --------------------------------------------------------------------------------


def test_a_client_that_never_reads_replies_is_bounded_and_others_carry_on(
    store: Store, dom0: XsClient
) -> None:
    stalled = RawPeer(store, 1)
    neighbour = connect_local(store, 2, timeout=TIMEOUT)
    stalled.accepting = False

    for n in range(1, 31):
        stalled.request(XsType.READ, b"/local/domain/1\0", req_id=n)

    assert not stalled.conn.wants_input()
    assert stalled.conn.queued_output == 5  # the outstanding quota; the rest wait unprocessed
    neighbour.client.write("data/x", "1")
    assert neighbour.client.read("data/x") == "1"
    dom0.write("/tool/fine", "yes")

    stalled.drain()

    assert [m.req_id for m in stalled.received] == list(range(1, 31))
    assert stalled.conn.wants_input()
    neighbour.close()


def test_flooding_requests_while_not_reading_replies_drops_the_connection(store: Store) -> None:
    stalled = RawPeer(store, 1)
    stalled.accepting = False
    request = encode(XsType.READ, b"data\0")

    with pytest.raises(ProtocolViolation, match="without reading its replies"):
        for _ in range(MAX_INPUT_BACKLOG // len(request) + 10):
            stalled.conn.feed(request)

    assert stalled.conn.closed


def test_watch_events_for_a_stalled_client_collapse_per_watch(store: Store, dom0: XsClient) -> None:
    stalled = RawPeer(store, 1)
    stalled.request(XsType.WATCH, join_strings("data", "tok"))
    assert [m.type for m in stalled.received] == [XsType.WATCH, XsType.WATCH_EVENT]
    stalled.received.clear()
    stalled.accepting = False

    for i in range(50):
        dom0.write(f"/local/domain/1/data/n{i}", "x")
        dom0.write(f"/local/domain/1/data/n{i}", "again")  # a duplicate while queued

    assert stalled.conn.queued_output <= 4  # the queued_events bound
    stalled.drain()
    paths = [m.strings()[0] for m in stalled.received]
    assert paths[:4] == ["data/n0", "data/n1", "data/n2", "data/n3"]
    assert paths[4:] == ["data"]  # everything else collapsed into one "re-read data"


def test_a_send_that_raises_drops_that_connection_only(
    store: Store, dom0: XsClient, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_send(data: bytes) -> None:
        raise OSError("peer vanished")

    conn = store.connect(1, broken_send)

    with caplog.at_level(logging.ERROR, logger="xenstored.connection"):
        conn.feed(encode(XsType.READ, b"data\0"))

    assert conn.closed
    assert "peer vanished" in caplog.text
    assert dom0.read("/local/domain/1/data") == ""


# -- teardown ------------------------------------------------------------------------------------


def test_closing_a_connection_frees_its_watches_and_transactions(store: Store) -> None:
    store.set_quota(1, Quota(watches=1, transactions=1))
    first = RawPeer(store, 1)
    first.request(XsType.WATCH, join_strings("data", "t"))
    first.request(XsType.TRANSACTION_START, b"\0")

    first.conn.close()
    second = RawPeer(store, 1)

    assert second.reply(XsType.WATCH, join_strings("data", "t")).type is XsType.WATCH
    assert second.reply(XsType.TRANSACTION_START, b"\0").type is XsType.TRANSACTION_START


def test_release_domain_closes_connections_removes_nodes_and_fires(
    store: Store, dom0: XsClient
) -> None:
    released = dom0.watch(RELEASE_DOMAIN_WATCH)
    released.get(TIMEOUT)
    domu = RawPeer(store, 1)
    domu.request(XsType.WRITE, b"data/x\0v")
    assert store.node_count(1) == 2

    store.release_domain(1)

    assert domu.closed_by_store and domu.conn.closed
    assert store.node_count(1) == 0
    assert not store.is_introduced(1)
    assert released.get(TIMEOUT).path == RELEASE_DOMAIN_WATCH
    assert dom0.directory("/local/domain/1") == []


def test_a_release_whose_watches_fail_to_fire_still_forgets_the_domain(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    domu = RawPeer(store, 1)
    domu.request(XsType.WRITE, b"data/x\0v")

    def fire(change: object) -> None:
        raise MemoryError  # queueing the removal's events

    monkeypatch.setattr(store, "_fire", fire)
    with pytest.raises(MemoryError):
        store.release_domain(1)

    assert store.node_count(1) == 0
    assert not store.is_introduced(1)
    assert domu.closed_by_store and domu.conn.closed


def test_release_domain_refuses_dom0(store: Store) -> None:
    with pytest.raises(ValueError, match="dom0"):
        store.release_domain(0)


def test_an_in_process_client_of_a_released_domain_fails_fast(store: Store) -> None:
    link = LocalTransport(store, 1, timeout=TIMEOUT)

    store.release_domain(1)

    with pytest.raises(XsConnectionLost):
        link.client.read("data")


# -- the dom0-local Unix socket ------------------------------------------------------------------


def test_unix_socket_server_serves_dom0_tools(store: Store, tmp_path: Path) -> None:
    path = f"{tmp_path}/xs.sock"
    server = UnixSocketServer(store, path)
    try:
        with connect_unix(path, timeout=TIMEOUT) as tool:
            tool.client.write("/tool/from-socket", "1")
            assert tool.client.read("/tool/from-socket") == "1"
            assert tool.client.get_perms("/tool/from-socket")[0].domid == 0
    finally:
        server.close()

    assert not os.path.exists(path)
    with pytest.raises(XsConnectionLost):
        connect_unix(path)


def wait_until(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Re-check ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        threading.Event().wait(0.01)


def test_a_socket_client_that_stops_reading_stalls_only_itself(
    store: Store, dom0: XsClient
) -> None:
    dom0.write("/tool/big", "x" * 4000)
    server_sock, client_sock = socket.socketpair()
    server = StreamConnection(store, 0, server_sock, max_queued=8)
    count = 5000  # more requests than a connection holds (MAX_INPUT_BACKLOG): they must wait
    requests_ = b"".join(encode(XsType.READ, b"/tool/big\0", req_id=n) for n in range(count))
    assert len(requests_) > MAX_INPUT_BACKLOG
    sender = threading.Thread(target=client_sock.sendall, args=(requests_,))
    try:
        sender.start()

        wait_until(lambda: not server.conn.wants_input())
        assert server.conn.queued_output <= 5  # the outstanding quota
        dom0.write("/tool/others", "unaffected")
        assert dom0.read("/tool/others") == "unaffected"

        decoder = Decoder()
        replies: list[Message] = []
        client_sock.settimeout(TIMEOUT)
        while len(replies) < count and (data := client_sock.recv(1 << 16)):
            replies += decoder.feed(data)
        assert [m.req_id for m in replies] == list(range(count))
        assert all(m.type is XsType.READ and len(m.payload) == 4000 for m in replies)
        assert server.alive
    finally:
        sender.join(TIMEOUT)
        client_sock.close()
        server.close()

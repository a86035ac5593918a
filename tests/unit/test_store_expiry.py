"""A domU's transactions live ``transaction_lifetime`` seconds, and whatever ends one frees what
it held (xenstored/core.py, transactions.py), with time driven by hand: the store's clock and
its alarms are the test's."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from channels.xenbus import guest_rw_perms, home_perms
from channels.xs import Transaction, XsClient, XsError
from channels.xs_wire import XsType
from xenstored import Quota, Store, connect_local
from xenstored.core import EXPIRY_SLACK
from xenstored.local import LocalTransport

LIFETIME = Quota().transaction_lifetime


@dataclass
class FakeAlarm:
    when: float
    callback: Callable[[], None]
    cancelled: bool = False
    fired: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeTime:
    """The store's clock and its ``schedule``: alarms go off when ``advance`` passes them."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.alarms: list[FakeAlarm] = []

    def clock(self) -> float:
        return self.now

    def schedule(self, delay: float, callback: Callable[[], None]) -> FakeAlarm:
        alarm = FakeAlarm(self.now + delay, callback)
        self.alarms.append(alarm)
        return alarm

    def armed(self) -> list[FakeAlarm]:
        return [a for a in self.alarms if not a.cancelled and not a.fired]

    def advance(self, seconds: float) -> None:
        self.now += seconds
        while due := [a for a in self.armed() if a.when <= self.now]:
            due[0].fired = True
            due[0].callback()


@pytest.fixture
def time() -> FakeTime:
    return FakeTime()


@pytest.fixture
def store(time: FakeTime) -> Store:
    store = Store(clock=time.clock, schedule=time.schedule)
    with connect_local(store, 0) as dom0:
        dom0.client.mkdir("/local/domain/1/data")
        dom0.client.set_perms("/local/domain/1", home_perms(1))
        dom0.client.set_perms("/local/domain/1/data", guest_rw_perms(1))
        dom0.client.introduce(1)
    return store


@pytest.fixture
def dom1(store: Store) -> Iterator[XsClient]:
    with connect_local(store, 1) as link:
        yield link.client


def _open(store: Store, domid: int) -> int:
    return sum(len(c.transactions) for c in store._connections if c.domid == domid)


def _errno(call: Callable[[], object]) -> str:
    with pytest.raises(XsError) as info:
        call()
    return info.value.errno_name


def test_a_transaction_past_its_lifetime_is_dropped_though_its_owner_sends_nothing(
    store: Store, dom1: XsClient, time: FakeTime
) -> None:
    tx = dom1.transaction_start()
    tx.write("data/x", "v" * 2000)

    time.advance(LIFETIME)

    assert _open(store, 1) == 0  # dropped with its overlay, by the alarm alone
    assert _errno(lambda: tx.read("data/x")) == "EAGAIN"
    assert _errno(lambda: dom1.transaction_end(tx)) == "EAGAIN"
    assert dom1.read_optional("data/x") is None
    bogus = Transaction(dom1, 999_999)
    assert _errno(lambda: bogus.read("data")) == "ENOENT"


def test_a_transaction_loop_that_outlives_the_lifetime_starts_over(
    dom1: XsClient, time: FakeTime
) -> None:
    attempts = []

    def slow_first_time(tx: Transaction) -> None:
        attempts.append(tx.tx_id)
        tx.write("data/x", str(len(attempts)))
        if len(attempts) == 1:
            time.advance(LIFETIME + 1)

    dom1.transaction(slow_first_time)

    assert len(attempts) == 2
    assert dom1.read("data/x") == "2"


def test_a_late_alarm_does_not_extend_a_lifetime(
    store: Store, dom1: XsClient, time: FakeTime
) -> None:
    tx = dom1.transaction_start()
    time.now += LIFETIME  # the alarm has not gone off yet

    assert _errno(lambda: tx.write("data/x", "1")) == "EAGAIN"
    assert _open(store, 1) == 0


def test_one_alarm_is_armed_only_while_a_domu_holds_a_transaction(
    store: Store, dom1: XsClient, time: FakeTime
) -> None:
    with connect_local(store, 0) as dom0:
        dom0.client.transaction_end(dom0.client.transaction_start())
        kept = dom0.client.transaction_start()  # dom0's never expire
        assert time.armed() == []

        first = dom1.transaction_start()
        time.advance(5)
        second = dom1.transaction_start()
        assert [a.when for a in time.armed()] == [1000.0 + LIFETIME]

        dom1.transaction_end(first)
        time.advance(LIFETIME - 5)  # the first one's deadline: the alarm finds nothing due
        assert [a.when for a in time.armed()] == [1005.0 + LIFETIME]

        time.advance(5)
        assert _errno(lambda: second.read("data")) == "EAGAIN"
        assert time.armed() == []  # idle: nothing will wake the store
        kept.read("/local")


def test_deadlines_close_together_expire_in_one_wakeup(
    store: Store, dom1: XsClient, time: FakeTime
) -> None:
    dom1.transaction_start()
    time.advance(0.1)
    dom1.transaction_start()
    time.advance(0.1)
    dom1.transaction_start()

    time.advance(LIFETIME - 0.2)  # the first one's deadline
    assert _open(store, 1) == 2
    time.advance(EXPIRY_SLACK)

    assert _open(store, 1) == 0
    assert len(time.alarms) == 2  # the first deadline, then the other two together


# -- what a domain's transactions hold -----------------------------------------------------------


def _end_by(how: str, link: LocalTransport, tx: Transaction, time: FakeTime) -> None:
    if how in ("commit", "abort"):
        link.client.transaction_end(tx, commit=how == "commit")
    elif how == "expiry":
        time.advance(LIFETIME)
    elif how == "reset-watches":
        link.client._call(XsType.RESET_WATCHES, b"")
    else:
        assert how == "close"
        link.close()


@pytest.mark.parametrize("how", ["commit", "abort", "expiry", "reset-watches", "close"])
def test_whatever_ends_a_transaction_frees_what_it_held_for_its_domain(
    store: Store, time: FakeTime, how: str
) -> None:
    store.set_quota(1, Quota(memory=5000, transactions=2))
    with connect_local(store, 1) as first, connect_local(store, 1) as second:
        kept = second.client.transaction_start()
        kept.write("data/kept", "v" * 1500)
        tx = first.client.transaction_start()
        tx.write("data/a", "v" * 2000)
        assert _errno(lambda: kept.write("data/b", "v" * 2000)) == "ENOSPC"
        assert _errno(lambda: second.client.transaction_start()) == "ENOSPC"

        _end_by(how, first, tx, time)

        if how == "expiry":  # it took the other one with it
            kept = second.client.transaction_start()
        kept.write("data/b", "v" * 2000)  # what the first held is free again
        assert second.client.transaction_start() is not None


class CountingSet(set[object]):
    """The store's connections, counting the walks over them."""

    walks = 0

    def __iter__(self) -> Iterator[object]:
        self.walks += 1
        return super().__iter__()


def test_a_domains_transaction_bounds_are_checked_without_walking_the_connections(
    store: Store, dom1: XsClient
) -> None:
    links = [connect_local(store, domid) for domid in (1, 2, 2, 3)]  # others, and its own
    for link in links:
        link.client.transaction_start()
    connections = store._connections = CountingSet(store._connections)  # type: ignore[assignment]

    tx = dom1.transaction_start()
    for i in range(20):
        tx.write(f"data/n{i}", "v" * 100)

    assert connections.walks == 0
    for link in links:
        link.close()
